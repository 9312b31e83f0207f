"""A taken-over call resumes its conversation: real LiveKit, real Redis, a texting caller.

The caller types (livekit-agents' room text input, topic ``lk.chat``) and
reads the agent's replies from its transcription streams (``lk.transcription``);
the offline agents answer with :class:`openrtc.agents.offline.OfflineLLM`, which
knows what the caller said first only if the history survived.
"""

from __future__ import annotations

import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import Caller, caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.settings import LiveKitSettings
from openrtc.store.checkpoint import Checkpoint, CheckpointStore
from openrtc.store.streams import JobConsumer, StreamStore, connect_redis
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import agent_identity
from tests.support.conversation import (
    GREETING,
    THREE_THINGS,
    agent_listening,
    greeted_call,
    three_things_said,
    transcribing,
)
from tests.support.faults import slow_api
from tests.support.jobs import job_message
from tests.support.processes import LEASE, children_of, worker_process_killed_on_exit
from tests.support.stack import (
    creds,
    delete_room,
    eventually,
    new_room,
    unique,
    working,
)
from tests.support.waits import pending_on, wait_member

pytestmark = pytest.mark.anyio

RESTAURANT_GREETING = "Trattoria Luca, offline line. A table for how many?"
RESUME_LINE = "Sorry, I lost you for a second."


@pytest.mark.parametrize("kill", ["worker", "session-process", "process-isolated-worker"])
async def test_a_killed_session_resumes_its_conversation_without_a_second_greeting(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, kill: str
) -> None:
    ns = unique("ns")
    args = ["--isolation", "process", "--idle-processes", "0"] if kill != "worker" else []
    isolation = "process" if kill == "process-isolated-worker" else "coroutine"
    with worker_process_killed_on_exit(livekit_server, redis_server.url, ns, *args) as first:
        async with (
            greeted_call(livekit_server, redis, ns, "dental", "dental-resume", GREETING) as call,
            AsyncExitStack() as stack,
        ):
            caller, transcript = call.caller, call.transcript
            key, original = call.key, call.original
            await three_things_said(transcript, redis, key)
            saved = await redis.get(key)
            assert livekit_server.api_secret.encode() not in saved
            assert Checkpoint.decode(saved) is not None

            if kill != "session-process":
                # A worker of the call's isolation takes it; in process isolation
                # the killed worker's session process leaves the room on its own.
                await stack.enter_async_context(
                    working(
                        livekit_server,
                        redis_server.url,
                        ns,
                        "dental",
                        lease=LEASE,
                        isolation=isolation,
                    )
                )
                first.send_signal(signal.SIGKILL)
            else:
                (zygote,) = children_of(first.pid)
                (session_process,) = children_of(zygote)
                os.kill(session_process, signal.SIGKILL)
            replacement = await caller.wait_agent(within=30, other_than=original.sid)
            assert replacement.identity == original.identity
            await agent_listening(caller, replacement.identity)

            await transcript.ask("what did I say first?", f"You first said: {THREE_THINGS[0]}")
            assert transcript.count(GREETING) == 1, transcript.lines


#: A greeting that plays for ~9 s (ToneTTS: 0.15 s a word): long enough for a
#: deploy to start and a peer to come up while the caller hears it.
LONG_GREETING = "Welcome to the long line. " + " ".join(["please hold while we greet you"] * 10)

GREETS_AT_LENGTH = f"""
from livekit.agents import Agent

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS


@agent_config(name="lobby", llm=OfflineLLM(), tts=ToneTTS(), greeting={LONG_GREETING!r})
class Lobby(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline lobby.")
"""


async def agent_speaking(caller: Caller) -> str:
    """Until an agent in the room is speaking (its state attribute says so); its sid."""
    found: list[str] = []

    def speaking() -> bool:
        found[:] = [
            p.sid for p in caller.agents() if p.attributes.get("lk.agent.state") == "speaking"
        ]
        return bool(found)

    await eventually(speaking, "an agent speaking", within=90)
    return found[0]


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_a_deploy_during_the_greeting_does_not_greet_the_caller_again(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    isolation: str,
) -> None:
    """SIGTERM while the agent is still greeting: the handover waits for the
    turn boundary at the greeting's end, and the peer that takes the call over
    knows the caller was greeted (seen in the chaos ledger: a deploy right as a
    call began gave its caller the greeting twice)."""
    (tmp_path / "lobby.py").write_text(GREETS_AT_LENGTH)
    agent, ns = "lobby", unique("ns")
    args = ["--isolation", isolation]
    with worker_process_killed_on_exit(
        livekit_server, redis_server.url, ns, *args, agent=agent, agents_dir=tmp_path
    ) as first:
        lk_room = await new_room(livekit_server, unique("lobby-deploy"))
        message = job_message(livekit_server, lk_room, agent, unique("dispatcher"))
        async with (
            caller_in(creds(livekit_server), lk_room.name) as caller,
            transcribing(caller) as transcript,
            AsyncExitStack() as stack,
        ):
            await StreamStore(redis, Keys(ns)).enqueue([message])
            original = await agent_speaking(caller)
            pool = AgentPool.from_directory(tmp_path)
            await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    agent,
                    pool=pool,
                    lease=LEASE,
                    isolation=isolation,
                )
            )
            # Still greeting: the deploy's handover waits for its end.
            assert transcript.count(LONG_GREETING) == 0, transcript.lines
            first.send_signal(signal.SIGTERM)
            replacement = await caller.wait_agent(within=60, other_than=original)
            assert replacement.identity == agent_identity(message.job_id)
            await agent_listening(caller, replacement.identity)
            await eventually(
                lambda: any(t.sid == replacement.sid and t.frames for t in caller.audio),
                "audio from the new session",
            )
            # The replacement answers, so a greeting it would say is said by now.
            await transcript.ask("my name is Ann", "Noted: my name is Ann")
            assert transcript.count(LONG_GREETING) == 1, transcript.lines
            await delete_room(livekit_server, lk_room.name)


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_a_line_said_while_a_handover_is_under_way_is_not_answered_and_forgotten(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, isolation: str
) -> None:
    """From the handover's last checkpoint until the peer joins, the old session
    is still in the room. A line the caller says then must not be answered by
    it: the peer resumes from that checkpoint and would never know what was
    acknowledged (seen in the chaos ledger: "Noted: my name is caller 15"
    from the old agent, then "You first said:" the second thing from the new
    one). Unanswered, the caller says it again to the peer, which keeps it."""
    ns = unique("ns")
    thing = THREE_THINGS[0]
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            working(livekit_server, redis_server.url, ns, "dental", isolation=isolation)
        )
        call = await stack.enter_async_context(
            greeted_call(livekit_server, redis, ns, "dental", "dental-gap", GREETING)
        )
        caller, transcript = call.caller, call.transcript
        # The peer checks the room for seconds before it joins: a wide gap.
        proxy = await stack.enter_async_context(slow_api(livekit_server.port, 4.0))
        await stack.enter_async_context(
            working(
                livekit_server,
                redis_server.url,
                ns,
                "dental",
                isolation=isolation,
                via=LiveKitSettings(proxy.url, livekit_server.api_key, livekit_server.api_secret),
            )
        )
        await wait_member(redis, call.keys, "dental", 2)
        first.request_stop()
        await eventually(lambda: first.stats.handed_over == 1, "the handover", within=30)
        await transcript.say(thing)
        peer_in = anyio.Event()

        async def wait_peer() -> None:
            await caller.wait_agent(within=60, other_than=call.original.sid)
            peer_in.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_peer)
            await eventually(
                lambda: peer_in.is_set() or transcript.count(f"Noted: {thing}") > 0,
                "the peer, or an answer from the old agent",
                within=60,
            )
        replacement = next(a for a in caller.agents() if a.sid != call.original.sid)
        await agent_listening(caller, replacement.identity)
        if not transcript.count(f"Noted: {thing}"):
            await transcript.ask(thing, f"Noted: {thing}")  # as a person repeats the unheard
        await transcript.ask("what did I say first?", f"You first said: {thing}")
        assert transcript.count(f"Noted: {thing}") == 1, transcript.lines
        await delete_room(livekit_server, call.message.room)


async def test_a_crashed_worker_s_call_given_back_by_a_draining_peer_is_taken_over_at_once(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """A worker crashes; a peer claims its call, and is SIGTERMed while it checks
    the room. Draining, it gives the entry back unstarted. The call runs (its
    record says so, its dead agent is still listed): the worker that reads the
    entry must take it over from its checkpoint at once, not take it for a
    lost read and wait a lease for a worker that is dead (seen in the chaos
    ledger: 12 s without an agent). Leases here are a minute long: only the
    handed-back entry can bring the call back within the bound."""
    ns, lease = unique("ns"), 60.0
    with worker_process_killed_on_exit(
        livekit_server, redis_server.url, ns, "--lease", str(lease), agent="dental"
    ) as first:
        async with AsyncExitStack() as stack:
            call = await stack.enter_async_context(
                greeted_call(livekit_server, redis, ns, "dental", "dental-giveback", GREETING)
            )
            caller, transcript = call.caller, call.transcript
            await three_things_said(transcript, redis, call.key)
            proxy = await stack.enter_async_context(slow_api(livekit_server.port, 4.0))
            draining = await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    "dental",
                    lease=lease,
                    via=LiveKitSettings(
                        proxy.url, livekit_server.api_key, livekit_server.api_secret
                    ),
                )
            )
            await wait_member(redis, call.keys, "dental", 2)
            first.kill()
            stream = call.keys.jobs("dental")

            async def claimed() -> bool:
                return bool(await pending_on(redis, stream, draining.settings.worker_id))

            await eventually(claimed, "the peer claiming the crashed worker's call", within=30)
            draining.request_stop()  # while its room check waits on the slow API
            await stack.enter_async_context(
                working(livekit_server, redis_server.url, ns, "dental", lease=lease)
            )
            replacement = await caller.wait_agent(within=30, other_than=call.original.sid)
            await agent_listening(caller, replacement.identity)
            await transcript.ask("what did I say first?", f"You first said: {THREE_THINGS[0]}")
            assert transcript.count(GREETING) == 1, transcript.lines
            await delete_room(livekit_server, call.message.room)


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_a_deploy_hands_the_call_over_with_its_conversation(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, isolation: str
) -> None:
    """SIGTERM while a peer has free slots: the call moves to it at a turn
    boundary with its conversation, no second greeting and no resume line
    (the caller lost nothing), and the old worker exits as soon as the peer
    is in, not when the call ends (its drain timeout is 30 minutes)."""
    agent, ns = "restaurant", unique("ns")
    args = ["--isolation", isolation]
    with worker_process_killed_on_exit(
        livekit_server, redis_server.url, ns, *args, agent=agent
    ) as first:
        async with (
            greeted_call(
                livekit_server, redis, ns, agent, "restaurant-handover", RESTAURANT_GREETING
            ) as call,
            AsyncExitStack() as stack,
        ):
            caller, transcript = call.caller, call.transcript
            original, message = call.original, call.message
            await three_things_said(transcript, redis, call.key)
            peer = await stack.enter_async_context(
                working(
                    livekit_server, redis_server.url, ns, agent, lease=LEASE, isolation=isolation
                )
            )
            first.send_signal(signal.SIGTERM)
            replacement = await caller.wait_agent(within=30, other_than=original.sid)
            assert replacement.identity == original.identity
            with anyio.fail_after(30):
                code = await anyio.to_thread.run_sync(first.wait)
            assert code == 0
            assert peer.running_jobs == [message.job_id]
            assert peer.stats.reclaimed == 0  # read as a new entry, not after a lease
            await agent_listening(caller, replacement.identity)
            await eventually(
                lambda: any(t.sid == replacement.sid and t.frames for t in caller.audio),
                "audio from the new session",
            )

            await transcript.ask("what did I say first?", f"You first said: {THREE_THINGS[0]}")
            assert transcript.count(RESTAURANT_GREETING) == 1, transcript.lines
            assert transcript.count(RESUME_LINE) == 0, transcript.lines


async def test_a_takeover_of_a_call_never_greeted_greets_instead_of_resuming(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """A session that lost its call before its greeting was said (its worker
    stalled past the lease while starting: seen in the chaos ledger) left a
    checkpoint that says the caller was not greeted. The session that takes
    the call over greets; it does not say the resume line ("Sorry, I lost you
    for a second") to a caller it never spoke to."""
    agent, ns = "restaurant", unique("ns")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    await store.ensure_group(agent)
    room = await new_room(livekit_server, unique("restaurant-ungreeted"))
    message = job_message(livekit_server, room, agent, unique("dispatcher"))
    async with (
        caller_in(creds(livekit_server), room.name) as caller,
        transcribing(caller) as transcript,
    ):
        await store.enqueue([message])
        # A worker that read the job, saved its first checkpoint and died.
        [delivery] = await JobConsumer(store, agent, "w-dead").read(1, 100)
        data = Checkpoint(greeted=False).encode(64 * 1024)
        assert data is not None
        checkpoints = CheckpointStore(redis, keys, agent, 60)
        assert await checkpoints.save(
            message.job_id, data, entry_id=delivery.entry_id, consumer="w-dead"
        )
        async with working(livekit_server, redis_server.url, ns, agent, lease=LEASE):
            taker = await caller.wait_agent(within=60)
            await agent_listening(caller, taker.identity)
            await eventually(
                lambda: transcript.count(RESTAURANT_GREETING), "the greeting", within=30
            )
            # It answers, so a line it would say on starting is said by now.
            await transcript.ask("my name is Ann", "Noted: my name is Ann")
            assert transcript.count(RESUME_LINE) == 0, transcript.lines
            assert transcript.count(RESTAURANT_GREETING) == 1, transcript.lines
    await delete_room(livekit_server, room.name)


async def test_the_termination_a_handover_causes_does_not_finish_the_call(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """The peer's join removes the old participant, and LiveKit terminates the
    job for it: that termination can reach the draining worker before its own
    participant's removal does. It used to end the old session as a success:
    the job's record marked done and its checkpoint deleted under the peer
    (seen in bench/recovery.py), so a later crash of the peer lost the call."""
    ns = unique("ns")
    async with (
        working(livekit_server, redis_server.url, ns, "dental", lease=LEASE) as first,
        greeted_call(livekit_server, redis, ns, "dental", "dental-handover-term", GREETING) as call,
    ):
        caller, transcript, original = call.caller, call.transcript, call.original
        keys, message, key, room = call.keys, call.message, call.key, call.caller.room
        store = StreamStore(redis, keys)
        await three_things_said(transcript, redis, key)
        release = first.consumer.release

        async def release_then_terminated(
            entry_id: str, job_id: str, *, handover: bool = False
        ) -> str | None:
            new_id = await release(entry_id, job_id, handover=handover)
            if handover:  # what the dispatcher relays once the peer has joined
                await store.publish_termination("dental", job_id, "agent left the room")
            return new_id

        first.consumer.release = release_then_terminated  # type: ignore[method-assign]
        async with working(livekit_server, redis_server.url, ns, "dental", lease=LEASE) as peer:
            first.request_stop()
            replacement = await caller.wait_agent(within=30, other_than=original.sid)
            assert replacement.identity == original.identity
            await eventually(lambda: not first.running_jobs, "the old session gone", within=20)
            assert first.stats.handed_over == 1
            assert first.stats.succeeded == 0
            assert peer.running_jobs == [message.job_id]
            record = await redis.hgetall(keys.job("dental", message.job_id))
            assert record[b"state"] == b"running"
            assert record[b"worker"] == peer.settings.worker_id.encode()
            assert await redis.exists(key)
            await agent_listening(caller, replacement.identity)
            await transcript.ask("what did I say first?", f"You first said: {THREE_THINGS[0]}")
            await delete_room(livekit_server, room.name)


#: livekit-agents' idiom: the agent greets in ``on_enter``.
GREETS_ON_ENTER = """
from livekit.agents import Agent

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS


@agent_config(name="concierge", llm=OfflineLLM(), tts=ToneTTS())
class Concierge(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline concierge.")

    async def on_enter(self) -> None:
        self.session.say("Concierge here, greeted on entering.")

    async def on_resume(self) -> None:
        self.session.say("Concierge here, resumed.")
"""


async def test_a_resumed_agent_is_not_entered_again(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """After a SIGKILL the resumed agent's ``on_resume()`` runs, not its ``on_enter()``:
    an agent that greets on entering does not greet twice."""
    (tmp_path / "concierge.py").write_text(GREETS_ON_ENTER)
    agent, ns = "concierge", unique("ns")
    greeting = "Concierge here, greeted on entering."
    with worker_process_killed_on_exit(
        livekit_server, redis_server.url, ns, agent=agent, agents_dir=tmp_path
    ) as first:
        async with (
            greeted_call(livekit_server, redis, ns, agent, "concierge-resume", greeting) as call,
            AsyncExitStack() as stack,
        ):
            caller, transcript, original = call.caller, call.transcript, call.original
            await three_things_said(transcript, redis, call.key)
            pool = AgentPool.from_directory(tmp_path)
            await stack.enter_async_context(
                working(livekit_server, redis_server.url, ns, agent, pool=pool, lease=LEASE)
            )
            first.send_signal(signal.SIGKILL)
            replacement = await caller.wait_agent(within=30, other_than=original.sid)
            await agent_listening(caller, replacement.identity)
            await eventually(
                lambda: transcript.count("Concierge here, resumed."), "on_resume", within=20
            )
            await transcript.ask("what did I say first?", f"You first said: {THREE_THINGS[0]}")
            assert transcript.count(greeting) == 1, transcript.lines
            assert transcript.count("Concierge here, resumed.") == 1, transcript.lines


async def test_a_session_whose_call_went_elsewhere_never_overwrites_the_checkpoint(
    livekit_server: LiveKitServer, redis: Redis
) -> None:
    """Checkpoints are fenced by the entry's owner: a worker back from a partition
    (its lease lapsed, a peer resumed the call) writes the state it had in vain."""
    keys = Keys(unique("ns"))
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    room = await new_room(livekit_server, unique("dental-fence"))
    message = job_message(livekit_server, room, "dental", unique("dispatcher"))
    await store.enqueue([message])
    [delivery] = await JobConsumer(store, "dental", "w-old").read(1, 100)
    job, entry = message.job_id, delivery.entry_id
    checkpoints = CheckpointStore(redis, keys, "dental", 60)
    assert await checkpoints.save(job, b"old 1", entry_id=entry, consumer="w-old")
    # The lease lapsed: a peer claims the entry and goes on from "old 1".
    await redis.xclaim(keys.jobs("dental"), WORKERS_GROUP, "w-new", 0, [entry])
    assert await checkpoints.save(job, b"new 1", entry_id=entry, consumer="w-new")
    assert not await checkpoints.save(job, b"old 2", entry_id=entry, consumer="w-old")
    assert await checkpoints.load(job) == b"new 1"
    # Nor for an entry that is gone (handed over: re-added under a new id).
    assert not await checkpoints.save(job, b"new 2", entry_id="1-1", consumer="w-new")
    assert await checkpoints.load(job) == b"new 1"


async def test_a_redis_outage_does_not_stop_the_call_and_checkpoints_resume_after(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    ns = unique("ns")
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(90):
        redis = connect_redis(server.url)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            worker = await stack.enter_async_context(
                working(livekit_server, server.url, ns, "dental", lease=LEASE, drain_timeout=0.5)
            )
            call = await stack.enter_async_context(
                greeted_call(livekit_server, redis, ns, "dental", "dental-outage", GREETING)
            )
            caller, transcript, key, agent = call.caller, call.transcript, call.key, call.original
            message = call.message
            await transcript.ask("before the outage", "Noted: before the outage")

            await anyio.to_thread.run_sync(server.stop)
            # The conversation goes on while no checkpoint can be written.
            await transcript.ask("during the outage", "Noted: during the outage")
            await anyio.to_thread.run_sync(server.start)

            async def saved() -> bool:
                data = await redis.get(key)
                return data is not None and b"during the outage" in data

            await eventually(saved, "the turn from the outage checkpointed", within=20)
            assert [a.sid for a in caller.agents()] == [agent.sid]
            assert worker.running_jobs == [message.job_id]


async def test_one_huge_turn_does_not_wipe_the_conversation_it_joins(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """A turn alone over ``--checkpoint-max-bytes`` (a pasted document) is
    shortened in the checkpoint, with a marker, instead of taking every
    earlier turn with it: after a SIGKILL the resumed agent still knows what
    the caller said first."""
    ns = unique("ns")
    # One "word" to the tone TTS: its reply is one tone, not minutes of them.
    huge = "paste " + "z" * 70_000
    with worker_process_killed_on_exit(livekit_server, redis_server.url, ns) as first:
        async with (
            greeted_call(livekit_server, redis, ns, "dental", "dental-huge-turn", GREETING) as call,
            AsyncExitStack() as stack,
        ):
            caller, transcript = call.caller, call.transcript
            key, original = call.key, call.original
            await transcript.ask("remember apple", "Noted: remember apple")
            await transcript.ask("remember pear", "Noted: remember pear")
            await transcript.ask(huge, f"Noted: {huge}", within=40)
            await transcript.ask("remember plum", "Noted: remember plum")

            async def saved() -> bool:
                data = await redis.get(key)
                return data is not None and b"remember plum" in data

            await eventually(saved, "the turn after the huge one checkpointed")
            data = await redis.get(key)
            assert len(data) <= 64 * 1024
            await stack.enter_async_context(
                working(livekit_server, redis_server.url, ns, "dental", lease=LEASE)
            )
            first.send_signal(signal.SIGKILL)
            replacement = await caller.wait_agent(within=30, other_than=original.sid)
            assert replacement.identity == original.identity
            await agent_listening(caller, replacement.identity)
            await transcript.ask("what did I say first?", "You first said: remember apple")
            assert transcript.count(GREETING) == 1, transcript.lines


#: An agent with state of its own and a tool with a side effect, noted in a
#: file the test reads (the "backend"): what a restored agent got, what was booked.
BOOKS_TABLES = """
import json
import os

from livekit.agents import Agent, RunContext, function_tool

from openrtc import agent_config, idempotency_key
from openrtc.agents.offline import OfflineLLM, ToneTTS

BACKEND = os.environ["OPENRTC_TEST_BACKEND"]


def note(line: str) -> None:
    with open(BACKEND, "a") as backend:
        backend.write(line + "\\n")


@agent_config(name="bookings", llm=OfflineLLM(), tts=ToneTTS(), greeting="Bookings line.")
class Bookings(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline bookings.")
        self.booked: list[int] = []

    def checkpoint_state(self) -> dict:
        return {"booked": self.booked, "api_key": "never-checkpointed"}

    def restore_state(self, state: dict) -> None:
        self.booked = list(state["booked"])
        note("restored " + json.dumps(state, sort_keys=True))

    @function_tool
    async def book_table(self, context: RunContext, party_size: int) -> str:
        \"\"\"Book a table for ``party_size`` people.\"\"\"
        note(f"booked {idempotency_key(context)} {party_size}")
        self.booked.append(party_size)
        return f"table for {party_size} booked"
"""


async def test_a_takeover_restores_the_agent_s_own_state_and_repeats_no_completed_tool_call(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``checkpoint_state()`` / ``restore_state()`` and ``idempotency_key`` across a SIGKILL.

    The caller books a table (the tool runs once, with key ``<job id>:<call
    id>``); the worker is killed; the peer's session gets the agent's own
    state back (its secret-looking key dropped), knows the conversation, and
    never books again.
    """
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "bookings.py").write_text(BOOKS_TABLES)
    backend = tmp_path / "backend.log"
    backend.touch()
    monkeypatch.setenv("OPENRTC_TEST_BACKEND", str(backend))
    agent, ns = "bookings", unique("ns")
    keys = Keys(ns)
    room = await new_room(livekit_server, unique("bookings-resume"))
    message = job_message(livekit_server, room, agent, unique("dispatcher"))
    key = keys.checkpoint(agent, message.job_id)
    with (
        worker_process_killed_on_exit(
            livekit_server, redis_server.url, ns, agent=agent, agents_dir=agents
        ) as first,
    ):
        async with AsyncExitStack() as stack:
            caller = await stack.enter_async_context(caller_in(creds(livekit_server), room.name))
            transcript = await stack.enter_async_context(transcribing(caller))
            # Queued once the worker is up: a worker process may take a minute
            # to start on a loaded machine, and a job waits at most 30 s.
            await wait_member(redis, keys, agent)
            await StreamStore(redis, keys).enqueue([message])
            original = await caller.wait_agent(within=30)
            await eventually(lambda: transcript.count("Bookings line."), "the greeting", within=20)
            await transcript.ask("book a table for 4", "Done: table for 4 booked")

            async def state_saved() -> bool:
                saved = await redis.get(key)
                checkpoint = Checkpoint.decode(saved) if saved else None
                return checkpoint is not None and (checkpoint.state or {}).get("booked") == [4]

            await eventually(state_saved, "the agent's state checkpointed")
            [booking] = backend.read_text().splitlines()
            assert booking.startswith(f"booked {message.job_id}:"), booking
            await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    agent,
                    pool=AgentPool.from_directory(agents),
                    lease=LEASE,
                )
            )
            first.send_signal(signal.SIGKILL)
            replacement = await caller.wait_agent(within=30, other_than=original.sid)
            await agent_listening(caller, replacement.identity)
            await transcript.ask("what did I say first?", "You first said: book a table for 4")
            lines = backend.read_text().splitlines()
            assert lines == [booking, 'restored {"booked": [4]}'], lines
            assert transcript.count("Done: table for 4 booked") == 1, transcript.lines

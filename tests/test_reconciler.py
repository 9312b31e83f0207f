"""No single dispatcher, no room left without an agent: real LiveKit, real Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from livekit import api
from livekit.agents.types import ATTRIBUTE_AGENT_STATE
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.dispatcher.reconciler import REDISPATCH_COOLDOWN, RoomState, needs_agent
from openrtc.settings import LiveKitSettings
from openrtc.wire.keys import Keys
from tests.support.faults import slow_api
from tests.support.processes import service_env
from tests.support.stack import (
    OFFLINE_AGENTS,
    HoldingRunner,
    creds,
    delete_room,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)

pytestmark = pytest.mark.anyio

#: Fast enough for the tests: a room without an agent is dispatched again
#: within about GRACE + INTERVAL seconds.
FAST = {"reconcile_interval": 0.3, "reconcile_grace": 1.0}


def reconciling(livekit: LiveKitServer, redis_url: str, ns: str, **overrides: Any) -> Any:
    return dispatching(dispatcher_settings(livekit, redis_url, ns, **{**FAST, **overrides}))


@pytest.mark.parametrize(
    ("room", "served_at", "dispatched_at", "queued", "expected"),
    [
        (RoomState("r", 90.0, False), None, None, False, True),  # caller waited 10 s
        (RoomState("r", 99.0, False), None, None, False, False),  # within the grace
        (RoomState("r", 90.0, True), None, None, False, False),  # has its agent
        (RoomState("r", None, False), None, None, False, False),  # nobody to talk to
        (RoomState("r", 90.0, False), None, None, True, False),  # its job is queued
        (RoomState("r", 50.0, False), 99.0, None, False, False),  # agent just left
        (RoomState("r", 50.0, False), 95.0, None, False, True),  # agent left 5 s ago
        (RoomState("r", 50.0, False), None, 100.0 - REDISPATCH_COOLDOWN / 2, False, False),
        (RoomState("r", 50.0, False), None, 100.0 - REDISPATCH_COOLDOWN, False, True),
    ],
)
@pytest.mark.unit
def test_needs_agent(
    room: RoomState,
    served_at: float | None,
    dispatched_at: float | None,
    queued: bool,
    expected: bool,
) -> None:
    got = needs_agent(
        room, now=100.0, grace=3.0, served_at=served_at, dispatched_at=dispatched_at, queued=queued
    )
    assert got is expected


async def test_a_room_created_while_no_dispatcher_ran_gets_its_agent(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    room = unique("dental-orphan")
    async with working(livekit_server, redis_server.url, ns, "dental"):
        # LiveKit decides the dispatch now, finds no agent worker, and never retries.
        await new_room(livekit_server, room)
        async with (
            caller_in(creds(livekit_server), room) as caller,
            reconciling(livekit_server, redis_server.url, ns) as dispatcher,
        ):
            agent = await caller.wait_agent(within=15)
            assert agent.attributes.get("lk.agent_name", "") == ""
            assert dispatcher.stats.reconciled == 1
            assert dispatcher.stats.reconcile_leader == 1
            # The one job LiveKit offered is the reconciler's: the room's own
            # job was not offered again once a dispatcher was in.
            assert dispatcher.stats.offered == 1
            assert caller.max_agents_at_once == 1
        await delete_room(livekit_server, room)


async def test_a_room_whose_agent_left_while_the_caller_stayed_gets_one_again(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    room = unique("dental-left")
    async with (
        reconciling(livekit_server, redis_server.url, ns) as dispatcher,
        working(livekit_server, redis_server.url, ns, "dental") as worker,
    ):
        await new_room(livekit_server, room)
        async with caller_in(creds(livekit_server), room) as caller:
            first = await caller.wait_agent(within=20)
            assert dispatcher.stats.reconciled == 0
            async with api.LiveKitAPI(
                livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
            ) as lk:
                await lk.room.remove_participant(
                    api.RoomParticipantIdentity(room=room, identity=first.identity)
                )
            await eventually(lambda: worker.stats.succeeded == 1, "the first session's end")
            second = await caller.wait_agent(within=20, other_than=first.sid)
            assert second.identity != first.identity  # a new job, dispatched again
            assert dispatcher.stats.reconciled == 1
            assert worker.stats.started == 2
        await delete_room(livekit_server, room)


#: An agent that ends the call when the caller says goodbye (and the caller stays).
FAREWELL_AGENT = """
from livekit.agents import Agent, get_job_context

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS


@agent_config(name="farewell", llm=OfflineLLM(), tts=ToneTTS(), greeting="Farewell line, hello.")
class Farewell(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Ends the call on goodbye.")

    def llm_node(self, chat_ctx, tools, model_settings):
        said = [m.text_content or "" for m in chat_ctx.items if getattr(m, "role", "") == "user"]
        if said and "goodbye" in said[-1].lower():
            get_job_context().shutdown("the caller said goodbye")
        return Agent.default.llm_node(self, chat_ctx, tools, model_settings)
"""


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_a_room_whose_agent_ended_the_call_on_purpose_is_left_alone(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    isolation: str,
) -> None:
    (tmp_path / "farewell.py").write_text(FAREWELL_AGENT)
    pool = AgentPool.from_directory(tmp_path)
    ns = unique("ns")
    room = unique("farewell-bye")
    settings = dispatcher_settings(livekit_server, redis_server.url, ns, **FAST)
    async with (
        dispatching(settings, pool) as dispatcher,
        working(
            livekit_server, redis_server.url, ns, "farewell", pool=pool, isolation=isolation
        ) as worker,
    ):
        await new_room(livekit_server, room)
        async with caller_in(creds(livekit_server), room) as caller:
            agent = await caller.wait_agent(within=20)

            def listening() -> bool:
                [participant] = [p for p in caller.agents() if p.sid == agent.sid]
                return participant.attributes.get(ATTRIBUTE_AGENT_STATE) == "listening"

            # Text typed before the session listens is dropped: its greeting said.
            await eventually(listening, "the agent listening", within=20)
            await caller.room.local_participant.send_text("goodbye then", topic="lk.chat")
            await eventually(lambda: worker.stats.succeeded == 1, "the agent to end the call")
            await caller.wait_no_agent(within=20)
            keys = Keys(ns)
            # Marked before the job's entry is acknowledged (counted succeeded before both).
            await eventually(lambda: redis.get(keys.ended(room)), "the room marked ended")

            async def alone_as_the_reconciler_sees_it() -> bool:
                # Its job's entry gone (no longer "queued"), and no agent in
                # LiveKit's own list (what the reconciler reads; it can lag
                # behind what the caller saw).
                if await redis.xlen(keys.jobs("farewell")):
                    return False
                listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
                return all(p.kind != api.ParticipantInfo.Kind.AGENT for p in listed.participants)

            async with api.LiveKitAPI(
                livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
            ) as lk:
                await eventually(alone_as_the_reconciler_sees_it, "the room without its job")
            # The caller stays, alone, well past the grace (each pass is at least
            # the 0.3 s interval apart): passes look and leave it.
            passes = dispatcher.stats.reconcile_passes
            await eventually(
                lambda: dispatcher.stats.reconcile_passes >= passes + 12,
                "reconciler passes past the grace",
                within=30,
            )
            assert dispatcher.stats.reconciled == 0
            assert caller.agents() == []
            assert worker.stats.started == 1
        await delete_room(livekit_server, room)


async def test_a_room_whose_job_is_queued_is_not_dispatched_twice(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("dental-queued")
    async with reconciling(livekit_server, redis_server.url, ns) as dispatcher:
        await new_room(livekit_server, room)
        async with caller_in(creds(livekit_server), room) as caller:
            # No worker yet: the job waits in the stream, the caller with no agent.
            await eventually(lambda: dispatcher.stats.enqueued == 1, "the job enqueued")
            passes = dispatcher.stats.reconcile_passes
            await eventually(
                lambda: dispatcher.stats.reconcile_passes >= passes + 8,
                "reconciler passes past the grace",
            )
            assert dispatcher.stats.reconciled == 0
            assert await redis.xlen(keys.jobs("dental")) == 1
            async with working(livekit_server, redis_server.url, ns, "dental") as worker:
                await caller.wait_agent(within=20)
                # Passes past the grace with the call served, and every entry of
                # the stream read and started: a second job would show here.
                passes = dispatcher.stats.reconcile_passes
                await eventually(
                    lambda: dispatcher.stats.reconcile_passes >= passes + 8,
                    "reconciler passes past the grace",
                )

                async def all_read() -> bool:
                    [group] = await redis.xinfo_groups(keys.jobs("dental"))
                    return bool(group["lag"] == 0 and group["pending"] <= worker.stats.started)

                await eventually(all_read, "every entry read by the worker")
                assert worker.stats.started == 1
                assert dispatcher.stats.reconciled == 0
            assert caller.max_agents_at_once == 1
            assert dispatcher.stats.offered == 1
        await delete_room(livekit_server, room)


async def test_only_one_of_two_dispatchers_reconciles_and_the_other_takes_over(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    async with (
        reconciling(livekit_server, redis_server.url, ns) as one,
        reconciling(livekit_server, redis_server.url, ns) as two,
    ):
        both = [one, two]
        await eventually(
            lambda: any(d.stats.reconcile_passes >= 5 for d in both), "reconciler passes"
        )
        leader, other = both if one.stats.reconcile_passes else both[::-1]
        assert other.stats.reconcile_passes == 0
        assert (leader.stats.reconcile_leader, other.stats.reconcile_leader) == (1, 0)
        leader.request_stop()  # releases the lease: the other takes it at its next look
        await eventually(lambda: other.stats.reconcile_passes >= 1, "the other to take over")
        assert other.stats.reconcile_leader == 1


async def test_a_pass_longer_than_the_lease_keeps_it_and_no_second_leader_runs(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    # The lease is 2 s (FAST: 3 x 0.3 s, at least 2 s); each LiveKit API call
    # of the leader takes 3 s, so one pass lasts at least twice the lease.
    async with slow_api(livekit_server.port, 3.0) as proxy:
        slow = LiveKitSettings(proxy.url, livekit_server.api_key, livekit_server.api_secret)
        async with dispatching(dispatcher_settings(slow, redis_server.url, ns, **FAST)) as leader:
            await eventually(lambda: leader.stats.reconcile_leader == 1, "the lease taken")
            async with reconciling(livekit_server, redis_server.url, ns) as other:
                passes: list[int] = []

                async def passes_while_the_other_looks() -> bool:
                    assert other.stats.reconcile_passes == 0, "a second leader ran a pass"
                    assert other.stats.reconcile_leader == 0
                    passes.append(leader.stats.reconcile_passes)
                    return leader.stats.reconcile_passes >= 2

                await eventually(
                    passes_while_the_other_looks, "two slow passes of the leader", within=60
                )
                assert leader.stats.reconcile_leader == 1
                assert leader.stats.reconcile_errors == 0
                assert proxy.requests_delayed >= 2


def dispatcher_process(livekit: LiveKitServer, redis_url: str, ns: str) -> subprocess.Popen[str]:
    env = service_env(livekit, redis_url, ns)
    return subprocess.Popen(
        [sys.executable, "-m", "openrtc", "dispatcher", "--agents-dir", str(OFFLINE_AGENTS)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_two_dispatchers_one_killed_mid_run_no_call_lost(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    runner = HoldingRunner()
    rooms: list[str] = []

    async def dispatchers_of_held_jobs() -> set[str]:
        entries = await redis.xrange(keys.jobs("dental"))
        return {fields[b"dispatcher"].decode() for _id, fields in entries}

    async def place_call() -> None:
        rooms.append(unique(f"dental-two-{len(rooms)}"))
        await new_room(livekit_server, rooms[-1])

    other = dispatcher_process(livekit_server, redis_server.url, ns)
    try:
        async with (
            working(
                livekit_server, redis_server.url, ns, "dental", runner=runner, concurrency=40
            ) as worker,
            dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as mine,
        ):

            async def both_live() -> bool:
                return bool(await redis.zcard(keys.dispatchers) >= 2)

            await eventually(both_live, "both dispatchers' heartbeats", within=30)
            # LiveKit offers each job to one of the registered dispatchers, at
            # random: calls until each has taken some.
            with anyio.fail_after(60):
                while True:
                    await place_call()
                    await eventually(lambda: worker.stats.started == len(rooms), "the call")
                    held = await dispatchers_of_held_jobs()
                    if len(held) == 2:
                        break
            assert mine.settings.dispatcher_id in held
            other.send_signal(signal.SIGKILL)
            other.wait(5)
            before = len(rooms)
            for _ in range(6):
                await place_call()
            await eventually(
                lambda: worker.stats.started == len(rooms), "every call served", within=30
            )
            # The killed dispatcher's calls go on: their sessions never stopped.
            assert not any(c.stopping for c in runner.controls)
            assert mine.stats.enqueued >= len(rooms) - before
    finally:
        runner.end_all()
        if other.poll() is None:
            other.kill()
        for room in rooms:
            await delete_room(livekit_server, room)


async def test_of_two_jobs_of_our_agent_in_one_room_the_later_leaves(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    room = unique("dental-twice")
    settings = dispatcher_settings(livekit_server, redis_server.url, ns, reconcile_interval=0)
    async with (
        dispatching(settings),
        working(livekit_server, redis_server.url, ns, "dental") as worker,
    ):
        # No caller yet: the second job's room check sees fewer than two
        # participants and joins, as two jobs dispatched at the same moment
        # (two reconcilers at once) both do.
        await new_room(livekit_server, room)
        await eventually(lambda: len(worker.running) == 1, "the first job's session", within=20)
        first = worker.running[0].accept.identity
        async with api.LiveKitAPI(
            livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
        ) as lk:
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name="", room=room)
            )
        await eventually(lambda: worker.stats.started == 2, "the second job's session", within=20)
        await eventually(
            lambda: worker.stats.succeeded == 1 and len(worker.running) == 1,
            "one of the two to leave",
            within=20,
        )
        # The earlier job's agent stays, alone.
        assert worker.running[0].accept.identity == first
        async with caller_in(creds(livekit_server), room) as caller:
            agent = await caller.wait_agent(within=20)
            assert agent.identity == first
            assert len(caller.agents()) == 1
        await delete_room(livekit_server, room)

"""Redis comes back without a worker's read, or without a handed-over entry (issue 17, 1 and 5).

Real Redis restarted from a snapshot taken between a job's enqueue and its
read (Debian's default persistence; the lost tail of an ``everysec`` AOF and a
failover to a replica that missed the XREADGROUP leave the same state), real
LiveKit, real worker processes, and a texting caller whose offline agent
answers "what did I say first?" from its conversation: the promise is one
agent, one greeting, the conversation kept, and one entry per job.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from openrtc.devtools.caller import AgentSighting, Caller, caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.store.membership import live_members
from openrtc.store.streams import JobConsumer, StreamStore, connect_redis
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import JobMessage
from openrtc.worker.worker import Worker
from tests.support.conversation import (
    GREETING,
    THREE_THINGS,
    Transcript,
    agent_listening,
    three_things_said,
    transcribing,
)
from tests.support.jobs import job_message
from tests.support.processes import worker_process_killed_on_exit
from tests.support.stack import creds, delete_room, eventually, new_room, unique, working
from tests.support.waits import pending_on, reclaim_sweeps, wait_member

pytestmark = pytest.mark.anyio

BUDGET = 240.0
RECALL = "what did I say first?"
ANSWER = f"You first said: {THREE_THINGS[0]}"


async def job_entries(redis: Redis, stream: str, job_id: str) -> list[str]:
    """Ids of the stream's entries for ``job_id`` (waiting or pending alike)."""
    return [
        entry_id.decode()
        for entry_id, fields in await redis.xrange(stream)
        if fields.get(b"job_id") == job_id.encode()
    ]


def restart(server: RedisServer) -> None:
    """Stop and start again: the server loads the last ``SAVE`` (and nothing after it)."""
    server.stop()
    server.start()


async def test_renewal_tells_a_stray_read_of_our_entry_from_a_successor(
    livekit_server: LiveKitServer, redis: Redis
) -> None:
    """RENEW, WRITE_BACK and START against a real Redis, state by state."""
    keys = Keys(unique("ns"))
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    stream = keys.jobs("dental")
    room = await new_room(livekit_server, unique("dental-renew"))
    message = job_message(livekit_server, room, "dental", unique("dispatcher"))
    job = message.job_id
    live, stray = JobConsumer(store, "dental", "w-live"), JobConsumer(store, "dental", "w-peer")
    await store.enqueue([message])
    [mine] = await live.read(1, 100)
    assert await live.start(mine.entry_id, job)
    # Redis comes back from a snapshot taken before the read: the entry is
    # unread, the record says queued; a peer reads it as new.
    await redis.xgroup_destroy(stream, WORKERS_GROUP)
    await redis.hset(keys.job("dental", job), mapping={"state": "queued"})
    await redis.hdel(keys.job("dental", job), "worker")
    await store.ensure_group("dental")
    [theirs] = await stray.read(1, 100)
    assert theirs.entry_id == mine.entry_id
    assert theirs.deliveries == 1
    renewal = await live.renew({mine.entry_id: job})
    assert (renewal.lost, renewal.forgotten) == ([], [mine.entry_id])
    # The live worker writes the call back: one entry, pending on it; the
    # stray reader's claim is gone, and it may not start the call.
    new = await live.write_back(job, mine.fields, forgotten=mine.entry_id)
    assert await job_entries(redis, stream, job) == [new]
    assert await pending_on(redis, stream, "w-live") == [new]
    assert not await stray.start(theirs.entry_id, job)
    assert (await stray.renew({theirs.entry_id: job})).lost == [theirs.entry_id]
    # A successor (it marked the job its own) is never written back over.
    await redis.xclaim(stream, WORKERS_GROUP, "w-peer", 0, [new])
    assert await stray.start(new, job)
    assert (await live.renew({new: job})).lost == [new]


async def test_a_takeover_redis_forgot_is_written_back_not_left_to_the_dead_holder(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """A worker dies; a peer takes its call over (delivery 2); Redis comes back
    from a snapshot taken before the takeover, naming the dead worker as the
    entry's holder and in the record. The peer's renewal must call the entry
    forgotten (write it back as its own), not lost to a worker that is dead
    (seen in the chaos ledger: the taker stepped aside, nobody served the
    call, the reconciler dispatched a new job: a second greeting, the
    conversation gone)."""
    keys = Keys(unique("ns"))
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(BUDGET):
        redis = connect_redis(server.url)
        try:
            store = StreamStore(redis, keys)
            await store.ensure_group("dental")
            stream = keys.jobs("dental")
            room = await new_room(livekit_server, unique("dental-deadholder"))
            message = job_message(livekit_server, room, "dental", unique("dispatcher"))
            job = message.job_id
            dead, taker = (
                JobConsumer(store, "dental", "w-dead"),
                JobConsumer(store, "dental", "w-taker"),
            )
            await store.enqueue([message])
            [held] = await dead.read(1, 100)
            assert await dead.start(held.entry_id, job)
            await redis.save()  # the snapshot: the dead worker holds the call
            taken = await redis.xclaim(stream, WORKERS_GROUP, "w-taker", 0, [held.entry_id])
            assert len(taken) == 1
            assert await taker.start(held.entry_id, job)
            await anyio.to_thread.run_sync(restart, server)
            renewal = await taker.renew({held.entry_id: job}, deliveries={held.entry_id: 2})
            assert (renewal.lost, renewal.forgotten) == ([], [held.entry_id])
            # A successor that took the call from the taker (delivery 3) is never
            # written back over.
            await redis.xclaim(stream, WORKERS_GROUP, "w-dead", 0, [held.entry_id])
            await redis.xclaim(stream, WORKERS_GROUP, "w-next", 0, [held.entry_id])
            renewal = await taker.renew({held.entry_id: job}, deliveries={held.entry_id: 2})
            assert renewal.lost == [held.entry_id]
        finally:
            await redis.aclose()


async def test_a_released_entry_is_present_moved_or_forgotten(
    livekit_server: LiveKitServer, redis: Redis
) -> None:
    keys = Keys(unique("ns"))
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    room = await new_room(livekit_server, unique("dental-released"))
    message = job_message(livekit_server, room, "dental", unique("dispatcher"))
    job = message.job_id
    old, peer = JobConsumer(store, "dental", "w-old"), JobConsumer(store, "dental", "w-new")
    await store.enqueue([message])
    [held] = await old.read(1, 100)
    assert await old.start(held.entry_id, job)
    released = await old.release(held.entry_id, job, handover=True)
    assert released is not None
    assert await old.released(released, job) == "present"
    [read] = await peer.read(1, 100)
    assert await old.released(released, job) == "present"
    # Redis loses the read and the entry (a failover): nobody has the call.
    await redis.xack(keys.jobs("dental"), WORKERS_GROUP, read.entry_id)
    await redis.xdel(keys.jobs("dental"), read.entry_id)
    assert await old.released(released, job) == "forgotten"
    # The peer had started it: its call, gone from the stream when it ended.
    assert not await peer.start(read.entry_id, job)
    await redis.hset(keys.job("dental", job), "worker", "w-new")
    assert await old.released(released, job) == "moved"


async def test_a_written_back_call_keeps_one_entry(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """The snapshot holds the job's entry unread; the worker (full: it reads
    nothing new) writes the call back and must delete that forgotten entry, not
    re-add it beside the written-back one, where a peer starts the call again."""
    ns, lease = unique("ns"), 2.0
    keys = Keys(ns)
    stream = keys.jobs("dental")
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(BUDGET):
        redis = connect_redis(server.url)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            store = StreamStore(redis, keys)
            await store.ensure_group("dental")
            room = await new_room(livekit_server, unique("dental-writeback"))
            message = job_message(livekit_server, room, "dental", unique("dispatcher"))
            await store.enqueue([message])
            await redis.save()  # the snapshot: the entry is there, nobody has read it
            caller = await stack.enter_async_context(caller_in(creds(livekit_server), room.name))
            transcript = await stack.enter_async_context(transcribing(caller))
            worker = await stack.enter_async_context(
                working(
                    livekit_server,
                    server.url,
                    ns,
                    "dental",
                    lease=lease,
                    drain_timeout=0.5,
                    concurrency=1,
                )
            )
            original = await caller.wait_agent(within=30)
            await eventually(lambda: transcript.count(GREETING), "the greeting", within=20)
            await three_things_said(transcript, redis, keys.checkpoint("dental", message.job_id))

            await anyio.to_thread.run_sync(restart, server)
            me = worker.settings.worker_id
            record_key = keys.job("dental", message.job_id)

            async def written_back() -> bool:
                record = await redis.hgetall(record_key)
                return record.get(b"worker") == me.encode() and bool(
                    await pending_on(redis, stream, me)
                )

            await eventually(written_back, "the call written back", within=20)
            entries = await job_entries(redis, stream, message.job_id)
            assert len(entries) == 1, entries
            assert await pending_on(redis, stream, me) == entries

            await transcript.ask(RECALL, ANSWER)
            assert [a.sid for a in caller.agents()] == [original.sid]
            assert transcript.count(GREETING) == 1, transcript.lines
            assert worker.stats.started == 1
            assert len(await job_entries(redis, stream, message.job_id)) == 1
            await delete_room(livekit_server, room.name)


async def test_a_peer_reading_a_restored_entry_does_not_displace_the_live_session(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """The worker serving the call is paused (SIGSTOP) for 3 s across a restart
    from the snapshot; its peer reads the restored entry as delivery 1. The
    agent of the job is in the room: the peer must not start afresh (a second
    greeting, the conversation gone), and the live session keeps the call."""
    ns, lease = unique("ns"), 8.0
    keys = Keys(ns)
    stream = keys.jobs("dental")
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(BUDGET):
        redis = connect_redis(server.url)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            store = StreamStore(redis, keys)
            await store.ensure_group("dental")
            room = await new_room(livekit_server, unique("dental-lostread"))
            message = job_message(livekit_server, room, "dental", unique("dispatcher"))
            await store.enqueue([message])
            await redis.save()
            caller = await stack.enter_async_context(caller_in(creds(livekit_server), room.name))
            transcript = await stack.enter_async_context(transcribing(caller))
            # (It may start late, its imports slowed by the machine's load.)
            first = stack.enter_context(
                worker_process_killed_on_exit(
                    livekit_server,
                    server.url,
                    ns,
                    "--lease",
                    str(lease),
                    "--max-queue-age",
                    "600",
                )
            )
            # A worker process imports for 20 s and more on a loaded 2-core machine.
            original = await caller.wait_agent(within=90)
            await eventually(lambda: transcript.count(GREETING), "the greeting", within=20)
            await three_things_said(transcript, redis, keys.checkpoint("dental", message.job_id))
            # The restored entry is older than a caller would wait: it is
            # not a late start either.
            peer = await stack.enter_async_context(
                working(livekit_server, server.url, ns, "dental", lease=lease, max_queue_age=1.0)
            )

            first.send_signal(signal.SIGSTOP)
            paused_at = anyio.current_time()
            await anyio.to_thread.run_sync(restart, server)

            async def peer_holds_it() -> bool:
                return bool(await pending_on(redis, stream, peer.settings.worker_id))

            await eventually(peer_holds_it, "the peer reading the restored entry")
            await anyio.sleep(max(0.0, paused_at + 3.0 - anyio.current_time()))
            first.send_signal(signal.SIGCONT)

            await transcript.ask(RECALL, ANSWER, within=30)
            assert [a.sid for a in caller.agents()] == [original.sid]
            assert transcript.count(GREETING) == 1, transcript.lines
            assert peer.stats.started == 0
            assert peer.stats.dead_lettered == 0
            assert len(await job_entries(redis, stream, message.job_id)) == 1
            await delete_room(livekit_server, room.name)


async def test_a_peer_busy_through_a_redis_outage_does_not_take_a_live_call_by_its_idle_time(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """Redis is down for longer than a lease: every entry's idle time (kept in
    the pending list, Redis's clock) now says its holder stopped renewing. The
    peer's slots were all busy through the outage, so its intake never saw it;
    once a slot frees, its reclaim must still wait a lease for the live holder
    (paused a few seconds, as a slow reconnect) to renew, not take the call
    (seen in the raised chaos ledger: a second greeting, the conversation gone)."""
    ns, lease = unique("ns"), 12.0
    keys = Keys(ns)
    stream = keys.jobs("dental")
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(BUDGET):
        redis = connect_redis(server.url)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            store = StreamStore(redis, keys)
            await store.ensure_group("dental")
            room = await new_room(livekit_server, unique("dental-idle"))
            message = job_message(livekit_server, room, "dental", unique("dispatcher"))
            caller = await stack.enter_async_context(caller_in(creds(livekit_server), room.name))
            transcript = await stack.enter_async_context(transcribing(caller))
            first = stack.enter_context(
                worker_process_killed_on_exit(
                    livekit_server, server.url, ns, "--lease", str(lease), "--concurrency", "1"
                )
            )
            await store.enqueue([message])
            original = await caller.wait_agent(within=90)
            await eventually(lambda: transcript.count(GREETING), "the greeting", within=20)
            await three_things_said(transcript, redis, keys.checkpoint("dental", message.job_id))

            # The peer's one slot busy with a call of its own (the first is full).
            peer = await stack.enter_async_context(
                working(livekit_server, server.url, ns, "dental", lease=lease, concurrency=1)
            )
            other_room = await new_room(livekit_server, unique("dental-busy"))
            other = job_message(livekit_server, other_room, "dental", unique("dispatcher"))
            other_caller = await stack.enter_async_context(
                caller_in(creds(livekit_server), other_room.name)
            )
            await store.enqueue([other])
            await other_caller.wait_agent(within=30)
            assert peer.stats.started == 1

            first.send_signal(signal.SIGSTOP)
            await redis.save()
            server.stop()
            await anyio.sleep(lease + 1)  # the outage: every entry idle past a lease
            await anyio.to_thread.run_sync(server.start)
            # The peer's call ends: a slot frees while the holder is still away.
            await delete_room(livekit_server, other_room.name)
            await eventually(
                lambda: other.job_id not in peer.running_jobs, "the peer's call over", within=30
            )
            await anyio.sleep(2.0)  # the holder away a little longer (a slow reconnect)
            first.send_signal(signal.SIGCONT)

            # A reclaim sweep after the holder is back (the peer's lease wait over) leaves it.
            await reclaim_sweeps(redis, keys, "dental", 2)
            assert peer.stats.started == 1
            assert len(await job_entries(redis, stream, message.job_id)) == 1
            await transcript.ask(RECALL, ANSWER, within=30)
            assert [a.sid for a in caller.agents()] == [original.sid]
            assert transcript.count(GREETING) == 1, transcript.lines
            await delete_room(livekit_server, room.name)


@dataclass
class TalkingCall:
    """A call on its own Redis, served by a worker process, three things said."""

    server: RedisServer
    redis: Redis
    keys: Keys
    message: JobMessage
    caller: Caller
    transcript: Transcript
    original: AgentSighting
    first: subprocess.Popen[bytes]

    @property
    def checkpoint_key(self) -> str:
        return self.keys.checkpoint("dental", self.message.job_id)

    async def checkpoint_written_again(self) -> None:
        async def has_it() -> bool:
            data = await self.redis.get(self.checkpoint_key)
            return data is not None and THREE_THINGS[0].encode() in data

        await eventually(has_it, "the checkpoint written again", within=30)

    async def killed_and_taken_over(self, stack: AsyncExitStack, livekit: LiveKitServer) -> Worker:
        """A peer up, the first worker SIGKILLed: the peer resumes and knows the first thing."""
        ns = self.keys.namespace
        peer = await stack.enter_async_context(working(livekit, self.server.url, ns, "dental"))
        await wait_member(self.redis, self.keys, "dental", 2)
        self.first.kill()
        replacement = await self.caller.wait_agent(within=60, other_than=self.original.sid)
        await agent_listening(self.caller, replacement.identity)
        await self.transcript.ask(RECALL, ANSWER, within=30)
        assert self.transcript.count(GREETING) == 1, self.transcript.lines
        await delete_room(livekit, self.message.room)
        return peer


@asynccontextmanager
async def talking_call(
    livekit: LiveKitServer, tmp_path: Path, room: str, *, before_talk: bool = False
) -> AsyncIterator[TalkingCall]:
    """``before_talk``: ``SAVE`` a snapshot after the greeting, before a word is said."""
    keys = Keys(unique("ns"))
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(BUDGET):
        redis = connect_redis(server.url)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            lk_room = await new_room(livekit, unique(room))
            message = job_message(livekit, lk_room, "dental", unique("dispatcher"))
            caller = await stack.enter_async_context(caller_in(creds(livekit), lk_room.name))
            transcript = await stack.enter_async_context(transcribing(caller))
            first = stack.enter_context(
                worker_process_killed_on_exit(livekit, server.url, keys.namespace)
            )
            await StreamStore(redis, keys).enqueue([message])
            original = await caller.wait_agent(within=90)
            await eventually(lambda: transcript.count(GREETING), "the greeting", within=20)
            call = TalkingCall(server, redis, keys, message, caller, transcript, original, first)
            if before_talk:
                await redis.save()
            await three_things_said(transcript, redis, call.checkpoint_key)
            yield call


async def test_a_call_written_back_after_redis_lost_everything_writes_its_checkpoint_again(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """Redis restarts without persistence: the entry, the record and the
    checkpoint are gone. The worker writes the call back and goes on; the
    checkpoint must be written again at once, not at the next turn: a crash
    before that turn would leave the taker nothing (seen in the chaos ledger:
    killed 3 s after the wipe, the taker greeted again and knew nothing)."""
    async with (
        talking_call(livekit_server, tmp_path, "dental-wiped") as call,
        AsyncExitStack() as stack,
    ):
        call.server.stop()
        call.server.wipe()
        await anyio.to_thread.run_sync(call.server.start)
        await call.checkpoint_written_again()
        peer = await call.killed_and_taken_over(stack, livekit_server)
        assert peer.stats.started == 1


async def test_a_call_s_checkpoint_restored_stale_from_a_snapshot_is_written_again(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """Redis comes back from a snapshot taken before the conversation: the
    entry is still the worker's (nothing to write back) but the checkpoint is
    the greeting alone. The live session must write its state again after the
    outage; a crash before its next turn would resume the taker from the
    snapshot's. (A restart too quick for any step to fail is not seen: the
    client reconnects on its own. Said in docs/delivery.md.)"""
    async with (
        talking_call(livekit_server, tmp_path, "dental-stale", before_talk=True) as call,
        AsyncExitStack() as stack,
    ):
        call.server.stop()
        await anyio.sleep(2.0)  # down long enough for the worker's steps to see it
        await anyio.to_thread.run_sync(call.server.start)
        await call.checkpoint_written_again()
        await call.killed_and_taken_over(stack, livekit_server)


async def test_a_handed_over_entry_lost_before_a_peer_reads_it_is_handed_over_again(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """SIGTERM hands the call over; Redis restarts without persistence before the
    peer (paused) reads the entry. The draining worker sees the entry gone, writes
    the call back as its own and hands it over again once the peer is back."""
    ns, lease = unique("ns"), 2.0
    keys = Keys(ns)
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(BUDGET):
        redis = connect_redis(server.url)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(redis.aclose)
            store = StreamStore(redis, keys)
            room = await new_room(livekit_server, unique("dental-lostrelease"))
            message = job_message(livekit_server, room, "dental", unique("dispatcher"))
            caller = await stack.enter_async_context(caller_in(creds(livekit_server), room.name))
            transcript = await stack.enter_async_context(transcribing(caller))
            first = await stack.enter_async_context(
                working(livekit_server, server.url, ns, "dental", lease=lease, drain_timeout=90)
            )
            await store.enqueue([message])
            original = await caller.wait_agent(within=30)
            await eventually(lambda: transcript.count(GREETING), "the greeting", within=20)
            await three_things_said(transcript, redis, keys.checkpoint("dental", message.job_id))
            peer = stack.enter_context(
                worker_process_killed_on_exit(livekit_server, server.url, ns, "--lease", str(lease))
            )

            async def two_workers() -> bool:
                return len(await live_members(redis, keys.workers("dental"))) == 2

            await eventually(two_workers, "the peer's heartbeat", within=60)
            peer.send_signal(signal.SIGSTOP)
            mine = f"openrtc:{first.settings.worker_id}"

            async def no_read_in_flight() -> bool:
                # A read the peer sent before it was paused would be served
                # by Redis (into its socket's buffer) as soon as the entry
                # is released: that is a read, not the loss tested here.
                clients = await redis.client_list()
                return not any(
                    c["cmd"] == "xreadgroup" and "b" in c["flags"] and c["name"] != mine
                    for c in clients
                )

            await eventually(no_read_in_flight, "the paused peer's blocked read timed out")
            first.request_stop()
            await eventually(lambda: first.stats.handed_over == 1, "the handover", within=20)
            server.stop()
            server.wipe()
            await anyio.to_thread.run_sync(server.start)
            peer.send_signal(signal.SIGCONT)

            replacement = await caller.wait_agent(within=40, other_than=original.sid)
            assert replacement.identity == original.identity
            await eventually(lambda: not first.running_jobs, "the old session gone", within=20)
            # Joined is not started: a line typed before the session's text
            # input is attached is dropped ("no callback attached").
            await agent_listening(caller, replacement.identity)
            await transcript.ask(RECALL, ANSWER, within=30)
            assert transcript.count(GREETING) == 1, transcript.lines
            await delete_room(livekit_server, room.name)

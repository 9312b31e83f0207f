"""Calls end to end: real LiveKit, real Redis, dispatcher, workers, a caller in the room."""

from __future__ import annotations

import logging
import signal
import uuid

import anyio
import pytest
from livekit import rtc
from redis.asyncio import Redis

from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import AGENT_ATTRIBUTE
from tests.support.processes import worker_process
from tests.support.stack import (
    creds,
    delete_room,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)
from tests.support.waits import reclaim_sweeps, wait_member

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_calls_reach_the_right_agent_and_end_cleanly(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    isolation: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="openrtc")
    ns = unique("ns")
    keys = Keys(ns)
    dental_room = unique("lobby")
    restaurant_room = f"restaurant-room-42-{uuid.uuid4().hex[:6]}"
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as dispatcher,
        working(livekit_server, redis_server.url, ns, "dental", isolation=isolation) as dental,
        working(livekit_server, redis_server.url, ns, "restaurant") as restaurant,
    ):
        await new_room(livekit_server, dental_room, '{"agent": "dental"}')
        async with caller_in(creds(livekit_server), dental_room) as caller:
            agent = await caller.wait_agent(within=20)
            assert agent.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            assert agent.attributes.get(AGENT_ATTRIBUTE) == "dental"
            assert agent.identity.startswith("agent-AJ_")
            with anyio.fail_after(20):
                await caller.heard.wait()  # the greeting, as audio the caller receives
            assert [m.room for m in dental.running] == [dental_room]

            await new_room(livekit_server, restaurant_room)
            async with caller_in(creds(livekit_server), restaurant_room, "caller-2") as caller2:
                other = await caller2.wait_agent(within=20)
                assert other.attributes.get(AGENT_ATTRIBUTE) == "restaurant"

            job_id = agent.identity.removeprefix("agent-")
            await delete_room(livekit_server, dental_room)

            with anyio.fail_after(20):
                # "running" is relayed too: wait for the success itself.
                while dental.stats.succeeded < 1 or f"job {job_id} success" not in caplog.text:
                    await anyio.sleep(0.05)
        assert caller.max_agents_at_once == 1
        assert dispatcher.stats.statuses_relayed >= 3  # running x2, success
        assert dental.stats.started == 1
        assert restaurant.stats.started == 1
        # Acknowledged and deleted: nothing pending, nothing left in the stream.
        assert await redis.xlen(keys.jobs("dental")) == 0
        record = await redis.hgetall(keys.job("dental", job_id))
        assert record[b"state"] == b"done"


async def test_a_killed_worker_s_call_comes_back_with_its_identity_and_stays(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """SIGKILL: a peer takes the call over (crash detection, else the lease) and keeps it.

    How fast is bench/recovery.py's figure (kill -9 -> agent back); here the
    replacement must come within the wait's generous bound, then stay: the
    reclaim sweeps that follow never move a call whose worker lives.
    """
    ns = unique("ns")
    keys = Keys(ns)
    lease = 2.0
    room = unique("dental-call")
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        first = worker_process(
            livekit_server, redis_server.url, ns, "dental", "--lease", str(lease)
        )
        try:
            await wait_member(redis, keys, "dental")
            await new_room(livekit_server, room)
            async with caller_in(creds(livekit_server), room) as caller:
                original = await caller.wait_agent(within=20)
                async with working(
                    livekit_server, redis_server.url, ns, "dental", lease=lease
                ) as second:
                    await wait_member(redis, keys, "dental", 2)
                    first.send_signal(signal.SIGKILL)
                    first.wait(5)
                    replacement = await caller.wait_agent(within=30, other_than=original.sid)
                    assert replacement.identity == original.identity
                    assert replacement.attributes.get(AGENT_ATTRIBUTE) == "dental"
                    assert second.stats.reclaimed == 1
                    [row] = await redis.xpending_range(
                        keys.jobs("dental"), WORKERS_GROUP, "-", "+", 10
                    )
                    await reclaim_sweeps(redis, keys, "dental", 2)
                    # The replacement stays; it is never taken over while it lives.
                    assert [a.sid for a in caller.agents()] == [replacement.sid]
                    assert second.stats.taken_over == 0
                    assert len(second.running) == 1
                    [after] = await redis.xpending_range(
                        keys.jobs("dental"), WORKERS_GROUP, "-", "+", 10
                    )
                    assert after["consumer"].decode() == second.settings.worker_id
                    assert after["times_delivered"] == row["times_delivered"] == 2
        finally:
            if first.poll() is None:
                first.kill()


async def test_a_drain_without_handover_lets_the_call_finish_and_leaves_queued_jobs_to_others(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """``--no-handover``: the call stays on the draining worker to its end; it reads no new job.

    The draining worker has a free slot, so "took nothing" is its drain, not
    a full worker. (A drain with handover whose peers are full: test_drain.py.)
    """
    ns = unique("ns")
    keys = Keys(ns)
    stream = keys.jobs("dental")
    busy_room, queued_room = unique("dental-busy"), unique("dental-queued")
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        draining = worker_process(
            livekit_server, redis_server.url, ns, "dental", "--concurrency", "2", "--no-handover"
        )
        try:
            [member] = await wait_member(redis, keys, "dental")
            await new_room(livekit_server, busy_room)
            async with caller_in(creds(livekit_server), busy_room) as busy_caller:
                busy_agent = await busy_caller.wait_agent(within=20)
                draining.send_signal(signal.SIGTERM)

                async def draining_beat() -> bool:
                    record = await redis.hgetall(keys.worker(member.decode()))
                    return record.get(b"draining") == b"1" and record.get(b"capacity") == b"0"

                await eventually(draining_beat, "the worker's beat as draining")
                await new_room(livekit_server, queued_room)
                async with caller_in(
                    creds(livekit_server), queued_room, "caller-2"
                ) as queued_caller:

                    async def queued() -> str:
                        entries = await redis.xrange(stream)
                        pending = await redis.xpending_range(stream, WORKERS_GROUP, "-", "+", 10)
                        held = {p["message_id"] for p in pending}
                        return next((e.decode() for e, _ in entries if e not in held), "")

                    entry_id = await eventually(queued, "the queued job's entry", within=20)
                    async with working(livekit_server, redis_server.url, ns, "dental") as other:
                        await queued_caller.wait_agent(within=20)
                        assert other.stats.started == 1
                        # Read first by the new worker: the draining one took nothing.
                        [row] = await redis.xpending_range(
                            stream, WORKERS_GROUP, entry_id, entry_id, 1
                        )
                        assert row["consumer"].decode() == other.settings.worker_id
                        assert row["times_delivered"] == 1
                        assert queued_caller.agents()[0].sid == queued_caller.sightings[0].sid
                        # The draining worker's call is still on, with the same agent.
                        assert [a.sid for a in busy_caller.agents()] == [busy_agent.sid]
                        assert draining.poll() is None
                        await delete_room(livekit_server, busy_room)
                        out, _ = await anyio.to_thread.run_sync(
                            lambda: draining.communicate(timeout=30)
                        )
                        assert draining.returncode == 0, out
                        assert "ended: room disconnected (ROOM_DELETED)" in out
                        assert livekit_server.api_secret not in out
        finally:
            if draining.poll() is None:
                draining.kill()

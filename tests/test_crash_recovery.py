"""Crash recovery without waiting for a lease, against real LiveKit and Redis.

A killed worker's calls come back without waiting for the lease (its liveness
subscription closes with its process); a live worker whose Redis connections
are killed keeps its calls; a session process that dies is started again by
its own worker. How fast is bench/recovery.py's to measure (its goals: 2 s
and 1 s p99); the figures here are printed (``-s``), and the bounds are
liveness bounds that only the path under test can meet.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import AsyncExitStack

import psutil
import pytest
from redis.asyncio import Redis

from openrtc.devtools.caller import AgentSighting, Caller, caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisCluster, RedisServer
from openrtc.session.runners import ProcessRunner
from openrtc.store.streams import connect_redis
from openrtc.wire.keys import Keys
from tests.support.processes import worker_process
from tests.support.stack import (
    creds,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)
from tests.support.waits import wait_member

pytestmark = pytest.mark.anyio


async def redis_ms(redis: Redis) -> int:
    """Redis's clock, ms (what the crash-check scripts stamp)."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


#: The killed worker's lease: far above what crash detection needs, so that
#: calls back within half of it came back by crash detection.
KILLED_WORKER_LEASE = 30.0


async def _calls(
    stack: AsyncExitStack, livekit: LiveKitServer, count: int
) -> list[tuple[Caller, AgentSighting]]:
    rooms = [unique("crash-call") for _ in range(count)]
    for room in rooms:
        await new_room(livekit, room)
    callers = [
        await stack.enter_async_context(caller_in(creds(livekit), room, f"caller-{i}"))
        for i, room in enumerate(rooms)
    ]
    return [(c, await c.wait_agent(within=30)) for c in callers]


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_a_killed_worker_s_calls_come_back_by_crash_detection_not_the_lease(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis_cluster: RedisCluster,
    topology: str,
) -> None:
    ns = unique("ns")
    if topology == "cluster":
        # The liveness subscription lives on the master of the agent's slot,
        # where the peers' crash check (a script in that slot) counts it.
        url, keys = redis_cluster.url, Keys(ns, cluster=True)
    else:
        url, keys = redis_server.url, Keys(ns)
    calls = 6
    lease = str(KILLED_WORKER_LEASE)
    async with (
        dispatching(dispatcher_settings(livekit_server, url, ns)),
        AsyncExitStack() as stack,
    ):
        redis = connect_redis(url)
        stack.push_async_callback(redis.aclose)
        first = worker_process(livekit_server, url, ns, "dental", "--lease", lease)
        try:
            await wait_member(redis, keys, "dental")
            held = await _calls(stack, livekit_server, calls)
            async with working(livekit_server, url, ns, "dental", lease=float(lease)) as second:
                await wait_member(redis, keys, "dental", 2)
                # The peer's crash checks run (they record its free slots).
                peer_free = f"@free:{second.settings.worker_id}"
                await eventually(
                    lambda: redis.hexists(keys.alive("dental"), peer_free), "the peer's crash check"
                )
                first.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                first.wait(5)
                backs: list[float] = []
                for caller, original in held:
                    back = await caller.wait_agent(within=30, other_than=original.sid)
                    assert back.identity == original.identity
                    backs.append(back.at - killed_at)
                print(
                    f"\n{topology}: kill -9 -> agent back, {calls} calls: "
                    f"{sorted(round(b, 2) for b in backs)}"
                )
                assert max(backs) < KILLED_WORKER_LEASE / 2, backs
                assert second.stats.reclaimed == calls
                await eventually(
                    lambda: all(len(c.agents()) == 1 for c, _ in held), "one agent per room"
                )
                for caller, _ in held:
                    assert caller.max_agents_at_once <= 2  # the lingering one, replaced
        finally:
            if first.poll() is None:
                first.kill()


async def test_a_live_worker_whose_connections_are_killed_keeps_its_calls(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)),
        working(livekit_server, redis_server.url, ns, "dental") as first,
        AsyncExitStack() as stack,
    ):
        held = await _calls(stack, livekit_server, 2)
        async with working(livekit_server, redis_server.url, ns, "dental") as second:
            await wait_member(redis, keys, "dental", 2)
            name = f"openrtc:{first.settings.worker_id}"
            subscribed = 0
            killed: set[str] = set()

            async def liveness_back() -> bool:
                return any(
                    c["name"] == name and int(c.get("ssub", 0)) and c["id"] not in killed
                    for c in await redis.client_list()
                )

            for _ in range(4):
                # Every connection of the first worker, its liveness one too:
                # as a network blip or a proxy's idle timeout would.
                for client in await redis.client_list():
                    if client["name"] == name:
                        subscribed += int(client.get("ssub", 0))
                        killed.add(client["id"])
                        await redis.client_kill_filter(_id=client["id"])
                await eventually(liveness_back, "the liveness subscription back")
            assert subscribed == 4  # its liveness subscription, back each time
            # A peer's crash check (a full scan) after the subscription was
            # back: every check that could have found the worker gone for its
            # grace has run by then, and cleared it.
            back_at = await redis_ms(redis)
            alive = keys.alive("dental")

            async def scanned_after() -> bool:
                scan = await redis.hget(alive, "@scan")
                cleared = await redis.hget(alive, first.settings.worker_id)
                return scan is not None and int(scan) > back_at and cleared == b"0"

            await eventually(scanned_after, "a crash-check scan after the subscription was back")
            assert second.stats.reclaimed == 0
            assert first.stats.taken_over == 0
            for caller, original in held:
                assert [a.sid for a in caller.agents()] == [original.sid]
            assert len(first.running) == 2


async def test_a_killed_session_process_is_started_again_by_its_own_worker(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)),
        working(livekit_server, redis_server.url, ns, "dental", isolation="process") as worker,
        AsyncExitStack() as stack,
    ):
        [(caller, original)] = await _calls(stack, livekit_server, 1)
        runner = worker.runner
        assert isinstance(runner, ProcessRunner)

        def session_children() -> list[psutil.Process]:
            idle = {c.pid for c in runner._idle}
            zygotes = psutil.Process(os.getpid()).children()
            return [p for z in zygotes for p in z.children() if p.pid not in idle]

        await eventually(lambda: len(session_children()) == 1, within=10)
        [child] = session_children()
        child.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        back = await caller.wait_agent(within=30, other_than=original.sid)
        took = back.at - killed_at
        print(f"\nsession process kill -9 -> agent back: {took:.2f} s")
        assert back.identity == original.identity
        # Not after the lease (by its own reclaim pass): its worker started it again.
        assert took < worker.settings.lease, took
        assert len(worker.running) == 1

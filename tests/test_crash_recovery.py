"""Crash recovery without waiting for a lease, against real LiveKit and Redis.

A killed worker's calls come back in about a second (its liveness
subscription closes with its process); a live worker whose Redis connections
are killed keeps its calls; a session process that dies is started again by
its own worker at once. The figures are printed (``-s``) for the report.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import AsyncExitStack

import anyio
import psutil
import pytest
from redis.asyncio import Redis

from openrtc.devtools.caller import AgentSighting, Caller, caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisCluster, RedisServer
from openrtc.session.runners import ProcessRunner
from openrtc.store.streams import connect_redis
from openrtc.wire.keys import Keys
from tests.stack import (
    creds,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)
from tests.test_e2e import wait_member, worker_process

pytestmark = pytest.mark.anyio

#: The goal is 2 s (issue 9); the assertion leaves room for a loaded 2-core
#: machine, and is still well under the 5 s lease the old path needed.
KILLED_WORKER_BOUND = 3.5
#: The goal is 1 s; same margin.
KILLED_CHILD_BOUND = 2.5


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
async def test_a_killed_worker_s_calls_come_back_within_two_seconds(
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
    # A lease far above the bound: only crash detection can bring the calls back in time.
    lease = "30"
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
                await anyio.sleep(0.5)  # the peer's first crash check has run
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
                assert max(backs) < KILLED_WORKER_BOUND, backs
                assert second.stats.reclaimed == calls
                await anyio.sleep(1.0)
                for caller, _ in held:
                    assert len(caller.agents()) == 1
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
            for _ in range(4):
                # Every connection of the first worker, its liveness one too:
                # as a network blip or a proxy's idle timeout would.
                for client in await redis.client_list():
                    if client["name"] == name:
                        subscribed += int(client.get("ssub", 0))
                        await redis.client_kill_filter(_id=client["id"])
                await anyio.sleep(0.4)
            assert subscribed == 4  # its liveness subscription, back each time
            await anyio.sleep(2.0)  # grace and several crash checks later
            assert second.stats.reclaimed == 0
            assert first.stats.taken_over == 0
            for caller, original in held:
                assert [a.sid for a in caller.agents()] == [original.sid]
            assert len(first.running) == 2


async def test_a_killed_session_process_comes_back_within_a_second(
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
        assert took < KILLED_CHILD_BOUND, took
        assert len(worker.running) == 1

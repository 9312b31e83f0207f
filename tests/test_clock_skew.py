"""Liveness judged by Redis's clock: workers whose host clock is wrong (libfaketime).

Each skewed worker is a real ``openrtc worker`` process started under
``faketime`` (its ``time.time()`` is off by a fixed offset, its clock running
at the normal rate), against the real Redis and LiveKit servers.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis.asyncio import Redis

from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops.monitor import read_status
from openrtc.store.membership import read_agent_loads
from openrtc.wire.keys import Keys
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

#: libfaketime itself, preloaded into the worker (not the ``faketime`` wrapper,
#: which forks: a SIGKILL would kill the wrapper and leave the worker running).
LIBFAKETIME = next(
    (p for p in glob.glob("/usr/lib/*/faketime/libfaketime.so.1") if os.path.exists(p)), None
)


def faketime_env(offset: str) -> dict[str, str]:
    """Environment for a process whose clock is ``offset`` (faketime syntax: "-8s")."""
    assert LIBFAKETIME, "libfaketime is required: apt-get install faketime"
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "FAKETIME_DONT_RESET": "1"}


@contextmanager
def skewed_worker(
    livekit: LiveKitServer, redis_url: str, ns: str, offset: str
) -> Iterator[subprocess.Popen[str]]:
    """A worker process for ``dental`` whose clock is ``offset`` (faketime syntax: -8s)."""
    env = service_env(livekit, redis_url, ns, **faketime_env(offset))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openrtc",
            "worker",
            "--agent",
            "dental",
            "--agents-dir",
            str(OFFLINE_AGENTS),
            "--http-port",
            "0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(10)


@contextmanager
def skewed_dispatcher(
    livekit: LiveKitServer, redis_url: str, ns: str, offset: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A dispatcher process (fast reconciler) whose clock is ``offset``."""
    env = service_env(livekit, redis_url, ns, **faketime_env(offset))
    command = [sys.executable, "-m", "openrtc", "dispatcher"]
    command += ["--agents-dir", str(OFFLINE_AGENTS), "--http-port", "0"]
    command += ["--reconcile-interval", "0.3", "--reconcile-grace", "1"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


async def worker_ids(redis: Redis, ns: str) -> set[str]:
    """The ids of every worker record (whatever the registry says of them)."""
    prefix = f"{ns}:worker:"
    return {k.decode().removeprefix(prefix) async for k in redis.scan_iter(f"{prefix}*")}


async def status_workers(redis: Redis, keys: Keys) -> dict[str, float]:
    """``openrtc status``'s dental workers: id -> heartbeat age."""
    status = await read_status(redis, keys, ["dental"])
    return {w.id: w.heartbeat_age for w in status.agents[0].workers}


def test_faketime_offsets_the_clock() -> None:
    """The harness itself: a process under faketime -60s sees a clock a minute behind."""
    code = "import time; print(time.time())"
    skewed = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, **faketime_env("-60s")),
        capture_output=True,
        text=True,
        check=True,
    )
    real = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 50 < float(real.stdout) - float(skewed.stdout) < 70


async def test_a_worker_8s_behind_is_seen_by_status_dispatcher_and_peers(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("dental-behind")
    with skewed_worker(livekit_server, redis_server.url, ns, "-8s"):
        ids = await eventually(lambda: worker_ids(redis, ns), "the worker's record", within=30)
        (behind,) = ids

        # openrtc status: the worker, with a heartbeat age by Redis's clock.
        async def listed() -> bool:
            return behind in await status_workers(redis, keys)

        await eventually(listed, "the worker 8 s behind in openrtc status")
        ages = await status_workers(redis, keys)
        assert 0 <= ages[behind] < 5

        # The dispatcher's view (what --when-no-worker reject decides on).
        loads = await read_agent_loads(redis, keys, ["dental"])
        assert loads["dental"].workers == 1

        # A dispatcher that rejects calls while no worker lives sends this one
        # to the worker 8 s behind.
        settings = dispatcher_settings(
            livekit_server, redis_server.url, ns, when_no_worker="reject"
        )
        async with dispatching(settings) as dispatcher:
            await new_room(livekit_server, room)
            async with caller_in(creds(livekit_server), room) as caller:
                agent = await caller.wait_agent(within=30)
                assert agent.identity.startswith("agent-")
            assert dispatcher.stats.enqueued == 1
        await delete_room(livekit_server, room)

        # A peer counts it (spread and handover choose among these).
        runner = HoldingRunner()
        async with working(livekit_server, redis_server.url, ns, "dental", runner=runner) as peer:
            await eventually(lambda: behind in peer._peers, "the peer's view of it", within=15)


async def test_a_killed_worker_whose_clock_is_ahead_is_gone_within_the_ttl(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    with skewed_worker(livekit_server, redis_server.url, ns, "+60s") as process:
        (ahead,) = await eventually(lambda: worker_ids(redis, ns), "the worker's record", within=30)

        async def listed() -> bool:
            return ahead in await status_workers(redis, keys)

        await eventually(listed, "the worker 60 s ahead in openrtc status")
        ages = await status_workers(redis, keys)
        assert 0 <= ages[ahead] < 5  # not "-60 s ago"
        process.send_signal(signal.SIGKILL)
        process.wait(10)

        # Gone within its membership TTL (5 s) by Redis's clock, not 60 s later.
        async def gone() -> bool:
            loads = await read_agent_loads(redis, keys, ["dental"])
            return ahead not in await status_workers(redis, keys) and loads["dental"].workers == 0

        await eventually(
            gone, "the killed worker out of status and the dispatcher's view", within=20
        )


async def test_a_reconciler_whose_clock_is_2_minutes_behind_still_serves_an_orphaned_room(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    room = unique("dental-orphan-skew")
    async with working(livekit_server, redis_server.url, ns, "dental"):
        # Created while no dispatcher runs: LiveKit drops its job for good.
        await new_room(livekit_server, room)
        async with caller_in(creds(livekit_server), room) as caller:
            with skewed_dispatcher(livekit_server, redis_server.url, ns, "-120s"):
                # The caller joined 1 s+ ago by the servers' clocks: "two
                # minutes from now" by the dispatcher's host, which must not
                # wait for that. (Generous: the process starts on a busy host.)
                agent = await caller.wait_agent(within=60)
                assert agent.identity.startswith("agent-")
        await delete_room(livekit_server, room)

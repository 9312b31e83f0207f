"""Benchmark crash recovery: kill -9 of a worker -> its calls' agents back in their rooms.

Run from the repository root::

    .venv/bin/python bench/recovery.py                 # 20 calls across three workers
    .venv/bin/python bench/recovery.py --check         # exit 1 if a goal is missed
    .venv/bin/python bench/recovery.py --calls 30

On a throwaway ``redis-server`` and ``livekit-server``: one dispatcher and
three worker processes (default settings: 5 s lease), ``--calls`` callers,
each in a room of its own, with the offline agents. Once every caller has its
agent, the worker holding the most calls is killed with SIGKILL, and each of
its calls is timed from the kill to the moment its caller sees the agent back
(a new participant with the same identity). Twice, in the same run:

1. **lease only**: workers started with ``--no-crash-detection``, the
   recovery of before (a peer reclaims once the lease lapsed);
2. **crash detection** (the default): peers see the killed worker's liveness
   subscription gone and take its calls over after a 0.5 s grace.

It prints p50/p99/max of both; goal (issue 9): p99 <= 2 s with crash
detection. The handover of a deploy (SIGTERM, issue 9 item 4) is not built
yet: its row prints ``n/a``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import percentile, record_figure
from livekit import api
from redis.asyncio import Redis

from openrtc.caller import AgentSighting, Caller, caller_in
from openrtc.devstack import LiveKitServer, RedisServer
from openrtc.keys import WORKERS_GROUP, Keys
from openrtc.settings import LiveKitSettings

ROOT = Path(__file__).resolve().parents[1]
AGENTS_DIR = ROOT / "examples" / "offline_agents"
AGENT = "dental"
WORKERS = 3
GOAL_P99 = 2.0


def _env(livekit: LiveKitServer, redis_url: str, ns: str) -> dict[str, str]:
    return dict(
        os.environ,
        LIVEKIT_URL=livekit.url,
        LIVEKIT_API_KEY=livekit.api_key,
        LIVEKIT_API_SECRET=livekit.api_secret,
        REDIS_URL=redis_url,
        OPENRTC_NAMESPACE=ns,
        OPENRTC_HTTP_PORT="0",
        PYTHONUNBUFFERED="1",
    )


def _spawn(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "openrtc", *args, "--agents-dir", str(AGENTS_DIR)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def _until(check, within: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise RuntimeError(f"timed out after {within:g}s waiting for {what}")


async def run_phase(
    livekit: LiveKitServer, redis_url: str, calls: int, *, crash_detection: bool, logs: Path
) -> tuple[list[float], float, list[float]]:
    """Kill -9 -> agent back (s) for each call of the killed worker, and kill -> all claimed."""
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    keys = Keys(ns)
    env = _env(livekit, redis_url, ns)
    label = "fast" if crash_detection else "lease"
    extra = () if crash_detection else ("--no-crash-detection",)
    procs = [_spawn(env, logs / f"{label}-dispatcher.log", "dispatcher")]
    procs += [
        _spawn(
            env,
            logs / f"{label}-worker-{i}.log",
            "worker",
            "--agent",
            AGENT,
            "--concurrency",
            str(calls),
            *extra,
        )
        for i in range(WORKERS)
    ]
    redis = Redis.from_url(redis_url)
    creds = LiveKitSettings(livekit.url, livekit.api_key, livekit.api_secret)
    lk = api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret)
    try:

        async def registered() -> bool:
            workers = await redis.zrange(keys.workers(AGENT), 0, -1)
            return len(workers) == WORKERS and bool(await redis.zrange(keys.dispatchers, 0, -1))

        await _until(registered, 90, "the dispatcher and three workers")
        async with AsyncExitStack() as stack:
            callers: list[Caller] = []
            for i in range(calls):
                room = f"recovery-{label}-{i}-{uuid.uuid4().hex[:4]}"
                await lk.room.create_room(api.CreateRoomRequest(name=room))
                callers.append(
                    await stack.enter_async_context(caller_in(creds, room, f"caller-{i}"))
                )
            agents: list[AgentSighting] = [await c.wait_agent(within=60) for c in callers]
            await asyncio.sleep(1.0)  # every worker's first crash check has run

            stream = keys.jobs(AGENT)
            summary = await redis.xpending(stream, WORKERS_GROUP)
            held = {c["name"].decode(): int(c["pending"]) for c in summary["consumers"]}
            victim = max(held, key=lambda name: held[name])
            rows = await redis.xpending_range(
                stream, WORKERS_GROUP, "-", "+", 10_000, consumername=victim
            )
            jobs = set()
            for row in rows:
                for _, fields in await redis.xrange(stream, row["message_id"], row["message_id"]):
                    jobs.add(fields[b"job_id"].decode())
            pid = int(await redis.hget(keys.worker(victim), "pid"))
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            killed_wall = time.time()

            mine = [(c, a) for c, a in zip(callers, agents, strict=True) if a.identity[6:] in jobs]

            async def back(caller: Caller, agent: AgentSighting) -> float:
                seen = await caller.wait_agent(within=60, other_than=agent.sid)
                return seen.at - killed_at

            async def claimed() -> float:
                # Every entry of the killed worker claimed by a peer: detection.
                while await redis.xpending_range(  # noqa: ASYNC110 (polling Redis)
                    stream, WORKERS_GROUP, "-", "+", 1, consumername=victim
                ):
                    await asyncio.sleep(0.02)
                return time.monotonic() - killed_at

            detected, *times = await asyncio.gather(claimed(), *(back(c, a) for c, a in mine))
            # LiveKit's own join time of each new agent: the caller's view
            # above also includes the delay of this (loaded) process's events.
            server: list[float] = []
            for caller, agent in mine:
                reply = await lk.room.list_participants(
                    api.ListParticipantsRequest(room=caller.room.name)
                )
                server += [
                    p.joined_at_ms / 1000 - killed_wall
                    for p in reply.participants
                    if p.identity == agent.identity and p.sid != agent.sid
                ]
            return list(times), detected, server
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        await lk.aclose()
        await redis.aclose()


def _row(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label:<28} n/a"
    p50, p99, top = (percentile(values, 50), percentile(values, 99), max(values))
    return f"  {label:<28} p50 {p50:5.2f} s   p99 {p99:5.2f} s   max {top:5.2f} s"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="calls across three workers")
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    parser.add_argument("--log-dir", type=Path, help="keep the services' logs here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="openrtc-recovery-") as tmp:
        logs = args.log_dir or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        with RedisServer() as redis_server, LiveKitServer() as livekit:
            lease, lease_claimed, lease_server = await run_phase(
                livekit, redis_server.url, args.calls, crash_detection=False, logs=logs
            )
            fast, fast_claimed, fast_server = await run_phase(
                livekit, redis_server.url, args.calls, crash_detection=True, logs=logs
            )
    print(
        f"kill -9 of the worker holding the most of {args.calls} calls "
        f"({len(lease)} and {len(fast)} calls killed), {WORKERS} workers, default settings; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs:"
    )
    print(_row("lease only (before)", lease) + f"   (all claimed after {lease_claimed:.2f} s)")
    print(_row("crash detection", fast) + f"   (all claimed after {fast_claimed:.2f} s)")
    print(_row("  as LiveKit saw it, lease", lease_server))
    print(_row("  as LiveKit saw it, crash", fast_server))
    print(f"  {'handover audio gap (SIGTERM)':<28} n/a (issue 9 item 4, not built yet)")
    p99 = percentile(fast, 99)
    met = p99 <= GOAL_P99
    print(f"goal: crash detection p99 <= {GOAL_P99:g} s: {'met' if met else 'MISSED'}")
    record_figure(
        "recovery",
        "kill -9 -> agent back, p99",
        ours=p99,
        anchor=percentile(lease, 99),
        anchor_label="lease only",
        unit="s",
        goal=f"<= {GOAL_P99:g} s",
        met=met,
        note=f"{len(fast)} calls of the killed worker; p50 {percentile(fast, 50):.2f} s",
    )
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Benchmark what ``openrtc top`` costs a worker: its snapshots and its loop accounting.

Run from the repository root::

    .venv/bin/python bench/top.py            # 50 sessions, 5 measured calls
    .venv/bin/python bench/top.py --check    # exit 1 if the goal is missed

The goal (issue 20): snapshots cost at most 1% of a worker core at 50 sessions;
checked here on all that ``top`` costs a worker, snapshots and the loop accounting
they read, with a 1.5x margin (<= 0.67%). It is two things,
measured apart on a throwaway ``redis-server`` and ``livekit-server``:

- **snapshots**: a worker holding 50 sessions builds and writes its snapshot
  (``TopPublisher.publish``: each session's state, its CPU, and in process
  isolation its process's CPU and memory read from ``/proc``, here of 50 real
  processes) ``--snapshots`` times; the process CPU per snapshot, at the
  default interval, is a share of a core.
- **loop accounting**: every event-loop callback of a session is timed. Its
  cost per callback is measured on a loop running a million callbacks with and
  without it (median of 5); the callbacks a real session runs per second are
  counted on ``--calls`` real calls to the offline dental agent (``openrtc
  dev``'s stack, coroutine isolation), each caller sending a 48 kHz tone in
  20 ms frames as a microphone does, with one typed turn. Cost per callback x
  callbacks per second x 50 sessions is its share of a core.

No anchor: openrtc 0.20.1's ``top`` reads one process's sessions over a local
socket and reports no cost; livekit-agents has no ``top``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import numpy as np
from _lib.figures import record_figure
from livekit import api, rtc
from livekit.protocol.agent import Job, JobType

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.dev import dev_stack
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.session.live import LiveState, attribute_to, install_loop_accounting
from openrtc.session.session import SessionControl
from openrtc.settings import DEFAULT_TOP_INTERVAL, LiveKitSettings, WorkerSettings
from openrtc.store.streams import Delivery
from openrtc.wire.messages import JobMessage, accept_arguments
from openrtc.worker.worker import Worker

ROOT: Final = Path(__file__).resolve().parents[1]
AGENTS: Final = ROOT / "examples" / "offline_agents"
#: Goal (share of one core at 50 sessions), checked with a 1.5x margin.
GOAL: Final = 0.01
MARGIN: Final = 1.5
SESSIONS: Final = 50
TONE_RATE: Final = 48_000
TONE_FRAME_MS: Final = 20


def _message(livekit_url: str, agent: str) -> JobMessage:
    job = Job(id=f"AJ_{uuid.uuid4().hex[:12]}", type=JobType.JT_ROOM)
    job.room.name = f"{agent}-{uuid.uuid4().hex[:8]}"
    job.room.sid = f"RM_{uuid.uuid4().hex[:12]}"
    now = time.time()
    return JobMessage(
        job=job,
        agent=agent,
        accept=accept_arguments(job.id, agent),
        livekit_url=livekit_url,
        step=3,
        source="room metadata",
        dispatcher_id="bench",
        received_at=now,
        routed_at=now,
        enqueued_at=now,
    )


async def snapshot_cost(redis_url: str, isolation: str, snapshots: int) -> float:
    """Process CPU seconds per snapshot of a worker holding :data:`SESSIONS` sessions."""
    livekit = LiveKitSettings(url="ws://127.0.0.1:7880", api_key="bench", api_secret="x" * 32)
    settings = WorkerSettings(
        livekit=livekit, agent="dental", redis_url=redis_url, namespace=f"bench-{uuid.uuid4().hex}"
    )
    worker = Worker(settings, AgentPool.from_directory(AGENTS))
    sleepers = []
    try:
        for i in range(SESSIONS):
            claim = worker.claims.hold(Delivery(f"{i + 1}-0", {}, 1))
            claim.message = _message(livekit.url, "dental")
            claim.control = control = SessionControl()
            control.live = LiveState(state="listening", started_at=time.time(), turns=3)
            if isolation == "process":
                sleeper = subprocess.Popen(["sleep", "600"])  # noqa: ASYNC220 (set-up)
                sleepers.append(sleeper)
                control.pid = sleeper.pid
        await worker.top.publish(ttl=10)  # first readings (no share yet), connection made
        started = time.process_time()
        for _ in range(snapshots):
            await worker.top.publish(ttl=10)
        return (time.process_time() - started) / snapshots
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        await worker.ctx.redis_client.aclose()


def callback_overhead(callbacks: int = 1_000_000) -> float:
    """Seconds the accounting adds to one callback (median of 5 paired runs)."""

    def run(accounted: bool) -> float:
        async def main() -> float:
            if accounted:
                attribute_to(LiveState())
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            left = [callbacks]

            def tick() -> None:
                left[0] -= 1
                if left[0]:
                    loop.call_soon(tick)
                else:
                    done.set_result(None)

            started = time.perf_counter()
            loop.call_soon(tick)
            await done
            return time.perf_counter() - started

        return asyncio.run(main())

    install_loop_accounting()
    deltas = [(run(True) - run(False)) / callbacks for _ in range(5)]
    return max(0.0, statistics.median(deltas))


def _tone() -> rtc.AudioFrame:
    samples = TONE_RATE * TONE_FRAME_MS // 1000
    t = np.arange(samples) / TONE_RATE
    pcm = (np.sin(2 * np.pi * 300 * t) * 3000).astype(np.int16)
    return rtc.AudioFrame(pcm.tobytes(), TONE_RATE, 1, samples)


async def callbacks_per_session_second(calls: int, seconds: float) -> tuple[float, float]:
    """Callbacks per second, and loop share, of one real session (mean over ``calls``)."""
    with tempfile.TemporaryDirectory(prefix="openrtc-top-") as tmp:
        async with (
            dev_stack(AGENTS, log_dir=Path(tmp), http=False) as stack,
            anyio.create_task_group() as tg,
        ):
            livekit = stack.livekit
            creds = LiveKitSettings(
                url=livekit.url, api_key=livekit.api_key, api_secret=livekit.api_secret
            )
            # Inside the task group: each caller's own tasks end before it does.
            async with AsyncExitStack() as callers:
                async with api.LiveKitAPI(creds.url, creds.api_key, creds.api_secret) as lk:
                    for i in range(calls):
                        room = f"dental-top-{i}-{uuid.uuid4().hex[:6]}"
                        await lk.room.create_room(api.CreateRoomRequest(name=room))
                        caller = await callers.enter_async_context(caller_in(creds, room))
                        source = rtc.AudioSource(TONE_RATE, 1)
                        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
                        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
                        await caller.room.local_participant.publish_track(track, options)
                        tg.start_soon(_feed, source)
                        await caller.wait_agent(within=60)
                        await caller.room.local_participant.send_text("hello", topic="lk.chat")
                (worker,) = [w for w in stack.workers if w.settings.agent == "dental"]
                await anyio.sleep(3.0)  # past the greetings and the typed turn
                lives = [c.control.live for c in worker.claims if c.control is not None]
                before = [(live.callbacks, live.loop_s) for live in lives]
                started = time.monotonic()
                await anyio.sleep(seconds)
                elapsed = time.monotonic() - started
                pairs = list(zip(lives, before, strict=True))
                rates = [(live.callbacks - b[0]) / elapsed for live, b in pairs]
                shares = [(live.loop_s - b[1]) / elapsed for live, b in pairs]
            tg.cancel_scope.cancel()
    return statistics.mean(rates), statistics.mean(shares)


async def _feed(source: rtc.AudioSource) -> None:
    """A microphone's audio: a tone, in real time (``capture_frame`` paces it)."""
    frame = _tone()
    while True:
        await source.capture_frame(frame)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshots", type=int, default=200)
    parser.add_argument("--calls", type=int, default=5, help="real calls counted")
    parser.add_argument("--seconds", type=float, default=10.0, help="counted for this long")
    parser.add_argument("--check", action="store_true", help="exit 1 if the goal is missed")
    args = parser.parse_args(argv)
    with RedisServer() as redis_server, LiveKitServer():
        cost = {
            isolation: await snapshot_cost(redis_server.url, isolation, args.snapshots)
            for isolation in ("coroutine", "process")
        }
    # Its own event loops, in a thread of its own.
    per_callback = await anyio.to_thread.run_sync(callback_overhead)
    rate, share = await callbacks_per_session_second(args.calls, args.seconds)
    accounting = per_callback * rate * SESSIONS
    print(
        f"openrtc top's cost to a worker at {SESSIONS} sessions; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs:"
    )
    for isolation, seconds in cost.items():
        print(
            f"  snapshot ({isolation}): {seconds * 1e6:.0f} us of CPU each; every "
            f"{DEFAULT_TOP_INTERVAL:g} s: {seconds / DEFAULT_TOP_INTERVAL:.3%} of a core"
        )
    print(
        f"  loop accounting: {per_callback * 1e9:.0f} ns per callback; a real session "
        f"(caller audio) runs {rate:.0f} callbacks/s ({share:.1%} of the loop): "
        f"{accounting:.3%} of a core"
    )
    worst = max(cost.values()) / DEFAULT_TOP_INTERVAL + accounting
    met = worst <= GOAL / MARGIN
    print(
        f"  total, the costlier mode: {worst:.3%} of a core "
        f"(goal <= {GOAL:.0%}, checked at <= {GOAL / MARGIN:.2%})"
    )
    record_figure(
        "top",
        f"top's cost to a worker at {SESSIONS} sessions (share of a core)",
        ours=round(worst * 100, 3),
        anchor=GOAL * 100,
        anchor_label=f"goal {GOAL:.0%}",
        unit="%",
        goal=f"<= {GOAL * 100 / MARGIN:.2f}% ({MARGIN:g}x margin on {GOAL:.0%})",
        met=met,
    )
    if not met:
        print(f"MISSED: {worst:.3%} of a core")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))

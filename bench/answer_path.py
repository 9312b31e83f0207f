"""Micro-benchmark of the dispatcher's per-job path: availability answer, assignment, entry.

What tracing and the log context cost per job, without servers: the
dispatcher's ``_answer`` and ``_on_assignment`` (up to the enqueuer's queue)
on a job, and a job entry's encode and decode. Run it on two trees to
compare (``PYTHONPATH`` picks the tree)::

    PYTHONPATH=. .venv/bin/python bench/answer_path.py            # tracing off
    PYTHONPATH=. .venv/bin/python bench/answer_path.py --tracing  # on, spans dropped

``--tracing`` records every span into a processor that drops it, so the
figure is the instrumentation's own cost, not an exporter's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from livekit.protocol import agent as proto

from openrtc.agents.registry import AgentPool
from openrtc.dispatcher.dispatcher import Dispatcher
from openrtc.settings import DispatcherSettings, LiveKitSettings
from openrtc.wire.messages import JobMessage

ROOT = Path(__file__).resolve().parents[1]


class _Socket:
    worker_id = "bench"


def _tracing_on() -> None:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from openrtc.ops import tracing  # type: ignore[attr-defined,unused-ignore]

    class Drop(SpanProcessor):
        pass

    provider = TracerProvider()
    provider.add_span_processor(Drop())
    tracing.configure(provider)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tracing", action="store_true")
    args = parser.parse_args()
    if args.tracing:
        _tracing_on()
    settings = DispatcherSettings(
        livekit=LiveKitSettings("ws://127.0.0.1:7880", "key", "secret-secret-secret-secret-32"),
        redis_url="redis://127.0.0.1:1",
        max_backlog=10**9,
    )
    dispatcher = Dispatcher(
        settings, AgentPool.from_directory(ROOT / "examples" / "offline_agents")
    )
    dispatcher.view.redis_ok = True
    submitted: list[Any] = []
    dispatcher._enqueuer.submit = submitted.append  # type: ignore[method-assign]
    socket: Any = _Socket()

    def jobs(n: int, round_: int) -> list[proto.Job]:
        out = []
        for i in range(n):
            job = proto.Job(id=f"AJ_{round_}_{i}", type=proto.JobType.JT_ROOM)
            job.room.name = f"dental-call-{i}"
            job.room.sid = f"RM_{i}"
            out.append(job)
        return out

    answer_us, assign_us, codec_us = [], [], []
    for round_ in range(args.rounds):
        batch = jobs(args.jobs, round_)
        requests = [proto.AvailabilityRequest(job=j) for j in batch]
        assignments = [proto.JobAssignment(job=j) for j in batch]
        start = time.process_time()
        for request in requests:
            dispatcher._answer(request)
        answer_us.append((time.process_time() - start) / args.jobs * 1e6)
        start = time.process_time()
        for assignment in assignments:
            dispatcher._on_assignment(socket, assignment)
        assign_us.append((time.process_time() - start) / args.jobs * 1e6)
        messages = [p.message for p in submitted]
        submitted.clear()
        start = time.process_time()
        for message in messages:
            JobMessage.decode(message.encode())
        codec_us.append((time.process_time() - start) / args.jobs * 1e6)
    # The first round warms caches up; the best of the rest (CPU time: the machine may be busy).
    for name, values in (
        ("answer", answer_us),
        ("assignment", assign_us),
        ("entry encode+decode", codec_us),
    ):
        print(f"{name:>20}: {min(values[1:]):6.2f} us/job")


if __name__ == "__main__":
    main()

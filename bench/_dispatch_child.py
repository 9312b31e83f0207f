"""The dispatcher process of ``bench/dispatch.py``: ``openrtc dispatcher``, plus a record.

It builds the dispatcher exactly as ``openrtc dispatcher`` does (same settings
from the same variables, same agents directory, logging at WARNING with the
CLI's format) and serves until SIGTERM/SIGINT, which drain it as the CLI does.
Two things are added for the benchmark, neither on the dispatcher's code:

* the instance's ``store.enqueue`` is wrapped to note, per job, the wall-clock
  time the pipeline's replies came back (Redis acknowledged the batch), next to
  the job's ``received_at``. That is one ``time.time()`` per batch and one list
  append per job, in the dispatcher's own enqueue loop, right where the
  dispatcher learns the outcome; nothing in ``openrtc`` exposes this instant.
* every garbage collection is noted (when it ended, its generation, how long
  it took) through ``gc.callbacks``;
* at exit, ``dispatcher.stats`` and those records are written as JSON to
  ``--record``; with ``--profile``, cProfile runs the whole process and its
  stats are dumped there.

Run only by ``bench/dispatch.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from openrtc.agents.registry import AgentPool
from openrtc.dispatcher.dispatcher import Dispatcher
from openrtc.settings import DispatcherSettings, LiveKitSettings
from openrtc.store.streams import EnqueueResult
from openrtc.supervision import freeze_imports
from openrtc.wire.messages import JobMessage
from openrtc.wire.signing import keys_from


def build(agents_dir: Path, max_backlog: int) -> Dispatcher:
    """The dispatcher ``openrtc dispatcher --agents-dir ... --max-backlog ...`` would run."""
    settings = DispatcherSettings(
        livekit=LiveKitSettings(
            os.environ["LIVEKIT_URL"],
            os.environ["LIVEKIT_API_KEY"],
            os.environ["LIVEKIT_API_SECRET"],
        ),
        redis_url=os.environ["REDIS_URL"],
        namespace=os.environ["OPENRTC_NAMESPACE"],
        max_backlog=max_backlog,
        wait_replicas=int(os.environ.get("OPENRTC_WAIT_REPLICAS") or 0),
        # The stand-in speaks LiveKit's /agent protocol only, not its room API:
        # the reconciler (which lists rooms) has nothing to call here.
        reconcile_interval=0,
        # Signed as the CLI's dispatcher signs: OPENRTC_SIGNING_KEY (unsigned without).
        signing=keys_from(os.environ),
    )
    return Dispatcher(settings, AgentPool.from_directory(agents_dir))


def record_acks(dispatcher: Dispatcher, acks: list[tuple[str, float, float, str]]) -> None:
    """Note (job id, received_at, acked_at, outcome) for every job the enqueue loop writes."""
    enqueue = dispatcher.store.enqueue

    async def timed(messages: Sequence[JobMessage]) -> list[EnqueueResult]:
        results = await enqueue(messages)
        acked = time.time()
        for message, result in zip(messages, results, strict=True):
            acks.append((message.job.id, message.received_at, acked, result.outcome))
        return results

    dispatcher.store.enqueue = timed  # type: ignore[method-assign]


def record_gc(collections: list[tuple[float, int, float]]) -> None:
    """Note (ended at, generation, seconds) for every garbage collection."""
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.append((time.time(), info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(callback)


async def serve(dispatcher: Dispatcher) -> None:
    """``openrtc.cli.service_cmds._run_service``: the first signal drains, a second one aborts."""
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                count = 0
                async for _ in signals:
                    count += 1
                    if count == 1:
                        dispatcher.request_stop()
                    else:
                        tg.cancel_scope.cancel()

        tg.start_soon(watch_signals)
        await dispatcher.run()
        tg.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents-dir", type=Path, required=True)
    parser.add_argument("--max-backlog", type=int, default=100)
    parser.add_argument("--record", type=Path, required=True, help="JSON written at exit")
    parser.add_argument("--profile", type=Path, help="cProfile the process into this file")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    dispatcher = build(args.agents_dir, args.max_backlog)
    acks: list[tuple[str, float, float, str]] = []
    record_acks(dispatcher, acks)
    collections: list[tuple[float, int, float]] = []
    record_gc(collections)
    freeze_imports()  # as the `openrtc dispatcher` command does
    profiler = cProfile.Profile() if args.profile else None
    try:
        if profiler is not None:
            profiler.runcall(anyio.run, serve, dispatcher)
        else:
            anyio.run(serve, dispatcher)
    finally:
        if profiler is not None and args.profile is not None:
            profiler.dump_stats(args.profile)
        record: dict[str, Any] = {
            "stats": dataclasses.asdict(dispatcher.stats),
            "dispatcher_id": dispatcher.settings.dispatcher_id,
            "acks": acks,
            "gc": collections,
        }
        args.record.write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

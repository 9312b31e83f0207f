"""What the benchmarks share: statistics, service processes, the routing corpus.

Imported by ``bench/dispatch.py``, ``bench/e2e.py``, ``bench/routing.py`` and
the child ``routing.py`` runs in the 0.20.1 venv. Only the standard library
and ``livekit.protocol`` are imported here, never ``openrtc``: the same file
is imported by two interpreters that each have a different package under
that name.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from time import perf_counter_ns
from typing import IO, Any, TypedDict

from livekit.protocol.agent import Job, JobType
from livekit.protocol.models import Room

__all__ = [
    "ROUTING_LOGGERS",
    "SUMMARY_ENV",
    "CorpusRecord",
    "ServiceDied",
    "ServiceProcess",
    "build_jobs",
    "measure",
    "percentile",
    "quiet_logging",
    "record_figure",
    "runtime_info",
    "timed_pass",
]

# --- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of unsorted ``values``; nan if empty.

    The one definition every benchmark reports with, so their p50 and p99
    compare: always a value that was measured (the ceil(q/100 * n)-th
    smallest), never one interpolated between two calls.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


# --- service processes ---------------------------------------------------------


class ServiceDied(RuntimeError):
    """A benchmarked process exited while the benchmark needed it."""


@dataclass
class ServiceProcess:
    """One service process, in a process group of its own (with any children it starts).

    Its output goes to ``log_path``. :meth:`check` raises :class:`ServiceDied`
    with the log's tail once it has exited; :meth:`stop` sends SIGTERM (a
    service drains, as on ``kill``), then SIGKILLs what is left of the group.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    #: The process id once started (kept after it stopped, for the report).
    pid: int = 0
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def check(self) -> None:
        """Raise :class:`ServiceDied` if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceDied(
                f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}"
            )

    def log_text(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def tail(self, lines: int = 25) -> str:
        return "\n".join(f"  | {line}" for line in self.log_lines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
        proc = self.proc
        if proc is not None:
            pgid = proc.pid  # start_new_session: the child leads its own group
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    print(f"{self.name} did not stop within {grace:.0f}s: killed", file=sys.stderr)
            # Whatever is left of the group (job processes, a forkserver) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


# --- the routing corpus --------------------------------------------------------

#: The loggers the two resolvers write their INFO records to.
ROUTING_LOGGERS = ("openrtc", "openrtc.routing")


class CorpusRecord(TypedDict):
    """One job of the corpus, as the parent writes it to JSON."""

    id: str
    room_sid: str
    room_name: str
    metadata: str
    room_metadata: str
    category: str
    expected: str


def build_jobs(records: Sequence[CorpusRecord]) -> list[Any]:
    """Real ``livekit.protocol.agent.Job`` messages, one per record."""
    return [
        Job(
            id=r["id"],
            type=JobType.JT_ROOM,
            room=Room(sid=r["room_sid"], name=r["room_name"], metadata=r["room_metadata"]),
            metadata=r["metadata"],
        )
        for r in records
    ]


def quiet_logging() -> dict[str, str]:
    """Root logger at WARNING, so no resolver pays for emitting INFO records.

    Returns the effective level of each routing logger, and fails if any of
    them would still emit INFO (a library that set its own level, say).
    """
    logging.getLogger().setLevel(logging.WARNING)
    levels: dict[str, str] = {}
    for name in ROUTING_LOGGERS:
        logger = logging.getLogger(name)
        if logger.isEnabledFor(logging.INFO):
            raise SystemExit(f"logger {name!r} still emits INFO; cannot benchmark quietly")
        levels[name] = logging.getLevelName(logger.getEffectiveLevel())
    return levels


def timed_pass(run: Callable[[], None]) -> int:
    """Nanoseconds one call of ``run`` takes."""
    start = perf_counter_ns()
    run()
    return perf_counter_ns() - start


def measure(run: Callable[[], None], *, repeat: int, warmup: int) -> list[int]:
    """Run ``warmup`` untimed passes, then ``repeat`` timed passes with gc disabled."""
    for _ in range(warmup):
        run()
    results: list[int] = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            results.append(timed_pass(run))
        finally:
            gc.enable()
    return results


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def runtime_info() -> dict[str, str]:
    """Interpreter and protobuf details, to print next to the figures."""
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "protobuf": f"{protobuf_version} ({api_implementation.Type()})",
        "livekit-agents": _dist_version("livekit-agents"),
        "livekit-protocol": _dist_version("livekit-protocol"),
        "openrtc": _dist_version("openrtc"),
    }


# --- the scoreboard ----------------------------------------------------------------

#: ``bench/scoreboard.py`` sets this to a file; each benchmark appends one JSON
#: line per headline figure to it (nothing is written when it is unset).
SUMMARY_ENV = "OPENRTC_BENCH_SUMMARY"


def record_figure(
    bench: str,
    figure: str,
    *,
    ours: float | None,
    anchor: float | None,
    anchor_label: str,
    unit: str,
    goal: str,
    met: bool | None,
    ratio: float | None = None,
    note: str = "",
) -> None:
    """Note one headline figure beside its anchor for the scoreboard.

    ``ratio`` is printed as the goal reads (for example "ours / plain" for a
    latency, "ours / theirs" for a speed-up); when omitted it is
    ``ours / anchor``. ``met`` is None for a figure without a goal.
    """
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    if ratio is None and ours is not None and anchor:
        ratio = ours / anchor
    line = {
        "bench": bench,
        "figure": figure,
        "ours": ours,
        "anchor": anchor,
        "anchor_label": anchor_label,
        "unit": unit,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        "note": note,
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")

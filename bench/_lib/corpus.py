"""What ``routing.py`` and its 0.20.1 child (``_routing_legacy.py``) share.

The corpus's jobs, quiet logging, gc-off timing and version details. Imported by
two interpreters that each have a different package named ``openrtc``: only the
standard library and ``livekit.protocol`` are imported here.
"""

from __future__ import annotations

import gc
import logging
import platform
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from time import perf_counter_ns
from typing import Any, TypedDict

from livekit.protocol.agent import Job, JobType
from livekit.protocol.models import Room

__all__ = [
    "ROUTING_LOGGERS",
    "CorpusRecord",
    "build_jobs",
    "measure",
    "quiet_logging",
    "runtime_info",
    "timed_pass",
]

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

"""The fleet view (``openrtc top``): what each worker publishes about its running sessions.

Every worker writes one :class:`WorkerSnapshot` (JSON, expiring) under
:meth:`openrtc.wire.keys.Keys.top` every ``top_interval``; ``openrtc top`` reads
those of every live worker. This module is the only code that knows the fields.

Pure data: no Redis, no LiveKit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Final

__all__ = [
    "SESSION_STATES",
    "SORT_KEYS",
    "SessionRow",
    "WorkerSnapshot",
    "sort_rows",
]

#: A session's state, as livekit-agents names the agent's (``agent_state_changed``);
#: ``joining`` until its agent runs.
SESSION_STATES: Final = ("joining", "initializing", "idle", "listening", "thinking", "speaking")


@dataclass(slots=True)
class SessionRow:
    """One running session, as ``top`` shows it."""

    job_id: str
    agent: str
    room: str
    worker: str
    #: When the call's first session started (unix s, the call's, across takeovers).
    started_at: float
    #: Seconds since then, when the snapshot was taken.
    duration_s: float = 0.0
    tenant: str = ""
    state: str = "joining"
    #: Caller turns in this call so far (across takeovers, from the checkpoint).
    turns: int = 0
    #: The last turn's latency (s): caller stopped speaking -> agent speaking
    #: (``e2e_latency``), else the LLM's time to first token (typed turns).
    latency_s: float | None = None
    #: Share of one core over the last interval: the session process's
    #: (``process`` isolation), else its callbacks' share of the worker's loop.
    cpu: float | None = None
    #: The session process's resident memory (``process`` isolation); ``None``
    #: in ``coroutine`` isolation, where sessions share the worker's memory.
    rss_bytes: int | None = None
    #: Loop callbacks of this session that held its event loop over the block
    #: threshold (:data:`openrtc.session.loopstats.BLOCK_S`), since it started.
    blocks: int = 0
    #: The longest of them (s).
    longest_block_s: float = 0.0

    @classmethod
    def from_dict(cls, data: Any) -> SessionRow | None:
        """A row read back; ``None`` for anything that is not one (never raises)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                job_id=str(data["job_id"]),
                agent=str(data["agent"]),
                room=str(data["room"]),
                worker=str(data["worker"]),
                started_at=_float(data.get("started_at")) or 0.0,
                duration_s=_float(data.get("duration_s")) or 0.0,
                tenant=str(data.get("tenant", "")),
                state=str(data.get("state", "joining")),
                turns=int(_float(data.get("turns")) or 0),
                latency_s=_float(data.get("latency_s")),
                cpu=_float(data.get("cpu")),
                rss_bytes=_int(data.get("rss_bytes")),
                blocks=int(_float(data.get("blocks")) or 0),
                longest_block_s=_float(data.get("longest_block_s")) or 0.0,
            )
        except KeyError:
            return None


@dataclass(slots=True)
class WorkerSnapshot:
    """One worker's running sessions at one moment."""

    worker: str
    agent: str
    host: str
    pid: int
    isolation: str
    #: When it was taken (unix s, this host's clock).
    at: float
    #: The worker process's share of one core over the last interval.
    cpu: float = 0.0
    #: The worker process's resident memory (its session processes not included).
    rss_bytes: int = 0
    sessions: list[SessionRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as stored and shown (``top --json``)."""
        doc = {name: getattr(self, name) for name in _WORKER_FIELDS}
        doc["sessions"] = [{name: getattr(r, name) for name in _ROW_FIELDS} for r in self.sessions]
        return doc

    def encode(self) -> bytes:
        """The snapshot as stored (compact JSON)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def decode(cls, data: bytes | str | None) -> WorkerSnapshot | None:
        """A stored snapshot; ``None`` for anything unreadable (never raises)."""
        if not data:
            return None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("sessions"), list):
            return None
        try:
            return cls(
                worker=str(doc["worker"]),
                agent=str(doc["agent"]),
                host=str(doc.get("host", "")),
                pid=int(_float(doc.get("pid")) or 0),
                isolation=str(doc.get("isolation", "")),
                at=_float(doc.get("at")) or 0.0,
                cpu=_float(doc.get("cpu")) or 0.0,
                rss_bytes=_int(doc.get("rss_bytes")) or 0,
                sessions=[r for r in map(SessionRow.from_dict, doc["sessions"]) if r is not None],
            )
        except KeyError:
            return None


# (``dataclasses.asdict`` deep-copies every value: ten times slower, at every snapshot.)
_ROW_FIELDS: Final = tuple(f.name for f in fields(SessionRow))
_WORKER_FIELDS: Final = tuple(f.name for f in fields(WorkerSnapshot) if f.name != "sessions")

#: What ``top`` sorts by, and whether the largest comes first.
SORT_KEYS: Final[dict[str, bool]] = {
    "cpu": True,
    "memory": True,
    "duration": True,
    "turns": True,
    "latency": True,
    "blocks": True,
    "agent": False,
    "worker": False,
    "state": False,
    "job": False,
}


def sort_rows(rows: list[SessionRow], key: str, *, reverse: bool = False) -> list[SessionRow]:
    """``rows`` in ``top``'s order for ``key`` (:data:`SORT_KEYS`); unknown values last.

    Ties keep a stable order (agent, then job id), so the screen does not jump.
    """
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}: one of {', '.join(SORT_KEYS)}")
    numeric: dict[str, Callable[[SessionRow], float | int | None]] = {
        "cpu": lambda r: r.cpu,
        "memory": lambda r: r.rss_bytes,
        "duration": lambda r: r.duration_s,
        "turns": lambda r: r.turns,
        "latency": lambda r: r.latency_s,
        "blocks": lambda r: r.blocks,
    }
    text: dict[str, Callable[[SessionRow], str]] = {
        "agent": lambda r: r.agent,
        "worker": lambda r: r.worker,
        "state": lambda r: r.state,
        "job": lambda r: r.job_id,
    }
    stable = sorted(rows, key=lambda r: (r.agent, r.job_id))
    if key in numeric:
        value = numeric[key]
        known = [r for r in stable if value(r) is not None]
        unknown = [r for r in stable if value(r) is None]
        known.sort(key=lambda r: value(r) or 0, reverse=SORT_KEYS[key] != reverse)
        return known + unknown
    out = sorted(stable, key=text[key])
    return out[::-1] if reverse else out


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) and out >= 0 else None


def _int(value: Any) -> int | None:
    out = _float(value)
    return None if out is None else int(out)

"""Log set-up for every process: text or JSON lines, with the job's context on each line.

``configure_logging(level, fmt)`` is called once per process (the CLI, a
``process``-isolation session child). ``fmt="json"`` writes one JSON object
per line (python-json-logger's formatter) with ``time`` (ISO 8601, UTC),
``level``, ``logger``, ``message``, the exception as ``exception`` and,
where known, ``job_id``, ``agent``, ``tenant``, ``room``, ``worker_id`` and
``dispatcher_id``.

Those come from context variables that the code handling a job binds with
:func:`log_context` (the dispatcher's handling of a job, the worker's check
and run of an entry, the session); a service binds its own id the same way
around its run. Tasks inherit context variables from the task that starts
them, so every line logged inside a job's scope carries them, including
livekit-agents' own lines.

A ``process``-isolation session child gets the chosen level and format in
its environment (:func:`child_env`), so it logs alike.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final


class LogFormat(StrEnum):
    """How log lines are written."""

    TEXT = "text"
    JSON = "json"


#: The fields :func:`log_context` binds.
CONTEXT_FIELDS: Final = ("job_id", "agent", "tenant", "room", "worker_id", "dispatcher_id")

# One variable holding a small dict: binding a job is one set() and one reset(),
# and a line outside any job costs one get().
_context: ContextVar[dict[str, str] | None] = ContextVar("openrtc_log_context", default=None)
_format: str = "text"

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class log_context:
    """Every log line in this block (and in tasks started from it) carries ``fields``.

    Empty values are left out; fields bound by an enclosing block stay unless
    overridden. A class, not a generator: it runs on the dispatcher's per-job
    path, where a generator-based context manager costs several times more.
    """

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: str) -> None:
        self._fields = fields
        self._token: Token[dict[str, str] | None] | None = None

    def __enter__(self) -> None:
        outer = _context.get()
        merged = dict(outer) if outer else {}
        for key, value in self._fields.items():
            if value:
                merged[key] = value
        self._token = _context.set(merged)

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _context.reset(self._token)


def add_log_context(**fields: str) -> None:
    """Add ``fields`` to the innermost :func:`log_context` block (e.g. the agent, once routed).

    Call it only directly inside a job's own block: the block's fields are
    shared with the tasks started in it, and a service's block with all its
    jobs. Outside any block it does nothing.
    """
    bound = _context.get()
    if bound is not None:
        for key, value in fields.items():
            if value:
                bound[key] = value


def current_context() -> dict[str, str]:
    """The fields a line logged here would carry."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the job context onto each record (as attributes) for the formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get()
        if bound:
            for key, value in bound.items():
                setattr(record, key, value)
        return True


class _TextFormatter(logging.Formatter):
    """The classic line, with ``[job=... agent=...]`` when a job context is bound."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job_id", None)
        if job is None:
            return line
        # Only the job's own fields: the process id is in every line of the
        # process and would only lengthen it.
        tags = " ".join(
            f"{k}={getattr(record, k)}"
            for k in ("job_id", "agent", "tenant", "room")
            if hasattr(record, k)
        )
        head, sep, rest = line.partition("\n")
        return f"{head} [{tags}]{sep}{rest}"


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class _Json(JsonFormatter):
        def add_fields(
            self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
        ) -> None:
            # The record's own time (not the formatting time), always UTC.
            log_data["time"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            )
            super().add_fields(log_data, record, message_dict)

    return _Json(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={
            "levelname": "level",
            "name": "logger",
            "exc_info": "exception",
        },
    )


def child_env() -> dict[str, str]:
    """Environment variables that make a child process log as this one does."""
    return {
        "OPENRTC_LOG_LEVEL": logging.getLevelName(logging.getLogger("openrtc").getEffectiveLevel()),
        "OPENRTC_LOG_FORMAT": _format,
    }


def configure_logging(level: int | str, fmt: str = LogFormat.TEXT) -> None:
    """Set up the root logger for this process: ``fmt`` is ``text`` or ``json``.

    A second call reconfigures. Third-party chatter stays at WARNING unless
    DEBUG was asked for.
    """
    fmt = LogFormat(fmt)  # ValueError names the value
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_openrtc", False)]
    if len(ours) == len(root.handlers):
        # Like logging.basicConfig: a host that set up logging itself (pytest
        # running the CLI in-process) keeps its handlers and its level.
        for old in ours:
            root.removeHandler(old)
        handler = logging.StreamHandler(sys.stderr)
        handler._openrtc = True  # type: ignore[attr-defined]
        handler.addFilter(ContextFilter())
        handler.setFormatter(_json_formatter() if fmt == "json" else _TextFormatter(_TEXT_FORMAT))
        root.addHandler(handler)
        root.setLevel(numeric)
    if numeric > logging.DEBUG:
        for noisy in ("livekit", "aiohttp", "asyncio"):
            logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    global _format
    _format = fmt.value

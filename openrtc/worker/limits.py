"""The guards' policies, pure: where a memory reading stands, and the run of failed sessions.

Plain data in, a decision out, no I/O (table-tested in ``tests/test_guards.py``);
:mod:`openrtc.worker.guards` samples and acts on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

__all__ = ["EXIT_MEMORY_LIMIT", "FailureGuard", "Level", "memory_level", "next_streak"]

#: Logs as the worker (as openrtc.worker.context's logger; imported by it, so not from it).
logger = logging.getLogger("openrtc.worker")

#: The exit code of a worker that stopped over its memory limit (after its
#: drain). Not 0: ``Restart=on-failure`` (systemd) restarts it, and an operator
#: tells it from a deploy's SIGTERM (which exits 0) in the unit's or the pod's
#: last state. 75 is ``EX_TEMPFAIL`` (sysexits.h): try again.
EXIT_MEMORY_LIMIT: Final = 75


class Level(StrEnum):
    """Where a memory reading stands against its thresholds."""

    OK = "ok"
    WARN = "warn"
    LIMIT = "limit"


def memory_level(mb: float, *, warn_mb: float | None, limit_mb: float | None) -> Level:
    """Where ``mb`` stands: at or over ``limit_mb`` -> LIMIT, over ``warn_mb`` -> WARN.

    A threshold that is ``None`` is off.
    """
    if limit_mb is not None and mb >= limit_mb:
        return Level.LIMIT
    if warn_mb is not None and mb >= warn_mb:
        return Level.WARN
    return Level.OK


def next_streak(streak: int, status: str, *, again: bool = False) -> int:
    """Calls in a row whose sessions failed, after one ended with ``status``.

    ``failed`` counts, ``success`` resets; ``taken_over`` (another worker has
    the call: a handover, a lost lease) says nothing about this worker's
    sessions and leaves the count as it is. ``again``: the failed session's
    call is the one whose failure was counted last: a call that fails every
    delivery is the call's fault, not the worker's (``max_deliveries`` deals
    with it), so it counts once per run.
    """
    if status == "failed":
        return streak if again else streak + 1
    if status == "success":
        return 0
    return streak


#: Calls a run of failures remembers (a worker with the guard off may fail for days).
_COUNTED_MAX: Final = 1024


@dataclass(slots=True)
class FailureGuard:
    """The run of failed calls; refusing new entries once it reaches ``limit``.

    Written by the outcomes (:meth:`record`); read by the intake, the
    heartbeat and ``/readyz`` (:meth:`refusing`).
    """

    #: Calls failed in a row that stop the worker; 0: off.
    limit: int
    #: How long it stops before it tries again (s).
    cooldown: float
    clock: Callable[[], float] = time.monotonic
    streak: int = 0
    #: The calls whose failure this run counted (none since the last success): a
    #: call delivered again, even after another call failed, counts once.
    counted: set[str] = field(default_factory=set)
    #: Refusing until then (``clock``); 0: not refusing.
    until: float = 0.0
    reason: str = field(default="")

    def record(self, status: str, job_id: str) -> None:
        """A session of ``job_id`` ended: ``success``, ``failed`` or ``taken_over``."""
        again = status == "failed" and job_id in self.counted
        self.streak = next_streak(self.streak, status, again=again)
        if status == "success":
            self.counted.clear()
            if self.until:
                self.until, self.reason = 0.0, ""
                logger.info("a session succeeded: ready again")
            return
        if status != "failed" or again:
            return
        if len(self.counted) < _COUNTED_MAX:  # a run this long has stopped the worker
            self.counted.add(job_id)
        if self.limit and self.streak >= self.limit:
            was = self.until > self.clock()
            self.until = self.clock() + self.cooldown
            self.reason = (
                f"{self.streak} calls in a row failed (--max-consecutive-failures "
                f"{self.limit}): taking no new jobs for {self.cooldown:.0f}s"
            )
            if not was:
                logger.error("%s; /readyz answers 503; see the sessions' errors above", self.reason)

    def refusing(self) -> str | None:
        """Why no new entries are read now; ``None`` when they are."""
        if not self.until:
            return None
        if self.clock() < self.until:
            return self.reason
        self.until, self.reason = 0.0, ""
        logger.warning(
            "failure cool-down over: taking jobs again (one more failed call stops it again)"
        )
        return None

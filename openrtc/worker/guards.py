"""Guards: a worker's memory and its run of failed sessions, watched while it serves.

**Memory** (``--memory-warn-mb``, ``--memory-limit-mb``): every
:data:`GUARD_INTERVAL` seconds the step measures the worker's memory, in
``process`` isolation with its session processes (the zygote and every child).
It is their PSS (proportional set size), summed: children forked from the
zygote share its pages copy-on-write, and RSS would count each shared page once
per process (ten children of a 300 MB zygote would "use" 3 GB); PSS gives each
process its share, so the sum is what the tree costs. PSS costs a read of
``/proc/PID/smaps_rollup`` (milliseconds per process), RSS microseconds, and
PSS is never above RSS: RSS is read every time, PSS only when the summed RSS
reaches the lowest threshold (and every 10 s for the gauge). Over the warning: one
line (and one when back under). Over the limit: the worker drains as on SIGTERM
(no new jobs, running calls handed to peers at a turn boundary with their
conversation) and exits with :data:`EXIT_MEMORY_LIMIT` for its supervisor to
restart it.

**Per session** (``--session-memory-limit-mb``, ``process`` isolation): each
session process's USS (its private pages: what replacing it frees; the
zygote's shared pages are not its doing). Over it, that call alone is handed
over (to a peer, or to a new session process of this worker) with its
conversation, and the process ends with it; one that cannot be handed over in
time (no turn boundary, nobody with a free slot) is killed, and its call starts
again at once in a new process from its last checkpoint.

**Failed calls** (``--max-consecutive-failures``): that many calls in a row
whose sessions ended ``failed`` (a success resets the count; a call failing
again counts once) and the worker stops reading
entries, ``/readyz`` answers 503 with the reason, and its heartbeat shows no
capacity, so peers and the dispatcher count on it for nothing. It tries again
after ``--failure-cooldown``: one more failure stops it again, one success
makes it ready. Not never: a cause every worker shares (the LLM provider down)
would otherwise leave the whole pool idle until someone restarts it.

The policies are pure (:mod:`openrtc.worker.limits`), table-tested; this step
(:class:`Guards`) samples and acts.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import anyio
import psutil
from anyio.abc import TaskStatus

from openrtc.worker.claims import Claim, ClaimTable
from openrtc.worker.context import WorkerContext, logger
from openrtc.worker.drainer import Drainer
from openrtc.worker.limits import EXIT_MEMORY_LIMIT, Level, memory_level

__all__ = ["GUARD_INTERVAL", "Guards", "Sample", "measure"]

#: How often memory is measured (s): in a thread off the event loop, RSS
#: (microseconds), PSS only when RSS nears a threshold or for the gauge.
GUARD_INTERVAL: Final = 2.0
#: Every this many samples the worker's PSS is read whatever its RSS (the
#: gauge's value, every 10 s); in between only when RSS nears a threshold.
GAUGE_EVERY: Final = 5
#: A session process over its limit that was not handed over (and gone)
#: within this long is killed: its call starts again from its checkpoint.
SESSION_SHED_WAIT: Final = 20.0

_MB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement: the worker's memory and each session process's USS asked for."""

    #: The tree's PSS (``precise``), else its summed RSS: a bound never below it.
    worker_mb: float
    precise: bool
    #: Session process pid -> its USS (MB), for those whose RSS reached ``session_floor``.
    sessions: dict[int, float]
    #: Seconds the measurement took (its cost).
    took: float


def measure(
    pid: int,
    session_pids: list[int],
    *,
    tree: bool,
    floor: float | None = None,
    session_floor: float | None = None,
) -> Sample:
    """Measure (blocking: run it in a thread). ``tree``: with every descendant of ``pid``.

    RSS first (``/proc/PID/statm``: microseconds): PSS and USS are never above
    it, so below ``floor`` (the lowest worker threshold; ``None``: always
    precise) no process's ``smaps_rollup`` is read (milliseconds each, more
    with more memory mapped), and a session process whose RSS is below
    ``session_floor`` cannot be over its limit.
    """
    started = time.perf_counter()
    root = psutil.Process(pid)
    procs = [root, *(root.children(recursive=True) if tree else [])]
    rss: dict[int, int] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            rss[proc.pid] = proc.memory_info().rss
    bound = sum(rss.values())
    precise = floor is None or bound / _MB >= floor
    wanted = {
        p
        for p in session_pids
        if session_floor is not None and rss.get(p, 0) / _MB >= session_floor
    }
    total = 0
    sessions: dict[int, float] = {}
    for proc in procs:
        if not (precise or proc.pid in wanted):
            continue
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            # PSS where the platform has it (Linux), else RSS.
            total += int(getattr(info, "pss", info.rss))
            if proc.pid in wanted:
                sessions[proc.pid] = info.uss / _MB
    worker = total if precise else bound
    return Sample(worker / _MB, precise, sessions, time.perf_counter() - started)


class Guards:
    """The guard step: memory sampled every :data:`GUARD_INTERVAL`, acted on."""

    def __init__(
        self,
        ctx: WorkerContext,
        claims: ClaimTable,
        drainer: Drainer,
        stop: Callable[[int], None],
    ) -> None:
        self._ctx = ctx
        self._claims = claims
        self._drainer = drainer
        self._stop = stop
        self._level = Level.OK
        self._samples = 0
        #: Session processes being shed (handed over, or killed).
        self._shedding: set[int] = set()
        #: The last sample (tests, logs).
        self.last: Sample | None = None

    @property
    def on(self) -> bool:
        """Whether there is anything to measure (a memory threshold set)."""
        s = self._ctx.settings
        return any(
            v is not None for v in (s.memory_warn_mb, s.memory_limit_mb, s.session_memory_limit_mb)
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.on:
            return
        async with anyio.create_task_group() as tg:
            while True:
                await self.check(tg)
                await anyio.sleep(GUARD_INTERVAL)

    async def check(self, tg: anyio.abc.TaskGroup) -> Sample:
        """One sample, and what it calls for."""
        s = self._ctx.settings
        running = {
            claim.control.pid: claim
            for claim in self._claims
            if claim.control is not None and claim.control.pid
        }
        thresholds = [t for t in (s.memory_warn_mb, s.memory_limit_mb) if t is not None]
        self._samples += 1
        # Precise (PSS) every GAUGE_EVERY samples for the gauge; else only near a threshold.
        floor = None if self._samples % GAUGE_EVERY == 1 else min(thresholds, default=math.inf)
        sample = await anyio.to_thread.run_sync(
            lambda: measure(
                os.getpid(),
                list(running),
                tree=s.isolation == "process",
                floor=floor,
                session_floor=s.session_memory_limit_mb,
            )
        )
        self.last = sample
        if sample.precise:
            # Labelled here, not at start: with the guards off nothing is exported.
            self._ctx.metrics.memory_bytes.labels(s.agent).set(sample.worker_mb * _MB)
        self._worker_level(sample)
        if s.session_memory_limit_mb is not None:
            for pid, mb in sample.sessions.items():
                if mb >= s.session_memory_limit_mb and pid not in self._shedding:
                    self._shedding.add(pid)
                    tg.start_soon(self._shed, running[pid], pid, mb)
        return sample

    def _worker_level(self, sample: Sample) -> None:
        s = self._ctx.settings
        level = memory_level(sample.worker_mb, warn_mb=s.memory_warn_mb, limit_mb=s.memory_limit_mb)
        was, self._level = self._level, level
        if level is was or was is Level.LIMIT:
            return
        if level is Level.LIMIT:
            logger.error(
                "memory %.0f MB is over the limit (--memory-limit-mb %.0f): taking no new "
                "jobs, handing running calls to peers, then exiting with code %d to be "
                "restarted",
                sample.worker_mb,
                s.memory_limit_mb,
                EXIT_MEMORY_LIMIT,
            )
            self._stop(EXIT_MEMORY_LIMIT)
        elif level is Level.WARN:
            logger.warning(
                "memory %.0f MB is over the warning level (--memory-warn-mb %.0f)%s",
                sample.worker_mb,
                s.memory_warn_mb,
                f"; the limit is {s.memory_limit_mb:.0f} MB" if s.memory_limit_mb else "",
            )
        else:
            logger.info(
                "memory %.0f MB is back under the warning level (%.0f MB)",
                sample.worker_mb,
                s.memory_warn_mb,
            )

    async def _shed(self, claim: Claim, pid: int, mb: float) -> None:
        """A session process over its limit: hand its call over, else kill it."""
        s, message = self._ctx.settings, claim.message
        job = message.job_id if message is not None else "?"
        logger.warning(
            "job %s: session process %d uses %.0f MB, over --session-memory-limit-mb %.0f: "
            "handing the call over (its conversation kept) and replacing the process",
            job,
            pid,
            mb,
            s.session_memory_limit_mb,
        )
        try:
            with anyio.move_on_after(SESSION_SHED_WAIT):
                await self._drainer.hand_over_call(claim)
                await claim.dropped.wait()
            if not claim.dropped.is_set():
                logger.warning(
                    "job %s: not handed over within %.0fs; killing session process %d "
                    "(the call starts again from its checkpoint)",
                    job,
                    SESSION_SHED_WAIT,
                    pid,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            self._shedding.discard(pid)

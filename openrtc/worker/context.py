"""What every step of a worker shares: its settings, its Redis clients, its counters.

One :class:`WorkerContext` per worker, built by :class:`openrtc.worker.worker.Worker`.
Each mutable attribute has one writer, named beside it; every other step only reads it.
:meth:`WorkerContext.redis` is the one way a step talks to Redis where an outage must not
stop it: bounded, an outage logged once in the step's words, the step goes on.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import anyio
from anyio.abc import TaskGroup

from openrtc.agents.observers import Observers
from openrtc.agents.registry import AgentConfig
from openrtc.agents.tenants import TenantsConfig
from openrtc.ops.metrics import WorkerMetrics
from openrtc.settings import WorkerSettings, redact_url
from openrtc.store.checkpoint import CheckpointStore
from openrtc.store.streams import REDIS_DOWN, JobConsumer, RedisClient, StreamStore
from openrtc.supervision import StateLog, backoff_delay, describe
from openrtc.wire.keys import Keys
from openrtc.worker.limits import FailureGuard

__all__ = ["DOWN", "READ_BLOCK_MS", "Down", "WorkerContext", "WorkerStats", "logger"]

#: Every step logs as the worker (log filters and tests select this name).
logger = logging.getLogger("openrtc.worker")

#: How long a blocking read (jobs, control) waits before its loop looks at its state again.
READ_BLOCK_MS: Final = 1000

T = TypeVar("T")


class Down(enum.Enum):
    """What :meth:`WorkerContext.redis` returns when Redis did not answer."""

    DOWN = "down"


#: Redis did not answer (an outage, or slower than the step's bound).
DOWN: Final = Down.DOWN


@dataclass(slots=True)
class WorkerStats:
    """Counters since start (tests); operators read them on ``/metrics`` (openrtc.ops.metrics)."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    taken_over: int = 0
    reclaimed: int = 0
    handed_over: int = 0
    dead_lettered: int = 0


@dataclass(slots=True, eq=False)
class WorkerContext:
    """The worker's shared facts and clients; the fields below the line change while it runs."""

    settings: WorkerSettings
    #: The agent served. Changes with a hot reload; writer: ``Worker.reload``.
    config: AgentConfig
    keys: Keys
    redis_client: RedisClient
    store: StreamStore
    consumer: JobConsumer
    checkpoints: CheckpointStore
    metrics: WorkerMetrics
    clock: Callable[[], float] = time.time
    #: The agents directory's session observers (as discovered at start).
    observers: Observers = field(default_factory=Observers)
    stats: WorkerStats = field(default_factory=WorkerStats)
    #: Redis reachable or not, for logs and ``/readyz``: set by every step that sees
    #: Redis answer or fail (a state log: it logs changes only, so many writers are fine).
    redis_state: StateLog = field(default_factory=lambda: StateLog("Redis", logger))
    # -- changing while the worker runs -------------------------------------------
    #: Redis's clock minus this host's. Writer: the heartbeat.
    redis_clock_offset: float = 0.0
    #: After Redis comes back from an outage every holder's entries look idle for
    #: the outage's length: no reclaiming before this (monotonic). Writer:
    #: :meth:`redis_up`, a lease after any step saw Redis answer again.
    reclaim_after: float = 0.0
    #: A step saw Redis fail and none has seen it answer since. Writers:
    #: :meth:`redis_down`, :meth:`redis_up`.
    redis_away: bool = False
    #: Outages Redis came back from (:meth:`redis_up`): it may have come back
    #: with less than it had (a snapshot, a failover, no persistence).
    outages: int = 0
    #: Taking no new jobs, handing running calls over. Writer: the drainer.
    draining: bool = False
    #: The worker's task group: checks and sessions run in it. Writer: ``Worker._run``.
    tg: TaskGroup | None = None
    #: The run of failed sessions, and whether it stops the intake. Writer: the outcomes.
    failures: FailureGuard = field(default_factory=lambda: FailureGuard(0, 0.0))
    #: The tenants file as last read well (a call takes its tenant's entry when its
    #: session starts). Writers: ``Worker.__init__``, then the tenants watcher.
    tenants: TenantsConfig = field(default_factory=TenantsConfig)

    @property
    def step_timeout(self) -> float:
        """The bound of one Redis step: a third of the lease, so a lease outlives two."""
        return self.settings.lease / 3

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` in the worker's task group (a check, a session)."""
        assert self.tg is not None, "the worker is not running"
        self.tg.start_soon(func, *args)

    def redis_up(self) -> None:
        """Redis answered: say so once (log, ``/readyz``) after an outage.

        And reclaim nothing for a lease: through the outage every holder's
        entries aged in the pending list (a restart, a snapshot restored, a
        failover: Redis's idle times ran while nobody could renew), and a live
        holder may reconnect a little after this worker. Whichever step sees it
        first, so a worker whose slots were all busy (no intake passes) waits too.
        """
        if self.redis_away:
            self.redis_away = False
            self.outages += 1
            self.reclaim_after = max(self.reclaim_after, time.monotonic() + self.settings.lease)
        self.redis_state.set("connected", redact_url(self.settings.redis_url))

    def redis_down(self, exc: BaseException) -> None:
        """Redis did not answer: say so once (log, ``/readyz``)."""
        self.redis_away = True
        self.redis_state.set("unreachable", describe(exc), level=logging.ERROR)

    def may_reclaim(self) -> bool:
        """May this worker take entries from peers now (not in or just after an outage)?"""
        return not self.redis_away and time.monotonic() >= self.reclaim_after

    async def redis(
        self,
        call: Callable[[], Awaitable[T]],
        failed: str = "",
        *log_args: Any,
        within: float | None = None,
        outage: bool = False,
        level: int = logging.WARNING,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T | Down:
        """``await call()``, or :data:`DOWN` if Redis did not answer ``within`` seconds.

        Args:
            call: the step's Redis work (no arguments: a lambda or a local function).
            failed: logged (at ``level``) when Redis did not answer, ``%``-formatted
                with ``log_args`` and then the error (the last ``%s``); empty: silent.
            within: seconds (default :attr:`step_timeout`; ``math.inf``: unbounded).
            outage: also record Redis as unreachable (:meth:`redis_down`) and, once it
                answers, as reachable (:meth:`redis_up`).
            passthrough: errors raised as they are (e.g. a refused command, which
                ``REDIS_DOWN`` would take for an outage).
        """
        try:
            with anyio.fail_after(self.step_timeout if within is None else within):
                result = await call()
        except passthrough:
            raise
        except REDIS_DOWN as exc:
            if outage:
                self.redis_down(exc)
            if failed:
                logger.log(level, failed, *log_args, exc)
            return DOWN
        if outage:
            self.redis_up()
        return result

    async def until_redis(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await func(*args)``, again and again (backing off) until Redis answers."""
        attempt = 0
        while True:
            try:
                result = await func(*args)
            except REDIS_DOWN as exc:
                self.redis_down(exc)
                await anyio.sleep(backoff_delay(attempt, 0.1, 2.0))
                attempt += 1
            else:
                if attempt:
                    self.redis_up()
                return result

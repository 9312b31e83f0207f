"""The dispatcher: LiveKit's agent-worker protocol in, per-agent Redis streams out.

A list of parts under one task group, each with one ``run(*, task_status)``,
started in this order by :meth:`Dispatcher._run` (docs/dispatcher.md):

- **handlers** (:class:`~openrtc.dispatcher.context.Handlers`): the short
  tasks the others start per job (a dead letter, a failure, a termination);
- **membership** (:mod:`openrtc.dispatcher.presence`): heartbeat, and each
  agent's workers and backlog (the view admission reads without I/O);
- **enqueue** (:mod:`openrtc.dispatcher.enqueuer`): every assignment that
  arrives together, in one Redis pipeline;
- **status relay** (:mod:`openrtc.dispatcher.relay`): workers' statuses to
  LiveKit, LiveKit's terminations to the workers;
- **LiveKit link** (:mod:`openrtc.dispatcher.link`): one registered
  ``/agent`` socket, reconnected with backoff; it hands each offer to the
  availability desk (:mod:`openrtc.dispatcher.availability`, answered at
  once) and each assignment to the assignment desk
  (:mod:`openrtc.dispatcher.assignment`);
- **reconciler** (:mod:`openrtc.dispatcher.leader`), when on: the lease
  holder's passes over the rooms.

What they share is one :class:`~openrtc.dispatcher.context.DispatcherContext`
(each attribute with one writer). The counts are kept once, in the metrics;
:attr:`Dispatcher.stats` reads their totals.

A job naming an unknown agent is accepted, dead-lettered (once, even with
several dispatchers) and immediately failed with the routing error, so LiveKit
records the error and offers the job to nobody else (docs/dispatcher.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskStatus
from livekit.protocol import agent as proto

from openrtc.agents.registry import AgentPool
from openrtc.dispatcher.admission import AdmissionPolicy
from openrtc.dispatcher.assignment import AssignmentDesk
from openrtc.dispatcher.availability import AvailabilityDesk
from openrtc.dispatcher.context import DispatcherContext, logger
from openrtc.dispatcher.counters import DispatcherStats, refresh_gauges
from openrtc.dispatcher.enqueuer import BatchEnqueuer
from openrtc.dispatcher.leader import ReconcileLoop
from openrtc.dispatcher.ledger import JobLedger
from openrtc.dispatcher.link import LiveKitLink
from openrtc.dispatcher.livekit_protocol import AgentSocket
from openrtc.dispatcher.presence import OFFER_TTL, MembershipKeeper
from openrtc.dispatcher.reconciler import Reconciler
from openrtc.dispatcher.relay import StatusRelay
from openrtc.errors import ConfigError
from openrtc.ops.http import OpsServer, ops_server, serving
from openrtc.ops.logs import log_context
from openrtc.ops.metrics import DispatcherMetrics
from openrtc.settings import DispatcherSettings, redact_url
from openrtc.store.membership import LoadView, Presence
from openrtc.store.reconcile import LeaderLease
from openrtc.store.redis_access import check_redis_access
from openrtc.store.streams import RedisClient, StreamStore
from openrtc.wire.messages import AGENT_ATTRIBUTE
from openrtc.wire.signing import log_signing

__all__ = ["AGENT_ATTRIBUTE", "OFFER_TTL", "Dispatcher", "DispatcherStats"]


class Dispatcher:
    """Registers with LiveKit and publishes each routed job to its agent's stream.

    Args:
        settings: connection and policy settings.
        pool: the registered agents (routing order is registration order).
        redis: an existing client to use (tests, benchmarks); by default one is
            made from ``settings.redis_url`` and closed on exit.
        clock: time source for timestamps (tests).
    """

    def __init__(
        self,
        settings: DispatcherSettings,
        pool: AgentPool,
        *,
        redis: RedisClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(pool) == 0:
            raise ConfigError("No agents are registered in the pool.")
        self.settings = settings
        self.pool = pool
        self.store = StreamStore.for_service(
            settings,
            settings.dispatcher_id,
            redis=redis,
            wait_replicas=settings.wait_replicas,
            wait_timeout=settings.wait_timeout,
        )
        self.keys = self.store.keys
        self.metrics = DispatcherMetrics()
        if pool.router is not None:
            self.metrics.watch_router(pool.router)
        self._ctx = ctx = _context(settings, pool, self.store, self.metrics, clock)
        self.assignments = AssignmentDesk(ctx)
        self.availability = AvailabilityDesk(ctx, self.assignments.dead_letter_unknown)
        self.relay = StatusRelay(ctx)
        self.membership = MembershipKeeper(ctx, self.assignments.settle_unsure)
        self.link = LiveKitLink(
            ctx, self.availability.answer, self.assignments.assign, self.relay.terminate
        )
        self.reconciling = _reconcile_loop(ctx)
        self._stop = anyio.Event()
        #: The /healthz, /readyz and /metrics server; ``None`` when off.
        self.http: OpsServer | None = ops_server(
            settings, self.metrics, readiness=self.readiness, refresh=self._refresh_metrics
        )

    # -- what tests, benchmarks and the CLI read -------------------------------

    @property
    def stats(self) -> DispatcherStats:
        """Counters since start: a snapshot of the metrics' totals."""
        return DispatcherStats.read(self.metrics, reconcile_unroutable=self.reconciling.unroutable)

    @property
    def jobs(self) -> JobLedger:
        """The jobs this dispatcher knows, by state."""
        return self._ctx.jobs

    @property
    def view(self) -> LoadView:
        """Agents' loads and Redis's health, refreshed with each heartbeat."""
        return self._ctx.view

    @property
    def policy(self) -> AdmissionPolicy:
        """Whether an offer is accepted, and the load reported to LiveKit."""
        return self._ctx.policy

    @property
    def reconciler(self) -> Reconciler:
        """The reconciler's passes (run by the lease holder only)."""
        return self.reconciling.reconciler

    @property
    def registered(self) -> anyio.Event:
        """Set once the first registration with LiveKit succeeded."""
        return self.link.registered

    @property
    def livekit_worker_id(self) -> str | None:
        """The id LiveKit gave the current registration, if connected."""
        socket = self._ctx.socket
        return socket.worker_id if socket else None

    @property
    def draining(self) -> bool:
        """True once a stop was requested: new jobs are refused."""
        return self._ctx.draining

    @property
    def _enqueuer(self) -> BatchEnqueuer:
        # The answer-path benchmark (bench/answer_path.py) swaps its submit.
        return self.assignments.enqueuer

    def _answer(self, request: proto.AvailabilityRequest) -> proto.WorkerMessage:
        # bench/answer_path.py times the answer path through this name.
        return self.availability.answer(request)

    def _on_assignment(self, socket: AgentSocket, assignment: proto.JobAssignment) -> None:
        # bench/answer_path.py times the assignment path through this name.
        self.assignments.assign(socket, assignment)

    def request_stop(self) -> None:
        """Begin a graceful stop: refuse new jobs, flush in-flight ones, unregister."""
        self._stop.set()

    def readiness(self) -> str | None:
        """``None`` when ready for jobs, else why not (one line, for ``/readyz``)."""
        ctx = self._ctx
        if ctx.draining or self._stop.is_set():
            return "draining: refusing new jobs"
        if ctx.socket is None:
            state = ctx.livekit_state
            why = f"{state.state}: {state.detail}" if state.state else "connecting"
            return f"not registered with LiveKit ({why})"
        if not ctx.view.redis_ok:
            redis_state = ctx.redis_state
            detail = redis_state.detail if redis_state.state == "unreachable" else ""
            return f"Redis unreachable{f': {detail}' if detail else ''}"
        return None

    async def _refresh_metrics(self) -> None:
        await refresh_gauges(self._ctx)

    # -- lifecycle -----------------------------------------------------------

    def _parts(self) -> list[Callable[..., Coroutine[Any, Any, None]]]:
        """The parts' ``run``, in start order (each started before the next)."""
        parts: list[Callable[..., Coroutine[Any, Any, None]]] = [
            self._ctx.handlers.run,  # per-job tasks: dead letters, failures, terminations
            self.membership.run,  # heartbeat and the agents' loads (a first refresh)
            self.assignments.enqueuer.run,  # assignments -> streams, in batches
            self.relay.run,  # workers' statuses -> LiveKit
            self.link.run,  # the /agent socket: offers, assignments, terminations
        ]
        if self.settings.reconcile_interval > 0:
            parts.append(self.reconciling.run)  # the lease holder's passes over the rooms
        return parts

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_stop` (or cancellation)."""
        # Every line of this dispatcher (its tasks inherit it) names it.
        with log_context(dispatcher_id=self.settings.dispatcher_id):
            async with serving(self.http):
                await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        settings = self.settings
        logger.info(
            "dispatcher %s starting: agents %s, LiveKit %s, Redis %s, namespace %r, "
            "registering as agent name %r, when no worker: %s",
            settings.dispatcher_id,
            ", ".join(self._ctx.table.names),
            settings.livekit.url,
            redact_url(settings.redis_url),
            settings.namespace,
            settings.agent_name,
            settings.when_no_worker,
        )
        log_signing(logger, settings.signing)
        if self._ctx.table.router is not None:
            logger.info(
                "custom router %s runs before the routing chain", self._ctx.table.router.label
            )
        try:
            # Before LiveKit: a dispatcher Redis refuses must not take calls.
            await check_redis_access(self.store.redis, settings.redis_url, logger)
            async with anyio.create_task_group() as tg:
                for part in self._parts():
                    await tg.start(part)
                task_status.started()
                await self._stop.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.membership.leave()
                await self.reconciling.aclose()
                if self.store.owns_redis:
                    await self.store.redis.aclose()
            logger.info("dispatcher %s stopped", settings.dispatcher_id)

    async def _drain(self) -> None:
        self._ctx.draining = True
        logger.info("draining: refusing new jobs, flushing %d in flight", self._ctx.inflight.count)
        await self.link.close()


def _context(
    settings: DispatcherSettings,
    pool: AgentPool,
    store: StreamStore,
    metrics: DispatcherMetrics,
    clock: Callable[[], float],
) -> DispatcherContext:
    table = pool.routing_table
    presence = Presence(
        store.redis,
        store.keys.dispatchers,
        store.keys.dispatcher(settings.dispatcher_id),
        settings.dispatcher_id,
        settings.membership_ttl,
    )
    return DispatcherContext(
        settings=settings,
        keys=store.keys,
        table=table,
        policy=AdmissionPolicy(settings.when_no_worker, settings.max_backlog),
        clock=clock,
        store=store,
        metrics=metrics,
        view=LoadView(presence, store.keys, table.names, store.ensure_group),
    )


def _reconcile_loop(ctx: DispatcherContext) -> ReconcileLoop:
    settings = ctx.settings
    reconciler = Reconciler(
        settings.livekit,
        ctx.redis,
        ctx.keys,
        ctx.table,
        settings.agent_name,
        settings.reconcile_grace,
    )
    # One dispatcher at a time reconciles: the holder of this lease.
    lease = LeaderLease(
        ctx.redis,
        ctx.keys.reconciler_lease,
        settings.dispatcher_id,
        ttl=max(3 * settings.reconcile_interval, 2.0),
    )
    return ReconcileLoop(
        reconciler, lease, settings.reconcile_interval, ctx.metrics, ctx.is_draining
    )

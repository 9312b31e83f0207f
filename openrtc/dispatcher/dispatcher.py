"""The dispatcher: LiveKit's agent-worker protocol in, per-agent Redis streams out.

One process, one readable set of loops under one task group:

- **livekit**: keep one registered ``/agent`` socket (reconnect with capped,
  jittered exponential backoff); answer each ``AvailabilityRequest`` at once
  from routing plus the cached membership view (no I/O on the answer path);
  hand each ``JobAssignment`` to the enqueuer; relay ``JobTermination`` to the
  job's workers; report load.
- **enqueue**: batch every assignment that arrives together into one Redis
  pipeline (:mod:`openrtc.dispatcher.enqueuer`; one Lua script per job, de-duplicated by
  job id).
- **status**: relay workers' status events for jobs this socket holds as
  ``UpdateJobStatus``.
- **membership**: heartbeat, and refresh each agent's workers and backlog
  (:class:`~openrtc.store.membership.LoadView`, read by admission without I/O).

Which jobs it knows, from its answer to their end, is the
:class:`~openrtc.dispatcher.ledger.JobLedger`'s; whether to accept one is
:mod:`openrtc.dispatcher.admission`'s; this class is the coordination with LiveKit.

A job naming an unknown agent is accepted, dead-lettered (once, even with
several dispatchers) and immediately failed with the routing error, so LiveKit
records the error and offers the job to nobody else (docs/dispatcher.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import aiohttp
import anyio
from anyio.abc import TaskGroup, TaskStatus
from livekit.protocol import agent as proto

from openrtc.agents.registry import AgentPool
from openrtc.agents.routing import Route, UnknownAgentError, resolve_agent
from openrtc.dispatcher.admission import AdmissionPolicy
from openrtc.dispatcher.enqueuer import BatchEnqueuer, InFlight, Pending
from openrtc.dispatcher.ledger import JobLedger, Offer
from openrtc.dispatcher.livekit_protocol import (
    AgentSocket,
    ProtocolError,
    SocketClosed,
    open_agent_socket,
)
from openrtc.dispatcher.reconciler import LeaderLease, LeaseLost, Reconciler
from openrtc.errors import ConfigError
from openrtc.ops import tracing
from openrtc.ops.http import OpsServer, ops_server, serving
from openrtc.ops.logs import add_log_context, log_context
from openrtc.ops.metrics import DispatcherMetrics
from openrtc.ops.monitor import read_status
from openrtc.settings import DispatcherSettings, redact_url
from openrtc.store.membership import LoadView, Presence
from openrtc.store.redis_access import check_redis_access
from openrtc.store.redis_health import check_durability
from openrtc.store.streams import (
    REDIS_DOWN,
    EnqueueResult,
    RedisClient,
    StreamStore,
    connect_redis,
    service_keys,
)
from openrtc.supervision import StateLog, backoff_delay, describe, unwrap_group
from openrtc.wire.messages import (
    AGENT_ATTRIBUTE,
    REQUESTED_AGENT_FIELD,
    DeadReason,
    JobMessage,
    JobStatus,
    MalformedEntry,
    StatusEvent,
    accept_arguments,
    agent_identity,
    participant_attributes,
)
from openrtc.wire.signing import log_signing

__all__ = ["AGENT_ATTRIBUTE", "Dispatcher", "DispatcherStats"]

logger = logging.getLogger("openrtc.dispatcher")

#: An accepted job whose assignment has not arrived after this long is dropped
#: from memory (LiveKit gave up on it: our answer was late or the socket died).
OFFER_TTL: Final = 15.0

_STATUS_TO_PROTO: Final = {
    JobStatus.RUNNING: proto.JobStatus.JS_RUNNING,
    JobStatus.SUCCESS: proto.JobStatus.JS_SUCCESS,
    JobStatus.FAILED: proto.JobStatus.JS_FAILED,
}
_CONNECTION_ERRORS: Final = (
    SocketClosed,
    ProtocolError,
    OSError,
    aiohttp.ClientError,
    TimeoutError,
)


@dataclass(slots=True)
class DispatcherStats:
    """Counters since start, read by the benchmarks and the tests.

    Operators read the same counts, with labels, on ``/metrics``
    (:class:`~openrtc.ops.metrics.DispatcherMetrics`).
    """

    offered: int = 0
    accepted: int = 0
    rejected: int = 0
    unknown_agent: int = 0
    enqueued: int = 0
    duplicates: int = 0
    enqueue_failed: int = 0
    statuses_relayed: int = 0
    terminations: int = 0
    reconnects: int = 0
    #: Reconciler passes this dispatcher ran (as the lease holder) and failed.
    reconcile_passes: int = 0
    reconcile_errors: int = 0
    #: Rooms with a caller and no agent that the reconciler dispatched again.
    reconciled: int = 0
    #: Such rooms left alone: their routing names an agent that is not registered.
    reconcile_unroutable: int = 0
    #: 1 while this dispatcher holds the reconciler lease.
    reconcile_leader: int = 0

    def __str__(self) -> str:
        """The counts that are not zero, for people: ``offered 5, accepted 4, ...``."""
        counts = asdict(self).items()
        named = [f"{name.replace('_', ' ')} {value}" for name, value in counts if value]
        return ", ".join(named) or "nothing yet"


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
        self.keys = service_keys(
            settings.namespace, settings.redis_url, cluster_keys=settings.cluster_keys
        )
        self.policy = AdmissionPolicy(settings.when_no_worker, settings.max_backlog)
        self.stats = DispatcherStats()
        self.metrics = DispatcherMetrics()
        self._table = pool.routing_table
        self._clock = clock
        self._own_redis = redis is None
        self._redis = redis or connect_redis(
            settings.redis_url, client_name=f"openrtc:{settings.dispatcher_id}"
        )
        self.store = StreamStore(
            self._redis,
            self.keys,
            dedup_ttl=settings.dedup_ttl,
            wait_replicas=settings.wait_replicas,
            wait_timeout=settings.wait_timeout,
            dead_letter_maxlen=settings.dead_letter_maxlen,
            signing=settings.signing,
        )
        self._socket: AgentSocket | None = None
        #: The jobs this dispatcher knows, by state.
        self.jobs = JobLedger()
        #: What a drain waits for: jobs on their way to RedisClient, handler tasks.
        self._inflight = InFlight()
        self._enqueuer = BatchEnqueuer(
            self.store, self._inflight, self._complete, self._enqueue_failed
        )
        #: Agents' loads and Redis's health, refreshed with each heartbeat.
        self.view = LoadView(
            Presence(
                self._redis,
                self.keys.dispatchers,
                self.keys.dispatcher(settings.dispatcher_id),
                settings.dispatcher_id,
                settings.membership_ttl,
            ),
            self.keys,
            self._table.names,
            self.store.ensure_group,
        )
        self._durability_checked = False
        self._draining = False
        self._stop = anyio.Event()
        self._registered = anyio.Event()
        self._livekit_state = StateLog("LiveKit connection", logger)
        self._redis_state = StateLog("Redis", logger)
        self._tg: TaskGroup | None = None
        # One dispatcher at a time reconciles: the holder of this lease.
        self._lease = LeaderLease(
            self._redis,
            self.keys.reconciler_lease,
            settings.dispatcher_id,
            ttl=max(3 * settings.reconcile_interval, 2.0),
        )
        self.reconciler = Reconciler(
            settings.livekit,
            self._redis,
            self.keys,
            self._table,
            settings.agent_name,
            settings.reconcile_grace,
        )
        #: The /healthz, /readyz and /metrics server; ``None`` when off.
        self.http: OpsServer | None = ops_server(
            settings, self.metrics, readiness=self.readiness, refresh=self._refresh_metrics
        )

    # -- lifecycle -----------------------------------------------------------

    @property
    def registered(self) -> anyio.Event:
        """Set once the first registration with LiveKit succeeded."""
        return self._registered

    @property
    def livekit_worker_id(self) -> str | None:
        """The id LiveKit gave the current registration, if connected."""
        return self._socket.worker_id if self._socket else None

    @property
    def draining(self) -> bool:
        """True once a stop was requested: new jobs are refused."""
        return self._draining

    def _is_draining(self) -> bool:
        # A call, not an attribute read, so that type narrowing does not assume
        # the flag cannot change while the loop awaits.
        return self._draining

    def request_stop(self) -> None:
        """Begin a graceful stop: refuse new jobs, flush in-flight ones, unregister."""
        self._stop.set()

    def readiness(self) -> str | None:
        """``None`` when ready for jobs, else why not (one line, for ``/readyz``)."""
        if self._draining or self._stop.is_set():
            return "draining: refusing new jobs"
        if self._socket is None:
            state = self._livekit_state
            why = f"{state.state}: {state.detail}" if state.state else "connecting"
            return f"not registered with LiveKit ({why})"
        if not self.view.redis_ok:
            detail = self._redis_state.detail if self._redis_state.state == "unreachable" else ""
            return f"Redis unreachable{f': {detail}' if detail else ''}"
        return None

    async def _refresh_metrics(self) -> None:
        """Set the gauges read at scrape time: connections, and each agent's queue from Redis."""
        m = self.metrics
        m.livekit_connected.set(self._socket is not None)
        m.draining.set(self._draining)
        m.redis_connected.set(self.view.redis_ok)
        try:
            status = await read_status(self._redis, self.keys, self._table.names)
        except Exception:
            # Stale queue figures would mislead an alert: none rather than old ones.
            for gauge in m.queue_gauges:
                gauge.clear()
            m.redis_connected.set(0)
            raise
        for agent in status.agents:
            m.jobs_waiting.labels(agent.agent).set(agent.backlog)
            m.jobs_pending.labels(agent.agent).set(agent.pending)
            m.oldest_waiting.labels(agent.agent).set(agent.oldest_waiting_age or 0.0)
            m.live_workers.labels(agent.agent).set(len(agent.workers))
            m.agent_capacity.labels(agent.agent).set(agent.capacity)
            m.agent_running.labels(agent.agent).set(agent.running)
        m.dead_letter_backlog.set(status.dead_letters)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_stop` (or cancellation)."""
        # Every line of this dispatcher (its tasks inherit it) names it.
        with log_context(dispatcher_id=self.settings.dispatcher_id):
            async with serving(self.http):
                await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        logger.info(
            "dispatcher %s starting: agents %s, LiveKit %s, Redis %s, namespace %r, "
            "registering as agent name %r, when no worker: %s",
            self.settings.dispatcher_id,
            ", ".join(self._table.names),
            self.settings.livekit.url,
            redact_url(self.settings.redis_url),
            self.settings.namespace,
            self.settings.agent_name,
            self.settings.when_no_worker,
        )
        log_signing(logger, self.settings.signing)
        try:
            # Before LiveKit: a dispatcher Redis refuses must not take calls.
            await check_redis_access(self._redis, self.settings.redis_url, logger)
            async with aiohttp.ClientSession() as http, anyio.create_task_group() as tg:
                self._tg = tg
                await self._refresh_membership()
                tg.start_soon(self._membership_loop)
                tg.start_soon(self._enqueuer.run)
                tg.start_soon(self._status_loop)
                tg.start_soon(self._livekit_loop, http)
                if self.settings.reconcile_interval > 0:
                    tg.start_soon(self._reconcile_loop)
                task_status.started()
                await self._stop.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                with contextlib.suppress(*REDIS_DOWN):
                    await self.view.presence.leave()
                with contextlib.suppress(*REDIS_DOWN):
                    await self._lease.release()
                await self.reconciler.aclose()
                if self._own_redis:
                    await self._redis.aclose()
            logger.info("dispatcher %s stopped", self.settings.dispatcher_id)

    async def _drain(self) -> None:
        self._draining = True
        logger.info("draining: refusing new jobs, flushing %d in flight", self._inflight.count)
        socket = self._socket
        if socket is not None:
            await self._send_quietly(
                socket,
                proto.WorkerMessage(
                    update_worker=proto.UpdateWorkerStatus(
                        status=proto.WorkerStatus.WS_FULL,
                        draining=True,
                        job_count=self.jobs.held_count,
                    )
                ),
            )
        with anyio.move_on_after(self.settings.enqueue_timeout + 1):
            await self._inflight.wait_idle()
        if socket is not None:
            await socket.close()

    # -- LiveKit -------------------------------------------------------------

    async def _livekit_loop(self, http: aiohttp.ClientSession) -> None:
        attempt = 0
        while not self._is_draining():
            connected_at = None
            try:
                async with open_agent_socket(
                    http, self.settings.livekit, agent_name=self.settings.agent_name
                ) as socket:
                    connected_at = time.monotonic()
                    self._socket = socket
                    self._livekit_state.set(
                        "registered", f"worker id {socket.worker_id} at {self.settings.livekit.url}"
                    )
                    self._registered.set()
                    await self._serve_socket(socket)
            except _CONNECTION_ERRORS as exc:
                if self._is_draining():
                    break
                self._livekit_state.set("lost", describe(exc), level=logging.WARNING)
            finally:
                self._socket = None
                forgotten = self.jobs.socket_dropped()
                if forgotten is not None:
                    logger.info(
                        "LiveKit forgets the %d jobs of a dropped socket; running calls go on",
                        forgotten,
                    )
            if self._is_draining():
                break
            if connected_at is not None and time.monotonic() - connected_at > 30:
                attempt = 0
            delay = backoff_delay(
                attempt, self.settings.reconnect_initial, self.settings.reconnect_max
            )
            attempt += 1
            self.stats.reconnects += 1
            self.metrics.livekit_reconnects.inc()
            logger.debug("reconnecting to LiveKit in %.2fs (attempt %d)", delay, attempt)
            await anyio.sleep(delay)

    async def _serve_socket(self, socket: AgentSocket) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report_load_loop, socket)
                await self._receive(socket)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    async def _receive(self, socket: AgentSocket) -> None:
        async for message in socket.messages():
            kind = message.WhichOneof("message")
            if kind == "availability":
                # Quietly: when the socket has just died, the frames already
                # received behind this one (assignments among them) are still
                # handled; the iterator ends with SocketClosed after them.
                await self._send_quietly(socket, self._answer(message.availability))
            elif kind == "assignment":
                self._on_assignment(socket, message.assignment)
            elif kind == "termination":
                with log_context(job_id=message.termination.job_id):
                    self._start(self._on_termination, message.termination.job_id)
            elif kind in ("pong", "register"):
                continue
            elif kind == "go_away":
                # The server is going down: re-register (with backoff) rather
                # than wait for the socket to be cut.
                raise SocketClosed("server sent go_away")
            else:
                logger.warning("ignoring unexpected server message %r", kind)

    def _start(self, func: Callable[..., Any], *args: Any) -> None:
        # Handlers run in the dispatcher's task group, not the connection's: an
        # enqueue that is under way when the socket drops still completes, and
        # the caller is still served.
        assert self._tg is not None
        self._inflight.add()
        self._tg.start_soon(self._tracked, func, *args)

    async def _tracked(self, func: Callable[..., Any], *args: Any) -> None:
        try:
            await func(*args)
        except Exception:
            logger.exception("handler %s failed", getattr(func, "__name__", func))
        finally:
            self._inflight.done()

    def _answer(self, request: proto.AvailabilityRequest) -> proto.WorkerMessage:
        """The availability answer: routing and the cached view only, no I/O."""
        job = request.job
        with log_context(job_id=job.id, room=job.room.name):
            if not tracing.enabled:
                return self._decide(request, None)
            # The call's trace starts here (docs/operating.md, "Logs and traces").
            span = tracing.start_span(
                "openrtc.dispatcher.availability",
                attributes={tracing.JOB_ID: job.id, tracing.ROOM: job.room.name},
            )
            try:
                response = self._decide(request, span)
                span.set_attribute("openrtc.available", response.availability.available)
            finally:
                span.end()
            return response

    def _decide(self, request: proto.AvailabilityRequest, span: Any) -> proto.WorkerMessage:
        received = self._clock()
        job = request.job
        self.stats.offered += 1
        response = proto.WorkerMessage()
        answer = response.availability
        answer.job_id = job.id
        if self._draining:
            answer.available = False
            self.stats.rejected += 1
            self.metrics.availability_answers.labels("rejected").inc()
            return response
        try:
            route: Route | None = resolve_agent(job, self._table)
            error = None
        except UnknownAgentError as exc:
            route, error = None, exc
        if span is not None:
            _trace_route(span, route, error)
        if route is not None:
            add_log_context(agent=route.agent)
            admission = self.policy.decide(
                self.view.loads.get(route.agent), redis_ok=self.view.redis_ok
            )
            if not admission.accept:
                self.stats.rejected += 1
                self.metrics.availability_answers.labels("rejected").inc()
                logger.warning(
                    "job %s (room %s) for agent '%s' answered unavailable: %s",
                    job.id,
                    job.room.name,
                    route.agent,
                    admission.reason,
                )
                answer.available = False
                return response
            name = route.agent
        else:
            assert error is not None
            self.stats.unknown_agent += 1
            self.metrics.unknown_agents.inc()
            self.metrics.availability_answers.labels("unknown_agent").inc()
            logger.error(
                "job %s (room %s): %s The job goes to the dead letters.",
                job.id,
                job.room.name,
                error,
            )
            name = f"unknown agent {error.agent}"[:64]
        offer = Offer(job, route, error, received, self._clock(), span)
        if error is not None:
            self._start(self._dead_letter_unknown, offer)
        self.jobs.offer(offer)
        answer.available = True
        answer.participant_identity = agent_identity(job.id)
        answer.participant_name = name
        if route is not None:
            answer.participant_attributes.update(participant_attributes(route.agent))
            self.stats.accepted += 1
            self.metrics.availability_answers.labels("accepted").inc()
        return response

    def _on_assignment(self, socket: AgentSocket, assignment: proto.JobAssignment) -> None:
        """Hand an assigned job to the enqueue loop: no task and no await per job."""
        job = assignment.job
        offer = self.jobs.take_offer(job.id)
        if offer is None or offer.error is not None:
            # The unusual paths log and start tasks: they get the job's log
            # context (the usual one logs nothing here, and pays nothing).
            with log_context(job_id=job.id, room=job.room.name):
                if offer is None:
                    # Assigned without an offer we remember (e.g. across a
                    # reconnect): route it again from what the assignment carries.
                    now = self._clock()
                    try:
                        offer = Offer(job, resolve_agent(job, self._table), None, now, now)
                    except UnknownAgentError as exc:
                        offer = Offer(job, None, exc, now, now)
                        self._start(self._dead_letter_unknown, offer)
                if offer.error is not None:
                    self._start(self._fail, socket, job.id, str(offer.error))
                    return
        assert offer.route is not None
        span = traceparent = None
        if tracing.enabled:
            span = tracing.start_span(
                "openrtc.dispatcher.enqueue",
                parent=offer.span,
                attributes={
                    tracing.JOB_ID: job.id,
                    tracing.ROOM: job.room.name,
                    tracing.AGENT: offer.route.agent,
                },
            )
            traceparent = tracing.traceparent_of(span)
        pending = Pending(
            self._job_message(job, offer, traceparent or ""),
            deadline=time.monotonic() + self.settings.enqueue_timeout,
            socket=socket,
            route=offer.route,
            span=span,
        )
        self.jobs.assign(job.id, pending.message.agent)
        self._enqueuer.submit(pending)

    def _complete(
        self, pending: Pending, result: EnqueueResult | None, error: BaseException | None
    ) -> None:
        """Account for one job the enqueuer wrote (or could not write)."""
        message = pending.message
        with log_context(job_id=message.job_id, room=message.room, agent=message.agent):
            self._completed(pending, result, error)
        if pending.span is not None:
            _trace_enqueue(pending.span, result, error)

    def _completed(
        self, pending: Pending, result: EnqueueResult | None, error: BaseException | None
    ) -> None:
        message = pending.message
        if result is None:
            self.stats.enqueue_failed += 1
            self.metrics.enqueue_failures.labels(message.agent).inc()
            reason = describe(error) if error else "timed out"
            text = (
                f"openrtc: could not enqueue job for agent '{message.agent}' "
                f"(Redis: {reason}); the call is not served."
            )
            logger.error("job %s (room %s): %s", message.job_id, message.room, text)
            self._start(self._fail, pending.socket, message.job_id, text)
            # The write may still have landed (a lost reply, a Redis that
            # ran it late): once Redis answers, the job is marked
            # terminated, so no worker joins a call LiveKit has failed.
            self.jobs.not_written(message.job_id, message.agent)
            return
        if result.outcome == "duplicate":
            self.stats.duplicates += 1
            self.metrics.duplicates.inc()
            logger.warning(
                "job %s already enqueued (entry %s); not enqueued again",
                message.job_id,
                result.entry_id,
            )
        else:
            self.stats.enqueued += 1
            self.metrics.jobs_routed.labels(message.agent, str(pending.route.step)).inc()
            # The assignment arrived one enqueue timeout before the deadline.
            submitted = pending.deadline - self.settings.enqueue_timeout
            self.metrics.enqueue_latency.labels(message.agent).observe(time.monotonic() - submitted)
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "job %s (room %s) -> %s (entry %s, step %d: %s)",
                    message.job_id,
                    message.room,
                    self.keys.jobs(message.agent),
                    result.entry_id,
                    pending.route.step,
                    pending.route.source,
                )
        self.jobs.written(message.job_id, message.agent, hold=pending.socket is self._socket)

    def _job_message(self, job: proto.Job, offer: Offer, traceparent: str = "") -> JobMessage:
        """The job's stream entry; for an unknown agent, the same with no agent.

        The room snapshot carries the room's TURN password and the job its
        server-side state: neither belongs at rest in a stream. The assignment
        is ours alone, so they are cleared in place.
        """
        stored = _without_secrets(job)
        if offer.route is not None:
            agent, step, source = offer.route.agent, offer.route.step, offer.route.source
        else:
            assert offer.error is not None
            agent, step, source = "", offer.error.step, offer.error.source
        return JobMessage(
            job=stored,
            agent=agent,
            accept=accept_arguments(job.id, agent),
            livekit_url=self.settings.livekit.ws_url,
            step=step,
            source=source,
            dispatcher_id=self.settings.dispatcher_id,
            received_at=offer.received_at,
            routed_at=offer.routed_at,
            traceparent=traceparent,
        )

    async def _dead_letter_unknown(self, offer: Offer) -> None:
        """Dead-letter a job for an unknown agent as a whole job entry, for no agent.

        Built by :meth:`_job_message` like every entry, so ``openrtc dlq
        replay --agent X`` makes it a job for X that a worker serves; the name
        the job asked for is kept beside it (bounded: it is user input).
        """
        error, job = offer.error, offer.job
        assert error is not None
        copy = proto.Job()
        copy.CopyFrom(job)  # the job is still in use: its assignment may follow
        message = self._job_message(copy, offer)
        original = message.encode()
        # Already bounded: UnknownAgentError quotes at most a name's longest form.
        original[REQUESTED_AGENT_FIELD] = error.agent.encode(errors="replace")
        try:
            with anyio.fail_after(self.settings.enqueue_timeout):
                entry = await self.store.dead_letter(
                    DeadReason.UNKNOWN_AGENT,
                    str(error),
                    original=original,
                    origin="dispatcher",
                    once_for=job.id,
                )
        except REDIS_DOWN as exc:
            logger.error(
                "job %s: could not write its dead letter (%s): %s", job.id, describe(exc), error
            )
            return
        if entry is not None:
            self.metrics.dead_letters.labels("", DeadReason.UNKNOWN_AGENT.value).inc()
            logger.error("job %s dead-lettered as %s (%s)", job.id, entry, self.keys.dead_letter)

    async def _fail(self, socket: AgentSocket, job_id: str, error: str) -> None:
        await self._send_quietly(
            socket,
            proto.WorkerMessage(
                update_job=proto.UpdateJobStatus(
                    job_id=job_id, status=proto.JobStatus.JS_FAILED, error=error
                )
            ),
        )

    async def _send_quietly(self, socket: AgentSocket, message: proto.WorkerMessage) -> None:
        try:
            await socket.send(message)
        except SocketClosed:
            logger.debug("socket closed before %s could be sent", message.WhichOneof("message"))

    async def _on_termination(self, job_id: str) -> None:
        agent = self.jobs.terminated(job_id)
        if agent is None:
            logger.debug("termination for job %s that this dispatcher does not hold", job_id)
            return
        self.stats.terminations += 1
        self.metrics.terminations.inc()
        try:
            with anyio.fail_after(self.settings.enqueue_timeout):
                await self.store.publish_termination(agent, job_id, "livekit")
        except REDIS_DOWN as exc:
            logger.error("job %s: termination not delivered to workers: %s", job_id, describe(exc))
            return
        logger.info("job %s terminated by LiveKit; told %s workers", job_id, agent)

    async def _report_load_loop(self, socket: AgentSocket) -> None:
        while True:
            load = self.policy.reported_load(self.view.loads)
            status = (
                proto.WorkerStatus.WS_FULL if self._draining else proto.WorkerStatus.WS_AVAILABLE
            )
            # Quietly: a dead socket is noticed by the receive loop, which
            # first handles what was already received.
            await self._send_quietly(
                socket,
                proto.WorkerMessage(
                    update_worker=proto.UpdateWorkerStatus(
                        status=status,
                        load=load,
                        job_count=self.jobs.held_count,
                        draining=self._draining,
                    )
                ),
            )
            await anyio.sleep(self.settings.load_interval)

    # -- Redis ---------------------------------------------------------------

    def _enqueue_failed(self, exc: BaseException) -> None:
        if isinstance(exc, REDIS_DOWN):
            # Answer the next offers unavailable right away, not only after
            # the next membership refresh notices.
            self.view.redis_ok = False
        self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)

    async def _status_loop(self) -> None:
        key = self.keys.status(self.settings.dispatcher_id)
        last_id = b"0-0"
        while True:
            try:
                replies: Any = await self._redis.xread({key: last_id}, count=256, block=1000)
            except REDIS_DOWN as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(1)
                continue
            if not replies:
                continue
            for entry_id, fields in replies[0][1]:
                last_id = entry_id
                try:
                    event = StatusEvent.decode(fields)
                except MalformedEntry as exc:
                    logger.warning("ignoring malformed status event %s: %s", entry_id, exc)
                    continue
                try:
                    # The room is not known here; the agent is, for a held job.
                    agent = self.jobs.held.get(event.job_id, "")
                    with log_context(job_id=event.job_id, agent=agent):
                        await self._relay(event)
                except Exception:
                    # Whatever one event holds, it must not stop the loop that
                    # relays every other job's status (and the dispatcher).
                    logger.exception("status event %s not relayed", entry_id)
            with contextlib.suppress(*REDIS_DOWN):
                await self._redis.xtrim(key, minid=last_id)

    async def _relay(self, event: StatusEvent) -> None:
        socket = self._socket
        if socket is None or not self.jobs.is_held(event.job_id):
            logger.debug("status %s for job %s not held here: dropped", event.status, event.job_id)
            return
        if event.status in (JobStatus.SUCCESS, JobStatus.FAILED):
            self.jobs.ended(event.job_id)
        self.stats.statuses_relayed += 1
        self.metrics.statuses_relayed.labels(event.status.value).inc()
        logger.info(
            "job %s %s%s",
            event.job_id,
            event.status.value,
            f": {event.error}" if event.error else "",
        )
        await self._send_quietly(
            socket,
            proto.WorkerMessage(
                update_job=proto.UpdateJobStatus(
                    job_id=event.job_id, status=_STATUS_TO_PROTO[event.status], error=event.error
                )
            ),
        )

    async def _membership_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_interval)
            await self._refresh_membership()
            for job_id in self.jobs.expire_offers(self._clock() - OFFER_TTL):
                logger.warning("job %s was accepted but never assigned by LiveKit", job_id)

    async def _refresh_membership(self) -> None:
        try:
            with anyio.fail_after(max(1.0, self.settings.heartbeat_interval * 2)):
                await self.view.refresh(
                    {
                        "livekit_worker_id": self.livekit_worker_id or "",
                        "agents": ",".join(self._table.names),
                        "agent_name": self.settings.agent_name,
                        "held_jobs": self.jobs.held_count,
                        "draining": int(self._draining),
                    }
                )
        except REDIS_DOWN as exc:
            self.view.lost()
            self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
            return
        self._redis_state.set("connected", redact_url(self.settings.redis_url))
        await self._settle_unsure()

    async def _reconcile_loop(self) -> None:
        """Hold or contend for the reconciler lease; as its holder, run a pass each interval."""
        while not self._is_draining():
            await anyio.sleep(self.settings.reconcile_interval)
            if self._is_draining():
                return
            was_leader = self._lease.held
            try:
                with anyio.fail_after(max(1.0, self.settings.reconcile_interval)):
                    leader = await self._lease.hold()
            except (*REDIS_DOWN, TimeoutError) as exc:
                # Without Redis the lease lapses: another dispatcher may take it.
                self._lease.held = leader = False
                logger.debug("reconciler lease not renewed: %s", describe(exc))
            if leader != was_leader:
                logger.info(
                    "reconciler: %s",
                    "this dispatcher runs it now" if leader else "another dispatcher runs it",
                )
                self.reconciler.forget()
            self.stats.reconcile_leader = int(leader)
            self.metrics.reconcile_leader.set(int(leader))
            if not leader:
                continue
            try:
                counts = await self.reconciler.run_pass(self._lease)
            except LeaseLost as exc:
                self._lease.held = False
                self.stats.reconcile_leader = 0
                self.metrics.reconcile_leader.set(0)
                self.reconciler.forget()
                logger.warning("reconciler pass abandoned: %s", exc)
                continue
            except Exception as exc:  # LiveKit's API or Redis: the next pass retries
                self.stats.reconcile_errors += 1
                self.metrics.reconcile_passes.labels("failed").inc()
                logger.warning("reconciler pass failed: %s", describe(exc))
                continue
            self.stats.reconcile_passes += 1
            self.stats.reconciled += counts.dispatched
            self.metrics.reconcile_passes.labels("ok").inc()
            self.metrics.reconciled.inc(counts.dispatched)
            self.stats.reconcile_unroutable += counts.unroutable

    async def _settle_unsure(self) -> None:
        """Mark the jobs failed towards LiveKit whose enqueue may have landed anyway."""
        for job_id, agent in self.jobs.unsure_jobs():
            try:
                with anyio.fail_after(max(1.0, self.settings.heartbeat_interval * 2)):
                    await self.store.publish_termination(agent, job_id, "enqueue failed")
            except REDIS_DOWN:
                return  # next refresh
            self.jobs.settle(job_id)
            logger.info("job %s: marked terminated (its enqueue had failed)", job_id)
        if not self._durability_checked:
            self._durability_checked = True  # once: at start-up, when Redis first answers
            await check_durability(self._redis, logger)


def _trace_route(span: Any, route: Route | None, error: UnknownAgentError | None) -> None:
    """The routing result, on the availability span (a span of its own per job cost
    as much again as the answer: attributes say the same)."""
    if route is not None:
        span.set_attributes(
            {
                tracing.AGENT: route.agent,
                "openrtc.routing.step": route.step,
                "openrtc.routing.source": route.source,
            }
        )
    else:
        assert error is not None
        span.set_attributes(
            {
                "openrtc.routing.step": error.step,
                "openrtc.routing.source": error.source,
                "openrtc.routing.error": str(error),
            }
        )


def _trace_enqueue(span: Any, result: EnqueueResult | None, error: BaseException | None) -> None:
    if result is None:
        tracing.end_failed(span, describe(error) if error else "timed out")
        return
    span.set_attributes({"openrtc.entry_id": result.entry_id, "openrtc.outcome": result.outcome})
    span.end()


def _without_secrets(job: proto.Job) -> proto.Job:
    """``job`` (changed in place) without the room's TURN password and the server state.

    Neither belongs at rest in a stream or a dead letter.
    """
    job.room.ClearField("turn_password")
    job.ClearField("state")
    return job

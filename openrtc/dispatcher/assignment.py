"""The assignment desk: an assigned job becomes its agent's stream entry.

LiveKit assigns a job we answered available for; :meth:`AssignmentDesk.assign`
builds its entry and hands it to the :class:`~openrtc.dispatcher.enqueuer.BatchEnqueuer`
(no task and no await per job: the socket's receive loop calls it), and
:meth:`AssignmentDesk.completed` accounts for the write when the batch is
done. A job for an unknown agent is dead-lettered and failed here; a job
whose write failed is failed towards LiveKit and, once Redis answers,
marked terminated (:meth:`AssignmentDesk.settle_unsure`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from livekit.protocol import agent as proto

from openrtc.agents.routing import UnknownAgentError, resolve_agent
from openrtc.agents.tenants import resolve_tenant
from openrtc.dispatcher.context import DispatcherContext, fail_job, logger
from openrtc.dispatcher.enqueuer import BatchEnqueuer, Pending
from openrtc.dispatcher.ledger import Offer
from openrtc.dispatcher.livekit_protocol import AgentSocket
from openrtc.ops import tracing
from openrtc.ops.logs import add_log_context, log_context
from openrtc.store.streams import REDIS_DOWN, EnqueueResult
from openrtc.supervision import describe
from openrtc.wire.messages import (
    REQUESTED_AGENT_FIELD,
    DeadReason,
    JobMessage,
    accept_arguments,
)

__all__ = ["AssignmentDesk"]


class AssignmentDesk:
    """Assignments in, stream entries out (see the module docstring)."""

    def __init__(self, ctx: DispatcherContext) -> None:
        self._ctx = ctx
        #: Writes the entries in batches; reports each job to :meth:`completed`.
        self.enqueuer = BatchEnqueuer(ctx.store, ctx.inflight, self.completed, self._write_failed)

    def assign(self, socket: AgentSocket, assignment: proto.JobAssignment) -> None:
        """Hand an assigned job to the enqueue loop: no task and no await per job."""
        ctx = self._ctx
        job = assignment.job
        offer = ctx.jobs.take_offer(job.id)
        if offer is None or offer.error is not None:
            # The unusual paths log and start tasks: they get the job's log
            # context (the usual one logs nothing here, and pays nothing).
            with log_context(
                job_id=job.id, room=job.room.name, tenant=offer.tenant if offer else ""
            ):
                if offer is None:
                    # Assigned without an offer we remember (e.g. across a
                    # reconnect): route it again from what the assignment carries.
                    now = ctx.clock()
                    tenant = resolve_tenant(job).name
                    add_log_context(tenant=tenant)
                    try:
                        route = resolve_agent(job, ctx.table)
                        offer = Offer(job, route, None, now, now, tenant=tenant)
                    except UnknownAgentError as exc:
                        offer = Offer(job, None, exc, now, now, tenant=tenant)
                        ctx.handlers.start(self.dead_letter_unknown, offer)
                if offer.error is not None:
                    ctx.handlers.start(fail_job, socket, job.id, str(offer.error))
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
                    tracing.TENANT: offer.tenant,
                },
            )
            traceparent = tracing.traceparent_of(span)
        pending = Pending(
            self._job_message(job, offer, traceparent or ""),
            deadline=time.monotonic() + ctx.settings.enqueue_timeout,
            socket=socket,
            route=offer.route,
            span=span,
        )
        ctx.jobs.assign(job.id, pending.message.agent, offer.tenant)
        self.enqueuer.submit(pending)

    def completed(
        self, pending: Pending, result: EnqueueResult | None, error: BaseException | None
    ) -> None:
        """Account for one job the enqueuer wrote (or could not write)."""
        message = pending.message
        with log_context(
            job_id=message.job_id, room=message.room, agent=message.agent, tenant=message.tenant
        ):
            if result is None:
                self._not_written(pending, error)
            else:
                self._written(pending, result)
        if pending.span is not None:
            _trace_enqueue(pending.span, result, error)

    def _not_written(self, pending: Pending, error: BaseException | None) -> None:
        message = pending.message
        self._ctx.metrics.enqueue_failures.labels(message.agent).inc()
        reason = describe(error) if error else "timed out"
        text = (
            f"openrtc: could not enqueue job for agent '{message.agent}' "
            f"(Redis: {reason}); the call is not served."
        )
        logger.error("job %s (room %s): %s", message.job_id, message.room, text)
        self._ctx.handlers.start(fail_job, pending.socket, message.job_id, text)
        # The write may still have landed (a lost reply, a Redis that ran it
        # late): once Redis answers, the job is marked terminated, so no
        # worker joins a call LiveKit has failed.
        self._ctx.jobs.not_written(message.job_id, message.agent)

    def _written(self, pending: Pending, result: EnqueueResult) -> None:
        ctx, message = self._ctx, pending.message
        if result.outcome == "duplicate":
            ctx.metrics.duplicates.inc()
            logger.warning(
                "job %s already enqueued (entry %s); not enqueued again",
                message.job_id,
                result.entry_id,
            )
        else:
            ctx.metrics.jobs_routed.labels(
                message.agent, str(pending.route.step), ctx.metrics.tenant_label(message.tenant)
            ).inc()
            # The assignment arrived one enqueue timeout before the deadline.
            submitted = pending.deadline - ctx.settings.enqueue_timeout
            ctx.metrics.enqueue_latency.labels(message.agent).observe(time.monotonic() - submitted)
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "job %s (room %s) -> %s (entry %s, step %d: %s)",
                    message.job_id,
                    message.room,
                    ctx.keys.jobs(message.agent),
                    result.entry_id,
                    pending.route.step,
                    pending.route.source,
                )
        ctx.jobs.written(message.job_id, message.agent, hold=pending.socket is ctx.socket)

    def _write_failed(self, exc: BaseException) -> None:
        if isinstance(exc, REDIS_DOWN):
            # Answer the next offers unavailable right away, not only after
            # the next membership refresh notices.
            self._ctx.view.redis_ok = False
        self._ctx.redis_state.set("unreachable", describe(exc), level=logging.ERROR)

    def _job_message(self, job: proto.Job, offer: Offer, traceparent: str = "") -> JobMessage:
        """The job's stream entry; for an unknown agent, the same with no agent.

        The room snapshot carries the room's TURN password and the job its
        server-side state: neither belongs at rest in a stream. The assignment
        is ours alone, so they are cleared in place.
        """
        settings = self._ctx.settings
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
            livekit_url=settings.livekit.ws_url,
            step=step,
            source=source,
            dispatcher_id=settings.dispatcher_id,
            received_at=offer.received_at,
            routed_at=offer.routed_at,
            traceparent=traceparent,
            tenant=offer.tenant,
        )

    async def dead_letter_unknown(self, offer: Offer) -> None:
        """Dead-letter a job for an unknown agent as a whole job entry, for no agent.

        Built by :meth:`_job_message` like every entry, so ``openrtc dlq
        replay --agent X`` makes it a job for X that a worker serves; the name
        the job asked for is kept beside it (bounded: it is user input).
        """
        ctx = self._ctx
        error, job = offer.error, offer.job
        assert error is not None
        copy = proto.Job()
        copy.CopyFrom(job)  # the job is still in use: its assignment may follow
        original = self._job_message(copy, offer).encode()
        # Already bounded: UnknownAgentError quotes at most a name's longest form.
        original[REQUESTED_AGENT_FIELD] = error.agent.encode(errors="replace")
        try:
            with anyio.fail_after(ctx.settings.enqueue_timeout):
                entry = await ctx.store.dead_letter(
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
            ctx.metrics.dead_letters.labels("", DeadReason.UNKNOWN_AGENT.value).inc()
            logger.error("job %s dead-lettered as %s (%s)", job.id, entry, ctx.keys.dead_letter)

    async def settle_unsure(self) -> bool:
        """Mark the jobs failed towards LiveKit whose enqueue may have landed anyway.

        Called by the membership keeper each time Redis answers a refresh;
        ``False`` when Redis failed meanwhile (the rest wait for the next one).
        """
        ctx = self._ctx
        for job_id, agent in ctx.jobs.unsure_jobs():
            try:
                with anyio.fail_after(max(1.0, ctx.settings.heartbeat_interval * 2)):
                    await ctx.store.publish_termination(agent, job_id, "enqueue failed")
            except REDIS_DOWN:
                return False
            ctx.jobs.settle(job_id)
            logger.info("job %s: marked terminated (its enqueue had failed)", job_id)
        return True


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

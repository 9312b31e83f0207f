"""The availability desk: LiveKit offers a job, the dispatcher answers at once.

The answer itself is a pure function (:func:`answer_offer`, table-tested):
from the job's route (or routing error), whether the dispatcher drains, and
the agent's cached load, it says accepted, rejected (and why) or unknown
agent. :class:`AvailabilityDesk` wraps it with what has effects: the clock,
the trace, the log line, the counters, the ledger's offer, and the dead
letter of a job for an unknown agent. No I/O on this path: it runs on the
socket's receive loop, once per offer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, NamedTuple

from livekit.protocol import agent as proto

from openrtc.agents.routing import Route, UnknownAgentError, resolve_agent
from openrtc.agents.tenants import DEFAULT_TENANT, Tenant, resolve_tenant
from openrtc.dispatcher.admission import AdmissionPolicy
from openrtc.dispatcher.context import DispatcherContext, logger
from openrtc.dispatcher.ledger import Offer
from openrtc.ops import tracing
from openrtc.ops.logs import add_log_context, log_context
from openrtc.store.membership import AgentLoad
from openrtc.wire.messages import agent_identity, participant_attributes

__all__ = ["Answer", "AvailabilityDesk", "answer_offer"]

#: How an offer was answered: also the ``answer`` label of ``openrtc_availability_answers``.
Outcome = Literal["accepted", "rejected", "unknown_agent"]


class Answer(NamedTuple):
    """The answer to one offer (a tuple: one is made per offer, on the answer path)."""

    outcome: Outcome
    #: The agent participant's name (answers that accept the job).
    participant_name: str = ""
    #: Why a job was turned away, logged ("" while draining: nothing to say per job).
    reason: str = ""

    @property
    def available(self) -> bool:
        """Whether LiveKit is told yes (a job for an unknown agent is taken, to fail it)."""
        return self.outcome != "rejected"


def answer_offer(
    route: Route | None,
    error: UnknownAgentError | None,
    *,
    draining: bool,
    load: AgentLoad | None,
    redis_ok: bool,
    policy: AdmissionPolicy,
) -> Answer:
    """The answer to an offer whose job routed to ``route`` (or failed with ``error``).

    ``load``: the routed agent's cached load. A job for an unknown agent is
    accepted: it is dead-lettered and failed with the routing error, so
    LiveKit records the error and offers it to nobody else.
    """
    if draining:
        return Answer("rejected")
    if route is None:
        assert error is not None
        return Answer("unknown_agent", f"unknown agent {error.agent}"[:64])
    admission = policy.decide(load, redis_ok=redis_ok)
    if not admission.accept:
        return Answer("rejected", reason=admission.reason)
    return Answer("accepted", route.agent)


class AvailabilityDesk:
    """Answers each ``AvailabilityRequest`` (see the module docstring).

    Args:
        ctx: the dispatcher's shared state.
        dead_letter: writes the dead letter of a job for an unknown agent (a handler task).
    """

    def __init__(
        self, ctx: DispatcherContext, dead_letter: Callable[[Offer], Awaitable[None]]
    ) -> None:
        self._ctx = ctx
        self._dead_letter = dead_letter

    def answer(self, request: proto.AvailabilityRequest) -> proto.WorkerMessage:
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
        ctx = self._ctx
        received = ctx.clock()
        job = request.job
        route: Route | None = None
        error: UnknownAgentError | None = None
        tenant = DEFAULT_TENANT
        draining, view = ctx.draining, ctx.view
        if not draining:  # a draining dispatcher routes nothing
            # First: the routing's own lines carry it.
            tenant = _tenant_of(job)
            add_log_context(tenant=tenant)
            try:
                route = resolve_agent(job, ctx.table)
            except UnknownAgentError as exc:
                error = exc
            if span is not None:
                _trace_route(span, route, error)
                span.set_attribute(tracing.TENANT, tenant)
            if route is not None:
                add_log_context(agent=route.agent)
        answer = answer_offer(
            route,
            error,
            draining=draining,
            load=view.loads.get(route.agent) if route is not None else None,
            redis_ok=view.redis_ok,
            policy=ctx.policy,
        )
        ctx.metrics.availability_answers.labels(answer.outcome).inc()
        response = proto.WorkerMessage()
        reply = response.availability
        reply.job_id = job.id
        if answer.outcome == "rejected":
            reply.available = False
            if answer.reason:
                assert route is not None
                logger.warning(
                    "job %s (room %s) for agent '%s' answered unavailable: %s",
                    job.id,
                    job.room.name,
                    route.agent,
                    answer.reason,
                )
            return response
        offer = Offer(job, route, error, received, ctx.clock(), span, tenant)
        if error is not None:
            ctx.metrics.unknown_agents.inc()
            logger.error(
                "job %s (room %s): %s The job goes to the dead letters.",
                job.id,
                job.room.name,
                error,
            )
            ctx.handlers.start(self._dead_letter, offer)
        ctx.jobs.offer(offer)
        reply.available = True
        reply.participant_identity = agent_identity(job.id)
        reply.participant_name = answer.participant_name
        if route is not None:
            reply.participant_attributes.update(participant_attributes(route.agent))
        return response


def _tenant_of(job: proto.Job) -> str:
    """The job's tenant; an invalid one is folded into the default tenant, with a warning."""
    tenant: Tenant = resolve_tenant(job)
    if tenant.invalid:
        logger.warning(
            "job %s (room %s): tenant '%s' in its %s is not a tenant name "
            "(1-64 letters, digits, '.', '_', '-'); the call is the %s tenant's",
            job.id,
            job.room.name,
            tenant.invalid,
            tenant.source,
            tenant.name,
        )
    return tenant.name


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

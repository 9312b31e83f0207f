"""Session supervisor: run a started claim's session to its outcome.

Its checkpoints wired in (the last one to resume from, a writer), its record marked
healthy once it lived a lease, its outcome settled (:mod:`openrtc.worker.outcomes`). In
``process`` isolation a session whose child process died is delivered again at once.
Its step (:meth:`SessionSupervisor.run`) is the session runner's upkeep.
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from openrtc.agents.tenants import CredentialError
from openrtc.ops import tracing
from openrtc.session.runners import SessionRunner
from openrtc.session.session import AGENT_NOT_BUILT, SessionControl, SessionOutcome
from openrtc.store.checkpoint import Checkpoint, CheckpointWriter
from openrtc.store.streams import Delivery
from openrtc.wire.messages import JobMessage, RecordField
from openrtc.wire.reports import CallTally
from openrtc.worker.acceptance import Start
from openrtc.worker.claims import Claim, ClaimTable
from openrtc.worker.context import DOWN, WorkerContext, logger
from openrtc.worker.outcomes import Outcomes

__all__ = ["PROCESS_DIED", "TENANT_CREDENTIALS", "SessionSupervisor"]

#: A session whose process died this way is started again by its own worker.
PROCESS_DIED: Final = "session process died"
#: A session's outcome reason when its tenant's credentials could not be resolved.
TENANT_CREDENTIALS: Final = "tenant credentials unavailable"

_no_span: Final = contextlib.nullcontext()


class SessionSupervisor:
    """Runs sessions (each in the worker's task group) and the runner's upkeep."""

    def __init__(
        self, ctx: WorkerContext, claims: ClaimTable, outcomes: Outcomes, runner: SessionRunner
    ) -> None:
        self._ctx = ctx
        self._claims = claims
        self._outcomes = outcomes
        self.runner = runner

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The runner's background upkeep (warm session processes), for the worker's life."""
        task_status.started()
        await self.runner.maintain()

    async def serve(self, claim: Claim) -> Delivery | None:
        """Run the claim's session and settle it; the entry again when it must start again."""
        message, control = claim.message, claim.control
        assert message is not None
        assert control is not None
        self._ctx.stats.started += 1
        self._ctx.metrics.started(message.tenant)
        span = _session_span(claim, message, self._ctx.settings.isolation)
        self._observing(control)
        try:
            writer = await self._checkpointing(claim, message, control)
            # (The record was marked and the RUNNING status sent before, in
            # one round trip: EntryCheck._mark_started.)
            outcome = await self._run_session(claim, message, control, writer, span)
            if span is not None:
                _trace_outcome(span, outcome)
                span = None
            # A call that ends here has its checkpoint deleted with its entry.
            await self._outcomes.settle(claim, message, outcome)
        finally:
            if span is not None:  # cancelled
                span.end()
            self._claims.drop(claim)
        if (
            outcome.status == "failed"
            and outcome.reason in (PROCESS_DIED, AGENT_NOT_BUILT)
            and not (control.stopping or claim.lost or self._ctx.draining)
            # Stopped by its run of failures: the call goes to a peer, by the lease.
            and self._ctx.failures.refusing() is None
        ):
            return await self._redeliver(claim)
        return None

    async def _run_session(
        self,
        claim: Claim,
        message: JobMessage,
        control: SessionControl,
        writer: CheckpointWriter | None,
        span: Any,
    ) -> SessionOutcome:
        """The session itself, with its watchers (join, checkpoint writer, room) beside it."""
        async with anyio.create_task_group() as watch:
            watch.start_soon(self._mark_joined, claim, message, control, span)
            remade, remade_sids = anyio.create_memory_object_stream[str](math.inf)
            control.room_remade = remade.send_nowait
            watch.start_soon(self._record_room_sids, message, remade_sids)
            if writer is not None:
                watch.start_soon(writer.run)
            try:
                # The tenants file as it is now, credentials resolved here, now:
                # this call keeps them whatever the file says later.
                control.tenant = self._ctx.tenants.for_tenant(message.tenant).resolve()
            except CredentialError as exc:
                # The line names the reference, never a value.
                logger.error("job %s: %s", message.job_id, exc)
                outcome = SessionOutcome("failed", TENANT_CREDENTIALS, str(exc))
            else:
                outcome = await self._run_in_runner(message, control, span)
            if writer is not None and outcome.status == "failed":
                # The next delivery resumes from it: the last turn counts.
                with anyio.move_on_after(self._ctx.step_timeout):
                    await writer.flush()
            watch.cancel_scope.cancel()
        return outcome

    async def _run_in_runner(
        self, message: JobMessage, control: SessionControl, span: Any
    ) -> SessionOutcome:
        try:
            with tracing.use_span(span) if span is not None else _no_span:
                return await self.runner.run(
                    message, control, worker_id=self._ctx.settings.worker_id
                )
        except Exception as exc:  # a runner bug must not take the worker down
            logger.exception("job %s: the session runner failed", message.job_id)
            return SessionOutcome("failed", "session runner error", f"{type(exc).__name__}: {exc}")

    async def _mark_joined(
        self, claim: Claim, message: JobMessage, control: SessionControl, span: Any
    ) -> None:
        ctx = self._ctx
        await control.joined.wait()
        claim.joined_at = time.monotonic()
        if span is not None:
            _trace_joined(span, message)
        logger.info(
            "job %s: agent '%s' joined room %s as %s (%.0f ms after enqueue)",
            message.job_id,
            message.agent,
            message.room,
            message.accept.identity,
            (ctx.clock() - message.enqueued_at) * 1000,
        )
        # A session that lived a lease is no crash loop: the lease keeper's
        # next renewal after a lease from now marks its record healthy.

    async def _record_room_sids(
        self, message: JobMessage, sids: anyio.abc.ObjectReceiveStream[str]
    ) -> None:
        """Record each room LiveKit made anew that the session is in (its call's room now)."""
        ctx = self._ctx
        async with sids:
            async for sid in sids:
                logger.info(
                    "job %s: LiveKit made room %s anew (sid %s); the call goes on in it",
                    message.job_id,
                    message.room,
                    sid,
                )
                fields = {RecordField.ROOM_SID: sid}
                await ctx.redis(
                    partial(ctx.consumer.update_record, message.job_id, fields),
                    "job %s: the room's new sid not recorded: %s",
                    message.job_id,
                )

    async def _redeliver(self, claim: Claim) -> Delivery | None:
        """A call whose session process died, delivered again to start at once, as a takeover.

        Counted as a delivery (a call that kills every process still ends in
        the dead letters); an entry no longer ours, or Redis down, is left to
        the lease.
        """
        ctx = self._ctx
        delivery = await ctx.redis(
            lambda: ctx.consumer.redeliver(claim.entry_id),
            "entry %s: not started again (%s); left to the lease",
            claim.entry_id,
        )
        if delivery is DOWN or delivery is None or ctx.draining:
            return None
        logger.warning("entry %s: its session process died; starting it again", claim.entry_id)
        return delivery

    def _observing(self, control: SessionControl) -> None:
        """The start observers for the session (which runs them if it starts its call)."""
        ctx = self._ctx
        control.on_start = ctx.observers.start
        control.observer_timeout = ctx.settings.observer_timeout
        errors = ctx.metrics.observer_errors
        control.observer_failed = lambda hook: errors.labels(ctx.settings.agent, hook).inc()

    async def _checkpointing(
        self, claim: Claim, message: JobMessage, control: SessionControl
    ) -> CheckpointWriter | None:
        """Wire the session to its checkpoints: the last one to resume from, a writer.

        Only a redelivered or handed-over job can have a checkpoint; reading
        it is one GET before the join. Unreadable (Redis down) means a fresh start.
        """
        ctx = self._ctx
        if not (ctx.config.checkpoint and ctx.settings.checkpoint_max_bytes > 0):
            return None
        job_id = message.job_id
        # A handover, not a crash: the caller lost nothing, no resume line.
        control.handover = bool(message.handover_from) and claim.delivery.deliveries == 1
        if claim.start is not Start.FRESH:
            resume = await ctx.redis(
                lambda: ctx.checkpoints.load(job_id),
                "job %s: checkpoint not read (%s); starting afresh",
                job_id,
            )
            if resume is not DOWN:
                control.resume = resume
                # Its usage was counted by the sessions that ran before.
                claim.counted = _tally_in(resume)

        async def save(data: bytes) -> bool:
            # Fenced by the entry (as it is now: a write-back renames it).
            saved = await ctx.checkpoints.save(
                job_id, data, entry_id=claim.entry_id, consumer=ctx.settings.worker_id
            )
            if saved:
                # Usage is counted as it is checkpointed: what the next session
                # resumes from is exactly what was counted, so none counts it twice.
                claim.counted = ctx.metrics.count_usage(
                    claim.counted, _tally_in(data), message.tenant
                )
            return saved

        writer = CheckpointWriter(
            save,
            label=f"job {job_id}",
            # A session stepping aside must not overwrite its successor's state.
            allowed=lambda: not (claim.lost or claim.handed_over or control.takeover),
        )
        claim.writer = writer
        control.checkpoint = writer.offer
        control.checkpoint_max_bytes = ctx.settings.checkpoint_max_bytes
        return writer


def _tally_in(data: bytes | None) -> CallTally:
    """The call's tally in a checkpoint (empty if none, as the session takes it)."""
    saved = Checkpoint.decode(data) if data else None
    return CallTally.from_dict(saved.call if saved is not None else None)


def _session_span(claim: Claim, message: JobMessage, isolation: str) -> Any:
    """The session span, under the claim span (tracing on only; else ``None``)."""
    if claim.span is None:
        return None
    return tracing.start_span(
        "openrtc.session",
        parent=claim.span,
        attributes={
            tracing.JOB_ID: message.job_id,
            tracing.AGENT: message.agent,
            tracing.ROOM: message.room,
            tracing.TENANT: message.tenant,
            "openrtc.isolation": isolation,
            "openrtc.takeover": claim.reclaimed,
        },
    )


def _trace_joined(span: Any, message: JobMessage) -> None:
    """The agent is in the room: an event on the session span, and the join as a span."""
    span.add_event("agent joined", {"openrtc.identity": message.accept.identity})
    join = tracing.start_span(
        "openrtc.session.join",
        parent=span,
        start_time=span.start_time,
        attributes={tracing.JOB_ID: message.job_id, tracing.ROOM: message.room},
    )
    join.end()


def _trace_outcome(span: Any, outcome: SessionOutcome) -> None:
    span.set_attributes(
        {"openrtc.outcome": outcome.status, "openrtc.outcome_reason": outcome.reason}
    )
    if outcome.status == "failed":
        tracing.end_failed(span, outcome.error or outcome.reason)
    else:
        span.end()

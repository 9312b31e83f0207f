"""Outcomes: what becomes of a held entry once it is decided or its session ended.

Acknowledged (done), dead-lettered, handed back unstarted, or left pending for a
redelivery; the job's record marked and its dispatcher told. Not a loop: the entry
check and the session supervisor call it.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import anyio

from openrtc.agents.observers import Observer, observe
from openrtc.agents.tenants import DEFAULT_TENANT, tenant_scope
from openrtc.ops.logs import log_context
from openrtc.session.session import SessionOutcome
from openrtc.store.checkpoint import Checkpoint
from openrtc.store.streams import ReportWrite
from openrtc.wire.messages import (
    DeadReason,
    JobMessage,
    JobStatus,
    RecordField,
    StatusEvent,
    peek_tenant,
)
from openrtc.wire.reports import CallOutcome, CallReport, CallTally
from openrtc.worker.claims import Claim
from openrtc.worker.context import DOWN, WorkerContext, logger

__all__ = ["Outcomes"]


class Outcomes:
    """Settles claims: acknowledge, dead-letter, release; records and status events."""

    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        #: End observer runs going on, and an event set (and renewed) as each ends.
        self._observing = 0
        self._observed = anyio.Event()

    async def settle(self, claim: Claim, message: JobMessage, outcome: SessionOutcome) -> None:
        """A session ended: count it, and finish the job or leave it to a redelivery."""
        ctx = self._ctx
        if claim.handed_over and outcome.status == "success" and await self._released_lost(claim):
            # The call ended here, and Redis lost the entry it was handed over
            # as: nobody else will ever finish it.
            claim.handed_over = False
        ctx.failures.record("taken_over" if claim.handed_over else outcome.status, message.job_id)
        if outcome.status == "taken_over" or claim.handed_over:
            # Handed over, however the session ended: the peer has the job now
            # (its record, its entry, its checkpoint), and finishes it.
            ctx.stats.taken_over += 1
            ctx.metrics.ended("taken_over", message.tenant)
            logger.log(
                logging.INFO if claim.handed_over else logging.WARNING,
                "job %s: another worker took the call over (%s); stepping aside",
                message.job_id,
                outcome.reason,
            )
            return
        if outcome.status == "failed":
            ctx.stats.failed += 1
            ctx.metrics.ended("failed", message.tenant)
            claim.settled = True
            logger.error(
                "job %s: session failed (delivery %d of %d): %s",
                message.job_id,
                claim.delivery.deliveries,
                ctx.settings.max_deliveries,
                outcome.error,
            )
            await ctx.redis(
                lambda: ctx.consumer.update_record(
                    message.job_id, {RecordField.LAST_ERROR: outcome.error}
                ),
                within=math.inf,
            )
            # Left pending and no longer renewed: after the lease it is
            # delivered again, to this worker or another, until the limit.
            return
        ctx.stats.succeeded += 1
        ctx.metrics.ended("succeeded", message.tenant)
        logger.info("job %s ended: %s", message.job_id, outcome.reason)
        if outcome.call is not None:
            # The call ends here: its usage since the last checkpoint (all
            # of it, for an agent without checkpoints) is counted now.
            claim.counted = ctx.metrics.count_usage(
                claim.counted, CallTally.from_dict(outcome.call), message.tenant
            )
        report = await self._report_of(
            message,
            CallOutcome.AGENT_ENDED if outcome.ended_by_agent else CallOutcome.ENDED,
            outcome.reason,
            outcome.call,
        )
        # The report, and the room's ended mark when the agent ended the call
        # on purpose (the reconciler leaves its room alone), go before the
        # acknowledgement, in its round trip: a crash between leaves the call
        # to a peer whose session ends at once and writes them again (the
        # report's marker keeps it to one), never a call without a report or
        # a room to a new dispatch. Its checkpoint goes with the entry.
        ended = (message.room, message.job.room.sid or message.room)
        added = await self.finish(
            claim,
            message,
            JobStatus.SUCCESS,
            report=report,
            ended=ended if outcome.ended_by_agent else None,
            checkpoint=claim.writer is not None,
        )
        self._reported(report, added)

    async def _released_lost(self, claim: Claim) -> bool:
        """Whether Redis lost the entry this claim's call was handed over as."""
        if not (claim.released and claim.message):
            return False
        released, job_id = claim.released, claim.message.job_id
        where = await self._ctx.redis(lambda: self._ctx.consumer.released(released, job_id))
        return where == "forgotten"

    async def finish(
        self,
        claim: Claim,
        message: JobMessage,
        status: JobStatus | None = None,
        *,
        report: CallReport | None = None,
        ended: tuple[str, str] | None = None,
        checkpoint: bool = False,
    ) -> str | None:
        """The job is done with, in one round trip (:meth:`JobConsumer.end`).

        Its entry acknowledged and deleted, its record marked done; before
        them its ``report`` and the room's ``ended`` mark (room, sid), after
        them its ``checkpoint`` deleted and the ``status`` event told its
        dispatcher. Returns the report's entry id if this write added it.
        """
        ctx, settings = self._ctx, self._ctx.settings
        # Settled first: a renewal racing the ack must not take the vanished
        # entry for one Redis forgot and write it back.
        claim.settled = True
        write = (
            ReportWrite(report, settings.report_maxlen, settings.report_max_age)
            if report is not None
            else None
        )
        end = partial(
            ctx.consumer.end,
            claim.entry_id,
            message.job_id,
            checkpoint=checkpoint,
            status=self.event(message, status) if status is not None else None,
            report=write,
            ended=ended,
        )
        return await ctx.until_redis(end)

    async def dead_letter(
        self,
        claim: Claim,
        reason: DeadReason,
        error: str,
        message: JobMessage | None,
        job_id: str = "",
    ) -> bool:
        """Move the entry to the dead letters; tell its dispatcher if ``message``."""
        ctx = self._ctx
        claim.settled = True
        delivery = claim.delivery
        ctx.stats.dead_lettered += 1
        ctx.metrics.dead_letters.labels(ctx.settings.agent, reason.value).inc()
        job = message.job_id if message else job_id or "?"
        logger.error(
            "entry %s (job %s) -> dead letters (%s): %s", delivery.entry_id, job, reason, error
        )
        try:
            await ctx.until_redis(ctx.consumer.dead_letter, delivery, reason, error)
        except Exception:
            logger.exception("entry %s could not be dead-lettered", delivery.entry_id)
            return False
        if message is not None or job_id:
            # Given up on (a call, even one given up on before its entry was
            # decoded: then its room is not known here).
            await self.report(
                message or job_id,
                CallOutcome.FAILED,
                f"{reason.value}: {error}",
                None,
                tenant=peek_tenant(delivery.fields),
            )
        if message is not None:
            await self.status(message, JobStatus.FAILED, f"{reason}: {error}")
        return True

    async def report(
        self,
        message: JobMessage | str,
        outcome: str,
        reason: str,
        call: dict[str, Any] | None,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        """Write the call's report (once per call: its marker keeps a second one out).

        ``message``: the job, or only its id (an entry given up on undecoded;
        ``tenant`` is then the one its fields name).
        ``call``: the ending session's totals (its outcome's). Without them (a
        call given up) the totals are those of its last checkpoint.
        """
        ctx = self._ctx
        report = await self._report_of(message, outcome, reason, call, tenant=tenant)
        settings = ctx.settings
        added = await ctx.redis(
            lambda: ctx.store.add_report(
                report, maxlen=settings.report_maxlen, max_age=settings.report_max_age
            ),
            "job %s: call report not written: %s",
            report.job_id,
            within=math.inf if outcome != CallOutcome.FAILED else None,
        )
        if added is not DOWN:
            self._reported(report, added)

    async def _report_of(
        self,
        message: JobMessage | str,
        outcome: str,
        reason: str,
        call: dict[str, Any] | None,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> CallReport:
        """The call's report (see :meth:`report`), not yet written."""
        ctx = self._ctx
        job_id = message if isinstance(message, str) else message.job_id
        if call is None:
            stored = await ctx.redis(
                lambda: ctx.checkpoints.load(job_id),
                "job %s: checkpoint not read for the report (%s)",
                job_id,
            )
            saved = Checkpoint.decode(stored) if isinstance(stored, bytes) else None
            call = saved.call if saved is not None else None
        tally = CallTally.from_dict(call)
        transcript = _transcript(call.get("transcript") if call else None)
        return CallReport(
            job_id=job_id,
            agent=ctx.settings.agent if isinstance(message, str) else message.agent,
            room="" if isinstance(message, str) else message.room,
            tenant=tenant if isinstance(message, str) else message.tenant,
            started_at=tally.started_at
            or (0.0 if isinstance(message, str) else message.enqueued_at),
            ended_at=ctx.clock(),
            outcome=outcome,
            reason=reason,
            tally=tally,
            transcript=transcript,
        )

    def _reported(self, report: CallReport, added: str | None) -> None:
        """The report's write answered: ``added`` its entry id, ``None`` if the call had one."""
        ctx = self._ctx
        if added is None:
            logger.info("job %s: the call has its report already", report.job_id)
            return
        # This write was the call's first (its marker was unset): once per
        # call, by the one writer whose report went in.
        ctx.metrics.observe_call(
            report.tenant, report.outcome, max(0.0, report.ended_at - report.started_at)
        )
        if ctx.observers.end:
            # In the worker's task group: settling the call (the ack, the
            # status) does not wait for the end observers.
            ctx.spawn(self._observe_end, report)

    async def _observe_end(self, report: CallReport) -> None:
        ctx = self._ctx
        errors = ctx.metrics.observer_errors

        def failed(observer: Observer) -> None:
            errors.labels(ctx.settings.agent, observer.hook).inc()

        self._observing += 1
        try:
            # Spawned in the worker's task group: bound again here, for its lines
            # and for openrtc.current_tenant() in the observers.
            with (
                log_context(job_id=report.job_id, agent=report.agent, tenant=report.tenant),
                tenant_scope(report.tenant),
            ):
                await observe(
                    ctx.observers.end,
                    report,
                    bound=ctx.settings.observer_timeout,
                    failed=failed,
                    what=f"job {report.job_id}",
                )
        finally:
            self._observing -= 1
            self._observed.set()
            self._observed = anyio.Event()

    async def observers_done(self) -> None:
        """Until no end observer runs (each is bounded by the observer timeout).

        A stopping worker waits for them: the call's report is written, and
        its end observers run nowhere else.
        """
        while self._observing:
            await self._observed.wait()

    async def release(self, claim: Claim, message: JobMessage, *, takeover: bool = False) -> None:
        """Hand an unstarted entry back to the stream, for a peer to read at once.

        ``takeover``: the entry is of a call that runs without a worker (its own
        crashed or lost it). Given back as a handover, the peer takes it over
        from its checkpoint at once; as a plain new entry it would read as a
        lost read of a live worker and wait a lease for one that is dead.
        """
        ctx = self._ctx
        claim.settled = True
        # Not released: still pending on us and no longer renewed, a peer
        # reclaims it after the lease.
        new_id = await ctx.redis(
            lambda: ctx.consumer.release(claim.entry_id, message.job_id, handover=takeover),
            "job %s: not released (%s); left to the lease",
            message.job_id,
        )
        if new_id is DOWN:
            return
        logger.info(
            "job %s: %s, handed back unstarted (entry %s -> %s)",
            message.job_id,
            "draining" if ctx.draining else "stopped by failed sessions",
            claim.entry_id,
            new_id,
        )

    async def status(self, message: JobMessage, status: JobStatus, error: str) -> None:
        """Tell the job's dispatcher how it went (best effort)."""
        await self.publish(
            message.dispatcher_id, message.job_id, status, error, tenant=message.tenant
        )

    def event(
        self, message: JobMessage, status: JobStatus, error: str = ""
    ) -> tuple[str, StatusEvent] | None:
        """A status event of ``message`` and the dispatcher to send it to (``None``: nobody)."""
        if not message.dispatcher_id or not message.job_id:
            return None
        event = StatusEvent(
            message.job_id, status, error, self._ctx.settings.worker_id, tenant=message.tenant
        )
        return message.dispatcher_id, event

    async def publish(
        self, dispatcher_id: str, job_id: str, status: JobStatus, error: str, *, tenant: str = ""
    ) -> None:
        """A status event for ``dispatcher_id`` (nothing without both ids)."""
        if not dispatcher_id or not job_id:
            return
        ctx = self._ctx
        event = StatusEvent(job_id, status, error, ctx.settings.worker_id, tenant=tenant)
        await ctx.redis(
            lambda: ctx.store.publish_status(dispatcher_id, event),
            "job %s: status %s not sent: %s",
            job_id,
            status,
            within=2,
        )


def _transcript(value: Any) -> list[dict[str, str]] | None:
    """A session's transcript as a report keeps it; ``None`` if there is none (or it is bad)."""
    if not isinstance(value, list):
        return None
    return [
        {"role": str(line.get("role", "")), "text": str(line.get("text", ""))}
        for line in value
        if isinstance(line, dict)
    ]

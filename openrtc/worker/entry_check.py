"""Entry check: what a delivered entry becomes, a session, a dead letter, or nothing.

:meth:`EntryCheck.admit` holds each delivered entry (the intake's reads, the crash
watch's takeovers, a session started again) and checks it concurrently with the
others. The decision is :func:`openrtc.worker.acceptance.judge`'s; here are its reads
(the job's record, then the entry decoded, the room), and what follows from it.
"""

from __future__ import annotations

import dataclasses
import math
import time

import anyio

from openrtc.ops import tracing
from openrtc.ops.logs import log_context
from openrtc.session.session import SessionControl
from openrtc.store.streams import Delivery
from openrtc.wire.messages import (
    DeadReason,
    JobMessage,
    JobStatus,
    MalformedEntry,
    RecordField,
    RecordState,
    peek_job_header,
    peek_tenant,
)
from openrtc.wire.signing import verify_job
from openrtc.worker.acceptance import Action, Start, Verdict, judge, start_kind
from openrtc.worker.claims import Claim, ClaimTable
from openrtc.worker.context import DOWN, WorkerContext, logger
from openrtc.worker.outcomes import Outcomes
from openrtc.worker.rooms import OURS_IN_ROOM, RoomCheck
from openrtc.worker.sessions import SessionSupervisor

__all__ = ["EntryCheck"]


class EntryCheck:
    """Admits delivered entries: holds them, checks each, starts its session or settles it."""

    def __init__(
        self,
        ctx: WorkerContext,
        claims: ClaimTable,
        outcomes: Outcomes,
        sessions: SessionSupervisor,
        rooms: RoomCheck,
    ) -> None:
        self._ctx = ctx
        self._claims = claims
        self._outcomes = outcomes
        self._sessions = sessions
        self._rooms = rooms

    def admit(self, deliveries: list[Delivery]) -> None:
        """Hold each delivered entry and check it (concurrently) into a session."""
        ctx = self._ctx
        for delivery in deliveries:
            held = self._claims.get(delivery.entry_id)
            if held is not None:
                # Our own entry, reclaimed because a renewal was late: the
                # reclaim just renewed it. Never a second session for one job.
                if delivery.deliveries == 1 and held.control is not None:
                    # Read again as new: Redis lost our read (restored from a
                    # snapshot); the job's record names us again.
                    ctx.spawn(self._mark_started, held)
                continue
            if delivery.deliveries > 1:
                ctx.stats.reclaimed += 1
                ctx.metrics.reclaimed.inc()
            # Held (and leased) from this moment: its check may be slow.
            claim = self._claims.hold(delivery)
            if tracing.enabled:
                claim.read_ns = time.time_ns()
            ctx.spawn(self._accept, claim)

    async def _accept(self, claim: Claim) -> None:
        """Decide what a held entry becomes: a session, a dead letter, or nothing."""
        job_id, _ = peek_job_header(claim.delivery.fields)
        # The session task started by the check inherits these.
        with log_context(
            job_id=job_id,
            agent=self._ctx.settings.agent,
            tenant=peek_tenant(claim.delivery.fields),
            room=claim.room_hint(),
        ):
            started = False
            try:
                started = await self._check(claim)
            except Exception:
                # No entry may stop the worker. Left pending and no longer renewed,
                # it comes back after a lease, counted, until max-deliveries sends
                # it to the dead letters undecoded.
                claim.settled = True
                logger.exception(
                    "entry %s (delivery %d): unexpected error; left for redelivery",
                    claim.entry_id,
                    claim.delivery.deliveries,
                )
            finally:
                if claim.span is not None:
                    claim.span.set_attribute("openrtc.session_started", started)
                    claim.span.end()
                if not started:
                    self._claims.drop(claim)

    async def _check(self, claim: Claim) -> bool:
        """Checks an entry and starts its session; False when it did not start one."""
        verdict, message, record = await self._decide(claim)
        if claim.record_assumed and verdict.action is not Action.START:
            # Judged without its record and not to be started as it stands (an
            # old entry, restored by a Redis that lost a read, may be a running
            # call's): what its record says counts, so it is read now.
            return await self._check_again(claim)
        remade_sid = (record or {}).get(RecordField.ROOM_SID, "")
        room: str | None = None
        if verdict.reason is DeadReason.EXPIRED and message is not None:
            # Old, yet maybe not waiting: restored by a Redis that lost the
            # read of a worker serving it (a snapshot taken before the read).
            room = await self._rooms.check(message, remade_sid)
            if room == OURS_IN_ROOM:
                verdict = Verdict(Action.START)
        if verdict.action in (Action.DEAD_LETTER, Action.RETRY, Action.FINISH):
            await self._settle_unstarted(claim, verdict, message)
            return False
        assert message is not None
        # Concurrently with the rest of the batch, each bounded: a slow LiveKit
        # API delays calls, it does not let their leases lapse.
        if room is None:
            room = await self._rooms.check(message, remade_sid)
        if claim.record_assumed and room == OURS_IN_ROOM:
            # Delivered as new, yet the job's agent is in the room: what its
            # record says decides how to start (a contested start waits a
            # lease), so it is read now.
            return await self._check_again(claim)
        if claim.lost:
            logger.warning(
                "job %s: another worker took the entry while its room was checked; not joining",
                message.job_id,
            )
            return False
        claim.start = start_kind(
            claim.delivery.deliveries,
            bool(message.handover_from),
            (record or {}).get(RecordField.STATE) == RecordState.RUNNING,
            room == OURS_IN_ROOM,
        )
        if claim.start is Start.CONTESTED and not await self._contest(claim, message):
            return False
        # Stopped by its failures: an entry a read already under way brought in
        # goes back as a draining worker's does.
        if self._ctx.draining or self._ctx.failures.refusing() is not None:
            if claim.start is Start.CONTESTED:
                # Not released: a copy under a new id would be one the call's
                # worker cannot tell from its own. Left unrenewed, it is deleted
                # by that worker's write-back, or reclaimed after a lease.
                claim.settled = True
            else:
                await self._outcomes.release(claim, message, takeover=claim.start is Start.TAKEOVER)
            return False
        if room not in ("live", OURS_IN_ROOM):
            _log_no_join(message, room)
            await self._outcomes.finish(claim, message, JobStatus.SUCCESS)
            return False
        return await self._start(claim, message, room)

    async def _check_again(self, claim: Claim) -> bool:
        """:meth:`_check` once more, with the job's record read (it was judged without)."""
        job_id, _ = peek_job_header(claim.delivery.fields)
        record = await self._job_record(job_id)
        claim.record_assumed = False
        if record is None:
            logger.error("job %s: its record could not be read; retried later", job_id)
            claim.lost = True  # not renewed: reclaimed after the lease
            return False
        claim.delivery = dataclasses.replace(claim.delivery, record=record)
        return await self._check(claim)

    async def _decide(
        self, claim: Claim
    ) -> tuple[Verdict, JobMessage | None, dict[str, str] | None]:
        """The verdict on the entry from its record and, if it comes to that, its fields.

        Also the decoded entry (``None`` if it does not decode) and the record
        (``None`` when Redis did not answer).
        """
        settings, delivery = self._ctx.settings, claim.delivery
        job_id, _ = peek_job_header(delivery.fields)
        record = delivery.record
        if record is None and delivery.deliveries == 1 and job_id:
            # A first delivery: its record is as the enqueue wrote it but for
            # what the start checks (running, done, terminated, a room made
            # anew), which then has it read and the entry judged again: no
            # round trip of its own on the way in.
            record, claim.record_assumed = {}, True
        elif record is None:
            record = await self._job_record(job_id)
        message: JobMessage | MalformedEntry | None = None
        verdict = self._judge(delivery, message, record)
        if verdict.action is Action.DECODE:
            try:
                if settings.signing is not None:
                    # Before decoding: nothing an unsigned entry says is acted on.
                    verify_job(settings.signing, delivery.fields)
                message = JobMessage.decode(delivery.fields)
            except MalformedEntry as exc:
                message = exc
            verdict = self._judge(delivery, message, record)
        if not isinstance(message, JobMessage):
            return verdict, None, record
        claim.message = message
        if tracing.enabled and claim.span is None:
            claim.span = tracing.start_span(
                "openrtc.worker.claim",
                parent=message.traceparent,
                start_time=claim.read_ns or None,
                attributes={
                    tracing.JOB_ID: message.job_id,
                    tracing.AGENT: message.agent,
                    tracing.ROOM: message.room,
                    tracing.TENANT: message.tenant,
                    "openrtc.worker_id": settings.worker_id,
                    "openrtc.entry_id": claim.entry_id,
                    "openrtc.delivery": delivery.deliveries,
                },
            )
        return verdict, message, record

    async def _settle_unstarted(
        self, claim: Claim, verdict: Verdict, message: JobMessage | None
    ) -> None:
        """A verdict not to start: a dead letter, a retry later, or a job finished unjoined."""
        if verdict.action is Action.DEAD_LETTER:
            assert verdict.reason is not None
            job_id, dispatcher_id = peek_job_header(claim.delivery.fields)
            if (
                await self._outcomes.dead_letter(
                    claim, verdict.reason, verdict.error, message, job_id
                )
                and message is None
                and verdict.reason is DeadReason.MAX_DELIVERIES
            ):
                # Given up on undecoded: its dispatcher is told from the peeked ids.
                await self._outcomes.publish(
                    dispatcher_id,
                    job_id,
                    JobStatus.FAILED,
                    f"{verdict.reason}: {verdict.error}",
                    tenant=peek_tenant(claim.delivery.fields),
                )
            return
        assert message is not None
        if verdict.action is Action.RETRY:
            logger.error("job %s: %s; retried later", message.job_id, verdict.error)
            claim.lost = True  # not renewed: reclaimed after the lease
            return
        logger.info("job %s was %s; not joining", message.job_id, verdict.error)
        await self._outcomes.finish(claim, message, JobStatus.SUCCESS)

    async def _start(self, claim: Claim, message: JobMessage, room: str) -> bool:
        """Mark the job started here and start its session; False if no longer ours."""
        ours = await self._mark_started(claim, running=True)
        if ours is None:
            # Its record is not as enqueued (judged without it): judged again.
            return await self._check_again(claim)
        if not ours:
            logger.warning(
                "job %s: its entry is no longer ours (another worker serves the call); not joining",
                message.job_id,
            )
            return False
        delivery = claim.delivery
        # Any takeover: our joining removes the previous agent participant.
        claim.reclaimed = claim.start is not Start.FRESH
        if delivery.deliveries > 1:
            logger.warning(
                "job %s (room %s): taking the call over (delivery %d)",
                message.job_id,
                message.room,
                delivery.deliveries,
            )
        elif message.handover_from:
            logger.info(
                "job %s (room %s): taking the call over from draining worker %s",
                message.job_id,
                message.room,
                message.handover_from,
            )
        # Contested, with the job's agent in the room: the caller was greeted,
        # whether or not Redis kept the checkpoint that says so.
        contested_live = claim.start is Start.CONTESTED and room == OURS_IN_ROOM
        claim.control = SessionControl(greeted=contested_live)
        self._ctx.spawn(self._session, claim)
        return True

    async def _session(self, claim: Claim) -> None:
        """The claim's session; a session whose process died is admitted again at once."""
        again = await self._sessions.serve(claim)
        if again is not None:
            self.admit([again])

    async def _contest(self, claim: Claim, message: JobMessage) -> bool:
        """A first delivery of a call that runs: wait a lease for the worker serving it.

        Redis lost that worker's read (restored from a snapshot taken before
        it, a failover). A live worker renews within a lease, sees this
        worker's read of the restored entry as a stray one and writes the call
        back, deleting it (:data:`openrtc.store.scripts.RENEW`): this claim is then
        lost and nobody joins. A worker that does not (dead, frozen past a
        lease) loses the call to this one, which takes it over from the
        checkpoint. True to go on.
        """
        lease = self._ctx.settings.lease
        logger.warning(
            "job %s (room %s): delivered as new, but the call runs already (Redis lost "
            "another worker's read?); waiting up to %.1fs for that worker before taking it over",
            message.job_id,
            message.room,
            lease,
        )
        with anyio.move_on_after(lease):
            await claim.lost_event.wait()
        if claim.lost:
            logger.info(
                "job %s: the worker serving it claimed it back; not joining", message.job_id
            )
            return False
        return True

    async def _mark_started(self, claim: Claim, *, running: bool = False) -> bool | None:
        """The job's record says it runs here (its entry still ours); False if not ours.

        ``running``: the RUNNING status event goes in the same round trip.
        ``None``: the entry was judged without its record, and the record is
        not as enqueued (:meth:`JobConsumer.start_unread`): not marked.
        With Redis unreachable it is assumed ours: nobody else can take it meanwhile.
        """
        ctx, message = self._ctx, claim.message
        assert message is not None
        fields: dict[str, str | int | float] = {
            RecordField.ATTEMPT: claim.delivery.deliveries,
            RecordField.STARTED_AT: f"{ctx.clock():.6f}",
            RecordField.TENANT: message.tenant,
        }
        status = self._outcomes.event(message, JobStatus.RUNNING) if running else None
        start = ctx.consumer.start_unread if claim.record_assumed else ctx.consumer.start
        ours = await ctx.redis(
            lambda: start(claim.entry_id, message.job_id, fields, status=status),
            "job %s: record not updated: %s",
            message.job_id,
        )
        if ours is None:
            return None
        # Marked (or assumed so): a later mark (Redis lost our read) is plain.
        claim.record_assumed = False
        if ours is DOWN:
            return True
        if not ours:
            claim.lost = True
        return ours

    def _judge(
        self,
        delivery: Delivery,
        message: JobMessage | MalformedEntry | None,
        record: dict[str, str] | None,
    ) -> Verdict:
        ctx = self._ctx
        return judge(
            delivery.deliveries,
            message,
            record,
            ctx.clock(),
            ctx.settings,
            redis_offset=ctx.redis_clock_offset,
        )

    async def _job_record(self, job_id: str) -> dict[str, str] | None:
        """The job's record; ``{}`` without a job id, ``None`` when Redis does not answer."""
        if not job_id:
            return {}
        ctx = self._ctx
        record = await ctx.redis(
            lambda: ctx.consumer.job_record(job_id),
            "job %s: cannot read its record (%s)",
            job_id,
            within=math.inf,
        )
        return None if record is DOWN else record


def _log_no_join(message: JobMessage, room: str) -> None:
    """Why a job whose room is gone, or has its agent already, is not joined."""
    if room == "gone":
        logger.info("job %s: room %s is gone; nothing to join", message.job_id, message.room)
    else:
        logger.warning(
            "job %s: room %s already has its agent (%s); not joining a second",
            message.job_id,
            message.room,
            room,
        )

"""Lease keeper: renew the claim on every entry this worker holds, every ``lease / 3``.

From the read that delivered it until it is acknowledged or released. An entry
another worker now owns means that worker took the call over, so the local session
steps aside; an entry Redis forgot (a restart without persistence) is written back,
and the call goes on.
"""

from __future__ import annotations

import math
import time
from functools import partial

import anyio
from anyio.abc import TaskStatus

from openrtc.store.streams import Renewal
from openrtc.worker.claims import Claim, ClaimTable
from openrtc.worker.context import DOWN, WorkerContext, logger

__all__ = ["LeaseKeeper"]


class LeaseKeeper:
    """The lease step."""

    def __init__(self, ctx: WorkerContext, claims: ClaimTable) -> None:
        self._ctx = ctx
        self._claims = claims
        self._outages = ctx.outages

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ctx = self._ctx
        task_status.started()
        while True:
            await anyio.sleep(ctx.step_timeout)
            renewable = [c for c in self._claims if c.renewable]
            if not renewable:
                continue
            held = {c.entry_id: c.message.job_id if c.message else "" for c in renewable}
            counts = {c.entry_id: c.delivery.deliveries for c in renewable}
            healthy = self._healthy()
            renewal = await ctx.redis(
                partial(ctx.consumer.renew, held, healthy, deliveries=counts), outage=True
            )
            if renewal is DOWN:
                ctx.metrics.renewals_failed.inc(len(held))
                continue
            for entry_id in healthy.keys() - {*renewal.lost, *renewal.forgotten}:
                claim = self._claims.get(entry_id)
                if claim is not None:
                    claim.healthy_marked = True
            await self._apply(renewal)
            if ctx.outages != self._outages:
                self._outages = ctx.outages
                self._write_checkpoints_again()

    def _write_checkpoints_again(self) -> None:
        """After an outage, every running call's last checkpoint again.

        Redis may be back with an older one (a snapshot, the lost tail of an
        AOF, a replica behind) or none: sessions write only on change, and a
        crash before a call's next turn would resume its taker from that.
        """
        for claim in self._claims:
            if claim.writer is not None and not claim.settled:
                claim.writer.rewrite()

    def _healthy(self) -> dict[str, int]:
        """Entry id -> its delivery count, for each session that lived a lease unmarked.

        A session that lived a lease is no crash loop: the deliveries so far
        were takeovers of a working call, not failures. Its record says so
        (``RecordField.HEALTHY``) by the renewal, not a round trip of its own.
        """
        now, lease = time.monotonic(), self._ctx.settings.lease
        return {
            c.entry_id: c.delivery.deliveries
            for c in self._claims
            if c.renewable and c.joined_at and not c.healthy_marked and now - c.joined_at >= lease
        }

    async def _apply(self, renewal: Renewal) -> None:
        """Step aside from calls another worker took; write back those Redis forgot."""
        for entry_id in renewal.lost:
            claim = self._claims.get(entry_id)
            if claim is None or claim.settled:
                continue
            self._ctx.metrics.lost.inc()
            claim.lost = True
            claim.lost_event.set()
            if claim.control is not None and claim.message is not None:
                logger.warning("job %s: lease lost to another worker", claim.message.job_id)
                claim.control.stop("lease lost", takeover=True)
        for entry_id in renewal.forgotten:
            claim = self._claims.get(entry_id)
            if claim is not None and not claim.settled:
                await self._write_back(claim)

    async def _write_back(self, claim: Claim) -> None:
        """Redis forgot a call this worker holds: put its entry and record back, ours."""
        if claim.message is None:
            return  # not even decoded yet: it will be dropped by its own check
        ctx, message, old = self._ctx, claim.message, claim.entry_id
        new = await ctx.redis(
            lambda: ctx.consumer.write_back(message.job_id, claim.delivery.fields, forgotten=old),
            "job %s: entry not written back yet: %s",
            message.job_id,
        )
        if new is DOWN:
            return
        if claim.settled:
            # It ended while being written back: the new entry is done with too.
            await ctx.redis(lambda: ctx.consumer.ack(new), within=math.inf)
            return
        self._claims.rename(claim, old, new)
        if claim.writer is not None:
            claim.writer.rewrite()  # gone with the entry
        logger.warning(
            "job %s: Redis had lost its entry (restarted without persistence?); "
            "written back as %s, the call goes on",
            message.job_id,
            new,
        )

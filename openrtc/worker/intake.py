"""Intake: read new entries while there are free slots, reclaim those of frozen or dead peers.

Each delivered entry goes to the entry check (:mod:`openrtc.worker.entry_check`). With
live peers a worker reads one entry at a time, and only when
:func:`openrtc.worker.spread.decide` says it is the one to take it. The intake also
reports Redis outages; after one it reclaims nothing for a lease
(:meth:`openrtc.worker.context.WorkerContext.redis_up`).
"""

from __future__ import annotations

import math
import time
from typing import Final

import anyio
from anyio.abc import TaskStatus

from openrtc.store.streams import Delivery
from openrtc.worker.claims import ClaimTable
from openrtc.worker.context import DOWN, READ_BLOCK_MS, WorkerContext, logger
from openrtc.worker.entry_check import EntryCheck
from openrtc.worker.heartbeat import PeerView
from openrtc.worker.spread import DEFER_STEP, MAX_DEFER, PeerLoad, decide

__all__ = ["RECLAIM_INTERVAL", "Intake"]

#: How often entries of dead workers are looked for.
RECLAIM_INTERVAL: Final = 1.0


class Intake:
    """The consume step (until the worker drains)."""

    def __init__(
        self, ctx: WorkerContext, claims: ClaimTable, view: PeerView, entry_check: EntryCheck
    ) -> None:
        self._ctx = ctx
        self._claims = claims
        self._view = view
        self._entry_check = entry_check
        # Read and written by this step only.
        self._last_reclaim = 0.0
        self._last_forget = 0.0
        #: Since when the next job has been left to peers (``None``: not left),
        #: and the calls they held then (progress resets the wait).
        self._defer_since: float | None = None
        self._defer_progress = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ctx, claims = self._ctx, self._claims
        self._last_forget = time.monotonic()
        task_status.started()
        while not ctx.draining:
            if ctx.failures.refusing() is not None:
                # Too many sessions in a row failed: peers take the jobs meanwhile.
                await anyio.sleep(RECLAIM_INTERVAL)
                continue
            if claims.free <= 0:
                with anyio.move_on_after(RECLAIM_INTERVAL):
                    await claims.changed()
                continue
            read = await ctx.redis(self._pass, within=math.inf, outage=True)
            if read is DOWN:
                await anyio.sleep(0.5)
                continue
            deliveries, deferred = read
            if deferred:
                # A less loaded peer reads the next entry; look again soon,
                # or at once when a call of ours ends.
                with anyio.move_on_after(DEFER_STEP):
                    await claims.changed()
                continue
            self._entry_check.admit(deliveries)

    async def _pass(self) -> tuple[list[Delivery], bool]:
        """One pass: reclaimed or read entries, and whether the next read was left to a peer."""
        ctx = self._ctx
        deliveries: list[Delivery] = []
        now = time.monotonic()
        if now - self._last_reclaim >= RECLAIM_INTERVAL and ctx.may_reclaim():
            self._last_reclaim = now
            wanted = self._claims.free
            deliveries = await ctx.consumer.reclaim(ctx.settings.lease, wanted)
            if len(deliveries) >= wanted:
                # Every free slot filled: more dead calls may wait
                # behind these, so the next pass runs as soon as a
                # slot frees, not a reclaim interval later.
                self._last_reclaim = 0.0
        deferred = False
        if not deliveries:
            count = await self._read_count()
            deferred = count == 0
            if count:
                block = int(min(READ_BLOCK_MS, RECLAIM_INTERVAL * 1000))
                deliveries = await ctx.consumer.read(count, block)
        forget_after = ctx.settings.forget_consumers_after
        if now - self._last_forget >= forget_after / 2:
            self._last_forget = now
            gone = await ctx.consumer.forget_consumers(forget_after)
            if gone:
                logger.info("removed consumers of workers that are gone: %s", gone)
        return deliveries, deferred

    async def _read_count(self) -> int:
        """How many new entries to read now: 0 to leave the next one to a peer.

        Alone, as many as there are free slots. With peers, one at a time and
        only when :func:`openrtc.worker.spread.decide` says this worker is the one to
        take it: one ``XPENDING`` round trip between reads, none for a read
        that is already waiting (an idle worker's join path is unchanged).
        """
        ctx, view = self._ctx, self._view
        if not view.peers:
            return self._claims.free
        held = await ctx.consumer.held_by_consumer()
        # Counted as the peers count it, from the same reply.
        me = PeerLoad(
            held.get(ctx.settings.worker_id, 0), ctx.settings.concurrency, view.overloaded
        )
        peers = [
            PeerLoad(held.get(worker_id, 0), capacity, overloaded)
            for worker_id, (capacity, overloaded) in view.peers.items()
        ]
        decision = decide(me, peers)
        if not decision.read and me.held < me.capacity:
            # Bounded: peers that show room but make no progress (none reads,
            # none ends a call) while a job waits must not strand it.
            now = time.monotonic()
            progress = sum(p.held for p in peers)
            if self._defer_since is None:
                logger.debug("leaving the next job to a peer: %s", decision.reason)
            if self._defer_since is None or progress != self._defer_progress:
                self._defer_since, self._defer_progress = now, progress
            stalled = now - self._defer_since
            if stalled >= MAX_DEFER:
                oldest = await ctx.consumer.oldest_unread_ms()
                if oldest is not None:
                    # Counted from when it arrived, too: a job that came just
                    # now has not been left waiting by anyone yet.
                    waited = ctx.clock() + ctx.redis_clock_offset - oldest / 1000
                    decision = decide(me, peers, stalled=min(stalled, waited))
        if decision.read:
            self._defer_since = None
            return 1
        return 0

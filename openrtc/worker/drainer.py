"""Drainer: after a stop request, take no new jobs and let running calls finish or go.

Running calls go to peers as they have free slots (handover: at a turn boundary,
with the last checkpoint), or may go on for up to ``drain_timeout``; calls still
here then are left to the lease. Entries still being checked are released by their
check (never started while draining).
"""

from __future__ import annotations

from functools import partial
from typing import Final

import anyio
from anyio.abc import TaskGroup

from openrtc.session.session import HANDOVER_TURN_WAIT
from openrtc.worker.claims import Claim, ClaimTable
from openrtc.worker.context import DOWN, WorkerContext, logger
from openrtc.worker.heartbeat import Heartbeat, PeerView

__all__ = ["Drainer"]

#: Beyond the session's own wait for a turn boundary: its answer's way back.
HANDOVER_SLACK: Final = 2.0
#: While draining, how often to look again for peers with room for our calls.
HANDOVER_RECHECK: Final = 2.0
#: Calls handed over at once, each until its peer has joined (or
#: HANDOVER_JOIN_WAIT): a peer starting many sessions at once starts each
#: later, and the caller hears the gap.
HANDOVER_CONCURRENCY: Final = 2
HANDOVER_JOIN_WAIT: Final = 5.0


class Drainer:
    """The drain, run once the worker was asked to stop; the only writer of ``ctx.draining``."""

    def __init__(
        self, ctx: WorkerContext, claims: ClaimTable, heartbeat: Heartbeat, view: PeerView
    ) -> None:
        self._ctx = ctx
        self._claims = claims
        self._heartbeat = heartbeat
        self._view = view

    async def drain(self) -> None:
        """Until every claim is gone, or ``drain_timeout``: then the rest go to peers' leases."""
        ctx, settings = self._ctx, self._ctx.settings
        ctx.draining = True
        logger.info(
            "draining: no new jobs; %d running session(s) %smay go on for up to %.0fs",
            len(self._claims.running),
            "go to peers as they have free slots, or " if settings.handover else "",
            settings.drain_timeout,
        )
        # Running sessions may finish, or leave once the peer they were handed
        # to has joined in their place.
        with anyio.move_on_after(settings.drain_timeout):
            async with anyio.create_task_group() as tg:
                if settings.handover:
                    tg.start_soon(self._hand_over_to_peers, tg)
                while self._claims:
                    await self._claims.changed()
                tg.cancel_scope.cancel()
        if self._claims:
            # Not acknowledged: their entries stay pending, and another worker
            # takes the calls over once the lease lapses.
            logger.warning("drain timeout: leaving %d call(s) to other workers", len(self._claims))
            for claim in self._claims:
                if claim.control is not None:
                    claim.control.stop("worker drain timeout", takeover=True)

    async def _hand_over_to_peers(self, tg: TaskGroup) -> None:
        """While draining: hand running calls to peers as they have free slots.

        Looked at again every :data:`HANDOVER_RECHECK` seconds: a peer that
        starts after the SIGTERM (a rollout without surge) still takes the
        calls, and one that is full now may have room later.
        """
        limiter = anyio.CapacityLimiter(HANDOVER_CONCURRENCY)
        while True:
            waiting = [
                c
                for c in self._claims
                if c.control is not None
                and c.message is not None
                and not c.asked
                and not (c.settled or c.lost or c.control.stopping)
            ]
            if waiting:
                # Calls being handed over, or handed over with the peer not
                # joined yet, hold a slot there already (their entries unread).
                in_flight = sum(1 for c in self._claims if c.asked)
                free = max(0, await self._peer_slots() - in_flight)
                if free:
                    logger.info(
                        "handing %d of %d running call(s) to peers (%d free slots)",
                        min(free, len(waiting)),
                        len(waiting),
                        free,
                    )
                for claim in waiting[:free]:
                    claim.asked = True
                    tg.start_soon(self._hand_over, claim, limiter)
            await anyio.sleep(HANDOVER_RECHECK)

    async def _peer_slots(self) -> int:
        """Free session slots of the agent's other live workers (0 if Redis does not answer).

        Beats first: peers see this worker draining (capacity 0) and do not
        count it, as it no longer counts them once they drain.
        """

        async def look() -> dict[str, int]:
            await self._heartbeat.beat()
            await self._heartbeat.refresh_peers()
            return await self._ctx.consumer.held_by_consumer() if self._view.peers else {}

        held = await self._ctx.redis(
            look, "draining: cannot see peers (%s); running calls stay here"
        )
        if held is DOWN:
            return 0
        return sum(
            max(0, capacity - held.get(worker_id, 0))
            for worker_id, (capacity, overloaded) in self._view.peers.items()
            if not overloaded
        )

    async def hand_over_call(self, claim: Claim) -> None:
        """Hand one running call over now, as the drain does (a guard's: its process is
        over its memory limit); until the peer has joined, or it was not handed over."""
        if claim.asked:
            return
        claim.asked = True
        if not await self._hand_over_one(claim):
            claim.asked = False  # the drain may try it again
            return
        await self._watch_released(claim)

    async def _hand_over(self, claim: Claim, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            if not await self._hand_over_one(claim):
                return
            # Paced: the next call goes once this one's peer is in.
            with anyio.move_on_after(HANDOVER_JOIN_WAIT):
                await claim.dropped.wait()
        await self._watch_released(claim)

    async def _hand_over_one(self, claim: Claim) -> bool:
        """Hand a running call to a peer: at a turn boundary, with its last checkpoint.

        True when its entry went back to the stream for a peer.

        The entry goes back to the stream marked as a handover; the peer that
        reads it joins with the job's identity and the restored conversation,
        which removes this session's participant (it ends as taken over). Any
        failure leaves the entry unrenewed, so a peer takes the call over after
        the lease instead: never two entries, never a lost call.
        """
        ctx, message, control = self._ctx, claim.message, claim.control
        if message is None or control is None:
            return False
        # The session stops taking turns once ready: what it answered from then
        # on the peer would not know. Called off only if the call stays here
        # (Redis lost the released entry: :meth:`_take_back`); after a failed
        # release a peer takes the call over after the lease, from this checkpoint.
        control.ask_handover()
        with anyio.move_on_after(HANDOVER_TURN_WAIT + HANDOVER_SLACK):
            await control.handover_ready.wait()
        if claim.writer is not None:
            with anyio.move_on_after(ctx.step_timeout):
                await claim.writer.flush()
        if claim.settled or claim.lost or control.stopping:
            return False  # it ended, or went to another worker, meanwhile
        claim.settled = claim.handed_over = True
        new_id = await ctx.redis(
            lambda: ctx.consumer.release(claim.entry_id, message.job_id, handover=True),
            "job %s: not handed over (%s); a peer takes it over after the lease",
            message.job_id,
        )
        if new_id is DOWN:
            return False
        if new_id is None:
            logger.warning("job %s: not handed over: the entry is not ours", message.job_id)
            return False
        claim.released = new_id
        ctx.stats.handed_over += 1
        ctx.metrics.handed_over.inc()
        logger.info(
            "job %s: handed over at a turn boundary (entry %s -> %s); leaving when a peer joins",
            message.job_id,
            claim.entry_id,
            new_id,
        )
        return True

    async def _watch_released(self, claim: Claim) -> None:
        """Until the peer has joined (our session ends): is the released entry still there?

        Redis can lose it before a peer reads it (a restart without
        persistence, a failover right after the release): then nobody owns
        the call. It is written back as ours, and handed over again later.
        """
        ctx, message = self._ctx, claim.message
        assert message is not None
        while not claim.dropped.is_set():
            with anyio.move_on_after(ctx.step_timeout):
                await claim.dropped.wait()
            if claim.dropped.is_set() or not claim.released:
                return
            where = await ctx.redis(
                partial(ctx.consumer.released, claim.released, message.job_id),
                "job %s: handed-over entry not checked (%s)",
                message.job_id,
            )
            if where == "moved":
                return  # a peer has it; it joins, or the lease brings it back
            if where == "forgotten" and not claim.dropped.is_set():
                await self._take_back(claim)
                return

    async def _take_back(self, claim: Claim) -> None:
        """Redis lost the entry of a call this worker handed over: the call is ours again."""
        ctx, message = self._ctx, claim.message
        assert message is not None
        released, old = claim.released, claim.entry_id
        new = await ctx.redis(
            lambda: ctx.consumer.write_back(
                message.job_id, claim.delivery.fields, forgotten=released
            ),
            "job %s: not taken back yet (%s)",
            message.job_id,
        )
        if new is DOWN:
            return
        self._claims.rename(claim, old, new)
        claim.released = ""
        claim.settled = claim.handed_over = claim.asked = False
        if claim.control is not None:
            claim.control.call_off_handover()  # it takes turns again until asked anew
        if claim.writer is not None:
            claim.writer.rewrite()  # gone with the entry
        logger.warning(
            "job %s: Redis lost the handed-over entry %s before a peer took the call; "
            "written back as ours (%s), handed over again when a peer has room",
            message.job_id,
            released,
            new,
        )

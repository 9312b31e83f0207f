"""Crash watch: take the calls of peers whose process is gone over at once, not after a lease.

A worker holds a liveness subscription while its process lives (subscribed, and
watched, before its first read: no entry is ever held by a worker whose crash would
go unseen); peers take the calls of one whose subscription closed (a killed
process) over within about a second. A frozen or partitioned worker keeps its
subscription and is left to the lease.
"""

from __future__ import annotations

from functools import partial
from typing import Final

import anyio
from anyio.abc import TaskStatus

from openrtc.store.membership import hold_liveness
from openrtc.store.streams import RefusedCommand
from openrtc.worker.claims import ClaimTable
from openrtc.worker.context import DOWN, WorkerContext, logger
from openrtc.worker.entry_check import EntryCheck

__all__ = ["CRASH_CHECK_INTERVAL", "CrashWatch"]

#: How often each worker asks whether a watched peer crashed; every watched
#: worker is looked at about this often, shared by the agent's workers.
CRASH_CHECK_INTERVAL: Final = 0.15


class CrashWatch:
    """The crash step: this worker's liveness subscription, and its peers' crashes."""

    def __init__(self, ctx: WorkerContext, claims: ClaimTable, entry_check: EntryCheck) -> None:
        self._ctx = ctx
        self._claims = claims
        self._entry_check = entry_check

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Started once this worker's liveness subscription holds (and it is watched)."""
        consumer = self._ctx.consumer
        async with anyio.create_task_group() as tg:
            await tg.start(
                hold_liveness, self._ctx.redis_client, consumer.alive_channel, consumer.watch
            )
            task_status.started()
            await self._watch_peers()

    async def _watch_peers(self) -> None:
        ctx = self._ctx
        grace = min(ctx.settings.crash_grace, ctx.settings.lease / 2)
        refused = False
        while True:
            await anyio.sleep(CRASH_CHECK_INTERVAL)
            if not ctx.may_reclaim():
                continue
            # Also when full (or draining): the pass records this worker's
            # free slots, by which peers share a crashed worker's calls.
            free = 0 if ctx.draining else max(0, self._claims.free)
            try:
                # Not an outage step: the heartbeat, intake and lease keeper report those.
                deliveries = await ctx.redis(
                    partial(ctx.consumer.reclaim_crashed, grace, free, CRASH_CHECK_INTERVAL),
                    passthrough=(RefusedCommand,),
                )
            except RefusedCommand as exc:  # a refused command (the ACL?), not an outage
                if not refused:
                    logger.error("crash detection failed (leases still apply): %s", exc)
                refused = True
                continue
            if deliveries is DOWN:
                continue
            if deliveries:
                logger.warning(
                    "taking over %d call(s) of crashed worker(s) (liveness gone for %.1fs)",
                    len(deliveries),
                    grace,
                )
            self._entry_check.admit(deliveries)

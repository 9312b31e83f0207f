"""The reconciler's seat: which dispatcher runs the reconciler, and when.

The dispatchers contend for one Redis lease
(:class:`~openrtc.store.reconcile.LeaderLease`); its holder runs a
:class:`~openrtc.dispatcher.reconciler.Reconciler` pass every
``reconcile_interval`` (the lease renewed all through it) and counts it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from openrtc.dispatcher.context import logger
from openrtc.dispatcher.reconciler import LeaseLost, Reconciler
from openrtc.ops.metrics import DispatcherMetrics
from openrtc.store.reconcile import LeaderLease
from openrtc.store.streams import REDIS_DOWN
from openrtc.supervision import describe

__all__ = ["ReconcileLoop"]


class ReconcileLoop:
    """The dispatcher's part that runs the reconciler: contend for the lease, and as its
    holder run a pass every ``interval``.

    Args:
        reconciler: the passes.
        lease: the dispatchers' lease (one holder at a time).
        interval: seconds between passes (``reconcile_interval``).
        metrics: where passes, rooms dispatched and leadership are counted.
        draining: whether the dispatcher stops (no pass starts then).
    """

    def __init__(
        self,
        reconciler: Reconciler,
        lease: LeaderLease,
        interval: float,
        metrics: DispatcherMetrics,
        draining: Callable[[], bool],
    ) -> None:
        self.reconciler = reconciler
        self.lease = lease
        self._interval = interval
        self._metrics = metrics
        self._draining = draining
        #: Rooms left alone because their routing names an agent that is not
        #: registered (no metric: counted here only).
        self.unroutable = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold or contend for the lease; as its holder, run a pass each interval."""
        task_status.started()
        while not self._draining():
            await anyio.sleep(self._interval)
            if self._draining():
                return
            if await self._lead():
                await self._pass()

    async def _lead(self) -> bool:
        """Take or renew the lease; whether this dispatcher holds it."""
        was_leader = self.lease.held
        try:
            with anyio.fail_after(max(1.0, self._interval)):
                leader = await self.lease.hold()
        except (*REDIS_DOWN, TimeoutError) as exc:
            # Without Redis the lease lapses: another dispatcher may take it.
            self.lease.held = leader = False
            logger.debug("reconciler lease not renewed: %s", describe(exc))
        if leader != was_leader:
            logger.info(
                "reconciler: %s",
                "this dispatcher runs it now" if leader else "another dispatcher runs it",
            )
            self.reconciler.forget()
        self._metrics.reconcile_leader.set(int(leader))
        return leader

    async def _pass(self) -> None:
        try:
            counts = await self.reconciler.run_pass(self.lease)
        except LeaseLost as exc:
            self.lease.held = False
            self._metrics.reconcile_leader.set(0)
            self.reconciler.forget()
            logger.warning("reconciler pass abandoned: %s", exc)
            return
        except Exception as exc:  # LiveKit's API or Redis: the next pass retries
            self._metrics.reconcile_passes.labels("failed").inc()
            logger.warning("reconciler pass failed: %s", describe(exc))
            return
        self._metrics.reconcile_passes.labels("ok").inc()
        self._metrics.reconciled.inc(counts.dispatched)
        self.unroutable += counts.unroutable

    async def aclose(self) -> None:
        """Give the lease up (Redis may be gone) and close the LiveKit API client."""
        with contextlib.suppress(*REDIS_DOWN):
            await self.lease.release()
        await self.reconciler.aclose()

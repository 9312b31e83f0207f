"""Heartbeat: this worker's record for the dispatcher and its peers, and its view of them.

Every ``heartbeat_interval``: the worker's record (capacity, running calls, CPU
state; the dispatcher's backpressure and ``openrtc status`` read it), the agent's
other live workers (:class:`PeerView`, read by the intake's spread and the drainer),
and the Redis clock's offset to this host's.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from openrtc.store.membership import Presence, live_members, redis_time
from openrtc.worker.claims import ClaimTable
from openrtc.worker.context import WorkerContext, logger
from openrtc.worker.spread import CpuLoad

__all__ = ["Heartbeat", "PeerView"]


@dataclass(slots=True)
class PeerView:
    """The agent's other live workers, and this worker's CPU state. Writer: :class:`Heartbeat`."""

    #: Worker id -> (capacity, above its CPU threshold); 0 capacity while draining.
    peers: dict[str, tuple[int, bool]] = field(default_factory=dict)
    #: This host's CPU sampler (``None`` without a load threshold).
    cpu: CpuLoad | None = None
    cpu_load: float = 0.0
    #: At or above the load threshold: new calls go to peers below it.
    overloaded: bool = False


class Heartbeat:
    """The heartbeat step: beat, look at the peers, measure Redis's clock."""

    def __init__(
        self, ctx: WorkerContext, claims: ClaimTable, presence: Presence, view: PeerView
    ) -> None:
        self._ctx = ctx
        self._claims = claims
        self._presence = presence
        self._view = view

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        interval = self._ctx.settings.heartbeat_interval
        task_status.started()
        while True:
            await anyio.sleep(interval)
            # Outages seen here too: the intake does not read while every slot is busy.
            await self._ctx.redis(self._every_beat, within=max(1.0, interval * 2), outage=True)

    async def _every_beat(self) -> None:
        await self.beat()
        await self.refresh_peers()
        await self.measure_redis_clock()

    @property
    def _refusing(self) -> bool:
        # No capacity shown while draining or stopped by failures: peers and the
        # dispatcher count on it for nothing (a peer would leave it jobs).
        return self._ctx.draining or self._ctx.failures.refusing() is not None

    async def beat(self) -> None:
        """Write this worker's record (and keep its membership)."""
        s, view = self._ctx.settings, self._view
        self._measure_cpu()
        running = self._claims.running
        await self._presence.beat(
            {
                "agent": s.agent,
                "capacity": 0 if self._refusing else s.concurrency,
                "running": len(running),
                "isolation": s.isolation,
                "jobs": ",".join(m.job_id for m in running),
                "draining": int(self._ctx.draining),
                "overloaded": int(view.overloaded),
                "cpu": f"{view.cpu_load:.3f}",
            }
        )

    async def refresh_peers(self) -> None:
        """The agent's other live workers: capacity (0 while draining), CPU state."""
        s, redis, keys = self._ctx.settings, self._ctx.redis_client, self._ctx.keys
        ids = [m for m in await live_members(redis, keys.workers(s.agent)) if m != s.worker_id]
        pipe = redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hmget(keys.worker(worker_id), ["capacity", "overloaded"])
        records = await pipe.execute() if ids else []
        peers: dict[str, tuple[int, bool]] = {}
        for worker_id, (capacity, overloaded) in zip(ids, records, strict=True):
            if capacity is None:  # gone between the two reads
                continue
            with contextlib.suppress(ValueError):
                peers[worker_id] = (int(capacity), overloaded in (b"1", "1"))
        self._view.peers = peers

    async def measure_redis_clock(self) -> None:
        """Redis's clock minus this host's (the time of one round trip's middle)."""
        ctx = self._ctx
        before = ctx.clock()
        now = await redis_time(ctx.redis_client, ctx.keys.jobs(ctx.settings.agent))
        after = ctx.clock()
        ctx.redis_clock_offset = now - (before + after) / 2

    def _measure_cpu(self) -> None:
        threshold, view = self._ctx.settings.load_threshold, self._view
        if view.cpu is None or threshold is None:
            return
        view.cpu_load = view.cpu.sample()
        overloaded = view.cpu_load >= threshold
        if overloaded != view.overloaded:
            logger.log(
                logging.WARNING if overloaded else logging.INFO,
                "CPU load %.0f%% %s the threshold %.0f%%: %s",
                view.cpu_load * 100,
                "at or above" if overloaded else "back under",
                threshold * 100,
                "new calls go to peers below it while they have room"
                if overloaded
                else "reading new calls again",
            )
        view.overloaded = overloaded

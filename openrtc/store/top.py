"""The fleet view in Redis: each worker's snapshot written, every live worker's read.

A worker's snapshot (:class:`~openrtc.wire.top.WorkerSnapshot`) is one
expiring string under :meth:`~openrtc.wire.keys.Keys.top`: a worker that dies
drops out of ``openrtc top`` when it expires, one that stops deletes it.
Reading the fleet is three round trips whatever its size: the agents, their
live workers, the snapshots.
"""

from __future__ import annotations

import math
from typing import Any

from openrtc.store.membership import redis_time
from openrtc.store.streams import RedisClient
from openrtc.wire.keys import Keys
from openrtc.wire.top import WorkerSnapshot

__all__ = ["publish_snapshot", "read_snapshots", "withdraw_snapshot"]


async def publish_snapshot(
    redis: RedisClient, keys: Keys, snapshot: WorkerSnapshot, *, ttl: float
) -> None:
    """Write one worker's snapshot, expiring after ``ttl`` seconds."""
    await redis.set(keys.top(snapshot.worker), snapshot.encode(), px=max(1, math.ceil(ttl * 1000)))


async def withdraw_snapshot(redis: RedisClient, keys: Keys, worker_id: str) -> None:
    """A stopping worker's snapshot removed (it runs no session any more)."""
    await redis.delete(keys.top(worker_id))


async def read_snapshots(
    redis: RedisClient, keys: Keys, *, agents: set[str] | None = None
) -> list[WorkerSnapshot]:
    """The snapshots of every live worker (of ``agents``, if given), by worker id.

    Liveness is the membership's (heartbeat expiry by Redis's clock), so a
    snapshot left by a worker that died is not shown even before it expires.
    An unreadable snapshot (written by hand, another version) is skipped.
    """
    names = sorted(_s(a) for a in await redis.smembers(keys.agents))
    if agents is not None:
        names = [a for a in names if a in agents]
    if not names:
        return []
    now = await redis_time(redis, keys.agents)
    pipe = redis.pipeline(transaction=False)
    for agent in names:
        # ZRANGE BYSCORE, not ZRANGEBYSCORE: the ACL grants ZRANGE (README).
        pipe.zrange(keys.workers(agent), f"({now}", "+inf", byscore=True)
    replies = await pipe.execute()
    workers = sorted({_s(w) for reply in replies for w in reply})
    if not workers:
        return []
    pipe = redis.pipeline(transaction=False)
    for worker_id in workers:
        pipe.get(keys.top(worker_id))
    found = [WorkerSnapshot.decode(raw) for raw in await pipe.execute()]
    return [snapshot for snapshot in found if snapshot is not None]


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

"""Who is alive, and how loaded each agent is: heartbeats in Redis.

Dispatchers and workers each keep a hash describing themselves (with a TTL)
and a score in a sorted set equal to their heartbeat's expiry time, both by
Redis's clock (never a host's: hosts' clocks differ). Readers drop members
whose expiry has passed by Redis's clock, so a process killed with ``kill -9``
disappears within ``membership_ttl`` seconds without anyone cleaning up.

A worker also holds a liveness subscription (:func:`hold_liveness`) for as
long as its process lives: a killed process's is gone at once, which is how
peers take its calls over without waiting for a lease.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from openrtc.store.redis_url import refresh_slots, slot_master_client
from openrtc.store.scripts import HEARTBEAT, LIVE_MEMBERS, REDIS_TIME
from openrtc.store.streams import REDIS_DOWN, workers_group
from openrtc.supervision import backoff_delay
from openrtc.wire.keys import Keys

__all__ = [
    "AgentLoad",
    "LoadView",
    "Presence",
    "heartbeat",
    "hold_liveness",
    "leave",
    "read_agent_loads",
    "redis_time",
]

#: How often a liveness subscription says again that it is there (refreshes
#: the watch, which expires when nobody renews it).
LIVENESS_REFRESH = 10.0


@dataclass(frozen=True, slots=True)
class AgentLoad:
    """One agent's live capacity and queue, as the dispatcher sees it."""

    agent: str
    workers: int = 0
    capacity: int = 0
    running: int = 0
    #: Entries not yet delivered to any worker.
    backlog: int = 0
    #: Entries delivered and not yet acknowledged (running, or being reclaimed).
    pending: int = 0
    #: Whether the stream has its consumer group (a restarted Redis has none).
    has_group: bool = True

    @property
    def free(self) -> int:
        """Sessions the live workers can still start."""
        return max(0, self.capacity - self.running)


async def _close(pubsub: PubSub) -> None:
    # PubSub.aclose is typed from redis-py 8.2 only: called through a typed
    # alias, mypy --strict passes on 8.1 and 8.2 without an ignore.
    close: Callable[[], Awaitable[None]] = pubsub.aclose
    await close()


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


async def redis_time(redis: Redis, key: str) -> float:
    """Redis's clock (unix s): the one clock every expiry and age is judged by.

    Read on the master serving ``key`` (:data:`openrtc.store.scripts.REDIS_TIME`):
    under Redis Cluster a keyless ``TIME`` goes to a default node, which a
    failover can leave dead while the key's slot is served elsewhere.
    """
    now = await redis.register_script(REDIS_TIME)(keys=[key])
    return float(now)


async def heartbeat(
    redis: Redis,
    *,
    registry_key: str,
    record_key: str,
    member: str,
    fields: Mapping[str, str | int | float],
    ttl: float,
) -> float:
    """Refresh one member: its expiry score and its record hash (with TTL); Redis's now.

    Both by Redis's clock (:data:`openrtc.store.scripts.HEARTBEAT`): the score is
    Redis's now + ``ttl``, the record's ``heartbeat_at`` Redis's now. A host
    whose clock is wrong is neither expired early nor kept alive after death.
    """
    # Members killed without leaving are dropped by readers; with no reader
    # (no dispatcher, nobody running status) they would pile up, one per
    # crashed process: the script drops those expired ten TTLs ago.
    now = await redis.register_script(HEARTBEAT)(
        keys=[registry_key], args=[member, int(ttl * 1000), int(ttl * 10_000)]
    )
    record: dict[Any, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "heartbeat_at": _s(now),
        **fields,
    }
    pipe = redis.pipeline(transaction=False)
    pipe.hset(record_key, mapping=record)
    pipe.expire(record_key, max(1, int(ttl * 3)))
    await pipe.execute()
    return float(_s(now))


async def leave(redis: Redis, *, registry_key: str, record_key: str, member: str) -> None:
    """Remove a member at a clean shutdown (others need not wait for its TTL)."""
    pipe = redis.pipeline(transaction=False)
    pipe.zrem(registry_key, member)
    pipe.delete(record_key)
    await pipe.execute()


async def live_members(redis: Redis, registry_key: str) -> list[str]:
    """Members whose heartbeat has not expired by Redis's clock (expired ones are removed)."""
    members = await redis.register_script(LIVE_MEMBERS)(keys=[registry_key])
    # A member that is not UTF-8 (written by hand) names no record: it reads
    # as a worker without one, never as an error that stops the reader.
    return [_s(m) for m in members]


async def read_agent_loads(
    redis: Redis, keys: Keys, agents: Sequence[str], *, now: float | None = None
) -> dict[str, AgentLoad]:
    """Live workers, capacity, running sessions, backlog and pending per agent.

    Two round trips whatever the number of agents: one for the membership
    sets and the streams' group info, one for the workers' records. Expiry
    scores are Redis's clock (see :func:`heartbeat`): so is ``now`` they are
    judged by (what this member's heartbeat just returned), else it is read
    first (``TIME`` is refused in a Redis Cluster pipeline).
    """
    if now is None:
        now = await redis_time(redis, keys.workers(agents[0]) if agents else keys.dispatchers)
    pipe = redis.pipeline(transaction=False)
    # Heartbeats drop the long dead; here expired members are only skipped.
    for agent in agents:
        pipe.zrange(keys.workers(agent), 0, -1, withscores=True)
        pipe.xinfo_groups(keys.jobs(agent))
        pipe.xlen(keys.jobs(agent))
    replies = await pipe.execute(raise_on_error=False)
    members: dict[str, list[bytes]] = {}
    queue: dict[str, tuple[int, int, bool]] = {}
    for i, agent in enumerate(agents):
        worker_ids, groups, length = replies[i * 3 : i * 3 + 3]
        if isinstance(worker_ids, Exception):
            raise worker_ids
        members[agent] = [member for member, expires in worker_ids if expires > now]
        queue[agent] = _queue(groups, length)
    totals = await _worker_totals(redis, keys, members)
    return {
        agent: AgentLoad(
            agent=agent,
            workers=totals[agent][0],
            capacity=totals[agent][1],
            running=totals[agent][2],
            backlog=queue[agent][0],
            pending=queue[agent][1],
            has_group=queue[agent][2],
        )
        for agent in agents
    }


def _queue(groups: Any, length: Any) -> tuple[int, int, bool]:
    """Backlog, pending and whether the workers group exists, from ``XINFO GROUPS`` and ``XLEN``."""
    size = 0 if isinstance(length, Exception) else _int(length)
    if isinstance(groups, Exception):
        return size, 0, False  # stream without a group yet: all of it waits
    group = workers_group(groups, size)
    return (0, 0, False) if group is None else (group.backlog, group.pending, True)


async def _worker_totals(
    redis: Redis, keys: Keys, members: Mapping[str, list[bytes]]
) -> dict[str, list[int]]:
    """Per agent: live workers with a record, their capacity and running sessions."""
    pipe = redis.pipeline(transaction=False)
    order: list[str] = []
    for agent, worker_ids in members.items():
        for worker_id in worker_ids:
            pipe.hmget(keys.worker(worker_id.decode(errors="replace")), ["capacity", "running"])
            order.append(agent)
    records = await pipe.execute() if order else []
    totals: dict[str, list[int]] = {agent: [0, 0, 0] for agent in members}
    for agent, (capacity, running) in zip(order, records, strict=True):
        if capacity is None:  # record expired between the two round trips
            continue
        t = totals[agent]
        t[0] += 1
        t[1] += _int(capacity)
        t[2] += _int(running)
    return totals


@dataclass(frozen=True, slots=True)
class Presence:
    """One member's place in a registry: its heartbeat, and its leaving.

    Workers and dispatchers each keep one; what a heartbeat says (``fields``)
    is theirs.
    """

    redis: Redis
    registry_key: str
    record_key: str
    member: str
    ttl: float

    async def beat(self, fields: Mapping[str, str | int | float]) -> float:
        """Refresh this member (see :func:`heartbeat`); Redis's now."""
        return await heartbeat(
            self.redis,
            registry_key=self.registry_key,
            record_key=self.record_key,
            member=self.member,
            fields=fields,
            ttl=self.ttl,
        )

    async def leave(self) -> None:
        """Remove this member at a clean shutdown (see :func:`leave`)."""
        await leave(
            self.redis,
            registry_key=self.registry_key,
            record_key=self.record_key,
            member=self.member,
        )


@dataclass(slots=True)
class LoadView:
    """A dispatcher's cached view of Redis: its agents' loads, and whether Redis answers.

    Refreshed with each heartbeat (:meth:`refresh`); availability answers read
    it without I/O. Each agent's stream and consumer group are (re)created
    when missing: at the first refresh, after an outage (a restarted Redis
    has lost them) and whenever a group is seen missing.
    """

    presence: Presence
    keys: Keys
    agents: Sequence[str]
    ensure_group: Callable[[str], Awaitable[None]]
    loads: dict[str, AgentLoad] = field(default_factory=dict)
    #: False until a refresh succeeds, and again from any Redis failure.
    redis_ok: bool = False
    _groups_ready: bool = False

    async def refresh(self, fields: Mapping[str, str | int | float]) -> None:
        """Heartbeat with ``fields`` and read the loads; raises what Redis raises."""
        if not self._groups_ready:
            for name in self.agents:
                await self.ensure_group(name)
            self._groups_ready = True
        now = await self.presence.beat(fields)
        self.loads = await read_agent_loads(self.presence.redis, self.keys, self.agents, now=now)
        for load in self.loads.values():
            if not load.has_group:
                # Redis restarted empty (or someone deleted the stream).
                await self.ensure_group(load.agent)
        self.redis_ok = True

    def lost(self) -> None:
        """Redis failed: answer unavailable until the next refresh succeeds."""
        self.redis_ok = False
        self._groups_ready = False  # a restarted Redis has lost them


async def hold_liveness(
    redis: Redis,
    channel: str,
    on_subscribed: Callable[[], Awaitable[None]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Stay subscribed to the shard channel ``channel`` until cancelled.

    The subscription is the signal: Redis drops it the moment this process's
    connection closes, which a killed process's kernel does at once, while a
    frozen or partitioned process keeps it. Nothing is ever published on it.
    ``on_subscribed`` runs after each (re)subscription Redis confirmed, and
    every :data:`LIVENESS_REFRESH` seconds; ``task_status`` is started after
    the first. A lost connection is reconnected at once (then backing off to
    0.25 s): peers wait a grace of some hundreds of ms before they believe a
    worker without a subscription is gone.

    Under Redis Cluster the subscription is held on a connection of its own to
    the master of the channel's slot (:func:`~openrtc.store.redis_url.slot_master_client`),
    where the peers' crash check, a script in the same slot, counts it; after a
    failover or a slot move (Redis then unsubscribes us) it follows the slot.
    """
    attempt = 0
    started = False
    while True:
        subscriber = await _subscriber(redis, channel)
        pubsub = subscriber.pubsub()
        try:
            await pubsub.ssubscribe(channel)
            refreshed = -LIVENESS_REFRESH
            while True:
                # Returns at once on a message or a closed connection (an
                # error), else after the timeout.
                message = await pubsub.get_message(timeout=1.0)
                kind = message.get("type") if message is not None else None
                if kind == "sunsubscribe":
                    # The slot moved (a failover, a resharding): follow it.
                    raise RedisConnectionError("the liveness channel's slot moved")
                now = anyio.current_time()
                if kind == "ssubscribe" or (started and now - refreshed >= LIVENESS_REFRESH):
                    await on_subscribed()
                    refreshed = now
                    attempt = 0
                    if not started:
                        started = True
                        task_status.started()
        except REDIS_DOWN:
            await anyio.sleep(backoff_delay(attempt, 0.025, 0.25))
            attempt += 1
            await _rediscover(redis)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await _close(pubsub)
                if subscriber is not redis:
                    await subscriber.aclose()


async def _subscriber(redis: Redis, channel: str) -> Redis:
    """The client to hold ``channel``'s subscription on: ``redis`` itself, or
    under Redis Cluster a plain client for the master of the channel's slot."""
    cluster: object = redis  # typed as Redis, built as a RedisCluster (openrtc.store.redis_url)
    if not isinstance(cluster, RedisCluster):
        return redis
    try:
        return slot_master_client(cluster, channel)
    except (RedisClusterException, *REDIS_DOWN):
        # No master known for the slot yet (mid-failover): use the cluster
        # client, whose SSUBSCRIBE fails and so brings us back here.
        return redis


async def _rediscover(redis: Redis) -> None:
    """Under Redis Cluster, reread the slot map after a failure: the slot's master may
    have changed (a failover), and the next subscription must go to the new one."""
    cluster: object = redis
    if isinstance(cluster, RedisCluster):
        with contextlib.suppress(RedisClusterException, *REDIS_DOWN):
            await refresh_slots(cluster)

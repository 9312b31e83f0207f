"""Is this Redis fit to hold a queue? One check, run once at each service's start-up.

A job queue needs Redis to keep what it acknowledged: AOF on (``appendonly
yes``, ``appendfsync everysec`` loses at most about a second of writes on a
crash) and no eviction (``maxmemory-policy noeviction``: under memory
pressure every other policy may delete a job stream or a job record). Managed
Redis and ACLs often refuse ``CONFIG GET``; then ``INFO persistence`` and
``INFO memory`` say the same. If neither is allowed the check says so at
debug level and the service goes on: it cannot know, and must not refuse to
serve calls for that.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from openrtc.store.streams import REDIS_DOWN

__all__ = ["check_durability"]


async def _config(redis: Redis) -> tuple[str | None, str | None]:
    """(appendonly, maxmemory-policy) from ``CONFIG GET``, ``None`` where refused."""
    values: list[str | None] = []
    for name in ("appendonly", "maxmemory-policy"):
        try:
            reply: Any = await redis.config_get(name)
        except RedisError:
            values.append(None)
            continue
        raw = {_s(k): _s(v) for k, v in reply.items()}.get(name)
        values.append(raw.lower() if raw is not None else None)
    return values[0], values[1]


async def _info(redis: Redis) -> tuple[str | None, str | None]:
    """(appendonly, maxmemory-policy) from ``INFO``, ``None`` where refused."""
    aof = policy = None
    try:
        persistence: Any = await redis.info("persistence")
        if "aof_enabled" in persistence:
            aof = "yes" if str(persistence["aof_enabled"]) == "1" else "no"
    except RedisError:
        pass
    try:
        memory: Any = await redis.info("memory")
        if "maxmemory_policy" in memory:
            policy = _s(memory["maxmemory_policy"]).lower()
    except RedisError:
        pass
    return aof, policy


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def check_durability(redis: Redis, log: logging.Logger) -> list[str]:
    """Warn once if Redis may lose queued jobs; returns what was found wrong.

    Call it once per process at start-up, after Redis answered. Errors
    (unreachable, refused, timeouts) are logged at debug level, never raised.
    """
    try:
        with anyio.fail_after(3):
            aof, policy = await _config(redis)
            if aof is None or policy is None:
                info_aof, info_policy = await _info(redis)
                aof = aof or info_aof
                policy = policy or info_policy
    except REDIS_DOWN as exc:
        log.debug("Redis durability not checked: %s", exc)
        return []
    if aof is None and policy is None:
        log.debug("Redis durability not checked: CONFIG GET and INFO are both refused")
        return []
    problems = []
    if aof == "no":
        problems.append(
            "AOF is off (appendonly no): a restart loses the jobs written since the last snapshot"
        )
    if policy is not None and policy != "noeviction":
        problems.append(
            f"maxmemory-policy is {policy}: under memory pressure Redis may evict "
            "job streams and records"
        )
    if problems:
        log.warning(
            "Redis is not durable enough for a job queue: %s. Run it with "
            "--appendonly yes --appendfsync everysec --maxmemory-policy noeviction "
            "(docs/redis.md, 'Durability').",
            "; ".join(problems),
        )
    return problems

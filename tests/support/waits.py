"""Waiting on what workers and dispatchers leave in Redis: statuses, dead letters,
pending entries, members, reclaim sweeps."""

from __future__ import annotations

import anyio
from redis.asyncio import Redis

from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import JobStatus, StatusEvent
from tests.support.stack import eventually

#: Every test's whole body runs under this bound (each wait inside has a tighter one).
TEST_BUDGET = 60.0


async def statuses(redis: Redis, keys: Keys, dispatcher_id: str) -> list[StatusEvent]:
    entries = await redis.xrange(keys.status(dispatcher_id))
    return [StatusEvent.decode(fields) for _, fields in entries]


async def wait_status(
    redis: Redis,
    keys: Keys,
    dispatcher_id: str,
    job_id: str,
    status: JobStatus,
    within: float = 20.0,
) -> StatusEvent:
    with anyio.fail_after(within):
        while True:
            for event in await statuses(redis, keys, dispatcher_id):
                if event.job_id == job_id and event.status == status:
                    return event
            await anyio.sleep(0.05)


async def wait_dead_letters(
    redis: Redis, keys: Keys, count: int, within: float = 20.0
) -> dict[tuple[str, str], dict[bytes, bytes]]:
    """The dead letters by (stream, entry id) they came from, once there are ``count``."""
    with anyio.fail_after(within):
        while True:
            entries = await redis.xrange(keys.dead_letter)
            if len(entries) >= count:
                return {
                    (fields[b"origin"].decode(), fields[b"origin_id"].decode()): fields
                    for _, fields in entries
                }
            await anyio.sleep(0.05)


async def entry_gone(redis: Redis, stream: str, entry_id: str) -> bool:
    """Acknowledged and deleted: neither in the stream nor pending."""
    in_stream = await redis.xrange(stream, entry_id, entry_id)
    pending = await redis.xpending_range(stream, WORKERS_GROUP, entry_id, entry_id, 1)
    return not in_stream and not pending


async def pending_on(redis: Redis, stream: str, consumer: str) -> list[str]:
    """Entry ids pending on ``consumer`` in the workers group."""
    rows = await redis.xpending_range(stream, WORKERS_GROUP, "-", "+", 1000, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


async def wait_member(redis: Redis, keys: Keys, agent: str, count: int = 1) -> list[bytes]:
    # A worker process's imports take tens of seconds on a loaded machine.
    with anyio.fail_after(90):
        while True:
            members: list[bytes] = await redis.zrange(keys.workers(agent), 0, -1)
            if len(members) >= count:
                return members
            await anyio.sleep(0.05)


async def reclaim_sweeps(redis: Redis, keys: Keys, agent: str, count: int) -> None:
    """Until ``count`` more sweeps of the agent's reclaim scan have started.

    Each sweep claims every entry idle past the lease (scripts.RECLAIM keeps
    its start, Redis ms, in the scan's hash): an entry that no sweep moved was
    renewed in time all along.
    """
    seen: list[bytes | None] = [await redis.hget(keys.reclaim(agent), "at")]

    async def advanced() -> bool:
        at = await redis.hget(keys.reclaim(agent), "at")
        if at != seen[-1]:
            seen.append(at)
        return len(seen) > count

    await eventually(advanced, f"{count} reclaim sweeps", within=60)

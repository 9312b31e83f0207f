"""The operator's reads of the queue in Redis terms: what ``openrtc status`` and ``dlq`` see.

:mod:`openrtc.ops.monitor` turns these into the stack's status and dead
letters for people; the commands (``XINFO``, ``XRANGE``, ``XDEL``, ``XREAD``)
stay here, in the store, the only package that speaks Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from openrtc.store.membership import live_members, redis_time
from openrtc.store.streams import GroupRow, RedisClient, workers_group
from openrtc.wire.keys import Keys

__all__ = ["DeadLetterStream", "ReportStream", "StatusReader", "StreamReading"]

#: A stream entry: its id and its raw fields.
Entry = tuple[str, Mapping[bytes, bytes]]
#: Entries per page when walking the dead-letter stream.
PAGE: int = 500


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class StreamReading:
    """One agent's job stream."""

    #: 0 when the stream could not be read (none yet).
    length: int = 0
    group: GroupRow | None = None
    #: The id time (ms, Redis's clock) of the oldest entry no worker has read.
    oldest_waiting_ms: int | None = None


class StatusReader:
    """The reads behind ``openrtc status``: job streams, live members, dead-letter count."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def now(self) -> float:
        """Redis's clock, which every heartbeat and entry id is on."""
        return await redis_time(self._redis, self._keys.agents)

    async def known_agents(self) -> set[str]:
        """Every agent that has had a job stream."""
        return {_s(a) for a in await self._redis.smembers(self._keys.agents)}

    async def job_stream(self, agent: str) -> StreamReading:
        stream = self._keys.jobs(agent)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        length, groups = await pipe.execute(raise_on_error=False)
        size = 0 if isinstance(length, Exception) else int(length)
        if isinstance(groups, Exception) or (group := workers_group(groups, size)) is None:
            return StreamReading(size)
        waiting = await self._redis.xrange(stream, min=f"({group.last_delivered}", count=1)
        oldest = int(_s(waiting[0][0]).split("-")[0]) if waiting else None
        return StreamReading(size, group, oldest)

    async def live_records(
        self, registry_key: str, record_key: Callable[[str], str]
    ) -> list[tuple[str, dict[str, str]]]:
        """The records of a registry's live members (``record_key(id)``), skipping expired ones."""
        found = []
        for member in await live_members(self._redis, registry_key):
            raw = await self._redis.hgetall(record_key(member))
            if raw:
                found.append((member, {_s(k): _s(v) for k, v in raw.items()}))
        return found

    async def dead_letter_count(self) -> int:
        return int(await self._redis.xlen(self._keys.dead_letter))

    async def job_entries(self, agent: str, *, after: str = "", count: int = PAGE) -> list[Entry]:
        """A page of an agent's job stream, oldest first, after entry id ``after``."""
        page: Any = await self._redis.xrange(
            self._keys.jobs(agent), min=f"({after}" if after else "-", count=count
        )
        return _entries(page)

    async def dead_letters(self, *, before: str = "", count: int = PAGE) -> list[Entry]:
        """A page of the dead letters, newest first, before entry id ``before``."""
        page: Any = await self._redis.xrevrange(
            self._keys.dead_letter, max=f"({before}" if before else "+", count=count
        )
        return _entries(page)


class DeadLetterStream:
    """The dead-letter stream's entries, raw: read, paged, followed, deleted by id."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self.key = keys.dead_letter

    async def now(self) -> float:
        """Redis's clock, which the entry ids are on."""
        return await redis_time(self._redis, self.key)

    async def get(self, entry_id: str) -> Entry | None:
        found: Any = await self._redis.xrange(self.key, min=entry_id, max=entry_id)
        return _entries(found)[0] if found else None

    async def newest_first(self, *, upper: str = "+", lowest: str = "-", count: int) -> list[Entry]:
        page: Any = await self._redis.xrevrange(self.key, max=upper, min=lowest, count=count)
        return _entries(page)

    async def oldest_first(
        self, *, start: str = "-", upper: str = "+", count: int = PAGE
    ) -> list[Entry]:
        page: Any = await self._redis.xrange(self.key, min=start, max=upper, count=count)
        return _entries(page)

    async def newest_id(self) -> str:
        """The newest entry's id, ``""`` when the stream is empty."""
        newest = await self.newest_first(count=1)
        return newest[0][0] if newest else ""

    async def delete(self, *ids: str) -> int:
        return int(await self._redis.xdel(self.key, *ids))

    async def read_after(self, last: str, *, block: float) -> list[Entry]:
        """Entries after id ``last``, waiting at most ``block`` seconds for one."""
        reply: Any = await self._redis.xread({self.key: last}, block=int(block * 1000))
        return [entry for _stream, entries in reply or [] for entry in _entries(entries)]


class ReportStream(DeadLetterStream):
    """The call reports' stream, raw: what ``openrtc sessions`` reads (same reads)."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        super().__init__(redis, keys)
        self.key = keys.reports


def _entries(reply: Any) -> list[Entry]:
    return [(_s(entry_id), raw) for entry_id, raw in reply or []]

"""The reconciler's Redis side: its leader lease, and the two reads a pass makes.

The reconciler (:mod:`openrtc.dispatcher.reconciler`) decides which rooms to
dispatch again; what it reads from Redis, and the lease that lets one
dispatcher at a time do it, are here, with the rest of the Redis commands.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis

from openrtc.store.scripts import LEASE_HOLD, LEASE_RELEASE
from openrtc.store.streams import REDIS_DOWN
from openrtc.wire.keys import ENDED_TTL, Keys

__all__ = ["LeaderLease", "ended_on_purpose", "rooms_in_stream"]

#: Entries read per XRANGE while listing a stream's rooms.
_PAGE = 500


@dataclass(slots=True)
class LeaderLease:
    """A Redis key held by one member at a time, with an expiry (``SET NX PX`` and renewal).

    The holder renews it well within ``ttl`` (between passes, and every
    ``ttl / 3`` during one: :meth:`keep`); a holder that dies or loses Redis
    loses it after ``ttl`` (Redis's clock) and another member takes it.
    """

    redis: Redis
    key: str
    member: str
    ttl: float
    held: bool = False
    _hold: Any = None
    _release: Any = None

    def __post_init__(self) -> None:
        self._hold = self.redis.register_script(LEASE_HOLD)
        self._release = self.redis.register_script(LEASE_RELEASE)

    async def hold(self) -> bool:
        """Take or renew the lease; whether this member holds it now."""
        self.held = bool(
            await self._hold(keys=[self.key], args=[self.member, int(self.ttl * 1000)])
        )
        return self.held

    async def keep(self) -> None:
        """Renew the lease every ``ttl / 3`` until cancelled; return when it is lost.

        Lost: Redis says another member holds it (or nobody: it lapsed), or no
        renewal was confirmed for two thirds of ``ttl`` (Redis may have let it
        lapse already, and another member taken it, before this one learns).
        """
        confirmed = anyio.current_time()
        while True:
            await anyio.sleep(self.ttl / 3)
            try:
                with anyio.fail_after(self.ttl / 3):
                    if not await self.hold():
                        return
                confirmed = anyio.current_time()
            except (*REDIS_DOWN, TimeoutError):
                if anyio.current_time() - confirmed >= self.ttl * 2 / 3:
                    self.held = False
                    return

    async def release(self) -> None:
        """Give the lease up (only if held), so another member takes it at once."""
        if self.held:
            self.held = False
            await self._release(keys=[self.key], args=[self.member])


async def ended_on_purpose(redis: Redis, keys: Keys, rooms: Iterable[tuple[str, str]]) -> set[str]:
    """Names of ``rooms`` (name, sid) whose agent ended the call on purpose (a worker marked them).

    A mark names the room's sid: a later room of the same name is not
    covered. Each mark still matched is renewed: it lasts as long as the
    caller stays, and :data:`~openrtc.wire.keys.ENDED_TTL` after.
    """
    rooms = list(rooms)
    if not rooms:
        return set()
    pipe = redis.pipeline(transaction=False)
    for name, _sid in rooms:
        pipe.get(keys.ended(name))
    marks = await pipe.execute()
    ended = {
        name
        for (name, sid), mark in zip(rooms, marks, strict=True)
        if mark is not None and mark.decode(errors="replace") in (sid, name)
    }
    if ended:
        pipe = redis.pipeline(transaction=False)
        for name in ended:
            pipe.expire(keys.ended(name), ENDED_TTL)
        await pipe.execute()
    return ended


async def rooms_in_stream(redis: Redis, keys: Keys, agent: str) -> set[str]:
    """Rooms of the jobs in ``agent``'s stream: waiting, or held by a worker.

    The stream holds only those (workers delete what they acknowledge) and
    is bounded by admission, so reading it whole is bounded too.
    """
    rooms: set[str] = set()
    start = "-"
    while True:
        entries: Any = await redis.xrange(keys.jobs(agent), start, "+", count=_PAGE)
        for _entry_id, fields in entries:
            room = fields.get(b"room")
            if isinstance(room, bytes):
                rooms.add(room.decode(errors="replace"))
        if len(entries) < _PAGE:
            return rooms
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))

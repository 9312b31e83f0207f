"""No room left without an agent: find rooms with a caller and no agent, and dispatch them again.

The open-source LiveKit server decides a room's dispatch once, when the room
is created: with no agent worker registered at that moment (every dispatcher
restarting) the job is dropped for good, and a job whose agent left (or
whose enqueue failed) is never dispatched again (docs/dispatcher.md,
"Reconciler"). So one dispatcher at a time (the holder of a Redis lease,
:class:`~openrtc.store.reconcile.LeaderLease`) looks at every room every ``reconcile_interval``:

- a room is **ours** when it has a dispatch for the agent name the
  dispatchers register (``""`` for automatic dispatch: LiveKit records one
  per room it creates);
- it **needs an agent** when a participant other than an agent has been in it
  for ``reconcile_grace`` seconds, no agent participant is in it (nor was
  for ``reconcile_grace``), and no job of ours for it waits in or runs from
  its agent's stream (:func:`needs_agent`), and its agent did not end the
  call on purpose (a worker marks such a room, :meth:`Keys.ended`: an agent
  that said goodbye while the caller stays is not sent back);
- it is then **dispatched again** through LiveKit: ``CreateDispatch`` for
  our agent name, with the metadata of the room's latest dispatch, so the
  job takes the normal path (an offer to one of the dispatchers, the same
  routing chain, the same stream) and LiveKit's job state stays its own.

A room whose routing names an agent that is not registered is left alone:
dispatching it again would only add a dead letter per pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from livekit import api
from livekit.protocol import agent as proto

from openrtc.agents.routing import RoutingTable, UnknownAgentError, resolve_agent
from openrtc.ops.connect import made_by_connect
from openrtc.settings import LiveKitSettings
from openrtc.store.membership import redis_time
from openrtc.store.reconcile import LeaderLease, ended_on_purpose, rooms_in_stream
from openrtc.store.streams import RedisClient
from openrtc.wire.keys import Keys

__all__ = [
    "LeaderLease",
    "LeaseLost",
    "Reconciler",
    "RoomState",
    "needs_agent",
]

logger = logging.getLogger("openrtc.reconciler")

#: Rooms whose participants are listed at once.
LIST_CONCURRENCY: Final = 8
#: A room dispatched again is not dispatched again before this long.
REDISPATCH_COOLDOWN: Final = 30.0
#: Longest wait for one LiveKit API call.
API_TIMEOUT: Final = 5.0


class LeaseLost(Exception):
    """The reconciler lease lapsed or went to another member during a pass."""


@dataclass(frozen=True, slots=True)
class RoomState:
    """What one pass saw of a room."""

    name: str
    #: When the earliest participant other than an agent joined (unix s); None: none.
    caller_since: float | None
    has_agent: bool


def needs_agent(
    room: RoomState,
    *,
    now: float,
    grace: float,
    served_at: float | None,
    dispatched_at: float | None,
    queued: bool,
) -> bool:
    """Whether ``room`` is to be dispatched again.

    ``served_at``: when an agent was last seen in it; ``dispatched_at``: when
    this reconciler last dispatched it; ``queued``: a job of ours for it
    waits in or runs from its agent's stream.
    """
    if room.has_agent or room.caller_since is None or queued:
        return False
    if dispatched_at is not None and now - dispatched_at < REDISPATCH_COOLDOWN:
        return False
    without_agent_since = max(room.caller_since, served_at or 0.0)
    return now - without_agent_since >= grace


@dataclass(slots=True)
class ReconcileCounts:
    """What one pass did."""

    rooms: int = 0
    dispatched: int = 0
    unroutable: int = 0


@dataclass(slots=True)
class Reconciler:
    """One pass over the LiveKit project's rooms (run by the lease holder only)."""

    livekit: LiveKitSettings
    redis: RedisClient
    keys: Keys
    table: RoutingTable
    #: The agent name the dispatchers register with LiveKit ("" = automatic).
    agent_name: str
    grace: float
    _lkapi: api.LiveKitAPI | None = None
    #: Room name -> when an agent was last seen in it.
    _served_at: dict[str, float] = field(default_factory=dict)
    #: Room name -> when this reconciler last dispatched it.
    _dispatched_at: dict[str, float] = field(default_factory=dict)
    _unroutable_logged: set[str] = field(default_factory=set)
    #: Rooms (by sid) with no dispatch for our agent name: not ours to serve.
    _not_ours: set[str] = field(default_factory=set)

    async def aclose(self) -> None:
        """Close the LiveKit API client."""
        if self._lkapi is not None:
            await self._lkapi.aclose()
            self._lkapi = None

    def forget(self) -> None:
        """Drop what was seen (this dispatcher no longer holds the lease)."""
        self._served_at.clear()
        self._dispatched_at.clear()

    async def run_pass(self, lease: LeaderLease | None = None) -> ReconcileCounts:
        """Look at every room once; dispatch again those that need an agent.

        With ``lease`` (the dispatchers' one), it is renewed all through the
        pass, and confirmed again before each dispatch: a pass longer than the
        lease (thousands of rooms, a slow API) never runs beside another
        holder's. Raises :class:`LeaseLost` (the pass abandoned) once it is lost.
        """
        if lease is None:
            return await self._pass(None)
        lost = False
        counts = ReconcileCounts()
        async with anyio.create_task_group() as tg:

            async def keep() -> None:
                nonlocal lost
                await lease.keep()
                lost = True
                tg.cancel_scope.cancel()

            tg.start_soon(keep)
            counts = await self._pass(lease)
            tg.cancel_scope.cancel()
        if lost:
            raise LeaseLost("the reconciler lease was lost during a pass")
        return counts

    async def _pass(self, lease: LeaderLease | None) -> ReconcileCounts:
        if self._lkapi is None:
            self._lkapi = api.LiveKitAPI(
                self.livekit.http_url, self.livekit.api_key, self.livekit.api_secret
            )
        lk = self._lkapi
        counts = ReconcileCounts()
        rooms, states = await self._look(lk)
        counts.rooms = len(rooms)
        # Redis's clock, as every age is judged (a dispatcher host's may be
        # off); callers' join times are LiveKit's, a server's clock too.
        now = await redis_time(self.redis, self.keys.reconciler_lease)
        for name, state in states.items():
            if state.has_agent:
                self._served_at[name] = now
        candidates = [
            room
            for room in rooms
            if room.name in states
            and needs_agent(
                states[room.name],
                now=now,
                grace=self.grace,
                served_at=self._served_at.get(room.name),
                dispatched_at=self._dispatched_at.get(room.name),
                queued=False,
            )
        ]
        if not candidates:
            return counts
        ended = await ended_on_purpose(
            self.redis, self.keys, [(room.name, room.sid) for room in candidates]
        )
        queued: dict[str, set[str]] = {}
        for room in candidates:
            if room.sid in self._not_ours or room.name in ended:
                continue
            await self._dispatch_again(lk, room, lease, now, queued, counts)
        return counts

    async def _look(self, lk: api.LiveKitAPI) -> tuple[list[api.Room], dict[str, RoomState]]:
        """Every room, and the state of those with participants; forget rooms gone."""
        with anyio.fail_after(API_TIMEOUT):
            rooms = list((await lk.room.list_rooms(api.ListRoomsRequest())).rooms)
        names = {r.name for r in rooms}
        for seen in (self._served_at, self._dispatched_at):
            for gone in [n for n in seen if n not in names]:
                del seen[gone]
        self._unroutable_logged &= names
        self._not_ours &= {r.sid for r in rooms}

        states: dict[str, RoomState] = {}
        limiter = anyio.CapacityLimiter(LIST_CONCURRENCY)

        async def look(room: api.Room) -> None:
            async with limiter:
                with anyio.fail_after(API_TIMEOUT):
                    reply = await lk.room.list_participants(
                        api.ListParticipantsRequest(room=room.name)
                    )
            states[room.name] = _room_state(room.name, reply.participants)

        async with anyio.create_task_group() as tg:
            for room in rooms:
                if room.num_participants > 0:
                    tg.start_soon(look, room)
        return rooms, states

    async def _dispatch_again(
        self,
        lk: api.LiveKitAPI,
        room: api.Room,
        lease: LeaderLease | None,
        now: float,
        queued: dict[str, set[str]],
        counts: ReconcileCounts,
    ) -> None:
        """Dispatch ``room`` again if it is ours, routable, and no job for it is queued.

        ``queued``: the rooms in each agent's stream, read once per pass.
        """
        with anyio.fail_after(API_TIMEOUT):
            dispatches = await lk.agent_dispatch.list_dispatch(room_name=room.name)
        # A dispatch by `openrtc connect` added an agent once: the room's own
        # dispatch says which agent the room needs back.
        ours = [
            d
            for d in dispatches
            if d.agent_name == self.agent_name and not made_by_connect(d.metadata)
        ]
        if not ours:
            self._not_ours.add(room.sid)  # dispatched to other agent names (or by hand) only
            return
        latest = max(ours, key=lambda d: d.state.created_at)
        job = proto.Job(room=room, metadata=latest.metadata)
        try:
            agent = resolve_agent(job, self.table).agent
        except UnknownAgentError as exc:
            counts.unroutable += 1
            if room.name not in self._unroutable_logged:
                self._unroutable_logged.add(room.name)
                logger.warning("room %s has a caller and no agent, left alone: %s", room.name, exc)
            return
        if agent not in queued:
            queued[agent] = await rooms_in_stream(self.redis, self.keys, agent)
        if room.name in queued[agent]:
            return  # its job waits for a worker, or a worker is joining
        if lease is not None and not await lease.hold():
            raise LeaseLost("the reconciler lease went to another dispatcher")
        with anyio.fail_after(API_TIMEOUT):
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(
                    agent_name=self.agent_name, room=room.name, metadata=latest.metadata
                )
            )
        self._dispatched_at[room.name] = now
        counts.dispatched += 1
        logger.warning(
            "room %s had a caller and no agent for %.0fs+: dispatched again (agent '%s')",
            room.name,
            self.grace,
            agent,
        )


#: Participants that are someone to talk to (a recorder is not).
_CALLER_KINDS: Final = frozenset(
    {
        api.ParticipantInfo.Kind.STANDARD,
        api.ParticipantInfo.Kind.SIP,
        api.ParticipantInfo.Kind.INGRESS,
    }
)


def _room_state(name: str, participants: Iterable[Any]) -> RoomState:
    has_agent = False
    callers: list[float] = []
    for p in participants:
        if p.kind == api.ParticipantInfo.Kind.AGENT:
            has_agent = True
        elif p.kind in _CALLER_KINDS:
            callers.append(p.joined_at_ms / 1000 if p.joined_at_ms else float(p.joined_at))
    return RoomState(name, min(callers) if callers else None, has_agent)

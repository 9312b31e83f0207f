"""``openrtc connect``: put an agent into an existing room now, by an explicit dispatch.

The dispatch goes through the same path as every call: LiveKit's
AgentDispatchService makes a job for the dispatchers' agent name, with job
metadata ``{"agent": NAME}`` (routing step 1), so a dispatcher routes it to
NAME's stream and one of NAME's workers joins. Nothing here joins the room or
touches the participants already in it.

Which job is ours comes from LiveKit: the dispatch's state lists the job it
made and the identity that job's agent was given. LiveKit reports it a few
seconds late (its dispatch state is refreshed lazily), but it is the only link
from this dispatch to a job that nothing else can fake: a new agent
participant of NAME could be someone else's dispatch (the reconciler's, a
second ``connect``). "Joined" means LiveKit lists that identity among the
room's participants, the same thing a caller would see; the job record in
Redis says what the worker did, not what the room holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import anyio
from livekit import api

from openrtc.errors import OpenRTCError
from openrtc.ops.monitor import DeadLetter, dead_letter_tail, dead_letters_after
from openrtc.settings import DEFAULT_CONNECT_TIMEOUT, LiveKitSettings
from openrtc.store.streams import REDIS_DOWN, RedisClient
from openrtc.wire.keys import Keys
from openrtc.wire.messages import AGENT_ATTRIBUTE, agent_identity

__all__ = [
    "ConnectError",
    "Connected",
    "agent_in_room",
    "connect_agent",
    "dispatch_metadata",
    "made_by_connect",
]

#: Seconds between two looks at the dispatch, the room and the dead letters.
POLL_INTERVAL: Final = 0.25
#: Seconds one LiveKit API call may take.
API_TIMEOUT: Final = 10.0
#: Where to look when the agent did not come (the command's error says it).
WHERE_TO_LOOK: Final = "see `openrtc dlq list` and `openrtc status`"


class ConnectError(OpenRTCError):
    """The agent was not put into the room; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Connected:
    """An agent that joined the room on our dispatch."""

    room: str
    agent: str
    job_id: str
    identity: str
    dispatch_id: str
    #: Seconds from the dispatch to the agent seen in the room.
    joined_after: float


#: The job metadata key (and its value) that marks a dispatch made by ``connect``.
_VIA: Final = ("via", "openrtc connect")


def dispatch_metadata(agent: str) -> str:
    """The dispatch's job metadata: names ``agent`` at routing step 1, marked as ours."""
    return json.dumps({"agent": agent, _VIA[0]: _VIA[1]})


def made_by_connect(metadata: str) -> bool:
    """Whether a dispatch's metadata is one :func:`dispatch_metadata` wrote.

    Such a dispatch put an extra agent into a room once: the reconciler
    brings back the room's own agent, from the room's other dispatches.
    """
    if f'"{_VIA[0]}"' not in metadata:
        return False  # the common case, without parsing
    try:
        parsed = json.loads(metadata)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get(_VIA[0]) == _VIA[1]


def agent_in_room(participants: Iterable[Any], agent: str) -> str:
    """The identity of an agent participant of ``agent`` among ``participants``, or ``""``.

    Two jobs of one agent in a room would talk over each other: the workers
    make the later one leave (``JobMessage.replaced_by``), so ``connect``
    refuses up front instead.
    """
    for p in participants:
        if p.kind == api.ParticipantInfo.Kind.AGENT and p.attributes.get(AGENT_ATTRIBUTE) == agent:
            return str(p.identity)
    return ""


def _our_job(dispatches: Iterable[Any], dispatch_id: str) -> tuple[str, str] | None:
    """(job id, identity) of the job LiveKit made for ``dispatch_id``, once it says."""
    for d in dispatches:
        if d.id == dispatch_id and d.state.jobs:
            job = d.state.jobs[0]
            return str(job.id), str(job.state.participant_identity) or agent_identity(job.id)
    return None


def _letter_of(letters: Iterable[DeadLetter], dispatch_id: str, job_id: str) -> DeadLetter | None:
    """The dead letter of our job, matched by its dispatch id (or its job id)."""
    for letter in letters:
        job = letter.fields.get("job")
        if isinstance(job, dict) and job.get("dispatch_id") == dispatch_id:
            return letter
        if job_id and letter.job_id == job_id:
            return letter
    return None


class _DeadLetters:
    """The dead letters written since the dispatch."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._last = "0-0"
        self.seen: list[DeadLetter] = []

    async def start(self) -> None:
        try:
            self._last = await dead_letter_tail(self._redis, self._keys)
        except REDIS_DOWN as exc:
            raise ConnectError(f"Redis: {exc}") from None

    async def poll(self) -> None:
        try:
            new = await dead_letters_after(self._redis, self._keys, self._last)
        except REDIS_DOWN as exc:
            raise ConnectError(f"Redis: {exc}") from None
        if new:
            self._last = new[-1].id
            self.seen.extend(new)


def _unreachable(livekit: LiveKitSettings, exc: BaseException) -> ConnectError:
    if isinstance(exc, api.TwirpError):
        return ConnectError(f"LiveKit at {livekit.http_url} refused: {exc.code}: {exc.message}")
    detail = str(exc) or type(exc).__name__
    return ConnectError(f"LiveKit at {livekit.http_url} is unreachable: {detail}")


async def connect_agent(
    livekit: LiveKitSettings,
    room: str,
    agent: str,
    *,
    dispatcher_agent_name: str = "",
    within: float = DEFAULT_CONNECT_TIMEOUT,
    redis: RedisClient | None = None,
    keys: Keys | None = None,
) -> Connected:
    """Dispatch ``agent`` into the existing ``room`` and wait until it joined.

    ``dispatcher_agent_name``: the name the dispatchers register with LiveKit
    ("" for automatic dispatch). With ``redis`` and ``keys``, a dead letter of
    the job (an agent the dispatchers do not know, a job that expired waiting
    for a worker) ends the wait at once with its reason. Raises
    :class:`ConnectError`; the caller and agents already in the room are left alone.
    """
    try:
        async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
            return await _connect(
                lk, room, agent, dispatcher_agent_name, within, redis=redis, keys=keys
            )
    except (aiohttp.ClientError, OSError, TimeoutError, api.TwirpError) as exc:
        raise _unreachable(livekit, exc) from None


async def _connect(
    lk: api.LiveKitAPI,
    room: str,
    agent: str,
    dispatcher_agent_name: str,
    within: float,
    *,
    redis: RedisClient | None,
    keys: Keys | None,
) -> Connected:
    with anyio.fail_after(API_TIMEOUT):
        rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
    # A dispatch into a missing room creates it: connect is for rooms in use.
    if not rooms.rooms:
        raise ConnectError(
            f"room {room!r} does not exist (connect puts agents into existing rooms)"
        )
    with anyio.fail_after(API_TIMEOUT):
        people = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
    if present := agent_in_room(people.participants, agent):
        raise ConnectError(f"agent {agent!r} is already in room {room!r} (as {present})")
    letters = _DeadLetters(redis, keys) if redis is not None and keys is not None else None
    if letters is not None:
        await letters.start()
    with anyio.fail_after(API_TIMEOUT):
        dispatch = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=dispatcher_agent_name, room=room, metadata=dispatch_metadata(agent)
            )
        )
    started = time.monotonic()
    job: list[tuple[str, str]] = []  # ours, once LiveKit says which it is
    with anyio.move_on_after(within):
        job_id, identity = await _wait_joined(lk, room, dispatch.id, letters, job)
        return Connected(
            room=room,
            agent=agent,
            job_id=job_id,
            identity=identity,
            dispatch_id=dispatch.id,
            joined_after=round(time.monotonic() - started, 3),
        )
    if not job:
        # LiveKit drops a dispatch no registered worker takes: there is no job to name.
        raise ConnectError(
            f"no dispatcher took dispatch {dispatch.id} within {within:g}s (none is registered"
            f" with agent name {dispatcher_agent_name!r}, or each refused it: no live worker"
            f" of {agent!r}, or a full backlog): see `openrtc status`"
        )
    raise ConnectError(
        f"agent {agent!r} did not join room {room!r} within {within:g}s"
        f" (job {job[0][0]}, identity {job[0][1]}): {WHERE_TO_LOOK}"
    )


async def _wait_joined(
    lk: api.LiveKitAPI,
    room: str,
    dispatch_id: str,
    letters: _DeadLetters | None,
    job: list[tuple[str, str]],
) -> tuple[str, str]:
    """(job id, identity) once the job's agent is in ``room``; ``job`` gets them when known.

    A dead letter of the job ends the wait with :class:`ConnectError`.
    """
    while True:
        if letters is not None:
            await letters.poll()
            letter = _letter_of(letters.seen, dispatch_id, job[0][0] if job else "")
            if letter is not None:
                error = " ".join(letter.error.split())  # one line, whatever a worker wrote
                raise ConnectError(
                    f"job {letter.job_id} (dispatch {dispatch_id}) went to the dead letters"
                    f" ({letter.reason}): {error} ({WHERE_TO_LOOK})"
                )
        if not job:
            with anyio.fail_after(API_TIMEOUT):
                found = _our_job(await lk.agent_dispatch.list_dispatch(room_name=room), dispatch_id)
            if found is not None:
                job.append(found)
        if job:
            with anyio.fail_after(API_TIMEOUT):
                people = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            if any(p.identity == job[0][1] for p in people.participants):
                return job[0]
        await anyio.sleep(POLL_INTERVAL)

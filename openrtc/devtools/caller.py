"""A caller: joins a room like a person would and reports the agent that answers.

Used by ``openrtc call`` (smoke-test a deployment: did the right agent join,
and can it be heard?), by the demo, and by the end-to-end tests.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import numpy as np
from anyio.abc import TaskGroup
from livekit import api, rtc

from openrtc.settings import LiveKitSettings
from openrtc.wire.messages import AGENT_ATTRIBUTE

__all__ = [
    "AgentSighting",
    "CallResult",
    "Caller",
    "TrackAudio",
    "caller_in",
    "close_native_runtime",
    "place_call",
]

#: A frame counts as heard when a sample exceeds this (comfort noise does not).
LOUD: int = 1000
#: The caller's audio frames, ms: the resolution of its frame times.
FRAME_MS: int = 50
#: Loud frames before the agent counts as heard (100 ms of its audio).
HEARD_FRAMES: int = 2
#: Seconds leaving a room may take before the caller gives up on a clean exit.
CLOSE_TIMEOUT: float = 10.0
#: Seconds for native callbacks already under way to finish once the runtime is disposed.
CALLBACK_GRACE: float = 0.2


@dataclass
class AgentSighting:
    """An agent participant as the caller first saw it."""

    identity: str
    sid: str
    kind: int
    attributes: dict[str, str]
    at: float


@dataclass
class TrackAudio:
    """The frames a caller received from one agent participant's audio track."""

    identity: str
    #: The participant's sid (a takeover's agent has the same identity, another sid).
    sid: str
    first_at: float = 0.0
    last_at: float = 0.0
    frames: int = 0
    #: When the track went away (its participant left or was replaced); 0 while here.
    unsubscribed_at: float = 0.0

    @property
    def ended_at(self) -> float:
        """The last moment this track could carry the agent's audio.

        The stream goes on yielding what it buffered (about 250 ms of frames)
        after the track went away: those frames come from no one.
        """
        if self.unsubscribed_at:
            # Not listened to (no frames): the track's end is all there is.
            return min(self.last_at, self.unsubscribed_at) if self.frames else self.unsubscribed_at
        return self.last_at


@dataclass
class Caller:
    """What a caller in the room saw: agent participants over time and their audio."""

    room: rtc.Room
    sightings: list[AgentSighting] = field(default_factory=list)
    #: Each agent audio track subscribed, in order (frames counted while listening).
    audio: list[TrackAudio] = field(default_factory=list)
    #: Whether tracks subscribed from now on are listened to (decoded, timed).
    listening: bool = True
    max_agents_at_once: int = 0
    loud_frames: int = 0
    heard: anyio.Event = field(default_factory=anyio.Event)
    _changed: anyio.Event = field(default_factory=anyio.Event, repr=False)

    def _participants_changed(self) -> None:
        self.max_agents_at_once = max(self.max_agents_at_once, len(self.agents()))
        self._changed.set()
        self._changed = anyio.Event()

    def agents(self) -> list[rtc.RemoteParticipant]:
        """Agent participants in the room now."""
        return [
            p
            for p in self.room.remote_participants.values()
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ]

    async def wait_agent(self, *, within: float = 15.0, other_than: str = "") -> AgentSighting:
        """The next agent participant (optionally one with a different sid)."""
        with anyio.fail_after(within):
            while True:
                present = {p.sid for p in self.agents()}
                for sighting in reversed(self.sightings):
                    if sighting.sid != other_than and sighting.sid in present:
                        return sighting
                await self._changed.wait()

    async def wait_no_agent(self, *, within: float = 15.0) -> None:
        """Until no agent participant is left in the room."""
        with anyio.fail_after(within):
            while self.agents():
                await self._changed.wait()


class _RoomWatch:
    """The room's event handlers: they record on ``caller`` the agents and their audio.

    Audio tracks subscribed while the caller listens are sent to :meth:`listen`,
    which decodes each in a task of its own (:meth:`hear`).
    """

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        #: Every audio stream opened, to close before the room is left (:func:`_leave`).
        self.streams: list[rtc.AudioStream] = []
        self._send, self._receive = anyio.create_memory_object_stream[tuple[rtc.Track, TrackAudio]](
            1000
        )
        room = caller.room
        room.on("participant_connected", self.on_join)
        room.on("participant_disconnected", self.on_leave)
        room.on("participant_attributes_changed", self.on_attributes)
        room.on("track_subscribed", self.on_track)
        room.on("track_unsubscribed", self.on_untrack)

    def on_join(self, p: rtc.RemoteParticipant) -> None:
        if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self.caller.sightings.append(
                AgentSighting(p.identity, p.sid, p.kind, dict(p.attributes), time.monotonic())
            )
        self.caller._participants_changed()

    def on_leave(self, p: rtc.RemoteParticipant) -> None:
        self.caller._participants_changed()

    def on_attributes(self, changed: dict[str, str], p: rtc.Participant) -> None:
        for s in self.caller.sightings:
            if s.sid == p.sid:
                s.attributes = dict(p.attributes)

    def on_track(self, track: rtc.Track, _pub: object, p: rtc.RemoteParticipant) -> None:
        if (
            track.kind == rtc.TrackKind.KIND_AUDIO
            and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ):
            record = TrackAudio(p.identity, p.sid)
            self.caller.audio.append(record)
            if self.caller.listening:
                self._send.send_nowait((track, record))

    def on_untrack(self, track: rtc.Track, _pub: object, p: rtc.RemoteParticipant) -> None:
        for record in self.caller.audio:
            if record.sid == p.sid and not record.unsubscribed_at:
                record.unsubscribed_at = time.monotonic()

    async def listen(self, tg: TaskGroup) -> None:
        """Hear each track sent by :meth:`on_track`, in a task of ``tg``."""
        async for track, record in self._receive:
            tg.start_soon(self.hear, track, record)

    async def hear(self, track: rtc.Track, record: TrackAudio) -> None:
        # 50 ms frames, not 10: a process holding many callers (the benchmarks)
        # must keep up with their audio, or every event it times comes late.
        stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1, frame_size_ms=FRAME_MS)
        self.streams.append(stream)
        caller = self.caller
        async for event in stream:
            record.last_at = time.monotonic()
            record.first_at = record.first_at or record.last_at
            record.frames += 1
            if caller.heard.is_set():
                continue
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            if samples.size and int(np.abs(samples).max()) > LOUD:
                caller.loud_frames += 1
                if caller.loud_frames >= HEARD_FRAMES:
                    caller.heard.set()


@asynccontextmanager
async def caller_in(
    livekit: LiveKitSettings, room: str, identity: str = "caller", *, listen: bool = True
) -> AsyncIterator[Caller]:
    """Join ``room`` as a standard participant and record every agent that shows up.

    ``listen=False``: agent audio tracks are recorded but not decoded until
    ``caller.listening`` is set (a process holding many callers saves its CPU
    for the events it times).
    """
    token = (
        api.AccessToken(livekit.api_key, livekit.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )
    lk_room = rtc.Room()
    caller = Caller(lk_room, listening=listen)
    watch = _RoomWatch(caller)
    await lk_room.connect(livekit.ws_url, token)
    for p in lk_room.remote_participants.values():
        watch.on_join(p)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.listen, tg)
            try:
                yield caller
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _leave(lk_room, watch.streams)


async def _leave(room: rtc.Room, streams: list[rtc.AudioStream]) -> None:
    """Leave so that nothing native is left running when the process exits.

    Order matters. An audio stream left open keeps the FFI's threads calling
    back into Python (a frame every 10 ms) until the interpreter shuts down;
    a native thread that calls in while it finalizes is unwound through Rust
    frames that cannot unwind, and the process aborts ("panic in a function
    that cannot unwind") after the call itself went fine. So: close the
    streams (waits for their native task to end), then leave the room and
    wait for the disconnect to complete.
    """
    with anyio.move_on_after(CLOSE_TIMEOUT):
        for stream in streams:
            await stream.aclose()
        await room.disconnect()


def close_native_runtime() -> None:
    """Stop LiveKit's native runtime calling into Python; for a process about to exit.

    livekit-rtc disposes its runtime from an ``atexit`` hook, but its threads
    still call into Python for a few milliseconds after a room is left (room
    teardown events, log batches). One that arrives while the interpreter
    finalizes is ended by CPython with ``pthread_exit``, whose forced unwind
    through Rust frames aborts the process ("panic in a function that cannot
    unwind", SIGABRT) after the work succeeded. Disposing here, while the
    interpreter is whole, stops new callbacks; letting go of the GIL for a
    moment lets those already under way finish. No ``livekit.rtc`` object may
    be used afterwards.
    """
    from livekit.rtc import _ffi_client

    client = _ffi_client.FfiClient._instance
    # A private hook of the pinned livekit-rtc: without it, fall back to atexit.
    dispose = getattr(client, "_dispose", None)
    if dispose is None:
        return
    dispose()
    time.sleep(CALLBACK_GRACE)


@dataclass
class CallResult:
    """What one call found."""

    room: str
    agent: str | None = None
    identity: str | None = None
    kind_agent: bool = False
    joined_after: float | None = None
    heard_after: float | None = None
    loud_frames: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.agent is not None and self.heard_after is not None


async def place_call(
    livekit: LiveKitSettings,
    room: str,
    *,
    metadata: str | None = None,
    identity: str = "openrtc-caller",
    wait: float = 20.0,
    listen: float = 10.0,
    delete_room: bool = False,
) -> CallResult:
    """Create ``room`` (when ``metadata`` is given), join it, and report who answers.

    The call waits up to ``wait`` seconds for an agent participant and up to
    ``listen`` more for its audio, then leaves (and deletes the room if asked).
    """
    result = CallResult(room=room)
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        if metadata is not None:
            await lk.room.create_room(api.CreateRoomRequest(name=room, metadata=metadata))
        started = time.monotonic()
        try:
            async with caller_in(livekit, room, identity) as caller:
                try:
                    sighting = await caller.wait_agent(within=wait)
                except TimeoutError:
                    result.error = f"no agent joined within {wait:.0f}s"
                else:
                    result.identity = sighting.identity
                    result.agent = sighting.attributes.get(AGENT_ATTRIBUTE, "")
                    result.kind_agent = sighting.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
                    result.joined_after = round(sighting.at - started, 3)
                    with anyio.move_on_after(listen):
                        await caller.heard.wait()
                        result.heard_after = round(time.monotonic() - started, 3)
                    if result.heard_after is None:
                        result.error = f"the agent was not heard within {listen:.0f}s"
                result.loud_frames = caller.loud_frames
        finally:
            if delete_room:
                with anyio.CancelScope(shield=True):
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
    return result

"""A test caller: joins a room on the real LiveKit server and watches the agent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import numpy as np
from livekit import api, rtc

from openrtc.devstack import LiveKitServer


@dataclass
class AgentSighting:
    identity: str
    sid: str
    kind: int
    attributes: dict[str, str]
    at: float


@dataclass
class Caller:
    """What a caller in the room saw: agent participants over time and their audio."""

    room: rtc.Room
    sightings: list[AgentSighting] = field(default_factory=list)
    max_agents_at_once: int = 0
    loud_frames: int = 0
    heard: anyio.Event = field(default_factory=anyio.Event)

    def agents(self) -> list[rtc.RemoteParticipant]:
        return [
            p
            for p in self.room.remote_participants.values()
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ]

    async def wait_agent(self, *, within: float = 15.0, other_than: str = "") -> AgentSighting:
        """The next agent participant (optionally one with a different sid)."""
        with anyio.fail_after(within):
            while True:
                for sighting in reversed(self.sightings):
                    if sighting.sid != other_than and any(
                        p.sid == sighting.sid for p in self.agents()
                    ):
                        return sighting
                await anyio.sleep(0.02)


@asynccontextmanager
async def caller_in(
    livekit: LiveKitServer, room: str, identity: str = "caller"
) -> AsyncIterator[Caller]:
    """Join ``room`` as a standard participant and record every agent that shows up."""
    token = (
        api.AccessToken(livekit.api_key, livekit.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )
    lk_room = rtc.Room()
    caller = Caller(lk_room)

    def count() -> None:
        caller.max_agents_at_once = max(caller.max_agents_at_once, len(caller.agents()))

    @lk_room.on("participant_connected")
    def _on_join(p: rtc.RemoteParticipant) -> None:
        if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            caller.sightings.append(
                AgentSighting(p.identity, p.sid, p.kind, dict(p.attributes), time.monotonic())
            )
        count()

    @lk_room.on("participant_attributes_changed")
    def _on_attrs(changed: dict[str, str], p: rtc.Participant) -> None:
        for s in caller.sightings:
            if s.sid == p.sid:
                s.attributes = dict(p.attributes)

    tracks: list[rtc.Track] = []
    track_arrived = anyio.Event()

    @lk_room.on("track_subscribed")
    def _on_track(track: rtc.Track, _pub: object, p: rtc.RemoteParticipant) -> None:
        if (
            track.kind == rtc.TrackKind.KIND_AUDIO
            and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ):
            tracks.append(track)
            track_arrived.set()

    async def listen() -> None:
        await track_arrived.wait()
        async for event in rtc.AudioStream(tracks[-1], sample_rate=48000, num_channels=1):
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            if samples.size and int(np.abs(samples).max()) > 1000:
                caller.loud_frames += 1
                if caller.loud_frames >= 10:
                    caller.heard.set()

    await lk_room.connect(livekit.url, token)
    for p in lk_room.remote_participants.values():
        _on_join(p)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            try:
                yield caller
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await lk_room.disconnect()

"""Smoke tests proving the servers the suite runs against are the real ones.

Every later test (dispatcher, workers, end to end) relies on what these check:
room metadata survives a round trip through LiveKit's API, a Redis stream entry
makes the XADD / XREADGROUP / XACK round trip, and media flows between two
``livekit.rtc.Room`` clients on a loopback-only machine.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import numpy as np
import pytest
from livekit import api, rtc

from openrtc.devtools.devstack import LiveKitServer, RedisServer

pytestmark = pytest.mark.anyio


def _token(server: LiveKitServer, room: str, identity: str) -> str:
    return (
        api.AccessToken(server.api_key, server.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


async def test_livekit_room_metadata_round_trip(livekit_server: LiveKitServer) -> None:
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    async with api.LiveKitAPI(
        livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
    ) as lkapi:
        created = await lkapi.room.create_room(
            api.CreateRoomRequest(name=name, metadata='{"agent": "dental"}')
        )
        assert created.metadata == '{"agent": "dental"}'
        listed = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[name]))
        assert [r.metadata for r in listed.rooms] == ['{"agent": "dental"}']
        await lkapi.room.delete_room(api.DeleteRoomRequest(room=name))


async def test_livekit_rejects_a_wrong_secret(livekit_server: LiveKitServer) -> None:
    async with api.LiveKitAPI(livekit_server.http_url, livekit_server.api_key, "x" * 40) as lkapi:
        with pytest.raises(api.TwirpError):
            await lkapi.room.list_rooms(api.ListRoomsRequest())


async def test_redis_stream_round_trip(redis: Any) -> None:
    stream = "openrtc:smoke"
    await redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    entry_id = await redis.xadd(stream, {b"job": b"payload"})
    delivered = await redis.xreadgroup("workers", "w1", {stream: ">"}, count=10)
    assert delivered == [[stream.encode(), [(entry_id, {b"job": b"payload"})]]]
    pending = await redis.xpending(stream, "workers")
    assert pending["pending"] == 1
    assert await redis.xack(stream, "workers", entry_id) == 1
    assert (await redis.xpending(stream, "workers"))["pending"] == 0


async def test_redis_server_restarts_on_the_same_port() -> None:
    import redis.asyncio as aioredis

    # Later issues restart Redis under a running dispatcher; the fixture must allow it.
    server = RedisServer().start()
    try:
        client = aioredis.Redis.from_url(server.url)
        assert await client.ping()
        server.stop()
        with pytest.raises(aioredis.ConnectionError):
            await client.ping()
        server.start()
        assert await client.ping()
        await client.aclose()
    finally:
        server.close()


async def test_media_flows_between_two_participants(livekit_server: LiveKitServer) -> None:
    room_name = f"media-{uuid.uuid4().hex[:8]}"
    listener, speaker = rtc.Room(), rtc.Room()
    received = 0
    subscribed = anyio.Event()
    enough = anyio.Event()
    tracks: list[rtc.Track] = []

    @listener.on("track_subscribed")
    def _on_track(track: rtc.Track, *_: object) -> None:
        tracks.append(track)
        subscribed.set()

    async def read_audio() -> None:
        nonlocal received
        await subscribed.wait()
        async for event in rtc.AudioStream(tracks[0], sample_rate=48000, num_channels=1):
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            if np.abs(samples).max() > 1000:  # the tone, not comfort silence
                received += 1
            if received >= 20:
                enough.set()
                return

    async def publish_tone() -> None:
        source = rtc.AudioSource(48000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("tone", source)
        await speaker.local_participant.publish_track(track)
        t = np.arange(480) / 48000
        phase = 0
        while not enough.is_set():
            tone = (np.sin(2 * np.pi * 440 * (t + phase * 0.01)) * 8000).astype(np.int16)
            await source.capture_frame(rtc.AudioFrame(tone.tobytes(), 48000, 1, 480))
            phase += 1

    try:
        with anyio.fail_after(20):
            await listener.connect(
                livekit_server.url, _token(livekit_server, room_name, "listener")
            )
            await speaker.connect(livekit_server.url, _token(livekit_server, room_name, "speaker"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_audio)
                tg.start_soon(publish_tone)
        assert received >= 20
        assert "speaker" in listener.remote_participants
    finally:
        await listener.disconnect()
        await speaker.disconnect()

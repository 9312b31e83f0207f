"""Caller-audio frames reach their own stream only, in a process with many streams.

Against a real livekit-server: a speaker publishes a tone, a listener in this
process opens three ``rtc.AudioStream``s on it (three native streams, three
handles, as three coroutine sessions each have one). Every stream must keep
receiving its frames, and no stream's queue may be handed another stream's
frames (livekit-rtc alone hands each frame to every stream: the work grows
with the square of the sessions in a coroutine worker).
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import numpy as np
import pytest
from livekit import api, rtc
from livekit.rtc._ffi_client import FfiClient

from openrtc.devtools.devstack import LiveKitServer
from openrtc.session import ffi_routing
from openrtc.session.runners import CoroutineRunner
from openrtc.settings import LiveKitSettings, WorkerSettings
from tests.support.stack import OFFLINE_AGENTS

pytestmark = pytest.mark.anyio

STREAMS = 3
FRAMES = 20


def _token(server: LiveKitServer, room: str, identity: str) -> str:
    return (
        api.AccessToken(server.api_key, server.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


async def test_frames_reach_only_their_own_stream(livekit_server: LiveKitServer) -> None:
    ffi_routing.install()
    assert ffi_routing.installed()
    room_name = f"routing-{uuid.uuid4().hex[:8]}"
    listener, speaker = rtc.Room(), rtc.Room()
    subscribed = anyio.Event()
    tracks: list[rtc.Track] = []
    frames = [0] * STREAMS
    foreign = [0] * STREAMS
    done = anyio.Event()

    @listener.on("track_subscribed")
    def _on_track(track: rtc.Track, *_: object) -> None:
        tracks.append(track)
        subscribed.set()

    def count_foreign(i: int, stream: rtc.AudioStream) -> None:
        """Count what the stream's event queue is handed for other streams' handles."""
        queue = stream._ffi_queue
        put = queue.put_nowait

        def put_nowait(event: Any) -> None:
            if (
                event.WhichOneof("message") == "audio_stream_event"
                and event.audio_stream_event.stream_handle != stream._ffi_handle.handle
            ):
                foreign[i] += 1
            put(event)

        queue.put_nowait = put_nowait  # type: ignore[method-assign]

    async def read(i: int, stream: rtc.AudioStream) -> None:
        async for _event in stream:
            frames[i] += 1
            if all(n >= FRAMES for n in frames):
                done.set()
            if done.is_set():
                return

    async def publish_tone() -> None:
        source = rtc.AudioSource(48000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("tone", source)
        await speaker.local_participant.publish_track(track)
        t = np.arange(480) / 48000
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
        while not done.is_set():
            await source.capture_frame(rtc.AudioFrame(tone.tobytes(), 48000, 1, 480))

    try:
        with anyio.fail_after(30):
            await listener.connect(
                livekit_server.url, _token(livekit_server, room_name, "listener")
            )
            await speaker.connect(livekit_server.url, _token(livekit_server, room_name, "speaker"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_tone)
                await subscribed.wait()
                streams = [
                    rtc.AudioStream(tracks[0], sample_rate=24000, num_channels=1)
                    for _ in range(STREAMS)
                ]
                queue = FfiClient.instance.queue
                assert isinstance(queue, ffi_routing.RoutedFfiQueue)
                assert queue.routed() >= STREAMS
                for i, stream in enumerate(streams):
                    count_foreign(i, stream)
                    tg.start_soon(read, i, stream)
        assert all(n >= FRAMES for n in frames), frames
        assert foreign == [0] * STREAMS, f"frames of other streams handed to each: {foreign}"
    finally:
        for stream in locals().get("streams", []):
            await stream.aclose()
        await listener.disconnect()
        await speaker.disconnect()
    # Closed streams are forgotten: nothing routes to a queue nobody reads.
    with anyio.fail_after(10):
        while any(s._ffi_handle.handle in queue._streams for s in streams):
            await anyio.sleep(0.05)


async def test_coroutine_runner_routes_frames(livekit_server: LiveKitServer) -> None:
    from openrtc.agents.registry import AgentPool

    config = AgentPool.from_directory(OFFLINE_AGENTS).get("dental")
    creds = LiveKitSettings(livekit_server.url, livekit_server.api_key, livekit_server.api_secret)
    runner = CoroutineRunner(config, WorkerSettings(livekit=creds, agent="dental"))
    await runner.prepare()
    assert ffi_routing.installed()

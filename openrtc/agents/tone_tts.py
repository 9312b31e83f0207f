"""A tiny offline TTS: each word becomes a short tone. For demos and tests.

It lets an agent speak with no cloud key and no model download: the greeting
is real audio in the room (a listener can measure it), just not speech.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import numpy as np
from livekit.agents import APIConnectOptions, tts
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS

__all__ = ["ToneTTS"]

SAMPLE_RATE = 24_000
WORD_SECONDS = 0.12
GAP_SECONDS = 0.03


def synthesize_tones(text: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM: one tone per word, its pitch derived from the word."""
    t = np.arange(int(sample_rate * WORD_SECONDS)) / sample_rate
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) * 200)  # 5 ms fades: no clicks
    gap = np.zeros(int(sample_rate * GAP_SECONDS), dtype=np.int16)
    chunks = []
    for word in text.split() or ["."]:
        pitch = 300 + int.from_bytes(hashlib.sha1(word.encode()).digest()[:2], "big") % 500
        tone = np.sin(2 * np.pi * pitch * t) * envelope * 9000
        chunks.append(tone.astype(np.int16))
        chunks.append(gap)
    return np.concatenate(chunks).tobytes()


class ToneTTS(tts.TTS[Any]):
    """A ``livekit.agents`` TTS that needs nothing but numpy."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=sample_rate,
            num_channels=1,
        )

    @property
    def model(self) -> str:
        return "tones"

    @property
    def provider(self) -> str:
        return "openrtc"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return _ToneStream(tts=self, input_text=text, conn_options=conn_options)


class _ToneStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=uuid.uuid4().hex,
            sample_rate=self._tts.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
        )
        output_emitter.push(synthesize_tones(self._input_text, self._tts.sample_rate))
        output_emitter.flush()

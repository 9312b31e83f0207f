"""The tone TTS's public path; it lives in :mod:`openrtc.agents.tone_tts`."""

from openrtc.agents.tone_tts import ToneTTS

__all__ = ["ToneTTS"]

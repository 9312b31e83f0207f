"""Offline dental agent: no cloud provider, for tests and the local demo."""

from __future__ import annotations

from livekit.agents import Agent

from openrtc import agent_config
from openrtc.offline import OfflineLLM, ToneTTS


@agent_config(
    name="dental",
    llm=OfflineLLM(),
    tts=ToneTTS(),
    greeting="Bright Smile Dental, offline line. How can we help you today?",
    # Its call reports keep what was said (long numbers masked: the default redaction).
    transcript=True,
)
class OfflineDental(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline dental receptionist.")

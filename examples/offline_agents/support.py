"""Offline support line."""

from __future__ import annotations

from livekit.agents import Agent

from openrtc import agent_config
from openrtc.offline import OfflineLLM, ToneTTS


@agent_config(
    name="support",
    llm=OfflineLLM(),
    tts=ToneTTS(),
    greeting="Support desk, offline line. Tell us what went wrong.",
)
class OfflineSupport(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline support agent.")

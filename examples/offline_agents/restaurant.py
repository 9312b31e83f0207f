"""Offline restaurant agent: @agent_config without a name, so it is named after its file."""

from __future__ import annotations

from livekit.agents import Agent

from openrtc import agent_config
from openrtc.tone_tts import ToneTTS


@agent_config(tts=ToneTTS(), greeting="Trattoria Luca, offline line. A table for how many?")
class OfflineRestaurant(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline restaurant host.")

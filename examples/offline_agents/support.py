"""Offline support line."""

from __future__ import annotations

from livekit.agents import Agent

from openrtc import agent_config


@agent_config(name="support", greeting="Support desk, offline line.")
class OfflineSupport(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline support agent.")

"""Offline dental agent: no cloud provider, for tests and the local demo."""

from __future__ import annotations

from livekit.agents import Agent

from openrtc import agent_config


@agent_config(name="dental", greeting="Bright Smile Dental, offline line.")
class OfflineDental(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline dental receptionist.")

"""Offline restaurant agent, named after its file (no @agent_config)."""

from __future__ import annotations

from livekit.agents import Agent


class OfflineRestaurant(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline restaurant host.")

"""A restaurant booking line on cloud providers."""

from __future__ import annotations

from livekit.agents import Agent, RunContext, function_tool

from openrtc import agent_config


@agent_config(
    name="restaurant",
    stt="deepgram/nova-3",
    llm="openai/gpt-4.1-mini",
    tts="cartesia/sonic-2",
    greeting="Hello, you've reached Trattoria Luca. Would you like to book a table?",
)
class RestaurantHost(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions=(
                "You take table reservations for Trattoria Luca. Ask for the party size, "
                "the date and time, and a name. Be warm and brief."
            )
        )

    @function_tool
    async def reserve_table(
        self, context: RunContext, name: str, party_size: int, when: str
    ) -> str:
        """Reserve a table."""
        return f"Table for {party_size} under {name} at {when} is confirmed."

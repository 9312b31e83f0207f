"""Offline restaurant agent: @agent_config without a name, so it is named after its file.

Its ``book_table`` tool shows the idempotency key a tool with side effects
passes to its backend: a call completed just before a crash is never booked
twice (a resumed session shows a call that was cut off as interrupted).
"""

from __future__ import annotations

from livekit.agents import Agent, RunContext, function_tool

from openrtc import agent_config, idempotency_key
from openrtc.offline import OfflineLLM, ToneTTS

#: Bookings by idempotency key: a real backend would keep these in its database.
BOOKINGS: dict[str, int] = {}


@agent_config(
    llm=OfflineLLM(),
    tts=ToneTTS(),
    greeting="Trattoria Luca, offline line. A table for how many?",
    resume_line="Sorry, I lost you for a second.",
)
class OfflineRestaurant(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline restaurant host.")

    @function_tool
    async def book_table(self, context: RunContext, party_size: int) -> str:
        """Book a table for ``party_size`` people."""
        BOOKINGS.setdefault(idempotency_key(context), party_size)
        return f"table for {party_size} booked"

"""A dental-office receptionist on cloud providers (LiveKit Inference model strings)."""

from __future__ import annotations

from livekit.agents import Agent, RunContext, function_tool

from openrtc import agent_config


@agent_config(
    name="dental",
    stt="deepgram/nova-3",
    llm="openai/gpt-4.1-mini",
    tts="cartesia/sonic-2",
    greeting="Thanks for calling Bright Smile Dental. How can I help you today?",
)
class DentalReceptionist(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions=(
                "You are the receptionist of Bright Smile Dental. Book, move and cancel "
                "appointments, answer questions about opening hours (Mon-Fri 8-18), and "
                "never give medical advice. Keep answers short: this is a phone call."
            )
        )

    @function_tool
    async def book_appointment(self, context: RunContext, patient: str, day: str) -> str:
        """Book a check-up for a patient on a given day."""
        return f"Booked {patient} for a check-up on {day} at 10:00."

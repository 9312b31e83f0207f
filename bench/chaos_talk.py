"""The chaos ledger's conversations and its skewed worker: what a caller says, how it
reads the agent's replies, and the broken agents of ``--sabotage greeting-on-takeover``.

Every chaos call holds a real conversation with the offline agents
(``examples/offline_agents``, :class:`openrtc.agents.offline.OfflineLLM`): the
caller types three things (livekit-agents' room text input, topic ``lk.chat``),
each answered "Noted: <thing>", then at the end of its planned duration asks
"what did I say first?", which the offline LLM answers from the history it
was given, so only a conversation that survived every takeover names the
first thing. Replies are read from the agent's transcription streams (topic
``lk.transcription``), as ``tests/test_resume.py`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from livekit import rtc

from openrtc.agents.offline import FIRST_QUESTION as _FIRST_LOWER

#: The question (the offline LLM matches it case-insensitively).
FIRST_QUESTION: Final = "What did I say first?"
assert _FIRST_LOWER in FIRST_QUESTION.lower()
#: Each offline agent's greeting (``greeting=`` in examples/offline_agents/<agent>.py;
#: tests/test_chaos_ledger.py checks they are the files' own).
GREETINGS: Final = {
    "dental": "Bright Smile Dental, offline line. How can we help you today?",
    "restaurant": "Trattoria Luca, offline line. A table for how many?",
}
#: Seconds the skewed worker's clock is behind (libfaketime).
SKEW: Final = 8.0
#: libfaketime itself, preloaded (not the ``faketime`` wrapper, which forks: a
#: SIGKILL of the wrapper would leave the worker running).
LIBFAKETIME: Final = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), "")


def faketime_env(offset: str) -> dict[str, str]:
    """Environment for a process whose clock is ``offset`` (faketime syntax: "-8s")."""
    if not LIBFAKETIME:
        raise RuntimeError("libfaketime is required: apt-get install faketime libfaketime")
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "FAKETIME_DONT_RESET": "1"}


def things_to_say(n: int) -> list[str]:
    """Call ``n``'s three things; the first names the call, so no answer fits another."""
    return [f"my name is caller {n}", "I would like to come on a Tuesday", "my number ends in 42"]


def noted(thing: str) -> str:
    """The offline LLM's reply to a thing said (``openrtc.agents.offline.offline_reply``)."""
    return f"Noted: {thing}"


#: ``--sabotage greeting-on-takeover``: the offline agents, but greeting again
#: whenever a session resumes (a takeover, a handover). Written to a directory
#: of their own; the worker loads them instead of examples/offline_agents.
SABOTAGE_AGENTS: Final = {
    name: f'''
from livekit.agents import Agent

from openrtc import agent_config
from openrtc.offline import OfflineLLM, ToneTTS


@agent_config(name="{name}", llm=OfflineLLM(), tts=ToneTTS(), greeting="{greeting}")
class Sabotaged(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Offline agent that greets on every resume.")

    async def on_resume(self) -> None:
        self.session.say("{greeting}")
'''
    for name, greeting in GREETINGS.items()
}


@dataclass
class Talk:
    """One caller's side of the conversation: the agent's final lines as they come."""

    room: rtc.Room
    lines: list[tuple[float, str]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: set[asyncio.Task[None]] = field(default_factory=set)

    def attach(self) -> None:
        """Read every agent transcription segment (before the caller connects)."""
        self.room.register_text_stream_handler("lk.transcription", self._on_stream)

    def _on_stream(self, reader: rtc.TextStreamReader, _identity: str) -> None:
        task = asyncio.get_running_loop().create_task(self._read(reader))
        # Held until done: the callback cannot await, and the caller's
        # close() cancels what is left.
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(self, reader: rtc.TextStreamReader) -> None:
        with contextlib.suppress(Exception):
            text = await reader.read_all()
            if (reader.info.attributes or {}).get("lk.transcription_final") != "false":
                self.lines.append((time.time(), text.strip()))
                self._changed.set()

    async def close(self) -> None:
        for task in list(self._readers):
            task.cancel()
        with contextlib.suppress(Exception):
            self.room.unregister_text_stream_handler("lk.transcription")
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)

    async def wait_line(self, match: Callable[[str], bool], since: float, within: float) -> str:
        """The first agent line after ``since`` that ``match``es, or "" after ``within`` s."""
        deadline = time.monotonic() + within
        while True:
            for at, line in self.lines:
                if at >= since and match(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def say(self, text: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.room.local_participant.send_text(text, topic="lk.chat"), 5.0
            )

    async def tell(self, thing: str, *, reply_wait: float, attempts: int = 3) -> bool:
        """Say ``thing`` until the agent notes it (a person repeats what went unheard)."""
        for _ in range(attempts):
            sent = time.time()
            await self.say(thing)
            if await self.wait_line(lambda line: line == noted(thing), sent, reply_wait):
                return True
        return False

    async def ask_first(self, *, reply_wait: float, within: float) -> str:
        """Ask what was said first, again every ``reply_wait`` s; the answer or ""."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            sent = time.time()
            await self.say(FIRST_QUESTION)
            wait = min(reply_wait, deadline - time.monotonic())
            answer = await self.wait_line(
                lambda line: line.startswith("You first said:"), sent, max(wait, 0.0)
            )
            if answer:
                return answer
        return ""


def count_greetings(lines: list[tuple[float, str]], agent: str) -> int:
    """How many of the agent's lines were its greeting."""
    return sum(1 for _, line in lines if line == GREETINGS[agent])


__all__ = [
    "FIRST_QUESTION",
    "GREETINGS",
    "LIBFAKETIME",
    "SABOTAGE_AGENTS",
    "SKEW",
    "Talk",
    "count_greetings",
    "faketime_env",
    "noted",
    "things_to_say",
]

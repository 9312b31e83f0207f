"""A caller's side of a conversation with an offline agent: its transcript, its turns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from livekit import rtc
from redis.asyncio import Redis

from openrtc.devtools.caller import AgentSighting, Caller, caller_in
from openrtc.devtools.devstack import LiveKitServer
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import JobMessage
from tests.support.jobs import job_message
from tests.support.stack import creds, eventually, new_room, unique

GREETING = "Bright Smile Dental, offline line. How can we help you today?"


THREE_THINGS = ["my name is Ada", "I need a cleaning", "Tuesdays suit me"]


@dataclass
class Transcript:
    """What the caller read from agents' transcription streams, one entry per segment."""

    caller: Caller
    lines: list[str] = field(default_factory=list)

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines if line == text)

    async def say(self, text: str) -> None:
        await self.caller.room.local_participant.send_text(text, topic="lk.chat")

    async def ask(self, text: str, expected: str, *, within: float = 20.0) -> None:
        before = self.count(expected)
        await self.say(text)
        await eventually(
            lambda: self.count(expected) > before, f"reply {expected!r}", within=within
        )


@asynccontextmanager
async def transcribing(caller: Caller) -> AsyncIterator[Transcript]:
    transcript = Transcript(caller)
    send, receive = anyio.create_memory_object_stream[rtc.TextStreamReader](100)

    def on_stream(reader: rtc.TextStreamReader, identity: str) -> None:
        send.send_nowait(reader)

    caller.room.register_text_stream_handler("lk.transcription", on_stream)

    async def read() -> None:
        async for reader in receive:
            text = await reader.read_all()
            if reader.info.attributes.get("lk.transcription_final") != "false":
                transcript.lines.append(text.strip())

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        try:
            yield transcript
        finally:
            tg.cancel_scope.cancel()
            caller.room.unregister_text_stream_handler("lk.transcription")


async def three_things_said(transcript: Transcript, redis: Redis, key: str) -> None:
    for thing in THREE_THINGS:
        await transcript.ask(thing, f"Noted: {thing}")

    async def saved() -> bool:
        data = await redis.get(key)
        return data is not None and THREE_THINGS[-1].encode() in data

    await eventually(saved, "the third turn checkpointed")


async def agent_listening(caller: Caller, identity: str) -> None:
    """Until the agent's session is started (it publishes its state as an attribute)."""

    def listening() -> bool:
        for p in caller.agents():
            if p.identity == identity and p.attributes.get("lk.agent.state") == "listening":
                return True
        return False

    await eventually(listening, "the agent listening", within=20)


@dataclass
class GreetedCall:
    """A call the worker on ``keys`` answered, greeted and is transcribing."""

    keys: Keys
    message: JobMessage
    #: The call's checkpoint key.
    key: str
    caller: Caller
    transcript: Transcript
    #: The agent that answered.
    original: AgentSighting


@asynccontextmanager
async def greeted_call(
    livekit: LiveKitServer, redis: Redis, ns: str, agent: str, room: str, greeting: str
) -> AsyncIterator[GreetedCall]:
    """A new room (``room`` a prefix) with a transcribing caller, its job enqueued on
    ``ns``, until ``agent`` answered and said ``greeting``; the caller leaves on exit."""
    keys = Keys(ns)
    lk_room = await new_room(livekit, unique(room))
    message = job_message(livekit, lk_room, agent, unique("dispatcher"))
    async with (
        caller_in(creds(livekit), lk_room.name) as caller,
        transcribing(caller) as transcript,
    ):
        await StreamStore(redis, keys).enqueue([message])
        # A liveness bound: a worker process in process isolation imports, then
        # warms its zygote (which imports again) before it reads; on a loaded
        # 2-core machine that is 20 s and more (seen: no agent within 30 s).
        original = await caller.wait_agent(within=90)
        await eventually(lambda: transcript.count(greeting), "the greeting", within=20)
        key = keys.checkpoint(agent, message.job_id)
        yield GreetedCall(keys, message, key, caller, transcript, original)

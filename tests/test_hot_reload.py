"""Hot reload (``openrtc dev``, ``worker --reload``): a save moves the live call to the new code.

Real LiveKit, real Redis, a texting caller (tests/support/conversation.py).
The agent's replies carry a mark from a helper module beside it, so the test
reads which code answered: ``v1 Noted: apple`` before the save, ``v2 ...``
after. The offline LLM answers "what did I say first" from the history it
is given, so a reply after the move shows the conversation came along.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.session.session import SessionControl
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.worker.worker import Worker
from tests.support.conversation import Transcript, transcribing
from tests.support.jobs import job_message
from tests.support.paths import forget_agents_dir
from tests.support.stack import creds, eventually, new_room, unique, working

pytestmark = pytest.mark.anyio

GREETING = "Echo line, how can I help?"

AGENT = """
from livekit.agents import Agent

from openrtc import agent_config, pin_reload
from openrtc.offline import OfflineLLM, ToneTTS
from _replies import MARK


@agent_config(name="echo", llm=OfflineLLM(), tts=ToneTTS(), greeting="{greeting}")
class Echo(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="echo")

    async def on_enter(self) -> None:
        if {pinned}:
            pin_reload(self.session)

    async def llm_node(self, chat_ctx, tools, model_settings):
        yield MARK + " "
        async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
            yield chunk
"""


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "agents"
    directory.mkdir()
    yield directory
    forget_agents_dir(directory)


def write_agents(directory: Path, *, mark: str, pinned: bool = False) -> None:
    (directory / "echo.py").write_text(AGENT.format(greeting=GREETING, pinned=pinned))
    (directory / "_replies.py").write_text(f"MARK = {mark!r}\n")


def save(path: Path, text: str) -> None:
    """Write ``text`` as an editor's save would (a new file renamed over the old)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


@asynccontextmanager
async def call(livekit: LiveKitServer, redis: Redis, ns: str) -> AsyncIterator[Transcript]:
    """A new call to echo, until it was greeted; the caller leaves on exit."""
    room = await new_room(livekit, unique("echo-reload"))
    message = job_message(livekit, room, "echo", unique("dispatcher"))
    async with caller_in(creds(livekit), room.name) as caller, transcribing(caller) as transcript:
        await StreamStore(redis, Keys(ns)).enqueue([message])
        await caller.wait_agent(within=30)
        await eventually(lambda: transcript.count(GREETING), "the greeting", within=30)
        yield transcript


def the_call(worker: Worker) -> SessionControl:
    (control,) = [c.control for c in worker.claims if c.control is not None]
    return control


async def moved(control: SessionControl, moves: int) -> None:
    """Until the call moved to reloaded code ``moves`` times (bench/reload.py times it)."""
    await eventually(lambda: control.moves >= moves, f"move {moves} to the reloaded code")


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_a_save_moves_the_live_call_to_the_new_code_with_its_conversation(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    agents: Path,
    caplog: pytest.LogCaptureFixture,
    isolation: str,
) -> None:
    write_agents(agents, mark="v1")
    pool = AgentPool.from_directory(agents)
    ns = unique("ns")
    caplog.set_level(logging.INFO, logger="openrtc.reload")
    async with (
        working(
            livekit_server,
            redis_server.url,
            ns,
            "echo",
            pool=pool,
            reload=True,
            isolation=isolation,
            idle_processes=1,
        ) as worker,
        call(livekit_server, redis, ns) as transcript,
    ):
        await transcript.ask("apple", "v1 Noted: apple")
        first_class = worker.config.agent_cls

        # A save that does not import: the old code keeps serving, one line says where.
        good = AGENT.format(greeting=GREETING, pinned=False)
        save(agents / "echo.py", good + "\ndef (:\n")
        await eventually(lambda: "reload failed" in caplog.text, "the reload error", within=10)
        (line,) = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
        assert f"echo.py:{good.count(chr(10)) + 2}: SyntaxError" in line, line
        await transcript.ask("pear", "v1 Noted: pear")
        assert worker.config.agent_cls is first_class

        # The next good save moves the call; so does a save of a helper it imports.
        control = the_call(worker)
        assert control.moves == 0
        save(agents / "echo.py", good)
        await moved(control, 1)
        assert worker.config.agent_cls is not first_class
        await transcript.ask("plum", "v1 Noted: plum")
        save(agents / "_replies.py", "MARK = 'v2'\n")
        await moved(control, 2)
        await transcript.ask("what did I say first", "v2 You first said: apple")
        assert transcript.count(GREETING) == 1, transcript.lines

        # A new call gets the new code from its first word.
        async with call(livekit_server, redis, ns) as second:
            await second.ask("plum", "v2 Noted: plum")


async def test_a_pinned_call_finishes_on_its_code_while_new_calls_get_the_new_one(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, agents: Path
) -> None:
    write_agents(agents, mark="v1", pinned=True)
    ns = unique("ns")
    async with (
        working(
            livekit_server,
            redis_server.url,
            ns,
            "echo",
            pool=AgentPool.from_directory(agents),
            reload=True,
        ) as worker,
        call(livekit_server, redis, ns) as pinned,
    ):
        await pinned.ask("apple", "v1 Noted: apple")
        first_class = worker.config.agent_cls
        control = the_call(worker)
        save(agents / "_replies.py", "MARK = 'v2'\n")
        await eventually(lambda: worker.config.agent_cls is not first_class, "the reload")
        # A new call runs the new code; by the time it answered, the pinned call
        # had every chance to move (its worker asked it at the reload).
        async with call(livekit_server, redis, ns) as second:
            await second.ask("pear", "v2 Noted: pear")
        await pinned.ask("what did I say first", "v1 You first said: apple")
        assert control.moves == 0

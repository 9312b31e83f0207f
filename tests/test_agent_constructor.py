"""An agent whose constructor raises: refused at start-up, and never joins a room half-built.

Real processes, real LiveKit and Redis: a worker whose agent cannot be built
exits at once with one line; a constructor that fails only in one session
fails that session before the room is joined, and the call is started again
at once (counted) instead of a lease later.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from tests.support.stack import (
    creds,
    delete_room,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)

pytestmark = pytest.mark.anyio

BROKEN_AGENT = """
from livekit.agents import Agent

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS


@agent_config(name="broken", llm=OfflineLLM(), tts=ToneTTS(), greeting="Hello.")
class Broken(Agent):
    def __init__(self) -> None:
        raise RuntimeError("no prompt configured for this line")
"""

#: Fails the first time it is built for a session (inside a job), then works.
FLAKY_AGENT = """
from livekit.agents import Agent, get_job_context

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS

FAILED = []


@agent_config(name="flaky", llm=OfflineLLM(), tts=ToneTTS(), greeting="Flaky line, hello.")
class Flaky(Agent):
    def __init__(self) -> None:
        if get_job_context(required=False) is not None and not FAILED:
            FAILED.append(True)
            raise RuntimeError("the prompt store timed out")
        super().__init__(instructions="Works the second time.")
"""


def test_a_worker_whose_agent_cannot_be_built_exits_at_once_with_one_line(
    livekit_server: LiveKitServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "broken.py").write_text(BROKEN_AGENT)
    env = dict(
        os.environ,
        LIVEKIT_URL=livekit_server.url,
        LIVEKIT_API_KEY=livekit_server.api_key,
        LIVEKIT_API_SECRET=livekit_server.api_secret,
        REDIS_URL=redis_server.url,
        OPENRTC_NAMESPACE=unique("ns"),
    )
    command = [sys.executable, "-m", "openrtc", "worker", "--agent", "broken"]
    command += ["--agents-dir", str(tmp_path), "--http-port", "0"]
    # Generous: the old worker never exits (it reports ready and takes calls).
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "broken" in lines[0]
    assert "RuntimeError: no prompt configured for this line" in lines[0]


async def test_a_constructor_that_fails_once_fails_before_the_join_and_the_call_starts_again(
    livekit_server: LiveKitServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY_AGENT)
    pool = AgentPool.from_directory(tmp_path)
    ns = unique("ns")
    room = unique("flaky-call")
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns), pool),
        # A lease far longer than the wait below: the call must not wait for it.
        working(livekit_server, redis_server.url, ns, "flaky", pool=pool, lease=30.0) as worker,
    ):
        await new_room(livekit_server, room)
        async with caller_in(creds(livekit_server), room) as caller:
            await caller.wait_agent(within=20)
            await eventually(lambda: worker.stats.started == 2, "the second session")
            # The failed session never joined: one agent ever came.
            assert len(caller.sightings) == 1
            assert worker.stats.failed == 1
        await delete_room(livekit_server, room)

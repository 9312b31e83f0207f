"""Guards: a worker over its memory limit hands its calls over with their conversation
and exits to be restarted; a session process over its own limit has its call moved;
a run of failed sessions stops the intake (``/readyz`` 503) and says why.

Real LiveKit, real Redis, real worker processes, a texting caller
(:mod:`tests.support.conversation`). Memory grows on purpose: the "hungry" agent's
LLM keeps ``N`` MB when the caller says ``eat N``, so the limit is crossed at a
known turn, not whenever the runtime happens to grow.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.devstack import LiveKitServer, RedisServer, free_port
from openrtc.ops.metrics import count
from openrtc.settings import SettingError, WorkerSettings
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.worker.limits import EXIT_MEMORY_LIMIT, FailureGuard, Level, memory_level, next_streak
from tests.support.conversation import (
    THREE_THINGS,
    agent_listening,
    greeted_call,
    three_things_said,
)
from tests.support.http import get
from tests.support.jobs import job_message
from tests.support.processes import LEASE, worker_process_killed_on_exit
from tests.support.stack import eventually, new_room, unique, working

HUNGRY_GREETING = "Hungry line, hello."

HUNGRY_AGENT = '''
from typing import Any

from livekit.agents import Agent, llm

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS

#: What the caller told the agent to eat, kept (so it stays resident).
HOARD: list[bytes] = []


class HungryLLM(OfflineLLM):
    """Replies as the offline LLM; keeps N MB when the caller's last words are "eat N"."""

    def chat(self, *, chat_ctx: llm.ChatContext, **kwargs: Any) -> llm.LLMStream:
        said = [
            item.text_content or ""
            for item in chat_ctx.items
            if item.type == "message" and item.role == "user"
        ]
        if said and said[-1].startswith("eat "):
            # Written, not calloc'ed: every page is resident.
            HOARD.append(b"x" * (int(said[-1].split()[1]) * 1024 * 1024))
        return super().chat(chat_ctx=chat_ctx, **kwargs)


@agent_config(name="hungry", llm=HungryLLM(), tts=ToneTTS(), greeting="Hungry line, hello.")
class Hungry(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Eats memory when told to.")
'''

#: Fails every session it is built for (inside a job); builds at start-up.
FAILING_AGENT = """
from livekit.agents import Agent, get_job_context

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS


@agent_config(name="failing", llm=OfflineLLM(), tts=ToneTTS(), greeting="Failing line.")
class Failing(Agent):
    def __init__(self) -> None:
        if get_job_context(required=False) is not None:
            raise RuntimeError("the prompt store is down")
        super().__init__(instructions="Never gets this far in a call.")
"""

#: The same agent name, working: the peer's.
WORKING_AGENT = """
from livekit.agents import Agent

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS


@agent_config(name="failing", llm=OfflineLLM(), tts=ToneTTS(), greeting="Working line.")
class Working(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Works.")
"""

pytestmark = pytest.mark.anyio


# -- the policies ------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("mb", "warn", "limit", "level"),
    [
        (100, None, None, Level.OK),
        (100, 200, None, Level.OK),
        (200, 200, None, Level.WARN),
        (5000, 200, None, Level.WARN),
        (100, None, 200, Level.OK),
        (200, None, 200, Level.LIMIT),
        (150, 100, 200, Level.WARN),
        (99.9, 100, 200, Level.OK),
        (250, 100, 200, Level.LIMIT),
    ],
)
def test_memory_level(mb: float, warn: float | None, limit: float | None, level: Level) -> None:
    assert memory_level(mb, warn_mb=warn, limit_mb=limit) is level


@pytest.mark.unit
@pytest.mark.parametrize(
    ("streak", "status", "again", "after"),
    [
        (0, "failed", False, 1),
        (4, "failed", False, 5),
        # The call whose failure was counted last, failing again: its own fault.
        (1, "failed", True, 1),
        (4, "success", False, 0),
        (0, "success", False, 0),
        # Another worker has the call: nothing said about this worker's sessions.
        (3, "taken_over", False, 3),
    ],
)
def test_next_streak(streak: int, status: str, again: bool, after: int) -> None:
    assert next_streak(streak, status, again=again) == after


@pytest.mark.unit
def test_the_failure_guard_stops_after_the_limit_tries_again_after_the_cooldown() -> None:
    now = [0.0]
    guard = FailureGuard(limit=2, cooldown=60.0, clock=lambda: now[0])
    guard.record("failed", "a")
    guard.record("failed", "a")  # the same call again (delivered again): counted once
    assert guard.refusing() is None
    guard.record("taken_over", "b")
    assert guard.refusing() is None
    guard.record("failed", "c")
    reason = guard.refusing()
    assert reason is not None
    assert "2 calls in a row failed" in reason
    now[0] = 61.0
    assert guard.refusing() is None  # tried again ...
    guard.record("failed", "d")  # ... one more failed call stops it again
    assert guard.refusing() is not None
    guard.record("success", "e")  # a success makes it ready
    assert guard.refusing() is None
    assert guard.streak == 0


@pytest.mark.unit
def test_calls_failing_in_turn_count_once_each() -> None:
    """Two calls fail, then the first again (its redelivery, after the second's
    failure): two calls failed, not three (seen: "3 calls in a row failed" for two)."""
    guard = FailureGuard(limit=3, cooldown=60.0)
    for job in ("a", "b", "a", "b", "a"):
        guard.record("failed", job)
    assert guard.streak == 2
    assert guard.refusing() is None
    guard.record("success", "c")
    guard.record("failed", "a")  # a new run: counted again
    assert guard.streak == 1


@pytest.mark.unit
def test_off_never_refuses() -> None:
    guard = FailureGuard(limit=0, cooldown=60.0)
    for n in range(100):
        guard.record("failed", str(n))
    assert guard.refusing() is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"memory_warn_mb": 500, "memory_limit_mb": 500}, "--memory-warn-mb must be less"),
        ({"memory_limit_mb": 10}, "--memory-limit-mb (OPENRTC_MEMORY_LIMIT_MB) must be"),
        ({"session_memory_limit_mb": 100}, "needs --isolation process"),
        ({"max_consecutive_failures": -1}, "--max-consecutive-failures"),
    ],
)
def test_guard_settings_are_checked(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(SettingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WorkerSettings(livekit=None, agent="a", **overrides)  # type: ignore[arg-type]


# -- against real servers ----------------------------------------------------------


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_a_worker_over_its_memory_limit_hands_its_call_over_with_its_conversation(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    isolation: str,
) -> None:
    """The caller's "eat 800" takes the worker past its limit: it drains as on a
    SIGTERM, the peer takes the call at a turn boundary with its conversation (no
    second greeting), and the worker exits with EXIT_MEMORY_LIMIT."""
    (tmp_path / "hungry.py").write_text(HUNGRY_AGENT)
    pool = AgentPool.from_directory(tmp_path)
    ns = unique("ns")
    # Measured with a call: ~130 MB PSS (coroutine: the worker alone), ~300 MB
    # (process: with the zygote and a child); eating 800 MB is over the limit in
    # either, nothing before it is.
    args = ["--isolation", isolation, "--memory-limit-mb", "600", "--memory-warn-mb", "500"]
    with worker_process_killed_on_exit(
        livekit_server, redis_server.url, ns, *args, agent="hungry", agents_dir=tmp_path
    ) as first:
        async with (
            greeted_call(livekit_server, redis, ns, "hungry", "hungry", HUNGRY_GREETING) as call,
            AsyncExitStack() as stack,
        ):
            caller, transcript = call.caller, call.transcript
            await three_things_said(transcript, redis, call.key)
            peer = await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    "hungry",
                    pool=pool,
                    lease=LEASE,
                    isolation=isolation,
                )
            )
            assert first.poll() is None  # under its limit so far
            # Its reply is not waited for: the handover may come while the agent
            # says it, and the transcription of a reply cut short never ends.
            await transcript.say("eat 800")
            replacement = await caller.wait_agent(within=30, other_than=call.original.sid)
            assert replacement.identity == call.original.identity
            with anyio.fail_after(30):
                code = await anyio.to_thread.run_sync(first.wait)
            assert code == EXIT_MEMORY_LIMIT
            assert peer.running_jobs == [call.message.job_id]
            assert peer.stats.reclaimed == 0  # handed over, not taken after a lease
            await agent_listening(caller, replacement.identity)
            await transcript.ask("what did I say first?", f"You first said: {THREE_THINGS[0]}")
            assert transcript.count(HUNGRY_GREETING) == 1, transcript.lines


async def test_a_session_process_over_its_limit_has_its_call_moved_with_its_conversation(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """Process isolation, one worker with room for two calls: the session process
    that ate past ``--session-memory-limit-mb`` hands its call over (here to a new
    process of the same worker), the conversation kept; the worker goes on."""
    (tmp_path / "hungry.py").write_text(HUNGRY_AGENT)
    pool = AgentPool.from_directory(tmp_path)
    ns = unique("ns")
    async with (
        working(
            livekit_server,
            redis_server.url,
            ns,
            "hungry",
            pool=pool,
            lease=LEASE,
            isolation="process",
            concurrency=2,
            session_memory_limit_mb=300,
        ) as worker,
        greeted_call(
            livekit_server, redis, ns, "hungry", "hungry-session", HUNGRY_GREETING
        ) as call,
    ):
        caller, transcript = call.caller, call.transcript
        await three_things_said(transcript, redis, call.key)
        (first,) = list(worker.claims)
        assert first.control is not None
        old_pid = first.control.pid
        await transcript.say("eat 400")  # its reply may be cut short by the move
        replacement = await caller.wait_agent(within=30, other_than=call.original.sid)
        assert replacement.identity == call.original.identity
        await eventually(
            lambda: worker.stats.handed_over == 1 and worker.stats.taken_over == 1,
            "the old session stepped aside",
            within=30,
        )
        assert worker.running_jobs == [call.message.job_id]
        # Measured, and exported (the worker with its zygote and children).
        assert count(worker.metrics.memory_bytes, agent="hungry") > 100 * 1024 * 1024
        (claim,) = list(worker.claims)
        assert claim.control is not None
        assert claim.control.pid not in (0, old_pid)
        await agent_listening(caller, replacement.identity)
        await transcript.ask("what did I say first?", f"You first said: {THREE_THINGS[0]}")
        assert transcript.count(HUNGRY_GREETING) == 1, transcript.lines


async def test_failed_sessions_in_a_row_stop_the_intake_and_readyz_says_why(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """Two calls in a row fail (the agent cannot be built in a call): the worker
    reads nothing more, /readyz answers 503 with the reason, and the next call goes
    to a peer whose agent works."""
    failing, healthy = tmp_path / "failing", tmp_path / "working"
    failing.mkdir()
    healthy.mkdir()
    (failing / "failing.py").write_text(FAILING_AGENT)
    (healthy / "failing.py").write_text(WORKING_AGENT)
    ns = unique("ns")
    store = StreamStore(redis, Keys(ns))
    async with working(
        livekit_server,
        redis_server.url,
        ns,
        "failing",
        pool=AgentPool.from_directory(failing),
        lease=LEASE,
        max_consecutive_failures=2,
        failure_cooldown=3600.0,
        http_port=free_port(),
    ) as worker:
        failed = [
            job_message(
                livekit_server, await new_room(livekit_server, unique("fail")), "failing", "d"
            )
            for _ in range(2)
        ]
        await store.enqueue(failed)
        # Each built in its call and failed (maybe started again at once and
        # failed again: that call counts once); two calls failed: stopped.
        await eventually(lambda: worker.readiness() is not None, "stopped by failures", within=30)
        reason = worker.readiness()
        assert reason is not None
        assert "2 calls in a row failed" in reason
        started = worker.stats.started
        assert worker.http is not None
        status, text = await get(worker.http.port, "/readyz")
        assert status == 503
        assert "2 calls in a row failed" in text

        async with working(
            livekit_server,
            redis_server.url,
            ns,
            "failing",
            pool=AgentPool.from_directory(healthy),
            lease=LEASE,
        ) as peer:
            second = job_message(
                livekit_server, await new_room(livekit_server, unique("next")), "failing", "d"
            )
            await store.enqueue([second])
            await eventually(
                lambda: second.job_id in peer.running_jobs, "the peer took the next call", within=30
            )
            # The failed calls too, after their lease: the stopped worker left them.
            await eventually(
                lambda: all(m.job_id in peer.running_jobs for m in failed),
                "the peer took the failed calls",
                within=30,
            )
            assert worker.stats.started == started
            assert worker.running_jobs == []

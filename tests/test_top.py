"""``openrtc top``'s data: what workers publish of their running sessions.

Real workers, real calls (LiveKit and Redis servers), read back with
``openrtc top --once --json`` as a script would; and the loop accounting that
attributes event-loop time and blocks to the session whose task spent them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.session.live import BLOCK_S, LiveState, attribute_to, install_loop_accounting
from openrtc.wire.keys import Keys
from openrtc.worker.top import _Rate
from tests.support.conversation import greeted_call
from tests.support.jobs import write_agent
from tests.support.stack import delete_room, eventually, unique, working

STALL_GREETING = "Stall line, hello."

#: An agent whose model holds the event loop when told "stall N" (N ms), as a
#: provider doing blocking I/O in its coroutine would.
STALL_AGENT = """
import time
from typing import Any

from livekit.agents import Agent, llm

from openrtc import agent_config
from openrtc.agents.offline import OfflineLLM, ToneTTS


class StallingLLM(OfflineLLM):
    def chat(self, *, chat_ctx: llm.ChatContext, **kwargs: Any) -> llm.LLMStream:
        said = [
            item.text_content or ""
            for item in chat_ctx.items
            if item.type == "message" and item.role == "user"
        ]
        if said and said[-1].startswith("stall "):
            time.sleep(int(said[-1].split()[1]) / 1000)  # blocks the loop, on purpose
        return super().chat(chat_ctx=chat_ctx, **kwargs)


@agent_config(name="stall", llm=StallingLLM(), tts=ToneTTS(), greeting="Stall line, hello.")
class Stall(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Stalls when told to.")
"""


def top_json(redis_url: str, ns: str, *args: str) -> dict[str, Any]:
    """``openrtc top --once --json``'s document."""
    done = subprocess.run(
        [sys.executable, "-m", "openrtc", "top", "--once", "--json", *args],
        env={"REDIS_URL": redis_url, "OPENRTC_NAMESPACE": ns, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest.mark.anyio
async def test_top_lists_every_running_session_of_two_workers(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """A coroutine worker with two calls (one of them stalls its loop) and a
    process-isolation worker with one: ``top --once --json`` lists the three
    sessions with their workers, states, turns, CPU; the block is the stalling
    call's only; the session process's memory is its own. Calls that end and
    workers that stop leave the view."""
    write_agent(tmp_path, "stall", STALL_AGENT)
    ns = unique("ns")
    url = redis_server.url
    async with AsyncExitStack() as stack:
        coroutine = await stack.enter_async_context(
            working(
                livekit_server,
                url,
                ns,
                "stall",
                pool=AgentPool.from_directory(tmp_path),
                concurrency=2,
                top_interval=0.5,
            )
        )
        process = await stack.enter_async_context(
            working(
                livekit_server,
                url,
                ns,
                "dental",
                isolation="process",
                idle_processes=0,
                top_interval=0.5,
            )
        )
        calls = {}
        for name, agent, greeting in (
            ("stalled", "stall", STALL_GREETING),
            ("calm", "stall", STALL_GREETING),
            ("isolated", "dental", "Bright Smile Dental, offline line. How can we help you today?"),
        ):
            calls[name] = await stack.enter_async_context(
                greeted_call(livekit_server, redis, ns, agent, f"{agent}-top", greeting)
            )
        await calls["stalled"].transcript.ask("stall 1000", "Noted: stall 1000", within=30)
        await calls["calm"].transcript.ask("hello there", "Noted: hello there", within=30)
        job = {name: call.message.job_id for name, call in calls.items()}

        def rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
            return {row["job_id"]: row for row in doc["sessions"]}

        def settled(doc: dict[str, Any]) -> bool:
            found = rows(doc)
            return set(job.values()) <= found.keys() and all(
                found[j]["cpu"] is not None and found[j]["state"] == "listening"
                for j in job.values()
            )

        doc: dict[str, Any] = {}

        async def listed() -> bool:
            nonlocal doc
            doc = await anyio.to_thread.run_sync(top_json, url, ns)
            return settled(doc)

        await eventually(listed, "top listing the three sessions, listening", within=30)
        found = rows(doc)
        assert {w["worker"] for w in doc["workers"]} == {
            coroutine.settings.worker_id,
            process.settings.worker_id,
        }
        stalled, calm, isolated = (found[job[n]] for n in ("stalled", "calm", "isolated"))
        assert stalled["worker"] == calm["worker"] == coroutine.settings.worker_id
        assert isolated["worker"] == process.settings.worker_id
        assert (stalled["agent"], isolated["agent"]) == ("stall", "dental")
        assert stalled["room"] == calls["stalled"].message.room
        # The block is the stalling call's, not its neighbour's on the same loop.
        # (Any callback over BLOCK_S counts: a loaded machine makes some of
        # either call's; none as long as the stall.)
        assert stalled["blocks"] >= 1
        assert stalled["longest_block_s"] >= 1.0
        assert calm["longest_block_s"] < 1.0
        assert stalled["turns"] == calm["turns"] == 1
        assert calm["latency_s"] is not None
        # Coroutine sessions share the worker's memory; a session process has its own.
        assert stalled["rss_bytes"] is None
        assert isolated["rss_bytes"] > 20 * 1024 * 1024
        assert stalled["duration_s"] > 0

        # Filters, as a script would use them.
        only = await anyio.to_thread.run_sync(top_json, url, ns, "--agent", "dental")
        assert [r["job_id"] for r in only["sessions"]] == [job["isolated"]]

        # A call that ends leaves the view; a worker that stops takes its snapshot away.
        await delete_room(livekit_server, calls["calm"].message.room)

        async def calm_gone() -> bool:
            doc = await anyio.to_thread.run_sync(top_json, url, ns)
            return job["calm"] not in rows(doc)

        await eventually(calm_gone, "the ended call gone from top", within=30)
        process.request_stop()

        async def snapshot_withdrawn() -> bool:
            return not await redis.exists(Keys(ns).top(process.settings.worker_id))

        await eventually(snapshot_withdrawn, "the stopped worker's snapshot removed", within=40)


# --------------------------------------------------------------------------- loop accounting


@pytest.mark.unit
def test_loop_time_and_blocks_go_to_the_session_whose_task_spent_them() -> None:
    """Two sessions' tasks on one real event loop: one blocks it once, the other
    yields a hundred times; a task a session creates is the session's too."""
    install_loop_accounting()
    blocker, yielder = LiveState(), LiveState()

    async def blocking() -> None:
        attribute_to(blocker)
        await asyncio.sleep(0)

        async def child() -> None:
            time.sleep(BLOCK_S * 2)  # noqa: ASYNC251 (the block measured)

        await asyncio.create_task(child())

    async def yielding() -> None:
        attribute_to(yielder)
        for _ in range(100):
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(asyncio.create_task(blocking()), asyncio.create_task(yielding()))

    asyncio.run(main())
    assert blocker.blocks == 1
    assert blocker.longest_block_s >= BLOCK_S * 2
    assert blocker.loop_s >= BLOCK_S * 2
    assert yielder.longest_block_s < BLOCK_S * 2
    assert 0 < yielder.loop_s < blocker.loop_s


@pytest.mark.unit
def test_loop_accounting_is_installed_once() -> None:
    install_loop_accounting()
    wrapped = asyncio.Handle._run
    install_loop_accounting()
    assert asyncio.Handle._run is wrapped


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (
            {"state": "speaking", "turns": 3, "latency_s": 0.8, "blocks": 2, "started_at": 5.0},
            ("speaking", 3, 0.8, 2, 5.0),
        ),
        ({"turns": -1, "blocks": "many", "latency_s": "slow"}, ("joining", 0, None, 0, 0.0)),
        ({"state": 7, "turns": True, "started_at": float("nan")}, ("joining", 0, None, 0, 0.0)),
        ("not a dict", ("joining", 0, None, 0, 0.0)),
        ({"latency_s": None}, ("joining", 0, None, 0, 0.0)),
    ],
)
def test_a_session_process_live_line_updates_what_is_shown(sent: Any, expected: tuple) -> None:
    live = LiveState()
    live.update(sent)
    assert (live.state, live.turns, live.latency_s, live.blocks, live.started_at) == expected


@pytest.mark.unit
def test_a_live_state_round_trips_through_a_session_process_line() -> None:
    live = LiveState(state="thinking", started_at=12.5, turns=4, latency_s=1.25, blocks=1)
    live.longest_block_s = 0.3
    other = LiveState()
    other.update(json.loads(json.dumps(live.shown())))
    assert other.shown() == live.shown()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        ([(0.0, 10.0)], [None]),
        ([(0.0, 10.0), (1.0, 10.5)], [None, 0.5]),
        ([(0.0, 10.0), (2.0, 12.0)], [None, 1.0]),
        # A counter that went back (a new process under the same key) is no negative share.
        ([(0.0, 10.0), (1.0, 4.0)], [None, 0.0]),
        # The same instant twice: nothing to divide by.
        ([(1.0, 10.0), (1.0, 11.0)], [None, None]),
    ],
)
def test_cpu_share_between_two_readings(
    readings: list[tuple[float, float]], expected: list[float | None]
) -> None:
    rate = _Rate()
    assert [rate.share("s", seconds, now) for now, seconds in readings] == expected


@pytest.mark.unit
def test_cpu_shares_of_ended_sessions_are_forgotten() -> None:
    rate = _Rate()
    rate.share("a", 1.0, 0.0)
    rate.share("b", 1.0, 0.0)
    rate.keep({"b"})
    assert rate.share("a", 2.0, 1.0) is None
    assert rate.share("b", 2.0, 1.0) == 1.0


@pytest.mark.unit
def test_a_processes_cpu_and_memory_read_from_one_proc_file() -> None:
    import psutil

    from openrtc.worker.top import proc_stat

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        mine = psutil.Process(sleeper.pid)
        # Read once it sleeps: while it is still starting its memory grows.
        deadline = time.monotonic() + 10
        while mine.status() != psutil.STATUS_SLEEPING and time.monotonic() < deadline:
            time.sleep(0.01)
        read = proc_stat(sleeper.pid)
        assert read is not None
        seconds, rss = read
        # (The kernel's two files count resident pages a little apart.)
        assert rss == pytest.approx(mine.memory_info().rss, rel=0.2)
        assert seconds == pytest.approx(sum(mine.cpu_times()[:2]), abs=0.02)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc_stat(sleeper.pid) is None  # gone

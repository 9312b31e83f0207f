"""Session observers: ``@on_session_start`` once per call, ``@on_session_end`` once per
report, each isolated; real LiveKit, real Redis, a texting caller.

The agents directory of these tests is the offline dental agent plus a module of
observers (``OBSERVERS``): two write a line each to ``observed.log`` beside
them, the others raise or never return.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

import openrtc
from openrtc.agents.observers import Observer, observe, starts_call
from openrtc.agents.registry import AgentPool
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.errors import AgentRegistryError
from openrtc.wire.keys import Keys
from openrtc.wire.messages import RecordField
from openrtc.wire.reports import REPORT_FIELD
from tests.support.conversation import GREETING, THREE_THINGS, agent_listening, greeted_call
from tests.support.processes import LEASE, children_of, worker_process_killed_on_exit
from tests.support.stack import OFFLINE_AGENTS, delete_room, eventually, unique, working

OBSERVERS = """
import json
import os
import time
from pathlib import Path

import anyio

import openrtc

LOG = Path(__file__).with_name("observed.log")


def _line(**fields):
    with LOG.open("a") as out:
        out.write(json.dumps(fields) + "\\n")


@openrtc.on_session_start
async def record_start(session, ctx):
    _line(hook="start", job_id=ctx.job.id, pid=os.getpid(), state=session.agent_state)


@openrtc.on_session_start
def raises_at_start(session, ctx):
    raise RuntimeError("boom at start")


@openrtc.on_session_start
def blocks_at_start(session, ctx):
    time.sleep(3600)  # a thread of its own: the loop and the caller go on


@openrtc.on_session_end
def record_end(report):
    _line(hook="end", job_id=report.job_id, takeovers=report.tally.takeovers,
          outcome=report.outcome, pid=os.getpid())


@openrtc.on_session_end
async def raises_at_end(report):
    raise RuntimeError("boom at end")


@openrtc.on_session_end
async def sleeps_at_end(report):
    await anyio.sleep(3600)
"""

#: Longer than the caller waits for the greeting (20 s): a start observer that
#: held the greeting up until its timeout would fail the call's first step.
SLOW = "25"


def observed_agents(directory: Path) -> Path:
    """The offline dental agent and the observers module, in ``directory``."""
    directory.mkdir()
    shutil.copy(OFFLINE_AGENTS / "dental.py", directory / "dental.py")
    (directory / "observers.py").write_text(OBSERVERS)
    return directory


def observed(directory: Path) -> list[dict[str, Any]]:
    log = directory / "observed.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def runs_it(process: subprocess.Popen[bytes], worker_id: bytes | None) -> bool:
    """Whether ``worker_id`` is that worker process's (worker ids hold their pid)."""
    return worker_id is not None and f"-{process.pid}-".encode() in worker_id


pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_observers_run_once_per_call_across_a_takeover_and_a_handover(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    isolation: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Done when (issue 20): three turns, a SIGKILL takeover, a SIGTERM handover:
    the start observer ran once (in the first session), the end observer once
    (with the report: takeovers == 2); observers that raise or never return
    changed nothing for the caller and were logged."""
    caplog.set_level(logging.WARNING, logger="openrtc.observers")
    agents = observed_agents(tmp_path / "agents")
    ns, agent = unique("ns"), "dental"
    keys = Keys(ns)
    args = ["--isolation", isolation, "--idle-processes", "0", "--observer-timeout", SLOW]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    spawn = partial(worker_process_killed_on_exit, livekit_server, redis_server.url, ns, *args)
    replies = [f"Noted: {thing}" for thing in THREE_THINGS]
    with (
        spawn(agents_dir=agents, log=logs[0]) as first,
        spawn(agents_dir=agents, log=logs[1]) as second,
    ):

        async def both_up() -> bool:
            # Started (a zygote each in process isolation) before the call: the
            # caller's bounds are for the call, not for two workers starting on a busy host.
            return await redis.zcard(keys.workers(agent)) >= 2

        await eventually(both_up, "both workers up", within=90)
        # Greeted within 20 s while a start observer blocks for an hour with a
        # 25 s timeout: the caller did not wait for it.
        async with (
            greeted_call(livekit_server, redis, ns, agent, "dental-observed", GREETING) as call,
            AsyncExitStack() as stack,
        ):
            caller, transcript, job_id = call.caller, call.transcript, call.message.job_id
            await eventually(lambda: observed(agents), "the start observer's line", within=20)
            await transcript.ask(THREE_THINGS[0], replies[0])

            async def turn_saved() -> bool:
                data = await redis.get(call.key)
                return data is not None and THREE_THINGS[0].encode() in data

            await eventually(turn_saved, "turn 1 checkpointed")
            ran = await redis.hget(keys.job(agent, job_id), RecordField.WORKER)
            if isolation == "coroutine":
                serving, other = (first, second) if runs_it(first, ran) else (second, first)
                serving.send_signal(signal.SIGKILL)
            else:
                other = first if runs_it(first, ran) else second
                (zygote,) = children_of(other.pid)
                (session_process,) = children_of(zygote)
                os.kill(session_process, signal.SIGKILL)
            taker = await caller.wait_agent(within=60, other_than=call.original.sid)
            await agent_listening(caller, taker.identity)
            await transcript.ask(THREE_THINGS[1], replies[1])

            last = None
            if isolation == "coroutine":
                last = await stack.enter_async_context(
                    working(
                        livekit_server,
                        redis_server.url,
                        ns,
                        agent,
                        pool=AgentPool.from_directory(agents),
                        lease=LEASE,
                        # It runs no call's start, and waits for its end
                        # observers when it stops: the hanging one's timeout here.
                        observer_timeout=2.0,
                    )
                )
            other.send_signal(signal.SIGTERM)
            handed = await caller.wait_agent(within=60, other_than=taker.sid)
            await agent_listening(caller, handed.identity)
            await transcript.ask(THREE_THINGS[2], replies[2])
            assert other.wait(30) == 0
            await delete_room(livekit_server, call.message.room)

            def ended() -> bool:
                return any(line["hook"] == "end" for line in observed(agents))

            await eventually(ended, "the end observer's line", within=30)
            [(_, fields)] = await redis.xrange(keys.reports)
            report = json.loads(fields[REPORT_FIELD])
            if last is not None:
                # The end observers ran here: the one that raised is counted.
                errors = last.metrics.observer_errors

                def counted() -> bool:
                    return errors.labels(agent, "end")._value.get() == 1

                await eventually(counted, "the failed end observer counted")

    lines = observed(agents)
    starts = [line for line in lines if line["hook"] == "start"]
    ends = [line for line in lines if line["hook"] == "end"]
    assert len(starts) == 1, lines
    assert starts[0]["job_id"] == job_id
    assert len(ends) == 1, lines
    assert ends[0] == {**ends[0], "job_id": job_id, "takeovers": 2, "outcome": "ended"}
    assert report["takeovers"] == 2
    assert report["turns"] == 3
    if isolation == "process":
        # Where each ran: the start in a session process, the end in a worker.
        assert starts[0]["pid"] not in (first.pid, second.pid)
        assert ends[0]["pid"] in (first.pid, second.pid)
    said = "\n".join(
        [log.read_text(errors="replace") for log in logs] + [r.getMessage() for r in caplog.records]
    )
    assert "observer observers:raises_at_start (on_session_start)" in said, said[-4000:]
    assert "RuntimeError: boom at start" in said
    assert "observer observers:raises_at_end (on_session_end)" in said, said[-4000:]
    assert "RuntimeError: boom at end" in said
    if isolation == "coroutine":
        # The in-process worker ended the call, and stopped: the hanging end
        # observer was abandoned at its timeout, and said so.
        assert "observer observers:sleeps_at_end (on_session_end) for job" in said
        assert "took more than 2s; abandoned" in said


@pytest.mark.unit
@pytest.mark.parametrize(
    ("resumed", "handover", "greeted", "starts"),
    [
        (False, False, False, True),  # a new call's first session
        (True, False, False, False),  # a takeover resuming the checkpoint
        (True, True, False, False),  # a handover with its checkpoint
        (False, True, False, False),  # a handover whose checkpoint Redis lost
        (False, False, True, False),  # greeted before, whatever the checkpoint says
        (True, False, True, False),
    ],
)
def test_only_a_call_s_first_session_runs_the_start_observers(
    resumed: bool, handover: bool, greeted: bool, starts: bool
) -> None:
    assert starts_call(resumed=resumed, handover=handover, greeted=greeted) is starts


@pytest.mark.unit
def test_discovery_registers_observers_in_file_and_definition_order(tmp_path: Path) -> None:
    agents = observed_agents(tmp_path / "agents")
    (agents / "extra.py").write_text(
        "import openrtc\n"
        "from observers import record_end\n"  # imported: still one observer
        "@openrtc.on_session_end\n"
        "def also_at_end(report): pass\n"
    )
    pool = AgentPool.from_directory(agents)
    assert pool.list_agents() == ["dental"]
    assert [o.label for o in pool.observers.start] == [
        "observers:record_start",
        "observers:raises_at_start",
        "observers:blocks_at_start",
    ]
    assert [o.label for o in pool.observers.end] == [
        "observers:record_end",
        "extra:also_at_end",
        "observers:raises_at_end",
        "observers:sleeps_at_end",
    ]
    with pytest.raises(AgentRegistryError, match="marks a function"):
        openrtc.on_session_start(type("NotAFunction", (), {}))


async def test_a_failing_or_hanging_observer_is_logged_and_holds_up_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each call isolated: the others ran, the raising and the hanging ones were
    logged (and counted) once each, nothing was raised."""
    ran: list[str] = []
    released = threading.Event()

    async def fine(report: object) -> None:
        ran.append("fine")

    def raises(report: object) -> None:
        raise ValueError("no")

    async def hangs(report: object) -> None:
        await anyio.sleep_forever()

    def blocks(report: object) -> None:
        released.wait()

    def plain(report: object) -> None:
        ran.append(f"plain in {threading.current_thread().name}")

    observers = [
        Observer(f, "end", f"m:{f.__name__}") for f in (raises, hangs, blocks, fine, plain)
    ]
    failed: list[str] = []
    try:
        with anyio.fail_after(60):  # a liveness bound: each observer's own is 0.5 s
            await observe(observers, object(), bound=0.5, failed=lambda o: failed.append(o.label))
    finally:
        released.set()
    assert sorted(ran) == ["fine", "plain in observer m:plain"]
    assert sorted(failed) == ["m:blocks", "m:hangs", "m:raises"]
    messages = [r.getMessage() for r in caplog.records if r.name == "openrtc.observers"]
    assert sum("m:raises (on_session_end) failed: ValueError: no" in m for m in messages) == 1
    assert sum("m:hangs (on_session_end) took more than 0.5s" in m for m in messages) == 1
    assert sum("m:blocks (on_session_end) took more than 0.5s" in m for m in messages) == 1


@pytest.mark.unit
def test_openrtc_list_names_the_observers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from openrtc.cli.main import app

    agents = observed_agents(tmp_path / "agents")

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(app, ["list", str(agents), *args], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.stdout

    table = invoke()
    assert (
        "Observers of each call's start: observers:record_start, observers:raises_at_start, "
        "observers:blocks_at_start"
    ) in table
    assert "(on_session_end)\tobservers:record_end" in invoke("--plain")
    listed = json.loads(invoke("--json"))
    assert listed["observers"]["end"][0] == "observers:record_end"
    assert "observers" not in json.loads(
        CliRunner().invoke(app, ["list", str(OFFLINE_AGENTS), "--json"]).stdout
    )

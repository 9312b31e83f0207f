"""``process`` isolation's children: forked from one warm process, in parallel, from a pool.

Against the real LiveKit server and Redis. The agent here records, in files,
the process that imported its module, the one that ran ``prewarm`` and the one
that served each session, so the tests can tell children forked from a warm
zygote from children started cold.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.session.child import worker_gone
from openrtc.session.runners import ProcessRunner
from openrtc.session.session import room_access
from openrtc.settings import WorkerSettings
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import JobStatus
from tests.support.jobs import AGENT_HEADER, job_message, write_agent
from tests.support.stack import creds, delete_room, eventually, new_room, unique, working
from tests.support.waits import TEST_BUDGET, wait_status

pytestmark = pytest.mark.anyio

FORKED_AGENT = (
    AGENT_HEADER
    + """
import os

OUT = Path({out!r})
with (OUT / "imports").open("a") as f:
    f.write(f"{{os.getpid()}}\\n")


def prewarm(proc) -> None:
    proc.userdata["prewarmed_in"] = os.getpid()
    with (OUT / "prewarms").open("a") as f:
        f.write(f"{{os.getpid()}}\\n")


@agent_config(name="forked", tts=ToneTTS(), greeting="Hello.")
class Forked(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Reports its process.")

    async def on_enter(self) -> None:
        ctx = get_job_context()
        seen = {{
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "prewarmed_in": ctx.proc.userdata.get("prewarmed_in"),
        }}
        (OUT / f"session-{{ctx.job.id}}.json").write_text(json.dumps(seen))
"""
)


def forked_pool(tmp_path: Path) -> tuple[AgentPool, Path]:
    out = tmp_path / "out"
    out.mkdir()
    agents = write_agent(tmp_path / "agents", "forked", FORKED_AGENT.format(out=str(out)))
    return AgentPool.from_directory(agents), out


def pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def idle_pids(runner: Any) -> set[int]:
    # (``process.pid``: the children of 0.x's cold spawn, for a run against it.)
    return {getattr(c, "pid", None) or c.process.pid for c in runner._idle}


async def test_sessions_run_in_children_forked_from_one_warm_process_several_at_once(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    pool, out = forked_pool(tmp_path)
    rooms = [await new_room(livekit_server, unique("forked")) for _ in range(3)]
    messages = [job_message(livekit_server, room, "forked", dispatcher) for room in rooms]
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(
                livekit_server,
                redis_server.url,
                ns,
                "forked",
                pool=pool,
                isolation="process",
                idle_processes=1,
                concurrency=3,
            ) as worker,
            AsyncExitStack() as stack,
        ):
            assert isinstance(worker.runner, ProcessRunner)
            callers = [
                await stack.enter_async_context(caller_in(creds(livekit_server), room.name))
                for room in rooms
            ]
            # Three at once with one idle child: two are forked on demand, in parallel.
            await StreamStore(redis, keys).enqueue(messages)
            for caller in callers:
                await caller.wait_agent(within=30)

            def all_reported() -> bool:
                return len(list(out.glob("session-*.json"))) == len(messages)

            await eventually(all_reported, "every session's report", within=15)
            sessions = [json.loads(p.read_text()) for p in out.glob("session-*.json")]
            # prewarm ran once, in the zygote, not once per child.
            assert len(pids(out / "prewarms")) == 1
            (zygote,) = pids(out / "prewarms")
            # The agent module too was imported there only (this test process
            # imported it once for the pool it passed in).
            assert pids(out / "imports").count(zygote) == 1
            assert [p for p in pids(out / "imports") if p not in (zygote, os.getpid())] == []
            for seen in sessions:
                assert seen["prewarmed_in"] == zygote  # inherited, not re-run
                assert seen["ppid"] == zygote  # forked from it
                assert seen["pid"] != zygote
            assert len({seen["pid"] for seen in sessions}) == len(messages)
            for room in rooms:
                await delete_room(livekit_server, room.name)
            for message in messages:
                await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)


async def test_the_idle_pool_refills_after_a_job_and_replaces_a_killed_child(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    pool, out = forked_pool(tmp_path)
    room = await new_room(livekit_server, unique("forked-pool"))
    message = job_message(livekit_server, room, "forked", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with working(
            livekit_server,
            redis_server.url,
            ns,
            "forked",
            pool=pool,
            isolation="process",
            idle_processes=2,
        ) as worker:
            runner = worker.runner

            def two_idle() -> set[int] | None:
                found = idle_pids(runner)
                return found if len(found) == 2 else None

            first = await eventually(two_idle, "two idle children", within=20)
            victim = min(first)
            os.kill(victim, signal.SIGKILL)

            def replaced() -> set[int] | None:
                found = two_idle()
                return found if found and victim not in found else None

            second = await eventually(replaced, "the killed idle child replaced", within=20)
            assert len(second & first) == 1

            async with caller_in(creds(livekit_server), room.name) as caller:
                await StreamStore(redis, keys).enqueue([message])
                await caller.wait_agent(within=30)
                served = json.loads(
                    (
                        await eventually(
                            lambda: next(out.glob("session-*.json"), None), "the report"
                        )
                    ).read_text()
                )
                # The job took a child that was already idle...
                assert served["pid"] in second

                def refilled() -> set[int] | None:
                    found = two_idle()
                    return found if found and served["pid"] not in found else None

                # ...and the pool is back to two while the call goes on.
                third = await eventually(refilled, "the pool refilled", within=20)
                assert len(third - second) == 1
                await delete_room(livekit_server, room.name)
                await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)


async def test_a_session_process_killed_mid_call_is_reported_with_its_exit_code(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    pool, out = forked_pool(tmp_path)
    room = await new_room(livekit_server, unique("forked-kill"))
    message = job_message(livekit_server, room, "forked", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(
                livekit_server, redis_server.url, ns, "forked", pool=pool, isolation="process"
            ) as worker,
            caller_in(creds(livekit_server), room.name) as caller,
        ):
            await StreamStore(redis, keys).enqueue([message])
            await caller.wait_agent(within=30)
            report = await eventually(lambda: next(out.glob("session-*.json"), None), "report")
            os.kill(json.loads(report.read_text())["pid"], signal.SIGKILL)

            def failed() -> bool:
                return worker.stats.failed == 1

            await eventually(failed, "the session reported failed", within=20)
            record = await redis.hgetall(keys.job("forked", message.job_id))
            assert b"session process exited with code -9" in record[b"last_error"]
            await delete_room(livekit_server, room.name)


async def test_many_children_forked_at_the_same_moment_all_start(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    pool, _ = forked_pool(tmp_path)
    settings = WorkerSettings(livekit=creds(livekit_server), agent="forked", idle_processes=6)
    runner = ProcessRunner(pool.get("forked"), settings)
    with anyio.fail_after(TEST_BUDGET):
        try:
            await runner.prepare()  # six forks requested in the same event-loop turn
            assert len(idle_pids(runner)) == 6
        finally:
            await runner.aclose()


async def test_a_killed_zygote_is_replaced_and_calls_are_still_served(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    pool, out = forked_pool(tmp_path)
    room = await new_room(livekit_server, unique("forked-zygote"))
    message = job_message(livekit_server, room, "forked", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with working(
            livekit_server,
            redis_server.url,
            ns,
            "forked",
            pool=pool,
            isolation="process",
            idle_processes=0,  # every call needs a fresh fork
        ) as worker:
            runner = worker.runner
            assert isinstance(runner, ProcessRunner)
            first = runner._zygote._process
            assert first is not None
            os.kill(first.pid, signal.SIGKILL)

            def replaced() -> bool:
                current = runner._zygote._process
                return current is not None and current.pid != first.pid

            await eventually(replaced, "a new zygote", within=30)
            async with caller_in(creds(livekit_server), room.name) as caller:
                await StreamStore(redis, keys).enqueue([message])
                await caller.wait_agent(within=30)
                await delete_room(livekit_server, room.name)
                await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)
            assert len(pids(out / "prewarms")) == 2  # the new zygote warmed up once


def _children_of(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _state(pid: int) -> str:
    # The field after "(comm)": R, S, T (stopped), Z (zombie) ...
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


PLAIN_AGENT = """\
from livekit.agents import Agent


class Plain(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="x")
"""


async def _bare_zygote(
    tmp_path: Path, agents: Path | None = None, agent: str = "plain"
) -> tuple[Process, socket.socket]:
    """A session zygote started as the worker starts one, and the worker's end of
    its control socket; its stderr is piped for the test to read."""
    if agents is None:
        agents = write_agent(tmp_path / "agents", "plain", PLAIN_AGENT)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = await anyio.open_process(
        [sys.executable, "-m", "openrtc.session.child", str(agents), agent, str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=None,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    return zygote, ours


async def test_a_zygote_whose_worker_left_while_a_child_exited_goes_quietly(
    tmp_path: Path,
) -> None:
    """A stopped worker closes the zygote's socket while a session child exits
    (SIGTERM during a call, in `openrtc dev --isolation process`): the zygote's
    report of that exit finds nobody to read it. It exits 0 without a traceback."""
    zygote, ours = await _bare_zygote(tmp_path)
    async with zygote:
        try:
            with anyio.fail_after(120):
                await anyio.wait_readable(ours)
                assert json.loads(ours.recv(4096))["ready"] is True
                worker_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                socket.send_fds(ours, [b"F"], [child_end.fileno()])
                child_end.close()
                # The child's first line: it runs, and reads its socket next.
                await anyio.wait_readable(worker_end)
                assert json.loads(worker_end.recv(4096))["ready"] is True
                (child,) = _children_of(zygote.pid)
                # Hold the zygote while its child exits and the worker's end closes,
                # so it wakes to both at once: the exit report meets a closed socket.
                os.kill(zygote.pid, signal.SIGSTOP)
                await eventually(lambda: _state(zygote.pid) == "T", "the zygote stopped", within=60)
                worker_end.close()  # EOF before any job: the child exits 0
                await eventually(lambda: _state(child) == "Z", "the child exited", within=60)
                ours.close()
                os.kill(zygote.pid, signal.SIGCONT)
                assert zygote.stderr is not None
                stderr = b"".join([chunk async for chunk in zygote.stderr]).decode()
                code = await zygote.wait()
        finally:
            # A stopped zygote never exits: never leave one behind a failure.
            if zygote.returncode is None:
                os.kill(zygote.pid, signal.SIGCONT)
                zygote.kill()
    assert "Traceback" not in stderr, stderr
    assert code == 0, stderr


async def test_a_zygote_whose_worker_gave_up_before_it_was_ready_goes_quietly(
    tmp_path: Path,
) -> None:
    """A worker that stops (or times out) while its zygote warms up closes the
    socket first: the zygote's "ready" meets nobody. Exit 0, no traceback."""
    zygote, ours = await _bare_zygote(tmp_path)
    ours.close()  # before the zygote has imported anything
    async with zygote:
        with anyio.fail_after(60):
            assert zygote.stderr is not None
            stderr = b"".join([chunk async for chunk in zygote.stderr]).decode()
            code = await zygote.wait()
    assert "Traceback" not in stderr, stderr
    assert code == 0, stderr


async def test_a_session_child_whose_worker_left_mid_call_leaves_the_room_quietly(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    """A worker stopped during a call (SIGTERM in `openrtc dev --isolation
    process`, or its stop gave up waiting) closes its end of the child's socket:
    the child leaves the room, and its outcome line then meets nobody. It exits 0
    without a traceback: nobody is left to tell."""
    forked_pool(tmp_path)  # writes the agent to tmp_path/agents
    room = await new_room(livekit_server, unique("forked-orphan"))
    message = job_message(livekit_server, room, "forked", unique("dispatcher"))
    zygote, ours = await _bare_zygote(tmp_path, tmp_path / "agents", "forked")
    stderr: list[bytes] = []

    async def drain() -> None:
        # Read all along: a session's log lines could fill the pipe and stall it.
        assert zygote.stderr is not None
        stderr.extend([chunk async for chunk in zygote.stderr])

    async with zygote, anyio.create_task_group() as tg:
        tg.start_soon(drain)
        try:
            with anyio.fail_after(TEST_BUDGET * 2):
                await anyio.wait_readable(ours)
                assert json.loads(ours.recv(4096))["ready"] is True
                worker_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                socket.send_fds(ours, [b"F"], [child_end.fileno()])
                child_end.close()
                ready = json.loads(await _line(worker_end))
                assert ready["ready"] is True
                access = room_access(creds(livekit_server), message)
                job = {
                    "worker_id": "w-orphan",
                    "url": access.url,
                    "token": access.token,
                    "fields": {
                        k.decode(): base64.b64encode(v).decode()
                        for k, v in message.encode().items()
                    },
                }
                async with caller_in(creds(livekit_server), room.name) as caller:
                    worker_end.sendall((json.dumps(job) + "\n").encode())
                    await caller.wait_agent(within=30)
                    assert json.loads(await _line(worker_end)) == {"joined": True}
                    worker_end.close()  # the worker is gone, mid-call
                    await caller.wait_no_agent(within=30)  # nobody left behind
                report = await _zygote_report(ours)
                assert report["exit"] == ready["pid"]
                code = report["code"]
                ours.close()  # the zygote exits; its stderr (and its child's) ends
                await zygote.wait()
        finally:
            if zygote.returncode is None:
                zygote.kill()
            await delete_room(livekit_server, room.name)
    text = b"".join(stderr).decode(errors="replace")
    assert "Traceback" not in text, text
    assert code == 0, text


def _pipe() -> BrokenPipeError:
    return BrokenPipeError(32, "Broken pipe")


WORKER_GONE_CASES: list[tuple[BaseException, bool]] = [
    (_pipe(), True),
    (ExceptionGroup("task group", [_pipe()]), True),
    (ExceptionGroup("task group", [_pipe(), ExceptionGroup("inner", [_pipe()])]), True),
    # A real failure beside a broken pipe is still a failure, logged.
    (ExceptionGroup("task group", [_pipe(), RuntimeError("agent bug")]), False),
    (BaseExceptionGroup("task group", [_pipe(), KeyboardInterrupt()]), False),
    (ExceptionGroup("task group", [ConnectionRefusedError()]), False),
    (RuntimeError("agent bug"), False),
    (ConnectionResetError(), False),
]


@pytest.mark.unit
@pytest.mark.parametrize(("exc", "gone"), WORKER_GONE_CASES)
def test_only_a_broken_pipe_says_the_worker_is_gone(exc: BaseException, gone: bool) -> None:
    assert worker_gone(exc) is gone


async def _line(sock: socket.socket) -> str:
    """The next line a child wrote on its socket (one at a time: no read-ahead)."""
    data = b""
    while not data.endswith(b"\n"):
        await anyio.wait_readable(sock)
        chunk = sock.recv(1)
        assert chunk, f"the child closed its socket after {data!r}"
        data += chunk
    return data.decode()


async def _zygote_report(sock: socket.socket) -> dict[str, Any]:
    await anyio.wait_readable(sock)
    value: dict[str, Any] = json.loads(sock.recv(4096))
    return value

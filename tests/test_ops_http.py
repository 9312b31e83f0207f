"""The services' /healthz, /readyz and /metrics, probed over HTTP on real servers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer, free_port
from openrtc.dispatcher.dispatcher import Dispatcher
from openrtc.settings import DEFAULT_WORKER_HTTP_PORT
from openrtc.worker.worker import Worker
from tests.support.http import get
from tests.support.stack import (
    OFFLINE_AGENTS,
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

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "openrtc.json"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def port_of(service: Dispatcher | Worker) -> int:
    assert service.http is not None
    return service.http.port


@asynccontextmanager
async def services(
    livekit: LiveKitServer, redis_url: str, **worker: object
) -> AsyncIterator[tuple[Dispatcher, Worker]]:
    """A dispatcher and a dental worker, each with its HTTP server on a free port."""
    ns = unique("ns")
    settings = dispatcher_settings(livekit, redis_url, ns, http_port=free_port())
    async with (
        dispatching(settings) as dispatcher,
        working(livekit, redis_url, ns, "dental", http_port=free_port(), **worker) as dental,
    ):
        yield dispatcher, dental


async def test_endpoints_follow_a_real_call(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    async with services(livekit_server, redis_server.url) as (dispatcher, dental):
        d, w = port_of(dispatcher), port_of(dental)
        for port in (d, w):
            assert await get(port, "/healthz") == (200, "ok\n")
            assert await get(port, "/readyz") == (200, "ready\n")

        status, page = await get(d, "/metrics")
        assert status == 200
        assert value(page, "openrtc_livekit_connected") == 1
        assert value(page, "openrtc_redis_connected") == 1
        await eventually(lambda: _rescrape(dispatcher), "the dispatcher to count the worker")

        room = unique("lobby")
        await new_room(livekit_server, room, '{"agent": "dental"}')
        async with caller_in(creds(livekit_server), room) as caller:
            await caller.wait_agent(within=20)
            with anyio.fail_after(20):
                await caller.heard.wait()
            _, worker_page = await get(w, "/metrics")
            assert value(worker_page, "openrtc_sessions_running", agent="dental") == 1
            assert value(worker_page, "openrtc_session_capacity", agent="dental") == 10
            assert (
                value(
                    worker_page, "openrtc_sessions_started_total", agent="dental", tenant="default"
                )
                == 1
            )
            await delete_room(livekit_server, room)

        async def succeeded() -> bool:
            _, text = await get(w, "/metrics")
            return (
                value(
                    text,
                    "openrtc_sessions_ended_total",
                    agent="dental",
                    tenant="default",
                    outcome="succeeded",
                )
                == 1
            )

        await eventually(succeeded, "the session's success on /metrics", within=20)
        _, page = await get(d, "/metrics")
        # Routed by room metadata "agent": step 3.
        assert (
            value(page, "openrtc_jobs_routed_total", agent="dental", step="3", tenant="default")
            == 1
        )
        assert value(page, "openrtc_enqueue_latency_seconds_count", agent="dental") == 1
        assert value(page, "openrtc_availability_answers_total", answer="accepted") == 1
        assert value(page, "openrtc_jobs_waiting", agent="dental") == 0
        assert value(page, "openrtc_oldest_waiting_job_age_seconds", agent="dental") == 0
        build = [k for k in samples(page) if k[0] == "openrtc_build_info"]
        assert build, "openrtc_build_info is exported"


async def _rescrape(dispatcher: Dispatcher) -> bool:
    _, text = await get(port_of(dispatcher), "/metrics")
    return value(text, "openrtc_live_workers", agent="dental") == 1


async def test_backlog_and_oldest_waiting_age_per_agent(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    """A job for an agent with no worker waits: the dispatcher exports it and its age."""
    async with services(livekit_server, redis_server.url) as (dispatcher, _):
        room = f"restaurant-{unique('wait')}"
        await new_room(livekit_server, room)

        async def waiting() -> str | None:
            _, text = await get(port_of(dispatcher), "/metrics")
            age = value(text, "openrtc_oldest_waiting_job_age_seconds", agent="restaurant")
            return (
                text
                if value(text, "openrtc_jobs_waiting", agent="restaurant") == 1 and age > 0
                else None
            )

        page = await eventually(waiting, "a waiting restaurant job on /metrics", within=20)
        assert value(page, "openrtc_live_workers", agent="restaurant") == 0
        assert (
            value(page, "openrtc_jobs_routed_total", agent="restaurant", step="5", tenant="default")
            == 1
        )
        await delete_room(livekit_server, room)


async def test_readyz_says_why_when_redis_stops(
    livekit_server: LiveKitServer, tmp_path: Path
) -> None:
    server = RedisServer(log_path=tmp_path / "redis.log").start()
    try:
        async with services(livekit_server, server.url) as (dispatcher, dental):
            d, w = port_of(dispatcher), port_of(dental)
            await eventually(lambda: _ready(d), "the dispatcher ready")
            await eventually(lambda: _ready(w), "the worker ready")
            server.stop()

            async def unready(port: int) -> str | None:
                status, text = await get(port, "/readyz")
                return text if status == 503 else None

            reason = await eventually(lambda: unready(d), "the dispatcher unready", within=15)
            assert reason.startswith("Redis unreachable"), reason
            assert reason.count("\n") == 1
            reason = await eventually(lambda: unready(w), "the worker unready", within=15)
            assert reason.startswith("Redis unreachable"), reason
            # Alive all the same: liveness must not restart a service for Redis.
            assert (await get(d, "/healthz"))[0] == 200
            assert (await get(w, "/healthz"))[0] == 200
            _, page = await get(d, "/metrics")
            assert value(page, "openrtc_redis_connected") == 0
            assert not [k for k in samples(page) if k[0] == "openrtc_jobs_waiting"]

            server.start()
            await eventually(lambda: _ready(d), "the dispatcher ready again", within=15)
            await eventually(lambda: _ready(w), "the worker ready again", within=15)
    finally:
        server.close()


async def _ready(port: int) -> bool:
    return (await get(port, "/readyz"))[0] == 200


async def test_readyz_unready_while_the_worker_drains(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    async with services(livekit_server, redis_server.url) as (dispatcher, dental):
        w = port_of(dental)
        assert await get(w, "/readyz") == (200, "ready\n")
        dental.request_stop()
        status, text = await get(w, "/readyz")
        assert (status, text) == (503, "draining: taking no new jobs\n")
        _, page = await get(w, "/metrics")
        assert value(page, "openrtc_draining") == 1
        assert (await get(port_of(dispatcher), "/readyz"))[0] == 200


async def test_a_stalled_loop_answers_503_on_healthz(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    async with services(livekit_server, redis_server.url, health_max_lag=1.0) as (_, dental):
        w = port_of(dental)
        assert (await get(w, "/healthz"))[0] == 200
        answers: list[tuple[int, str]] = []

        def probe() -> None:
            # From another thread, as a kubelet would: the request arrives
            # while the loop is blocked and is answered when it runs again.
            time.sleep(0.5)
            url = f"http://127.0.0.1:{w}/healthz"
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    answers.append((reply.status, reply.read().decode()))
            except urllib.error.HTTPError as exc:
                answers.append((exc.code, exc.read().decode()))

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(2.5)  # noqa: ASYNC251 - the stall under test: the loop is blocked
        await anyio.to_thread.run_sync(prober.join)
        status, text = answers[0]
        assert status == 503, text
        assert text.startswith("event loop stalled"), text
        # The loop keeps time again: healthy.
        await eventually(lambda: _healthy(w), "healthz to recover after the stall", within=5)


async def _healthy(port: int) -> bool:
    return (await get(port, "/healthz"))[0] == 200


# -- dashboards and alerts ------------------------------------------------------------

_NAME = re.compile(r"\bopenrtc_[a-z0-9_]+\b")


def exported_names(page: str) -> set[str]:
    """Every series name a /metrics page can hold, samples or not (from its TYPE lines)."""
    names = {name for name, _ in samples(page)}
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total")
            names |= {base + suffix for suffix in suffixes.get(kind, ("",))}
    return names


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("expr", "query") and isinstance(item, str):
                    exprs.append(item)
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/setup.sh (it installs Debian's prometheus)"
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    # And they fire when they should (deploy/prometheus/alerts.test.yaml).
    tests = ALERTS.with_name("alerts.test.yaml")
    result = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_rules_and_dashboard_use_only_exported_metrics(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    async with services(livekit_server, redis_server.url) as (dispatcher, dental):
        exported = set()
        for service in (dispatcher, dental):
            status, page = await get(port_of(service), "/metrics")
            assert status == 200
            exported |= exported_names(page)
    rules = set(_NAME.findall(ALERTS.read_text()))
    panels = {name for expr in dashboard_exprs() for name in _NAME.findall(expr)}
    assert len(rules) >= 5, rules
    assert len(panels) >= 10, panels
    assert rules - exported == set()
    assert panels - exported == set()


def test_a_taken_port_is_one_line_and_exit_1(livekit_server: LiveKitServer) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "LIVEKIT_URL": livekit_server.url,
            "LIVEKIT_API_KEY": livekit_server.api_key,
            "LIVEKIT_API_SECRET": livekit_server.api_secret,
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "OPENRTC_HTTP_PORT": str(port),
        }
        command = ["worker", "--agent", "dental", "--agents-dir", str(OFFLINE_AGENTS)]
        result = subprocess.run(
            [sys.executable, "-m", "openrtc", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: cannot serve HTTP on 0.0.0.0:{port}" in result.stderr
    assert "--http-port" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_default_port_taken_falls_back_to_a_free_one(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    # Two workers (or a test's two worker processes) on one host both start on
    # the default port: the second must serve elsewhere, not exit.
    with socket.socket() as taken:
        try:
            taken.bind(("0.0.0.0", DEFAULT_WORKER_HTTP_PORT))
            taken.listen()
        except OSError:
            pass  # taken already: by another service, which is the case under test
        env = {
            **{k: v for k, v in os.environ.items() if k != "OPENRTC_HTTP_PORT"},
            "LIVEKIT_URL": livekit_server.url,
            "LIVEKIT_API_KEY": livekit_server.api_key,
            "LIVEKIT_API_SECRET": livekit_server.api_secret,
            "REDIS_URL": redis_server.url,
            "OPENRTC_NAMESPACE": f"fallback-{os.getpid()}",
        }
        command = ["worker", "--agent", "dental", "--agents-dir", str(OFFLINE_AGENTS)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "openrtc", *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = None
            deadline = time.monotonic() + 60
            for line in proc.stdout:
                match = re.search(r"HTTP port \d+ is taken .*serving on (\d+) instead", line)
                if match:
                    port = int(match.group(1))
                    break
                assert time.monotonic() < deadline, "no fallback line within 60 s"
            assert port is not None
            assert port != DEFAULT_WORKER_HTTP_PORT
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
                assert reply.status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert proc.returncode == 0

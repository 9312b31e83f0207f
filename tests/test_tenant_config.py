"""Tenant configuration end to end: real LiveKit, real Redis, a real worker.

The agents directory holds ``tenants.toml``: tenant ``acme`` has its own
greeting, LLM and a credential by reference (``env:ACME_KEY``). An ``acme``
call gets them (its agent says which LLM its session has, and a fingerprint
of the credential it reads with ``openrtc.tenant_settings()``); a
``default``-tenant call gets the agent's own. The secret is nowhere in Redis,
the logs or the metrics, nor in the environment of a session process serving
another tenant's call. A changed file serves the next call; an invalid one is
logged and the last good one stays.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import secrets
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.session.runners import ProcessRunner, _Child
from openrtc.store.streams import StreamStore
from openrtc.tenant_file import TenantsError
from openrtc.wire.keys import Keys
from openrtc.wire.messages import JobMessage, RecordField
from openrtc.worker.worker import Worker
from tests.support.conversation import Transcript, transcribing
from tests.support.jobs import job_message, write_agent
from tests.support.stack import creds, delete_room, eventually, new_room, unique, working

pytestmark = pytest.mark.anyio

#: The agent: its own greeting and no LLM; as it starts it says its tenant, the
#: LLM its session runs and a fingerprint of its tenant's credential.
AGENT = """
import hashlib

from livekit.agents import Agent, function_tool

import openrtc
from openrtc import agent_config
from openrtc.offline import ToneTTS


@agent_config(name="{name}", tts=ToneTTS(), greeting="Hello from the agent.")
class Configured(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Says its tenant's settings.")

    async def on_enter(self) -> None:
        settings = openrtc.tenant_settings()
        llm = type(self.session.llm).__name__ if self.session.llm is not None else "none"
        key = "none"
        if "KEY" in settings.credential_names:
            key = hashlib.sha256(settings.credential("KEY").encode()).hexdigest()[:12]
        self.session.say(f"Tenant {{settings.name}}: llm {{llm}}, key {{key}}.")

    @function_tool
    async def book_table(self, party_size: int) -> str:
        '''Book a table.'''
        return f"table for {{party_size}}, {{openrtc.tenant_settings().config.greeting}}"
"""

TENANTS = """
[tenants.acme]
greeting = "{greeting}"
llm = "openrtc/rules"

[tenants.acme.credentials]
KEY = "env:ACME_KEY"
"""

ACME_GREETING = "Welcome to Acme."


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def agents_dir(tmp_path: Path, name: str, greeting: str = ACME_GREETING) -> Path:
    write_agent(tmp_path, name, AGENT.format(name=name))
    (tmp_path / "tenants.toml").write_text(TENANTS.format(greeting=greeting))
    return tmp_path


async def call(
    stack: AsyncExitStack,
    livekit: LiveKitServer,
    redis: Redis,
    ns: str,
    agent: str,
    tenant: str,
) -> tuple[JobMessage, Transcript]:
    """A caller in a new room whose job (of ``tenant``) is enqueued; its job and transcript."""
    room = await new_room(livekit, unique(tenant))
    message = dataclasses.replace(
        job_message(livekit, room, agent, unique("dispatcher")), tenant=tenant
    )
    caller = await stack.enter_async_context(caller_in(creds(livekit), room.name))
    transcript = await stack.enter_async_context(transcribing(caller))
    await StreamStore(redis, Keys(ns)).enqueue([message])
    return message, transcript


async def heard(transcript: Transcript, line: str) -> None:
    # A liveness bound: a session process imports and warms first on a loaded host.
    await eventually(lambda: transcript.count(line), repr(line), within=90)


async def redis_holds(redis: Redis, text: str) -> list[str]:
    """Every key whose name or value (any type) holds ``text``."""
    found = []
    needle = text.encode()
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            values: list[Any] = [await redis.get(key)]
        elif kind == "hash":
            values = [*(await redis.hgetall(key)).items()]
        elif kind == "list":
            values = await redis.lrange(key, 0, -1)
        elif kind == "set":
            values = list(await redis.smembers(key))
        elif kind == "zset":
            values = await redis.zrange(key, 0, -1)
        elif kind == "stream":
            values = [entry for entry in await redis.xrange(key)]
        else:
            values = []
        if needle in key or needle in repr(values).encode():
            found.append(key.decode())
    return found


async def test_a_tenant_s_overrides_and_credential_reach_its_call_only(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger="openrtc")
    secret = secrets.token_hex(16)
    monkeypatch.setenv("ACME_KEY", secret)
    pool = AgentPool.from_directory(agents_dir(tmp_path, "configured"))
    ns = unique("ns")
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(
            working(livekit_server, redis_server.url, ns, "configured", pool=pool)
        )
        acme_job, acme = await call(stack, livekit_server, redis, ns, "configured", "acme")
        default_job, default = await call(stack, livekit_server, redis, ns, "configured", "default")
        await heard(acme, ACME_GREETING)
        await heard(acme, f"Tenant acme: llm OfflineLLM, key {fingerprint(secret)}.")
        await heard(default, "Hello from the agent.")
        await heard(default, "Tenant default: llm none, key none.")
        # Both lines of the default call are in: acme's greeting never was one of them.
        assert default.count(ACME_GREETING) == 0
        assert acme.count("Hello from the agent.") == 0
        metrics = generate_latest(worker.metrics.registry).decode()
        for job in (acme_job, default_job):
            await delete_room(livekit_server, job.room)

        async def reported() -> bool:
            return await redis.xlen(Keys(ns).reports) == 2

        await eventually(reported, "both calls' reports", within=30)
    assert await redis_holds(redis, secret) == []
    assert secret not in metrics
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert secret not in logged
    assert "ACME_KEY" not in logged  # not even the reference: nothing went wrong


def environ_of(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


async def test_a_session_process_holds_its_own_tenant_s_credential_only(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("ACME_KEY", secret)
    sent: list[tuple[int, dict[str, Any]]] = []
    original_send = _Child.send

    async def recording_send(self: _Child, value: dict[str, Any]) -> None:
        sent.append((self.pid, value))
        await original_send(self, value)

    monkeypatch.setattr(_Child, "send", recording_send)
    pool = AgentPool.from_directory(agents_dir(tmp_path, "isolated"))
    ns = unique("ns")
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(
            working(
                livekit_server, redis_server.url, ns, "isolated", pool=pool, isolation="process"
            )
        )
        assert isinstance(worker.runner, ProcessRunner)
        default_job, default = await call(stack, livekit_server, redis, ns, "isolated", "default")
        acme_job, acme = await call(stack, livekit_server, redis, ns, "isolated", "acme")
        await heard(default, "Tenant default: llm none, key none.")
        await heard(acme, ACME_GREETING)
        await heard(acme, f"Tenant acme: llm OfflineLLM, key {fingerprint(secret)}.")
        jobs = {_job_id(value): (pid, value) for pid, value in sent if "fields" in value}
        default_pid, default_line = jobs[default_job.job_id]
        acme_pid, acme_line = jobs[acme_job.job_id]
        # The default tenant's session process, alive now: neither the variable
        # nor its value, in its environment or on its socket.
        assert "ACME_KEY=" not in environ_of(default_pid)
        assert secret not in environ_of(default_pid)
        assert secret not in repr(default_line)
        # Acme's gets the value on its own socket, not by inheritance.
        assert secret not in environ_of(acme_pid)
        assert acme_line["tenant"]["credentials"] == {"KEY": secret}
        zygote = worker.runner._zygote._process
        assert zygote is not None
        assert secret not in environ_of(zygote.pid)
        for idle in worker.runner._idle:
            assert secret not in environ_of(idle.pid)


def _job_id(line: dict[str, Any]) -> str:
    fields = {k.encode(): base64.b64decode(v) for k, v in line["fields"].items()}
    return JobMessage.decode(fields).job_id


async def test_a_changed_file_serves_the_next_call_and_an_invalid_one_is_refused(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="openrtc")
    monkeypatch.setenv("ACME_KEY", secrets.token_hex(16))
    directory = agents_dir(tmp_path, "reloaded")
    tenants = directory / "tenants.toml"
    pool = AgentPool.from_directory(directory)
    ns = unique("ns")
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(
            working(livekit_server, redis_server.url, ns, "reloaded", pool=pool)
        )
        _, first = await call(stack, livekit_server, redis, ns, "reloaded", "acme")
        await heard(first, ACME_GREETING)

        tenants.write_text(TENANTS.format(greeting="Welcome back to Acme."))

        def reloaded() -> bool:
            return worker.ctx.tenants.for_tenant("acme").greeting == "Welcome back to Acme."

        await eventually(reloaded, "the edit applied", within=30)
        _, second = await call(stack, livekit_server, redis, ns, "reloaded", "acme")
        await heard(second, "Welcome back to Acme.")
        # The live call keeps the settings it started with; the new one has the new.
        await first.ask("book a table for 2", "Done: table for 2, Welcome to Acme.", within=60)
        await second.ask(
            "book a table for 3", "Done: table for 3, Welcome back to Acme.", within=60
        )

        literal = secrets.token_hex(16)
        tenants.write_text(
            f'[tenants.acme]\ngreeting = "Broken."\n[tenants.acme.credentials]\nKEY = "{literal}"\n'
        )
        refused = (
            f"tenants file not reloaded: {tenants}: tenant 'acme': credentials.KEY: a literal "
            'secret is not allowed in the tenants file; write a reference: "env:VAR" or '
            '"file:/path"'
        )

        def logged() -> bool:
            return any(r.getMessage() == refused for r in caplog.records)

        await eventually(logged, "the invalid edit refused, loudly", within=30)
        assert any(r.levelno == logging.ERROR and r.getMessage() == refused for r in caplog.records)
        _, third = await call(stack, livekit_server, redis, ns, "reloaded", "acme")
        await heard(third, "Welcome back to Acme.")
        assert third.count("Broken.") == 0
        assert all(literal not in r.getMessage() for r in caplog.records)


def test_an_invalid_file_stops_the_worker_before_it_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every problem, one line each, exit 1, with nothing listening at the URLs."""
    write_agent(tmp_path, "strict", AGENT.format(name="strict"))
    (tmp_path / "tenants.toml").write_text(
        '[tenants.acme]\nmax_sessions = 0\n[tenants.acme.credentials]\nK = "hunter2"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "openrtc", "worker", "--agent", "strict", str(tmp_path)],
        env={
            "PATH": "/usr/bin:/bin",
            "LIVEKIT_URL": "ws://127.0.0.1:9",
            "LIVEKIT_API_KEY": "k",
            "LIVEKIT_API_SECRET": "s",
            "REDIS_URL": "redis://127.0.0.1:9/0",
            "OPENRTC_HTTP_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    where = f"{tmp_path / 'tenants.toml'}: tenant 'acme'"
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-2:] == [
        f"error: {where}: max_sessions: must be at least 1 and at most 1000000, not 0",
        f"error: {where}: credentials.K: a literal secret is not allowed in the tenants file; "
        'write a reference: "env:VAR" or "file:/path"',
    ]
    assert "hunter2" not in done.stderr + done.stdout
    # The same file, checked as an operator would.
    check = subprocess.run(
        [sys.executable, "-m", "openrtc", "tenants", "check", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 1
    assert check.stderr.splitlines() == done.stderr.splitlines()[-2:]


def test_a_reference_that_does_not_resolve_stops_the_worker(tmp_path: Path) -> None:
    write_agent(tmp_path, "strict", AGENT.format(name="strict"))
    (tmp_path / "tenants.toml").write_text('[tenants.acme.credentials]\nK = "env:NOT_SET_HERE"\n')
    from openrtc.settings import LiveKitSettings, WorkerSettings

    settings = WorkerSettings(
        livekit=LiveKitSettings("ws://127.0.0.1:9", "k", "s"),
        agent="strict",
        redis_url="redis://127.0.0.1:9/0",
    )
    with pytest.raises(TenantsError) as raised:
        Worker(settings, AgentPool.from_directory(tmp_path))
    assert raised.value.lines == [
        f"{tmp_path / 'tenants.toml'}: tenant 'acme': credentials.K: env:NOT_SET_HERE is not set"
    ]


def test_tenants_check_shows_references_never_values(tmp_path: Path) -> None:
    write_agent(tmp_path, "checked", AGENT.format(name="checked"))
    (tmp_path / "tenants.toml").write_text(TENANTS.format(greeting=ACME_GREETING))
    secret = secrets.token_hex(16)
    done = subprocess.run(
        [sys.executable, "-m", "openrtc", "tenants", "check", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin", "ACME_KEY": secret},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{tmp_path / 'tenants.toml'}: 1 tenant(s), valid",
        "[acme]",
        "  llm: openrtc/rules",
        f"  greeting: {ACME_GREETING}",
        "  credentials: KEY=env:ACME_KEY",
        "  over_cap: wait",
        "  breaker: failure_ratio=0.5, min_sessions=5, window=60.0, cooldown=30.0",
    ]
    assert secret not in done.stdout + done.stderr


async def test_a_credential_gone_since_start_up_fails_that_tenant_s_call_naming_it(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resolved when each call starts: a variable removed since the worker started
    fails the session (not the worker), with the reference named, never a value."""
    monkeypatch.setenv("ACME_KEY", secrets.token_hex(16))
    pool = AgentPool.from_directory(agents_dir(tmp_path, "unkeyed"))
    ns = unique("ns")
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(
            working(livekit_server, redis_server.url, ns, "unkeyed", pool=pool)
        )
        monkeypatch.delenv("ACME_KEY")
        job, _ = await call(stack, livekit_server, redis, ns, "unkeyed", "acme")
        record = Keys(ns).job("unkeyed", job.job_id)

        async def failed() -> bool:
            return await redis.hget(record, RecordField.LAST_ERROR) is not None

        await eventually(failed, "the session failed", within=60)
        assert await redis.hget(record, RecordField.LAST_ERROR) == (
            b"tenant 'acme': credentials.KEY: env:ACME_KEY is not set"
        )
        assert worker.stats.failed >= 1
        # The default tenant's calls go on.
        _, default = await call(stack, livekit_server, redis, ns, "unkeyed", "default")
        await heard(default, "Tenant default: llm none, key none.")

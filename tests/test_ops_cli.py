"""Monitoring commands: status --check/--watch, dlq stats/follow/filters, purge's question.

The decisions (``check_status``, ``parse_since``, ``dead_letter_stats``) are
pure functions with table tests; the commands run as real processes against
real Redis and, where a call or a dead letter is needed, a real LiveKit and
a real dispatcher.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from openrtc.cli.main import app
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops.monitor import (
    AgentStatus,
    DeadLetter,
    StackStatus,
    WorkerInfo,
    check_status,
    dead_letter_stats,
    list_dead_letters,
    parse_since,
)
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import DeadReason
from tests.support.stack import (
    OFFLINE_AGENTS,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)

OPENRTC = [sys.executable, "-m", "openrtc"]
NOW = 1_700_000_000.0


def _worker(draining: bool = False) -> WorkerInfo:
    return WorkerInfo("w-1", 4, 0, "coroutine", "h", "1", 0.5, draining)


def _agent(
    backlog: int = 0, age: float | None = None, workers: tuple[WorkerInfo, ...] = ()
) -> AgentStatus:
    return AgentStatus(
        "dental", "ns:jobs:dental", backlog=backlog, oldest_waiting_age=age, workers=list(workers)
    )


@pytest.mark.parametrize(
    ("agents", "problems"),
    [
        ([], []),
        ([_agent()], []),
        ([_agent(backlog=0, workers=())], []),
        (
            [_agent(backlog=2, age=1.0)],
            ["agent dental: 2 waiting call(s) and no live worker"],
        ),
        (
            [_agent(backlog=1, age=1.0, workers=(_worker(draining=True),))],
            ["agent dental: 1 waiting call(s) and only draining workers"],
        ),
        ([_agent(backlog=1, age=3.0, workers=(_worker(),))], []),
        ([_agent(backlog=1, age=10.0, workers=(_worker(),))], []),
        (
            [_agent(backlog=1, age=12.25, workers=(_worker(),))],
            ["agent dental: oldest waiting call 12.2s old (max 10s)"],
        ),
        (
            [_agent(backlog=3, age=40.0)],
            [
                "agent dental: 3 waiting call(s) and no live worker",
                "agent dental: oldest waiting call 40.0s old (max 10s)",
            ],
        ),
    ],
)
def test_check_status(agents: list[AgentStatus], problems: list[str]) -> None:
    status = StackStatus("ns", agents, [], 0)
    assert check_status(status, max_wait=10.0) == problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - 90),
        ("10m", NOW - 600),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("1h30m", NOW - 5400),
        ("1.5h", NOW - 5400),
        (" 10M ", NOW - 600),
        ("2023-11-14T22:00:00+00:00", datetime(2023, 11, 14, 22, tzinfo=UTC).timestamp()),
        ("2023-11-14T22:00:00Z", datetime(2023, 11, 14, 22, tzinfo=UTC).timestamp()),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "10", "10x", "m10", "yesterday", "2099-01-01T00:00:00Z"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"neither a duration|in the future"):
        parse_since(text, now=NOW)


def _letter(i: int, reason: str, agent: str = "", requested: str = "") -> DeadLetter:
    return DeadLetter(
        f"{i}-0", reason, "", agent, f"AJ_{i}", "", "", "", float(i), {}, requested_agent=requested
    )


@pytest.mark.parametrize(
    ("letters", "by_reason", "by_agent", "ends"),
    [
        ([], {}, {}, (None, None)),
        ([_letter(1, "expired", "dental")], {"expired": 1}, {"dental": 1}, ("1-0", "1-0")),
        (
            [
                _letter(1, "unknown-agent", requested="ghost"),
                _letter(2, "expired", "dental"),
                _letter(3, "expired", "support"),
                _letter(4, "max-deliveries", "dental"),
                _letter(5, "unknown-agent", requested="ghost"),
                _letter(6, "expired", "dental"),
            ],
            {"expired": 3, "unknown-agent": 2, "max-deliveries": 1},
            {"dental": 3, "?ghost": 2, "support": 1},
            ("1-0", "6-0"),
        ),
    ],
)
def test_dead_letter_stats(
    letters: list[DeadLetter],
    by_reason: dict[str, int],
    by_agent: dict[str, int],
    ends: tuple[str | None, str | None],
) -> None:
    stats = dead_letter_stats(letters)
    assert stats.total == len(letters)
    assert stats.by_reason == by_reason
    assert list(stats.by_reason) == list(by_reason)  # most first
    assert stats.by_agent == by_agent
    assert list(stats.by_agent) == list(by_agent)
    got = (stats.oldest.id if stats.oldest else None, stats.newest.id if stats.newest else None)
    assert got == ends


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["worker", "--agent", "dental", "--isolation", "thread"], "--isolation"),
        (["start", "--isolation", "thread"], "--isolation"),
        (["dev", "--isolation", "thread"], "--isolation"),
        (["dispatcher", "--when-no-worker", "drop"], "--when-no-worker"),
        (["dlq", "list", "--reason", "lost"], "--reason"),
        (["dlq", "stats", "--reason", "lost"], "--reason"),
        (["dlq", "follow", "--reason", "lost"], "--reason"),
        (["dlq", "replay", "--all", "--reason", "lost"], "--reason"),
        (["dlq", "list", "--since", "yesterday"], "--since"),
        (["dlq", "stats", "--since", "10x"], "--since"),
        (["status", "--watch", "--interval", "0"], "--interval"),
    ],
)
def test_bad_option_values_name_the_flag_and_exit_2(args: list[str], flag: str) -> None:
    result = CliRunner().invoke(
        app, args, env={"REDIS_URL": "redis://127.0.0.1:1/0", "NO_COLOR": "1"}
    )
    assert result.exit_code == 2, result.output
    assert flag in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- real servers


def _env(redis_server: RedisServer, ns: str, **more: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "OPENRTC_NAMESPACE": ns,
        "NO_COLOR": "1",
        **more,
    }


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPENRTC, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def _arun(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`_run` off the event loop, which in-process services share."""
    return await anyio.to_thread.run_sync(lambda: _run(env, *args))


@contextmanager
def _running(env: dict[str, str], *args: str) -> Iterator[subprocess.Popen[str]]:
    """A command left running (follow, watch): interrupted like Ctrl-C on exit."""
    process = subprocess.Popen(
        [*OPENRTC, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _readline(stream: Any, within: float = 20.0) -> str:
    ready, _, _ = select.select([stream], [], [], within)
    assert ready, f"no line within {within}s"
    return str(stream.readline())


@pytest.mark.anyio
async def test_status_check_exit_codes_with_a_real_waiting_call(
    redis_server: RedisServer, livekit_server: LiveKitServer, client: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    env = _env(redis_server, ns)
    ok = await _arun(env, "status", "--check")
    assert (ok.returncode, ok.stdout.startswith("OK: 0 agent(s)")) == (0, True), ok.stdout

    settings = dispatcher_settings(livekit_server, redis_server.url, ns)
    async with dispatching(settings):
        await new_room(livekit_server, unique("dental"))

        async def waiting() -> bool:
            return int(await client.xlen(keys.jobs("dental"))) == 1

        await eventually(waiting, "the call on the dental stream", within=20)
        failed = await _arun(env, "status", "--check")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert failed.stdout.splitlines() == ["agent dental: 1 waiting call(s) and no live worker"]
        await anyio.sleep(0.3)
        both = await _arun(env, "status", "--check", "--max-wait", "0.2", "--json")
        assert both.returncode == 1
        problems = json.loads(both.stdout)["problems"]
        assert len(problems) == 2
        assert problems[1].startswith("agent dental: oldest waiting call ")

        async with working(livekit_server, redis_server.url, ns, "dental"):

            async def taken() -> bool:
                return (await _arun(env, "status", "--check")).returncode == 0

            await eventually(taken, "status --check to pass once a worker took the call", within=30)
            healthy = await _arun(env, "status", "--check")
            assert healthy.stdout.startswith("OK: 3 agent(s), 1 worker(s)"), healthy.stdout


@pytest.mark.anyio
async def test_status_watch_refreshes_until_ctrl_c(
    redis_server: RedisServer, client: Redis
) -> None:
    ns = unique("ns")
    await StreamStore(client, Keys(ns)).ensure_group("dental")
    env = _env(redis_server, ns)
    with _running(env, "status", "--watch", "--interval", "0.2", "--json") as watch:
        first = json.loads(_readline(watch.stdout))
        assert [a["agent"] for a in first["agents"]] == ["dental"]
        await StreamStore(client, Keys(ns)).ensure_group("support")

        def saw_support() -> bool:
            line = json.loads(_readline(watch.stdout))
            return "support" in [a["agent"] for a in line["agents"]]

        await eventually(saw_support, "the new agent in a later refresh")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(15) == 0
    await anyio.to_thread.run_sync(_watch_on_a_terminal, env)


def _watch_on_a_terminal(env: dict[str, str]) -> None:
    """On a terminal the tables are redrawn in place (cursor up, erase line)."""
    main, child = pty.openpty()
    table = subprocess.Popen(
        [*OPENRTC, "status", "--watch", "--interval", "0.2"],
        env=env,
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    try:
        screen = _read_until(main, lambda seen: seen.count(b"support") >= 3)
        assert b"\x1b[1A" in screen  # redrawn, not appended
        table.send_signal(signal.SIGINT)
        assert table.wait(15) == 0
    finally:
        if table.poll() is None:
            table.kill()
            table.wait()
        os.close(main)


def _read_until(fd: int, done: Any, within: float = 30.0) -> bytes:
    """What a terminal shows until ``done(seen)`` holds."""
    seen = b""
    deadline = time.monotonic() + within
    while not done(seen):
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096)
    return seen


@pytest.mark.anyio
async def test_dlq_follow_prints_a_real_dead_letter_from_a_dispatcher_process(
    redis_server: RedisServer, livekit_server: LiveKitServer, client: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    env = _env(
        redis_server,
        ns,
        LIVEKIT_URL=livekit_server.url,
        LIVEKIT_API_KEY=livekit_server.api_key,
        LIVEKIT_API_SECRET=livekit_server.api_secret,
    )
    old = await StreamStore(client, keys).dead_letter(DeadReason.EXPIRED, "before", original={})
    with (
        _running(env, "dlq", "follow", "--json") as follow,
        _running(env, "dlq", "follow", "--reason", "expired") as expired_only,
        # The agents directory as a positional argument, as openrtc 0.20.1 takes it.
        _running(env, "dispatcher", str(OFFLINE_AGENTS)) as dispatcher,
    ):
        assert "following dead letters" in _readline(follow.stderr)
        assert "following dead letters" in _readline(expired_only.stderr)

        async def registered() -> bool:
            for d in await client.zrange(keys.dispatchers, 0, -1):
                if await client.hget(keys.dispatcher(d.decode()), "livekit_worker_id"):
                    return True
            return False

        await eventually(registered, "the dispatcher process to register", within=30)
        room = unique("lobby")
        await new_room(livekit_server, room, metadata='{"agent": "ghost"}')
        letter = json.loads(_readline(follow.stdout, within=30))
        assert letter["reason"] == "unknown-agent"
        assert letter["requested_agent"] == "ghost"
        assert letter["room"] == room
        assert letter["id"] != old
        follow.send_signal(signal.SIGINT)
        assert follow.wait(15) == 0
        assert follow.stdout is not None
        assert follow.stdout.read() == ""  # one letter, one line
        expired_only.send_signal(signal.SIGINT)
        out, _ = expired_only.communicate(timeout=15)
        assert expired_only.returncode == 0
        assert out == ""  # filtered out; the old expired letter came before it started
        assert dispatcher.poll() is None


def _pty_purge(env: dict[str, str], answer: str, then: Any = None, *args: str) -> tuple[int, str]:
    """``dlq purge`` on a terminal: wait for its question, run ``then``, answer."""
    main, child = pty.openpty()
    process = subprocess.Popen(
        [*OPENRTC, "dlq", "purge", *args], env=env, stdin=child, stdout=child, stderr=child
    )
    os.close(child)
    seen = _read_until(main, lambda seen: b"[y/N]" in seen)
    if then is not None:
        then()
    os.write(main, answer.encode() + b"\n")
    code = process.wait(30)
    try:
        while select.select([main], [], [], 0.2)[0]:
            seen += os.read(main, 1024)
    except OSError:
        pass
    os.close(main)
    return code, seen.decode(errors="replace")


@pytest.mark.anyio
async def test_purge_asks_first(redis_server: RedisServer, client: Redis) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(client, keys)
    for i in range(3):
        await store.dead_letter(DeadReason.EXPIRED, f"e{i}", original={})
    env = _env(redis_server, ns)

    refused = _run(env, "dlq", "purge", "--all")  # stdin is no terminal, no --yes
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert len(await list_dead_letters(client, keys)) == 3

    code, screen = _pty_purge(env, "n", None, "--all")
    assert code == 1
    assert "Delete 3 dead letter(s)" in screen
    assert "nothing deleted" in screen
    assert len(await list_dead_letters(client, keys)) == 3

    # A letter that arrives while the question is open is not deleted unseen.
    with _sync_redis(redis_server) as sync:

        def late_letter() -> None:
            sync.xadd(keys.dead_letter, {"reason": "expired", "error": "late"})

        code, screen = _pty_purge(env, "y", late_letter, "--all")
    assert code == 0, screen
    assert "deleted 3 dead letter(s)" in screen
    left = await list_dead_letters(client, keys)
    assert [d.error for d in left] == ["late"]

    yes = _run(env, "dlq", "purge", "--all", "--yes")
    assert (yes.returncode, yes.stdout.strip()) == (0, "deleted 1 dead letter(s)")


@contextmanager
def _sync_redis(redis_server: RedisServer) -> Iterator[Any]:
    import redis

    r = redis.Redis.from_url(redis_server.url)
    try:
        yield r
    finally:
        r.close()


@pytest.mark.anyio
async def test_dlq_stats_and_list_filters(redis_server: RedisServer, client: Redis) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(client, keys)
    # Two old letters (ids set in the past), then new ones.
    old_ms = int((time.time() - 7200) * 1000)
    await client.xadd(keys.dead_letter, {"reason": "expired", "agent": "dental"}, id=f"{old_ms}-0")
    await client.xadd(
        keys.dead_letter,
        {"reason": "unknown-agent", "requested_agent": "ghost"},
        id=f"{old_ms}-1",
    )
    for agent in ("dental", "support", "dental"):
        await store.dead_letter(DeadReason.MAX_DELIVERIES, "x", original={b"agent": agent.encode()})
    env = _env(redis_server, ns)

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # In-process (a thread: the command runs its own event loop): a process
        # per call would spend its time importing.
        def invoke() -> Any:
            return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

        result = await anyio.to_thread.run_sync(invoke)
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    stats = json.loads((await cli("dlq", "stats", "--json")).stdout)
    assert stats["total"] == 5
    assert stats["by_reason"] == {"max-deliveries": 3, "expired": 1, "unknown-agent": 1}
    assert stats["by_agent"] == {"dental": 3, "support": 1, "?ghost": 1}
    assert stats["oldest"]["id"] == f"{old_ms}-0"
    recent = json.loads((await cli("dlq", "stats", "--since", "1h", "--json")).stdout)
    assert recent["total"] == 3
    table = await cli("dlq", "stats")
    assert table.returncode == 0
    assert "max-deliveries" in table.stdout
    assert "oldest:" in table.stdout

    async def listed(*args: str) -> list[str]:
        result = await cli("dlq", "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [
            d["reason"] + ":" + (d["agent"] or d["requested_agent"])
            for d in json.loads(result.stdout)["dead_letters"]
        ]

    assert await listed("--since", "1h") == [
        "max-deliveries:dental",
        "max-deliveries:support",
        "max-deliveries:dental",
    ]
    since_iso = datetime.fromtimestamp(time.time() - 3600, UTC).isoformat()
    assert len(await listed("--since", since_iso)) == 3
    assert await listed("--agent", "dental") == [
        "max-deliveries:dental",
        "max-deliveries:dental",
        "expired:dental",
    ]
    assert await listed("--agent", "ghost") == ["unknown-agent:ghost"]
    assert await listed("--reason", "expired", "--agent", "dental") == ["expired:dental"]
    assert await listed("--reason", "expired", "--since", "1h") == []
    # A rare reason behind many others is still found (paging, not a fixed window).
    assert await listed("--reason", "expired", "-n", "1") == ["expired:dental"]

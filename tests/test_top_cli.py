"""``openrtc top``: the fleet's running sessions, read from a real Redis.

Snapshots are written as workers write them (``publish_snapshot``) by workers
made live as a worker's heartbeat makes it (its agent's group, then
``Presence.beat``). The interactive view runs in a real terminal: a tmux
server of its own, driven with ``send-keys`` and read with ``capture-pane``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from openrtc.devtools.devstack import RedisServer, free_port
from openrtc.ops.top import (
    BACKSPACE,
    ENTER,
    ESC,
    Fleet,
    RowFilter,
    TopState,
    fleet_header,
    format_blocks,
    format_cpu,
    format_duration,
    format_latency,
    format_memory,
    handle_key,
    render_table,
    screen_lines,
    top_document,
)
from openrtc.store.membership import Presence
from openrtc.store.streams import StreamStore, connect_redis
from openrtc.store.top import publish_snapshot
from openrtc.wire.keys import Keys
from openrtc.wire.top import SessionRow, WorkerSnapshot
from tests.support.stack import eventually, unique

pytestmark = pytest.mark.anyio

MiB = 2**20


def _row(job: str, agent: str, worker: str, **kw: Any) -> SessionRow:
    return SessionRow(
        job_id=job, agent=agent, room=f"room-{job}", worker=worker, started_at=1.0, **kw
    )


def _fleet_rows(wa: str, wb: str) -> tuple[list[SessionRow], list[SessionRow]]:
    """Two workers' sessions: ``dental`` in coroutine isolation, ``support`` in process."""
    a = [
        _row("job-a1", "dental", wa, cpu=0.30, state="listening", tenant="acme", duration_s=65),
        _row("job-a2", "dental", wa, cpu=0.05, state="speaking", tenant="globex", turns=3),
    ]
    b = [
        _row(
            "job-b1", "support", wb, cpu=0.60, state="thinking", tenant="acme", rss_bytes=150 * MiB
        ),
        _row("job-b2", "support", wb, cpu=0.10, state="listening", rss_bytes=300 * MiB, blocks=2),
    ]
    return a, b


def _snapshot(worker: str, agent: str, rows: list[SessionRow], isolation: str) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker=worker, agent=agent, host="h", pid=1, isolation=isolation, at=time.time(),
        cpu=0.2, rss_bytes=100 * MiB, sessions=rows,
    )  # fmt: skip


async def _live_worker(
    redis: Redis, keys: Keys, snapshot: WorkerSnapshot, *, ttl: float = 60.0
) -> Presence:
    """Make ``snapshot``'s worker live as a worker does (its group, its heartbeat),
    and publish its snapshot."""
    await StreamStore(redis, keys).ensure_group(snapshot.agent)
    presence = Presence(
        redis, keys.workers(snapshot.agent), keys.worker(snapshot.worker), snapshot.worker, ttl
    )
    await presence.beat({"agent": snapshot.agent, "capacity": 4, "running": 2})
    await publish_snapshot(redis, keys, snapshot, ttl=60.0)
    return presence


async def _two_workers(redis: Redis, keys: Keys) -> tuple[str, str]:
    wa, wb = unique("wa"), unique("wb")
    a, b = _fleet_rows(wa, wb)
    await _live_worker(redis, keys, _snapshot(wa, "dental", a, "coroutine"))
    await _live_worker(redis, keys, _snapshot(wb, "support", b, "process"))
    return wa, wb


def _cli_env(url: str, ns: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": url, "OPENRTC_NAMESPACE": ns, "NO_COLOR": "1"}


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    from typer.testing import CliRunner

    from openrtc.cli.main import app

    def invoke() -> Any:
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

    result = await anyio.to_thread.run_sync(invoke)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


# --------------------------------------------------------------------------- pure


@pytest.mark.unit
@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (42.9, "42s"), (60, "1m00s"), (65, "1m05s"), (3599, "59m59s"), (3723, "1h02m")],
)
def test_duration_is_minutes_and_seconds(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cell", "shown"),
    [
        (format_cpu(None), "-"),
        (format_cpu(0.125), "12.5"),
        (format_cpu(1.5), "150.0"),
        (format_memory(None), "-"),
        (format_memory(150 * MiB), "150.0"),
        (format_latency(None), "-"),
        (format_latency(0.8504), "850ms"),
        (format_blocks(0, 0.0), "0"),
        (format_blocks(3, 0.25), "3 (max 250ms)"),
    ],
)
def test_cells_are_percent_mib_ms_and_counts(cell: str, shown: str) -> None:
    assert cell == shown


ROW = _row("AJ_xyz", "dental", "w-1", tenant="acme", state="listening")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("rows_filter", "shown"),
    [
        (RowFilter(), True),
        (RowFilter(agent="dental"), True),
        (RowFilter(agent="support"), False),
        (RowFilter(tenant="acme"), True),
        (RowFilter(tenant="globex"), False),
        (RowFilter(state="listening"), True),
        (RowFilter(state="speaking"), False),
        (RowFilter(worker="w-1"), True),
        (RowFilter(worker="w-2"), False),
        (RowFilter(text="xyz"), True),  # job id
        (RowFilter(text="ROOM-aj"), True),  # room, any case
        (RowFilter(text="dent"), True),  # agent
        (RowFilter(text="acm"), True),  # tenant
        (RowFilter(text="w-1"), True),  # worker
        (RowFilter(text="nowhere"), False),
        (RowFilter(agent="dental", text="nowhere"), False),
    ],
)
def test_filter_matches_each_field_and_free_text(rows_filter: RowFilter, shown: bool) -> None:
    assert rows_filter.matches(ROW) is shown


def _keys(state: TopState, *keys: str, agents: tuple[str, ...] = ("dental", "support")) -> Any:
    current: TopState | None = state
    for key in keys:
        assert current is not None
        current = handle_key(current, key, agents)
    return current


@pytest.mark.unit
@pytest.mark.parametrize(
    ("keys", "expect"),
    [
        (("q",), None),
        (("s",), TopState(sort="memory")),
        (("S",), TopState(sort="job")),
        (("S", "s"), TopState(sort="cpu")),
        (("r",), TopState(reverse=True)),
        (("r", "s"), TopState(sort="memory")),  # a new column starts its own way
        (("p",), TopState(paused=True)),
        (("p", "p"), TopState()),
        (("a",), TopState(rows_filter=RowFilter(agent="dental"))),
        (("a", "a"), TopState(rows_filter=RowFilter(agent="support"))),
        (("a", "a", "a"), TopState()),
        (("/",), TopState(typing="")),
        (("/", "a", "q"), TopState(typing="aq")),  # typed, not commands
        (("/", "a", "c", BACKSPACE), TopState(typing="a")),
        (("/", "a", "c", ENTER), TopState(rows_filter=RowFilter(text="ac"))),
        (("/", "a", "c", ESC), TopState()),
        (("/", "a", ENTER, "/"), TopState(rows_filter=RowFilter(text="a"), typing="a")),
        (("/", "a", ENTER, ESC), TopState()),
        (("x",), TopState()),
    ],
)
def test_keys_change_the_view(keys: tuple[str, ...], expect: TopState | None) -> None:
    assert _keys(TopState(), *keys) == expect


@pytest.mark.unit
def test_the_filter_being_typed_applies_live() -> None:
    state = _keys(TopState(), "/", "g", "l")
    assert state.effective_filter == RowFilter(text="gl")
    assert state.rows_filter == RowFilter()


def _fleet() -> Fleet:
    a, b = _fleet_rows("wa", "wb")
    return Fleet(
        [_snapshot("wa", "dental", a, "coroutine"), _snapshot("wb", "support", b, "process")],
        at=1000.0,
    )


@pytest.mark.unit
def test_header_counts_workers_sessions_and_states() -> None:
    fleet = _fleet()
    assert fleet_header(fleet) == "2 workers, 4 sessions: 2 listening, 1 thinking, 1 speaking"
    assert fleet_header(fleet, 1).endswith("(1 shown)")
    assert fleet_header(Fleet()) == "0 workers, 0 sessions"
    one = Fleet([_snapshot("wa", "dental", _fleet_rows("wa", "wb")[0][:1], "coroutine")])
    assert fleet_header(one) == "1 worker, 1 session: 1 listening"


@pytest.mark.unit
def test_table_marks_the_sorted_column_and_aligns_numbers() -> None:
    rows = _fleet().shown(RowFilter(), "cpu", reverse=False)
    lines = render_table(rows, sort="cpu")
    assert "CPU%v" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["job-b1", "job-a1", "job-b2", "job-a2"]
    assert "1m05s" in lines[2]
    assert "30.0" in lines[2]
    assert "CPU%^" in render_table(rows, sort="cpu", reverse=True)[0]
    assert "JOB^" in render_table(rows, sort="job")[0]


@pytest.mark.unit
def test_screen_fits_the_terminal_and_says_when_redis_is_down() -> None:
    state = TopState()
    lines = screen_lines(state, _fleet(), title="t", error="refused", width=40, height=5)
    assert len(lines) == 5
    assert all(len(line) <= 39 for line in lines)
    assert lines[-1].startswith("Redis unreachable: refused")
    assert lines[-2].startswith("... ")  # the rows that did not fit, counted
    tall = screen_lines(state, _fleet(), title="t", error=None, width=200, height=30)
    assert len(tall) == 30
    assert "q quit" in tall[-1]
    assert sum("job-" in line for line in tall) == 4
    assert screen_lines(state, Fleet(), title="t", error=None, width=0, height=0) == []


@pytest.mark.unit
def test_json_document_has_every_row_field_and_worker_headers() -> None:
    doc = top_document(_fleet(), RowFilter(agent="support"), "job", reverse=False)
    assert [w["worker"] for w in doc["workers"]] == ["wb"]
    assert doc["workers"][0]["sessions"] == 2
    assert doc["at"] == 1000.0
    assert [s["job_id"] for s in doc["sessions"]] == ["job-b1", "job-b2"]
    assert set(doc["sessions"][0]) == {f.name for f in fields(SessionRow)}
    json.dumps(doc)


# --------------------------------------------------------------------------- --once


async def test_top_once_json_lists_every_session_of_two_live_workers(
    redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("top")
    keys = Keys(ns)
    wa, wb = await _two_workers(redis, keys)
    env = _cli_env(redis_server.url, ns)

    async def top(*args: str) -> dict[str, Any]:
        result = await _cli(env, "top", "--once", "--json", *args)
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    async def jobs(*args: str) -> list[str]:
        return [s["job_id"] for s in (await top(*args))["sessions"]]

    doc = await top()
    assert sorted(w["worker"] for w in doc["workers"]) == sorted([wa, wb])
    assert {w["isolation"] for w in doc["workers"]} == {"coroutine", "process"}
    assert [s["job_id"] for s in doc["sessions"]] == ["job-b1", "job-a1", "job-b2", "job-a2"]
    b1 = doc["sessions"][0]
    assert (b1["worker"], b1["rss_bytes"], b1["state"]) == (wb, 150 * MiB, "thinking")
    assert set(b1) == {f.name for f in fields(SessionRow)}

    assert await jobs("--agent", "dental") == ["job-a1", "job-a2"]
    assert await jobs("--tenant", "acme") == ["job-b1", "job-a1"]
    assert await jobs("--state", "listening") == ["job-a1", "job-b2"]
    assert await jobs("--worker", wb) == ["job-b1", "job-b2"]
    assert await jobs("--sort", "memory") == ["job-b2", "job-b1", "job-a1", "job-a2"]
    assert await jobs("--sort", "job") == ["job-a1", "job-a2", "job-b1", "job-b2"]
    assert await jobs("--sort", "job", "--reverse") == ["job-b2", "job-b1", "job-a2", "job-a1"]
    assert await jobs("--sort", "cpu", "--reverse") == ["job-a2", "job-b2", "job-a1", "job-b1"]

    table = await _cli(env, "top", "--once")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "2 workers, 4 sessions: 2 listening, 1 thinking, 1 speaking"
    assert "CPU%v" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["job-b1", "job-a1", "job-b2", "job-a2"]


async def test_top_skips_dead_workers_and_unreadable_snapshots(
    redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("top")
    keys = Keys(ns)
    await _two_workers(redis, keys)
    # A worker whose heartbeat stops: its snapshot outlives its membership.
    dead = unique("dead")
    await _live_worker(
        redis, keys, _snapshot(dead, "dental", [_row("job-dead", "dental", dead)], "coroutine"),
        ttl=3.0,
    )  # fmt: skip
    # A live worker whose snapshot is not one (another version, written by hand).
    garbled = unique("garbled")
    await _live_worker(redis, keys, _snapshot(garbled, "support", [], "process"))
    await redis.set(keys.top(garbled), b"{not json")
    env = _cli_env(redis_server.url, ns)

    async def listed() -> tuple[list[str], list[str]]:
        result = await _cli(env, "top", "--once", "--json", "--sort", "job")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        return [w["worker"] for w in doc["workers"]], [s["job_id"] for s in doc["sessions"]]

    workers, jobs = await listed()
    assert dead in workers  # live, then
    assert "job-dead" in jobs
    assert garbled not in workers

    async def dead_gone() -> bool:
        workers, jobs = await listed()
        return dead not in workers and jobs == ["job-a1", "job-a2", "job-b1", "job-b2"]

    await eventually(dead_gone, "the dead worker's sessions dropped from top", within=30)
    assert await redis.exists(keys.top(dead))  # gone from top before its snapshot expired


async def test_top_refuses_json_without_once_a_bad_sort_and_no_terminal(
    redis_server: RedisServer,
) -> None:
    env = _cli_env(redis_server.url, unique("top"))
    refused = await _cli(env, "top", "--json")
    assert refused.returncode == 2
    assert "--json needs --once" in refused.stderr
    bad_sort = await _cli(env, "top", "--once", "--sort", "colour")
    assert bad_sort.returncode == 2
    assert "'colour' is not one of cpu, memory" in bad_sort.stderr
    bad_state = await _cli(env, "top", "--once", "--state", "dancing")
    assert bad_state.returncode == 2
    assert "'dancing' is not one of joining" in bad_state.stderr
    no_tty = await _cli(env, "top")
    assert no_tty.returncode == 2
    assert "use --once" in no_tty.stderr
    empty = await _cli(env, "top", "--once", "--json")
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout)["sessions"] == []


async def test_top_once_with_redis_down_is_one_line_without_the_password() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    result = await _cli(_cli_env(url, unique("top")), "top", "--once")
    assert result.returncode == 1
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: Redis at redis://:***@127.0.0.1:")
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- tmux


class Terminal:
    """One command in a 160x40 tmux pane on a tmux server of its own."""

    def __init__(self, command: list[str], exit_file: Path) -> None:
        self.socket = unique("openrtc-top")
        self.exit_file = exit_file
        # LINES / COLUMNS (pytest's terminal) would override the pane's size in curses.
        command = ["env", "-u", "LINES", "-u", "COLUMNS", *command]
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(exit_file))}"
        self._tmux("new-session", "-d", "-x", "160", "-y", "40", "sh", "-c", shell)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return done.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p")

    def press(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-x", str(width), "-y", str(height))

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-l", text)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)

    async def shows(self, check: Any, what: str, *, within: float = 30.0) -> str:
        """The screen once ``check(screen)`` holds (polled, with a deadline)."""

        def seen() -> str | None:
            text = self.screen()
            return text if check(text) else None

        found: str = await eventually(seen, what, within=within, interval=0.1)
        return found

    async def exit_code(self) -> int:
        def ended() -> str | None:
            return self.exit_file.read_text().strip() if self.exit_file.exists() else None

        code: str = await eventually(ended, "the command in the pane ended", within=30)
        return int(code)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Any]:
    made: list[Terminal] = []

    def start(*args: str) -> Terminal:
        command = [sys.executable, "-m", "openrtc", "top", *args]
        made.append(Terminal(command, tmp_path / f"exit-{len(made)}"))
        return made[-1]

    try:
        yield start
    finally:
        for t in made:
            t.kill()


def _jobs(screen: str) -> list[str]:
    """The job ids on screen, top to bottom."""
    return [line.split()[0] for line in screen.splitlines() if line.startswith("job-")]


async def test_top_interactive_sorts_filters_and_quits_in_a_real_terminal(
    redis_server: RedisServer, redis: Redis, terminal: Any
) -> None:
    ns = unique("top")
    keys = Keys(ns)
    await _two_workers(redis, keys)
    term = terminal("--redis-url", redis_server.url, "--namespace", ns, "--interval", "0.3")

    by_cpu = ["job-b1", "job-a1", "job-b2", "job-a2"]
    screen = await term.shows(lambda s: _jobs(s) == by_cpu, "every session, by CPU")
    assert "2 workers, 4 sessions: 2 listening, 1 thinking, 1 speaking" in screen
    assert "CPU%v" in screen
    assert "sort: cpu" in screen

    term.type("s")  # the next column: memory (process isolation's, then the rest)
    by_memory = ["job-b2", "job-b1", "job-a1", "job-a2"]
    screen = await term.shows(lambda s: _jobs(s) == by_memory, "the rows sorted by memory")
    assert "MEM MiBv" in screen

    term.type("r")
    await term.shows(lambda s: _jobs(s) == by_memory[:2][::-1] + by_memory[2:], "reversed")

    term.type("/")
    term.type("globex")  # narrows as it is typed
    await term.shows(lambda s: _jobs(s) == ["job-a2"], "the filter narrowing to one row")
    term.press("Enter")
    screen = await term.shows(lambda s: "filter: globex" in s, "the filter applied")
    assert _jobs(screen) == ["job-a2"]
    term.press("Escape")
    await term.shows(lambda s: len(_jobs(s)) == 4, "the filter cleared")

    term.type("a")  # the first agent only
    await term.shows(lambda s: sorted(_jobs(s)) == ["job-a1", "job-a2"], "dental's sessions")
    term.type("a")
    await term.shows(lambda s: sorted(_jobs(s)) == ["job-b1", "job-b2"], "support's sessions")

    term.resize(100, 12)  # redrawn to the new size: the status line on the last row

    def fits(screen: str) -> bool:
        lines = screen.splitlines()
        return len(lines) == 12 and "q quit" in lines[-1] and all(len(x) < 100 for x in lines)

    screen = await term.shows(fits, "the view redrawn at 100x12")
    assert sorted(_jobs(screen)) == ["job-b1", "job-b2"]

    term.type("q")
    assert await term.exit_code() == 0


async def test_top_interactive_with_redis_down_says_so_and_keeps_trying(
    terminal: Any, tmp_path: Path
) -> None:
    port = free_port()
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    ns = unique("top")
    term = terminal("--redis-url", url, "--namespace", ns, "--interval", "0.3")
    screen = await term.shows(lambda s: "Redis unreachable:" in s, "the outage on screen")
    assert "s3cret-pw" not in screen
    assert "Traceback" not in screen
    assert "0 workers, 0 sessions" in screen

    # Redis comes up (with that password): the next refresh reads it.
    server = RedisServer(port=port, log_path=tmp_path / "redis.log")
    server.args = ("--requirepass", "s3cret-pw")
    with server:
        redis = connect_redis(url)
        try:
            wa, wb = unique("wa"), unique("wb")
            a, _ = _fleet_rows(wa, wb)
            await _live_worker(redis, Keys(ns), _snapshot(wa, "dental", a, "coroutine"))
            screen = await term.shows(
                lambda s: "Redis unreachable" not in s and sorted(_jobs(s)) == ["job-a1", "job-a2"],
                "the view back once Redis answers",
            )
            assert "1 worker, 2 sessions" in screen
            assert "s3cret-pw" not in screen
        finally:
            await redis.aclose()
        term.type("q")
        assert await term.exit_code() == 0

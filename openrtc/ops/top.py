"""``openrtc top``: the fleet's running sessions as an operator sees them.

The workers publish snapshots (:mod:`openrtc.wire.top`, :mod:`openrtc.store.top`);
this module filters their rows, formats them, and runs the interactive view
(curses, stdlib). Everything but :func:`run_interactive` and :func:`read_fleet`
is pure, so the view's behaviour is table-tested without a terminal.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from openrtc.store.top import read_snapshots
from openrtc.wire.keys import Keys
from openrtc.wire.top import SESSION_STATES, SORT_KEYS, SessionRow, WorkerSnapshot, sort_rows

__all__ = [
    "COLUMNS",
    "Fleet",
    "RowFilter",
    "TopState",
    "fleet_header",
    "format_blocks",
    "format_cpu",
    "format_duration",
    "format_latency",
    "format_memory",
    "handle_key",
    "read_fleet",
    "render_table",
    "run_interactive",
    "screen_lines",
    "top_document",
]

#: The table's columns: title, the sort key it shows (if any), the cell.
COLUMNS: Final[tuple[tuple[str, str | None], ...]] = (
    ("JOB", "job"),
    ("AGENT", "agent"),
    ("TENANT", None),
    ("ROOM", None),
    ("WORKER", "worker"),
    ("STATE", "state"),
    ("DURATION", "duration"),
    ("CPU%", "cpu"),
    ("MEM MiB", "memory"),
    ("TURNS", "turns"),
    ("LATENCY", "latency"),
    ("BLOCKS", "blocks"),
)
#: Widest a text column gets before its cells are cut (job ids, rooms, workers).
_MAX_TEXT: Final = 24
_NUMERIC: Final = frozenset({"DURATION", "CPU%", "MEM MiB", "TURNS", "LATENCY", "BLOCKS"})
HELP: Final = "q quit  s/S sort  r reverse  / filter  a agent  p pause"


# ------------------------------------------------------------------ formatting


def format_duration(seconds: float) -> str:
    """``42s``, ``1m05s``, ``2h03m``."""
    total = max(0, int(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def format_cpu(cpu: float | None) -> str:
    """A share of one core as a percentage (``-`` when unknown)."""
    return "-" if cpu is None else f"{cpu * 100:.1f}"


def format_memory(rss_bytes: int | None) -> str:
    """Resident memory in MiB (``-`` in coroutine isolation, where it is the worker's)."""
    return "-" if rss_bytes is None else f"{rss_bytes / 2**20:.1f}"


def format_latency(seconds: float | None) -> str:
    """The last turn's latency in ms (``-`` before the first turn)."""
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def format_blocks(blocks: int, longest_s: float) -> str:
    """Loop blocks as a count with the longest: ``3 (max 250ms)``; ``0`` for none."""
    return "0" if blocks <= 0 else f"{blocks} (max {longest_s * 1000:.0f}ms)"


def _cells(row: SessionRow) -> list[str]:
    return [
        row.job_id,
        row.agent,
        row.tenant or "-",
        row.room,
        row.worker,
        row.state,
        format_duration(row.duration_s),
        format_cpu(row.cpu),
        format_memory(row.rss_bytes),
        str(row.turns),
        format_latency(row.latency_s),
        format_blocks(row.blocks, row.longest_block_s),
    ]


def render_table(rows: Sequence[SessionRow], *, sort: str = "", reverse: bool = False) -> list[str]:
    """The table as text lines: a header (the sorted column marked), then a line per row."""
    header = []
    for title, key in COLUMNS:
        descending = bool(key) and SORT_KEYS[key or "job"] != reverse
        mark = ("v" if descending else "^") if key and key == sort else ""
        header.append(title + mark)
    cells = [_cells(r) for r in rows]
    widths = []
    for i, title in enumerate(header):
        widest = max([len(title), *(len(c[i]) for c in cells)])
        widths.append(widest if COLUMNS[i][0] in _NUMERIC else min(widest, _MAX_TEXT))

    def line(values: Sequence[str]) -> str:
        out = []
        for i, value in enumerate(values):
            width = widths[i]
            if len(value) > width:
                value = value[: width - 1] + "~"
            numeric = COLUMNS[i][0] in _NUMERIC
            out.append(value.rjust(width) if numeric else value.ljust(width))
        return "  ".join(out).rstrip()

    return [line(header), *(line(c) for c in cells)]


# ------------------------------------------------------------------ filtering


@dataclass(frozen=True, slots=True)
class RowFilter:
    """Which rows ``top`` shows: each set field must match; ``text`` anywhere."""

    agent: str | None = None
    tenant: str | None = None
    state: str | None = None
    worker: str | None = None
    #: Case-insensitive substring of the job id, room, agent, tenant or worker.
    text: str = ""

    def matches(self, row: SessionRow) -> bool:
        """Whether ``row`` passes every filter."""
        if self.agent is not None and row.agent != self.agent:
            return False
        if self.tenant is not None and row.tenant != self.tenant:
            return False
        if self.state is not None and row.state != self.state:
            return False
        if self.worker is not None and row.worker != self.worker:
            return False
        if self.text:
            needle = self.text.lower()
            haystack = (row.job_id, row.room, row.agent, row.tenant, row.worker)
            return any(needle in value.lower() for value in haystack)
        return True

    def matches_worker(self, snapshot: WorkerSnapshot) -> bool:
        """Whether a worker's header belongs in the view (its agent, its id)."""
        if self.agent is not None and snapshot.agent != self.agent:
            return False
        return self.worker is None or snapshot.worker == self.worker


@dataclass(slots=True)
class Fleet:
    """What one read of Redis found: every live worker's snapshot, and when."""

    snapshots: list[WorkerSnapshot] = field(default_factory=list)
    at: float = 0.0

    @property
    def rows(self) -> list[SessionRow]:
        """Every session of every worker."""
        return [row for s in self.snapshots for row in s.sessions]

    @property
    def agents(self) -> list[str]:
        """The agents seen, sorted (what ``a`` cycles through)."""
        return sorted({s.agent for s in self.snapshots} | {r.agent for r in self.rows})

    def shown(self, rows_filter: RowFilter, sort: str, *, reverse: bool) -> list[SessionRow]:
        """The rows that pass ``rows_filter``, in ``top``'s order."""
        return sort_rows([r for r in self.rows if rows_filter.matches(r)], sort, reverse=reverse)


def fleet_header(fleet: Fleet, shown: int | None = None) -> str:
    """One line: workers, sessions, sessions per state (and how many are shown)."""
    rows = fleet.rows
    states = Counter(r.state for r in rows)
    # Known states in the agent's order, then anything a newer worker sent.
    order = [s for s in SESSION_STATES if states[s]] + sorted(set(states) - set(SESSION_STATES))
    per_state = ", ".join(f"{states[s]} {s}" for s in order)
    line = f"{_count(len(fleet.snapshots), 'worker')}, {_count(len(rows), 'session')}"
    if per_state:
        line += f": {per_state}"
    if shown is not None and shown != len(rows):
        line += f" ({shown} shown)"
    return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def top_document(
    fleet: Fleet, rows_filter: RowFilter, sort: str, *, reverse: bool
) -> dict[str, Any]:
    """``top --once --json``: when, the workers' headers, every shown session in full."""
    workers = []
    for s in sorted(fleet.snapshots, key=lambda s: (s.agent, s.worker)):
        if rows_filter.matches_worker(s):
            header = asdict(s)
            header["sessions"] = len(s.sessions)
            workers.append(header)
    sessions = [asdict(r) for r in fleet.shown(rows_filter, sort, reverse=reverse)]
    return {"at": fleet.at, "workers": workers, "sessions": sessions}


async def read_fleet(redis: Any, keys: Keys) -> Fleet:
    """Every live worker's snapshot, read now."""
    return Fleet(await read_snapshots(redis, keys), at=time.time())


# ------------------------------------------------------------------ interactive


@dataclass(frozen=True, slots=True)
class TopState:
    """The interactive view's settings, changed only by :func:`handle_key`."""

    sort: str = "cpu"
    reverse: bool = False
    rows_filter: RowFilter = RowFilter()
    paused: bool = False
    #: The filter being typed after ``/`` (``None`` when not typing); applied live.
    typing: str | None = None

    @property
    def effective_filter(self) -> RowFilter:
        """The filter in force, with what is being typed."""
        if self.typing is None:
            return self.rows_filter
        return replace(self.rows_filter, text=self.typing)


#: Special keys, as :func:`run_interactive` names them for :func:`handle_key`.
ENTER: Final = "<enter>"
ESC: Final = "<esc>"
BACKSPACE: Final = "<backspace>"
_SORTS: Final = tuple(SORT_KEYS)


def handle_key(state: TopState, key: str, agents: Sequence[str]) -> TopState | None:
    """The view after ``key`` (a character or :data:`ENTER` / :data:`ESC` /
    :data:`BACKSPACE`); ``None`` to quit. ``agents``: what ``a`` cycles through.
    """
    if state.typing is not None:
        if key == ENTER:
            return replace(
                state, typing=None, rows_filter=replace(state.rows_filter, text=state.typing)
            )
        if key == ESC:
            return replace(state, typing=None, rows_filter=replace(state.rows_filter, text=""))
        if key == BACKSPACE:
            return replace(state, typing=state.typing[:-1])
        if len(key) == 1 and key.isprintable():
            return replace(state, typing=state.typing + key)
        return state
    if key == "q":
        return None
    if key in ("s", "S"):
        step = 1 if key == "s" else -1
        index = _SORTS.index(state.sort) if state.sort in _SORTS else 0
        return replace(state, sort=_SORTS[(index + step) % len(_SORTS)], reverse=False)
    if key == "r":
        return replace(state, reverse=not state.reverse)
    if key == "p":
        return replace(state, paused=not state.paused)
    if key == "/":
        return replace(state, typing=state.rows_filter.text)
    if key == ESC:
        return replace(state, rows_filter=replace(state.rows_filter, text=""))
    if key == "a":
        cycle: list[str | None] = [None, *agents]
        current = state.rows_filter.agent
        index = cycle.index(current) if current in cycle else 0
        agent = cycle[(index + 1) % len(cycle)]
        return replace(state, rows_filter=replace(state.rows_filter, agent=agent))
    return state


def screen_lines(
    state: TopState, fleet: Fleet, *, title: str, error: str | None, width: int, height: int
) -> list[str]:
    """The whole screen as at most ``height`` lines of at most ``width`` characters:
    the fleet header, the table (as many rows as fit), the status line last.
    """
    rows = fleet.shown(state.effective_filter, state.sort, reverse=state.reverse)
    clock = time.strftime("%H:%M:%S", time.localtime(fleet.at)) if fleet.at else "--:--:--"
    top = [f"{title}  {clock}  {fleet_header(fleet, len(rows))}"]
    table = render_table(rows, sort=state.sort, reverse=state.reverse)
    status = _status(state, error)
    room = max(0, height - len(top) - 1)
    body = table[:room]
    if len(table) > room and room > 0:
        body[-1] = f"... {len(table) - room + 1} more"
    lines = [*top, *body]
    lines += [""] * max(0, height - 1 - len(lines))
    lines.append(status)
    return [line[: max(0, width - 1)] for line in lines[:height]]


def _status(state: TopState, error: str | None) -> str:
    parts = []
    if error:
        parts.append(f"Redis unreachable: {error}")
    if state.typing is not None:
        parts.append(f"filter: {state.typing}_  (Enter applies, Esc clears)")
    else:
        order = (
            "reversed" if state.reverse else ("largest first" if SORT_KEYS[state.sort] else "A-Z")
        )
        parts.append(f"sort: {state.sort} ({order})")
        f = state.rows_filter
        parts.append(f"agent: {f.agent or 'all'}")
        if f.text:
            parts.append(f"filter: {f.text}")
        if state.paused:
            parts.append("PAUSED")
        parts.append(HELP)
    return "  |  ".join(parts)


def run_interactive(
    read: Callable[[], Awaitable[Fleet]],
    *,
    state: TopState,
    title: str,
    interval: float,
    describe_error: Callable[[BaseException], str],
    errors: tuple[type[BaseException], ...],
    close: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """The live view in this terminal until ``q`` (or Ctrl-C, SIGTERM, SIGHUP).

    ``read`` is called every ``interval`` s (not while paused); one that raises
    one of ``errors`` leaves the last fleet on screen with
    ``describe_error(exc)`` in the status line, and is retried at the next
    refresh; ``close`` is awaited when the view ends. Reads run beside the
    keyboard, so a Redis slow to answer never holds up ``q``. Drawing goes
    through curses' diffing (``erase`` + one ``doupdate``): only changed cells
    are written, so the screen does not flicker.
    """
    import curses
    import os
    import signal

    import anyio

    os.environ.setdefault("ESCDELAY", "25")  # Esc answers at once, not after 1 s
    view = _View(state)
    # A read stuck on a silent Redis gives up after this and says so.
    patience = max(interval, 5.0)

    async def reader() -> None:
        while True:
            if not view.state.paused:
                try:
                    with anyio.fail_after(patience):
                        view.fleet = await read()
                    view.error = None
                except TimeoutError:
                    view.error = f"no answer in {patience:.0f}s"
                except errors as exc:
                    view.error = describe_error(exc)
                view.dirty = True
            with anyio.move_on_after(interval):
                await view.wake.wait()
            view.wake = anyio.Event()

    async def stopper(scope: anyio.CancelScope) -> None:
        # The terminal restored on a kill or a closed terminal too, not only on q.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async for _ in signals:
                scope.cancel()

    async def keyboard(screen: Any) -> None:
        while True:
            if view.dirty:
                view.dirty = False
                _draw(curses, screen, view.state, view.fleet, title=title, error=view.error)
            key = _read_key(curses, screen)
            if key is None:
                await anyio.sleep(0.05)
                continue
            view.dirty = True
            if key == "<resize>":
                curses.update_lines_cols()
                continue
            was_paused = view.state.paused
            after = handle_key(view.state, key, view.fleet.agents)
            if after is None:
                return
            view.state = after
            if was_paused and not after.paused:
                view.wake.set()  # unpaused: fresh numbers now, not at the next tick

    async def run(screen: Any) -> None:
        view.wake = anyio.Event()
        _hide_cursor(curses)
        screen.nodelay(True)
        screen.keypad(True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                tg.start_soon(stopper, tg.cancel_scope)
                await keyboard(screen)
                tg.cancel_scope.cancel()
        finally:
            if close is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(*errors):
                    await close()

    def main(screen: Any) -> None:
        anyio.run(run, screen)

    try:
        curses.wrapper(main)
    except KeyboardInterrupt:
        return


@dataclass(slots=True)
class _View:
    """What the reader and the keyboard share: the settings, the last read, its error."""

    state: TopState
    fleet: Fleet = field(default_factory=Fleet)
    error: str | None = None
    dirty: bool = True
    #: Set to make the reader read now (an ``anyio.Event``, made in the loop).
    wake: Any = None


def _hide_cursor(curses: Any) -> None:
    with contextlib.suppress(curses.error):  # a terminal that cannot hide it shows it
        curses.curs_set(0)


def _read_key(curses: Any, screen: Any) -> str | None:
    try:
        key = screen.get_wch()
    except curses.error:
        return None
    if isinstance(key, int):
        if key == curses.KEY_RESIZE:
            return "<resize>"
        if key == curses.KEY_ENTER:
            return ENTER
        if key in (curses.KEY_BACKSPACE, curses.KEY_DC):
            return BACKSPACE
        return f"<{key}>"
    if key in ("\n", "\r"):
        return ENTER
    if key == "\x1b":
        return ESC
    if key in ("\x7f", "\b"):
        return BACKSPACE
    return str(key)


def _draw(
    curses: Any, screen: Any, state: TopState, fleet: Fleet, *, title: str, error: str | None
) -> None:
    height, width = screen.getmaxyx()
    lines = screen_lines(state, fleet, title=title, error=error, width=width, height=height)
    screen.erase()
    for y, text in enumerate(lines):
        attr = curses.A_REVERSE if y == 1 or (y == len(lines) - 1 and error) else curses.A_NORMAL
        with contextlib.suppress(curses.error):  # resized under us; the next draw fits
            screen.addstr(y, 0, text, attr)
    screen.noutrefresh()
    curses.doupdate()

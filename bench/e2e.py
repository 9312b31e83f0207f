"""End to end: ``create_dispatch`` to the agent in the room, openrtc against plain livekit-agents.

Run from the repository root::

    .venv/bin/python bench/e2e.py               # 60 calls per path, interleaved
    .venv/bin/python bench/e2e.py --check       # exit 1 unless within 1.10x of plain
    .venv/bin/python bench/e2e.py --calls 200 --log-dir /tmp/e2e-logs

One real ``livekit-server`` and one ``redis-server`` on loopback
(``openrtc.devtools.devstack``), and two ways of serving the same offline agent
(``examples/offline_agents/dental.py``: no STT or LLM, a tone TTS greeting):

* **openrtc**: ``python -m openrtc dispatcher --agent-name openrtc-bench`` and
  ``python -m openrtc worker --agent dental`` (coroutine isolation), each its
  own process, as deployed; the dispatch metadata ``{"agent": "dental"}``
  routes the job;
* **plain**: livekit-agents' own worker (``bench/_plain_worker.py``, started
  with ``python -m livekit.agents start``, log level WARNING) registered as
  ``plain-bench``, with its default process pool. Its load is running jobs /
  10, as openrtc reports it, unless ``--plain-load cpu``: livekit-agents'
  default (this machine's CPU use) makes the server drop its calls whenever
  the machine is 70% busy, which a shared machine often is.

Each call: a caller joins a fresh room (``auto_subscribe=False``), then this
process calls ``agent_dispatch.create_dispatch`` for the path's agent name and
waits for ``participant_connected`` of a participant of kind AGENT; the time is
``time.monotonic()`` here, from just before the API call to that event. Then
the room is deleted (the agent leaves) and, after ``--gap`` seconds, the next
call starts. Calls alternate between the paths in ABBA order, after
``--warmup`` untimed calls each, so machine noise falls on both alike.

Where the time goes comes from timestamps the processes already write: the
job's stream entry (``received_at``, ``routed_at``, ``enqueued_at``, read with
XRANGE while the call is up), its record's ``started_at`` and the worker's
"joined" log line for openrtc; one trace line per event from
``_plain_worker.py`` for plain. Every clock is this machine's ``time.time()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from _lib.figures import record_figure  # noqa: E402
from _lib.procs import ServiceDied, ServiceProcess, machine_cpu, service_env  # noqa: E402
from _lib.stats import median, percentile  # noqa: E402
from _lib.tokens import caller_token  # noqa: E402
from livekit import api, rtc  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from openrtc.devtools.devstack import LIVEKIT_VERSION, LiveKitServer, RedisServer  # noqa: E402
from openrtc.errors import ConfigError  # noqa: E402
from openrtc.wire.keys import Keys  # noqa: E402
from openrtc.wire.messages import RecordField  # noqa: E402

GOAL: Final = 1.10
AGENT: Final = "dental"
AGENTS_DIR: Final = REPO_ROOT / "examples" / "offline_agents"
PLAIN_WORKER: Final = BENCH_DIR / "_plain_worker.py"
OPENRTC_AGENT_NAME: Final = "openrtc-bench"
PLAIN_AGENT_NAME: Final = "plain-bench"
NAMESPACE: Final = "bench-e2e"
#: The openrtc worker's default concurrency; the plain worker's load uses the same.
OPENRTC_SLOTS: Final = 10
METADATA: Final = json.dumps({"agent": AGENT})
OPENRTC: Final = "openrtc"
PLAIN: Final = "plain"
#: The worker's INFO line once its agent is in the room (openrtc/worker/worker.py).
JOINED_LINE: Final = re.compile(
    r"job (?P<job>\S+): agent '[^']*' joined room (?P<room>\S+) as \S+ "
    r"\((?P<ms>\d+) ms after enqueue\)"
)


# --- child processes -----------------------------------------------------------


def make_children(
    livekit: LiveKitServer, redis: RedisServer, logs: Path, args: argparse.Namespace
) -> dict[str, ServiceProcess]:
    python = sys.executable
    openrtc_env = service_env(livekit.url, livekit, redis.url, NAMESPACE)
    plain_extra = {"BENCH_TRACE": str(logs / "plain-trace.jsonl")}
    plain_extra["BENCH_PLAIN_AGENT_NAME"] = PLAIN_AGENT_NAME
    if args.plain_idle is not None:
        plain_extra["BENCH_PLAIN_IDLE"] = str(args.plain_idle)
    if args.plain_load == "slots":
        plain_extra["BENCH_PLAIN_SLOTS"] = str(OPENRTC_SLOTS)
    agents_dir = ["--agents-dir", str(AGENTS_DIR)]
    dispatcher = [python, "-m", "openrtc", "dispatcher", *agents_dir]
    # Peers of the first worker (--workers): each call then goes through the
    # spread-by-load check (openrtc.worker.spread) before its read.
    peers = {
        f"worker-{i}": ServiceProcess(
            f"openrtc worker {i}",
            [python, "-m", "openrtc", "worker", "--agent", AGENT, *agents_dir],
            openrtc_env,
            logs / f"worker-{i}.log",
        )
        for i in range(2, args.workers + 1)
    }
    return {
        **peers,
        "dispatcher": ServiceProcess(
            "openrtc dispatcher",
            [*dispatcher, "--agent-name", OPENRTC_AGENT_NAME],
            openrtc_env,
            logs / "dispatcher.log",
        ),
        "worker": ServiceProcess(
            "openrtc worker",
            [python, "-m", "openrtc", "worker", "--agent", AGENT, *agents_dir],
            openrtc_env,
            logs / "worker.log",
        ),
        "plain": ServiceProcess(
            "plain livekit-agents worker",
            [python, "-m", "livekit.agents", "start", str(PLAIN_WORKER), "--log-level", "WARNING"],
            service_env(livekit.url, livekit, redis.url, NAMESPACE, **plain_extra),
            logs / "plain.log",
        ),
    }


# --- one call ------------------------------------------------------------------


@dataclass
class Call:
    """One timed call: when it started, when the agent was seen, what the stream said."""

    path: str
    room: str
    warmup: bool
    started_wall: float = 0.0
    started: float = 0.0
    api_returned: float = 0.0
    seen: float | None = None
    identity: str = ""
    error: str = ""
    #: openrtc only: the stream entry's timestamps and the job record's.
    entry: dict[str, float] = field(default_factory=dict)
    job_id: str = ""
    #: Stage name -> seconds, filled in after the run (see SHARED_STAGES).
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def latency(self) -> float | None:
        return None if self.seen is None else self.seen - self.started

    @property
    def seen_wall(self) -> float | None:
        return None if self.seen is None else self.started_wall + (self.seen - self.started)


async def read_entry(redis: Redis, keys: Keys, call: Call) -> None:
    """The job's stream entry (present until its session ends) and record timestamps."""
    entries: Any = await redis.xrange(keys.jobs(AGENT), "-", "+")
    for _entry_id, fields in entries:
        if fields.get(b"room", b"").decode() != call.room:
            continue
        call.job_id = fields[b"job_id"].decode()
        for name in ("received_at", "routed_at", "enqueued_at"):
            call.entry[name] = float(fields[name.encode()])
        started = await redis.hget(keys.job(AGENT, call.job_id), RecordField.STARTED_AT)
        if started:
            call.entry["started_at"] = float(started)
        return


async def place_call(
    lk: api.LiveKitAPI,
    livekit: LiveKitServer,
    redis: Redis,
    call: Call,
    agent_name: str,
    within: float,
) -> None:
    """Join, dispatch, wait for the agent, read what openrtc recorded, delete the room."""
    room = rtc.Room()
    seen = asyncio.Event()

    @room.on("participant_connected")
    def _on_join(p: rtc.RemoteParticipant) -> None:
        if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT and call.seen is None:
            call.seen = time.monotonic()
            call.identity = p.identity
            seen.set()

    try:
        await room.connect(
            livekit.url,
            caller_token(livekit, call.room, f"caller-{uuid.uuid4().hex[:8]}"),
            rtc.RoomOptions(auto_subscribe=False),
        )
        call.started_wall = time.time()
        call.started = time.monotonic()
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=agent_name, room=call.room, metadata=METADATA)
        )
        call.api_returned = time.monotonic()
        try:
            await asyncio.wait_for(seen.wait(), within)
        except TimeoutError:
            call.error = f"no agent within {within:.0f}s"
            return
        if call.path == OPENRTC:
            await read_entry(redis, Keys(NAMESPACE), call)
    finally:
        # The caller hangs up first (deleting the room under it makes its SDK log
        # errors), then the room goes, and the agent with it.
        try:
            await room.disconnect()
        finally:
            try:
                await lk.room.delete_room(api.DeleteRoomRequest(room=call.room))
            except api.TwirpError as exc:
                if exc.code != "not_found":
                    raise


# --- statistics and report -----------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


@dataclass
class Stages:
    """Per-call stage durations (seconds) for the "where the time goes" table."""

    rows: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, start: float | None, end: float | None, call: Call) -> None:
        if start is not None and end is not None:
            self.rows.setdefault(name, []).append(end - start)
            call.stages[name] = end - start

    def median(self, name: str) -> str:
        values = self.rows.get(name)
        return ms(median(values)) if values else "-"

    def count(self, name: str) -> int:
        return len(self.rows.get(name, []))


def openrtc_joined(worker_log: str) -> dict[str, float]:
    """Room name -> seconds from ``enqueued_at`` to the worker's "joined" INFO line."""
    return {m["room"]: float(m["ms"]) / 1000 for m in JOINED_LINE.finditer(worker_log)}


def plain_trace(path: Path) -> dict[tuple[str, str], float]:
    """(room, event) -> wall time, from ``_plain_worker.py``'s trace (first of each)."""
    events: dict[tuple[str, str], float] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            events.setdefault((record["room"], record["ev"]), float(record["t"]))
    return events


# Stages both paths have, in table order: (label, key).
SHARED_STAGES: Final = (
    ("create_dispatch -> offer reaches the worker*", "offer"),
    ("offer -> agent code starts in a session", "start"),
    ("agent code starts -> room connected", "connect"),
    ("room connected -> caller sees the agent", "propagate"),
)
OPENRTC_DETAIL: Final = (
    ("  routing (resolve_agent)", "routing"),
    ("  answer -> JobAssignment -> enqueue stamp", "assign"),
    ("  enqueue stamp -> worker starts the session", "consume"),
)


def stage_breakdown(
    calls: Sequence[Call], worker_log: str, trace: dict[tuple[str, str], float]
) -> dict[str, Stages]:
    joined_after_enqueue = openrtc_joined(worker_log)
    stages = {OPENRTC: Stages(), PLAIN: Stages()}
    for call in calls:
        if call.warmup or call.seen_wall is None:
            continue
        s = stages[call.path]
        t0 = call.started_wall
        s.add("api", call.started, call.api_returned, call)
        if call.path == OPENRTC:
            e = call.entry
            received, routed = e.get("received_at"), e.get("routed_at")
            enqueued, started = e.get("enqueued_at"), e.get("started_at")
            after = joined_after_enqueue.get(call.room)
            joined = enqueued + after if enqueued is not None and after is not None else None
            s.add("offer", t0, received, call)
            s.add("start", received, started, call)
            s.add("routing", received, routed, call)
            s.add("assign", routed, enqueued, call)
            s.add("consume", enqueued, started, call)
            s.add("connect", started, joined, call)
            s.add("propagate", joined, call.seen_wall, call)
        else:
            request = trace.get((call.room, "request"))
            entry = trace.get((call.room, "entry"))
            joined = trace.get((call.room, "joined"))
            s.add("offer", t0, request, call)
            s.add("start", request, entry, call)
            s.add("connect", entry, joined, call)
            s.add("propagate", joined, call.seen_wall, call)
    return stages


def slowest(calls: Sequence[Call]) -> list[Call]:
    """The slowest 5% (at least one) of the successful calls: what p99 is made of."""
    done = sorted((c for c in calls if c.latency is not None), key=lambda c: c.latency or 0)
    return done[-max(1, len(done) // 20) :] if done else []


def tail_median(calls: Sequence[Call], key: str) -> str:
    if key == "total":
        values = [c.latency for c in calls if c.latency is not None]
    else:
        values = [c.stages[key] for c in calls if key in c.stages]
    return ms(median(values)) if values else "-"


def report(
    args: argparse.Namespace,
    calls: Sequence[Call],
    stages: dict[str, Stages],
    idle_processes: str,
    busy: float | None,
) -> bool:
    """Print the comparison; True when the goal is met (and nothing failed)."""
    measured = [c for c in calls if not c.warmup]
    by_path = {p: [c for c in measured if c.path == p] for p in (OPENRTC, PLAIN)}
    ok = {p: [c.latency for c in cs if c.latency is not None] for p, cs in by_path.items()}
    failed = {p: len(cs) - len(ok[p]) for p, cs in by_path.items()}

    print(
        "e2e: create_dispatch -> agent participant seen (participant_connected, kind AGENT) "
        "by a caller already in the room"
    )
    print(
        f"  livekit-server {LIVEKIT_VERSION} and redis-server on loopback; "
        f"livekit-agents {version('livekit-agents')}, livekit {version('livekit')}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"  {args.calls} calls per path, interleaved ABBA, after {args.warmup} warm-up calls "
        f"each; {args.gap:g}s between calls; one call at a time"
    )
    print(
        f"  openrtc: dispatcher (--agent-name {OPENRTC_AGENT_NAME}) + worker --agent {AGENT} "
        "(coroutine isolation), their default INFO logs"
    )
    shedding = (
        f"load = running jobs / {OPENRTC_SLOTS} like openrtc's (default: machine CPU use)"
        if args.plain_load == "slots"
        else "load = machine CPU use (its default)"
    )
    print(
        f"  plain:   livekit-agents AgentServer (agent_name {PLAIN_AGENT_NAME}), process pool "
        f"with {idle_processes} idle processes, {shedding}, log level WARNING"
    )
    if busy is not None:
        print(
            f"  machine CPU busy during the timed calls: {busy:.0%} of {os.cpu_count()} CPUs "
            "(every process on the machine, this benchmark's included)"
        )
        if busy > 0.6:
            print(
                "  note: the machine was busy with other work too: both paths slow down alike "
                "(interleaved), so compare the ratios, not the absolute figures"
            )
    print()
    if not ok[OPENRTC] or not ok[PLAIN]:
        print(f"no successful calls (openrtc {len(ok[OPENRTC])}, plain {len(ok[PLAIN])})")
        return False

    rows: list[tuple[str, Callable[[Sequence[float]], float]]] = [
        ("p50", median),
        ("p99", lambda v: percentile(v, 99)),
        ("mean", statistics.fmean),
        ("max", max),
        ("min", min),
        ("stdev", lambda v: statistics.stdev(v) if len(v) > 1 else 0.0),
    ]
    print(f"{'ms':<10}{'openrtc':>10}{'plain':>10}{'openrtc/plain':>15}")
    ratios: dict[str, float] = {}
    for label, func in rows:
        ours, theirs = func(ok[OPENRTC]), func(ok[PLAIN])
        ratio = ours / theirs if theirs else math.inf
        ratios[label] = ratio
        print(f"{label:<10}{ms(ours):>10}{ms(theirs):>10}{ratio:>14.2f}x")
    print(
        f"{'failed':<10}{f'{failed[OPENRTC]}/{len(by_path[OPENRTC])}':>10}"
        f"{f'{failed[PLAIN]}/{len(by_path[PLAIN])}':>10}"
    )
    met = ratios["p50"] <= args.goal and ratios["p99"] <= args.goal
    for label, func in rows[:2]:
        record_figure(
            "e2e",
            f"join latency {label}",
            ours=1e3 * func(ok[OPENRTC]),
            anchor=1e3 * func(ok[PLAIN]),
            anchor_label="plain livekit-agents",
            unit="ms",
            goal=f"<= {args.goal:.2f}x",
            met=ratios[label] <= args.goal and not failed[OPENRTC],
            note=f"{len(ok[OPENRTC])} calls per path, failed {failed[OPENRTC]}/{failed[PLAIN]}",
        )
    verdict = "met" if met else "MISSED"
    print(
        f"goal: openrtc within {args.goal:.2f}x of plain livekit-agents at p50 and p99: {verdict} "
        f"(p50 {ratios['p50']:.2f}x, p99 {ratios['p99']:.2f}x)"
    )

    print()
    print("where the time goes (median ms of each stage over the timed calls)")
    tail = {p: slowest(cs) for p, cs in by_path.items()}
    n_tail = len(tail[OPENRTC])
    print(f"{'':<48}{'median':>18}  {f'slowest 5% ({n_tail} calls)':>20}")
    print(f"{'stage':<48}{'openrtc':>9}{'plain':>9}{'openrtc':>11}{'plain':>11}")
    o, p = stages[OPENRTC], stages[PLAIN]
    for label, key in [("create_dispatch API call returns", "api"), *SHARED_STAGES]:
        print(
            f"{label:<48}{o.median(key):>9}{p.median(key):>9}"
            f"{tail_median(tail[OPENRTC], key):>11}{tail_median(tail[PLAIN], key):>11}"
        )
        if key == "start":
            for detail, sub in OPENRTC_DETAIL:
                print(f"{detail:<48}{o.median(sub):>9}{'':>9}{tail_median(tail[OPENRTC], sub):>11}")
    print(
        f"{'total (create_dispatch -> caller sees agent)':<48}{'':>18}"
        f"{tail_median(tail[OPENRTC], 'total'):>11}{tail_median(tail[PLAIN], 'total'):>11}"
    )
    counts = {o.count("propagate"), p.count("propagate")}
    print(
        "  * the offer reaches openrtc's dispatcher / the plain worker (AvailabilityRequest). "
        "openrtc: stream entry, job record started_at, worker log; plain: _plain_worker.py trace"
        f" ({', '.join(map(str, sorted(counts)))} calls with every stamp)"
    )
    if failed[OPENRTC] or failed[PLAIN]:
        errors = sorted({c.error for c in measured if c.error})
        print(f"failures: {'; '.join(errors)}")
    return met and not failed[OPENRTC] and not failed[PLAIN]


# --- the run -------------------------------------------------------------------


def order(calls: int) -> list[str]:
    """ABBA: openrtc, plain, plain, openrtc, ... (``calls`` of each)."""
    pairs = [(OPENRTC, PLAIN) if i % 2 == 0 else (PLAIN, OPENRTC) for i in range(calls)]
    return [path for pair in pairs for path in pair]


async def wait_ready(
    children: dict[str, ServiceProcess], redis: Redis, trace: Path, limit: float
) -> None:
    """The dispatcher and the plain worker registered with LiveKit, the worker with Redis."""
    deadline = time.monotonic() + limit
    keys = Keys(NAMESPACE)
    while True:
        for child in children.values():
            child.check()
        dispatcher = "LiveKit connection registered" in children["dispatcher"].log_text()
        workers = sum(name.startswith("worker") for name in children)
        worker = await redis.zcard(keys.workers(AGENT)) >= workers
        plain = any(event == "registered" for _room, event in plain_trace(trace))
        if dispatcher and worker and plain:
            return
        if time.monotonic() > deadline:
            raise ServiceDied(
                f"not ready after {limit:.0f}s (dispatcher registered: {dispatcher}, "
                f"worker in Redis: {worker}, plain worker registered: {plain})"
            )
        await asyncio.sleep(0.1)


async def run_calls(
    args: argparse.Namespace,
    livekit: LiveKitServer,
    redis_url: str,
    children: dict[str, ServiceProcess],
    cpu_marks: list[tuple[int, int]],
) -> list[Call]:
    redis = Redis.from_url(redis_url)
    calls: list[Call] = []
    names = {OPENRTC: OPENRTC_AGENT_NAME, PLAIN: PLAIN_AGENT_NAME}
    try:
        async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
            await wait_ready(children, redis, Path(children["plain"].env["BENCH_TRACE"]), 60)
            plan = [(path, True) for path in order(args.warmup)]
            plan += [(path, False) for path in order(args.calls)]
            for i, (path, warmup) in enumerate(plan):
                if i == 2 * args.warmup:
                    for failed in (OPENRTC, PLAIN):
                        if args.warmup and all(c.seen is None for c in calls if c.path == failed):
                            cpu = failed == PLAIN and args.plain_load == "cpu"
                            hint = " (--plain-load cpu: see --help)" if cpu else ""
                            raise ServiceDied(
                                f"every warm-up call of the {failed} path failed{hint}"
                            )
                    cpu_marks.append(machine_cpu().busy_total())
                for child in children.values():
                    child.check()
                call = Call(path, f"e2e-{path}-{i:04d}-{uuid.uuid4().hex[:8]}", warmup)
                calls.append(call)
                await place_call(lk, livekit, redis, call, names[path], args.timeout)
                if args.verbose:
                    took = f"{ms(call.latency)} ms" if call.latency is not None else call.error
                    print(f"{'warm-up' if warmup else 'call':>7} {i:4d} {path:<8} {took}")
                elif not warmup and (i - 2 * args.warmup) % 20 == 19:
                    print(f"  {i + 1 - 2 * args.warmup}/{2 * args.calls} calls", file=sys.stderr)
                await asyncio.sleep(args.gap)
            cpu_marks.append(machine_cpu().busy_total())
    finally:
        await redis.aclose()
    return calls


def idle_processes(args: argparse.Namespace) -> str:
    if args.plain_idle is not None:
        return str(args.plain_idle)
    from livekit.agents import AgentServer
    from livekit.agents.worker import ServerEnvOption

    default: Any = AgentServer._default_num_idle_processes
    return f"{ServerEnvOption.getvalue(default, False)} (its production default)"


def start_livekit(log_path: Path, attempts: int = 3) -> LiveKitServer:
    """A started server; new free ports when another process took one meanwhile."""
    for attempt in range(1, attempts + 1):
        server = LiveKitServer(log_path=log_path)
        try:
            return server.start()
        except ConfigError:
            server.close()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="create_dispatch -> agent joined: openrtc against plain livekit-agents."
    )
    parser.add_argument("--calls", type=int, default=60, help="timed calls per path (60)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per path first (3)")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between calls (1.0)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per call")
    parser.add_argument("--workers", type=int, default=1, help="openrtc workers of the agent (1)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the goal is missed")
    parser.add_argument("--goal", type=float, default=GOAL, help=f"ratio goal ({GOAL:.2f})")
    parser.add_argument(
        "--plain-idle", type=int, default=None, help="plain worker's num_idle_processes"
    )
    parser.add_argument(
        "--plain-load",
        choices=("slots", "cpu"),
        default="slots",
        help="the plain worker's load: running jobs / 10 slots, as openrtc reports it "
        "(default), or livekit-agents' default, this machine's CPU use, with which the "
        "server drops its calls whenever the machine is 70%% busy",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every call here")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the logs here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every call")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.gap < 0 or args.timeout <= 0:
        parser.error("--calls must be >= 1, --warmup and --gap >= 0, --timeout > 0")

    signal.signal(signal.SIGTERM, _raise_interrupt)
    with contextlib.ExitStack() as stack:
        if args.log_dir is None:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openrtc-e2e-")))
        else:
            logs = args.log_dir
            logs.mkdir(parents=True, exist_ok=True)
            (logs / "plain-trace.jsonl").unlink(missing_ok=True)
        redis = RedisServer(log_path=logs / "redis.log")
        livekit = LiveKitServer(log_path=logs / "livekit.log")
        children: dict[str, ServiceProcess] = {}
        try:
            redis.start()
            livekit = start_livekit(logs / "livekit.log")
            children = make_children(livekit, redis, logs, args)
            for child in children.values():
                child.start()
            cpu_marks: list[tuple[int, int]] = []
            calls = asyncio.run(run_calls(args, livekit, redis.url, children, cpu_marks))
            busy = None
            if len(cpu_marks) == 2 and cpu_marks[1][1] > cpu_marks[0][1]:
                (busy0, total0), (busy1, total1) = cpu_marks
                busy = (busy1 - busy0) / (total1 - total0)
            stages = stage_breakdown(
                calls,
                "".join(c.log_text() for n, c in children.items() if n.startswith("worker")),
                plain_trace(Path(children["plain"].env["BENCH_TRACE"])),
            )
            met = report(args, calls, stages, idle_processes(args), busy)
            if args.json is not None:
                args.json.write_text(
                    json.dumps([dataclasses.asdict(c) for c in calls], indent=1) + "\n"
                )
        except (ServiceDied, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; stopping everything", file=sys.stderr)
            return 130
        finally:
            for child in children.values():
                child.stop()
            livekit.close()
            redis.close()
            if args.log_dir is not None:
                print(f"logs in {logs}", file=sys.stderr)
    if args.check and not met:
        print("FAIL: openrtc is not within the goal of plain livekit-agents", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

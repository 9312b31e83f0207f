"""The capacity model: what one dispatcher, one Redis master, one cluster and one worker host take.

Run from the repository root::

    .venv/bin/python bench/capacity.py                   # about a minute alone
    .venv/bin/python bench/capacity.py --figures bench/results/latest.json
    .venv/bin/python bench/capacity.py --peak-rate 5 --concurrent 300 --call-minutes 3

It measures, on a throwaway ``redis-server`` (``openrtc.devtools.devstack.RedisServer``):

1. **the raw anchor**: ``redis-benchmark`` XADD, pipelined, and Redis's own CPU
   per XADD;
2. **Redis CPU per job and per running call**: openrtc's own code paths
   (``StreamStore.enqueue`` pipelined, the worker's ``JobConsumer`` read,
   record reads and updates, status events, ``ack``; lease renewals, the
   reclaim pass, membership heartbeats, the dispatcher's load view), each
   phase alone, as the CPU time of Redis's main thread (``INFO cpu``) and the
   command time beside it (``INFO commandstats``). Both are CPU time, not wall
   time, so a loaded machine barely moves them; a throughput figure (the
   redis-benchmark requests/s) is wall time and is distorted by other
   processes: it is printed as the anchor only.

The dispatcher's figure (``bench/dispatch.py``) and the worker host's
(``bench/density.py``: calls per core, memory per session) come from the
figures file of the same scoreboard run (``OPENRTC_BENCH_SUMMARY``), or
``--figures`` (a scoreboard's ``latest.json``); alone, the script runs a small
``dispatch.py`` itself (about 15 s), and ``density.py`` only with
``--density`` (about a minute more; its figures need the density bench that
records calls per core). Then :func:`plan` turns the figures into what to run
at 1x, 10x and 100x a stated baseline, printed as a table. The method is
described in docs/operating.md ("Capacity model").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_ROOT))

from _lib.figures import SUMMARY_ENV, record_figure  # noqa: E402

# ---------------------------------------------------------------------------
# The model: figures in, a table out (pure; tests/test_capacity_model.py)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisCosts:
    """Redis main-thread CPU, in microseconds, of each unit of work."""

    #: One job from enqueue to ack: the enqueue script, the worker's read,
    #: record read and updates, two status events and their read, the ack.
    per_job: float
    #: One running call for one second: its share of lease renewals
    #: (every lease / 3) and of the agent's reclaim sweep of the pending list.
    per_call_second: float
    #: One worker process for one second: heartbeat, an empty reclaim pass,
    #: idle stream and control reads, its renewal script's fixed part.
    per_worker_second: float
    #: One dispatcher for one second, per agent it serves: heartbeat, the
    #: agent's load read, its status stream read.
    per_dispatcher_agent_second: float
    #: One dispatcher for one second, per live worker: the worker's record read.
    per_dispatcher_worker_second: float
    #: Redis memory a finished job's record keeps until it expires (bytes).
    record_bytes: float
    #: Seconds a job record lives (``dedup_ttl``).
    record_ttl: float


@dataclass(frozen=True)
class Figures:
    """Everything the model needs, each measured by a command."""

    redis: RedisCosts
    #: One dispatcher's jobs per second at a full core.
    dispatcher_jobs_per_s: float
    #: Concurrent calls one core holds (coroutine isolation), None if unmeasured.
    calls_per_core: float | None
    #: Resident memory per session (MB), None if unmeasured.
    mb_per_session: float | None


@dataclass(frozen=True)
class Load:
    """A traffic level: peak new calls per second and concurrent calls."""

    label: str
    peak_calls_per_s: float
    concurrent_calls: float
    call_seconds: float

    @property
    def mean_calls_per_s(self) -> float:
        """Little's law: concurrent = rate x duration."""
        return self.concurrent_calls / self.call_seconds

    def times(self, factor: float) -> Load:
        return replace(
            self,
            label=f"{factor:g}x",
            peak_calls_per_s=self.peak_calls_per_s * factor,
            concurrent_calls=self.concurrent_calls * factor,
        )


@dataclass(frozen=True)
class Sizing:
    """What one unit is and how full it may run."""

    host_cores: int = 8
    host_ram_gb: float = 16.0
    #: Share of a core (Redis's one thread, a dispatcher, a host's cores) planned.
    cpu_budget: float = 0.7
    #: Share of a host's or a master's memory planned.
    ram_budget: float = 0.7
    redis_ram_gb: float = 8.0
    agents: int = 3
    #: The busiest agent's share of the traffic (its keys are one slot).
    top_agent_share: float = 0.5
    #: Dispatchers kept for availability whatever the load (several serve one
    #: LiveKit project; one may be killed).
    min_dispatchers: int = 2
    #: Hosts kept beyond the need, for one host failure or a rolling update.
    spare_hosts: int = 1


@dataclass(frozen=True)
class Row:
    """What one traffic level needs."""

    load: Load
    dispatchers: int
    dispatcher_share: float  # of one dispatcher's budgeted core, summed over the need
    calls_per_host: float | None
    host_bound: str
    hosts: int | None
    workers: int | None
    redis_cpu_share: float  # of one master's budgeted core
    redis_mem_gb: float
    masters: int
    cluster: bool
    top_agent_share: float  # of one master's budgeted core: the per-agent slot bound
    top_agent_fits: bool


def calls_per_host(figures: Figures, sizing: Sizing) -> tuple[float | None, str]:
    """Concurrent calls one host holds within budget, and what bounds it (cpu or memory)."""
    bounds: list[tuple[float, str]] = []
    if figures.calls_per_core:
        bounds.append((figures.calls_per_core * sizing.host_cores * sizing.cpu_budget, "cpu"))
    if figures.mb_per_session:
        ram_mb = sizing.host_ram_gb * 1024 * sizing.ram_budget
        bounds.append((ram_mb / figures.mb_per_session, "memory"))
    if not bounds:
        return None, "-"
    value, bound = min(bounds)
    return math.floor(value), bound


def plan(figures: Figures, load: Load, sizing: Sizing) -> Row:
    """Dispatchers, worker hosts and Redis masters for ``load``.

    Each part's need is its load divided by one unit's budgeted capacity:

    * dispatchers: peak calls/s / (jobs/s per dispatcher x cpu budget), at
      least ``min_dispatchers``;
    * hosts: concurrent calls / calls per host, plus ``spare_hosts``; one
      worker process per core (a coroutine worker is one event loop);
    * Redis: main-thread CPU per second = peak x per job + concurrent x per
      call-second + workers x per worker-second + dispatchers x (agents x
      per dispatcher-agent-second + workers x per dispatcher-worker-second),
      against ``cpu_budget`` x 1e6 us per master; memory = mean calls/s x
      record TTL x record bytes against ``ram_budget`` x ``redis_ram_gb``.
      Masters: the larger of the two, and a cluster when more than one;
    * one agent's keys are one hash slot, so its own share (``top_agent_share``
      of the per-job, per-call and per-worker terms) must fit one master.
    """
    r = figures.redis
    per_dispatcher = figures.dispatcher_jobs_per_s * sizing.cpu_budget
    dispatcher_share = load.peak_calls_per_s / per_dispatcher
    dispatchers = max(sizing.min_dispatchers, math.ceil(dispatcher_share))

    per_host, bound = calls_per_host(figures, sizing)
    hosts: int | None = None
    workers: int | None = None
    if per_host:
        hosts = math.ceil(load.concurrent_calls / per_host) + sizing.spare_hosts
        workers = hosts * sizing.host_cores
    # Without a host figure the worker count is unknown: one worker per 50
    # calls (the density bench's level) stands in for the per-worker term.
    redis_workers = workers if workers is not None else math.ceil(load.concurrent_calls / 50)

    agent_part = (
        load.peak_calls_per_s * r.per_job
        + load.concurrent_calls * r.per_call_second
        + redis_workers * r.per_worker_second
    )
    dispatcher_part = dispatchers * (
        sizing.agents * r.per_dispatcher_agent_second
        + redis_workers * r.per_dispatcher_worker_second
    )
    budget_us = sizing.cpu_budget * 1e6
    cpu_share = (agent_part + dispatcher_part) / budget_us
    mem_gb = load.mean_calls_per_s * r.record_ttl * r.record_bytes / 1024**3
    mem_share = mem_gb / (sizing.redis_ram_gb * sizing.ram_budget)
    masters = max(1, math.ceil(cpu_share), math.ceil(mem_share))
    top = sizing.top_agent_share * agent_part / budget_us
    return Row(
        load=load,
        dispatchers=dispatchers,
        dispatcher_share=dispatcher_share,
        calls_per_host=per_host,
        host_bound=bound,
        hosts=hosts,
        workers=workers,
        redis_cpu_share=cpu_share,
        redis_mem_gb=mem_gb,
        masters=masters,
        cluster=masters > 1,
        top_agent_share=top,
        top_agent_fits=top <= 1.0,
    )


def capacity_table(
    figures: Figures, baseline: Load, sizing: Sizing, factors: Sequence[float] = (1, 10, 100)
) -> list[Row]:
    """One :class:`Row` per multiple of ``baseline``."""
    return [plan(figures, baseline.times(f), sizing) for f in factors]


def one_master(figures: Figures, sizing: Sizing, call_seconds: float) -> tuple[float, float]:
    """Jobs/s and concurrent calls one master takes within the CPU budget.

    Jobs/s with no calls running; concurrent calls with calls of
    ``call_seconds`` arriving at the rate that keeps them running (Little's
    law), workers and dispatchers left out (they are per process, not per
    call).
    """
    r = figures.redis
    budget = sizing.cpu_budget * 1e6
    jobs = budget / r.per_job
    calls = budget / (r.per_call_second + r.per_job / call_seconds)
    return jobs, calls


def render_table(rows: Sequence[Row], sizing: Sizing) -> list[str]:
    head = (
        "| load | peak calls/s | concurrent | dispatchers | worker hosts "
        f"({sizing.host_cores} cores, {sizing.host_ram_gb:g} GB) | worker processes "
        "| Redis CPU (one master = 1.00) | Redis memory | masters | cluster "
        "| busiest agent (one master = 1.00) |"
    )
    lines = [head, "|---" * 11 + "|"]
    for row in rows:
        hosts = (
            f"{row.hosts} ({row.host_bound}-bound, +{sizing.spare_hosts} spare)"
            if row.hosts
            else "-"
        )
        top = f"{row.top_agent_share:.2f}" + (
            "" if row.top_agent_fits else " **exceeds one master**"
        )
        lines.append(
            f"| {row.load.label} | {row.load.peak_calls_per_s:g} | {row.load.concurrent_calls:g} "
            f"| {row.dispatchers} (need {row.dispatcher_share:.2f}) | {hosts} "
            f"| {row.workers if row.workers is not None else '-'} | {row.redis_cpu_share:.2f} "
            f"| {row.redis_mem_gb:.2f} GB | {row.masters} | {'yes' if row.cluster else 'no'} "
            f"| {top} |"
        )
    return lines


# ---------------------------------------------------------------------------
# Figures of the other benchmarks
# ---------------------------------------------------------------------------

_DISPATCH_CPU = re.compile(r"dispatcher CPU (\d+(?:\.\d+)?) us/job")
_RSS_AT = re.compile(r"coroutine / process RSS at (\d+) sessions")


def read_figures(path: Path) -> list[dict[str, Any]]:
    """A scoreboard figures file (JSON lines) or a ``latest.json``; [] if absent."""
    try:
        text = path.read_text()
    except OSError:
        return []
    if path.suffix == ".json":
        return list(json.loads(text).get("figures", []))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Found:
    """What the other benchmarks reported, and where it came from."""

    dispatcher_jobs_per_s: float | None = None
    dispatcher_wall_jobs_per_s: float | None = None
    calls_per_core: float | None = None
    mb_per_session: float | None = None
    sources: list[str] = field(default_factory=list)


def extract(figures: Sequence[dict[str, Any]], found: Found, source: str) -> None:
    """Fill what ``found`` lacks from ``figures`` (the first source wins)."""
    before = (found.dispatcher_jobs_per_s, found.calls_per_core, found.mb_per_session)
    for f in figures:
        name, ours = f.get("figure", ""), f.get("ours")
        if ours is None:
            continue
        if f.get("bench") == "dispatch" and name == "throughput, one dispatcher":
            if found.dispatcher_jobs_per_s is None:
                found.dispatcher_wall_jobs_per_s = ours
                cpu = _DISPATCH_CPU.search(f.get("note", ""))
                # CPU per job is what bounds a dispatcher, and unlike jobs/s
                # it is not stretched by other processes on a loaded machine.
                found.dispatcher_jobs_per_s = 1e6 / float(cpu.group(1)) if cpu else ours
        elif f.get("bench") == "density":
            if name == "calls per core" and found.calls_per_core is None:
                found.calls_per_core = ours
            match = _RSS_AT.match(name)
            if match and found.mb_per_session is None:
                # The whole coroutine worker (idle baseline included) over its
                # sessions: an upper bound of the memory one session adds.
                found.mb_per_session = ours / int(match.group(1))
    if (found.dispatcher_jobs_per_s, found.calls_per_core, found.mb_per_session) != before:
        found.sources.append(source)


def run_bench(script: str, args: Sequence[str], found: Found) -> None:
    """Run a benchmark with a summary file of its own and take its figures."""
    with tempfile.TemporaryDirectory(prefix="openrtc-capacity-") as tmp:
        summary = Path(tmp) / "figures.jsonl"
        cmd = [sys.executable, str(BENCH_DIR / script), *args]
        shown = " ".join(["bench/" + script, *args])
        print(f"  running {shown} ...", flush=True)
        started = time.monotonic()
        out = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env={**os.environ, SUMMARY_ENV: str(summary)},
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0 and not summary.exists():
            print(
                f"  {shown} failed (exit {out.returncode}):\n"
                f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
            )
        extract(
            read_figures(summary),
            found,
            f"`{shown}` ({time.monotonic() - started:.0f} s, this run)",
        )


# ---------------------------------------------------------------------------
# Redis measurements
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """One phase: Redis main-thread CPU and command time, per unit; round trips per unit."""

    cpu_us: float
    command_us: float
    round_trips: float = 0.0


def counting_connection() -> type[Any]:
    """A redis-py connection class counting the requests sent: one per round trip."""
    from redis.asyncio.connection import Connection

    class Counting(Connection):
        sent = 0

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            Counting.sent += 1
            await super().send_packed_command(command, check_health)

    return Counting


async def main_thread_cpu(redis: Any) -> float:
    info = await redis.info("cpu")
    return (
        float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    ) * 1e6


def command_usec(stats: dict[str, Any]) -> float:
    """Command time of one phase, counting a script's or a transaction's commands once.

    Commands run by a script, or queued in MULTI, are counted in their own rows
    and again in EVALSHA's or EXEC's; our own INFO and CONFIG are left out.
    """
    rows = {k.removeprefix("cmdstat_"): v for k, v in stats.items() if k.startswith("cmdstat_")}
    rows = {k: v for k, v in rows.items() if k != "info" and not k.startswith("config")}
    usec = {k: float(v["usec"]) for k, v in rows.items()}
    scripted = {"evalsha", "eval"} & usec.keys()
    if scripted:
        return sum(usec[k] for k in scripted)
    if "exec" in usec:
        return usec["exec"] + usec.get("multi", 0.0)
    return sum(usec.values())


class Meter:
    """Measures phases on one Redis: CPU of its main thread, idle cost subtracted."""

    def __init__(self, admin: Any, counter: Any = None) -> None:
        self.admin = admin
        #: The measured client's connection class (:func:`counting_connection`).
        self.counter = counter
        self.idle_us_per_s = 0.0

    async def calibrate(self, seconds: float = 1.0) -> None:
        before, t0 = await main_thread_cpu(self.admin), time.monotonic()
        await asyncio.sleep(seconds)
        after, t1 = await main_thread_cpu(self.admin), time.monotonic()
        self.idle_us_per_s = max(0.0, (after - before) / (t1 - t0))

    async def phase(self, units: float, body: Callable[[], Awaitable[None]]) -> Cost:
        await self.admin.config_resetstat()
        sent = self.counter.sent if self.counter else 0
        before, t0 = await main_thread_cpu(self.admin), time.monotonic()
        await body()
        after, t1 = await main_thread_cpu(self.admin), time.monotonic()
        trips = (self.counter.sent - sent) if self.counter else 0
        stats = await self.admin.info("commandstats")
        cpu = max(0.0, after - before - self.idle_us_per_s * (t1 - t0))
        return Cost(cpu / units, command_usec(stats) / units, trips / units)


@dataclass
class RedisReport:
    costs: RedisCosts
    commands: RedisCosts  # the same terms by command time
    phases: dict[str, Cost]
    #: One call's steps: (step, before issue 22's folding, now); None: no such step.
    lifecycle: list[tuple[str, Cost | None, Cost | None]]
    anchor_rps: float | None
    anchor_xadd: Cost | None
    anchor_pipeline: int


async def redis_benchmark_anchor(
    port: int, meter: Meter, n: int, pipeline: int
) -> tuple[float | None, Cost | None]:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        print("  redis-benchmark not found: no raw anchor")
        return None, None
    value = "x" * 500  # about one dispatcher entry
    cmd = [exe, "-h", "127.0.0.1", "-p", str(port), "-n", str(n), "-c", "4", "-P", str(pipeline),
           "-q", "XADD", "anchor", "MAXLEN", "~", "10000", "*", "payload", value]  # fmt: skip
    rps: list[float] = []

    async def run() -> None:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        match = re.findall(r"([\d.]+) requests per second", out.decode(errors="replace"))
        if match:
            rps.append(float(match[-1]))

    cost = await meter.phase(n, run)
    await meter.admin.delete("anchor")
    return (rps[0] if rps else None), cost


async def measure_redis(
    jobs: int, lease: float, heartbeat: float, anchor_n: int, pipeline: int, repeats: int = 2
) -> RedisReport:
    from livekit.protocol import agent as proto
    from livekit.protocol import models
    from redis.asyncio import ConnectionPool, Redis

    from openrtc.devtools.devstack import RedisServer
    from openrtc.settings import DEFAULT_DEDUP_TTL
    from openrtc.store.membership import Presence, read_agent_loads
    from openrtc.store.streams import RECLAIM_SWEEP, JobConsumer, ReportWrite, StreamStore
    from openrtc.wire.keys import Keys
    from openrtc.wire.messages import (
        JobMessage,
        JobStatus,
        RecordField,
        RecordState,
        StatusEvent,
        accept_arguments,
    )
    from openrtc.wire.reports import CallReport

    server = RedisServer()
    server.start()
    admin = Redis(host="127.0.0.1", port=server.port)
    counter = counting_connection()
    pool = ConnectionPool(host="127.0.0.1", port=server.port, connection_class=counter)
    redis = Redis(connection_pool=pool)
    try:
        meter = Meter(admin, counter)
        await meter.calibrate()
        anchor_rps, anchor_xadd = await redis_benchmark_anchor(
            server.port, meter, anchor_n, pipeline
        )

        keys = Keys("cap")
        store = StreamStore(redis, keys)
        agent = "dental"
        await store.ensure_group(agent)
        dispatcher_id = "dispatcher-1"
        now = time.time()
        messages = []
        for i in range(jobs):
            job_id = f"AJ_cap{i:08d}"
            job = proto.Job(
                id=job_id,
                type=proto.JobType.JT_ROOM,
                room=models.Room(sid=f"RM_cap{i:08d}", name=f"dental-call-{i:08d}"),
                metadata=json.dumps({"agent": agent, "caller": "+15550100" + f"{i % 1000:03d}"}),
            )
            messages.append(
                JobMessage(
                    job=job,
                    agent=agent,
                    accept=accept_arguments(job_id, agent),
                    livekit_url="ws://127.0.0.1:7880",
                    step=0,
                    source="capacity",
                    dispatcher_id=dispatcher_id,
                    received_at=now,
                    routed_at=now,
                )
            )
        phases: dict[str, Cost] = {}
        job_ids = [m.job_id for m in messages]
        reports = [
            CallReport(m.job_id, agent, m.room, now, now + 60, "ended", tenant=m.tenant)
            for m in messages
        ]

        def event(job_id: str, status: JobStatus) -> StatusEvent:
            return StatusEvent(job_id, status, "", "worker-1")

        async def enqueue(store: StreamStore) -> None:
            for start in range(0, jobs, 50):  # the dispatcher pipelines a burst
                await store.enqueue(messages[start : start + 50])

        async def before_steps() -> dict[str, Cost]:
            """One call's steps as the code made them until issue 22, one round trip each."""
            old = StreamStore(redis, Keys("cap-before"))
            await old.ensure_group(agent)
            reader = JobConsumer(old, agent, "worker-1")
            read: list[str] = []

            async def reads() -> None:  # worst case: one read per job, then its record
                while len(read) < jobs:
                    reply: Any = await redis.xreadgroup(
                        "workers", "worker-1", {old.keys.jobs(agent): ">"}, count=1, block=100
                    )
                    for entry_id, _ in reply[0][1]:
                        read.append(entry_id.decode())
                        await reader.job_record(job_ids[len(read) - 1])

            async def starts() -> None:
                for entry_id, job_id in zip(read, job_ids, strict=True):
                    await reader.start(entry_id, job_id, {RecordField.ATTEMPT: 1})
                    await old.publish_status(dispatcher_id, event(job_id, JobStatus.RUNNING))

            async def healthy() -> None:
                for job_id in job_ids:
                    await reader.update_record(job_id, {RecordField.HEALTHY: 1})

            async def ends() -> None:
                for entry_id, job_id, report in zip(read, job_ids, reports, strict=True):
                    await old.add_report(report, maxlen=100_000, max_age=3600)
                    await reader.ack(entry_id)
                    await reader.update_record(job_id, {RecordField.STATE: RecordState.DONE})
                    await old.publish_status(dispatcher_id, event(job_id, JobStatus.SUCCESS))
                    await redis.delete(old.keys.checkpoint(agent, job_id))

            async def relay() -> None:  # a status read and a trim per event (calls alone)
                key, last = old.keys.status(dispatcher_id), b"0-0"
                for _ in range(2 * jobs):
                    reply: Any = await redis.xread({key: last}, count=1, block=100)
                    last = reply[0][1][-1][0]
                    await redis.xtrim(key, minid=last)

            return {
                "enqueue": await meter.phase(jobs, lambda: enqueue(old)),
                "read": await meter.phase(jobs, reads),
                "start": await meter.phase(jobs, starts),
                "healthy": await meter.phase(jobs, healthy),
                "end": await meter.phase(jobs, ends),
                "relay": await meter.phase(jobs, relay),
            }

        async def now_steps() -> dict[str, Cost]:
            """One call's steps as the code makes them now."""
            await store.ensure_group(agent)
            consumer = JobConsumer(store, agent, "worker-1")
            deliveries: list[Any] = []

            async def reads() -> None:  # worst case: one read per job
                while len(deliveries) < jobs:
                    deliveries.extend(await consumer.read(1, 100))

            async def starts() -> None:  # the record checked by the start
                for d, job_id in zip(deliveries, job_ids, strict=True):
                    running = (dispatcher_id, event(job_id, JobStatus.RUNNING))
                    fields = {RecordField.ATTEMPT: 1}
                    await consumer.start_unread(d.entry_id, job_id, fields, status=running)

            async def renewals(marked: bool) -> None:
                for d, job_id in zip(deliveries, job_ids, strict=True):
                    marks = {d.entry_id: 1} if marked else None
                    await consumer.renew({d.entry_id: job_id}, marks)

            async def ends() -> None:
                for d, job_id, report in zip(deliveries, job_ids, reports, strict=True):
                    await consumer.end(
                        d.entry_id,
                        job_id,
                        checkpoint=True,
                        status=(dispatcher_id, event(job_id, JobStatus.SUCCESS)),
                        report=ReportWrite(report, 100_000, 3600),
                    )

            async def relay() -> None:  # the trim rides the next read
                last, relayed = b"0-0", False
                for _ in range(2 * jobs):
                    got = await store.read_status(
                        dispatcher_id, last, count=1, block_ms=100, trim=relayed
                    )
                    last, relayed = got[-1][0], True

            steps = {
                "enqueue": await meter.phase(jobs, lambda: enqueue(store)),
                "read": await meter.phase(jobs, reads),
                "start": await meter.phase(jobs, starts),
            }
            # The healthy mark rides the renewal a running call has anyway: its
            # cost is what the mark adds to one, and no round trip.
            plain = await meter.phase(jobs, lambda: renewals(False))
            mark = await meter.phase(jobs, lambda: renewals(True))
            steps["healthy"] = Cost(
                max(0.0, mark.cpu_us - plain.cpu_us),
                max(0.0, mark.command_us - plain.command_us),
            )
            steps["end"] = await meter.phase(jobs, ends)
            steps["relay"] = await meter.phase(jobs, relay)
            return steps

        def least(runs: list[dict[str, Cost]]) -> dict[str, Cost]:
            # The least of the repeats: others' processes on a shared machine
            # only ever add to a phase's CPU.
            return {
                name: min((run[name] for run in runs), key=lambda c: c.cpu_us) for name in runs[0]
            }

        await redis.script_load(store.scripts.enqueue.script)
        befores, nows = [], []
        for _ in range(repeats):  # interleaved: a noisy spell hits both columns alike
            await admin.flushdb()
            befores.append(await before_steps())
            await admin.flushdb()
            mem0 = int((await admin.info("memory"))["used_memory"])
            nows.append(await now_steps())
        before, after = least(befores), least(nows)
        lifecycle_rows: list[tuple[str, Cost | None, Cost | None]] = [
            ("enqueue (script, pipelined by 50)", before["enqueue"], after["enqueue"]),
            ("worker read (+ the job's record before)", before["read"], after["read"]),
            ("start + RUNNING status", before["start"], after["start"]),
            ("healthy mark (now on the renewal)", before["healthy"], after["healthy"]),
            ("end: report, ack, record, checkpoint, SUCCESS", before["end"], after["end"]),
            ("dispatcher: 2 status reads (+ trims)", before["relay"], after["relay"]),
        ]
        for name, cost in after.items():
            phases[f"call: {name}"] = cost
        await redis.delete(keys.status(dispatcher_id), keys.reports)
        mem1 = int((await admin.info("memory"))["used_memory"])
        record_bytes = max(0.0, (mem1 - mem0) / jobs)

        # Running calls: ten workers each holding some, renewing every lease / 3.
        held_per_worker = 50
        workers = 10
        running = messages[: workers * held_per_worker]  # --jobs is at least this many
        for m in running:  # fresh records and entries for them
            await redis.delete(keys.job(agent, m.job_id))
        await store.enqueue(running)
        held: list[dict[str, str]] = []
        consumers = [JobConsumer(store, agent, f"worker-{w}") for w in range(workers)]
        for c in consumers:
            got: list[Any] = []
            while len(got) < held_per_worker:
                got.extend(await c.read(held_per_worker - len(got), 100))
            held.append(
                {
                    d.entry_id: d.fields[b"job_id"].decode() if b"job_id" in d.fields else ""
                    for d in got
                }
            )
        rounds = 20

        async def renew(k: int) -> None:
            for _ in range(rounds):
                for c, h in zip(consumers, held, strict=True):
                    await c.renew(dict(list(h.items())[:k]))

        one = await meter.phase(rounds * workers, lambda: renew(1))
        many = await meter.phase(rounds * workers, lambda: renew(held_per_worker))
        renew_entry = Cost(
            max(0.0, (many.cpu_us - one.cpu_us) / (held_per_worker - 1)),
            max(0.0, (many.command_us - one.command_us) / (held_per_worker - 1)),
        )
        renew_fixed = Cost(
            max(0.0, one.cpu_us - renew_entry.cpu_us),
            max(0.0, one.command_us - renew_entry.command_us),
        )
        phases["renewal script, per held entry"] = renew_entry
        phases["renewal script, fixed per worker"] = renew_fixed
        pending = workers * held_per_worker
        reclaimer = JobConsumer(store, agent, "reclaimer")

        async def sweeps() -> None:  # each pass walks the whole pending list
            for _ in range(rounds):
                await redis.delete(keys.reclaim(agent))
                await reclaimer.reclaim(lease, 5)

        walk = await meter.phase(rounds, sweeps)

        async def empty_passes() -> None:  # between sweeps a pass returns at once
            for _ in range(rounds * 5):
                await reclaimer.reclaim(lease, 5)

        empty = await meter.phase(rounds * 5, empty_passes)
        sweep_entry = Cost(
            max(0.0, (walk.cpu_us - empty.cpu_us) / pending),
            max(0.0, (walk.command_us - empty.command_us) / pending),
        )
        phases[f"reclaim sweep, per pending entry ({pending} pending)"] = sweep_entry
        phases["reclaim pass, between sweeps"] = empty

        presence = Presence(redis, keys.workers(agent), keys.worker("worker-1"), "worker-1", 5.0)
        fields = {"agent": agent, "capacity": 50, "running": 50, "isolation": "coroutine",
                  "jobs": ",".join(job_ids[:50]), "draining": 0}  # fmt: skip

        async def beats() -> None:
            for _ in range(rounds * 5):
                await presence.beat(fields)
                await redis.time()

        phases["worker heartbeat (+TIME)"] = await meter.phase(rounds * 5, beats)

        async def idle_reads() -> None:  # a read and a control read that find nothing
            for _ in range(rounds * 5):
                await redis.xreadgroup("workers", "worker-1", {keys.jobs(agent): ">"}, count=1)
                await redis.xread({keys.control(agent): "$"}, count=100, block=1)

        phases["idle reads (jobs, control)"] = await meter.phase(rounds * 5, idle_reads)

        dispatcher = Presence(redis, keys.dispatchers, keys.dispatcher("d1"), "d1", 5.0)
        for w in range(2, workers + 1):  # ten live workers in the registry
            p = replace(presence, record_key=keys.worker(f"worker-{w}"), member=f"worker-{w}")
            await p.beat(fields)

        async def views(registered: int) -> None:
            for _ in range(rounds * 5):
                await dispatcher.beat({"agents": agent, "load": 0.1})
                await read_agent_loads(redis, keys, [agent])
                await redis.xread({keys.status("d1"): "$"}, count=256, block=1)

        view_full = await meter.phase(rounds * 5, lambda: views(workers))
        await redis.delete(keys.workers(agent))
        view_empty = await meter.phase(rounds * 5, lambda: views(0))
        per_worker_view = Cost(
            max(0.0, (view_full.cpu_us - view_empty.cpu_us) / workers),
            max(0.0, (view_full.command_us - view_empty.command_us) / workers),
        )
        phases["dispatcher refresh + status read, per agent"] = view_empty
        phases["dispatcher refresh, per live worker"] = per_worker_view

        def build(get: Callable[[Cost], float]) -> RedisCosts:
            per_job = sum(get(now) for _, _, now in lifecycle_rows if now is not None)
            per_call = get(renew_entry) * 3 / lease + get(sweep_entry) / (lease * RECLAIM_SWEEP)
            per_worker = (
                get(phases["worker heartbeat (+TIME)"]) / heartbeat
                + get(empty)  # one pass a second (openrtc.worker.worker.RECLAIM_INTERVAL)
                + get(phases["idle reads (jobs, control)"])  # each blocks up to 1 s
                + get(renew_fixed) * 3 / lease
            )
            return RedisCosts(
                per_job=per_job,
                per_call_second=per_call,
                per_worker_second=per_worker,
                per_dispatcher_agent_second=get(view_empty) / heartbeat,
                per_dispatcher_worker_second=get(per_worker_view) / heartbeat,
                record_bytes=record_bytes,
                record_ttl=DEFAULT_DEDUP_TTL,
            )

        return RedisReport(
            costs=build(lambda c: c.cpu_us),
            commands=build(lambda c: c.command_us),
            phases=phases,
            anchor_rps=anchor_rps,
            anchor_xadd=anchor_xadd,
            anchor_pipeline=pipeline,
            lifecycle=lifecycle_rows,
        )
    finally:
        await redis.aclose()
        await pool.aclose()
        await admin.aclose()
        server.close()


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def gather(args: argparse.Namespace) -> Found:
    """The dispatcher and density figures: this scoreboard run, ``--figures``, or measured."""
    found = Found()
    summary = os.environ.get(SUMMARY_ENV)
    if summary:
        extract(read_figures(Path(summary)), found, "this scoreboard run")
    for path in args.figures or []:
        figures = read_figures(path)
        label = str(path)
        if path.suffix == ".json":
            with path.open() as f:
                machine = json.load(f).get("machine", {})
            label += f" ({machine.get('date', '?')}, commit {machine.get('commit', '?')})"
        extract(figures, found, label)
    if found.dispatcher_jobs_per_s is None and not args.no_measure:
        run_bench(
            "dispatch.py",
            (
                "--jobs",
                "3000",
                "--warmup",
                "300",
                "--rate",
                "300",
                "--duration",
                "2",
                "--ceiling-ops",
                "3000",
            ),
            found,
        )
    if found.calls_per_core is None and args.density and not args.no_measure:
        run_bench(
            "density.py",
            ("--sessions", "1,4", "--systems", "coroutine,process,plain", "--samples", "2"),
            found,
        )
    return found


def _us(value: float) -> str:
    return f"{value:,.1f} us" if value < 100 else f"{value:,.0f} us"


def lifecycle_totals(
    rows: Sequence[tuple[str, Cost | None, Cost | None]], which: int
) -> tuple[float, float, float]:
    """Round trips, CPU and command time per call of one column (1: before, 2: now)."""
    costs = [row[which] for row in rows]
    got = [c for c in costs if isinstance(c, Cost)]
    return (
        sum(c.round_trips for c in got),
        sum(c.cpu_us for c in got),
        sum(c.command_us for c in got),
    )


def alone_round_trips(
    rows: Sequence[tuple[str, Cost | None, Cost | None]],
) -> tuple[float, float] | None:
    """Round trips of one call alone, enqueue to end, before and now.

    Its enqueue is a round trip of its own (not 1/50 of one), and the
    dispatcher's status reads (the last row) are left apart.
    """
    if not rows:
        return None

    def column(which: int) -> float:
        costs = [row[which] for row in rows]
        trips = sum(c.round_trips for c in costs[1:-1] if isinstance(c, Cost))
        return round(trips) + 1

    return column(1), column(2)


def print_lifecycle(rows: Sequence[tuple[str, Cost | None, Cost | None]]) -> None:
    """One call's Redis steps side by side: before issue 22's folding, and now."""
    if not rows:
        return
    print(
        "  one call's Redis steps, per call (round trips, Redis CPU, command time), "
        "before issue 22 and now:"
    )
    print(f"    {'step':46} {'before':>28}   {'now':>28}")

    def cell(c: Cost | None) -> str:
        if c is None:
            return f"{'-':>28}"
        return f"{c.round_trips:5.2f} rt {_us(c.cpu_us):>10} ({_us(c.command_us):>8})"

    for name, old, new in rows:
        print(f"    {name:46} {cell(old)}   {cell(new)}")
    (rt0, cpu0, cmd0), (rt1, cpu1, cmd1) = lifecycle_totals(rows, 1), lifecycle_totals(rows, 2)
    total0 = Cost(cpu0, cmd0, rt0)
    total1 = Cost(cpu1, cmd1, rt1)
    print(f"    {'per call':46} {cell(total0)}   {cell(total1)}")
    alone = alone_round_trips(rows)
    assert alone is not None
    relay0 = rows[-1][1].round_trips if rows[-1][1] else 0.0
    relay1 = rows[-1][2].round_trips if rows[-1][2] else 0.0
    print(
        f"    one call alone, enqueue to end: {alone[0]:.0f} -> {alone[1]:.0f} "
        f"round trips (+ the dispatcher's status reads: {relay0:.0f} -> {relay1:.0f}); "
        f"Redis CPU {_us(cpu0)} -> {_us(cpu1)} per call "
        f"({100 * cpu1 / cpu0:.0f}% of before)"
        if cpu0 > 0
        else ""
    )


def report(args: argparse.Namespace, redis: RedisReport, found: Found) -> list[Row]:
    c, k = redis.costs, redis.commands
    print()
    print("1. One Redis master (redis-server on this machine; Redis runs commands on one thread)")
    if redis.anchor_rps is not None and redis.anchor_xadd is not None:
        a = redis.anchor_xadd
        print(
            f"  redis-benchmark XADD, {redis.anchor_pipeline} per round trip, 4 clients: "
            f"{redis.anchor_rps:,.0f} requests/s (wall time: distorted by other processes)"
        )
        print(
            f"    Redis CPU {a.cpu_us:.2f} us per XADD (command time {a.command_us:.2f} us) -> "
            f"{1e6 / a.cpu_us:,.0f} XADDs/s at a full core"
            if a.cpu_us > 0
            else "    (no CPU measured)"
        )
    print("  openrtc's operations, Redis main-thread CPU per unit (command time beside it):")
    for name, cost in redis.phases.items():
        print(f"    {name:52} {_us(cost.cpu_us):>10}  ({_us(cost.command_us)})")
    print_lifecycle(redis.lifecycle)
    print(f"  per job (enqueue -> ack; dead letters ~0):  {_us(c.per_job):>10}  ({_us(k.per_job)})")
    print(
        f"  per running call per second (renewal every {args.lease:g}/3 s, reclaim sweep):"
        f" {_us(c.per_call_second)}  ({_us(k.per_call_second)})"
    )
    print(
        f"  per worker per second (heartbeat, reclaim pass, idle reads): {_us(c.per_worker_second)}"
    )
    print(
        f"  per dispatcher per second: {_us(c.per_dispatcher_agent_second)} per agent + "
        f"{_us(c.per_dispatcher_worker_second)} per live worker"
    )
    print(
        f"  job record kept after the call: {c.record_bytes:,.0f} bytes for "
        f"{c.record_ttl / 3600:g} h (dedup_ttl)"
    )
    sizing = args.sizing
    call_s = args.call_minutes * 60
    jobs, calls = one_master(Figures(c, 1.0, None, None), sizing, call_s)
    budget = f"{100 * sizing.cpu_budget:.0f}% of its core"
    print(
        f"  => one master at {budget}: {jobs:,.0f} jobs/s (enqueue to ack), or "
        f"{calls:,.0f} concurrent {args.call_minutes:g}-minute calls "
        f"({calls / call_s:,.0f} new calls/s)"
    )
    ram = sizing.redis_ram_gb * sizing.ram_budget * 1024**3
    print(
        f"     memory: job records live {c.record_ttl / 3600:g} h, so {sizing.redis_ram_gb:g} GB "
        f"at {100 * sizing.ram_budget:.0f}% holds {ram / c.record_bytes:,.0f} records = "
        f"{ram / c.record_bytes / c.record_ttl:,.0f} calls/s on average"
        if c.record_bytes > 0
        else ""
    )

    print()
    print("2. One dispatcher, one worker host")
    if found.dispatcher_jobs_per_s is None:
        print(
            "  dispatcher: no figure (bench/dispatch.py not run); the table assumes none is needed"
        )
    else:
        wall = found.dispatcher_wall_jobs_per_s or 0.0
        print(
            f"  dispatcher: {found.dispatcher_jobs_per_s:,.0f} jobs/s at a full core from its "
            f"CPU per job ({wall:,.0f} jobs/s measured in wall time, distorted by load); "
            f"{found.dispatcher_jobs_per_s * sizing.cpu_budget:,.0f} jobs/s at "
            f"{100 * sizing.cpu_budget:.0f}%"
        )
    per_core = f"{found.calls_per_core:.0f}" if found.calls_per_core else "not measured"
    mem = f"{found.mb_per_session:.1f} MB" if found.mb_per_session else "not measured"
    print(
        f"  worker: {per_core} calls per core (coroutine), {mem} per session "
        "(worker RSS / sessions)"
    )
    figures = Figures(
        redis=c,
        dispatcher_jobs_per_s=found.dispatcher_jobs_per_s or math.inf,
        calls_per_core=found.calls_per_core,
        mb_per_session=found.mb_per_session,
    )
    per_host, bound = calls_per_host(figures, sizing)
    if per_host:
        print(
            f"  one host of {sizing.host_cores} cores, {sizing.host_ram_gb:g} GB: {per_host:,.0f} "
            f"concurrent calls ({bound}-bound, {100 * sizing.cpu_budget:.0f}% CPU, "
            f"{100 * sizing.ram_budget:.0f}% RAM)"
        )
    else:
        print(
            "  one host: not computed (no density figures: run bench/scoreboard.py, or --density)"
        )
    print(f"  sources: {'; '.join(found.sources) or 'none'}")

    baseline = Load("1x", args.peak_rate, args.concurrent, call_s)
    rows = capacity_table(figures, baseline, sizing)
    print()
    print(
        f"3. What to run: baseline {args.peak_rate:g} new calls/s at peak, {args.concurrent:g} "
        f"concurrent calls of {args.call_minutes:g} min ({baseline.mean_calls_per_s:.2f} calls/s "
        f"on average); {sizing.agents} agents, the busiest {100 * sizing.top_agent_share:.0f}% of "
        f"the traffic; lease {args.lease:g} s"
    )
    for line in render_table(rows, sizing):
        print(line)
    if rows and rows[0].hosts is None:
        print("  No host figure: Redis's per-worker terms count one worker per 50 calls.")
    print(
        "  One cluster of M masters takes about M x one master, as long as the agents' slots "
        "spread over them:\n  one agent's keys are one hash slot ({agent}), so one agent never "
        "gets more than one master."
    )
    if not all(r.top_agent_fits for r in rows):
        print(
            "  The busiest agent exceeds one master: not supported today. Split it into several "
            "agent names (routing\n  rules spread its calls), or shard its stream (not built)."
        )
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peak-rate", type=float, default=5.0, help="baseline new calls/s at peak (5)"
    )
    parser.add_argument(
        "--concurrent", type=float, default=300, help="baseline concurrent calls (300)"
    )
    parser.add_argument("--call-minutes", type=float, default=3.0, help="mean call length (3)")
    parser.add_argument("--host-cores", type=int, default=8, help="worker host cores (8)")
    parser.add_argument("--host-ram-gb", type=float, default=16.0, help="worker host RAM (16)")
    parser.add_argument("--redis-ram-gb", type=float, default=8.0, help="RAM of a master (8)")
    parser.add_argument(
        "--cpu-budget", type=float, default=0.7, help="share of a core planned (0.7)"
    )
    parser.add_argument("--agents", type=int, default=3, help="agents (3)")
    parser.add_argument("--top-agent-share", type=float, default=0.5, help="busiest agent (0.5)")
    parser.add_argument("--lease", type=float, default=5.0, help="worker lease, s (5)")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs driven through Redis (1000)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of one call's steps, before and now, the least kept (2)",
    )
    parser.add_argument(
        "--anchor-ops", type=int, default=100_000, help="redis-benchmark XADDs (100000)"
    )
    parser.add_argument("--pipeline", type=int, default=50, help="redis-benchmark -P (50)")
    parser.add_argument(
        "--figures", type=Path, action="append", help="a scoreboard latest.json or figures file"
    )
    parser.add_argument("--density", action="store_true", help="run a small density.py if needed")
    parser.add_argument("--no-measure", action="store_true", help="run no other benchmark")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 unless every part was computed"
    )
    args = parser.parse_args(argv)
    if args.jobs < 500:
        parser.error("--jobs: at least 500 (ten workers hold 50 running calls each)")
    args.sizing = Sizing(
        host_cores=args.host_cores,
        host_ram_gb=args.host_ram_gb,
        cpu_budget=args.cpu_budget,
        redis_ram_gb=args.redis_ram_gb,
        agents=args.agents,
        top_agent_share=args.top_agent_share,
    )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    print("capacity: Redis costs of openrtc's operations, then the model", flush=True)
    found = gather(args)
    redis = asyncio.run(
        measure_redis(args.jobs, args.lease, 1.0, args.anchor_ops, args.pipeline, args.repeats)
    )
    rows = report(args, redis, found)
    sizing = args.sizing
    jobs, calls = one_master(Figures(redis.costs, 1.0, None, None), sizing, args.call_minutes * 60)
    budget = f"at {100 * sizing.cpu_budget:.0f}% of its core"
    anchor = redis.anchor_xadd
    record_figure(
        "capacity",
        f"one Redis master, jobs/s {budget}",
        ours=jobs,
        anchor=1e6 / anchor.cpu_us if anchor and anchor.cpu_us > 0 else None,
        anchor_label="XADDs/s per core (redis-benchmark, pipelined)",
        unit="jobs/s",
        goal="",
        met=None,
        note=f"Redis CPU {redis.costs.per_job:.0f} us/job",
    )
    record_figure(
        "capacity",
        f"one Redis master, concurrent {args.call_minutes:g}-min calls {budget}",
        ours=calls,
        anchor=None,
        anchor_label="",
        unit="calls",
        goal="",
        met=None,
        note=f"{redis.costs.per_call_second:.1f} us per call-second",
    )
    alone = alone_round_trips(redis.lifecycle)
    if alone is not None:
        (trips0, trips1), (cpu0, cpu1) = (
            alone,
            (
                lifecycle_totals(redis.lifecycle, 1)[1],
                lifecycle_totals(redis.lifecycle, 2)[1],
            ),
        )
        record_figure(
            "capacity",
            "Redis round trips of one call, enqueue to end",
            ours=trips1,
            anchor=trips0,
            anchor_label="before issue 22",
            unit="round trips",
            goal="<= 4",
            met=trips1 <= 4,
            note="the dispatcher's status reads apart (one per event when calls come alone)",
        )
        record_figure(
            "capacity",
            "Redis CPU per call, share of before",
            ours=cpu1 / cpu0 if cpu0 > 0 else None,
            anchor=None,
            anchor_label="",
            unit="x",
            goal="<= 0.33",
            met=cpu0 > 0 and cpu1 / cpu0 <= 1 / 3,
            note=f"{cpu0:.0f} -> {cpu1:.0f} us per call, calls one at a time (this run)",
        )
    for row in rows:
        hosts = f"{row.hosts} hosts" if row.hosts is not None else "hosts: no density figure"
        record_figure(
            "capacity",
            f"{row.load.label}: {row.load.peak_calls_per_s:g} calls/s, "
            f"{row.load.concurrent_calls:g} concurrent",
            ours=row.masters,
            anchor=None,
            anchor_label="",
            unit="masters",
            goal="busiest agent within one master",
            met=row.top_agent_fits,
            note=f"{row.dispatchers} dispatchers, {hosts} ({sizing.host_cores} cores)",
        )
    print(f"run time {time.monotonic() - started:.0f} s")
    if args.check:
        missing = [
            name
            for name, value in (
                ("Redis CPU per job", redis.costs.per_job),
                ("Redis CPU per call-second", redis.costs.per_call_second),
            )
            if not value > 0
        ]
        over = [row.load.label for row in rows if not row.top_agent_fits]
        if missing or over:
            print(
                f"--check: not measured: {missing or '-'}; "
                f"busiest agent over one master: {over or '-'}"
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

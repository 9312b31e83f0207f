"""Benchmark the dispatcher end to end: LiveKit's ``/agent`` protocol in, Redis streams out.

Run from the repository root::

    .venv/bin/python bench/dispatch.py            # 30000-job flood, then 1000 jobs/s for 10 s
    .venv/bin/python bench/dispatch.py --check    # exit 1 if a goal is missed

One run, three kinds of process on loopback:

* a throwaway ``redis-server`` (``openrtc.devtools.devstack.RedisServer``);
* the dispatcher, in a process of its own (``_dispatch_child.py``: what
  ``openrtc dispatcher --agents-dir examples/offline_agents`` runs, plus a
  record of when each job's Redis reply came back, and its stats at exit);
* this process: the protocol stand-in for LiveKit's ``/agent`` endpoint
  (``openrtc/devtools/standin.py``, real protobuf over a real WebSocket) offering jobs,
  and the measuring.

It prints, beside each other:

1. **throughput**: jobs routed and enqueued per second by the one dispatcher
   process, offered as fast as it takes them (``--concurrency`` offers in
   flight, at most ``--window`` jobs offered and not yet in Redis), from the
   first offer to the last stream entry present in Redis;
2. **latency** at a fixed offered rate (open loop: offers start on a timer,
   whether or not earlier ones finished), from "availability request received"
   to "Redis acknowledged the entry", exactly, as the dispatcher process saw
   it; and the same seen from outside (the entry read back with XREAD BLOCK);
3. the **ceiling** of raw XADDs from redis-py (``redis.asyncio``, as the
   dispatcher uses) on the same Redis with the same entry: pipelined and one
   per round trip, and the dispatcher's own ``StreamStore.enqueue`` (one Lua
   script per job) pipelined the same way.

No worker consumes the job streams, so the default admission policy
(``when_no_worker="queue"``, ``max_backlog=100``) would answer unavailable as
soon as an agent's backlog reached 100; ``--max-backlog`` (default 10^9) is
passed to the dispatcher instead, which keeps the policy on the answer path but
never refuses. Every job is accounted for at the end: answered unavailable,
unanswered, or accepted and then found (or not) as a record under the agent the
corpus intends, with the streams' ``entries-added`` and the dispatcher's own
counters checked against it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent

from _lib.figures import record_figure  # noqa: E402
from _lib.procs import ServiceDied, ServiceProcess, cpu_seconds, machine_cpu  # noqa: E402
from _lib.stats import percentile  # noqa: E402
from livekit.protocol import agent as proto  # noqa: E402
from redis import __version__ as redis_py_version  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from openrtc.devtools.devstack import RedisServer  # noqa: E402
from openrtc.devtools.standin import StandIn, WorkerConn, make_job, running_standin  # noqa: E402
from openrtc.store.streams import StreamStore  # noqa: E402
from openrtc.wire.keys import Keys  # noqa: E402
from openrtc.wire.messages import JobMessage, accept_arguments  # noqa: E402

CHILD_SCRIPT: Final = BENCH_DIR / "_dispatch_child.py"
AGENTS_DIR: Final = REPO_ROOT / "examples" / "offline_agents"
#: The agents of examples/offline_agents, in registration order (dental is the default).
AGENTS: Final = ("dental", "restaurant", "support")
THROUGHPUT_GOAL: Final = 0.30
P99_GOAL_MS: Final = 5.0
#: Cap on the ceiling's own stream (the dispatcher never trims job streams), so
#: repeated passes do not grow it without bound.
STREAM_MAXLEN: Final = 10_000
OTHERS: Final = "other processes"
STOLEN: Final = "stolen by the host"
#: An accepted job not in Redis this long after the phase's last offer is lost.
JOB_TIMEOUT: Final = 10.0

# --- corpus --------------------------------------------------------------------

TENANTS: Final = ("brightsmile", "acme_health", "northside", "luigis", "harborview", "t_01923")
CAMPAIGNS: Final = ("spring-recall", "no-show-followup", "new-patient", "reservation-confirm")
REGIONS: Final = ("us-east-1", "us-west-2", "eu-central-1")
#: How a job names its agent, and the share of the corpus that does it that way.
SHAPES: Final = (
    ("job metadata", 0.40),
    ("room metadata", 0.20),
    ("room-name prefix", 0.30),
    ("default", 0.10),
)


@dataclass(frozen=True, slots=True)
class Planned:
    """One job to offer and the agent it must end up with."""

    job: proto.Job
    agent: str
    shape: str


class Corpus:
    """Seeded, distinct jobs shaped like SIP and web calls, over the three agents."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _phone(self) -> str:
        rng = self.rng
        return f"+1{rng.randint(201, 989)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _dumps(self, value: object) -> str:
        """JSON as a Python SDK (spaced) or a JS one (compact) would write it."""
        compact = self.rng.random() < 0.5
        return json.dumps(value, separators=(",", ":") if compact else None)

    def _plain_job_metadata(self, caller: str) -> str:
        if self.rng.random() < 0.3:
            return ""
        tenant = self.rng.choice(TENANTS)
        return self._dumps({"caller": caller, "tenant": tenant, "call_id": self._uuid()})

    def _plain_room_metadata(self) -> str:
        rng = self.rng
        if rng.random() < 0.6:
            return ""
        value = {
            "tenant": rng.choice(TENANTS),
            "region": rng.choice(REGIONS),
            "created_by": "sip-dispatch-rule",
        }
        return self._dumps(value)

    def _shape(self) -> str:
        roll = self.rng.random()
        for shape, share in SHAPES:
            if roll < share:
                return shape
            roll -= share
        return SHAPES[-1][0]

    def job(self, job_id: str) -> Planned:
        rng = self.rng
        caller = self._phone()
        agent = rng.choice(AGENTS)
        job_metadata = self._plain_job_metadata(caller)
        room_metadata = self._plain_room_metadata()
        room = f"sip-{caller}-{rng.getrandbits(32):08x}"
        shape = self._shape()
        if shape == "job metadata":
            campaign, tenant = rng.choice(CAMPAIGNS), rng.choice(TENANTS)
            job_metadata = self._dumps(
                {"agent": agent, "caller": caller, "campaign": campaign, "tenant": tenant}
            )
        elif shape == "room metadata":
            tenant, region = rng.choice(TENANTS), rng.choice(REGIONS)
            room_metadata = self._dumps({"agent": agent, "tenant": tenant, "region": region})
        elif shape == "room-name prefix":
            room = f"{agent}-call-{self._uuid()}"
        else:
            agent = AGENTS[0]
        job = make_job(room, metadata=job_metadata, room_metadata=room_metadata, job_id=job_id)
        return Planned(job, agent, shape)

    def jobs(self, prefix: str, count: int) -> list[Planned]:
        return [self.job(f"AJ_{prefix}{i:07d}") for i in range(count)]


# --- measuring -----------------------------------------------------------------


@dataclass
class CpuSpan:
    """CPU used by each process of the benchmark, and by everything else, over a phase."""

    pids: dict[str, int]
    began: float = field(default_factory=time.perf_counter)
    start: dict[str, float] = field(default_factory=dict)
    machine: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.machine = machine_cpu().seconds()

    def end(self) -> tuple[float, dict[str, float]]:
        """(wall seconds, CPU seconds per process, then the rest of the machine's)."""
        wall = time.perf_counter() - self.began
        used = {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}
        busy, interrupts, steal = (
            b - a for a, b in zip(self.machine, machine_cpu().seconds(), strict=True)
        )
        ours = sum(used.values())
        used["interrupts"] = interrupts
        used[OTHERS] = max(0.0, busy - ours)
        used[STOLEN] = steal
        return wall, used


@dataclass(slots=True)
class Seen:
    """A job entry as the reader found it."""

    observed: float
    received_at: float
    enqueued_at: float


class StreamReader:
    """Follows the job streams with XREAD BLOCK and wakes whoever waits for a job's entry.

    Used in the latency phase only: parsing whole entries in this process (no
    hiredis) costs more than the flood can spare.
    """

    def __init__(self, redis: Redis, last_ids: dict[str, bytes]) -> None:
        self.redis = redis
        self.last = dict(last_ids)
        self.seen: dict[str, Seen] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}

    def expect(self, job_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[job_id] = future
        return future

    def forget(self, job_id: str) -> None:
        self.waiters.pop(job_id, None)

    async def run(self) -> None:
        while True:
            streams: dict[Any, Any] = dict(self.last)
            replies: Any = await self.redis.xread(streams, count=4096, block=500)
            now = time.time()
            for stream, entries in replies or ():
                for _, fields in entries:
                    job_id = fields[b"job_id"].decode()
                    self.seen[job_id] = Seen(
                        now, float(fields[b"received_at"]), float(fields[b"enqueued_at"])
                    )
                    waiter = self.waiters.pop(job_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(now)
                name = stream.decode() if isinstance(stream, bytes) else stream
                self.last[name] = entries[-1][0]


class EnqueueCounter:
    """Jobs enqueued since :meth:`reset`, polled with DBSIZE.

    Each job the dispatcher enqueues adds exactly one key (its record hash),
    so this is a cheap running count for flow control; the exact accounting
    is done at the end, per job. Polls every ``interval`` seconds while
    :meth:`run` runs; :meth:`changed` waits for the next poll.
    """

    def __init__(self, redis: Redis, interval: float = 0.001) -> None:
        self.redis = redis
        self.interval = interval
        self.base = 0
        self.count = 0
        self._tick = asyncio.Event()

    async def reset(self) -> None:
        self.base = await self.redis.dbsize()
        self.count = 0

    async def run(self) -> None:
        while True:
            self.count = await self.redis.dbsize() - self.base
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()
            await asyncio.sleep(self.interval)

    async def changed(self) -> None:
        await self._tick.wait()


@dataclass
class Tally:
    """What happened to the jobs of one phase."""

    offered: int = 0
    unavailable: int = 0
    unanswered: int = 0
    #: Accepted, with a record under the intended agent (set by :func:`verify`).
    enqueued: int = 0
    #: Accepted, with a record under another agent.
    misrouted: int = 0
    #: Accepted, and no record anywhere.
    lost: int = 0

    @property
    def accepted(self) -> int:
        return self.offered - self.unavailable - self.unanswered


@dataclass
class Phase:
    name: str
    planned: list[Planned]
    tally: Tally = field(default_factory=Tally)
    started: float = 0.0  # wall clock of the first offer
    #: Wall clock of the last entry, from its stream entry id (Redis' clock, ms).
    last_entry: float = 0.0
    sent: dict[str, float] = field(default_factory=dict)  # job id -> availability request sent
    #: CPU seconds used by each process while the phase ran, and its wall time.
    cpu: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    #: Open loop only: how late each offer started against its timer (s).
    schedule_lag: list[float] = field(default_factory=list)


async def offer(standin: StandIn, worker: WorkerConn, planned: Planned, phase: Phase) -> bool:
    """Offer one job as LiveKit does (availability, then assignment if accepted)."""
    phase.tally.offered += 1
    phase.sent[planned.job.id] = time.time()
    answer = await standin.offer(planned.job, worker, deadline=3.0)
    if answer is None:
        phase.tally.unanswered += 1
        return False
    if not answer.available:
        phase.tally.unavailable += 1
        return False
    return True


async def closed_loop(
    standin: StandIn,
    worker: WorkerConn,
    counter: EnqueueCounter,
    phase: Phase,
    concurrency: int,
    window: int,
) -> None:
    """Offer every job of ``phase`` as fast as the dispatcher takes them.

    At most ``concurrency`` offers are in flight (availability request sent,
    assignment not yet sent: what LiveKit itself waits on), and at most
    ``window`` accepted jobs are not yet in Redis, so nothing queues without
    bound inside the dispatcher (its enqueue timeout is 2 s). Returns once
    every accepted job is in Redis, or JOB_TIMEOUT after the last offer.
    """
    jobs = iter(phase.planned)
    tally = phase.tally

    async def lane() -> None:
        for planned in jobs:
            while tally.accepted - counter.count >= window:
                await counter.changed()
            await offer(standin, worker, planned, phase)

    await counter.reset()
    poller = asyncio.create_task(counter.run())
    try:
        phase.started = time.time()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(lane())
        with suppress(TimeoutError):
            async with asyncio.timeout(JOB_TIMEOUT):
                while counter.count < tally.accepted:
                    await counter.changed()
    finally:
        poller.cancel()


async def open_loop(
    standin: StandIn, worker: WorkerConn, reader: StreamReader, phase: Phase, rate: float
) -> None:
    """Start offer ``k`` at ``t0 + k / rate``, however the earlier ones are doing."""

    async def one(planned: Planned) -> None:
        job_id = planned.job.id
        entry = reader.expect(job_id)
        if await offer(standin, worker, planned, phase):
            with suppress(TimeoutError):
                async with asyncio.timeout(JOB_TIMEOUT):
                    await entry
        reader.forget(job_id)

    loop = asyncio.get_running_loop()
    phase.started = time.time()
    t0 = loop.time()
    async with asyncio.TaskGroup() as tg:
        for k, planned in enumerate(phase.planned):
            target = t0 + k / rate
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            phase.schedule_lag.append(loop.time() - target)
            tg.create_task(one(planned))


# --- what ended up in Redis ------------------------------------------------------


def entry_time(entry_id: bytes | str) -> float:
    """The wall-clock second Redis stamped into a stream entry id (ms resolution)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0]) / 1000


async def stream_state(redis: Redis, streams: Sequence[str]) -> dict[str, tuple[int, bytes]]:
    """Each stream's (entries ever added, last entry id)."""
    state: dict[str, tuple[int, bytes]] = {}
    for stream in streams:
        info: Any = await redis.xinfo_stream(stream)
        state[stream] = (int(info["entries-added"]), info["last-generated-id"])
    return state


async def verify(redis: Redis, keys: Keys, phase: Phase) -> None:
    """Find each accepted job's record: under the intended agent, another one, or nowhere."""
    chunk = 2000
    missing: list[Planned] = []
    for i in range(0, len(phase.planned), chunk):
        part = phase.planned[i : i + chunk]
        pipe = redis.pipeline(transaction=False)
        for p in part:
            pipe.exists(keys.job(p.agent, p.job.id))
        found = await pipe.execute()
        missing += [p for p, hit in zip(part, found, strict=True) if not hit]
    tally = phase.tally
    tally.enqueued = len(phase.planned) - len(missing)
    for p in missing:
        pipe = redis.pipeline(transaction=False)
        for agent in AGENTS:
            pipe.exists(keys.job(agent, p.job.id))
        if any(await pipe.execute()):
            tally.misrouted += 1
    # Jobs refused or unanswered have no record either; what is left is lost.
    tally.lost = max(0, len(missing) - tally.misrouted - tally.unavailable - tally.unanswered)


# --- redis-py ceilings -----------------------------------------------------------


async def best_rate(passes: int, count: int, run: Callable[[], Awaitable[None]]) -> float:
    """Best operations per second over ``passes`` calls of ``run`` (each ``count`` ops)."""
    best = 0.0
    for _ in range(passes):
        began = time.perf_counter()
        await run()
        best = max(best, count / (time.perf_counter() - began))
    return best


async def xadd_pipelined(
    redis: Redis, stream: str, fields: dict[Any, Any], total: int, batch: int
) -> None:
    done = 0
    while done < total:
        size = min(batch, total - done)
        pipe = redis.pipeline(transaction=False)
        for _ in range(size):
            pipe.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True)
        await pipe.execute()
        done += size


async def xadd_sequential(redis: Redis, stream: str, fields: dict[Any, Any], total: int) -> None:
    for _ in range(total):
        await redis.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True)


def store_messages(planned: Sequence[Planned]) -> list[JobMessage]:
    """Job messages as the dispatcher builds them (no TURN password)."""
    now = time.time()
    messages = []
    for p in planned:
        stored = proto.Job()
        stored.CopyFrom(p.job)
        stored.room.ClearField("turn_password")
        accept = accept_arguments(p.job.id, p.agent)
        messages.append(
            JobMessage(
                job=stored,
                agent=p.agent,
                accept=accept,
                livekit_url="ws://127.0.0.1:7880",
                step=1,
                source="job metadata",
                dispatcher_id="dispatcher-bench-ceiling",
                received_at=now,
                routed_at=now,
            )
        )
    return messages


async def store_enqueue(store: StreamStore, messages: Sequence[JobMessage], batch: int) -> None:
    for i in range(0, len(messages), batch):
        await store.enqueue(messages[i : i + batch])


@dataclass
class Ceilings:
    pipelined: float
    sequential: float
    store: float
    entry_bytes: int
    entry_fields: int


async def measure_ceilings(
    redis_url: str, sample: dict[bytes, bytes], corpus: Corpus, args: argparse.Namespace
) -> Ceilings:
    """Raw XADDs of one of the dispatcher's entries, then StreamStore.enqueue, on one connection."""
    redis: Redis = Redis.from_url(redis_url, decode_responses=False)
    try:
        stream = "ceiling:xadd"
        fields: dict[Any, Any] = dict(sample)
        total, passes = args.ceiling_ops, 3
        await xadd_pipelined(redis, stream, fields, 2 * args.pipeline, args.pipeline)  # warm-up
        pipelined = await best_rate(
            passes, total, lambda: xadd_pipelined(redis, stream, fields, total, args.pipeline)
        )
        few = max(1, total // 4)
        sequential = await best_rate(
            passes, few, lambda: xadd_sequential(redis, stream, fields, few)
        )

        store = StreamStore(redis, Keys("ceiling"))
        batches = iter([store_messages(corpus.jobs(f"ceil{n}_", total)) for n in range(passes)])
        await store_enqueue(store, store_messages(corpus.jobs("ceilw", args.pipeline)), 100)
        store_rate = await best_rate(
            passes, total, lambda: store_enqueue(store, next(batches), args.pipeline)
        )
        size = sum(len(k) + len(v) for k, v in sample.items())
        await redis.flushdb()
        return Ceilings(pipelined, sequential, store_rate, size, len(sample))
    finally:
        await redis.aclose()


# --- the dispatcher process ------------------------------------------------------


@dataclass
class DispatcherProcess:
    """The dispatcher under test (``bench/_dispatch_child.py``) and the record it leaves."""

    service: ServiceProcess
    record_path: Path

    @classmethod
    def start(
        cls, standin_url: str, redis_url: str, namespace: str, tmp: Path, args: argparse.Namespace
    ) -> DispatcherProcess:
        env = dict(os.environ)
        env.update(
            LIVEKIT_URL=standin_url,
            LIVEKIT_API_KEY="devkey",
            LIVEKIT_API_SECRET=secrets.token_hex(20),
            REDIS_URL=redis_url,
            OPENRTC_NAMESPACE=namespace,
            OPENRTC_WAIT_REPLICAS=str(args.wait_replicas),
        )
        record = tmp / "record.json"
        cmd = [sys.executable, str(CHILD_SCRIPT), "--agents-dir", str(AGENTS_DIR)]
        cmd += ["--max-backlog", str(args.max_backlog), "--record", str(record)]
        if args.profile:
            cmd += ["--profile", str(args.profile)]
        service = ServiceProcess("the dispatcher", cmd, env, tmp / "dispatcher.log", REPO_ROOT)
        service.start()
        return cls(service, record)

    @property
    def pid(self) -> int:
        return self.service.pid

    def check_alive(self) -> None:
        self.service.check()

    def log_lines(self) -> list[str]:
        return self.service.log_lines()

    async def stop(self, grace: float = 15.0) -> dict[str, Any] | None:
        """SIGTERM (the dispatcher drains and exits, as on ``kill``), then its record.

        The event loop keeps running meanwhile, so the stand-in answers the
        dispatcher's close handshake.
        """
        await asyncio.to_thread(self.service.stop, grace)
        try:
            record: dict[str, Any] = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return record


@asynccontextmanager
async def dispatcher_process(
    standin: StandIn, redis_url: str, namespace: str, tmp: Path, args: argparse.Namespace
) -> AsyncIterator[DispatcherProcess]:
    child = DispatcherProcess.start(standin.url, redis_url, namespace, tmp, args)
    try:
        yield child
    finally:
        await child.stop()


async def guarded(child: DispatcherProcess, work: Awaitable[None], limit: float) -> None:
    """Run ``work``, failing fast if the dispatcher dies or ``limit`` seconds pass."""

    async def watch() -> None:
        while True:
            child.check_alive()
            await asyncio.sleep(0.2)

    async with asyncio.timeout(limit), asyncio.TaskGroup() as tg:
        watcher = tg.create_task(watch())
        await work
        watcher.cancel()


# --- report ----------------------------------------------------------------------


@dataclass
class Acks:
    """The dispatcher's record: when Redis acknowledged each job's entry."""

    received: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    #: The dispatcher's garbage collections: (ended at, generation, seconds).
    collections: list[tuple[float, int, float]] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> Acks:
        acks = cls()
        for job_id, received, acked, _ in record["acks"] if record else ():
            acks.received[job_id] = received
            acks.acked[job_id] = acked
        gcs = record.get("gc", ()) if record else ()
        acks.collections = [(float(t), int(g), float(d)) for t, g, d in gcs]
        return acks

    def gc(self, phase: Phase) -> str:
        """The dispatcher's garbage collections while ``phase`` ran."""
        end = phase.started + phase.wall
        during = [(g, d) for t, g, d in self.collections if phase.started <= t <= end]
        spent = sum(d for _, d in during)
        cpu = phase.cpu.get("dispatcher", 0.0)
        share = f" = {100 * spent / cpu:.1f}% of its CPU" if cpu > 0 else ""
        oldest = sum(1 for g, _ in during if g == 2)
        longest = max((d for _, d in during), default=0.0)
        return (
            f"dispatcher GC: {len(during)} collections ({oldest} of generation 2), "
            f"{1000 * spent:.0f} ms{share}, longest {1000 * longest:.1f} ms"
        )

    def batches(self, phase: Phase) -> str:
        """The pipelines that carried ``phase``'s jobs (one ack instant per pipeline)."""
        sizes = list(
            Counter(self.acked[p.job.id] for p in phase.planned if p.job.id in self.acked).values()
        )
        if not sizes:
            return "no pipelines recorded"
        return (
            f"{len(sizes)} Redis pipelines, jobs per pipeline: median "
            f"{percentile(sizes, 50):.0f}, mean {sum(sizes) / len(sizes):.1f}, max {max(sizes)}"
        )


def ms(value: float) -> str:
    return f"{1000 * value:9.2f}"


def latency_row(label: str, values: Sequence[float]) -> str:
    worst = max(values) if values else math.nan
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return f"  {label:<48}{ms(p50)}{ms(p99)}{ms(worst)}  ms"


#: Above this share of one CPU used by other processes, a phase's figures are flagged.
BUSY_MACHINE: Final = 0.10


def describe_cpu(phase: Phase) -> str:
    wall = max(phase.wall, 1e-9)
    parts = [f"{name} {100 * used / wall:.0f}%" for name, used in phase.cpu.items()]
    text = f"{', '.join(parts)} (of {100 * (os.cpu_count() or 1)}%)"
    others = phase.cpu.get(OTHERS, 0.0) + phase.cpu.get(STOLEN, 0.0)
    if others / wall > BUSY_MACHINE:
        text += "\n  WARNING: other processes competed for the CPUs during this phase"
    return text


def per_job(phase: Phase, name: str) -> float:
    return phase.cpu.get(name, 0.0) / max(1, phase.tally.enqueued)


@dataclass
class Outcome:
    throughput: float
    ratio: float
    p99_ms: float
    problems: list[str]


def report_header(
    args: argparse.Namespace,
    redis_version: str,
    child: DispatcherProcess,
    ceilings: Ceilings,
    phases: Sequence[Phase],
) -> None:
    print(
        f"dispatch: stand-in /agent (this process, pid {os.getpid()}) -> openrtc dispatcher "
        f"(own process, pid {child.pid}) -> redis-server {redis_version}; loopback, "
        f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
        f"redis-py {redis_py_version}"
    )
    print(
        f"agents: {', '.join(AGENTS)} (examples/offline_agents); admission: when_no_worker=queue, "
        f"max_backlog={args.max_backlog} (no worker consumes the streams)"
    )
    shapes = Counter(p.shape for phase in phases for p in phase.planned)
    total = sum(shapes.values())
    mix = ", ".join(f"{shape} {100 * shapes[shape] / total:.0f}%" for shape, _ in SHAPES)
    print(
        f"corpus: the agent is named by {mix}; entries of {ceilings.entry_bytes} bytes in "
        f"{ceilings.entry_fields} fields; seed {args.seed}; {len(phases[0].planned)} warm-up "
        "jobs first"
    )
    if args.profile:
        print(
            f"NOTE: the dispatcher ran under cProfile ({args.profile}): its figures are distorted"
        )
    print()
    print(
        "3. redis-py ceiling: redis.asyncio as in the dispatcher, one connection, from this "
        "process, one of the\n   dispatcher's entries, its stream capped at MAXLEN ~ "
        f"{STREAM_MAXLEN}; best of 3 passes of {args.ceiling_ops} ops"
    )
    print(f"  XADD pipelined, {args.pipeline} per round trip{ceilings.pipelined:>16,.0f} /s")
    print(f"  XADD sequential, 1 per round trip{ceilings.sequential:>18,.0f} /s")
    print(
        f"  StreamStore.enqueue, {args.pipeline} per round trip{ceilings.store:>11,.0f} /s"
        "  (the dispatcher's write: a Lua script per job)"
    )


def report_throughput(
    args: argparse.Namespace, flood: Phase, acks: Acks, ceilings: Ceilings
) -> tuple[float, float]:
    done = flood.tally.enqueued
    elapsed = max(flood.last_entry - flood.started, 1e-3)
    throughput = done / elapsed
    ratio = throughput / ceilings.pipelined
    print()
    print(
        f"1. throughput: {len(flood.planned)} jobs; {args.concurrency} offers in flight (request "
        f"sent -> assignment sent), at most {args.window}\n   accepted jobs not yet in Redis"
    )
    print(
        f"  enqueued {done} in {elapsed:.2f} s, first offer -> last stream entry (its id's time): "
        f"{throughput:,.0f} jobs/s"
    )
    print(f"  {acks.batches(flood)}")
    print(f"  CPU: {describe_cpu(flood)}")
    print(f"  {acks.gc(flood)}")
    dispatcher, driver = per_job(flood, "dispatcher"), per_job(flood, "this process")
    if dispatcher > 0:
        print(
            f"  CPU per job: dispatcher {1e6 * dispatcher:.0f} us (one full core: about "
            f"{1 / dispatcher:,.0f} jobs/s), this process {1e6 * driver:.0f} us"
        )
    verdict = "met" if ratio >= THROUGHPUT_GOAL else "MISSED"
    record_figure(
        "dispatch",
        "throughput, one dispatcher",
        ours=throughput,
        anchor=ceilings.pipelined,
        anchor_label=f"redis-py pipelined XADD ({args.pipeline}/round trip)",
        unit="jobs/s",
        goal=f">= {100 * THROUGHPUT_GOAL:.0f}% of the ceiling",
        met=ratio >= THROUGHPUT_GOAL,
        note=f"dispatcher CPU {1e6 * dispatcher:.0f} us/job" if dispatcher > 0 else "",
    )
    print(
        f"  = {100 * ratio:.1f}% of the pipelined XADD ceiling (goal >= "
        f"{100 * THROUGHPUT_GOAL:.0f}%: {verdict}); {100 * throughput / ceilings.store:.0f}% of "
        f"StreamStore.enqueue's; {throughput / ceilings.sequential:.2f}x sequential XADD"
    )
    return throughput, ratio


def report_latency(
    args: argparse.Namespace, steady: Phase, reader: StreamReader, acks: Acks
) -> float:
    ids = [p.job.id for p in steady.planned]
    seen = reader.seen
    exact = [acks.acked[j] - acks.received[j] for j in ids if j in acks.acked]
    read = [j for j in ids if j in seen]
    to_stamp = [seen[j].enqueued_at - seen[j].received_at for j in read]
    stamp_to_ack = [acks.acked[j] - seen[j].enqueued_at for j in read if j in acks.acked]
    to_read = [seen[j].observed - seen[j].received_at for j in read]
    end_to_end = [seen[j].observed - steady.sent[j] for j in read]
    lag = steady.schedule_lag
    print()
    print(
        f"2. latency: {args.rate:g} jobs/s open loop (offers started on a timer) for "
        f"{len(steady.planned) / args.rate:g} s, {len(steady.planned)} jobs; offers started "
        f"p50 {1000 * percentile(lag, 50):.2f} ms,\n   p99 {1000 * percentile(lag, 99):.2f} ms "
        f"after their time; {len(exact)} acks recorded, {len(read)} entries read back"
    )
    print(f"  {acks.batches(steady)}")
    print(f"  CPU: {describe_cpu(steady)}")
    print(f"  {acks.gc(steady)}")
    print(f"  {'':<48}{'p50':>9}{'p99':>9}{'max':>9}")
    print(latency_row("received -> Redis ack (exact, in the dispatcher)", exact))
    print(latency_row("  received -> enqueued_at (pipeline being built)", to_stamp))
    print(latency_row("  enqueued_at -> Redis ack", stamp_to_ack))
    print(latency_row("received -> entry read back by this process", to_read))
    print(latency_row("stand-in sends request -> entry read back", end_to_end))
    print(
        "  received: the dispatcher's clock as it handles the AvailabilityRequest (the entry's "
        "received_at).\n"
        "  Redis ack: the pipeline's replies parsed, in the dispatcher's enqueue loop (the "
        "child notes the time).\n"
        "  In between: the answer, the stand-in's JobAssignment, the hand-off to the enqueue "
        "loop, batching,\n"
        "  the Lua script. 'read back': the entry reaching this process's XREAD BLOCK, which "
        "does not wait for\n"
        "  the dispatcher to parse its replies, so it is not an upper bound on the ack."
    )
    p99_ms = 1000 * percentile(exact, 99)
    ok = p99_ms < P99_GOAL_MS
    record_figure(
        "dispatch",
        f"p99 received -> Redis ack at {args.rate:g} jobs/s",
        ours=p99_ms,
        anchor=None,
        anchor_label="",
        unit="ms",
        goal=f"< {P99_GOAL_MS:g} ms",
        met=ok,
        note=f"p50 {1000 * percentile(exact, 50):.2f} ms",
    )
    print(
        f"  p99 received -> Redis ack {p99_ms:.2f} ms at {args.rate:g} jobs/s "
        f"(goal < {P99_GOAL_MS:g} ms: {'met' if ok else 'MISSED'})"
    )
    return p99_ms


def report_accounting(
    phases: Sequence[Phase],
    worker: WorkerConn,
    record: dict[str, Any] | None,
    child: DispatcherProcess,
    streams: dict[str, tuple[int, bytes]],
) -> list[str]:
    problems: list[str] = []
    print()
    header = ("offered", "enqueued", "unavail", "no answer", "misrouted", "lost")
    print(f"  {'jobs':<12}" + "".join(f"{h:>10}" for h in header))
    for phase in phases:
        t = phase.tally
        row = (t.offered, t.enqueued, t.unavailable, t.unanswered, t.misrouted, t.lost)
        print(f"  {phase.name:<12}" + "".join(f"{n:>10}" for n in row))
        if t.enqueued != len(phase.planned):
            problems.append(
                f"{phase.name}: {len(phase.planned) - t.enqueued} of {len(phase.planned)} jobs "
                f"not enqueued to their agent ({t.unavailable} unavailable, {t.unanswered} "
                f"unanswered, {t.misrouted} misrouted, {t.lost} lost)"
            )
    expected = Counter(p.agent for phase in phases for p in phase.planned)
    added = {stream.rsplit(":", 1)[1]: n for stream, (n, _) in streams.items()}
    failed = sum(1 for u in worker.job_updates if u.status == proto.JobStatus.JS_FAILED)
    print(
        "  entries added per stream (XINFO): "
        + ", ".join(
            f"{agent} {added.get(agent, 0)} (expected {expected[agent]})" for agent in AGENTS
        )
        + f"; JS_FAILED updates {failed}; late answers {len(worker.late_answers)}"
    )
    if any(added.get(agent, 0) != expected[agent] for agent in AGENTS) or failed:
        problems.append(f"stream entries {added} vs expected {dict(expected)}; {failed} failed")
    total = sum(added.values())
    if record is None:
        problems.append("the dispatcher left no record (stats, ack times)")
    else:
        stats = record["stats"]
        print("  dispatcher stats: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        bad = ("enqueue_failed", "duplicates", "rejected", "unknown_agent")
        if stats["enqueued"] != total or any(stats[k] for k in bad):
            problems.append(f"the dispatcher's stats disagree with the streams: {stats}")
    # The throwaway Redis is not durable, and the dispatcher says so at start-up.
    noisy = [
        line
        for line in child.log_lines()
        if (" WARNING " in line or " ERROR " in line) and "not durable enough" not in line
    ]
    if noisy:
        problems.append(f"the dispatcher logged {len(noisy)} warnings/errors, first: {noisy[0]}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return problems


# --- main ------------------------------------------------------------------------


@contextmanager
def replicas(primary: RedisServer, count: int) -> Iterator[list[RedisServer]]:
    """``count`` replicas of ``primary`` (``--wait-replicas``: WAIT needs someone to wait for)."""
    servers = [
        RedisServer(args=("--replicaof", "127.0.0.1", str(primary.port))) for _ in range(count)
    ]
    with ExitStack() as stack:
        yield [stack.enter_context(s) for s in servers]


async def wait_replicas_up(redis: Redis, count: int) -> None:
    """Until ``count`` replicas are connected and in sync with the primary."""
    async with asyncio.timeout(30):
        while True:
            info: Any = await redis.info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and "online" in str(v)]
            if len(online) >= count:
                return
            await asyncio.sleep(0.05)


async def bench(args: argparse.Namespace) -> Outcome:
    corpus = Corpus(args.seed)
    warm = Phase("warm-up", corpus.jobs("warm", args.warmup))
    flood = Phase("throughput", corpus.jobs("flood", args.jobs))
    steady = Phase("latency", corpus.jobs("rate", round(args.rate * args.duration)))
    phases = (warm, flood, steady)
    gc.collect()
    gc.freeze()  # the corpus is long-lived: keep it out of the collector's way
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    streams = [keys.jobs(agent) for agent in AGENTS]

    with (
        tempfile.TemporaryDirectory(prefix="openrtc-bench-") as tmp,
        RedisServer() as server,
        replicas(server, args.wait_replicas),
    ):
        # The ceilings run on database 1 of the same server: DBSIZE of 0 counts jobs.
        ceiling_url = f"redis://127.0.0.1:{server.port}/1"
        redis: Redis = Redis.from_url(server.url, decode_responses=False)
        try:
            if args.wait_replicas:
                await wait_replicas_up(redis, args.wait_replicas)
            info: Any = await redis.info("server")
            redis_version, redis_pid = str(info["redis_version"]), int(info["process_id"])
            async with (
                running_standin() as standin,
                dispatcher_process(standin, server.url, namespace, Path(tmp), args) as child,
            ):
                await guarded(child, standin.wait_registered(1, within=60.0), 65.0)
                worker = standin.workers[0]
                counter = EnqueueCounter(redis)
                pids = {
                    "dispatcher": child.pid,
                    "this process": os.getpid(),
                    "redis": redis_pid,
                }

                async def run(phase: Phase, work: Awaitable[None], limit: float) -> None:
                    span = CpuSpan(pids)
                    await guarded(child, work, limit)
                    phase.wall, phase.cpu = span.end()
                    state = await stream_state(redis, streams)
                    phase.last_entry = max(entry_time(last) for _, last in state.values())

                def flooding(phase: Phase) -> Awaitable[None]:
                    return closed_loop(
                        standin, worker, counter, phase, args.concurrency, args.window
                    )

                await run(warm, flooding(warm), 60.0 + args.warmup / 100)
                recent: Any = await redis.xrevrange(streams[0], count=101)
                if not recent:
                    raise SystemExit("no entry reached Redis in the warm-up")
                sizes = sorted(recent, key=lambda e: sum(len(k) + len(v) for k, v in e[1].items()))
                sample = sizes[len(sizes) // 2][1]  # an entry of median size
                ceilings = await measure_ceilings(ceiling_url, sample, corpus, args)
                await run(flood, flooding(flood), 60.0 + JOB_TIMEOUT + args.jobs / 200)
                await asyncio.sleep(0.5)  # a pause between the flood and the open loop

                state = await stream_state(redis, streams)
                reader = StreamReader(redis, {s: last for s, (_, last) in state.items()})
                async with asyncio.TaskGroup() as tg:
                    reading = tg.create_task(reader.run())
                    await run(
                        steady,
                        open_loop(standin, worker, reader, steady, args.rate),
                        args.duration + JOB_TIMEOUT + 30.0,
                    )
                    reading.cancel()
                state = await stream_state(redis, streams)
                for phase in phases:
                    await verify(redis, keys, phase)
                record = await child.stop()
                report_header(args, redis_version, child, ceilings, phases)
                acks = Acks.from_record(record)
                throughput, ratio = report_throughput(args, flood, acks, ceilings)
                p99_ms = report_latency(args, steady, reader, acks)
                problems = report_accounting(phases, worker, record, child, state)
                return Outcome(throughput, ratio, p99_ms, problems)
        finally:
            with suppress(Exception):
                await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Flood the dispatcher through the LiveKit stand-in; time it against redis-py."
    )
    parser.add_argument("--jobs", type=int, default=30_000, help="throughput jobs (30000)")
    parser.add_argument("--concurrency", type=int, default=256, help="offers in flight (256)")
    parser.add_argument(
        "--window", type=int, default=2048, help="accepted jobs not yet in Redis, at most (2048)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="latency offered rate (1000/s)")
    parser.add_argument("--duration", type=float, default=10.0, help="latency phase seconds (10)")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up jobs first (1000)")
    parser.add_argument("--pipeline", type=int, default=200, help="XADDs per pipeline (200)")
    parser.add_argument("--ceiling-ops", type=int, default=20_000, help="ops per ceiling pass")
    parser.add_argument("--max-backlog", type=int, default=10**9, help="dispatcher --max-backlog")
    parser.add_argument("--seed", type=int, default=20_251_201, help="corpus seed")
    parser.add_argument("--profile", type=Path, help="cProfile the dispatcher into this file")
    parser.add_argument(
        "--wait-replicas",
        type=int,
        default=0,
        help="start N replicas; the dispatcher WAITs for them after each enqueue (0)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    args = parser.parse_args(argv)
    sizes = (args.jobs, args.concurrency, args.window, args.warmup, args.pipeline, args.ceiling_ops)
    if min(sizes) < 1:
        parser.error("--jobs, --concurrency, --window, --warmup, --pipeline, --ceiling-ops: >= 1")
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be > 0")
    if args.profile:
        args.profile = args.profile.resolve()

    try:
        outcome = asyncio.run(bench(args))
    except BaseExceptionGroup as group:
        died, rest = group.split(ServiceDied)
        if died is None or rest is not None:
            raise
        for exc in died.exceptions:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        missed = []
        if outcome.ratio < THROUGHPUT_GOAL:
            missed.append(f"throughput {100 * outcome.ratio:.1f}% < {100 * THROUGHPUT_GOAL:.0f}%")
        if not outcome.p99_ms < P99_GOAL_MS:
            missed.append(f"p99 {outcome.p99_ms:.2f} ms >= {P99_GOAL_MS:g} ms")
        missed += outcome.problems
        if missed:
            print(f"FAIL: {'; '.join(missed)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

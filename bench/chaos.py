"""The chaos ledger: hundreds of real calls through faults, every call accounted for.

Run from the repository root::

    .venv/bin/python bench/chaos.py                 # 200+ calls over several minutes
    .venv/bin/python bench/chaos.py --short         # ~50 calls in a minute or two
    .venv/bin/python bench/chaos.py --check         # exit 1 unless the guarantees hold
    .venv/bin/python bench/chaos.py --short --seed 3 --log-dir /tmp/chaos

One real ``livekit-server`` and one ``redis-server`` on loopback
(``openrtc.devtools.devstack``; Redis starts with ``appendonly yes``), two agents
(``examples/offline_agents``: dental, restaurant), two dispatchers
(automatic dispatch) and four workers, each its own ``python -m openrtc``
process in its own process group: dental in coroutine and in process
isolation, restaurant in two coroutine workers. The workers reach LiveKit
through a loopback TCP proxy (``openrtc.devtools.devstack.DelayProxy``) that can hold back the
server API's requests (``POST /twirp/...``) while signalling passes untouched.

Each call: this process creates a room named ``<agent>-c<n>-<hex>`` whose
metadata names the agent, joins it as a caller (``rtc.Room``,
``auto_subscribe=False``: no audio is decoded), waits up to
``--answer-timeout`` for an agent, stays its planned duration, hangs up and
deletes the room. At most ``--concurrency`` calls are up at once; the start
times, agents, durations and every fault's target come from ``--seed``.

Faults, at fixed fractions of the calling period (printed with their times):
SIGKILL of a random worker's process group (a replacement starts a second
later; a kill waits, up to a minute, until every worker is up: a second kill
while a replacement still starts would leave an agent with no worker; kills
run beside the other faults, which keep their times), garbage entries XADDed
to both job streams, a slow LiveKit API (the proxy delays each request by
``--slow-delay`` s for a while), Redis restarted with its AOF (same port,
same directory), a dispatcher restarted (SIGTERM, SIGKILL after 15 s), Redis
restarted without persistence (directory wiped, no AOF from then on), and
the LiveKit server restarted on the same ports. A worker or dispatcher that
exits on its own is logged and restarted.

The ledger is built from the outside: the caller's view of agent
participants (``participant_connected``/``disconnected``, kind AGENT), the
server's participant lists sampled every second (``list_participants``), the
job streams and the dead-letter stream (tailed every second). Process logs
are evidence only: which worker joined a room (to tell a killed worker's
call from others), and why a dispatcher refused a job.

Every call ends as a named success with its evidence checked, or a failure
(``bench/chaos_ledger.py`` classifies, a pure module with table tests):
served (planned duration reached, agent audio published), recovered (within
``RECOVERY_LIMIT`` of the kill, or of the end of a Redis/LiveKit outage that
overlapped it), interrupted by an injected fault and back within that bound,
cut by the LiveKit restart (within ``REDISPATCH_BOUND`` of its return), not
placed while LiveKit restarted. Anything else is FAILED: no agent ever
(dead-lettered, refused and never dispatched again, nothing), a drop, a late
recovery or answer no fault explains, a leave-and-rejoin with no fault.

``--check`` fails unless: 0 failed calls, 0 rooms with two agents of one job
at once, 0 rooms where agents of two jobs overlap for over 3 s, 0 rooms the
server listed with two agents, 0 accepted jobs lost across the AOF Redis
restart (which must have compared some), 0 running calls ended by the Redis
restart without persistence, 0 services that exited on their own, 0 garbage
entries not dead-lettered, 0 fault steps that raised. ``--sabotage``
runs a deliberately broken build (reconciler off, crash detection off) to
see the checks fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _lib.figures import record_figure  # noqa: E402
from _lib.procs import ServiceProcess, service_env  # noqa: E402
from _lib.stats import median, percentile  # noqa: E402
from _lib.tokens import caller_token  # noqa: E402
from chaos_ledger import (  # noqa: E402
    FAILED,
    AgentEvent,
    CallRecord,
    Fault,
    Join,
    Ledger,
    RunFacts,
    build_ledger,
    guarantees,
)
from e2e import JOINED_LINE  # noqa: E402
from livekit import api, rtc  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from openrtc.devtools.devstack import (  # noqa: E402
    API_REQUEST,
    DelayProxy,
    LiveKitServer,
    RedisServer,
    delay_proxy,
)
from openrtc.errors import ConfigError  # noqa: E402
from openrtc.wire.keys import Keys  # noqa: E402
from openrtc.wire.messages import RecordField, RecordState  # noqa: E402

AGENTS: Final = ("dental", "restaurant")
AGENTS_DIR: Final = REPO_ROOT / "examples" / "offline_agents"
NAMESPACE: Final = "chaos"
KEYS: Final = Keys(NAMESPACE)
AGENT_KIND: Final = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
#: (slot name, agent, isolation, concurrency): the worker processes.
WORKERS: Final = (
    ("w1-dental-coroutine", "dental", "coroutine", 10),
    ("w2-dental-process", "dental", "process", 6),
    ("w3-restaurant-coroutine", "restaurant", "coroutine", 10),
    ("w4-restaurant-coroutine", "restaurant", "coroutine", 10),
)
DISPATCHERS: Final = ("d1", "d2")
#: Longest a kill waits for every worker to be up (see ``Harness.fault``).
KILL_WAIT: Final = 60.0
#: ``--sabotage``: a deliberately broken build (settings every service reads),
#: to show each check of the ledger failing.
SABOTAGE: Final[dict[str, dict[str, str]]] = {
    "reconciler-off": {"OPENRTC_RECONCILE_INTERVAL": "0"},
    "crash-detection-off": {"OPENRTC_CRASH_DETECTION": "false"},
}
LOG_TIME: Final = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
UNAVAILABLE: Final = re.compile(
    r"job (\S+) \(room (\S+)\) for agent '[^']*' answered unavailable: (.*)"
)
NOT_ENQUEUED: Final = re.compile(r"job (\S+) \(room (\S+)\): openrtc: could not enqueue (.*)")


def log_time(line: str) -> float | None:
    """The wall time of a ``logging`` line (``%(asctime)s``, this machine's local time)."""
    m = LOG_TIME.match(line)
    if m is None:
        return None
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000


# --- the slow API proxy --------------------------------------------------------


# --- the harness ---------------------------------------------------------------


@dataclass
class Plan:
    calls: int
    period: float
    concurrency: int
    min_duration: float
    max_duration: float
    kills: int
    slow_for: float


SHORT: Final = Plan(
    calls=50, period=80, concurrency=12, min_duration=8, max_duration=20, kills=3, slow_for=12
)
FULL: Final = Plan(
    calls=220, period=300, concurrency=20, min_duration=5, max_duration=30, kills=10, slow_for=30
)


class Harness:
    def __init__(self, args: argparse.Namespace, plan: Plan, logs: Path) -> None:
        self.args = args
        self.plan = plan
        self.logs = logs
        self.rng = random.Random(args.seed)
        # Kills run beside the other faults: their own choices, so the seed
        # fixes them whatever the interleaving.
        self.kill_rng = random.Random(f"{args.seed}-kills")
        self.redis_server = RedisServer(log_path=logs / "redis.log", appendonly=True)
        self.livekit = LiveKitServer(log_path=logs / "livekit.log")
        self.proxy: DelayProxy | None = None
        self.children: dict[str, ServiceProcess] = {}
        self.incarnations: dict[str, int] = Counter()
        #: Every process log this run wrote: incarnation name -> path.
        self.process_logs: dict[str, Path] = {}
        self.faults: list[Fault] = []
        self.calls: list[CallRecord] = []
        self.active: dict[str, CallRecord] = {}
        self.livekit_up = asyncio.Event()
        self.stopping_on_purpose: set[str] = set()
        self.self_exits: list[Fault] = []
        self.accepted: dict[str, dict[str, str]] = {}  # entry id -> fields (job streams)
        self.dead: list[dict[str, str]] = []
        self.garbage: dict[str, str] = {}  # "<stream> <entry id>" -> stream
        self.aof_lost: list[str] = []
        self.aof_checked = 0
        self.garbage_state: Counter[str] = Counter()  # what became of each garbage entry
        self.t0 = 0.0
        self.redis: Redis | None = None

    # -- processes ---------------------------------------------------------------

    def env(self, livekit_url: str) -> dict[str, str]:
        env = service_env(livekit_url, self.livekit, self.redis_server.url, NAMESPACE)
        # A deliberately broken build, to show the ledger catches it.
        env.update(SABOTAGE.get(self.args.sabotage, {}))
        return env

    def argv(self, slot: str) -> tuple[list[str], str]:
        python = [sys.executable, "-m", "openrtc"]
        agents_dir = ["--agents-dir", str(AGENTS_DIR)]
        if slot in DISPATCHERS:
            return [*python, "dispatcher", *agents_dir], self.livekit.url
        assert self.proxy is not None
        for name, agent, isolation, concurrency in WORKERS:
            if name == slot:
                argv = [*python, "worker", "--agent", agent, *agents_dir]
                argv += ["--isolation", isolation, "--concurrency", str(concurrency)]
                argv += ["--drain-timeout", "5"]
                return argv, self.proxy.url
        raise KeyError(slot)

    def spawn(self, slot: str) -> None:
        self.incarnations[slot] += 1
        name = f"{slot}.{self.incarnations[slot]}"
        argv, url = self.argv(slot)
        path = self.logs / f"{name}.log"
        child = ServiceProcess(name, argv, self.env(url), path)
        child.start()
        self.children[slot] = child
        self.process_logs[name] = path

    def kill(self, slot: str) -> str:
        child = self.children[slot]
        assert child.proc is not None
        self.stopping_on_purpose.add(slot)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()
        child.stop(grace=0)
        self.stopping_on_purpose.discard(slot)
        return child.name

    async def supervise(self) -> None:
        """Restart a process that exited on its own (as a supervisor would), and log it."""
        while True:
            await asyncio.sleep(0.5)
            for slot, child in list(self.children.items()):
                if slot in self.stopping_on_purpose or child.proc is None:
                    continue
                code = child.proc.poll()
                if code is None:
                    continue
                tail = child.log_text().strip().splitlines()[-1:] or [""]
                fault = Fault(
                    time.time(),
                    "exited on its own",
                    child.name,
                    detail=f"code {code}: {tail[0][-160:]}",
                )
                self.self_exits.append(fault)
                self.note(fault)
                child.stop(grace=0)
                await asyncio.sleep(1.0)
                self.spawn(slot)

    def note(self, fault: Fault) -> None:
        print(
            f"  [{fault.at - self.t0:7.1f}s] {fault.kind} {fault.target} {fault.detail}".rstrip(),
            file=sys.stderr,
            flush=True,
        )

    async def wait_ready(self, redis: Redis, limit: float = 90) -> None:
        deadline = time.monotonic() + limit
        while True:
            registered = sum(
                "LiveKit connection registered" in self.children[d].log_text() for d in DISPATCHERS
            )
            workers = {a: await redis.zcard(KEYS.workers(a)) for a in AGENTS}
            want = Counter(agent for _, agent, _, _ in WORKERS)
            if registered == len(DISPATCHERS) and all(workers[a] >= want[a] for a in AGENTS):
                return
            for child in self.children.values():
                child.check()
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"not ready after {limit:.0f}s: {registered} dispatchers, {workers}"
                )
            await asyncio.sleep(0.2)

    # -- observers ----------------------------------------------------------------

    async def tail_streams(self, redis: Redis) -> None:
        """Every job entry and dead letter ever written, read while they exist."""
        last: dict[str, str] = {KEYS.jobs(a): "-" for a in AGENTS}
        last[KEYS.dead_letter] = "-"
        while True:
            for key, since in list(last.items()):
                start = since if since == "-" else f"({since}"
                try:
                    entries: Any = await redis.xrange(key, start, "+", count=1000)
                except Exception:
                    break  # Redis is down: try again next round
                for entry_id, raw in entries:
                    eid = entry_id.decode()
                    last[key] = eid
                    fields = {
                        k.decode(errors="replace"): v.decode(errors="replace")
                        for k, v in raw.items()
                    }
                    if key == KEYS.dead_letter:
                        fields["_id"] = eid
                        self.dead.append(fields)
                    elif f"{key} {eid}" not in self.garbage:
                        self.accepted.setdefault(eid, fields)
            await asyncio.sleep(1.0)

    async def sample(self, lk: api.LiveKitAPI) -> None:
        """The server's participant list of every live call room, every second."""
        limit = asyncio.Semaphore(5)

        async def one(call: CallRecord) -> None:
            async with limit:
                try:
                    reply = await asyncio.wait_for(
                        lk.room.list_participants(api.ListParticipantsRequest(room=call.room)), 3
                    )
                except Exception:
                    return
            agents = [p for p in reply.participants if p.kind == api.ParticipantInfo.Kind.AGENT]
            # Two agents count once both are connected (ACTIVE): one still
            # joining publishes nothing and hears nothing, and under load it
            # is listed for seconds before it can say it is there.
            connected = [p for p in agents if p.state == api.ParticipantInfo.State.ACTIVE]
            call.samples += 1
            call.sampled.append((time.time(), [(p.identity, p.sid) for p in connected]))
            call.max_agents_sampled = max(call.max_agents_sampled, len(connected))
            heard = {e.sid for e in call.audio}
            for p in agents:
                job = p.identity.removeprefix("agent-")
                if job not in call.job_ids:
                    call.job_ids.append(job)
                # The server's list is evidence too: the caller's SDK misses
                # publications across its rejoin of a restarted server.
                if p.sid not in heard and any(t.type == api.TrackType.AUDIO for t in p.tracks):
                    call.audio.append(AgentEvent(time.time(), "audio", p.identity, p.sid))
            if len(connected) > 1:
                call.double_sample.append(
                    f"{time.time() - self.t0:.1f}s: "
                    + ", ".join(f"{p.identity}/{p.sid}" for p in connected)
                )

        while True:
            await asyncio.sleep(1.0)
            if self.livekit_up.is_set():
                await asyncio.gather(*(one(c) for c in list(self.active.values())))

    # -- one call -----------------------------------------------------------------

    async def call(self, lk: api.LiveKitAPI, rec: CallRecord, slots: asyncio.Semaphore) -> None:
        await asyncio.sleep(max(0.0, self.t0 + rec.planned_start - time.time()))
        async with slots:
            await self.livekit_up.wait()
            try:
                room = await asyncio.wait_for(
                    lk.room.create_room(
                        api.CreateRoomRequest(
                            name=rec.room, metadata=json.dumps({"agent": rec.agent})
                        )
                    ),
                    10,
                )
            except Exception as exc:
                rec.error = f"create_room failed: {type(exc).__name__}: {exc}"[:200]
                rec.error_at = time.time()
                return
            rec.room_sid = room.sid
            rec.created_at = time.time()
            self.active[rec.room] = rec
            try:
                await self._in_call(rec)
            finally:
                self.active.pop(rec.room, None)
                rec.hung_up_at = rec.hung_up_at or time.time()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        lk.room.delete_room(api.DeleteRoomRequest(room=rec.room)), 10
                    )

    async def _in_call(self, rec: CallRecord) -> None:
        room = rtc.Room()
        present: dict[str, str] = {}
        changed = asyncio.Event()
        lost = asyncio.Event()

        def on_join(p: rtc.RemoteParticipant) -> None:
            if p.kind != AGENT_KIND or p.sid in present:
                return
            present[p.sid] = p.identity
            rec.events.append(AgentEvent(time.time(), "join", p.identity, p.sid))
            rec.max_agents_caller = max(rec.max_agents_caller, len(present))
            job = p.identity.removeprefix("agent-")
            if job not in rec.job_ids:
                rec.job_ids.append(job)
            changed.set()

        def on_leave(p: rtc.RemoteParticipant) -> None:
            if present.pop(p.sid, None) is not None:
                rec.events.append(AgentEvent(time.time(), "leave", p.identity, p.sid))
                changed.set()

        def on_audio(pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
            if p.kind == AGENT_KIND and pub.kind == rtc.TrackKind.KIND_AUDIO:
                rec.audio.append(AgentEvent(time.time(), "audio", p.identity, p.sid))

        def on_disconnected(reason: Any) -> None:
            if rec.hung_up_at is None:
                rec.caller_lost_at = time.time()
                rec.caller_lost = str(reason)
                lost.set()

        room.on("participant_connected", on_join)
        room.on("participant_disconnected", on_leave)
        room.on("track_published", on_audio)
        room.on("disconnected", on_disconnected)
        try:
            await asyncio.wait_for(
                room.connect(
                    self.livekit.url,
                    caller_token(self.livekit, rec.room, f"caller-{rec.n}"),
                    rtc.RoomOptions(auto_subscribe=False),
                ),
                10,
            )
        except Exception as exc:
            rec.error = f"caller could not join: {type(exc).__name__}: {exc}"[:200]
            rec.error_at = time.time()
            with contextlib.suppress(Exception):
                await room.disconnect()
            return
        try:
            for p in list(room.remote_participants.values()):
                on_join(p)
                for pub in list(p.track_publications.values()):
                    on_audio(pub, p)
            answer_by = time.monotonic() + self.args.answer_timeout
            while not present and not lost.is_set():
                changed.clear()
                left = answer_by - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(left, 1.0))
            if present:
                rec.joined_at = rec.events[0].at
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), rec.duration)
        finally:
            rec.hung_up_at = time.time()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(room.disconnect(), 10)

    # -- faults -------------------------------------------------------------------

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the start, fault) for this run; kills at seeded random times."""
        p = self.plan.period
        fixed = [
            (0.15, "garbage"),
            (0.22, "slow-api"),
            (0.42, "redis-aof"),
            (0.50, "dispatcher"),
            (0.62, "redis-no-persistence"),
            (0.82, "livekit"),
        ]
        kills = sorted(self.rng.uniform(0.08, 0.95) for _ in range(self.plan.kills))
        plan = [(f * p, kind) for f, kind in fixed] + [(f * p, "kill") for f in kills]
        return sorted(plan)

    async def run_faults(self, redis: Redis) -> None:
        """The kills in one sequence, every other fault in another.

        A kill may wait for a replacement to come up; the other faults keep
        their times meanwhile.
        """
        plan = self.schedule()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._run_faults([f for f in plan if f[1] == "kill"], redis))
            tg.create_task(self._run_faults([f for f in plan if f[1] != "kill"], redis))

    async def _run_faults(self, plan: list[tuple[float, str]], redis: Redis) -> None:
        for offset, kind in plan:
            await asyncio.sleep(max(0.0, self.t0 + offset - time.time()))
            fault = Fault(time.time(), kind)
            self.faults.append(fault)
            try:
                await self.fault(fault, redis)
            except Exception as exc:
                fault.error = f"{type(exc).__name__}: {exc}"[:300]
                fault.detail += f" (harness error: {fault.error})"
            fault.end = fault.end or time.time()
            self.note(fault)

    async def fault(self, fault: Fault, redis: Redis) -> None:
        if fault.kind == "kill":
            # Not while a replacement is still starting: on a loaded host that
            # takes 20-40 s, and a second kill then leaves an agent with no
            # worker at all, which no deployment survives (its calls expire).
            waited = await self.workers_ready(redis, limit=KILL_WAIT)
            choices = await self.busy_workers(redis) or [w[0] for w in WORKERS]
            slot = self.kill_rng.choice(choices)
            fault.at = time.time()
            fault.target = self.kill(slot)
            fault.detail = "SIGKILL to its process group; replacement in 1s" + (
                f" (held {waited:.1f}s until every worker was up)" if waited >= 0.5 else ""
            )
            await asyncio.sleep(1.0)
            self.spawn(slot)
        elif fault.kind == "dispatcher":
            slot = self.rng.choice(DISPATCHERS)
            child = self.children[slot]
            fault.target = child.name
            self.stopping_on_purpose.add(slot)
            started = time.monotonic()
            await asyncio.to_thread(child.stop, 15.0)
            took = time.monotonic() - started
            fault.detail = f"SIGTERM; gone after {took:.1f}s" + (
                " (SIGKILLed at 15s)" if took >= 15 else ""
            )
            self.stopping_on_purpose.discard(slot)
            self.spawn(slot)
        elif fault.kind == "garbage":
            fault.detail = await self.inject_garbage(redis)
        elif fault.kind == "slow-api":
            assert self.proxy is not None
            self.proxy.request_delay = self.args.slow_delay
            await asyncio.sleep(self.plan.slow_for)
            self.proxy.request_delay = 0.0
            fault.detail = (
                f"API requests through the proxy delayed {self.args.slow_delay:g}s "
                f"for {self.plan.slow_for:g}s ({self.proxy.requests_delayed} delayed)"
            )
        elif fault.kind == "redis-aof":
            fault.target = "redis (appendonly yes)"
            before = await self.snapshot(redis)
            await asyncio.to_thread(self.redis_server.stop)
            await asyncio.sleep(self.args.redis_down)
            await asyncio.to_thread(self.redis_server.start)
            after = await self.snapshot(redis)
            self.aof_checked = len(before)
            for eid, job_key in before.items():
                if eid in after:
                    continue
                state = await redis.hget(job_key, RecordField.STATE) if job_key else None
                if state != RecordState.DONE.encode():
                    self.aof_lost.append(eid)
            fault.detail = (
                f"down {self.args.redis_down:g}s; {len(before)} job entries before, "
                f"{len(self.aof_lost)} lost"
            )
        elif fault.kind == "redis-no-persistence":
            fault.target = "redis (no persistence)"
            await asyncio.to_thread(self.redis_server.stop)
            self.redis_server.wipe()
            self.redis_server.appendonly = False
            await asyncio.sleep(self.args.redis_down)
            await asyncio.to_thread(self.redis_server.start)
            fault.detail = f"down {self.args.redis_down:g}s; data wiped, appendonly no from now on"
        elif fault.kind == "livekit":
            fault.target = "livekit-server"
            self.livekit_up.clear()
            await asyncio.to_thread(self.livekit.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.livekit.start)
            # A room created before any agent worker is registered is never
            # offered to one (LiveKit does not dispatch it later): calls
            # resume once every dispatcher is registered again, as a load
            # balancer's readiness check would hold traffic.
            back = time.time()
            registered = await self.registered_since(fault.at, limit=30)
            self.livekit_up.set()
            fault.detail = (
                "SIGTERM, restarted on the same ports; dispatchers registered again "
                f"{time.time() - back:.1f}s after it served HTTP"
                + ("" if registered else " (NOT ALL within 30s)")
            )
        fault.end = time.time()

    async def workers_ready(self, redis: Redis, limit: float) -> float:
        """Wait (at most ``limit`` s) until every worker slot's current process is registered.

        Returns how long it waited. A slot is up once a worker record of its
        agent names the pid of the slot's current process.
        """
        started = time.monotonic()
        while time.monotonic() - started < limit:
            up = 0
            with contextlib.suppress(Exception):
                for slot, agent, _, _ in WORKERS:
                    child = self.children[slot]
                    pid = str(child.proc.pid if child.proc else "").encode()
                    members: Any = await redis.zrange(KEYS.workers(agent), 0, -1)
                    for member in members:
                        record: Any = await redis.hgetall(KEYS.worker(member.decode()))
                        if record.get(b"pid") == pid:
                            up += 1
                            break
            if up == len(WORKERS):
                break
            await asyncio.sleep(0.5)
        return time.monotonic() - started

    async def busy_workers(self, redis: Redis) -> list[str]:
        """Worker slots running at least one call now (their Redis records), in slot order."""
        busy: list[str] = []
        try:
            for slot, agent, _, _ in WORKERS:
                child = self.children[slot]
                pid = child.proc.pid if child.proc else None
                members: Any = await redis.zrange(KEYS.workers(agent), 0, -1)
                for member in members:
                    record: Any = await redis.hgetall(KEYS.worker(member.decode()))
                    if record.get(b"pid") == str(pid).encode() and int(record.get(b"running", 0)):
                        busy.append(slot)
        except Exception:
            return []
        return busy

    async def registered_since(self, since: float, limit: float) -> bool:
        """Wait until every dispatcher logged a LiveKit registration after ``since``."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            done = 0
            for slot in DISPATCHERS:
                for line in self.children[slot].log_text().splitlines()[::-1]:
                    if "LiveKit connection registered" in line:
                        done += (log_time(line) or 0) >= since
                        break
            if done == len(DISPATCHERS):
                return True
            await asyncio.sleep(0.2)
        return False

    async def snapshot(self, redis: Redis) -> dict[str, str]:
        """Entry id -> job record key, of every job entry in the streams now."""
        out: dict[str, str] = {}
        for agent in AGENTS:
            entries: Any = await redis.xrange(KEYS.jobs(agent), "-", "+")
            for entry_id, raw in entries:
                eid = entry_id.decode()
                if f"{KEYS.jobs(agent)} {eid}" in self.garbage:
                    continue
                job = raw.get(b"job_id", b"").decode(errors="replace")
                out[eid] = KEYS.job(agent, job) if job else ""
        return out

    async def inject_garbage(self, redis: Redis) -> str:
        count = 0
        for agent in AGENTS:
            stream = KEYS.jobs(agent)
            entries: Any = await redis.xrevrange(stream, "+", "-", count=1)
            real = dict(entries[0][1]) if entries else {}
            variants: list[dict[bytes, bytes]] = [
                {b"x": os.urandom(12)},
                {b"v": b"1"},
                {b"v": b"999", b"job_id": b"garbage-newer-schema"},
            ]
            if real:
                bad_step = dict(real)
                bad_step[b"job_id"] = f"garbage-step-{agent}".encode()
                bad_step[b"step"] = "²".encode()
                variants.append(bad_step)
                bad_job = dict(real)
                bad_job[b"job_id"] = f"garbage-job-{agent}".encode()
                bad_job[b"job"] = os.urandom(40)
                variants.append(bad_job)
                bad_utf8 = dict(real)
                bad_utf8[b"agent"] = b"\xff\xfe"
                variants.append(bad_utf8)
            for fields in variants:
                entry_id = await redis.xadd(stream, fields)  # type: ignore[arg-type]
                self.garbage[f"{stream} {entry_id.decode()}"] = stream
                count += 1
        return f"{count} garbage entries XADDed to {', '.join(KEYS.jobs(a) for a in AGENTS)}"

    # -- the run ------------------------------------------------------------------

    def plan_calls(self) -> None:
        for n in range(self.plan.calls):
            agent = self.rng.choice(AGENTS)
            start = self.rng.uniform(0, self.plan.period)
            duration = self.rng.uniform(self.plan.min_duration, self.plan.max_duration)
            room = f"{agent}-c{n:03d}-{uuid.UUID(int=self.rng.getrandbits(128)).hex[:6]}"
            self.calls.append(CallRecord(n, agent, room, start, duration))
        self.calls.sort(key=lambda c: c.planned_start)

    async def run(self) -> None:
        self.redis_server.start()
        self.livekit.start()
        self.livekit_up.set()
        async with delay_proxy(self.livekit.port, request_prefix=API_REQUEST) as self.proxy:
            await self._run()

    async def _run(self) -> None:
        redis = Redis.from_url(self.redis_server.url, socket_timeout=5)
        for slot in DISPATCHERS:
            self.spawn(slot)
        for slot, *_ in WORKERS:
            self.spawn(slot)
        try:
            await self.wait_ready(redis)
            self.plan_calls()
            slots = asyncio.Semaphore(self.plan.concurrency)
            async with api.LiveKitAPI(
                self.livekit.http_url, self.livekit.api_key, self.livekit.api_secret
            ) as lk:
                self.t0 = time.time()
                print(
                    f"chaos: {len(self.calls)} calls over {self.plan.period:.0f}s, "
                    f"seed {self.args.seed}",
                    file=sys.stderr,
                )
                calls = asyncio.gather(*(self.call(lk, c, slots) for c in self.calls))
                async with asyncio.TaskGroup() as tg:
                    background = [
                        tg.create_task(self.supervise()),
                        tg.create_task(self.tail_streams(redis)),
                        tg.create_task(self.sample(lk)),
                    ]
                    faults = tg.create_task(self.run_faults(redis))
                    await calls
                    await faults
                    await asyncio.sleep(2.0)  # a last stream/dead-letter read
                    for task in background:
                        task.cancel()
            self.garbage_state = await self.garbage_outcome(redis)
        finally:
            await redis.aclose()

    async def garbage_outcome(self, redis: Redis) -> Counter[str]:
        out: Counter[str] = Counter()
        dead = {f"{d.get('origin')} {d.get('origin_id')}" for d in self.dead}
        for key, stream in self.garbage.items():
            eid = key.split(" ", 1)[1]
            if key in dead:
                out["dead-lettered"] += 1
                continue
            try:
                still: Any = await redis.xrange(stream, eid, eid)
            except Exception:
                still = None
            out["still in the stream" if still else "gone, no dead letter"] += 1
        return out

    def facts(self) -> RunFacts:
        """What this run saw, for the ledger (``chaos_ledger``, pure)."""
        return RunFacts(
            calls=self.calls,
            faults=self.faults,
            self_exits=self.self_exits,
            dead=self.dead,
            accepted=self.accepted,
            joins=worker_joins(self.process_logs),
            refused=refusals(self.process_logs),
            garbage=self.garbage_state,
            garbage_injected=len(self.garbage),
            aof_checked=self.aof_checked,
            aof_lost=self.aof_lost,
            t0=self.t0,
            **(
                # Every outcome rule holds; only the time bounds become liveness.
                {
                    "recovery_limit": self.args.answer_timeout,
                    "answer_limit": self.args.answer_timeout,
                }
                if self.args.liveness_only
                else {}
            ),
        )

    def shutdown(self) -> None:
        for child in self.children.values():
            child.stop(grace=10)
        self.livekit.close()
        self.redis_server.close()


# --- the ledger ----------------------------------------------------------------


def worker_joins(process_logs: dict[str, Path]) -> dict[str, list[Join]]:
    """Room -> every agent join a worker logged for it, in time order."""
    joins: dict[str, list[Join]] = {}
    for name, path in process_logs.items():
        if not name.startswith("w"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = JOINED_LINE.search(line)
            t = log_time(line)
            if m and t is not None:
                joins.setdefault(m["room"], []).append(Join(t, m["job"], name))
    for items in joins.values():
        items.sort(key=lambda j: j.at)
    return joins


def refusals(process_logs: dict[str, Path]) -> dict[str, list[str]]:
    """Room -> why a dispatcher refused (answered unavailable) or failed its job."""
    out: dict[str, list[str]] = {}
    for name, path in process_logs.items():
        if not name.startswith("d"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            for pattern in (UNAVAILABLE, NOT_ENQUEUED):
                m = pattern.search(line)
                if m:
                    out.setdefault(m[2], []).append(f"{name}: {m[3][:120]}")
    return out


def grep_logs(process_logs: dict[str, Path], needles: Sequence[str], limit: int = 6) -> list[str]:
    lines: list[str] = []
    for name, path in process_logs.items():
        for line in path.read_text(errors="replace").splitlines():
            if any(n and n in line for n in needles):
                lines.append(f"{name}: {line[:220]}")
    return lines[:limit]


def report(h: Harness, run: RunFacts, ledger: Ledger, wall: float) -> bool:
    print(f"chaos ledger: {len(h.calls)} calls, seed {h.args.seed}, {wall:.0f}s wall")
    print(
        f"  livekit-server + redis-server on loopback; dispatchers {', '.join(DISPATCHERS)}; "
        + "; ".join(f"{w} ({a}, {i}, {c} slots)" for w, a, i, c in WORKERS)
        + (f"; SABOTAGED: {h.args.sabotage}" if h.args.sabotage else "")
    )
    print(
        f"  time bounds: recovery {run.recovery_limit:g}s, answer {run.answer_limit:g}s"
        + (" (liveness only)" if h.args.liveness_only else " (the benchmark's goals)")
    )
    print()
    print(f"{'fault':<26}{'at':>8}{'until':>8}  target / detail")
    for f in sorted(h.faults + h.self_exits, key=lambda f: f.at):
        until = f"{(f.end or f.at) - h.t0:7.1f}s"
        print(f"{f.kind:<26}{f.at - h.t0:7.1f}s{until}  {f.target} {f.detail}".rstrip())
    print()
    print(f"{'outcome':<60}{'calls':>6}")
    for outcome, n in sorted(
        ledger.outcomes.items(), key=lambda kv: (kv[0].startswith(FAILED), kv[0])
    ):
        print(f"{outcome:<60}{n:>6}")
    print(f"{'total':<60}{sum(ledger.outcomes.values()):>6}")
    print()
    if ledger.recovery:
        r = ledger.recovery
        print(
            f"recovery (worker SIGKILL -> new agent in the room), {len(r)} kills of a call: "
            f"p50 {median(r):.2f}s  p99 {percentile(r, 99):.2f}s  max {max(r):.2f}s"
        )
    else:
        print("recovery: no call was recovered after a kill")
    if ledger.answer:
        a = ledger.answer
        print(
            f"answer (room created -> first agent), {len(a)} calls: "
            f"p50 {median(a):.2f}s  p99 {percentile(a, 99):.2f}s  max {max(a):.2f}s"
        )
    print(
        f"garbage entries: {run.garbage_injected} injected; "
        + ", ".join(f"{k} {v}" for k, v in run.garbage.items())
    )
    print()
    checks = guarantees(run, ledger)
    print("guarantees")
    for label, n in checks:
        print(f"  {label:<74}{n:>5}  {'ok' if n == 0 else 'BROKEN'}")
    total = sum(ledger.outcomes.values())
    record_figure(
        "chaos",
        f"calls through faults ({total})",
        ours=sum(n for _, n in checks),
        anchor=None,
        anchor_label="",
        unit="broken guarantees",
        goal="0 failed, 0 doubled, 0 lost",
        met=all(n == 0 for _, n in checks),
        note=", ".join(f"{label.split(' (')[0]} {n}" for label, n in checks if n),
    )
    if ledger.recovery:
        r = ledger.recovery
        for label, value in (("p50", median(r)), ("max", max(r))):
            record_figure(
                "chaos",
                f"recovery after a worker SIGKILL, {label}",
                ours=value,
                anchor=None,
                anchor_label="",
                unit="s",
                goal="",
                met=None,
                note=f"{len(r)} kills of a call; each within its bound or counted failed",
            )
    for title, recs in (
        ("failed", ledger.failed),
        ("two agents of one job", ledger.double_rooms),
        ("agents of two jobs overlapping", ledger.overlap_rooms),
        ("listed by the server with two agents", ledger.sampled_double_rooms),
    ):
        if not recs:
            continue
        print(f"\n{title}: (room, outcome, detail, evidence)")
        for rec in recs[: h.args.evidence]:
            print(f"  {rec.room} [{rec.outcome}] {rec.detail}")
            for e in rec.events:
                print(f"    caller saw {e.kind} {e.identity} {e.sid} at {e.at - h.t0:.1f}s")
            for s in rec.double_sample[:3]:
                print(f"    server list at {s}")
            for line in grep_logs(h.process_logs, [rec.room, *rec.job_ids]):
                print(f"    {line}")
        if len(recs) > h.args.evidence:
            print(f"  ... {len(recs) - h.args.evidence} more in {h.logs / 'ledger.json'}")
    if h.aof_lost:
        print(f"\nlost across the AOF restart: {', '.join(h.aof_lost[:10])}")
    for f in h.self_exits:
        print(f"\nexited on its own: {f.target} at {f.at - h.t0:.1f}s: {f.detail}")
    for f in h.faults:
        if f.error:
            print(f"\nfault step {f.kind} at {f.at - h.t0:.1f}s raised: {f.error}")
    return all(n == 0 for _, n in checks)


def write_json(h: Harness, ledger: Ledger) -> None:
    data = {
        "seed": h.args.seed,
        "faults": [asdict(f) for f in h.faults + h.self_exits],
        "outcomes": dict(ledger.outcomes),
        "aof_lost": h.aof_lost,
        "calls": [asdict(c) for c in h.calls],
        "dead_letters": h.dead,
        "garbage": h.garbage,
    }
    (h.logs / "ledger.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def _exit_on_signal(signum: int, _frame: Any) -> None:
    # Once: the livekit SDK sends one per panic, and a second one must not
    # cut short the shutdown the first started (it would orphan the servers).
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Calls through faults; every call accounted for.")
    parser.add_argument(
        "--short", action="store_true", help="~50 calls in about a minute (the test suite's run)"
    )
    parser.add_argument(
        "--calls", type=int, default=None, help="calls to place (short 50, full 220)"
    )
    parser.add_argument("--period", type=float, default=None, help="seconds over which calls start")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (1)")
    parser.add_argument(
        "--answer-timeout", type=float, default=30.0, help="seconds a caller waits for an agent"
    )
    parser.add_argument(
        "--slow-delay", type=float, default=4.0, help="seconds each slow API request is held"
    )
    parser.add_argument(
        "--redis-down", type=float, default=2.0, help="seconds Redis is down per restart"
    )
    parser.add_argument("--evidence", type=int, default=8, help="failed calls to show evidence for")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every guarantee holds")
    parser.add_argument(
        "--liveness-only",
        action="store_true",
        help="hold recovery and answer times to --answer-timeout, not to the benchmark's "
        "goals (the test suite's run: timing goals live in benchmarks); nothing else relaxed",
    )
    parser.add_argument(
        "--sabotage",
        choices=sorted(SABOTAGE),
        default="",
        help="run a deliberately broken build (to see the checks fail)",
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="keep logs and ledger.json here")
    args = parser.parse_args(argv)
    base = SHORT if args.short else FULL
    plan = Plan(
        **{
            **asdict(base),
            **{k: v for k, v in (("calls", args.calls), ("period", args.period)) if v},
        }
    )

    with contextlib.ExitStack() as stack:
        if args.log_dir is None:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openrtc-chaos-")))
        else:
            logs = args.log_dir
            logs.mkdir(parents=True, exist_ok=True)
        # The callers' SDK (the livekit logger) reports every reconnect: to a file.
        logging.basicConfig(
            filename=logs / "harness.log",
            level=logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        harness = Harness(args, plan, logs)
        started = time.monotonic()
        # SIGTERM (a CI timeout; the livekit SDK's own, on an FFI panic) must
        # still stop every server and service this run started.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            asyncio.run(harness.run())
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; stopping everything", file=sys.stderr)
            return 130
        finally:
            harness.shutdown()
        run = harness.facts()
        ledger = build_ledger(run)
        write_json(harness, ledger)
        ok = report(harness, run, ledger, time.monotonic() - started)
        if args.log_dir is not None:
            print(f"logs and ledger.json in {logs}", file=sys.stderr)
    if args.check and not ok:
        print("FAIL: a guarantee is broken (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The chaos ledger: hundreds of real calls through faults, every call accounted for.

Run from the repository root::

    .venv/bin/python bench/chaos.py                 # 300 calls over 8 minutes (~12 min)
    .venv/bin/python bench/chaos.py --short         # 50 calls over 80 s (~4 min)
    .venv/bin/python bench/chaos.py --topology sentinel   # Redis as a Sentinel pair
    .venv/bin/python bench/chaos.py --check         # exit 1 unless the guarantees hold
    .venv/bin/python bench/chaos.py --short --seed 3 --log-dir /tmp/chaos

One real ``livekit-server`` and one ``redis-server`` on loopback
(``openrtc.devtools.devstack``; Redis starts with ``appendonly yes``; the
services reach it through a delay proxy in a process of its own,
``chaos_proxy.py``), or with ``--topology sentinel`` a primary, a replica and
three Sentinels (``devstack.RedisSentinels``), two agents
(``examples/offline_agents``: dental, restaurant), two dispatchers
(automatic dispatch) and four workers, each its own ``python -m openrtc``
process in its own process group: dental in coroutine and in process
isolation, restaurant in two coroutine workers, one of which
(``SKEWED_SLOT``, and each of its replacements) runs with its clock
``chaos_talk.SKEW`` (8) seconds behind (libfaketime preloaded). The workers reach LiveKit
through a loopback TCP proxy (``openrtc.devtools.devstack.DelayProxy``) that can hold back the
server API's requests (``POST /twirp/...``) while signalling passes untouched.

Each call: this process creates a room named ``<agent>-c<n>-<hex>`` whose
metadata names the agent, joins it as a caller (``rtc.Room``, subscribed:
an agent plays nothing to an unsubscribed room), waits up to
``--answer-timeout`` for an agent and holds a conversation with it
(``chaos_talk``: after the greeting, three things typed, each repeated until
the agent notes it; at the end of the planned duration "What did I say
first?"), then hangs up and deletes the room. At most ``--concurrency``
calls are up at once; the start times, agents, durations and every fault's
target come from ``--seed``.

Faults, at fixed fractions of the calling period (printed with their times):
SIGKILL of a random worker's process group (a replacement starts a second
later; a kill waits, up to a minute, until every worker is up: a second kill
while a replacement still starts would leave an agent with no worker; kills
run beside the other faults, which keep their times), garbage entries XADDed
to both job streams, a slow LiveKit API (the proxy delays each request by
``--slow-delay`` s for a while), Redis restarted with its AOF (same port,
same directory), a dispatcher restarted (SIGTERM, SIGKILL after 15 s), Redis
restarted without persistence (directory wiped, no AOF from then on), and
the LiveKit server restarted on the same ports. Raised (issue 17): two
rolling deploys (each worker in turn: a replacement started and registered,
then SIGTERM to the old one's main process, which hands its calls over to
peers and exits; each SIGTERM is a ``sigterm`` fault of its own), Redis
restarted from an RDB snapshot (``SAVE``, ``--rdb-lag`` s of traffic, SIGKILL,
the AOF removed: the server loads ``dump.rdb``, reads and acks since the
snapshot forgotten), ``CLIENT KILL`` of a busy worker's liveness connection
(its crash-detection subscription, found by client name in ``CLIENT LIST``),
a slow Redis (every reply to the services held ``--slow-redis-delay`` s for
a while). On the Sentinel topology the three Redis restarts and the slow
Redis give way to two failovers (the primary SIGKILLed, the replica
promoted, the old primary started again). A worker or dispatcher that
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
entries not dead-lettered, 0 fault steps that raised (a deploy's SIGTERMed
worker that exits other than 0 too); and raised: 0 calls whose conversation
was lost (the answer does not name the first thing said), 0 calls that
heard the greeting other than once, 0 jobs with two live entries in one
sample of the job streams (read whole every second), and evidence that each
new fault acted: conversations were checked, the streams sampled, the RDB
restart restored job entries, a deploy handed a running call over, the
skewed worker served calls. ``--sabotage`` runs a deliberately broken build
(reconciler off, crash detection off, checkpoints off, agents that greet on
every takeover, duplicated job entries) to see the checks fail.
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
import shutil
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
    ServerSpan,
    build_ledger,
    guarantees,
    server_spans,
)
from chaos_proxy import RedisProxy  # noqa: E402
from chaos_talk import (  # noqa: E402
    GREETINGS,
    SABOTAGE_AGENTS,
    SKEW,
    Talk,
    count_greetings,
    faketime_env,
    things_to_say,
)
from livekit import api, rtc  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from openrtc.devtools.devstack import (  # noqa: E402
    API_REQUEST,
    DelayProxy,
    LiveKitServer,
    RedisSentinels,
    RedisServer,
    delay_proxy,
)
from openrtc.errors import ConfigError  # noqa: E402
from openrtc.store.streams import connect_redis  # noqa: E402
from openrtc.wire.keys import WORKERS_GROUP, Keys  # noqa: E402
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
#: The worker slot whose clock is SKEW seconds behind (libfaketime), replacements too.
SKEWED_SLOT: Final = "w4-restaurant-coroutine"
#: A worker's drain timeout: a deploy's SIGTERM hands its calls over within it.
DRAIN_TIMEOUT: Final = 20.0
#: How long a caller waits for each reply before it says its line again, and
#: how long in all for the answer to "what did I say first?".
#: Generous: a repeat the agent did hear queues one more reply before the next
#: line (a loaded run at load 25-30 saw replies 10-20 s late, and repeats
#: every 8 s pushed the answer to the question past the caller's wait).
REPLY_WAIT: Final = 20.0
ASK_WAIT: Final = 60.0
#: Longest a kill waits for every worker to be up (see ``Harness.fault``).
KILL_WAIT: Final = 60.0
#: ``--sabotage``: a deliberately broken build (settings every service reads),
#: to show each check of the ledger failing.
SABOTAGE: Final[dict[str, dict[str, str]]] = {
    "reconciler-off": {"OPENRTC_RECONCILE_INTERVAL": "0"},
    "crash-detection-off": {"OPENRTC_CRASH_DETECTION": "false"},
    # A takeover resumes with no history (the conversation-kept check).
    "checkpoint-off": {"OPENRTC_CHECKPOINT_MAX_BYTES": "0"},
    # Agents that greet again when they resume (``chaos_talk.SABOTAGE_AGENTS``).
    "greeting-on-takeover": {},
    # The harness XADDs a copy of some live job entries (a broken write-back).
    "duplicate-entry": {},
}
LOG_TIME: Final = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
UNAVAILABLE: Final = re.compile(
    r"job (\S+) \(room (\S+)\) for agent '[^']*' answered unavailable: (.*)"
)
#: The worker's INFO line once its agent is in the room (openrtc/worker/worker.py);
#: e2e's JOINED_LINE, but a worker whose clock is behind logs a negative wait.
JOINED_LINE: Final = re.compile(
    r"job (?P<job>\S+): agent '[^']*' joined room (?P<room>\S+) as \S+ "
    r"\((?P<ms>-?\d+) ms after enqueue\)"
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
    #: The worker slots each rolling deploy goes through, in order.
    deploy_slots: tuple[str, ...] = tuple(w[0] for w in WORKERS)
    #: Rolling deploys (SIGTERM of every worker in turn, a replacement first).
    rolls: int = 2
    #: CLIENT KILLs of a busy worker's liveness connection.
    liveness_kills: int = 2
    #: The raised ledger (issue 17): deploys, the snapshot restart, a slow
    #: Redis, a skewed clock, liveness kills, and the conversation checks.
    #: ``--classic`` turns it off.
    raised: bool = True


SHORT: Final = Plan(
    calls=50,
    period=80,
    concurrency=12,
    min_duration=12,
    max_duration=22,
    kills=3,
    slow_for=10,
    rolls=1,
    # A small deploy: the process-isolation worker and a restaurant one.
    deploy_slots=("w2-dental-process", "w3-restaurant-coroutine"),
    liveness_kills=1,
)
FULL: Final = Plan(
    calls=300,
    period=480,
    concurrency=20,
    min_duration=12,
    max_duration=30,
    kills=10,
    slow_for=30,
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
        self.sentinel = args.topology == "sentinel"
        self.redis_server = RedisServer(log_path=logs / "redis.log", appendonly=True)
        self.sentinels = RedisSentinels(log_dir=logs) if self.sentinel else None
        self.livekit = LiveKitServer(log_path=logs / "livekit.log")
        self.proxy: DelayProxy | None = None
        #: In front of Redis for every service (single topology): slowed for a window.
        self.redis_proxy: RedisProxy | None = None
        self.agents_dir = AGENTS_DIR
        #: One change of a worker slot at a time (a kill, a deploy's step).
        self.slot_locks = {slot: asyncio.Lock() for slot, *_ in WORKERS}
        #: Job-stream samples that held a job twice, and how many were taken.
        self.entry_samples: list[tuple[float, str, list[tuple[str, str]]]] = []
        self.entry_samples_taken = 0
        self.rdb_restored = -1
        #: Workers a deploy replaced and SIGTERMed, until they are gone
        #: (stopped on shutdown too: a run cut short leaves no orphan).
        self.draining: dict[str, ServiceProcess] = {}
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
        env = service_env(livekit_url, self.livekit, self.service_redis_url, NAMESPACE)
        # A deliberately broken build, to show the ledger catches it.
        env.update(SABOTAGE.get(self.args.sabotage, {}))
        return env

    @property
    def redis_url(self) -> str:
        """Redis as the harness reaches it (directly)."""
        return self.sentinels.url if self.sentinels is not None else self.redis_server.url

    @property
    def service_redis_url(self) -> str:
        """Redis as services reach it: through the delay proxy on a single server."""
        if self.redis_proxy is not None:
            return self.redis_proxy.redis_url
        return self.redis_url

    def argv(self, slot: str) -> tuple[list[str], str]:
        python = [sys.executable, "-m", "openrtc"]
        agents_dir = ["--agents-dir", str(self.agents_dir)]
        if slot in DISPATCHERS:
            return [*python, "dispatcher", *agents_dir], self.livekit.url
        assert self.proxy is not None
        for name, agent, isolation, concurrency in WORKERS:
            if name == slot:
                argv = [*python, "worker", "--agent", agent, *agents_dir]
                argv += ["--isolation", isolation, "--concurrency", str(concurrency)]
                argv += ["--drain-timeout", f"{DRAIN_TIMEOUT:g}"]
                return argv, self.proxy.url
        raise KeyError(slot)

    def spawn(self, slot: str) -> None:
        self.incarnations[slot] += 1
        name = f"{slot}.{self.incarnations[slot]}"
        argv, url = self.argv(slot)
        path = self.logs / f"{name}.log"
        env = self.env(url)
        if slot == SKEWED_SLOT and self.plan.raised:
            env.update(faketime_env(f"-{SKEW:g}s"))
        child = ServiceProcess(name, argv, env, path)
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

    async def wait_ready(self, redis: Redis, limit: float = 240) -> None:
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
        talk = Talk(room)
        talk.attach()
        try:
            # Not cancelled from here: a connect cancelled after the SDK's
            # connect callback leaves its FFI waiting for a "ready" that never
            # comes, and it panics and SIGTERMs this process (a loaded run
            # died so). The SDK's own timeouts and retries bound it.
            await room.connect(
                self.livekit.url,
                caller_token(self.livekit, rec.room, f"caller-{rec.n}"),
                # Subscribed: an agent's audio output waits for a subscriber
                # before it plays, and its transcript (the conversation)
                # follows the playout.
                rtc.RoomOptions(auto_subscribe=True),
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
                await self.converse(rec, talk, lost)
        finally:
            rec.hung_up_at = time.time()
            rec.lines = list(talk.lines)
            rec.greetings = count_greetings(rec.lines, rec.agent)
            await talk.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(room.disconnect(), 10)

    async def converse(self, rec: CallRecord, talk: Talk, lost: asyncio.Event) -> None:
        """The call's conversation: after the greeting, three things said (each until
        the agent notes it), then at the planned end "what did I say first?".

        The call lasts its planned duration, or as long as the conversation
        takes; a caller the server disconnected stops at once.
        """
        until = time.monotonic() + rec.duration

        async def talk_through() -> None:
            # Typing interrupts the agent: let it finish its greeting first.
            await talk.wait_line(lambda line: line == GREETINGS[rec.agent], 0.0, 30.0)
            for thing in things_to_say(rec.n):
                rec.said.append(thing)
                if await talk.tell(thing, reply_wait=REPLY_WAIT):
                    rec.noted.append(thing)
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            rec.asked_at = time.time()
            rec.answer = await talk.ask_first(reply_wait=REPLY_WAIT, within=ASK_WAIT)

        async with asyncio.TaskGroup() as tg:
            talking = tg.create_task(talk_through())
            dropped = tg.create_task(lost.wait())
            talking.add_done_callback(lambda _: dropped.cancel())
            dropped.add_done_callback(lambda _: talking.cancel())

    # -- faults -------------------------------------------------------------------

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the start, fault) for this run; kills at seeded random times."""
        p = self.plan.period
        fixed = [
            (0.15, "garbage"),
            (0.22, "slow-api"),
            (0.50, "dispatcher"),
            (0.82, "livekit"),
        ]
        if self.sentinel:
            # Redis is the Sentinels' pair: its primary killed twice (there and back).
            fixed += [(0.42, "sentinel-failover"), (0.64, "sentinel-failover")]
        else:
            fixed += [(0.42, "redis-aof"), (0.66, "redis-no-persistence")]
            if self.plan.raised:
                fixed += [(0.32, "slow-redis"), (0.56, "redis-rdb")]
        if self.args.sabotage == "duplicate-entry":
            fixed.append((0.28, "duplicate-entry"))
        kills = sorted(self.rng.uniform(0.08, 0.95) for _ in range(self.plan.kills))
        plan = [(f * p, kind) for f, kind in fixed] + [(f * p, "kill") for f in kills]
        # Liveness kills at seeded times; deploys start at fixed fractions
        # (each rolls through every worker, one at a time).
        plan += [
            (self.rng.uniform(0.1, 0.9) * p, "liveness-kill")
            for _ in range(self.plan.liveness_kills)
        ]
        plan += [(f * p, "deploy") for f in (0.2, 0.55)[: self.plan.rolls]]
        return sorted(plan)

    async def run_faults(self, redis: Redis) -> None:
        """The kills in one sequence, every other fault in another.

        A kill may wait for a replacement to come up; the other faults keep
        their times meanwhile.
        """
        plan = self.schedule()
        own = ("kill", "deploy", "liveness-kill")
        async with asyncio.TaskGroup() as tg:
            for kind in own:
                tg.create_task(self._run_faults([f for f in plan if f[1] == kind], redis))
            tg.create_task(self._run_faults([f for f in plan if f[1] not in own], redis))

    async def _run_faults(self, plan: list[tuple[float, str]], redis: Redis) -> None:
        for offset, kind in plan:
            await asyncio.sleep(max(0.0, self.t0 + offset - time.time()))
            if kind == "deploy":
                await self.deploy(redis)
                continue
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
            async with self.slot_locks[slot]:
                fault.jobs = await self.held_jobs(redis, slot)
                fault.at = time.time()
                fault.target = self.kill(slot)
                fault.detail = "SIGKILL to its process group; replacement in 1s" + (
                    f" (held {waited:.1f}s until every worker was up)" if waited >= 0.5 else ""
                )
                await asyncio.sleep(1.0)
                self.spawn(slot)
        elif fault.kind == "liveness-kill":
            await self.kill_liveness(fault, redis)
        elif fault.kind == "slow-redis":
            assert self.redis_proxy is not None
            self.redis_proxy.delay(self.args.slow_redis_delay)
            await asyncio.sleep(self.plan.slow_for)
            self.redis_proxy.delay(0.0)
            fault.target = "redis (through the proxy)"
            fault.detail = (
                f"every Redis reply to the services delayed {self.args.slow_redis_delay:g}s "
                f"for {self.plan.slow_for:g}s"
            )
        elif fault.kind == "redis-rdb":
            await self.restart_from_snapshot(fault, redis)
        elif fault.kind == "sentinel-failover":
            await self.failover(fault)
        elif fault.kind == "duplicate-entry":
            fault.detail = await self.duplicate_entries(redis)
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

    async def deploy(self, redis: Redis) -> None:
        """A rolling deploy: each worker in turn gets a replacement, then SIGTERM.

        As an orchestrator does it: the new process first, registered, then
        SIGTERM to the old one's main process only (it drains: its calls are
        handed over to peers at a turn boundary), SIGKILL to what is left of
        its group once it exited or after its drain timeout and 20 s. Each
        SIGTERM is a fault of its own (kind ``sigterm``), explaining a gap
        only in the calls of that worker.
        """
        for slot in self.plan.deploy_slots:
            async with self.slot_locks[slot]:
                # A replacement after a kill may still be importing: SIGTERM
                # then kills it by Python's default action (-15) before it has
                # a call to hand over. A deploy rolls a running release.
                await self.slot_up(redis, slot, limit=KILL_WAIT)
                old = self.children[slot]
                self.draining[old.name] = old
                self.spawn(slot)
                up = await self.slot_up(redis, slot, limit=KILL_WAIT)
                assert old.proc is not None
                proc = old.proc
                fault = Fault(time.time(), "sigterm", old.name)
                self.faults.append(fault)
                try:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)
                    started = time.monotonic()
                    code = await asyncio.to_thread(self._wait_exit, proc, DRAIN_TIMEOUT + 20)
                    fault.end = time.time()
                    await asyncio.to_thread(old.stop, 0)
                    fault.detail = (
                        f"deploy: {self.children[slot].name} "
                        + ("up" if up else "NOT registered within 60s")
                        + f" first; SIGTERM, exited after {time.monotonic() - started:.1f}s"
                        + (f" with code {code}" if code is not None else " (SIGKILLed: no exit)")
                    )
                    if code != 0:
                        fault.error = f"the SIGTERMed worker exited with code {code}"
                except Exception as exc:
                    fault.error = f"{type(exc).__name__}: {exc}"[:300]
                fault.end = fault.end or time.time()
                self.draining.pop(old.name, None)
                self.note(fault)

    @staticmethod
    def _wait_exit(proc: Any, limit: float) -> int | None:
        try:
            return int(proc.wait(limit))
        except Exception:
            return None

    async def slot_up(self, redis: Redis, slot: str, limit: float) -> bool:
        """Wait (at most ``limit`` s) until the slot's current process is registered."""
        agent = next(a for s, a, _, _ in WORKERS if s == slot)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            child = self.children[slot]
            with contextlib.suppress(Exception):
                if await self.worker_id(redis, agent, child.pid):
                    return True
            await asyncio.sleep(0.5)
        return False

    async def held_jobs(self, redis: Redis, slot: str) -> list[str]:
        """The jobs the slot's worker holds now (its pending entries), best effort."""
        agent = next(a for s, a, _, _ in WORKERS if s == slot)
        with contextlib.suppress(Exception):
            wid = await self.worker_id(redis, agent, self.children[slot].pid)
            if not wid:
                return []
            stream = KEYS.jobs(agent)
            rows: Any = await redis.xpending_range(
                stream, WORKERS_GROUP, "-", "+", 1000, consumername=wid
            )
            jobs = []
            for row in rows:
                for _id, fields in await redis.xrange(stream, row["message_id"], row["message_id"]):
                    if job := fields.get(b"job_id"):
                        jobs.append(job.decode())
            return jobs
        return []

    async def worker_id(self, redis: Redis, agent: str, pid: int) -> str:
        """The worker id whose record names process ``pid``, or ""."""
        members: Any = await redis.zrange(KEYS.workers(agent), 0, -1)
        for member in members:
            record: Any = await redis.hgetall(KEYS.worker(member.decode()))
            if record.get(b"pid") == str(pid).encode():
                return str(member.decode())
        return ""

    async def kill_liveness(self, fault: Fault, redis: Redis) -> None:
        """CLIENT KILL of a busy worker's liveness connection (its crash-detection
        subscription): the worker lives, so none of its calls may be taken from it."""
        choices = await self.busy_workers(redis) or [w[0] for w in WORKERS]
        slot = self.rng.choice(choices)
        async with self.slot_locks[slot]:
            child = self.children[slot]
            agent = next(a for s, a, _, _ in WORKERS if s == slot)
            wid = await self.worker_id(redis, agent, child.pid)
            fault.target = child.name
            raw: Any = await redis.execute_command("CLIENT", "LIST")  # type: ignore[no-untyped-call]
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            killed = []
            for line in text.splitlines():
                info = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                subscribed = int(info.get("sub", 0)) + int(info.get("ssub", 0)) > 0
                if wid and info.get("name") == f"openrtc:{wid}" and subscribed:
                    await redis.execute_command("CLIENT", "KILL", "ID", info["id"])  # type: ignore[no-untyped-call]
                    killed.append(info["id"])
            if not killed:
                raise RuntimeError(f"no liveness connection of {child.name} ({wid or 'no id'})")
            fault.detail = f"CLIENT KILL ID {', '.join(killed)} (its liveness subscription)"

    async def restart_from_snapshot(self, fault: Fault, redis: Redis) -> None:
        """Redis restarted from an RDB snapshot taken seconds before (Debian's default
        persistence): what happened since, reads and acks included, is gone."""
        fault.target = "redis (RDB snapshot)"
        await redis.execute_command("SAVE")  # type: ignore[no-untyped-call]
        snapped = await self.snapshot(redis)
        await asyncio.sleep(self.args.rdb_lag)
        await asyncio.to_thread(self.redis_server.kill)
        data = self.redis_server.data_dir
        assert data is not None
        shutil.rmtree(data / "appendonlydir", ignore_errors=True)
        # No AOF from now on: the server loads dump.rdb, as Debian's would.
        self.redis_server.appendonly = False
        await asyncio.sleep(self.args.redis_down)
        await asyncio.to_thread(self.redis_server.start)
        after = await self.snapshot(redis)
        self.rdb_restored = len(set(snapped) & set(after))
        fault.detail = (
            f"SAVE, {self.args.rdb_lag:g}s of traffic, SIGKILL, down {self.args.redis_down:g}s, "
            f"restarted from dump.rdb: {len(snapped)} job entries in the snapshot, "
            f"{self.rdb_restored} restored"
        )

    async def failover(self, fault: Fault) -> None:
        """SIGKILL the Sentinels' primary; wait until they promote the replica; start
        the old primary again (the Sentinels make it a replica of the new one)."""
        sentinels = self.sentinels
        assert sentinels is not None
        port = await asyncio.to_thread(sentinels.primary_port)
        victim = next(
            s for s in (sentinels.primary, sentinels.replica) if s is not None and s.port == port
        )
        fault.target = f"redis primary :{port}"
        await asyncio.to_thread(victim.kill)
        deadline = time.monotonic() + 60
        new = port
        while new == port and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):
                new = await asyncio.to_thread(sentinels.primary_port)
        promoted = time.time()
        await asyncio.to_thread(victim.start)
        if new == port:
            raise RuntimeError("the Sentinels promoted no replica within 60s")
        fault.detail = (
            f"SIGKILL; :{new} promoted {promoted - fault.at:.1f}s later; old primary restarted"
        )

    async def duplicate_entries(self, redis: Redis) -> str:
        """``--sabotage duplicate-entry``: a copy of some live job entries (a broken
        write-back would leave one), to see the entries check catch it."""
        copies = 0
        for agent in AGENTS:
            entries: Any = await redis.xrange(KEYS.jobs(agent), "-", "+", count=3)
            for entry_id, fields in entries:
                if f"{KEYS.jobs(agent)} {entry_id.decode()}" in self.garbage:
                    continue
                await redis.xadd(KEYS.jobs(agent), fields)
                copies += 1
        return f"SABOTAGE: {copies} live job entries XADDed a second time"

    async def sample_entries(self, redis: Redis) -> None:
        """Every job entry in the streams, every second: a job must never have two."""
        while True:
            await asyncio.sleep(1.0)
            for agent in AGENTS:
                stream = KEYS.jobs(agent)
                try:
                    entries: Any = await redis.xrange(stream, "-", "+", count=2000)
                except Exception:
                    continue  # Redis is down: next round
                self.entry_samples_taken += 1
                seen: list[tuple[str, str]] = []
                for entry_id, raw in entries:
                    eid = entry_id.decode()
                    if f"{stream} {eid}" in self.garbage:
                        continue
                    job = raw.get(b"job_id", b"").decode(errors="replace")
                    if job:
                        seen.append((eid, job))
                jobs = [job for _, job in seen]
                if len(jobs) != len(set(jobs)):
                    self.entry_samples.append((time.time(), stream, seen))

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
                eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                self.garbage[f"{stream} {eid}"] = stream
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
        if self.args.sabotage == "greeting-on-takeover":
            self.agents_dir = self.logs / "sabotaged-agents"
            self.agents_dir.mkdir(exist_ok=True)
            for name, source in SABOTAGE_AGENTS.items():
                (self.agents_dir / f"{name}.py").write_text(source)
        if self.sentinels is not None:
            await asyncio.to_thread(self.sentinels.start)
        else:
            self.redis_server.start()
        self.livekit.start()
        self.livekit_up.set()
        async with contextlib.AsyncExitStack() as stack:
            self.proxy = await stack.enter_async_context(
                delay_proxy(self.livekit.port, request_prefix=API_REQUEST)
            )
            if self.sentinels is None:
                self.redis_proxy = RedisProxy(self.redis_server.port, self.logs / "redis-proxy.log")
                stack.callback(self.redis_proxy.close)
            await self._run()

    async def _run(self) -> None:
        redis = connect_redis(self.redis_url)
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
                        tg.create_task(self.sample_entries(redis)),
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

    def server_spans(self) -> dict[str, ServerSpan]:
        """Every participant's span as the LiveKit server logged it (both its lives)."""
        log = self.livekit.log_path
        if log is None or not log.exists():
            return {}
        with log.open(errors="replace") as lines:
            return server_spans(lines)

    def facts(self) -> RunFacts:
        """What this run saw, for the ledger (``chaos_ledger``, pure)."""
        return RunFacts(
            calls=self.calls,
            faults=self.faults,
            self_exits=self.self_exits,
            dead=self.dead,
            accepted=self.accepted,
            joins=worker_joins(self.process_logs, {SKEWED_SLOT: SKEW} if self.plan.raised else {}),
            refused=refusals(self.process_logs),
            garbage=self.garbage_state,
            garbage_injected=len(self.garbage),
            aof_checked=self.aof_checked,
            aof_lost=self.aof_lost,
            raised=self.plan.raised,
            entry_samples=self.entry_samples,
            entry_samples_taken=self.entry_samples_taken,
            rdb_restored=self.rdb_restored,
            skewed_slot=SKEWED_SLOT if self.plan.raised else "",
            server_spans=self.server_spans(),
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
        for child in [*self.children.values(), *self.draining.values()]:
            child.stop(grace=10)
        self.livekit.close()
        self.redis_server.close()
        if self.sentinels is not None:
            self.sentinels.close()


# --- the ledger ----------------------------------------------------------------


def worker_joins(
    process_logs: dict[str, Path], behind: dict[str, float] | None = None
) -> dict[str, list[Join]]:
    """Room -> every agent join a worker logged for it, in time order.

    ``behind``: slot -> seconds its clock is behind (its log times are moved on by that).
    """
    joins: dict[str, list[Join]] = {}
    for name, path in process_logs.items():
        if not name.startswith("w"):
            continue
        skew = (behind or {}).get(name.rsplit(".", 1)[0], 0.0)
        for line in path.read_text(errors="replace").splitlines():
            m = JOINED_LINE.search(line)
            t = log_time(line)
            if m and t is not None:
                joins.setdefault(m["room"], []).append(Join(t + skew, m["job"], name))
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
    print(
        f"chaos ledger: {len(h.calls)} calls, seed {h.args.seed}, {wall:.0f}s wall, "
        f"topology {h.args.topology}"
    )
    redis_desc = "Redis Sentinel pair" if h.sentinel else "redis-server (behind a delay proxy)"
    print(
        f"  livekit-server + {redis_desc} on loopback; dispatchers {', '.join(DISPATCHERS)}; "
        + "; ".join(f"{w} ({a}, {i}, {c} slots)" for w, a, i, c in WORKERS)
        + (f"; {SKEWED_SLOT}'s clock {SKEW:g}s behind (libfaketime)" if h.plan.raised else "")
        + ("" if h.plan.raised else "; CLASSIC: no deploys, snapshot, slow Redis, skew")
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
    print(
        f"conversations: {ledger.conversations_checked} calls asked what they said first"
        f" ({len(ledger.forgot)} forgot), "
        f"{len(ledger.greeted_again)} heard the greeting other than once; "
        f"{ledger.conversations_restarted} restarted with a new job by the LiveKit restart, "
        f"{ledger.greetings_cut} greeted while LiveKit was restarting (not heard)"
    )
    print(
        f"deploys: {sum(1 for f in h.faults if f.kind == 'sigterm')} SIGTERMs, "
        f"{ledger.handed_over} calls handed over by one; job streams sampled "
        f"{run.entry_samples_taken} times, {len(ledger.doubled_jobs)} jobs seen twice"
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
        ("conversation lost", ledger.forgot),
        ("greeting heard other than once", ledger.greeted_again),
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
            for at, said in rec.lines[:12]:
                print(f"    agent said at {at - h.t0:.1f}s: {said[:100]}")
            for line in grep_logs(h.process_logs, [rec.room, *rec.job_ids]):
                print(f"    {line}")
        if len(recs) > h.args.evidence:
            print(f"  ... {len(recs) - h.args.evidence} more in {h.logs / 'ledger.json'}")
    for job, where in list(ledger.doubled_jobs.items())[: h.args.evidence]:
        print(f"\njob {job} had two live entries: {where}")
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
    parser.add_argument(
        "--topology",
        choices=("single", "sentinel"),
        default="single",
        help="one Redis server (restarts with AOF, from an RDB snapshot, without persistence; "
        "slowed through a proxy), or a Sentinel pair whose primary is killed twice",
    )
    parser.add_argument(
        "--slow-redis-delay",
        type=float,
        default=0.2,
        help="seconds each Redis reply to the services is held in the slow-Redis window",
    )
    parser.add_argument(
        "--rdb-lag",
        type=float,
        default=3.0,
        help="seconds of traffic between the RDB snapshot and the Redis SIGKILL",
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
    parser.add_argument(
        "--classic",
        action="store_true",
        help="the ledger before the raised one: no deploys, snapshot restart, slow Redis, "
        "skewed clock or liveness kill, no conversation checks (the suite's run until the "
        "raised short run holds)",
    )
    args = parser.parse_args(argv)
    base = SHORT if args.short else FULL
    plan = Plan(
        **{
            **asdict(base),
            **{k: v for k, v in (("calls", args.calls), ("period", args.period)) if v},
            **({"raised": False, "rolls": 0, "liveness_kills": 0} if args.classic else {}),
        }
    )

    with contextlib.ExitStack() as stack:
        if args.log_dir is None:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openrtc-chaos-")))
        else:
            logs = args.log_dir
            logs.mkdir(parents=True, exist_ok=True)
            # Process logs are opened to append, and the ledger reads them
            # (who joined which room): a previous run's lines, with the same
            # seeded room names, would be taken for this run's.
            for old in [*logs.glob("*.log"), logs / "ledger.json"]:
                old.unlink(missing_ok=True)
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

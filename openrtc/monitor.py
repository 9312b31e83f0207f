"""What operators read: stream backlog, live workers and dispatchers, dead letters.

Everything here is read from Redis, which holds all shared state; nothing
needs a running dispatcher. Used by ``openrtc status`` and ``openrtc dlq``.
Dead letters are shown with credentials redacted (a job entry carries none,
but an entry is user input and is treated as such).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from google.protobuf.json_format import MessageToDict
from livekit.protocol.agent import Job
from redis.asyncio import Redis

from openrtc.keys import WORKERS_GROUP, Keys
from openrtc.membership import live_members
from openrtc.messages import replay_entry
from openrtc.settings import DEFAULT_DEDUP_TTL
from openrtc.streams import StreamStore

__all__ = [
    "AgentStatus",
    "DeadLetter",
    "Replay",
    "StackStatus",
    "list_dead_letters",
    "purge_dead_letters",
    "read_status",
    "replay_dead_letters",
]

_SECRET_MARKERS: Final = ("token", "secret", "password", "turn_password")


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _float(value: Any) -> float:
    # Records and dead letters are read as they are: garbage reads as 0.
    try:
        number = float(_s(value))
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def _int(value: Any) -> int:
    try:
        return int(_s(value) or 0)
    except ValueError:
        return 0


def redact(value: Any, key: str = "") -> Any:
    """``value`` with anything that looks like a credential replaced by ``***``."""
    if any(marker in key.lower() for marker in _SECRET_MARKERS):
        return "***" if value else value
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return value


@dataclass
class WorkerInfo:
    """One live worker."""

    id: str
    capacity: int
    running: int
    isolation: str
    host: str
    pid: str
    heartbeat_age: float
    draining: bool


@dataclass
class AgentStatus:
    """One agent's stream and workers."""

    agent: str
    stream: str
    length: int = 0
    backlog: int = 0
    pending: int = 0
    oldest_waiting_age: float | None = None
    consumers: int = 0
    workers: list[WorkerInfo] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.workers)

    @property
    def running(self) -> int:
        return sum(w.running for w in self.workers)


@dataclass
class DispatcherInfo:
    """One live dispatcher."""

    id: str
    livekit_worker_id: str
    agent_name: str
    agents: str
    held_jobs: int
    host: str
    heartbeat_age: float
    draining: bool


@dataclass
class StackStatus:
    """Everything ``openrtc status`` shows."""

    namespace: str
    agents: list[AgentStatus]
    dispatchers: list[DispatcherInfo]
    dead_letters: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, with the derived totals included."""
        data = asdict(self)
        for agent, raw in zip(self.agents, data["agents"], strict=True):
            raw["capacity"] = agent.capacity
            raw["running"] = agent.running
        return data


async def read_status(redis: Redis, keys: Keys, agents: Iterable[str] = ()) -> StackStatus:
    """Read the whole picture: every agent that has a stream, plus ``agents``."""
    now = time.time()
    known = {_s(a) for a in await redis.smembers(keys.agents)}
    names = list(dict.fromkeys([*agents, *sorted(known)]))
    statuses = []
    for name in names:
        status = AgentStatus(agent=name, stream=keys.jobs(name))
        pipe = redis.pipeline(transaction=False)
        pipe.xlen(status.stream)
        pipe.xinfo_groups(status.stream)
        replies = await pipe.execute(raise_on_error=False)
        if not isinstance(replies[0], Exception):
            status.length = int(replies[0])
        if not isinstance(replies[1], Exception):
            for group in replies[1]:
                if _s(group.get("name")) != WORKERS_GROUP:
                    continue
                status.pending = int(group.get("pending") or 0)
                status.consumers = int(group.get("consumers") or 0)
                lag = group.get("lag")
                status.backlog = (
                    int(lag) if lag is not None else max(0, status.length - status.pending)
                )
                last = _s(group.get("last-delivered-id")) or "0-0"
                waiting = await redis.xrange(status.stream, min=f"({last}", count=1)
                if waiting:
                    first_ms = int(_s(waiting[0][0]).split("-")[0])
                    status.oldest_waiting_age = max(0.0, now - first_ms / 1000)
        for worker_id in await live_members(redis, keys.workers(name)):
            raw = {_s(k): _s(v) for k, v in (await redis.hgetall(keys.worker(worker_id))).items()}
            if not raw:
                continue
            status.workers.append(
                WorkerInfo(
                    id=worker_id,
                    capacity=_int(raw.get("capacity")),
                    running=_int(raw.get("running")),
                    isolation=raw.get("isolation", ""),
                    host=raw.get("host", ""),
                    pid=raw.get("pid", ""),
                    heartbeat_age=round(now - _float(raw.get("heartbeat_at")), 1),
                    draining=raw.get("draining") == "1",
                )
            )
        statuses.append(status)
    dispatchers = []
    for dispatcher_id in await live_members(redis, keys.dispatchers):
        raw = {
            _s(k): _s(v) for k, v in (await redis.hgetall(keys.dispatcher(dispatcher_id))).items()
        }
        if not raw:
            continue
        dispatchers.append(
            DispatcherInfo(
                id=dispatcher_id,
                livekit_worker_id=raw.get("livekit_worker_id", ""),
                agent_name=raw.get("agent_name", ""),
                agents=raw.get("agents", ""),
                held_jobs=_int(raw.get("held_jobs")),
                host=raw.get("host", ""),
                heartbeat_age=round(now - _float(raw.get("heartbeat_at")), 1),
                draining=raw.get("draining") == "1",
            )
        )
    return StackStatus(
        namespace=keys.namespace,
        agents=statuses,
        dispatchers=dispatchers,
        dead_letters=int(await redis.xlen(keys.dead_letter)),
    )


@dataclass
class DeadLetter:
    """One dead-letter entry, decoded for people."""

    id: str
    reason: str
    error: str
    agent: str
    job_id: str
    room: str
    source: str
    origin: str
    dead_at: float
    fields: dict[str, Any]
    #: For ``unknown-agent``: the name the job asked for (``agent`` is empty).
    requested_agent: str = ""

    def summary(self) -> dict[str, Any]:
        """The one-line view (no payload)."""
        data = asdict(self)
        data.pop("fields")
        return data

    def detail(self) -> dict[str, Any]:
        """Everything, with the job decoded and credentials redacted."""
        data = self.summary()
        data["fields"] = redact(self.fields)
        return data


def _decode_entry(entry_id: Any, raw: Mapping[bytes, bytes]) -> DeadLetter:
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name = _s(key)
        if name == "job":
            job = Job()
            try:
                job.ParseFromString(value)
                fields["job"] = MessageToDict(job, preserving_proto_field_name=True)
            except Exception:
                fields["job"] = f"<{len(value)} bytes, not a Job>"
        else:
            fields[name] = _s(value)
    return DeadLetter(
        id=_s(entry_id),
        reason=fields.get("reason", ""),
        error=fields.get("error", ""),
        agent=fields.get("agent", ""),
        job_id=fields.get("job_id", ""),
        room=fields.get("room", ""),
        source=fields.get("source", ""),
        origin=fields.get("origin", ""),
        dead_at=_float(fields.get("dead_at")),
        fields=fields,
        requested_agent=fields.get("requested_agent", ""),
    )


async def list_dead_letters(
    redis: Redis,
    keys: Keys,
    *,
    count: int = 50,
    reason: str | None = None,
    agent: str | None = None,
    ids: Sequence[str] = (),
) -> list[DeadLetter]:
    """Newest first, optionally filtered; or exactly ``ids``."""
    entries: list[Any] = []
    if ids:
        for entry_id in ids:
            entries.extend(await redis.xrange(keys.dead_letter, min=entry_id, max=entry_id) or [])
    else:
        entries = list(await redis.xrevrange(keys.dead_letter, count=max(count * 10, count)) or [])
    letters = [_decode_entry(i, f) for i, f in entries]
    letters = [
        d
        for d in letters
        if (reason is None or d.reason == reason) and (agent is None or d.agent == agent)
    ]
    return letters if ids else letters[:count]


ReplayOutcome = Literal["replayed", "gone", "already-queued", "no-job-id"]


@dataclass(frozen=True, slots=True)
class Replay:
    """What replaying one dead letter did."""

    dead_letter: str
    outcome: ReplayOutcome
    #: The new job entry (``replayed``) or the job's live entry (``already-queued``).
    entry: str = ""
    agent: str = ""


async def replay_dead_letters(
    redis: Redis,
    keys: Keys,
    letters: Sequence[DeadLetter],
    *,
    agent: str | None = None,
    dedup_ttl: float = DEFAULT_DEDUP_TTL,
) -> list[Replay]:
    """Put dead letters back on their agent's stream (or ``agent``'s), as new jobs.

    Each letter is moved by one script that checks it still exists, deletes
    it, resets the job's record and adds the job (:func:`messages.replay_entry`:
    fresh ``enqueued_at``, accept arguments rebuilt for the agent, a new entry
    so the delivery count starts again). Concurrent replays and purges of the
    same letter therefore never enqueue a job twice nor lose a letter: whoever
    comes second finds it ``gone``.
    """
    store = StreamStore(redis, keys)
    results = []
    for letter in letters:
        target = agent or letter.agent
        raw_entries: Any = await redis.xrange(keys.dead_letter, min=letter.id, max=letter.id)
        if not raw_entries:
            results.append(Replay(letter.id, "gone"))
            continue
        raw: Mapping[bytes, bytes] = raw_entries[0][1]
        if not letter.job_id:
            results.append(Replay(letter.id, "no-job-id"))
            continue
        await store.ensure_group(target)
        fields = replay_entry(raw, agent=target, now=time.time())
        args: list[Any] = [letter.id, int(dedup_ttl), fields.get(b"dispatcher", b"")]
        for key, value in fields.items():
            args += [key, value]
        if keys.cluster:
            code, entry = await _replay_across_slots(redis, store, keys, letter, target, args)
        else:
            code, entry = await store.scripts.replay(
                keys=[keys.dead_letter, keys.job(target, letter.job_id), keys.jobs(target)],
                args=args,
            )
        outcomes: dict[int, ReplayOutcome] = {1: "replayed", 2: "already-queued"}
        outcome = outcomes.get(int(code), "gone")
        results.append(Replay(letter.id, outcome, _s(entry), target))
    return results


async def _replay_across_slots(
    redis: Redis, store: StreamStore, keys: Keys, letter: DeadLetter, target: str, args: list[Any]
) -> tuple[int, Any]:
    """Replay under Redis Cluster: the letter and the agent's keys are in different slots.

    Two single-slot steps, enqueue first: the job goes into the agent's slot
    by a script that records the letter's id on the job record, then the
    letter is deleted. A crash between them leaves the letter, and replaying
    it again finds the record naming it and only deletes the letter; two
    replays at once enqueue once (the second reports ``gone``). A purge that
    runs between the two steps deletes a letter whose job is replayed anyway.
    """
    code, entry = await store.scripts.replay_into(
        keys=[keys.job(target, letter.job_id), keys.jobs(target)], args=args
    )
    if int(code) in (1, 3):
        await redis.xdel(keys.dead_letter, letter.id)
    return int(code), entry


async def purge_dead_letters(
    redis: Redis, keys: Keys, *, ids: Sequence[str] = (), older_than: float | None = None
) -> int:
    """Delete dead letters: ``ids``, or those older than ``older_than`` seconds, or all.

    Only letters listed here are deleted, by id: one added meanwhile is kept,
    and one replayed meanwhile is not counted. Returns how many were deleted.
    """
    if ids:
        return int(await redis.xdel(keys.dead_letter, *ids))
    newest: Any = await redis.xrevrange(keys.dead_letter, count=1)
    if not newest:
        return 0
    upper = _s(newest[0][0])
    if older_than is not None:
        cutoff_ms = int((time.time() - older_than) * 1000)
        upper = min(upper, f"{cutoff_ms - 1}-{2**64 - 1}", key=_entry_order)
    deleted, start = 0, "-"
    while True:
        page: Any = await redis.xrange(keys.dead_letter, min=start, max=upper, count=500)
        if not page:
            return deleted
        page_ids = [_s(i) for i, _ in page]
        deleted += int(await redis.xdel(keys.dead_letter, *page_ids))
        start = f"({page_ids[-1]}"


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

"""What operators read: stream backlog, live workers and dispatchers, dead letters.

Everything here is read from Redis, which holds all shared state; nothing
needs a running dispatcher. Used by ``openrtc status`` and ``openrtc dlq``.
Dead letters are shown with credentials redacted (a job entry carries none,
but an entry is user input and is treated as such).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from google.protobuf.json_format import MessageToDict
from livekit.protocol.agent import Job

from openrtc.settings import DEFAULT_DEDUP_TTL
from openrtc.store.readers import PAGE, DeadLetterStream, ReportStream, StatusReader
from openrtc.store.streams import RedisClient, StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import SIGNATURE_FIELD, ForgedEntry, peek_tenant, replay_entry
from openrtc.wire.reports import REPORT_FIELD
from openrtc.wire.signing import SigningKeys, sign_job, verify_report

__all__ = [
    "TENANT_SCAN_MAX",
    "AgentStatus",
    "DeadLetter",
    "DeadLetterStats",
    "Replay",
    "StackStatus",
    "TenantCount",
    "check_status",
    "count_tenant",
    "dead_letter_stats",
    "dead_letter_tail",
    "follow_dead_letters",
    "list_dead_letters",
    "parse_since",
    "purge_dead_letters",
    "purge_plan",
    "read_status",
    "replay_dead_letters",
    "scan_dead_letters",
    "status_summary",
]

_SECRET_MARKERS: Final = ("token", "secret", "password", "turn_password")

#: ``status --tenant`` reads at most this many entries of each job stream, and
#: of the dead letters (newest first): a tenant's calls are counted from the
#: entries themselves (the tenant is a field of each), and a stream is bounded
#: by admission, not by a tenant. Past it the counts say they are partial.
TENANT_SCAN_MAX: Final = 10_000


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
    #: With ``status --tenant``: that tenant's calls read by a worker (running,
    #: or being started); the stream figures above are that tenant's too.
    tenant_running: int | None = None
    #: The workers group's last-delivered entry id (``""``: no group yet).
    last_delivered: str = ""
    #: With ``status --tenant``: the stream was longer than :data:`TENANT_SCAN_MAX`
    #: entries; the tenant's figures count the first ones only.
    partial: bool = False

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.workers)

    @property
    def running(self) -> int:
        if self.tenant_running is not None:
            return self.tenant_running
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
    #: Set by ``status --tenant``: every call figure is this tenant's.
    tenant: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, with the derived totals included."""
        data = asdict(self)
        for agent, raw in zip(self.agents, data["agents"], strict=True):
            raw["capacity"] = agent.capacity
            raw["running"] = agent.running
        return data


async def read_status(
    redis: RedisClient, keys: Keys, agents: Iterable[str] = (), *, tenant: str | None = None
) -> StackStatus:
    """Read the whole picture: every agent that has a stream, plus ``agents``.

    Ages are by Redis's clock, as the heartbeats and entry ids they are taken
    from. With ``tenant``, the calls counted (waiting, running, dead) are that
    tenant's only; workers and dispatchers are shared, and shown whole.
    """
    reader = StatusReader(redis, keys)
    now = await reader.now()
    names = list(dict.fromkeys([*agents, *sorted(await reader.known_agents())]))
    statuses = [await _agent_status(reader, keys, name, now) for name in names]
    dead_letters = await reader.dead_letter_count()
    if tenant is not None:
        for status in statuses:
            await _tenant_status(reader, status, tenant, now)
        dead_letters = await _tenant_dead_letters(reader, tenant)
    return StackStatus(
        namespace=keys.namespace,
        agents=statuses,
        dispatchers=[
            _dispatcher_info(dispatcher_id, raw, now)
            for dispatcher_id, raw in await reader.live_records(keys.dispatchers, keys.dispatcher)
        ],
        dead_letters=dead_letters,
        tenant=tenant,
    )


async def _agent_status(reader: StatusReader, keys: Keys, name: str, now: float) -> AgentStatus:
    status = AgentStatus(agent=name, stream=keys.jobs(name))
    stream = await reader.job_stream(name)
    status.length = stream.length
    if stream.group is not None:
        status.pending = stream.group.pending
        status.consumers = stream.group.consumers
        status.backlog = stream.group.backlog
        status.last_delivered = stream.group.last_delivered
    if stream.oldest_waiting_ms is not None:
        status.oldest_waiting_age = max(0.0, now - stream.oldest_waiting_ms / 1000)
    for worker_id, raw in await reader.live_records(keys.workers(name), keys.worker):
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
    return status


@dataclass
class TenantCount:
    """One tenant's entries among a job stream's (:func:`count_tenant`)."""

    #: Not read by any worker yet.
    waiting: int = 0
    #: Read by a worker: running, or being started (pending in the group).
    delivered: int = 0
    #: The id time (ms) of its oldest waiting entry.
    oldest_waiting_ms: int | None = None


def count_tenant(
    entries: Iterable[tuple[str, Mapping[bytes, bytes]]], tenant: str, last_delivered: str
) -> TenantCount:
    """Count ``tenant``'s entries, oldest first, split at the group's last-delivered id.

    A job stream holds only waiting and pending entries (workers delete what
    they acknowledge): those after ``last_delivered`` wait, the others were
    read. An entry without a tenant (an older dispatcher's) is the default
    tenant's, as workers serve it.
    """
    count = TenantCount()
    last = _entry_order(last_delivered or "0-0")
    for entry_id, fields in entries:
        if peek_tenant(fields) != tenant:
            continue
        if _entry_order(entry_id) > last:
            count.waiting += 1
            if count.oldest_waiting_ms is None:
                count.oldest_waiting_ms = _entry_order(entry_id)[0]
        else:
            count.delivered += 1
    return count


async def _tenant_status(
    reader: StatusReader, status: AgentStatus, tenant: str, now: float
) -> None:
    """Make ``status``'s call figures ``tenant``'s, from its stream's entries."""
    entries: list[tuple[str, Mapping[bytes, bytes]]] = []
    after = ""
    while len(entries) < TENANT_SCAN_MAX:
        page = await reader.job_entries(status.agent, after=after, count=PAGE)
        entries.extend(page)
        if len(page) < PAGE:
            break
        after = page[-1][0]
    status.partial = len(entries) >= TENANT_SCAN_MAX and status.length > len(entries)
    count = count_tenant(entries[:TENANT_SCAN_MAX], tenant, status.last_delivered)
    status.length = count.waiting + count.delivered
    status.backlog = count.waiting
    status.pending = count.delivered
    status.tenant_running = count.delivered
    status.oldest_waiting_age = (
        None if count.oldest_waiting_ms is None else max(0.0, now - count.oldest_waiting_ms / 1000)
    )


async def _tenant_dead_letters(reader: StatusReader, tenant: str) -> int:
    """How many of the newest :data:`TENANT_SCAN_MAX` dead letters are ``tenant``'s."""
    found = scanned = 0
    before = ""
    while scanned < TENANT_SCAN_MAX:
        page = await reader.dead_letters(before=before, count=PAGE)
        scanned += len(page)
        found += sum(1 for _, fields in page if peek_tenant(fields) == tenant)
        if len(page) < PAGE:
            break
        before = page[-1][0]
    return found


def _dispatcher_info(dispatcher_id: str, raw: Mapping[str, str], now: float) -> DispatcherInfo:
    return DispatcherInfo(
        id=dispatcher_id,
        livekit_worker_id=raw.get("livekit_worker_id", ""),
        agent_name=raw.get("agent_name", ""),
        agents=raw.get("agents", ""),
        held_jobs=_int(raw.get("held_jobs")),
        host=raw.get("host", ""),
        heartbeat_age=round(now - _float(raw.get("heartbeat_at")), 1),
        draining=raw.get("draining") == "1",
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
    #: The call's tenant (``""`` in a letter written before calls had one).
    tenant: str = ""

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
        tenant=fields.get("tenant", ""),
    )


async def list_dead_letters(
    redis: RedisClient,
    keys: Keys,
    *,
    count: int = 50,
    reason: str | None = None,
    agent: str | None = None,
    since: float | None = None,
    ids: Sequence[str] = (),
) -> list[DeadLetter]:
    """Newest first, optionally filtered (:func:`matches`, ``since`` epoch s); or exactly ``ids``.

    Pages back through the stream until ``count`` letters pass the filters or
    the stream (or ``since``) ends, so a rare reason is found behind many others.
    """
    stream = DeadLetterStream(redis, keys)
    if ids:
        letters = []
        for entry_id in ids:
            if (entry := await stream.get(entry_id)) is not None:
                letter = _decode_entry(*entry)
                if matches(letter, reason=reason, agent=agent):
                    letters.append(letter)
        return letters
    lowest = "-" if since is None else str(max(0, int(since * 1000)))
    found: list[DeadLetter] = []
    upper = "+"
    while len(found) < count:
        page = await stream.newest_first(upper=upper, lowest=lowest, count=max(count, 100))
        if not page:
            break
        for entry_id, raw in page:
            letter = _decode_entry(entry_id, raw)
            if matches(letter, reason=reason, agent=agent):
                found.append(letter)
        upper = f"({page[-1][0]}"
    return found[:count]


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
    redis: RedisClient,
    keys: Keys,
    letters: Sequence[DeadLetter],
    *,
    agent: str | None = None,
    dedup_ttl: float = DEFAULT_DEDUP_TTL,
    signing: SigningKeys | None = None,
) -> list[Replay]:
    """Put dead letters back on their agent's stream (or ``agent``'s), as new jobs.

    Each letter is moved by one script that checks it still exists, deletes
    it, resets the job's record and adds the job (:func:`messages.replay_entry`:
    fresh ``enqueued_at``, accept arguments rebuilt for the agent, a new entry
    so the delivery count starts again). Concurrent replays and purges of the
    same letter therefore never enqueue a job twice nor lose a letter: whoever
    comes second finds it ``gone``.

    With ``signing`` (the operator's key), each replayed entry is signed
    anew: the replay changed it, and replaying is the operator vouching for
    it, a ``forged`` letter included. Without, it goes unsigned (a worker that
    verifies dead-letters it again as ``forged``).
    """
    store = StreamStore(redis, keys)
    stream = DeadLetterStream(redis, keys)
    results = []
    for letter in letters:
        target = agent or letter.agent
        entry = await stream.get(letter.id)
        if entry is None:
            results.append(Replay(letter.id, "gone"))
            continue
        raw = entry[1]
        if not letter.job_id:
            results.append(Replay(letter.id, "no-job-id"))
            continue
        await store.ensure_group(target)
        fields = replay_entry(raw, agent=target, now=time.time())
        if signing is not None:
            fields = sign_job(signing, fields)
        args: list[Any] = [letter.id, int(dedup_ttl), fields.get(b"dispatcher", b"")]
        for key, value in fields.items():
            args += [key, value]
        if keys.cluster:
            code, new_id = await _replay_across_slots(stream, store, keys, letter, target, args)
        else:
            code, new_id = await store.scripts.replay(
                keys=[keys.dead_letter, keys.job(target, letter.job_id), keys.jobs(target)],
                args=args,
            )
        outcomes: dict[int, ReplayOutcome] = {1: "replayed", 2: "already-queued"}
        outcome = outcomes.get(int(code), "gone")
        results.append(Replay(letter.id, outcome, _s(new_id), target))
    return results


async def _replay_across_slots(
    stream: DeadLetterStream,
    store: StreamStore,
    keys: Keys,
    letter: DeadLetter,
    target: str,
    args: list[Any],
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
        await stream.delete(letter.id)
    return int(code), entry


async def purge_plan(
    redis: RedisClient, keys: Keys, *, ids: Sequence[str] = (), older_than: float | None = None
) -> tuple[int, str]:
    """What a purge would delete now: how many letters, and the newest entry id among them.

    ``openrtc dlq purge`` asks with this count, then deletes with
    ``upto=`` that id, so a letter that arrives while the operator reads
    the question is not deleted unseen. For ``ids`` the id is ``""``.
    """
    stream = DeadLetterStream(redis, keys)
    if ids:
        return sum([await stream.get(entry_id) is not None for entry_id in ids]), ""
    upper = await _purge_upper(stream, older_than=older_than)
    if not upper:
        return 0, ""
    count, start, last = 0, "-", ""
    while True:
        page = await stream.oldest_first(start=start, upper=upper)
        if not page:
            return count, last
        count += len(page)
        last = page[-1][0]
        start = f"({last}"


async def purge_dead_letters(
    redis: RedisClient,
    keys: Keys,
    *,
    ids: Sequence[str] = (),
    older_than: float | None = None,
    upto: str | None = None,
) -> int:
    """Delete dead letters: ``ids``, or those older than ``older_than`` seconds, or all.

    Only letters listed here are deleted, by id: one added meanwhile is kept,
    and one replayed meanwhile is not counted. ``upto``: delete none newer
    than that entry id (what :func:`purge_plan` counted). Returns how many
    were deleted.
    """
    stream = DeadLetterStream(redis, keys)
    if ids:
        return await stream.delete(*ids)
    if upto == "":
        return 0
    upper = await _purge_upper(stream, older_than=older_than, upto=upto)
    if not upper:
        return 0
    deleted, start = 0, "-"
    while True:
        page = await stream.oldest_first(start=start, upper=upper)
        if not page:
            return deleted
        page_ids = [entry_id for entry_id, _ in page]
        deleted += await stream.delete(*page_ids)
        start = f"({page_ids[-1]}"


async def _purge_upper(
    stream: DeadLetterStream, *, older_than: float | None, upto: str | None = None
) -> str:
    """The newest entry id a purge may delete (``""``: none): the newest now, or older."""
    upper = await stream.newest_id()
    if not upper:
        return ""
    if upto is not None:
        upper = min(upper, upto, key=_entry_order)
    if older_than is not None:
        # Entry ids are Redis's clock: so is the age they are judged by.
        cutoff_ms = int((await stream.now() - older_than) * 1000)
        upper = min(upper, f"{cutoff_ms - 1}-{2**64 - 1}", key=_entry_order)
    return upper


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# --------------------------------------------------------------------------- checks


def check_status(status: StackStatus, *, max_wait: float) -> list[str]:
    """What is wrong with the stack, one line per problem; empty when all is well.

    Two problems, per agent: calls waiting with no live worker to take them
    (every worker gone or draining: nobody will answer, whatever the wait),
    and a waiting call older than ``max_wait`` seconds (workers exist but do
    not keep up). A pure function of what :func:`read_status` read, so
    ``openrtc status --check`` decides the same way in tests and in cron.
    """
    problems = []
    for agent in status.agents:
        if agent.backlog <= 0:
            continue
        serving = [w for w in agent.workers if not w.draining]
        if not serving:
            what = "no live worker" if not agent.workers else "only draining workers"
            problems.append(f"agent {agent.agent}: {agent.backlog} waiting call(s) and {what}")
        age = agent.oldest_waiting_age
        if age is not None and age > max_wait:
            problems.append(
                f"agent {agent.agent}: oldest waiting call {age:.1f}s old (max {max_wait:g}s)"
            )
    return problems


def status_summary(status: StackStatus) -> str:
    """The one line ``openrtc status --check`` prints when all is well."""
    waiting = sum(a.backlog for a in status.agents)
    workers = sum(len(a.workers) for a in status.agents)
    return (
        f"OK: {len(status.agents)} agent(s), {workers} worker(s), "
        f"{len(status.dispatchers)} dispatcher(s), {waiting} waiting call(s), "
        f"{status.dead_letters} dead letter(s)"
    )


_DURATION: Final = re.compile(r"(?:(\d+(?:\.\d+)?)([smhd]))+")
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, *, now: float) -> float:
    """The epoch time ``text`` names: a duration ago (``90s``, ``10m``, ``1h30m``, ``2d``)
    or an ISO 8601 time (``2024-05-01T12:00:00+00:00``; without an offset: local time).

    Raises:
        ValueError: neither form, or a time in the future.
    """
    raw = text.strip().lower()
    if _DURATION.fullmatch(raw):
        ago = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(raw))
        return now - ago
    try:
        moment = datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30s, 10m, 2h, 1d, 1h30m) nor an ISO time"
        ) from None
    if moment > now:
        raise ValueError(f"{text!r} is in the future")
    return moment


# --------------------------------------------------------------------------- dead-letter stats


@dataclass
class DeadLetterStats:
    """Counts of dead letters by reason and by agent, and the oldest and newest."""

    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_agent: dict[str, int] = field(default_factory=dict)
    oldest: DeadLetter | None = None
    newest: DeadLetter | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready; oldest and newest as their one-line summaries."""
        return {
            "total": self.total,
            "by_reason": self.by_reason,
            "by_agent": self.by_agent,
            "oldest": self.oldest.summary() if self.oldest else None,
            "newest": self.newest.summary() if self.newest else None,
        }


def agent_label(letter: DeadLetter) -> str:
    """Whom a letter was for: its agent, or ``?name`` for a name nobody serves."""
    if letter.agent:
        return letter.agent
    return f"?{letter.requested_agent}" if letter.requested_agent else "?"


def dead_letter_stats(letters: Iterable[DeadLetter]) -> DeadLetterStats:
    """Count ``letters`` (in stream order, oldest first) by reason and agent; most first."""
    stats = DeadLetterStats()
    reasons: Counter[str] = Counter()
    agents: Counter[str] = Counter()
    for letter in letters:
        stats.total += 1
        reasons[letter.reason or "?"] += 1
        agents[agent_label(letter)] += 1
        if stats.oldest is None:
            stats.oldest = letter
        stats.newest = letter
    stats.by_reason = dict(reasons.most_common())
    stats.by_agent = dict(agents.most_common())
    return stats


def matches(letter: DeadLetter, *, reason: str | None = None, agent: str | None = None) -> bool:
    """Whether ``letter`` passes the ``--reason`` and ``--agent`` filters.

    ``--agent`` matches the agent a letter was for, and for ``unknown-agent``
    letters the name that was asked for: "why did calls for ghost die" has
    an answer.
    """
    if reason is not None and letter.reason != reason:
        return False
    return agent is None or agent in (letter.agent, letter.requested_agent)


async def scan_dead_letters(
    redis: RedisClient,
    keys: Keys,
    *,
    reason: str | None = None,
    agent: str | None = None,
    since: float | None = None,
    page: int = 500,
) -> AsyncIterator[DeadLetter]:
    """Every dead letter (oldest first) since ``since`` (epoch s), filtered, paged."""
    stream = DeadLetterStream(redis, keys)
    start = "-" if since is None else str(max(0, int(since * 1000)))
    while True:
        entries = await stream.oldest_first(start=start, count=page)
        if not entries:
            return
        for entry_id, raw in entries:
            letter = _decode_entry(entry_id, raw)
            if matches(letter, reason=reason, agent=agent):
                yield letter
        start = f"({entries[-1][0]}"


async def dead_letter_tail(redis: RedisClient, keys: Keys) -> str:
    """The newest dead letter's entry id (``0-0`` when there is none): where following starts."""
    return await DeadLetterStream(redis, keys).newest_id() or "0-0"


async def dead_letters_after(redis: RedisClient, keys: Keys, after: str) -> list[DeadLetter]:
    """Dead letters added after entry ``after``, oldest first, without waiting for one."""
    # XREAD BLOCK 0 would wait forever: a millisecond is "now".
    entries = await DeadLetterStream(redis, keys).read_after(after, block=0.001)
    return [_decode_entry(entry_id, raw) for entry_id, raw in entries]


async def follow_dead_letters(
    redis: RedisClient,
    keys: Keys,
    *,
    reason: str | None = None,
    agent: str | None = None,
    after: str | None = None,
    block: float = 2.0,
) -> AsyncIterator[DeadLetter]:
    """Dead letters added after entry ``after`` (default: from now on), filtered.

    Blocking ``XREAD``s, each at most ``block`` seconds (below the client's
    socket timeout), each from the last entry id seen rather than ``$``, so
    none is missed between two reads.
    """
    stream = DeadLetterStream(redis, keys)
    last = after if after is not None else await dead_letter_tail(redis, keys)
    while True:
        for entry_id, raw in await stream.read_after(last, block=block):
            last = entry_id
            letter = _decode_entry(entry_id, raw)
            if matches(letter, reason=reason, agent=agent):
                yield letter


# --------------------------------------------------------------------------- call reports


@dataclass(frozen=True)
class Prices:
    """A price table: what usage costs (``openrtc sessions --prices``).

    Per LLM model, per 1000 prompt and completion tokens; per TTS character
    and per STT audio second (one rate each: the report sums those over
    models). Applied when reports are read, never stored: a price change
    re-prices history, and the reports stay facts.
    """

    llm: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    tts_character: float = 0.0
    stt_second: float = 0.0

    @classmethod
    def from_toml(cls, text: str) -> Prices:
        """A table like::

            tts_per_character = 0.000015
            stt_per_second = 0.0001
            [llm."gpt-4.1-mini"]
            prompt_per_1k = 0.0004
            completion_per_1k = 0.0016

        Raises ``ValueError`` for a table that is not one.
        """
        import tomllib

        try:
            doc = tomllib.loads(text)
            llm = {
                str(model): (
                    float(rates.get("prompt_per_1k", 0)),
                    float(rates.get("completion_per_1k", 0)),
                )
                for model, rates in (doc.get("llm") or {}).items()
            }
            return cls(
                llm, float(doc.get("tts_per_character", 0)), float(doc.get("stt_per_second", 0))
            )
        except (tomllib.TOMLDecodeError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a price table: {exc}") from None

    def cost(self, usage: Mapping[str, Any]) -> float:
        """What ``usage`` (a report's) costs, in the table's currency."""
        total = 0.0
        for model, tokens in (usage.get("llm_by_model") or {}).items():
            prompt, completion = self.llm.get(model, (0.0, 0.0))
            total += _int(tokens.get("prompt_tokens")) * prompt / 1000
            total += _int(tokens.get("completion_tokens")) * completion / 1000
        total += _int(usage.get("tts_characters")) * self.tts_character
        total += _float(usage.get("stt_audio_seconds")) * self.stt_second
        return round(total, 6)


@dataclass
class Report:
    """One call report as read back: its entry id and its document."""

    id: str
    doc: dict[str, Any]
    #: ``unsigned``, ``signed`` or ``forged`` (checked only when keys are given):
    #: reports written before signing was turned on are ``unsigned``.
    signature: str = "unsigned"

    def shown(self, prices: Prices | None) -> dict[str, Any]:
        """The document, with ``cost`` when a price table is given."""
        doc = {"id": self.id, **self.doc}
        if prices is not None:
            doc["cost"] = prices.cost(self.doc.get("usage") or {})
        return doc


def _decode_report(
    entry_id: str, raw: Mapping[bytes, bytes], signing: SigningKeys | None
) -> Report | None:
    import json

    try:
        doc = json.loads(raw.get(REPORT_FIELD, b""))
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    signature = "unsigned"
    if signing is not None and raw.get(SIGNATURE_FIELD):
        try:
            verify_report(signing, raw)
            signature = "signed"
        except ForgedEntry:
            signature = "forged"
    return Report(entry_id, doc, signature)


def report_matches(
    report: Report,
    *,
    agent: str | None = None,
    tenant: str | None = None,
    outcome: str | None = None,
    since: float | None = None,
) -> bool:
    """Whether ``report`` passes the --agent, --tenant, --outcome and --since filters."""
    d = report.doc
    return (
        (agent is None or d.get("agent") == agent)
        and (tenant is None or d.get("tenant") == tenant)
        and (outcome is None or d.get("outcome") == outcome)
        and (since is None or _float(d.get("ended_at")) >= since)
    )


async def list_reports(
    redis: RedisClient,
    keys: Keys,
    *,
    count: int = 50,
    ids: Sequence[str] = (),
    job_id: str | None = None,
    signing: SigningKeys | None = None,
    **filters: Any,
) -> list[Report]:
    """The newest reports (newest first) that pass ``filters``; or those of ``ids``,
    or the one of ``job_id``."""
    stream = ReportStream(redis, keys)
    if ids:
        found = [await stream.get(i) for i in ids]
        return [r for e in found if e and (r := _decode_report(*e, signing))]
    out: list[Report] = []
    upper = "+"
    while len(out) < count:
        page = await stream.newest_first(upper=upper, count=PAGE)
        if not page:
            break
        for entry_id, raw in page:
            report = _decode_report(entry_id, raw, signing)
            if report is None:
                continue
            if job_id is not None:
                if report.doc.get("job_id") == job_id:
                    return [report]
                continue
            if report_matches(report, **filters):
                out.append(report)
                if len(out) >= count:
                    break
        upper = f"({page[-1][0]}"
    return [] if job_id is not None else out


async def scan_reports(
    redis: RedisClient, keys: Keys, *, signing: SigningKeys | None = None, **filters: Any
) -> AsyncIterator[Report]:
    """Every report (oldest first) that passes ``filters``, paged."""
    stream = ReportStream(redis, keys)
    start = "-"
    since = filters.get("since")
    if since is not None:
        # Reports are added when calls end: none that ended since then is older.
        start = str(max(0, int(since * 1000) - 1000))
    while True:
        entries = await stream.oldest_first(start=start, count=PAGE)
        if not entries:
            return
        for entry_id, raw in entries:
            report = _decode_report(entry_id, raw, signing)
            if report is not None and report_matches(report, **filters):
                yield report
        start = f"({entries[-1][0]}"


async def follow_reports(
    redis: RedisClient,
    keys: Keys,
    *,
    signing: SigningKeys | None = None,
    block: float = 2.0,
    **filters: Any,
) -> AsyncIterator[Report]:
    """Reports added from now on that pass ``filters`` (as :func:`follow_dead_letters`)."""
    stream = ReportStream(redis, keys)
    last = await stream.newest_id() or "0-0"
    while True:
        for entry_id, raw in await stream.read_after(last, block=block):
            last = entry_id
            report = _decode_report(entry_id, raw, signing)
            if report is not None and report_matches(report, **filters):
                yield report


def report_stats(reports: Iterable[Report], prices: Prices | None) -> dict[str, Any]:
    """Calls, duration, usage (and cost) summed by agent and by tenant."""

    def empty() -> dict[str, Any]:
        row: dict[str, Any] = {
            "calls": 0,
            "duration_s": 0.0,
            "turns": 0,
            "takeovers": 0,
            "llm_prompt_tokens": 0,
            "llm_completion_tokens": 0,
            "tts_characters": 0,
            "stt_audio_seconds": 0.0,
            "outcomes": {},
        }
        if prices is not None:
            row["cost"] = 0.0
        return row

    groups: dict[str, dict[str, dict[str, Any]]] = {"by_agent": {}, "by_tenant": {}}
    total = empty()
    for report in reports:
        d = report.doc
        usage = d.get("usage") or {}
        for group, name in (("by_agent", d.get("agent")), ("by_tenant", d.get("tenant"))):
            rows = [groups[group].setdefault(str(name or ""), empty())]
            if group == "by_agent":
                rows.append(total)
            for row in rows:
                row["calls"] += 1
                row["duration_s"] = round(row["duration_s"] + _float(d.get("duration_s")), 3)
                row["turns"] += _int(d.get("turns"))
                row["takeovers"] += _int(d.get("takeovers"))
                for k in ("llm_prompt_tokens", "llm_completion_tokens", "tts_characters"):
                    row[k] += _int(usage.get(k))
                row["stt_audio_seconds"] = round(
                    row["stt_audio_seconds"] + _float(usage.get("stt_audio_seconds")), 3
                )
                outcome = str(d.get("outcome") or "")
                row["outcomes"][outcome] = row["outcomes"].get(outcome, 0) + 1
                if prices is not None:
                    row["cost"] = round(row["cost"] + prices.cost(usage), 6)
    return {"total": total, **groups}

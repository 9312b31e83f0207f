"""The chaos ledger's verdicts: what the harness saw in, one outcome per call out. Pure.

``bench/chaos.py`` runs the calls and the faults and collects what it saw
(:class:`RunFacts`); :func:`build_ledger` classifies each call and
:func:`guarantees` lists every check ``--check`` makes. Nothing here reads a
clock, a log or a server, so every rule is table-tested
(``tests/test_chaos_ledger.py``).

Every outcome is either a named success whose evidence was checked, or a
failure (:data:`FAILED`, which ``--check`` refuses):

* **served**: an agent joined, stayed until the caller hung up, the call
  lasted its planned duration and the agent published audio;
* **recovered**: its worker was SIGKILLed and an agent came back within
  :data:`RECOVERY_LIMIT` of the kill, or of the end of an outage (Redis,
  LiveKit, a slow API) that overlapped it;
* **served, hung up before its recovery was due**: the worker was killed and
  the caller hung up within that same bound;
* **served, interrupted by <fault>**: the agent left and came back within
  :data:`RECOVERY_LIMIT` of the end of an injected fault that explains it
  (a leave-and-rejoin with no fault is a failure: a double serve looks so);
* **cut by the LiveKit restart**: the restarted server took the caller or
  the agent away, within :data:`REDISPATCH_BOUND` of its return;
* **not placed, LiveKit was restarting**: the harness's own create/join
  failed during the restart.

Failures: no agent ever (dead-lettered, refused and not dispatched again by
the reconciler, or nothing at all), a call the harness could not place
outside the restart, a drop, a recovery later than its bound, an answer later
than :data:`ANSWER_LIMIT` (or the end of a fault that explains it), a served
call that ended early or without agent audio, a caller the server
disconnected outside the restart.

The raised ledger (``RunFacts.raised``: every call holds a conversation, the
job streams are sampled) adds three verdicts per run, each a check of
``--check``: the conversation kept (asked "what did I say first?" at the end,
the agent names the first thing said: :func:`conversation_kept`), the
greeting heard exactly once (:func:`greeting_heard_once`), and no job with
two live entries at once in any sample of the job streams
(:func:`doubled_entries`). A call whose agent was replaced by a new *job*
after the LiveKit restart (LiveKit keeps no rooms: the reconciler dispatches
the recreated room afresh) is the one named exception, checked from its
evidence (two job ids, the restart within the call): its new agent greets
and knows nothing said before.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

#: The prefix of every outcome ``--check`` refuses.
FAILED: Final = "FAILED: "
#: A departure this long after a fault is blamed on it.
BLAME_WINDOW: Final = 15.0
#: A SIGTERMed worker's session processes hand their calls over up to this long
#: after its main process exited (process isolation: each leaves when its peer
#: joins; seen 2.7 s after the exit in a full run).
OUTLIVES: Final = 10.0
#: A SIGKILLed worker's call has an agent again this soon after the kill (or
#: after the end of an outage that overlapped it). Crash detection: p50 ~2 s.
RECOVERY_LIMIT: Final = 6.0
#: A caller hears an agent this soon after its room was created (or after the
#: end of a fault that overlapped the wait).
ANSWER_LIMIT: Final = 10.0
#: After a LiveKit restart, how long the room may take to be dispatched again:
#: the caller rejoins (its SDK's backoff), the dispatchers register again.
REDISPATCH_BOUND: Final = 10.0
#: Longest a caller may hear two agents (of different jobs) at once: after a
#: LiveKit restart the old job's session leaves as soon as it is connected and
#: sees the new job's agent, whose token says its room is newer.
MAX_OVERLAP: Final = 3.0
#: A served call lasts its planned duration, less this (timer granularity).
DURATION_SLACK: Final = 0.5
#: Faults that may hold up a recovery: Redis or LiveKit away, or slow.
OUTAGES: Final = frozenset(
    {
        "redis-aof",
        "redis-rdb",
        "redis-no-persistence",
        "sentinel-failover",
        "slow-redis",
        "livekit",
        "slow-api",
    }
)
#: Faults that excuse nothing in a call they did not target: a worker's
#: SIGTERM (a deploy) explains a gap only in the calls of that worker (as a
#: kill does), and a killed liveness connection explains none (its worker
#: lives: its calls are never taken from it).
TARGETED: Final = frozenset({"kill", "sigterm", "liveness-kill"})
#: Faults that may hold up an answer: the outages, a dispatcher restart, a
#: kill of the worker the job went to.
ANSWER_FAULTS: Final = OUTAGES | {"dispatcher", "kill"}


@dataclass
class AgentEvent:
    """An agent participant joining, leaving or publishing audio, as the caller saw it."""

    at: float
    kind: str  # "join", "leave" or "audio"
    identity: str
    sid: str


@dataclass
class CallRecord:
    """One call: its plan, what the caller saw, what the server lists showed."""

    n: int
    agent: str
    room: str
    planned_start: float
    duration: float
    room_sid: str = ""
    created_at: float | None = None
    joined_at: float | None = None
    hung_up_at: float | None = None
    events: list[AgentEvent] = field(default_factory=list)
    #: Agent audio tracks published while the caller was in (``auto_subscribe``
    #: is off: the caller sees publications without decoding their audio).
    audio: list[AgentEvent] = field(default_factory=list)
    caller_lost: str = ""  # why the caller was disconnected by the server, if it was
    caller_lost_at: float | None = None
    error: str = ""  # create/connect failure
    error_at: float | None = None
    max_agents_caller: int = 0
    max_agents_sampled: int = 0
    double_sample: list[str] = field(default_factory=list)
    #: (wall time, [(identity, sid)]) of every server list of the room's agents.
    sampled: list[tuple[float, list[tuple[str, str]]]] = field(default_factory=list)
    samples: int = 0
    job_ids: list[str] = field(default_factory=list)
    #: The conversation (the raised ledger): what the caller typed, in order
    #: (each thing once, however often it had to repeat it), the agent's
    #: final transcript lines, the reply to "what did I say first?" ("" if
    #: none came), and how many of the agent's lines were its greeting.
    said: list[str] = field(default_factory=list)
    #: What the agent acknowledged ("Noted: ..."), in order: a line said while
    #: no agent listened (a takeover under way) was never part of the call.
    noted: list[str] = field(default_factory=list)
    lines: list[tuple[float, str]] = field(default_factory=list)
    answer: str = ""
    asked_at: float | None = None
    greetings: int = 0
    # Filled in by the ledger.
    outcome: str = ""
    detail: str = ""
    recovery: list[float] = field(default_factory=list)


@dataclass
class Fault:
    """One fault the harness caused (or a service's own exit), with its wall-clock times."""

    at: float
    kind: str
    target: str = ""
    end: float | None = None
    detail: str = ""
    #: The exception that stopped this fault step, if one did: a step that
    #: failed checked nothing.
    error: str = ""
    #: A kill: the jobs the worker held (its pending entries) when it was killed.
    jobs: list[str] = field(default_factory=list)


@dataclass
class Join:
    """A worker's log line: it joined a room as the agent of a job."""

    at: float
    job: str
    worker: str  # incarnation name


@dataclass
class RunFacts:
    """Everything the harness observed in one run; the ledger's only input."""

    calls: list[CallRecord]
    faults: list[Fault]
    #: Services that exited without being told to (restarted by the harness).
    self_exits: list[Fault] = field(default_factory=list)
    #: Dead letters (their fields) written during the run.
    dead: list[dict[str, str]] = field(default_factory=list)
    #: Job entries (their fields) seen in the job streams, by entry id.
    accepted: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Room -> the worker joins logged for it, in time order.
    joins: dict[str, list[Join]] = field(default_factory=dict)
    #: Room -> why a dispatcher refused its job (answered unavailable, not enqueued).
    refused: dict[str, list[str]] = field(default_factory=dict)
    #: Garbage entries injected, by what became of them.
    garbage: Counter[str] = field(default_factory=Counter)
    garbage_injected: int = 0
    #: Job entries compared across the AOF Redis restart, and those lost.
    aof_checked: int = 0
    aof_lost: list[str] = field(default_factory=list)
    #: The raised ledger: calls held conversations and the job streams were
    #: sampled, so their checks apply (table rows of the plain ledger leave it off).
    raised: bool = False
    #: Samples of the job streams that showed one job with two entries:
    #: (wall time, stream, [(entry id, job id)] of that sample); and how many
    #: samples were taken in all.
    entry_samples: list[tuple[float, str, list[tuple[str, str]]]] = field(default_factory=list)
    entry_samples_taken: int = 0
    #: Job entries the Redis snapshot restart (RDB) restored (-1: no such
    #: restart in this run); the slot of the worker whose clock was behind.
    rdb_restored: int = -1
    skewed_slot: str = ""
    #: Agent participants as the LiveKit server logged them (:func:`server_spans`).
    server_spans: dict[str, ServerSpan] = field(default_factory=dict)
    t0: float = 0.0
    #: The time bounds this run is held to: the benchmark's goals by default;
    #: the test suite's run holds recovery and answers to liveness bounds only
    #: (timing goals live in the benchmarks, not in tests).
    recovery_limit: float = RECOVERY_LIMIT
    answer_limit: float = ANSWER_LIMIT


@dataclass
class Ledger:
    outcomes: Counter[str]
    failed: list[CallRecord]
    #: Rooms where two participants of one job were present at once (a double serve).
    double_rooms: list[CallRecord]
    #: Rooms where agents of two jobs overlapped longer than MAX_OVERLAP.
    overlap_rooms: list[CallRecord]
    #: The longest overlap of two agents in any room, seconds.
    max_overlap: float
    #: Rooms where a server sample listed two agents at once.
    sampled_double_rooms: list[CallRecord]
    nonaof_ended: list[CallRecord]
    recovery: list[float]
    answer: list[float]
    #: The raised ledger's verdicts: calls whose conversation was lost, calls
    #: that heard the greeting other than once, jobs seen with two live entries.
    forgot: list[CallRecord] = field(default_factory=list)
    greeted_again: list[CallRecord] = field(default_factory=list)
    doubled_jobs: dict[str, str] = field(default_factory=dict)
    #: Calls whose conversation was checked, and those exempt (a new job after
    #: the LiveKit restart), by outcome.
    conversations_checked: int = 0
    conversations_restarted: int = 0
    #: Calls whose agent joined, and greeted, while LiveKit was restarting.
    greetings_cut: int = 0
    #: Calls whose worker was SIGTERMed (the rolling deploy) while they ran.
    handed_over: int = 0


@dataclass(frozen=True)
class ServerSpan:
    """An agent participant as the LiveKit server logged it (unix s; None: not logged)."""

    active: float | None = None
    audio: float | None = None
    closed: float | None = None


#: The LiveKit server's log messages that bound a participant's span.
_SPAN_MESSAGES: Final = {
    "participant active": "active",
    "mediaTrack published": "audio",
    "participant closing": "closed",
}


def server_spans(lines: Iterable[str]) -> dict[str, ServerSpan]:
    """Participant sid -> its span, from the LiveKit server's log (its development
    format: ISO time, level, logger, source, message, JSON fields; tab-separated).

    The server is the authority on what a caller could hear: it forwards an
    agent's audio from its publication until it closes it. The caller's own
    view of joins and leaves can lag it by seconds on a loaded host (its
    signal connection stalled after a LiveKit restart: a chaos run saw a
    leave 5.6 s after the server closed that participant).
    """
    found: dict[str, dict[str, float]] = {}
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 6 or (what := _SPAN_MESSAGES.get(parts[4])) is None:
            continue
        try:
            fields = json.loads(parts[5])
            at = datetime.fromisoformat(parts[0].replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        sid = fields.get("participantID") if isinstance(fields, dict) else None
        if not isinstance(sid, str) or (what == "audio" and fields.get("kind") != "audio"):
            continue
        # The first publication, the first close (a resume is not a new span).
        found.setdefault(sid, {}).setdefault(what, at)
    return {sid: ServerSpan(**times) for sid, times in found.items()}


def overlaps(rec: CallRecord, spans: Mapping[str, ServerSpan] | None = None) -> tuple[bool, float]:
    """From the caller's view: were two sessions of one job present at once, and
    the longest stretch (s) in which the caller could hear two or more agents.

    An agent is audible from its audio publication, not its join: on a loaded
    host a newcomer takes seconds from being announced to publishing, while
    the agent it replaces leaves as soon as it is connected (a chaos run saw
    4.5 s "together" of which the server had them both active 0.13 s). An
    agent whose publication the caller never saw counts from its join.
    Where the server logged the participant (``spans``), its times win.
    """
    spans = spans or {}
    first_audio: dict[str, float] = {}
    for a in rec.audio:
        first_audio[a.sid] = min(a.at, first_audio.get(a.sid, a.at))
    present: dict[str, str] = {}
    same_job = False
    # (from, to) during which each agent participant was audible.
    audible: list[tuple[float, float]] = []
    joined: dict[str, float] = {}
    for event in sorted(rec.events, key=lambda e: e.at):
        if event.kind == "join":
            present[event.sid] = event.identity
            joined[event.sid] = event.at
        elif event.kind == "leave":
            present.pop(event.sid, None)
            if event.sid in joined:
                start = max(joined.pop(event.sid), first_audio.get(event.sid, 0.0))
                audible.append(_as_server_saw(event.sid, start, event.at, spans))
        identities = list(present.values())
        same_job = same_job or len(identities) != len(set(identities))
    for sid, at in joined.items():
        start = max(at, first_audio.get(sid, 0.0))
        audible.append(_as_server_saw(sid, start, max(start, rec.hung_up_at or start), spans))
    edges = sorted([(a, 1) for a, b in audible if b > a] + [(b, -1) for a, b in audible if b > a])
    longest = 0.0
    heard = 0
    since = 0.0
    for t, step in edges:
        heard += step
        if step == 1 and heard == 2:
            since = t
        elif step == -1 and heard == 1:
            longest = max(longest, t - since)
    return same_job, longest


def _as_server_saw(
    sid: str, start: float, end: float, spans: Mapping[str, ServerSpan]
) -> tuple[float, float]:
    """The caller's (start, end) of an agent, with the server's times where it logged them."""
    span = spans.get(sid)
    if span is None:
        return start, end
    begin = span.audio if span.audio is not None else span.active
    return (start if begin is None else begin), (end if span.closed is None else span.closed)


def blame(run: RunFacts, t: float, joins: Sequence[Join]) -> tuple[str, Fault | None]:
    """Which fault an agent departure at ``t`` follows: its worker's kill first."""
    serving = [j for j in joins if j.at <= t]
    worker = serving[-1].worker if serving else ""
    for f in run.faults:
        if f.kind == "kill" and f.target == worker and f.at <= t <= f.at + BLAME_WINDOW:
            return "kill", f
    for f in run.faults:
        # The worker serving when the SIGTERM came: the taker of a handover
        # logs its join before the caller sees the old agent leave.
        before = [j for j in joins if j.at <= f.at]
        then = before[-1].worker if before else ""
        if f.kind == "sigterm" and f.target == then and f.at <= t <= (f.end or f.at) + OUTLIVES:
            return "sigterm", f
    for f in run.self_exits:
        if f.target == worker and f.at - BLAME_WINDOW <= t <= f.at + BLAME_WINDOW:
            return "worker exited on its own", f
    recent = [
        f
        for f in run.faults
        if f.at - 1 <= t <= (f.end or f.at) + BLAME_WINDOW and f.kind not in TARGETED
    ]
    if recent:
        f = recent[-1]
        return f.kind, f
    return "no fault", None


def agent_back(rec: CallRecord, gone: float, sid: str, end: float) -> float | None:
    """When an agent was in the room again after ``sid`` left at ``gone``, if before ``end``.

    The caller's SDK misses participants after it rejoins a restarted server,
    so the server's sampled lists count too: another agent, or the same one
    still listed 2 s later (the caller's leave was then its own reconnect).
    """
    times = [e.at for e in rec.events if e.kind == "join" and gone < e.at <= end]
    for t, agents in rec.sampled:
        if gone < t <= end and any(s != sid or t > gone + 2 for _i, s in agents):
            times.append(t)
            break
    return min(times) if times else None


def killed_under(
    run: RunFacts, rec: CallRecord, joins: Sequence[Join], end: float
) -> list[tuple[Fault, float | None]]:
    """The kills of the worker serving this call while it was up, each with when a new agent came.

    A SIGKILLed agent's participant lingers (the server waits for it to
    resume), so recovery is a participant the room had not had before the
    kill: the taker's, with the same identity and a new sid.
    """
    out: list[tuple[Fault, float | None]] = []
    for f in run.faults:
        if f.kind != "kill" or not (rec.joined_at or end) <= f.at <= end:
            continue
        serving = [j for j in joins if j.at <= f.at]
        if not serving or serving[-1].worker != f.target:
            continue
        before = {e.sid for e in rec.events if e.at <= f.at}
        before |= {sid for t, agents in rec.sampled if t <= f.at for _i, sid in agents}
        times = [
            e.at for e in rec.events if e.kind == "join" and e.at > f.at and e.sid not in before
        ]
        times += [
            t for t, agents in rec.sampled if t > f.at and any(s not in before for _i, s in agents)
        ]
        out.append((f, min(times) if times else None))
    return out


def fault_during(run: RunFacts, start: float, end: float) -> str:
    """The faults whose time overlaps [start, end], by kind."""
    kinds = [
        f.kind
        for f in run.faults + run.self_exits
        if f.at <= end and (f.end or f.at) + BLAME_WINDOW >= start
    ]
    return ", ".join(dict.fromkeys(kinds)) or "no fault"


def due_by(run: RunFacts, start: float, limit: float, kinds: frozenset[str]) -> tuple[float, str]:
    """When something that started at ``start`` is due, and the faults that explain a delay.

    ``limit`` after ``start``, or after the end of each fault of ``kinds``
    overlapping the wait (a fault that ends within it pushes the bound on).
    """
    due = start + limit
    why: list[str] = []
    for f in sorted(run.faults, key=lambda f: f.at):
        if f.kind in kinds and f.at <= due and (f.end or f.at) >= start - 1:
            due = max(due, (f.end or f.at) + limit)
            why.append(f.kind)
    return due, ", ".join(dict.fromkeys(why))


def _restart_window(restart: Fault | None, t: float | None) -> bool:
    """Was ``t`` within the LiveKit restart, up to REDISPATCH_BOUND after its return?"""
    if restart is None or t is None:
        return False
    return restart.at - 1 <= t <= (restart.end or restart.at) + REDISPATCH_BOUND


def joins_of(run: RunFacts, rec: CallRecord) -> list[Join]:
    """The worker joins of this call's room, in time order: those the workers
    logged, and a killed worker that held one of the call's jobs.

    A worker killed between its agent's join and its own "joined" line (a
    connect takes seconds on a loaded host) logged nothing, yet its agent
    was the caller's: its kill explains the gap that follows.
    """
    joins = list(run.joins.get(rec.room, []))
    for f in run.faults:
        for job in f.jobs if f.kind == "kill" else ():
            logged = any(j.job == job and j.worker == f.target and j.at <= f.at for j in joins)
            if job in rec.job_ids and not logged:
                joins.append(Join(f.at - 0.001, job, f.target))
    return sorted(joins, key=lambda j: j.at)


def classify(run: RunFacts, rec: CallRecord) -> tuple[str, str, list[float]]:
    """One call's outcome, the detail that backs it, and its recovery times (s)."""
    room_joins = joins_of(run, rec)
    dead = sorted({d.get("reason", "?") for d in run.dead if d.get("room") == rec.room})
    restart = next((f for f in run.faults if f.kind == "livekit"), None)
    end = rec.caller_lost_at or rec.hung_up_at or 0.0
    t0 = run.t0
    gaps: list[tuple[float, float | None]] = []  # (agent gone, agent back)
    present: set[str] = set()
    skip_until = 0.0
    for e in rec.events:
        if e.at > end:
            break
        if e.kind == "join":
            present.add(e.sid)
            continue
        present.discard(e.sid)
        if not present and e.at >= skip_until:
            back = agent_back(rec, e.at, e.sid, end)
            gaps.append((e.at, back))
            skip_until = back if back is not None else float("inf")
    # A departure in the caller's last half second is the hang-up racing the agent.
    gaps = [g for g in gaps if g[1] is not None or g[0] < end - 0.5]
    causes = [blame(run, gone, room_joins) for gone, _ in gaps]
    seen_agent = bool(rec.events) or any(agents for _t, agents in rec.sampled)

    if rec.caller_lost:
        seen = "seen" if rec.events else "never seen"
        detail = f"caller disconnected ({rec.caller_lost}); agent {seen}"
        if _restart_window(restart, rec.caller_lost_at):
            return "cut by the LiveKit restart", detail, []
        return FAILED + "caller disconnected by the server", detail, []
    if rec.error:
        if _restart_window(restart, rec.error_at):
            return "not placed, LiveKit was restarting", rec.error, []
        return FAILED + "the call could not be placed", rec.error, []
    if not seen_agent:
        jobs = sorted(
            {f.get("job_id", "") for f in run.accepted.values() if f.get("room") == rec.room}
            | set(rec.job_ids)
        )
        rec.job_ids[:] = jobs
        during = fault_during(run, rec.created_at or 0.0, end)
        detail = f"jobs {', '.join(jobs) or 'none in the streams'}; during {during}"
        if dead:
            return FAILED + f"dead-lettered ({', '.join(dead)})", detail, []
        if rec.room in run.refused:
            why = "; ".join(run.refused[rec.room][:2])
            return FAILED + "refused, never dispatched again", f"{why}; {detail}", []
        accepted = "accepted, " if jobs else ""
        return FAILED + f"{accepted}no agent ever", detail, []
    if rec.joined_at is None:
        # An agent came (the server listed it) after the caller gave up waiting.
        first = min([e.at for e in rec.events] + [t for t, agents in rec.sampled if agents])
        return (
            FAILED + "no agent while the caller waited",
            f"first agent {first - (rec.created_at or first):.1f}s after the room was created",
            [],
        )
    if gaps and gaps[-1][1] is None:
        gone = gaps[-1][0]
        if (
            restart is not None
            and restart.at - 1 <= gone <= (restart.end or restart.at)
            and end <= (restart.end or restart.at) + REDISPATCH_BOUND
        ):
            # The agent went with the server, and the caller hung up before a
            # restarted server could dispatch the room again: nobody could serve it.
            return (
                "cut by the LiveKit restart",
                f"agent left with the server at {gone - t0:.1f}s; caller hung up "
                f"{end - (restart.end or restart.at):.1f}s after it was back",
                [],
            )
        kind, _fault = causes[-1]
        letters = f"; dead-lettered ({', '.join(dead)})" if dead else ""
        return (
            FAILED + f"dropped after {kind}",
            f"agent left at {gone - t0:.1f}s, caller stayed until {end - t0:.1f}s{letters}",
            [],
        )

    outcome = "served"
    details: list[str] = []
    recovery: list[float] = []
    if kills := killed_under(run, rec, room_joins, end):
        verdicts = []
        for fault, back in kills:
            due, why = due_by(run, fault.at, run.recovery_limit, OUTAGES)
            slowed = f", slowed by {why}" if why else ""
            if back is not None:
                recovery.append(back - fault.at)
                ok = back <= due
                verdicts.append("recovered" if ok else FAILED + "recovered too late")
                details.append(
                    f"{fault.target} killed at {fault.at - t0:.1f}s, new agent "
                    f"{back - fault.at:.1f}s later (due within {due - fault.at:.1f}s{slowed})"
                )
            else:
                ok = end <= due
                verdicts.append(
                    "served, hung up before its recovery was due"
                    if ok
                    else FAILED + "not recovered after its worker's kill"
                )
                details.append(
                    f"{fault.target} killed at {fault.at - t0:.1f}s, caller hung up "
                    f"{end - fault.at:.1f}s later (recovery due within {due - fault.at:.1f}s"
                    f"{slowed})"
                )
        outcome = sorted(verdicts, key=lambda o: o.startswith(FAILED))[-1]
    elif gaps:
        verdicts = []
        for (gone, back), (kind, cause) in zip(gaps, causes, strict=True):
            assert back is not None
            if cause is None:
                # A double serve shows up so: LiveKit removes one of two
                # participants with the same identity.
                verdicts.append(FAILED + "left and came back, no fault")
            else:
                start = cause.at if cause.kind == "kill" else gone
                limits = OUTAGES if cause.kind == "kill" else OUTAGES | {cause.kind}
                due, _why = due_by(run, start, run.recovery_limit, frozenset(limits))
                if cause.kind == "kill":
                    recovery.append(back - cause.at)
                    verdicts.append("recovered" if back <= due else FAILED + "recovered too late")
                else:
                    verdicts.append(
                        f"served, interrupted by {kind}"
                        if back <= due
                        else FAILED + f"interrupted by {kind}, back too late"
                    )
            details.append(f"gap {gone - t0:.1f}-{back - t0:.1f}s after {kind}")
        outcome = sorted(verdicts, key=lambda o: o.startswith(FAILED))[-1]

    if not outcome.startswith(FAILED):
        if rec.joined_at is not None and rec.created_at is not None:
            due, why = due_by(run, rec.created_at, run.answer_limit, ANSWER_FAULTS)
            if rec.joined_at > due:
                outcome = FAILED + "answered late"
                details.append(
                    f"answered {rec.joined_at - rec.created_at:.1f}s after the room was created "
                    f"(due within {due - rec.created_at:.1f}s{', after ' + why if why else ''})"
                )
        lasted = end - (rec.joined_at or end)
        if outcome == "served" and lasted < rec.duration - DURATION_SLACK:
            outcome = FAILED + "served, ended early"
            details.append(f"lasted {lasted:.1f}s of {rec.duration:.1f}s planned")
        if outcome == "served" and not rec.audio:
            outcome = FAILED + "served without agent audio"
            details.append("no agent published an audio track")
    return outcome, "; ".join(details), recovery


#: How often the harness lists each room's participants.
SAMPLE_PERIOD: Final = 1.0


def sampled_doubles(run: RunFacts, rec: CallRecord) -> list[str]:
    """The server's lists of this room that showed two agents and break a guarantee.

    Two agents in a room are never right, but for one stretch: after the
    LiveKit restart the old job's agent may overlap the new one until it
    sees it (bounded by MAX_OVERLAP, as the caller's view is). Any other
    list with two agents fails, and so does the same pair together longer
    than that bound: by the server's log where it has both (from the later
    activation to the earlier close), else by the lists (over the bound less
    a sampling period, as the lists are a second apart).
    """
    restart = next((f for f in run.faults if f.kind == "livekit"), None)
    pairs: dict[frozenset[str], list[float]] = {}
    bad: list[str] = []
    for t, agents in rec.sampled:
        if len(agents) < 2:
            continue
        after_restart = (
            restart is not None
            and restart.at <= t <= (restart.end or restart.at) + REDISPATCH_BOUND + MAX_OVERLAP
        )
        if not after_restart:
            bad.append(f"{t - run.t0:.1f}s: {', '.join(i for i, _ in agents)}")
            continue
        pairs.setdefault(frozenset(sid for _, sid in agents), []).append(t)
    for pair, times in pairs.items():
        if (together := _together(pair, run.server_spans)) is not None:
            if together > MAX_OVERLAP:
                bad.append(
                    f"{together:.1f}s together after the LiveKit restart (server log): "
                    f"{', '.join(sorted(pair))}"
                )
            continue
        if max(times) - min(times) > MAX_OVERLAP - SAMPLE_PERIOD:
            bad.append(
                f"{min(times) - run.t0:.1f}-{max(times) - run.t0:.1f}s after the LiveKit "
                f"restart: {', '.join(sorted(pair))}"
            )
    return bad


def _together(pair: frozenset[str], spans: Mapping[str, ServerSpan]) -> float | None:
    """How long the server had both participants active (None: it did not log both spans)."""
    found = [spans.get(sid) for sid in pair]
    if len(found) != 2 or any(s is None or s.active is None or s.closed is None for s in found):
        return None
    starts = [s.active for s in found if s is not None and s.active is not None]
    ends = [s.closed for s in found if s is not None and s.closed is not None]
    return max(0.0, min(ends) - max(starts))


#: What the offline LLM answers to "what did I say first?" (openrtc.agents.offline).
FIRST_REPLY: Final = "You first said: {}"


def restarted_by_livekit(run: RunFacts, rec: CallRecord) -> bool:
    """Was this call's agent replaced by a new job across the LiveKit restart?

    LiveKit keeps no room across its restart: the caller's SDK recreates the
    room, the reconciler dispatches it as a new job, whose agent greets and
    knows nothing said to the old one. Only with the evidence: the restart
    happened while the call was up and the room saw agents of two jobs.
    """
    restart = next((f for f in run.faults if f.kind == "livekit"), None)
    if restart is None or rec.created_at is None:
        return False
    end = rec.caller_lost_at or rec.hung_up_at or restart.at
    return rec.created_at <= restart.at <= end and len(set(rec.job_ids)) >= 2


def conversation_due(run: RunFacts, rec: CallRecord) -> bool:
    """Does this call's conversation count: a raised run, a call that succeeded with an
    agent to the end (not one the LiveKit restart cut, not one never placed)?"""
    return (
        run.raised
        and rec.joined_at is not None
        and not rec.outcome.startswith(FAILED)
        and not rec.outcome.startswith(("cut by", "not placed"))
    )


def conversation_kept(rec: CallRecord) -> str:
    """Why the conversation was not kept, or "" when it was.

    Kept: the caller said things, asked "what did I say first?" at the end,
    and the agent answered with the first of them it had acknowledged, or
    with one the caller said before it: an acknowledgement the caller never
    heard (its transcript lost in a LiveKit restart, a takeover's join) may
    still have been heard by the agent. Forgetting shows as a later thing.
    """
    if not rec.said:
        return "the caller could say nothing (no agent listened)"
    if not rec.noted:
        return "the agent acknowledged nothing the caller said"
    if rec.asked_at is None:
        return "the caller never got to ask what it said first"
    first = rec.said.index(rec.noted[0]) if rec.noted[0] in rec.said else 0
    if rec.answer in {FIRST_REPLY.format(thing) for thing in rec.said[: first + 1]}:
        return ""
    return f"asked what it said first: {rec.answer or 'no answer'!r} (first: {rec.noted[0]!r})"


#: Seconds from an agent's join by which its greeting has been said (session
#: start and a one-sentence greeting, on a loaded host).
GREETING_DUE: Final = 5.0


def greeting_cut_by_livekit(run: RunFacts, rec: CallRecord) -> bool:
    """Was the call's greeting due while LiveKit was going down or coming back?

    It was spoken into a server that was closing the room: the caller cannot
    hear it, and the session that carries the call on after the restart knows
    from the checkpoint that it was said. Explained, and counted apart. Any
    agent's join counts, not only the first: a session killed before its
    greeting leaves it to the one that takes the call over.
    """
    joins = [e.at for e in rec.events if e.kind == "join"]
    if rec.joined_at is not None:
        joins.append(rec.joined_at)
    return any(
        f.kind == "livekit" and f.end is not None and f.at - GREETING_DUE <= at <= f.end
        for f in run.faults
        for at in joins
    )


def greeting_heard_once(run: RunFacts, rec: CallRecord) -> str:
    """Why the greeting was not heard exactly once, or "" when it was."""
    if rec.greetings == 1:
        return ""
    if rec.greetings == 0 and greeting_cut_by_livekit(run, rec):
        return ""
    return "the greeting never came" if rec.greetings == 0 else f"greeted {rec.greetings} times"


def doubled_entries(run: RunFacts) -> dict[str, str]:
    """Job id -> the first sample of the job streams that held two entries of it.

    A job never has two live entries: an acknowledged one is deleted, a
    handover's release and a write-back each replace theirs in one script.
    """
    out: dict[str, str] = {}
    for t, stream, entries in run.entry_samples:
        ids: dict[str, list[str]] = {}
        for entry_id, job in entries:
            ids.setdefault(job, []).append(entry_id)
        for job, found in ids.items():
            if len(found) > 1 and job not in out:
                out[job] = f"{t - run.t0:.1f}s {stream}: {', '.join(found)}"
    return out


def handed_over(run: RunFacts, rec: CallRecord) -> bool:
    """Was this call's worker SIGTERMed (a deploy) while it served it, and did a new
    agent (a new participant) take the call on?"""
    joins = joins_of(run, rec)
    end = rec.caller_lost_at or rec.hung_up_at or 0.0
    for f in run.faults:
        if f.kind != "sigterm" or not (rec.joined_at or end) <= f.at <= end:
            continue
        serving = [j for j in joins if j.at <= f.at]
        if not serving or serving[-1].worker != f.target:
            continue
        before = {e.sid for e in rec.events if e.at <= f.at}
        if any(e.kind == "join" and e.at > f.at and e.sid not in before for e in rec.events):
            return True
    return False


def build_ledger(run: RunFacts) -> Ledger:
    """Every call's outcome (set on each record) and the run's counts."""
    nonaof = next((f for f in run.faults if f.kind == "redis-no-persistence"), None)
    outcomes: Counter[str] = Counter()
    failed: list[CallRecord] = []
    nonaof_ended: list[CallRecord] = []
    recovery: list[float] = []
    answer: list[float] = []
    for rec in run.calls:
        if rec.joined_at is not None and rec.created_at is not None:
            answer.append(rec.joined_at - rec.created_at)
        rec.outcome, rec.detail, rec.recovery = classify(run, rec)
        recovery += rec.recovery
        if rec.outcome.startswith(FAILED):
            failed.append(rec)
            if nonaof is not None and rec.outcome.endswith(f"dropped after {nonaof.kind}"):
                nonaof_ended.append(rec)
        outcomes[rec.outcome] += 1
    measured = {id(r): overlaps(r, run.server_spans) for r in run.calls}
    forgot: list[CallRecord] = []
    greeted_again: list[CallRecord] = []
    checked = restarted = greetings_cut = 0
    for rec in run.calls:
        if not conversation_due(run, rec):
            continue
        if restarted_by_livekit(run, rec):
            restarted += 1
            continue
        checked += 1
        if why := conversation_kept(rec):
            forgot.append(rec)
            rec.detail = "; ".join(d for d in (rec.detail, why) if d)
        if rec.greetings == 0 and greeting_cut_by_livekit(run, rec):
            greetings_cut += 1
        if why := greeting_heard_once(run, rec):
            greeted_again.append(rec)
            rec.detail = "; ".join(d for d in (rec.detail, why) if d)
    return Ledger(
        outcomes=outcomes,
        failed=failed,
        double_rooms=[r for r in run.calls if measured[id(r)][0]],
        overlap_rooms=[r for r in run.calls if measured[id(r)][1] > MAX_OVERLAP],
        max_overlap=max((m[1] for m in measured.values()), default=0.0),
        sampled_double_rooms=[r for r in run.calls if sampled_doubles(run, r)],
        nonaof_ended=nonaof_ended,
        recovery=recovery,
        answer=answer,
        forgot=forgot,
        greeted_again=greeted_again,
        doubled_jobs=doubled_entries(run),
        conversations_checked=checked,
        conversations_restarted=restarted,
        greetings_cut=greetings_cut,
        handed_over=sum(handed_over(run, r) for r in run.calls),
    )


def guarantees(run: RunFacts, ledger: Ledger) -> list[tuple[str, int]]:
    """Every check of ``--check``: (what, how many broke it); all must be 0."""
    not_dead_lettered = sum(n for state, n in run.garbage.items() if state != "dead-lettered")
    aof = next((f for f in run.faults if f.kind == "redis-aof"), None)
    return [
        ("calls failed (any outcome marked FAILED)", len(ledger.failed)),
        ("rooms with two agents of one job at once", len(ledger.double_rooms)),
        (
            f"rooms with agents of two jobs at once for over {MAX_OVERLAP:.0f}s "
            f"(longest {ledger.max_overlap:.2f}s)",
            len(ledger.overlap_rooms),
        ),
        (
            "rooms the server listed with two agents (past the restart's overlap)",
            len(ledger.sampled_double_rooms),
        ),
        (
            f"accepted jobs lost across the AOF Redis restart (of {run.aof_checked})",
            len(run.aof_lost),
        ),
        (
            "AOF Redis restart that compared no job entry",
            int(aof is not None and run.aof_checked == 0),
        ),
        ("running calls ended by the Redis restart without persistence", len(ledger.nonaof_ended)),
        ("workers or dispatchers that exited on their own", len(run.self_exits)),
        (f"garbage entries not dead-lettered (of {run.garbage_injected})", not_dead_lettered),
        ("fault steps that raised", sum(1 for f in run.faults if f.error)),
    ] + (raised_checks(run, ledger) if run.raised else [])


def raised_checks(run: RunFacts, ledger: Ledger) -> list[tuple[str, int]]:
    """The raised ledger's checks: the conversation, the greeting, the entries, and
    that each new fault had something to act on."""
    deploy = any(f.kind == "sigterm" for f in run.faults)
    skewed_joins = sum(
        1
        for joins in run.joins.values()
        for j in joins
        if run.skewed_slot and j.worker.startswith(f"{run.skewed_slot}.")
    )
    return [
        (
            f"calls whose conversation was lost (of {ledger.conversations_checked} asked "
            '"what did I say first?")',
            len(ledger.forgot),
        ),
        ("calls that heard the greeting other than once", len(ledger.greeted_again)),
        (
            f"jobs with two live entries at once (of {run.entry_samples_taken} stream samples)",
            len(ledger.doubled_jobs),
        ),
        ("conversations checked: none", int(ledger.conversations_checked == 0)),
        ("job streams never sampled", int(run.entry_samples_taken == 0)),
        ("Redis snapshot (RDB) restart that restored no job entry", int(run.rdb_restored == 0)),
        (
            "rolling deploy that handed no running call over",
            int(deploy and ledger.handed_over == 0),
        ),
        (
            "worker with its clock 8 s behind joined no call",
            int(bool(run.skewed_slot) and skewed_joins == 0),
        ),
    ]

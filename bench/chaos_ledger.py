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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

#: The prefix of every outcome ``--check`` refuses.
FAILED: Final = "FAILED: "
#: A departure this long after a fault is blamed on it.
BLAME_WINDOW: Final = 15.0
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
OUTAGES: Final = frozenset({"redis-aof", "redis-no-persistence", "livekit", "slow-api"})
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


def overlaps(rec: CallRecord) -> tuple[bool, float]:
    """From the caller's view: were two sessions of one job present at once, and
    the longest stretch (s) in which the caller could hear two or more agents.

    An agent is audible from its audio publication, not its join: on a loaded
    host a newcomer takes seconds from being announced to publishing, while
    the agent it replaces leaves as soon as it is connected (a chaos run saw
    4.5 s "together" of which the server had them both active 0.13 s). An
    agent whose publication the caller never saw counts from its join.
    """
    first_audio: dict[str, float] = {}
    for a in rec.audio:
        first_audio[a.sid] = min(a.at, first_audio.get(a.sid, a.at))
    present: dict[str, str] = {}
    same_job = False
    # (from, to) during which each agent participant was audible.
    spans: list[tuple[float, float]] = []
    joined: dict[str, float] = {}
    for event in sorted(rec.events, key=lambda e: e.at):
        if event.kind == "join":
            present[event.sid] = event.identity
            joined[event.sid] = event.at
        elif event.kind == "leave":
            present.pop(event.sid, None)
            if event.sid in joined:
                start = max(joined.pop(event.sid), first_audio.get(event.sid, 0.0))
                spans.append((start, event.at))
        identities = list(present.values())
        same_job = same_job or len(identities) != len(set(identities))
    for sid, at in joined.items():
        start = max(at, first_audio.get(sid, 0.0))
        spans.append((start, max(start, rec.hung_up_at or start)))
    edges = sorted([(a, 1) for a, b in spans if b > a] + [(b, -1) for a, b in spans if b > a])
    longest = 0.0
    audible = 0
    since = 0.0
    for t, step in edges:
        audible += step
        if step == 1 and audible == 2:
            since = t
        elif step == -1 and audible == 1:
            longest = max(longest, t - since)
    return same_job, longest


def blame(run: RunFacts, t: float, joins: Sequence[Join]) -> tuple[str, Fault | None]:
    """Which fault an agent departure at ``t`` follows: its worker's kill first."""
    serving = [j for j in joins if j.at <= t]
    worker = serving[-1].worker if serving else ""
    for f in run.faults:
        if f.kind == "kill" and f.target == worker and f.at <= t <= f.at + BLAME_WINDOW:
            return "kill", f
    for f in run.self_exits:
        if f.target == worker and f.at - BLAME_WINDOW <= t <= f.at + BLAME_WINDOW:
            return "worker exited on its own", f
    recent = [
        f
        for f in run.faults
        if f.at - 1 <= t <= (f.end or f.at) + BLAME_WINDOW and f.kind != "kill"
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


def classify(run: RunFacts, rec: CallRecord) -> tuple[str, str, list[float]]:
    """One call's outcome, the detail that backs it, and its recovery times (s)."""
    room_joins = run.joins.get(rec.room, [])
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
    list with two agents fails, and so does the same pair listed over
    longer than that bound (less a sampling period).
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
        if max(times) - min(times) > MAX_OVERLAP - SAMPLE_PERIOD:
            bad.append(
                f"{min(times) - run.t0:.1f}-{max(times) - run.t0:.1f}s after the LiveKit "
                f"restart: {', '.join(sorted(pair))}"
            )
    return bad


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
    measured = {id(r): overlaps(r) for r in run.calls}
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
    ]

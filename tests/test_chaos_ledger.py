"""The chaos ledger's verdicts (``bench/chaos_ledger.py``): what was seen in, an outcome out.

Each row is one call as the harness would have recorded it, beside the faults
of its run; every soft category the ledger used to have (a refusal, a dead
letter, a recovery bound longer than the calls, a restart with no end, a
"served" that never checked the call) is a row that must now fail.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "chaos_ledger_under_test", BENCH / "chaos_ledger.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cl = _load()
FAILED = cl.FAILED
ROOM = "dental-c001-abc123"
# Times in seconds after the run's start (t0 = 0): the room is created at 10.


def fault(kind: str, at: float, end: float | None = None, target: str = "", **kw: Any) -> Any:
    return cl.Fault(at=at, kind=kind, target=target, end=end if end is not None else at, **kw)


def call(
    *events: tuple[float, str, str, str],
    created: float = 10.0,
    duration: float = 10.0,
    hung_up: float | None = None,
    audio: bool = True,
    **kw: Any,
) -> Any:
    """A call; ``events``: (at, join/leave, identity, sid); it joined at the first join."""
    evs = [cl.AgentEvent(at, kind, ident, sid) for at, kind, ident, sid in events]
    joined = evs[0].at if evs else None
    rec = cl.CallRecord(
        n=1, agent="dental", room=ROOM, planned_start=created, duration=duration, **kw
    )
    rec.created_at = created
    rec.joined_at = joined
    rec.events = evs
    rec.hung_up_at = (
        hung_up if hung_up is not None else (joined + duration if joined else created + 30)
    )
    if audio and evs:
        rec.audio = [cl.AgentEvent(evs[0].at + 0.5, "audio", evs[0].identity, evs[0].sid)]
    return rec


def run(rec: Any, *faults: Any, **kw: Any) -> Any:
    return cl.RunFacts(calls=[rec], faults=list(faults), **kw)


def joined(worker: str, at: float = 11.0, job: str = "AJ_1") -> dict[str, list[Any]]:
    return {ROOM: [cl.Join(at, job, worker)]}


A = (11.0, "join", "agent-AJ_1", "PA_1")


def gap(at: float, back: float, sid: str = "PA_2") -> list[tuple[float, str, str, str]]:
    return [(at, "leave", "agent-AJ_1", "PA_1"), (back, "join", "agent-AJ_1", sid)]


CASES: list[tuple[str, Any, str]] = [
    # -- named successes, their evidence checked ---------------------------------------
    ("served", run(call(A)), "served"),
    (
        "recovered within its bound",
        run(
            call(A, *gap(30.0, 32.0), duration=30.0),
            fault("kill", 29.0, target="w1.1"),
            joins=joined("w1.1"),
        ),
        "recovered",
    ),
    (
        # Killed before it logged its join (the connect still finishing): the
        # jobs it held say whose agent the caller had.
        "recovered, its worker killed before it logged the join",
        run(
            call(A, *gap(33.0, 33.05), duration=30.0, job_ids=["AJ_1"]),
            fault("kill", 29.0, target="w1.1", jobs=["AJ_1"]),
        ),
        "recovered",
    ),
    (
        "a late recovery explained by a Redis outage overlapping it",
        run(
            call(A, *gap(30.0, 40.0), duration=40.0),
            fault("kill", 29.0, target="w1.1"),
            fault("redis-aof", 30.0, end=36.0),
            joins=joined("w1.1"),
        ),
        "recovered",
    ),
    (
        "hung up before its recovery was due",
        run(
            # A SIGKILLed agent lingers in the room: no leave is seen.
            call(A, duration=10.0),
            fault("kill", 19.0, target="w1.1"),
            joins=joined("w1.1"),
        ),
        "served, hung up before its recovery was due",
    ),
    (
        "interrupted by an injected fault, back soon after it",
        run(call(A, *gap(30.0, 33.0), duration=30.0), fault("redis-no-persistence", 29.0, 31.0)),
        "served, interrupted by redis-no-persistence",
    ),
    (
        "cut by the LiveKit restart, within its bound",
        run(
            call(A, caller_lost="ROOM_DELETED", caller_lost_at=15.0),
            fault("livekit", 14.5, end=17.0),
        ),
        "cut by the LiveKit restart",
    ),
    (
        "not placed while LiveKit restarted",
        run(call(error="create_room failed: timeout", error_at=15.0), fault("livekit", 14.0, 16.0)),
        "not placed, LiveKit was restarting",
    ),
    (
        "a late answer explained by the slow API",
        run(call((25.0, "join", "agent-AJ_1", "PA_1")), fault("slow-api", 9.0, end=20.0)),
        "served",
    ),
    # -- what used to be accepted, now failures -------------------------------------------
    (
        "the harness could not place the call, LiveKit up",
        run(call(error="create_room failed: timeout", error_at=15.0)),
        FAILED + "the call could not be placed",
    ),
    (
        "refused by a dispatcher and never dispatched again (reconciler off)",
        run(call(), refused={ROOM: ["d1.1: no worker"]}),
        FAILED + "refused, never dispatched again",
    ),
    (
        "dead-lettered, for a valid agent",
        run(call(), dead=[{"room": ROOM, "reason": "expired"}]),
        FAILED + "dead-lettered (expired)",
    ),
    (
        "no agent ever",
        run(call()),
        FAILED + "no agent ever",
    ),
    (
        "dropped, and dead-lettered after the drop",
        run(
            call(A, (20.0, "leave", "agent-AJ_1", "PA_1"), duration=10.0),
            dead=[{"room": ROOM, "reason": "max-deliveries"}],
        ),
        FAILED + "dropped after no fault",
    ),
    (
        "not recovered within its bound after a kill (crash detection off)",
        run(
            call(A, duration=14.0),
            fault("kill", 13.0, target="w1.1"),
            joins=joined("w1.1"),
        ),
        FAILED + "not recovered after its worker's kill",
    ),
    (
        "recovered, but later than its bound and no outage explains it",
        run(
            call(A, *gap(30.0, 45.0), duration=40.0),
            fault("kill", 29.0, target="w1.1"),
            joins=joined("w1.1"),
        ),
        FAILED + "recovered too late",
    ),
    (
        "the caller disconnected by the server long after the LiveKit restart",
        run(
            call(A, caller_lost="ROOM_DELETED", caller_lost_at=60.0),
            fault("livekit", 14.5, end=17.0),
        ),
        FAILED + "caller disconnected by the server",
    ),
    (
        "left and came back with no fault (a double serve)",
        run(call(A, *gap(15.0, 15.5, sid="PA_2"), duration=10.0)),
        FAILED + "left and came back, no fault",
    ),
    (
        "interrupted by a fault, back long after it",
        run(call(A, *gap(30.0, 50.0), duration=40.0), fault("redis-no-persistence", 29.0, 31.0)),
        FAILED + "interrupted by redis-no-persistence, back too late",
    ),
    (
        "served, but hung up before its planned duration",
        run(call(A, duration=10.0, hung_up=15.0)),
        FAILED + "served, ended early",
    ),
    (
        "served, but no agent audio",
        run(call(A, audio=False)),
        FAILED + "served without agent audio",
    ),
    (
        "an agent came only after the caller gave up waiting",
        run(call(sampled=[(45.0, [("agent-AJ_1", "PA_1")])])),
        FAILED + "no agent while the caller waited",
    ),
    (
        "answered late, no fault",
        run(call((25.0, "join", "agent-AJ_1", "PA_1"))),
        FAILED + "answered late",
    ),
    # -- the suite's run: time held to liveness bounds, nothing else relaxed ----------
    (
        "answered in 15 s, within the liveness bound",
        run(call((25.0, "join", "agent-AJ_1", "PA_1")), answer_limit=30.0),
        "served",
    ),
    (
        "recovered in 16 s, within the liveness bound",
        run(
            call(A, *gap(30.0, 45.0), duration=40.0),
            fault("kill", 29.0, target="w1.1"),
            joins=joined("w1.1"),
            recovery_limit=30.0,
        ),
        "recovered",
    ),
    (
        "dead-lettered, whatever the time bounds",
        run(call(), dead=[{"room": ROOM, "reason": "expired"}], answer_limit=30.0),
        FAILED + "dead-lettered (expired)",
    ),
]


@pytest.mark.parametrize(("facts", "outcome"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_call_is_a_named_success_or_a_failure(facts: Any, outcome: str) -> None:
    ledger = cl.build_ledger(facts)
    [rec] = facts.calls
    assert rec.outcome == outcome, rec.detail
    checks = dict(cl.guarantees(facts, ledger))
    assert checks["calls failed (any outcome marked FAILED)"] == int(outcome.startswith(FAILED))


def broken(facts: Any) -> list[str]:
    return [label for label, n in cl.guarantees(facts, cl.build_ledger(facts)) if n]


def test_a_clean_run_breaks_no_guarantee() -> None:
    facts = run(
        call(A),
        fault("redis-aof", 40.0, 42.0),
        garbage=Counter({"dead-lettered": 12}),
        garbage_injected=12,
        aof_checked=5,
    )
    assert broken(facts) == []


@pytest.mark.parametrize(
    ("change", "label"),
    [
        ({"self_exits": [fault("exited on its own", 20.0, target="w1.1")]}, "exited on their own"),
        ({"garbage": Counter({"dead-lettered": 11, "gone, no dead letter": 1})}, "garbage"),
        ({"garbage": Counter({"dead-lettered": 11, "still in the stream": 1})}, "garbage"),
        ({"aof_checked": 0}, "AOF Redis restart that compared no job entry"),
        ({"aof_lost": ["1-0"]}, "lost across the AOF"),
        ({"faults": [fault("redis-aof", 40.0, 42.0, error="ConnectionError: x")]}, "raised"),
    ],
    ids=["self-exit", "garbage-gone", "garbage-stuck", "aof-checked-none", "aof-lost", "raised"],
)
def test_each_run_wide_check_fails_on_its_own(change: dict[str, Any], label: str) -> None:
    facts = run(
        call(A),
        fault("redis-aof", 40.0, 42.0),
        garbage=Counter({"dead-lettered": 12}),
        garbage_injected=12,
        aof_checked=5,
    )
    for key, value in change.items():
        setattr(facts, key, value)
    assert [b for b in broken(facts) if label in b], broken(facts)


TWO = [("agent-AJ_1", "PA_1"), ("agent-AJ_2", "PA_9")]
DOUBLE_LISTED = "rooms the server listed with two agents (past the restart's overlap)"


@pytest.mark.parametrize(
    ("times", "restart", "fails"),
    [
        # No LiveKit restart explains two agents: one list is enough.
        ([12.0], None, True),
        ([12.0], fault("livekit", 30.0, end=35.0), True),
        # After the restart the old job's agent may be listed beside the new
        # one briefly; not over the overlap bound.
        ([40.0], fault("livekit", 30.0, end=35.0), False),
        ([40.0, 41.0], fault("livekit", 30.0, end=35.0), False),
        ([40.0, 41.0, 42.1], fault("livekit", 30.0, end=35.0), True),
        ([60.0], fault("livekit", 30.0, end=35.0), True),
    ],
)
def test_two_agents_in_a_server_list_fail(times: list[float], restart: Any, fails: bool) -> None:
    rec = call(A, duration=60.0)
    rec.sampled = [(t, TWO) for t in times]
    facts = run(rec, *([restart] if restart else []))
    assert (DOUBLE_LISTED in broken(facts)) == fails


@pytest.mark.parametrize(
    ("closed", "fails"),
    [
        # Listed 2.2 s apart (three lists), together 2.3 s by the server's log.
        (42.3, False),
        # Listed once, together 3.5 s by the log.
        (43.5, True),
    ],
)
def test_the_server_log_decides_how_long_two_listed_agents_were_together(
    closed: float, fails: bool
) -> None:
    rec = call(A, duration=60.0)
    rec.sampled = [(40.0, TWO), (41.1, TWO), (42.2, TWO)] if not fails else [(41.0, TWO)]
    spans = {
        "PA_1": cl.ServerSpan(active=20.0, closed=closed),
        "PA_9": cl.ServerSpan(active=40.0, audio=41.0, closed=59.0),
    }
    facts = run(rec, fault("livekit", 30.0, end=35.0), server_spans=spans)
    assert (DOUBLE_LISTED in broken(facts)) == fails


def test_a_newcomer_is_heard_from_its_audio_not_its_join() -> None:
    # The chaos run's case: the new job's agent announced at 12, publishing
    # only at 16.6 (a loaded host), the old one gone at 16.5: never two heard.
    rec = call(A, (12.0, "join", "agent-AJ_2", "PA_9"), (16.5, "leave", "agent-AJ_1", "PA_1"))
    rec.audio.append(cl.AgentEvent(16.6, "audio", "agent-AJ_2", "PA_9"))
    assert cl.overlaps(rec) == (False, 0.0)
    # Both publishing: the stretch counts from the second publication.
    rec.audio[-1].at = 12.5
    assert cl.overlaps(rec) == (False, 4.0)
    # A publication the caller never saw: from the join, as before.
    rec.audio.pop()
    assert cl.overlaps(rec) == (False, 4.5)


def test_the_server_s_times_win_over_the_callers_lagging_view() -> None:
    # The clean-clone run's case: the caller saw the old job's agent leave
    # 5.6 s after the server had closed it (the caller's signal stalled after
    # the LiveKit restart); the server is what the caller hears.
    rec = call(A, (12.0, "join", "agent-AJ_2", "PA_9"), (18.0, "leave", "agent-AJ_1", "PA_1"))
    assert cl.overlaps(rec) == (False, 6.0)
    closed = {"PA_1": cl.ServerSpan(active=11.0, closed=12.4)}
    assert cl.overlaps(rec, closed) == (False, pytest.approx(0.4))
    # The server closed it late too: the overlap stands, by the server's times.
    late = {"PA_1": cl.ServerSpan(active=11.0, closed=17.0), "PA_9": cl.ServerSpan(audio=12.5)}
    assert cl.overlaps(rec, late) == (False, pytest.approx(4.5))
    assert [b for b in broken(run(rec, server_spans=late)) if "two jobs at once" in b]
    assert not [b for b in broken(run(rec, server_spans=closed)) if "two jobs at once" in b]


SERVER_LOG = [
    "2026-12-07T20:44:51.582Z\tINFO\tlivekit\tservice/roommanager.go:433\tstarting RTC session"
    '\t{"participantID": "PA_1"}',
    "2026-12-07T20:44:53.261Z\tINFO\tlivekit\trtc/room.go:1272\tparticipant active"
    '\t{"room": "r", "participantID": "PA_1"}',
    "2026-12-07T20:44:53.500Z\tINFO\tlivekit.pub\trtc/participant.go:2362\tmediaTrack published"
    '\t{"participantID": "PA_1", "kind": "video"}',
    "2026-12-07T20:44:53.723Z\tINFO\tlivekit.pub\trtc/participant.go:2362\tmediaTrack published"
    '\t{"participantID": "PA_1", "kind": "audio"}',
    "2026-12-07T20:44:54.148Z\tINFO\tlivekit\trtc/participant.go:1475\tparticipant closing"
    '\t{"participantID": "PA_1", "reason": "CLIENT_REQUEST_LEAVE"}',
    "2026-12-07T20:44:55.000Z\tINFO\tlivekit\trtc/participant.go:1475\tparticipant closing"
    '\t{"participantID": "PA_1"}',
    "2026-12-07T20:44:55.000Z\tINFO\tlivekit\tx.go:1\tparticipant closing\tnot json",
    "garbage line",
    '2026-12-07T20:44:56.000Z\tINFO\tlivekit\trtc/room.go:1272\tparticipant active\t{"x": 1}',
]


def test_server_spans_are_read_from_the_livekit_log() -> None:
    base = 1796676291.582  # 2026-12-07T20:44:51.582Z
    spans = cl.server_spans(SERVER_LOG)
    assert list(spans) == ["PA_1"]
    span = spans["PA_1"]
    assert span.active == pytest.approx(base + 1.679)
    assert span.audio == pytest.approx(base + 2.141)  # the audio track, not the video
    assert span.closed == pytest.approx(base + 2.566)  # the first close


def test_two_jobs_overlapping_past_the_bound_fail() -> None:
    rec = call(A, (12.0, "join", "agent-AJ_2", "PA_9"), (12.0 + 3.5, "leave", "agent-AJ_2", "PA_9"))
    assert [b for b in broken(run(rec)) if "two jobs at once" in b]
    short = call(A, (12.0, "join", "agent-AJ_2", "PA_9"), (13.0, "leave", "agent-AJ_2", "PA_9"))
    assert not [b for b in broken(run(short)) if "two jobs at once" in b]


# -- the raised ledger: conversations, greetings, entries, the new faults -----------------

FIRST = "my name is caller 1"


def talked(
    rec: Any,
    *,
    said: tuple[str, ...] = (FIRST, "b", "c"),
    answer: str | None = None,
    greetings: int = 1,
    asked: bool = True,
    noted: tuple[str, ...] | None = None,
) -> Any:
    rec.said = list(said)
    rec.noted = list(noted if noted is not None else said)
    rec.asked_at = (rec.hung_up_at or 0.0) - 1.0 if asked else None
    rec.answer = cl.FIRST_REPLY.format(said[0]) if answer is None and said else (answer or "")
    rec.greetings = greetings
    return rec


def raised(rec: Any, *faults: Any, **kw: Any) -> Any:
    kw.setdefault("entry_samples_taken", 100)
    return cl.RunFacts(calls=[rec], faults=list(faults), raised=True, **kw)


LOST = "calls whose conversation was lost"
GREETED = "calls that heard the greeting other than once"
DOUBLED = "jobs with two live entries at once"


@pytest.mark.parametrize(
    ("facts", "failing"),
    [
        pytest.param(raised(talked(call(A))), [], id="kept, greeted once"),
        pytest.param(
            raised(
                talked(call(A, *gap(30.0, 32.0), duration=30.0)),
                fault("kill", 29.0, target="w1.1"),
                joins=joined("w1.1"),
            ),
            [],
            id="kept across a kill's takeover",
        ),
        pytest.param(
            raised(talked(call(A), answer="You first said: b")),
            [LOST],
            id="the takeover forgot the first thing (checkpoint off)",
        ),
        pytest.param(raised(talked(call(A), answer="")), [LOST], id="no answer at all"),
        pytest.param(raised(talked(call(A), asked=False)), [LOST], id="never asked"),
        pytest.param(raised(talked(call(A), said=())), [LOST], id="nothing could be said"),
        pytest.param(
            raised(talked(call(A), noted=())), [LOST], id="the agent acknowledged nothing"
        ),
        pytest.param(
            # Said while no agent listened: the call's first thing is the first noted.
            raised(talked(call(A), noted=("b", "c"), answer="You first said: b")),
            [],
            id="first noted, not first typed",
        ),
        pytest.param(
            raised(talked(call(A), noted=("b", "c"), answer="You first said: c")),
            [LOST],
            id="the first noted thing forgotten",
        ),
        pytest.param(
            # Its acknowledgement unheard (a LiveKit restart ate the transcript),
            # yet the agent heard it: kept.
            raised(talked(call(A), noted=("b", "c"), answer=f"You first said: {FIRST}")),
            [],
            id="named a thing said before the first acknowledgement heard",
        ),
        pytest.param(
            raised(talked(call(A), said=(FIRST, "b"), noted=("b",), answer="You first said: c")),
            [LOST],
            id="named something never said",
        ),
        pytest.param(
            raised(talked(call(A), greetings=2)), [GREETED], id="greeted again on a takeover"
        ),
        pytest.param(raised(talked(call(A), greetings=0)), [GREETED], id="never greeted"),
        pytest.param(
            # Joined (and greeted) while LiveKit was going down: explained.
            raised(talked(call(A), greetings=0), fault("livekit", 10.5, end=14.0)),
            [],
            id="greeting said into the LiveKit restart",
        ),
        pytest.param(
            # Killed before its greeting; the session that took the call over
            # joined as LiveKit went down and greeted into it.
            raised(
                talked(call(A, *gap(12.0, 16.0), duration=30.0), greetings=0),
                fault("kill", 12.0, target="w1.1"),
                fault("livekit", 20.0, end=22.0),
                joins=joined("w1.1"),
            ),
            [],
            id="the taker's greeting said into the LiveKit restart",
        ),
        pytest.param(
            # Joined 4.5 s before LiveKit went down: the greeting was due in it.
            raised(talked(call(A), greetings=0), fault("livekit", 15.5, end=18.0)),
            [],
            id="greeting due as LiveKit went down",
        ),
        pytest.param(
            raised(talked(call(A), greetings=0), fault("livekit", 16.5, end=18.0)),
            [GREETED],
            id="never greeted, joined well before the LiveKit restart",
        ),
        pytest.param(
            raised(talked(call(A), greetings=2), fault("livekit", 10.5, end=14.0)),
            [GREETED],
            id="greeted twice across the LiveKit restart",
        ),
        pytest.param(
            # A failed call is counted failed once, not again as a lost conversation.
            raised(talked(call(), said=())),
            ["calls failed", "conversations checked: none"],
            id="no agent: failed, not also forgotten",
        ),
        pytest.param(
            raised(
                talked(
                    call(
                        A,
                        (16.0, "leave", "agent-AJ_1", "PA_1"),
                        (18.0, "join", "agent-AJ_2", "PA_2"),
                        duration=20.0,
                        job_ids=["AJ_1", "AJ_2"],
                    ),
                    answer="You first said: b",
                    greetings=2,
                ),
                fault("livekit", 15.0, end=17.0),
            ),
            ["conversations checked: none"],
            id="a new job after the LiveKit restart: named, not checked",
        ),
        pytest.param(
            raised(
                talked(
                    call(
                        A,
                        (16.0, "leave", "agent-AJ_1", "PA_1"),
                        (18.0, "join", "agent-AJ_1", "PA_2"),
                        duration=20.0,
                        job_ids=["AJ_1"],
                    ),
                    greetings=2,
                ),
                fault("livekit", 15.0, end=17.0),
            ),
            [GREETED],
            id="the same job after the LiveKit restart: checked",
        ),
        pytest.param(
            raised(
                talked(call(A)),
                entry_samples=[(12.0, "jobs", [("1-0", "AJ_1"), ("2-0", "AJ_1")])],
            ),
            [DOUBLED],
            id="a sample with two entries of one job",
        ),
        pytest.param(
            raised(
                talked(call(A)),
                entry_samples=[(12.0, "jobs", [("1-0", "AJ_1"), ("2-0", "AJ_2")])],
            ),
            [],
            id="two jobs, one entry each",
        ),
        pytest.param(
            raised(talked(call(A)), entry_samples_taken=0),
            ["job streams never sampled"],
            id="no sample taken",
        ),
        pytest.param(
            raised(talked(call(A)), rdb_restored=0),
            ["RDB"],
            id="the snapshot restart restored nothing",
        ),
        pytest.param(
            raised(talked(call(A)), fault("sigterm", 12.0, 14.0, target="w9.1")),
            ["rolling deploy that handed no running call over"],
            id="a deploy that handed nothing over",
        ),
        pytest.param(
            raised(
                # LiveKit removes the old participant as the new one (same
                # identity) joins: the caller sees a leave, then the join.
                talked(call(A, *gap(13.0, 13.3), duration=20.0)),
                fault("sigterm", 12.0, 14.0, target="w1.1"),
                joins=joined("w1.1"),
            ),
            [],
            id="a deploy that handed a call over",
        ),
        pytest.param(
            raised(talked(call(A)), skewed_slot="w4", joins=joined("w1.1")),
            ["clock 8 s behind joined no call"],
            id="the skewed worker took nothing",
        ),
        pytest.param(
            raised(talked(call(A)), skewed_slot="w4", joins=joined("w4.2")),
            [],
            id="the skewed worker served",
        ),
    ],
)
def test_each_raised_check_fails_on_its_own(facts: Any, failing: list[str]) -> None:
    assert sorted({f for f in failing for b in broken(facts) if f in b}) == sorted(failing)
    assert len(broken(facts)) == len(failing), broken(facts)


def test_the_plain_ledger_rows_are_not_held_to_the_raised_checks() -> None:
    assert broken(run(call(A))) == []


def test_a_gap_in_a_sigterm_workers_call_is_its_deploy_and_no_other_workers() -> None:
    gone = call(A, *gap(13.0, 15.0), duration=20.0)
    mine = run(gone, fault("sigterm", 12.0, 14.0, target="w1.1"), joins=joined("w1.1"))
    cl.build_ledger(mine)
    assert gone.outcome == "served, interrupted by sigterm", gone.detail
    other = call(A, *gap(13.0, 15.0), duration=20.0)
    theirs = run(other, fault("sigterm", 12.0, 14.0, target="w2.1"), joins=joined("w1.1"))
    cl.build_ledger(theirs)
    assert other.outcome == FAILED + "left and came back, no fault"


def test_a_handover_after_the_sigterm_workers_exit_is_its_deploy() -> None:
    # Process isolation: the worker's main process exited at 14; its session
    # process handed the call over when the peer joined, 2.7 s later.
    rec = call(A, *gap(16.7, 16.75), duration=20.0)
    cl.build_ledger(run(rec, fault("sigterm", 12.0, 14.0, target="w1.1"), joins=joined("w1.1")))
    assert rec.outcome == "served, interrupted by sigterm", rec.detail
    late = call(A, *gap(15.0 + cl.OUTLIVES, 15.05 + cl.OUTLIVES), duration=30.0)
    cl.build_ledger(run(late, fault("sigterm", 12.0, 14.0, target="w1.1"), joins=joined("w1.1")))
    assert late.outcome == FAILED + "left and came back, no fault"


def test_a_killed_liveness_connection_excuses_no_gap() -> None:
    rec = call(A, *gap(13.0, 15.0), duration=20.0)
    cl.build_ledger(run(rec, fault("liveness-kill", 12.5, target="w1.1"), joins=joined("w1.1")))
    assert rec.outcome == FAILED + "left and came back, no fault"


def test_the_harness_greetings_are_the_agents_own() -> None:
    spec = importlib.util.spec_from_file_location("chaos_talk_under_test", BENCH / "chaos_talk.py")
    assert spec is not None
    assert spec.loader is not None
    talk = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = talk  # dataclasses look their module up
    spec.loader.exec_module(talk)
    agents = BENCH.parent / "examples" / "offline_agents"
    for agent, greeting in talk.GREETINGS.items():
        assert f'greeting="{greeting}"' in (agents / f"{agent}.py").read_text()
    assert cl.FIRST_REPLY.format("x") == "You first said: x"
    assert talk.noted("x") == "Noted: x"


def test_a_handover_whose_taker_logged_its_join_first_is_the_deploys() -> None:
    # The chaos run's case: w3.2 SIGTERMed at 12, the taker (w4.1) logged its
    # join at 12.8, the caller saw the old agent leave at 13.0.
    rec = call(A, *gap(13.0, 13.05), duration=20.0)
    joins = {ROOM: [cl.Join(11.0, "AJ_1", "w3.2"), cl.Join(12.8, "AJ_1", "w4.1")]}
    cl.build_ledger(run(rec, fault("sigterm", 12.0, 14.0, target="w3.2"), joins=joins))
    assert rec.outcome == "served, interrupted by sigterm", rec.detail

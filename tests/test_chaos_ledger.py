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


def test_two_jobs_overlapping_past_the_bound_fail() -> None:
    rec = call(A, (12.0, "join", "agent-AJ_2", "PA_9"), (12.0 + 3.5, "leave", "agent-AJ_2", "PA_9"))
    assert [b for b in broken(run(rec)) if "two jobs at once" in b]
    short = call(A, (12.0, "join", "agent-AJ_2", "PA_9"), (13.0, "leave", "agent-AJ_2", "PA_9"))
    assert not [b for b in broken(run(short)) if "two jobs at once" in b]

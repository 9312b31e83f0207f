"""The worker's verdict on a held entry: a pure function, table tests, no server."""

from __future__ import annotations

from dataclasses import replace

import pytest
from livekit.protocol.agent import Job
from livekit.protocol.models import Room

from openrtc.settings import LiveKitSettings, WorkerSettings
from openrtc.wire.messages import (
    DeadReason,
    ForgedEntry,
    JobMessage,
    MalformedEntry,
    accept_arguments,
)
from openrtc.worker.acceptance import Action, Start, Verdict, judge, small_count, start_kind, waited

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0
SETTINGS = WorkerSettings(
    livekit=LiveKitSettings("ws://127.0.0.1:1", "key", "secret"),
    agent="dental",
    max_deliveries=3,
    max_queue_age=30.0,
)


def job(
    agent: str = "dental", *, queued_at: float = NOW - 1, enqueued_at: float = 0.0
) -> JobMessage:
    return JobMessage(
        job=Job(id="AJ_1", room=Room(name="call-1", sid="RM_1")),
        agent=agent,
        accept=accept_arguments("AJ_1", agent),
        livekit_url="ws://127.0.0.1:1",
        step=3,
        source="room metadata",
        dispatcher_id="d-1",
        received_at=NOW - 2,
        routed_at=NOW - 2,
        enqueued_at=enqueued_at,
        queued_at=queued_at,
    )


GAVE_UP = "gave up after 3 deliveries (max 3); last error: "
DECODE, START = Verdict(Action.DECODE), Verdict(Action.START)


def dead(reason: DeadReason, error: str) -> Verdict:
    return Verdict(Action.DEAD_LETTER, reason, error)


def gave_up(last_error: str = "no error recorded") -> Verdict:
    return dead(DeadReason.MAX_DELIVERIES, GAVE_UP + last_error)


def expired(seconds: float) -> Verdict:
    return dead(DeadReason.EXPIRED, f"waited {seconds:.1f}s for a worker (limit 30s)")


WRONG_STREAM = "entry for agent 'support' on agent 'dental' stream"
NO_JOB = "missing field 'job'"


@pytest.mark.parametrize(
    ("deliveries", "message", "record", "expected"),
    [
        # Before decoding: only the delivery limit is judged.
        (1, None, {}, DECODE),
        (3, None, {}, DECODE),
        (4, None, {}, gave_up()),
        (4, None, None, gave_up()),  # record unreadable: nothing healthy known
        (4, None, {"last_error": "boom"}, gave_up("boom")),
        # Deliveries that moved a healthy call do not count.
        (6, None, {"healthy": "3"}, DECODE),
        (7, None, {"healthy": "3"}, gave_up()),
        (4, None, {"healthy": "³"}, gave_up()),  # no count: 0
        # Decoded.
        (1, MalformedEntry(NO_JOB), {}, dead(DeadReason.MALFORMED, NO_JOB)),
        (1, job("support"), {}, dead(DeadReason.MALFORMED, WRONG_STREAM)),
        # Forged: whatever the record says (a forged takeover is still forged).
        (1, ForgedEntry("not signed"), {}, dead(DeadReason.FORGED, "not signed")),
        (2, ForgedEntry("not signed"), {"state": "running"}, dead(DeadReason.FORGED, "not signed")),
        (1, ForgedEntry("not signed"), None, dead(DeadReason.FORGED, "not signed")),
        (1, job(), None, Verdict(Action.RETRY, error="its record could not be read")),
        (1, job(), {}, START),
        (1, job(), {"state": "queued"}, START),
        (
            1,
            job(),
            {"terminated": "x"},
            Verdict(Action.FINISH, error="terminated before it started"),
        ),
        (2, job(), {"terminated": "x", "state": "running"}, START),  # a takeover
        (1, job(queued_at=NOW - 31), {}, expired(31)),
        (1, job(queued_at=NOW - 31), {"state": "running"}, START),
        (1, job(queued_at=0.0, enqueued_at=NOW - 40), {}, expired(40)),  # no Redis stamp
    ],
)
def test_verdict(
    deliveries: int,
    message: JobMessage | MalformedEntry | None,
    record: dict[str, str] | None,
    expected: Verdict,
) -> None:
    assert judge(deliveries, message, record, NOW, SETTINGS) == expected


def test_the_age_is_judged_by_redis_clock() -> None:
    message = job(queued_at=NOW - 10)
    # This host's clock is 25 s behind Redis's: the job waited 35 s, not 10.
    assert waited(message, NOW, redis_offset=25.0) == pytest.approx(35.0)
    verdict = judge(1, message, {}, NOW, SETTINGS, redis_offset=25.0)
    assert verdict.reason is DeadReason.EXPIRED


def test_the_limit_follows_the_settings() -> None:
    lenient = replace(SETTINGS, max_deliveries=10)
    assert judge(4, None, {}, NOW, lenient) == Verdict(Action.DECODE)


@pytest.mark.parametrize(
    ("text", "count"),
    [("3", 3), ("", 0), ("-1", 0), ("1e3", 0), ("²", 0), ("9" * 10, 0), ("123456789", 123456789)],
)
def test_small_count(text: str, count: int) -> None:
    assert small_count(text) == count


@pytest.mark.parametrize(
    ("deliveries", "handover", "running", "in_room", "expected"),
    [
        (1, False, False, False, Start.FRESH),
        # A lease lapsed, a process died: the old session is gone.
        (2, False, True, True, Start.TAKEOVER),
        (2, False, False, False, Start.TAKEOVER),
        # A draining worker released it for a peer: its agent is still there.
        (1, True, True, True, Start.TAKEOVER),
        # Read as new, yet the call runs: Redis lost another worker's read.
        (1, False, True, False, Start.CONTESTED),
        (1, False, False, True, Start.CONTESTED),
        (1, False, True, True, Start.CONTESTED),
    ],
)
def test_how_a_job_starts(
    deliveries: int, handover: bool, running: bool, in_room: bool, expected: Start
) -> None:
    assert start_kind(deliveries, handover, running, in_room) is expected

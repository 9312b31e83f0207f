"""The availability desk's answer to an offer: a pure function, table tests, no server."""

from __future__ import annotations

import pytest

from openrtc.agents.routing import Route, UnknownAgentError
from openrtc.dispatcher.admission import AdmissionPolicy
from openrtc.dispatcher.availability import Answer, answer_offer
from openrtc.store.membership import AgentLoad

pytestmark = pytest.mark.unit

DENTAL = Route("dental", 1, "job metadata")
UNKNOWN = UnknownAgentError("pizza", 1, "job metadata")
QUEUE = AdmissionPolicy("queue", max_backlog=2)
REJECT = AdmissionPolicy("reject", max_backlog=2)
IDLE = AgentLoad("dental", workers=1, capacity=4, running=0, backlog=0)
FULL = AgentLoad("dental", workers=1, capacity=1, running=1, backlog=2)
NONE_LIVE = AgentLoad("dental")


@pytest.mark.parametrize(
    ("route", "error", "draining", "load", "redis_ok", "policy", "expected"),
    [
        # Draining: every offer is refused, silently (no reason to log per job).
        (DENTAL, None, True, IDLE, True, QUEUE, Answer("rejected")),
        (None, UNKNOWN, True, None, True, QUEUE, Answer("rejected")),
        (None, None, True, None, True, QUEUE, Answer("rejected")),
        # Routed, with room: accepted, the agent's participant named after it.
        (DENTAL, None, False, IDLE, True, QUEUE, Answer("accepted", "dental")),
        # No live worker: queued under "queue", refused under "reject".
        (DENTAL, None, False, NONE_LIVE, True, QUEUE, Answer("accepted", "dental")),
        (DENTAL, None, False, None, True, QUEUE, Answer("accepted", "dental")),
        (
            DENTAL,
            None,
            False,
            NONE_LIVE,
            True,
            REJECT,
            Answer("rejected", reason="no live worker (policy: reject)"),
        ),
        # Backlog at free slots + max backlog: refused, with the figures.
        (
            DENTAL,
            None,
            False,
            FULL,
            True,
            QUEUE,
            Answer("rejected", reason="backlog 2 >= free slots 0 + max backlog 2"),
        ),
        # Redis down: refused (another dispatcher may reach it).
        (
            DENTAL,
            None,
            False,
            IDLE,
            False,
            QUEUE,
            Answer("rejected", reason="Redis is unreachable"),
        ),
        # Unknown agent: taken (to dead-letter and fail it), whatever Redis or the loads say.
        (None, UNKNOWN, False, None, True, QUEUE, Answer("unknown_agent", "unknown agent pizza")),
        (None, UNKNOWN, False, None, False, REJECT, Answer("unknown_agent", "unknown agent pizza")),
    ],
)
def test_answer_offer(
    route: Route | None,
    error: UnknownAgentError | None,
    draining: bool,
    load: AgentLoad | None,
    redis_ok: bool,
    policy: AdmissionPolicy,
    expected: Answer,
) -> None:
    got = answer_offer(route, error, draining=draining, load=load, redis_ok=redis_ok, policy=policy)
    assert got == expected
    assert got.available == (expected.outcome != "rejected")


def test_an_unknown_agents_participant_name_is_bounded() -> None:
    # The name is requester input: LiveKit gets at most 64 characters of it.
    error = UnknownAgentError("x" * 500, 2, "room metadata")
    answer = answer_offer(None, error, draining=False, load=None, redis_ok=True, policy=QUEUE)
    assert answer.outcome == "unknown_agent"
    assert len(answer.participant_name) == 64
    assert answer.participant_name.startswith("unknown agent x")

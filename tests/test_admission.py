"""The admission policy and the load it reports: pure functions, table tests, no server."""

from __future__ import annotations

import pytest

from openrtc.dispatcher.admission import LIVEKIT_LOAD_THRESHOLD, REPORTED_LOAD_MAX, AdmissionPolicy
from openrtc.store.membership import AgentLoad

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ({}, 0.0),
        ({"dental": AgentLoad("dental")}, 0.0),  # no capacity known: queueing works
        ({"dental": AgentLoad("dental", 1, 10, 0)}, 0.0),
        ({"dental": AgentLoad("dental", 1, 10, 5)}, 0.5 * REPORTED_LOAD_MAX),
        ({"dental": AgentLoad("dental", 1, 10, 10)}, REPORTED_LOAD_MAX),
        ({"dental": AgentLoad("dental", 1, 2, 7)}, REPORTED_LOAD_MAX),  # over capacity
        (
            {"dental": AgentLoad("dental", 1, 4, 4), "support": AgentLoad("support", 1, 4, 0)},
            0.5 * REPORTED_LOAD_MAX,
        ),
    ],
)
def test_reported_load(loads: dict[str, AgentLoad], expected: float) -> None:
    assert AdmissionPolicy.reported_load(loads) == pytest.approx(expected)


def test_the_reported_load_never_reaches_livekits_threshold() -> None:
    # At the threshold LiveKit drops a room's job without asking anyone.
    busy = {"dental": AgentLoad("dental", workers=3, capacity=3, running=3, backlog=50)}
    assert AdmissionPolicy.reported_load(busy) < LIVEKIT_LOAD_THRESHOLD

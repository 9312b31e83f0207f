"""Whether a worker reads the next job or leaves it to a peer: pure functions, table tests."""

from __future__ import annotations

import pytest

from openrtc.errors import ConfigError
from openrtc.settings import LiveKitSettings, WorkerSettings
from openrtc.worker.spread import MAX_DEFER, CpuLoad, PeerLoad, decide

pytestmark = pytest.mark.unit

P = PeerLoad
HOT = True


@pytest.mark.parametrize(
    ("me", "peers", "read"),
    [
        (P(0, 10), [], True),  # alone
        (P(0, 10), [P(0, 10), P(0, 10)], True),  # all idle: nobody waits
        (P(1, 10), [P(1, 10), P(1, 10)], True),  # tied
        (P(1, 10), [P(0, 10)], False),  # a peer holds fewer: its turn
        (P(2, 10), [P(1, 10), P(5, 10)], False),
        (P(1, 10), [P(2, 10), P(3, 10)], True),  # least loaded
        (P(3, 10), [P(0, 0)], True),  # a draining peer (capacity 0) has no room
        (P(3, 10), [P(2, 2)], True),  # a full peer has no room
        (P(10, 10), [P(0, 10)], False),  # full
        (P(10, 10), [], False),
        # CPU threshold: a hot worker leaves calls to cool peers with room...
        (P(0, 10, HOT), [P(4, 10)], False),
        (P(0, 10, HOT), [P(10, 10)], True),  # ...but not to full ones
        # ...and when every worker is hot they all go on, spread by calls held.
        (P(0, 10, HOT), [P(3, 10, HOT)], True),
        (P(3, 10, HOT), [P(1, 10, HOT)], False),
        (P(3, 10, HOT), [P(1, 10, HOT), P(10, 10)], False),
        # A cool worker ignores hot peers' lower counts: they do not want calls.
        (P(5, 10), [P(0, 10, HOT)], True),
    ],
)
def test_decide(me: PeerLoad, peers: list[PeerLoad], read: bool) -> None:
    assert decide(me, peers).read is read


def test_a_job_waits_a_bounded_time_for_a_peer_that_does_not_read() -> None:
    assert not decide(P(3, 10), [P(0, 10)], stalled=MAX_DEFER / 2).read
    assert decide(P(3, 10), [P(0, 10)], stalled=MAX_DEFER).read
    assert not decide(P(10, 10), [P(0, 10)], stalled=MAX_DEFER).read  # still full


def test_cpu_load_is_the_average_over_its_window() -> None:
    readings = iter([0.0, 0.2, 0.4, 1.5, 0.0])
    now = [0.0]
    cpu = CpuLoad(2.0, read=lambda: next(readings), clock=lambda: now[0])
    now[0] = 1.0
    assert cpu.sample() == pytest.approx(0.2)
    now[0] = 2.0
    assert cpu.sample() == pytest.approx(0.3)
    now[0] = 3.0
    assert cpu.sample() == pytest.approx((0.2 + 0.4 + 1.0) / 3)  # clamped to 1
    now[0] = 5.5
    assert cpu.sample() == pytest.approx(0.0)  # older readings left the window


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_load_threshold_must_be_a_share(threshold: float) -> None:
    with pytest.raises(ConfigError, match="--load-threshold"):
        WorkerSettings(LiveKitSettings("ws://x", "k", "s"), "dental", load_threshold=threshold)

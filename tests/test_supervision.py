"""Backoff and error text: pure, table tests, no server."""

from __future__ import annotations

import pytest

from openrtc.supervision import backoff_delay, describe, unwrap_group

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("attempt", "initial", "maximum", "ceiling"),
    [
        (0, 0.25, 10.0, 0.25),
        (1, 0.25, 10.0, 0.5),
        (3, 0.25, 10.0, 2.0),
        (6, 0.25, 10.0, 10.0),  # capped
        (100, 0.1, 2.0, 2.0),  # never overflows
    ],
)
def test_backoff_is_jittered_between_half_and_all_of_its_ceiling(
    attempt: int, initial: float, maximum: float, ceiling: float
) -> None:
    delays = [backoff_delay(attempt, initial, maximum) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > 0  # jittered, not a fixed step


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (None, "unknown error"),
        (OSError("connection refused"), "OSError: connection refused"),
        (TimeoutError(), "TimeoutError"),
    ],
)
def test_describe(exc: BaseException | None, text: str) -> None:
    assert describe(exc) == text


def test_unwrap_group_finds_the_one_real_error() -> None:
    inner = OSError("socket closed")
    assert unwrap_group(BaseExceptionGroup("g", [BaseExceptionGroup("h", [inner])])) is inner
    two = BaseExceptionGroup("g", [OSError("a"), OSError("b")])
    assert unwrap_group(two) is two

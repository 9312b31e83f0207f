"""Percentiles and medians: the one definition of each that every benchmark reports."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

__all__ = ["median", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of unsorted ``values``; nan if empty.

    The one definition every benchmark reports with, so their p50 and p99
    compare: always a value that was measured (the ceil(q/100 * n)-th
    smallest), never one interpolated between two calls.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def median(values: Iterable[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count).

    What the benchmarks print as "median" or "p50" beside a mean; where a p50
    must be a measured value, use ``percentile(values, 50)``. Raises
    ``statistics.StatisticsError`` if ``values`` is empty.
    """
    return statistics.median(values)

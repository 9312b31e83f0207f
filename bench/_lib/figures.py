"""Headline figures for the scoreboard: each benchmark notes its own, scoreboard.py reads them."""

from __future__ import annotations

import json
import os
from typing import Final

__all__ = ["SUMMARY_ENV", "record_figure"]

#: ``bench/scoreboard.py`` sets this to a file; each benchmark appends one JSON
#: line per headline figure to it (nothing is written when it is unset).
SUMMARY_ENV: Final = "OPENRTC_BENCH_SUMMARY"


def record_figure(
    bench: str,
    figure: str,
    *,
    ours: float | None,
    anchor: float | None,
    anchor_label: str,
    unit: str,
    goal: str,
    met: bool | None,
    ratio: float | None = None,
    note: str = "",
) -> None:
    """Note one headline figure beside its anchor for the scoreboard.

    ``ratio`` is printed as the goal reads (for example "ours / plain" for a
    latency, "ours / theirs" for a speed-up); when omitted it is
    ``ours / anchor``. ``met`` is None for a figure without a goal.
    """
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    if ratio is None and ours is not None and anchor:
        ratio = ours / anchor
    line = {
        "bench": bench,
        "figure": figure,
        "ours": ours,
        "anchor": anchor,
        "anchor_label": anchor_label,
        "unit": unit,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        "note": note,
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")

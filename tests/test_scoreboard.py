"""What makes the scoreboard fail (``bench/scoreboard.py``): pure, no benchmark run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scoreboard_under_test", BENCH / "scoreboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


board = _load()


def run(bench: str, code: int = 0) -> dict[str, Any]:
    return {"bench": bench, "command": f"bench/{bench}.py --check", "exit": code, "seconds": 1.0}


def figure(bench: str, met: bool | None, name: str = "p50") -> dict[str, Any]:
    return {"bench": bench, "figure": name, "goal": "<= 1 s", "met": met}


@pytest.mark.parametrize(
    ("runs", "figures", "failed"),
    [
        # Every benchmark green, every goal met (or no goal): the scoreboard passes.
        ([run("e2e")], [figure("e2e", True), figure("e2e", None)], []),
        ([], [], []),
        # The defect: a benchmark exits 0 yet a figure of it missed its goal.
        ([run("density")], [figure("density", False, "PSS")], ["density"]),
        # A benchmark that failed, figures or not.
        ([run("chaos", 1)], [figure("chaos", True)], ["chaos"]),
        ([run("chaos", 1)], [], ["chaos"]),
        # Each reason is named: a failed run and another benchmark's missed goal.
        (
            [run("chaos", 1), run("e2e")],
            [figure("e2e", False), figure("e2e", True, "p99")],
            ["chaos", "e2e"],
        ),
    ],
)
def test_the_scoreboard_fails_on_any_failed_run_or_missed_goal(
    runs: list[dict[str, Any]], figures: list[dict[str, Any]], failed: list[str]
) -> None:
    reasons = board.failures(runs, figures)
    assert [r.split(":")[0] for r in reasons] == failed

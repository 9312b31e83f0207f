"""What makes the scoreboard fail (``bench/scoreboard.py``): pure, no benchmark run."""

from __future__ import annotations

import importlib
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
bench_figures = importlib.import_module("_lib.figures")  # on sys.path once the scoreboard is loaded


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


def _record(bench: str, figure: str, met: bool | None) -> None:
    bench_figures.record_figure(
        bench,
        figure,
        ours=2.0,
        anchor=1.0,
        anchor_label="plain",
        unit="s",
        goal="<= 1.5x plain" if met is not None else "",
        met=met,
    )


@pytest.mark.parametrize(
    ("goals", "exits", "failed"),
    [
        # Every benchmark exited 0 in each case below: the goals alone decide.
        ({("e2e", "p50"): True, ("e2e", "p99"): None}, {"e2e": 0}, []),
        ({("density", "PSS"): False}, {"density": 0}, ["density"]),
        (
            {("e2e", "p50"): True, ("recovery", "p99"): False, ("top", "cost"): False},
            {"e2e": 0, "recovery": 0, "top": 0},
            ["recovery", "top"],
        ),
        # A benchmark that died before recording: a missed row of its own, and a failed run.
        ({("e2e", "p50"): True}, {"e2e": 0, "chaos": 1}, ["chaos", "chaos"]),
    ],
)
def test_every_row_marked_missed_in_the_results_fails_the_scoreboard(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    goals: dict[tuple[str, str], bool | None],
    exits: dict[str, int],
    failed: list[str],
) -> None:
    # The path the scoreboard takes: each benchmark's record_figure lines, read back,
    # rendered into latest.md, then the reasons main() exits 1 on.
    summary = tmp_path / "figures.jsonl"
    monkeypatch.setenv(bench_figures.SUMMARY_ENV, str(summary))
    for (bench, name), met in goals.items():
        _record(bench, name, met)
    runs = [run(bench, code) for bench, code in exits.items()]
    recorded = board.recorded(runs, summary.read_text() if summary.exists() else "")
    text = board.render({"cpus": 2}, runs, recorded)
    missed_rows = [
        line.split("|")[1].strip() for line in text.splitlines() if board.MISSED_MARK in line
    ]
    reasons = board.failures(runs, recorded)
    # Each MISSED row is a reason to fail (and a failed run is one more).
    assert sorted(r.split(":")[0] for r in reasons) == failed
    assert set(missed_rows) <= {r.split(":")[0] for r in reasons}
    assert len(missed_rows) == sum(1 for r in reasons if "missed its goal" in r)

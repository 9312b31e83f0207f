"""One command for every benchmark: run them in turn and write one results file.

Run from the repository root::

    .venv/bin/python bench/scoreboard.py               # every benchmark, ~25 min
    .venv/bin/python bench/scoreboard.py --quick       # smaller runs, ~8 min
    .venv/bin/python bench/scoreboard.py --only routing,dispatch

Each benchmark runs as its own process with ``--check``, one after the other
(never two at once: they measure the machine), and appends its headline
figures to a file named by ``OPENRTC_BENCH_SUMMARY`` (``_lib.figures.record_figure``).
The scoreboard then writes ``bench/results/latest.md`` (and ``.json``) with the
machine, the versions, the date and the commit, one row per figure beside its
anchor and goal, and each benchmark's full output under
``bench/results/logs/``. The figures in the docs point here instead of being
pasted, so they never go stale: rerun the command to refresh them.

Exit status: 0 when every benchmark passed its ``--check`` and every figure
with a goal met it; 1 otherwise, each reason printed (``failures``): a figure
marked **MISSED** in ``latest.md`` never leaves the scoreboard green.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from _lib.figures import SUMMARY_ENV  # noqa: E402


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    what: str


BENCHES: Final = (
    Bench(
        "routing",
        "routing.py",
        (),
        ("--jobs", "5000", "--repeat", "3"),
        "resolve_agent, both call forms, vs openrtc 0.20.1's resolver",
    ),
    Bench(
        "dispatch",
        "dispatch.py",
        (),
        ("--jobs", "10000", "--duration", "5"),
        "one dispatcher's throughput vs redis-py's XADD ceiling; ack p99 at 1000 jobs/s",
    ),
    Bench(
        "e2e",
        "e2e.py",
        ("--calls", "100"),
        ("--calls", "20"),
        "create_dispatch -> agent in the room, vs plain livekit-agents",
    ),
    Bench(
        "density",
        "density.py",
        (),
        ("--sessions", "1,10"),
        "memory and CPU per session: coroutine, process, plain livekit-agents",
    ),
    Bench(
        "chaos",
        "chaos.py",
        (),
        ("--short",),
        "calls through faults, every call accounted for; recovery after SIGKILL",
    ),
    Bench(
        "recovery",
        "recovery.py",
        (),
        ("--calls", "10"),
        "kill -9 of a worker -> its calls' agents back: crash detection vs lease only",
    ),
    Bench(
        "reload",
        "reload.py",
        (),
        ("--saves", "5"),
        "hot reload: a saved module -> the live call on the new code, both isolation modes",
    ),
    Bench(
        "top",
        "top.py",
        (),
        ("--calls", "3", "--seconds", "8"),
        "openrtc top's cost to a worker at 50 sessions: snapshots and loop accounting",
    ),
    # Last: it reads the dispatch and density figures of this same run.
    Bench(
        "capacity",
        "capacity.py",
        (),
        ("--jobs", "500", "--anchor-ops", "50000"),
        "Redis CPU per job and per call; dispatchers, masters, hosts at 1x, 10x, 100x",
    ),
)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def _command_output(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.stdout or out.stderr else "-"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "-"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "-"


def _memory_gb() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "-"
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return f"{int(match.group(1)) / 2**20:.1f} GiB" if match else "-"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    sys.path.insert(0, str(REPO_ROOT))
    from openrtc.devtools.devstack import LIVEKIT_VERSION

    commit = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "openrtc"])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (openrtc/ modified)" if dirty not in ("-", "") else ""),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _memory_gb(),
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "livekit-agents": _version("livekit-agents"),
        "livekit (rtc)": _version("livekit"),
        "redis-py": _version("redis"),
        "hiredis": _version("hiredis"),
        "redis-server": _command_output([shutil.which("redis-server") or "redis-server", "-v"]),
        "livekit-server": LIVEKIT_VERSION,
    }


def run_bench(bench: Bench, args: argparse.Namespace, summary: Path, logs: Path) -> dict[str, Any]:
    """Run one benchmark with ``--check``, its output shown and kept; its status."""
    extra = bench.quick if args.quick else bench.full
    cmd = [sys.executable, str(BENCH_DIR / bench.script), "--check", *extra]
    shown = " ".join(["bench/" + bench.script, "--check", *extra])
    print(f"\n=== {bench.name}: {shown}", flush=True)
    log_path = logs / f"{bench.name}.log"
    env = {**os.environ, SUMMARY_ENV: str(summary)}
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    return {
        "bench": bench.name,
        "command": shown,
        "exit": code,
        "seconds": round(time.monotonic() - started, 1),
    }


def recorded(runs: Sequence[dict[str, Any]], summary: str) -> list[dict[str, Any]]:
    """The figures the benchmarks recorded (one JSON line each, ``record_figure``).

    A benchmark that failed before recording any figure gets one missed row of
    its own, so the results file shows it as well as the exit status.
    """
    figures = [json.loads(line) for line in summary.splitlines() if line]
    for run in runs:
        if run["exit"] != 0 and not any(f["bench"] == run["bench"] for f in figures):
            figures.append(
                {
                    "bench": run["bench"],
                    "figure": "no figures: the benchmark failed before reporting",
                    "ours": None,
                    "anchor": None,
                    "anchor_label": "",
                    "unit": "",
                    "ratio": None,
                    "goal": "",
                    "met": False,
                    "note": f"exit {run['exit']}, see logs/{run['bench']}.log",
                }
            )
    return figures


#: How ``latest.md`` marks a figure whose goal was missed.
MISSED_MARK: Final = "**MISSED**"


def missed(figure: dict[str, Any]) -> bool:
    """Whether this recorded figure missed its goal: shown as ``MISSED_MARK``, fails the run."""
    return figure["met"] is False


def failures(runs: Sequence[dict[str, Any]], figures: Sequence[dict[str, Any]]) -> list[str]:
    """Why this scoreboard fails (none: it passes).

    A benchmark that exited non-zero, and any figure whose goal was missed,
    whatever its benchmark's exit code said: a benchmark's ``--check`` may
    check less than the figures it records.
    """
    reasons = [f"{r['bench']}: exit {r['exit']} (`{r['command']}`)" for r in runs if r["exit"] != 0]
    reasons += [
        f"{f['bench']}: {f['figure']} missed its goal ({f['goal'] or 'no goal text'})"
        for f in figures
        if missed(f)
    ]
    return reasons


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def render(info: dict[str, Any], runs: list[dict[str, Any]], figures: list[dict[str, Any]]) -> str:
    lines = ["# Benchmark scoreboard", ""]
    lines.append(
        "Written by `bench/scoreboard.py`; every figure below comes from one run of it on the "
        "machine described, each benchmark beside its anchor measured in the same run."
    )
    lines += ["", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "| benchmark | figure | ours | anchor | ratio | goal | met |", "|---" * 7 + "|"]
    for f in figures:
        anchor = (
            f"{_fmt(f['anchor'], f['unit'])} ({f['anchor_label']})"
            if f["anchor"] is not None
            else "-"
        )
        ratio = f"{f['ratio']:.2f}x" if f["ratio"] is not None else "-"
        met = MISSED_MARK if missed(f) else {True: "met", None: "-"}[f["met"]]
        figure = f["figure"] + (f" ({f['note']})" if f["note"] else "")
        lines.append(
            f"| {f['bench']} | {figure} | {_fmt(f['ours'], f['unit'])} | {anchor} | {ratio} "
            f"| {f['goal'] or '-'} | {met} |"
        )
    lines += ["", "| benchmark | command | exit | seconds |", "|---|---|---|---|"]
    for r in runs:
        status = "ok" if r["exit"] == 0 else f"**{r['exit']}**"
        lines.append(f"| {r['bench']} | `{r['command']}` | {status} | {r['seconds']:.0f} |")
    lines += ["", "Full output of each benchmark: `logs/<benchmark>.log` beside this file.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs of each benchmark")
    names = [b.name for b in BENCHES]
    parser.add_argument("--only", default=",".join(names), help=f"subset of {','.join(names)}")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="results folder (bench/results)"
    )
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(names)}")

    info = machine()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="openrtc-scoreboard-") as tmp:
        summary = Path(tmp) / "figures.jsonl"
        summary.touch()
        for bench in BENCHES:
            if bench.name in chosen:
                runs.append(run_bench(bench, args, summary, logs))
        figures = recorded(runs, summary.read_text())
    text = render(info, runs, figures)
    (args.out / "latest.md").write_text(text)
    (args.out / "latest.json").write_text(
        json.dumps({"machine": info, "runs": runs, "figures": figures}, indent=1) + "\n"
    )
    print("\n" + text)
    print(f"written: {args.out / 'latest.md'} and latest.json")
    reasons = failures(runs, figures)
    for reason in reasons:
        print(f"FAILED {reason}")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())

"""The capacity model's arithmetic (``bench/capacity.py``): figures in, a table out."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(
        "capacity_model_under_test", BENCH / "capacity.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cap = _load()

# Round numbers, so each expected figure below can be checked by hand.
COSTS = cap.RedisCosts(
    per_job=100.0,
    per_call_second=10.0,
    per_worker_second=1000.0,
    per_dispatcher_agent_second=100.0,
    per_dispatcher_worker_second=10.0,
    record_bytes=1000.0,
    record_ttl=86400.0,
)
FIGURES = cap.Figures(COSTS, dispatcher_jobs_per_s=1000.0, calls_per_core=10.0, mb_per_session=10.0)
SIZING = cap.Sizing(
    host_cores=4,
    host_ram_gb=8.0,
    cpu_budget=0.5,
    ram_budget=0.5,
    redis_ram_gb=1.0,
    agents=2,
    top_agent_share=0.5,
    min_dispatchers=2,
    spare_hosts=1,
)
BASE = cap.Load("1x", peak_calls_per_s=10.0, concurrent_calls=100.0, call_seconds=100.0)


@pytest.mark.parametrize(
    ("name", "figures", "load", "sizing", "expected"),
    [
        (
            # host: min(10 x 4 x 0.5, 8 GB x 0.5 / 10 MB) = 20 calls, cpu; hosts
            # ceil(100 / 20) + 1 = 6, 24 workers; Redis (10x100 + 100x10 + 24x1000
            # + 2 x (2x100 + 24x10)) / 500,000 = 0.05376; memory 1/s x 1 day x 1000 B.
            "baseline",
            FIGURES,
            BASE,
            SIZING,
            dict(
                dispatchers=2,
                hosts=6,
                workers=24,
                host_bound="cpu",
                masters=1,
                cluster=False,
                redis_cpu_share=0.05376,
                top_agent_share=0.026,
                top_agent_fits=True,
                redis_mem_gb=86400 * 1000 / 1024**3,
            ),
        ),
        (
            # 4096 MB / 500 MB = 8 calls per host: memory binds; ceil(100 / 8) + 1.
            "memory-bound host",
            replace(FIGURES, mb_per_session=500.0),
            BASE,
            SIZING,
            dict(hosts=14, workers=56, host_bound="memory"),
        ),
        (
            # 6000/s: 12 dispatchers; Redis (600,000 + 1,000 + 24,000 + 12 x 440)
            # / 500,000 = 1.26 -> two masters, a cluster; the busiest agent 0.625.
            "Redis CPU needs a cluster",
            FIGURES,
            replace(BASE, peak_calls_per_s=6000.0),
            SIZING,
            dict(
                dispatchers=12,
                masters=2,
                cluster=True,
                redis_cpu_share=1.26056,
                top_agent_share=0.625,
                top_agent_fits=True,
            ),
        ),
        (
            # The same load all on one agent: 1.25 masters' worth in one slot.
            "one agent outgrows a master",
            FIGURES,
            replace(BASE, peak_calls_per_s=6000.0),
            replace(SIZING, top_agent_share=1.0),
            dict(masters=2, top_agent_share=1.25, top_agent_fits=False),
        ),
        (
            # 1-second calls: 100 calls/s on average, records for a day:
            # 8.05 GB against 0.5 GB per master -> 17 masters by memory.
            "Redis memory needs a cluster",
            FIGURES,
            replace(BASE, call_seconds=1.0),
            SIZING,
            dict(masters=17, cluster=True, redis_mem_gb=100 * 86400 * 1000 / 1024**3),
        ),
        (
            # No density figure: no hosts; one worker per 50 calls stands in
            # for the per-worker Redis term (2 workers).
            "no density figures",
            replace(FIGURES, calls_per_core=None, mb_per_session=None),
            BASE,
            SIZING,
            dict(
                hosts=None,
                workers=None,
                host_bound="-",
                redis_cpu_share=(1000 + 1000 + 2000 + 2 * (200 + 20)) / 500_000,
            ),
        ),
    ],
)
def test_plan(
    name: str, figures: object, load: object, sizing: object, expected: dict[str, object]
) -> None:
    row = cap.plan(figures, load, sizing)
    for field, want in expected.items():
        got = getattr(row, field)
        if isinstance(want, float):
            assert got == pytest.approx(want), (name, field)
        else:
            assert got == want, (name, field)


def test_table_scales_the_baseline() -> None:
    rows = cap.capacity_table(FIGURES, BASE, SIZING, (1, 10, 100))
    assert [r.load.label for r in rows] == ["1x", "10x", "100x"]
    assert [r.load.peak_calls_per_s for r in rows] == [10.0, 100.0, 1000.0]
    assert [r.load.concurrent_calls for r in rows] == [100.0, 1000.0, 10000.0]
    # 10,000 calls / 20 per host + 1 spare; 1000/s / 500 per dispatcher.
    assert (rows[2].hosts, rows[2].dispatchers) == (501, 2)
    assert "| 100x | 1000 | 10000 | 2 (need 2.00) | 501 (cpu-bound, +1 spare) |" in "\n".join(
        cap.render_table(rows, SIZING)
    )


def test_one_master() -> None:
    jobs, calls = cap.one_master(FIGURES, SIZING, call_seconds=100.0)
    assert jobs == pytest.approx(500_000 / 100)
    # Each call costs 10 us/s running plus its job spread over 100 s.
    assert calls == pytest.approx(500_000 / (10 + 100 / 100))


def test_figures_of_other_benchmarks() -> None:
    found = cap.Found()
    cap.extract(
        [
            {
                "bench": "dispatch",
                "figure": "throughput, one dispatcher",
                "ours": 4000.0,
                "note": "dispatcher CPU 125 us/job",
            },
            {"bench": "density", "figure": "calls per core", "ours": 30.0},
            {"bench": "density", "figure": "coroutine / process RSS at 50 sessions", "ours": 350.0},
            {"bench": "density", "figure": "calls per core", "ours": 99.0},  # first wins
        ],
        found,
        "run",
    )
    assert found.dispatcher_jobs_per_s == pytest.approx(8000.0)  # from CPU, not wall time
    assert found.dispatcher_wall_jobs_per_s == 4000.0
    assert (found.calls_per_core, found.mb_per_session, found.sources) == (30.0, 7.0, ["run"])
    assert math.isclose(
        cap.command_usec({"cmdstat_evalsha": {"usec": 5}, "cmdstat_hset": {"usec": 2}}), 5
    )
    assert (
        cap.command_usec(
            {
                "cmdstat_exec": {"usec": 7},
                "cmdstat_multi": {"usec": 1},
                "cmdstat_xack": {"usec": 3},
                "cmdstat_info": {"usec": 9},
            }
        )
        == 8
    )

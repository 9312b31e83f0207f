"""The openrtc 0.20.1 side of ``bench/routing.py``; runs inside ``.bench-venv``.

Not meant to be run by hand. ``routing.py`` calls it twice with the corpus it
generated: ``--mode resolve`` writes the agent each job routes to (for the
correctness check), ``--mode time`` writes the pass timings. Results go to the
``--out`` JSON file, so nothing a library prints can corrupt them.

What is timed per job is what 0.20.1 does per call on its hot path
(``openrtc.core.wiring.build_session``):
``_resolve_agent_config(agents, ctx)``, which wraps ``ctx`` with
``for_livekit(ctx)``, runs ``_resolve_agent_name(agents.keys(), view)`` and
looks the name up in the ``dict[str, AgentConfig]`` registry.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _lib.corpus import CorpusRecord, build_jobs, measure, quiet_logging, runtime_info

LEGACY_VERSION = "0.20.1"

# Before importing openrtc, so nothing it sets up can emit INFO records.
LOG_LEVELS = quiet_logging()

from livekit.agents import Agent  # noqa: E402
from openrtc.core.config import AgentConfig  # noqa: E402
from openrtc.routing.resolver import _resolve_agent_config  # noqa: E402

import openrtc  # noqa: E402


class BenchAgent(Agent):
    """A real ``livekit.agents.Agent`` subclass; ``AgentConfig`` insists on one."""


class _PreConnectRoom:
    """The rtc ``Room`` of a ``JobContext`` before ``connect()``: no name, no metadata."""

    __slots__ = ("metadata", "name")

    def __init__(self) -> None:
        self.name = ""
        self.metadata = ""


class _Ctx:
    """The two ``JobContext`` attributes 0.20.1's routing reads."""

    __slots__ = ("job", "room")

    def __init__(self, job: Any, room: _PreConnectRoom) -> None:
        self.job = job
        self.room = room


def _check_installation() -> None:
    installed = runtime_info()["openrtc"]
    location = Path(openrtc.__file__).resolve()
    if installed != LEGACY_VERSION or not location.is_relative_to(Path(sys.prefix).resolve()):
        raise SystemExit(
            f"expected openrtc {LEGACY_VERSION} from {sys.prefix}, "
            f"got {installed} imported from {location}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=("resolve", "time"), required=True)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--by-step", action="store_true")
    args = parser.parse_args()
    _check_installation()

    corpus = json.loads(args.corpus.read_text())
    records: list[CorpusRecord] = corpus["jobs"]
    agents: dict[str, AgentConfig] = {
        name: AgentConfig(name=name, agent_cls=BenchAgent) for name in corpus["agents"]
    }
    room = _PreConnectRoom()
    ctxs = [_Ctx(job, room) for job in build_jobs(records)]

    result: dict[str, Any] = {"info": runtime_info(), "log_levels": LOG_LEVELS}
    if args.mode == "resolve":
        chosen: list[str] = []
        for ctx in ctxs:
            try:
                chosen.append(_resolve_agent_config(agents, ctx).name)
            except Exception as exc:
                chosen.append(f"!{type(exc).__name__}: {exc}")
        result["chosen"] = chosen
    else:

        def make_pass(batch: list[_Ctx]) -> Callable[[], None]:
            def run() -> None:
                resolve = _resolve_agent_config
                registry = agents
                for ctx in batch:
                    resolve(registry, ctx)

            return run

        result["pass_ns"] = measure(make_pass(ctxs), repeat=args.repeat, warmup=args.warmup)
        if args.by_step:
            by_step: dict[str, list[int]] = {}
            for category in corpus["categories"]:
                batch = [c for c, r in zip(ctxs, records, strict=True) if r["category"] == category]
                if batch:
                    by_step[category] = measure(
                        make_pass(batch), repeat=args.repeat, warmup=args.warmup
                    )
            result["by_step_ns"] = by_step
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

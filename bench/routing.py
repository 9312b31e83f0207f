"""Benchmark ``openrtc.agents.routing.resolve_agent`` against the resolver of openrtc 0.20.1.

Run from the repository root::

    .venv/bin/python bench/routing.py            # 20000 jobs, 8 agents, best of 7
    .venv/bin/python bench/routing.py --check    # exit 1 below the 2.5x goal

Both packages are imported as ``openrtc``, so 0.20.1 runs in its own virtual
environment, ``.bench-venv`` at the repository root, created on first use with
``uv sync --locked --project bench/legacy``: openrtc 0.20.1 with this
project's locked livekit-agents and protobuf, at ``bench/legacy/uv.lock``'s versions. This
script generates one seeded corpus of distinct jobs, writes it to a JSON file,
and routes it on both sides as real ``livekit.protocol.agent.Job`` messages:

* this project, in this interpreter: ``resolve_agent(job, table)`` with a
  ``RoutingTable`` compiled once;
* this project with a custom router (``openrtc.router``, step 0) that lets
  every job fall through: the router's added cost, beside the chain alone;
* 0.20.1, in a child process of the bench venv (``_routing_legacy.py``):
  ``_resolve_agent_config(agents, ctx)``, i.e. ``for_livekit(ctx)``, then
  ``_resolve_agent_name(agents.keys(), view)``, then the registry look-up,
  with one pre-built context object per job.

Before anything is timed, every job's agent is checked to be the same on both
sides (and the one the generator intended); any difference aborts the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from _lib.corpus import (
    ROUTING_LOGGERS,
    CorpusRecord,
    build_jobs,
    measure,
    quiet_logging,
    runtime_info,
)
from _lib.figures import record_figure
from _lib.stats import median

quiet_logging()

# The child imports livekit.agents (0.20.1 needs it), and so does a real
# dispatcher. Import it here too: it loads livekit.rtc, after which reading a
# protobuf field costs measurably more (about 70 -> 220 ns a read here, upb),
# so leaving it out would flatter this side.
import livekit.agents  # noqa: E402, F401

from openrtc.agents.routing import (  # noqa: E402
    ROUTER_BUDGET,
    Router,
    RouteRequest,
    RoutingTable,
    resolve_agent,
)

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
LEGACY_SCRIPT: Final = BENCH_DIR / "_routing_legacy.py"
#: The locked project (bench/legacy) whose venv runs 0.20.1's side.
LEGACY_PROJECT: Final = BENCH_DIR / "legacy"
LEGACY_VERSION: Final = "0.20.1"
GOAL: Final = 2.5


#: The numbers a SIP router knows: none of the corpus's callers, so every job
#: falls through and routes as by the chain alone (checked before timing).
DIALLED: Final = {f"+1999{n:07d}": "support" for n in range(1000)}


def _router_returning_none(request: RouteRequest) -> str | None:
    """The mechanism alone: the request built, the call made, the chain decides."""
    return None


def _sip_router(request: RouteRequest) -> str | None:
    """A typical router: a number from the job metadata (its JSON parsed), looked up."""
    dialled = request.job_data.get("caller")
    return DIALLED.get(dialled) if isinstance(dialled, str) else None


#: The custom routers timed beside the chain alone (``openrtc.router``, step 0).
ROUTERS: Final = (
    ("a router returning None", _router_returning_none),
    ("a SIP router (job_data look-up)", _sip_router),
)


class Category(NamedTuple):
    key: str
    label: str
    percent: int
    step: int  # the step of this project's chain that should match


CATEGORIES: Final = (
    Category("job-agent", 'job metadata "agent"', 35, 1),
    Category("job-demo", 'job metadata "demo"', 5, 2),
    Category("room-agent", 'room metadata "agent"', 15, 3),
    Category("room-demo", 'room metadata "demo"', 5, 4),
    Category("prefix", "room-name prefix", 25, 5),
    Category("default", "default fallback", 15, 6),
)

# Dash-free, so no name is a "<name>-" prefix of another: 0.20.1 takes the first
# registered prefix match and this project the longest, which only differ then.
AGENT_NAMES: Final = (
    "dental",
    "restaurant",
    "support",
    "billing",
    "sales",
    "scheduling",
    "pharmacy",
    "insurance",
    "realestate",
    "hotel",
    "veterinary",
    "plumbing",
    "salon",
    "autorepair",
    "tutoring",
    "fitness",
)
TENANTS: Final = (
    "brightsmile",
    "acme_health",
    "northside",
    "luigis",
    "harborview",
    "t_01923",
    "greenleaf",
    "metro_clinic",
)
CAMPAIGNS: Final = (
    "spring-recall",
    "no-show-followup",
    "new-patient",
    "holiday-hours",
    "reservation-confirm",
    "renewal-q3",
    "win-back",
    "inbound",
)
REGIONS: Final = ("us-east-1", "us-west-2", "eu-central-1", "ap-southeast-2")
_ALNUM: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def agent_names(count: int) -> list[str]:
    """``count`` distinct, dash-free names: the realistic ones, then ``deskN``."""
    names = list(AGENT_NAMES[:count])
    names += [f"desk{i}" for i in range(len(names), count)]
    return names


class CorpusMaker:
    """Seeded generator of distinct, realistic jobs (see the module docstring)."""

    def __init__(self, seed: int, agents: Sequence[str]) -> None:
        self.rng = random.Random(seed)
        self.agents = list(agents)
        self.serial = 1000

    # --- building blocks ---------------------------------------------------

    def number(self) -> int:
        self.serial += self.rng.randint(1, 7)
        return self.serial

    def token(self, length: int) -> str:
        return "".join(self.rng.choices(_ALNUM, k=length))

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def phone(self) -> str:
        """An E.164 number: mostly North American, some UK, German, Australian mobiles."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.8:
            area = f"{rng.randint(2, 9)}{rng.randint(0, 8)}{rng.randint(0, 9)}"
            return f"+1{area}{rng.randint(2, 9)}{rng.randint(0, 99):02d}{rng.randint(0, 9999):04d}"
        if kind < 0.9:
            return f"+447{rng.randint(100_000_000, 999_999_999)}"
        if kind < 0.95:
            return f"+4915{rng.randint(100_000_000, 999_999_999)}"
        return f"+614{rng.randint(10_000_000, 99_999_999)}"

    def dumps(self, value: object) -> str:
        """JSON as a Python SDK (spaced) or a JS one (compact) would write it."""
        if self.rng.random() < 0.5:
            return json.dumps(value)
        return json.dumps(value, separators=(",", ":"))

    def other_agent(self, name: str) -> str:
        others = [a for a in self.agents if a != name]
        return self.rng.choice(others) if others else name

    # --- metadata ----------------------------------------------------------

    def agent_job_metadata(self, agent: str, caller: str) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            value: dict[str, Any] = {
                "agent": agent,
                "caller": caller,
                "campaign": rng.choice(CAMPAIGNS),
            }
        elif roll < 0.7:
            value = {
                "caller": caller,
                "tenant": rng.choice(TENANTS),
                "agent": agent,
                "call_id": self.uuid(),
            }
        elif roll < 0.8:
            value = {"agent": agent, "demo": self.other_agent(agent), "caller": caller}
        elif roll < 0.9:
            value = {
                "agent": agent,
                "caller": caller,
                "context": {
                    "tenant": rng.choice(TENANTS),
                    "locale": rng.choice(("en-US", "en-GB", "es-US", "de-DE")),
                    "attempt": rng.randint(1, 3),
                    "tags": rng.sample(["vip", "returning", "after-hours", "callback"], 2),
                },
            }
        elif roll < 0.95:
            value = {"agent": f" {agent} ", "caller": caller, "call_id": self.uuid()}
        else:
            value = {"agent": agent, "call_id": self.uuid()}
        return self.dumps(value)

    def demo_job_metadata(self, agent: str, caller: str) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            value: dict[str, Any] = {
                "demo": agent,
                "caller": caller,
                "campaign": rng.choice(CAMPAIGNS),
            }
        elif roll < 0.8:
            value = {"agent": "", "demo": agent, "caller": caller}
        else:
            value = {"agent": None, "demo": agent, "tenant": rng.choice(TENANTS)}
        return self.dumps(value)

    def agent_room_metadata(self, key: str, agent: str) -> str:
        rng = self.rng
        value: dict[str, Any] = {key: agent, "tenant": rng.choice(TENANTS)}
        if rng.random() < 0.5:
            value["region"] = rng.choice(REGIONS)
            value["created_by"] = "sip-dispatch-rule"
        if rng.random() < 0.3:
            value["room_id"] = self.uuid()
        return self.dumps(value)

    def plain_job_metadata(self, caller: str) -> str:
        """Job metadata that names no agent, in the shapes callers send."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.40:
            value: Any = {
                "caller": caller,
                "tenant": rng.choice(TENANTS),
                "campaign": rng.choice(CAMPAIGNS),
                "call_id": self.uuid(),
            }
            if rng.random() < 0.2:
                value["note"] = f'caller said "{rng.choice(("urgent", "callback", "billing"))}"'
            return self.dumps(value)
        if roll < 0.55:
            value = {
                "sip": {"trunk_id": f"ST_{self.token(12)}", "from": caller, "to": self.phone()},
                "tenant": rng.choice(TENANTS),
            }
            return self.dumps(value)
        if roll < 0.75:
            return ""
        if roll < 0.85:
            return rng.choice(
                (
                    f"caller={caller};tenant={rng.choice(TENANTS)}",
                    f"inbound call from {caller}",
                    caller,
                )
            )
        if roll < 0.93:
            blank = rng.choice((None, "", "  "))
            return self.dumps({"agent": blank, "caller": caller, "tenant": rng.choice(TENANTS)})
        if roll < 0.97:
            return rng.choice((" ", "\n", "  \t"))
        return self.dumps(rng.choice((["inbound", caller], caller, None)))

    def plain_room_metadata(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.65:
            return ""
        if roll < 0.90:
            return self.dumps(
                {
                    "tenant": rng.choice(TENANTS),
                    "region": rng.choice(REGIONS),
                    "created_by": "sip-dispatch-rule",
                }
            )
        if roll < 0.95:
            return self.dumps({"recording": True, "max_participants": rng.randint(2, 6)})
        return f"region={rng.choice(REGIONS)}"

    # --- room names --------------------------------------------------------

    def prefixed_room(self, agent: str, caller: str) -> str:
        roll = self.rng.random()
        if roll < 0.4:
            return f"{agent}-call-{self.uuid()}"
        if roll < 0.7:
            return f"{agent}-room-{self.number()}"
        if roll < 0.9:
            return f"{agent}-{caller}-{self.token(6)}"
        return f"{agent}-{self.uuid().replace('-', '')[:12]}"

    def neutral_room(self, caller: str) -> str:
        """A room name that starts with no registered ``<agent>-``."""
        while True:
            roll = self.rng.random()
            if roll < 0.3:
                name = f"sip-{caller}-{self.token(6)}"
            elif roll < 0.5:
                name = f"general-chat-{self.number()}"
            elif roll < 0.7:
                name = f"call-{caller}_{self.token(8)}"
            elif roll < 0.85:
                name = f"web-{self.uuid()}"
            else:
                name = f"room-{self.number()}"
            if not any(name.startswith(f"{a}-") for a in self.agents):
                return name

    def any_room(self, caller: str) -> str:
        """Metadata decides these jobs; half their rooms still carry an agent prefix."""
        if self.rng.random() < 0.5:
            return self.prefixed_room(self.rng.choice(self.agents), caller)
        return self.neutral_room(caller)

    # --- jobs --------------------------------------------------------------

    def job(self, category: str) -> CorpusRecord:
        rng = self.rng
        caller = self.phone()
        agent = rng.choice(self.agents)
        job_metadata = self.plain_job_metadata(caller)
        room_metadata = self.plain_room_metadata()
        if category == "job-agent":
            job_metadata = self.agent_job_metadata(agent, caller)
            room_name = self.any_room(caller)
        elif category == "job-demo":
            job_metadata = self.demo_job_metadata(agent, caller)
            room_name = self.any_room(caller)
        elif category == "room-agent":
            room_metadata = self.agent_room_metadata("agent", agent)
            room_name = self.any_room(caller)
        elif category == "room-demo":
            room_metadata = self.agent_room_metadata("demo", agent)
            room_name = self.any_room(caller)
        elif category == "prefix":
            room_name = self.prefixed_room(agent, caller)
        else:
            agent = self.agents[0]
            room_name = self.neutral_room(caller)
        return CorpusRecord(
            id=f"AJ_{self.token(12)}",
            room_sid=f"RM_{self.token(12)}",
            room_name=room_name,
            metadata=job_metadata,
            room_metadata=room_metadata,
            category=category,
            expected=agent,
        )

    def corpus(self, size: int) -> list[CorpusRecord]:
        """``size`` jobs in the CATEGORIES mix (largest remainder), shuffled."""
        exact = [size * c.percent / 100 for c in CATEGORIES]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
        for i in by_remainder[: size - sum(counts)]:
            counts[i] += 1
        plan = [c.key for c, n in zip(CATEGORIES, counts, strict=True) for _ in range(n)]
        self.rng.shuffle(plan)
        return [self.job(category) for category in plan]


# --- the 0.20.1 side -----------------------------------------------------------


def _run(cmd: Sequence[str | Path], *, what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")
    return proc


def ensure_legacy_venv(venv: Path, *, reinstall: bool) -> Path:
    """The bench venv's python, holding exactly what ``bench/legacy/uv.lock`` names.

    ``uv sync --locked`` resolves nothing: both sides run the versions CI ran,
    and a warm venv is checked and left alone in well under a second.
    """
    uv = _run(["bash", REPO_ROOT / "scripts" / "uv.sh"], what="scripts/uv.sh").stdout.strip()
    cmd: list[str | Path] = [uv, "sync", "--quiet", "--locked", "--project", LEGACY_PROJECT]
    cmd += ["--python", sys.executable]
    if reinstall:
        cmd.append("--reinstall")
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never"}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"uv sync of {venv} failed (exit {proc.returncode})")
    return venv / "bin" / "python"


def run_legacy(python: Path, corpus: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    out = corpus.with_name(f"legacy-{mode}.json")
    cmd: list[str | Path] = [python, "-E", "-s", LEGACY_SCRIPT, "--corpus", corpus]
    cmd += ["--out", out, "--mode", mode]
    cmd += ["--repeat", str(args.repeat), "--warmup", str(args.warmup)]
    if args.by_step:
        cmd.append("--by-step")
    _run(cmd, what=f"openrtc {LEGACY_VERSION} child ({mode})")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# --- checks and report ---------------------------------------------------------


def verify(records: Sequence[CorpusRecord], ours: Sequence[Any], theirs: Sequence[str]) -> None:
    """Abort unless both resolvers chose the intended agent (and step) for every job."""
    steps = {c.key: c.step for c in CATEGORIES}
    problems: list[str] = []
    for i, (record, route, legacy) in enumerate(zip(records, ours, theirs, strict=True)):
        step = getattr(route, "step", None)
        mine = getattr(route, "agent", route)
        if mine == legacy == record["expected"] and step == steps[record["category"]]:
            continue
        problems.append(
            f"  job {i} [{record['category']}] room={record['room_name']!r} "
            f"metadata={record['metadata']!r} room_metadata={record['room_metadata']!r}: "
            f"expected {record['expected']!r}, this project {route!r}, 0.20.1 {legacy!r}"
        )
    if problems:
        shown = "\n".join(problems[:10])
        raise SystemExit(
            f"routing mismatch on {len(problems)} of {len(records)} jobs; nothing timed.\n{shown}"
        )


def _shape(text: str) -> str:
    if not text.strip():
        return "empty"
    try:
        value = json.loads(text)
    except ValueError:
        return "non-JSON"
    return "JSON object" if isinstance(value, dict) else "other JSON"


def _mix(values: Sequence[str], order: Sequence[str] = ()) -> str:
    counts = Counter(values)
    keys = [k for k in order if k in counts] or [k for k, _ in counts.most_common()]
    return ", ".join(f"{k} {100 * counts[k] / len(values):.1f}%" for k in keys)


def _rate(ns_per_job: float) -> str:
    per_second = 1e9 / ns_per_job
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M"
    return f"{per_second / 1e3:.0f}k"


def _per_job(passes: Sequence[int], jobs: int) -> tuple[float, float]:
    """(best, median) nanoseconds per job."""
    return min(passes) / jobs, median(passes) / jobs


def report(
    args: argparse.Namespace,
    records: Sequence[CorpusRecord],
    agents: Sequence[str],
    legacy: dict[str, Any],
    ours_ns: Sequence[int],
    list_ns: Sequence[int],
    ours_by_step: dict[str, list[int]],
    router_ns: dict[str, list[int]],
) -> dict[str, float]:
    """Print the table; return the best-pass speedup of each call form."""
    n = len(records)
    theirs_best, theirs_median = _per_job(legacy["pass_ns"], n)
    ours_best, ours_median = _per_job(ours_ns, n)
    list_best, list_median = _per_job(list_ns, n)
    speedups = {"table": theirs_best / ours_best, "list": theirs_best / list_best}
    mine, other = runtime_info(), legacy["info"]
    labels = {c.key: c.label for c in CATEGORIES}

    print(
        f"routing: {n} distinct jobs, {len(agents)} agents ({', '.join(agents[:4])}"
        f"{', ...' if len(agents) > 4 else ''}), seed {args.seed}; "
        f"best and median of {args.repeat} passes after {args.warmup} warm-up, gc off"
    )
    mix = _mix([labels[r["category"]] for r in records], [c.label for c in CATEGORIES])
    print(f"corpus mix: {mix}")
    print(f"job metadata: {_mix([_shape(r['metadata']) for r in records])}")
    print(f"room metadata: {_mix([_shape(r['room_metadata']) for r in records])}")
    for side, info in (("this project", mine), (f"openrtc {LEGACY_VERSION}", other)):
        print(
            f"{side + ':':17} {info['python']}, protobuf {info['protobuf']}, "
            f"livekit-agents {info['livekit-agents']}, livekit-protocol {info['livekit-protocol']}"
        )
    print(
        "logging: root logger at WARNING on both sides, so neither resolver emits its INFO "
        f"records (checked: INFO off for {', '.join(ROUTING_LOGGERS)})"
    )
    print(f"verified: all {n} jobs route to the same agent on both sides (and as generated)")
    print()
    print(f"{'resolver':<22}{'us/job':>9}{'median':>9}{'jobs/s':>9}")
    print(
        f"{'openrtc ' + LEGACY_VERSION:<22}{theirs_best / 1e3:>9.2f}{theirs_median / 1e3:>9.2f}"
        f"{_rate(theirs_best):>9}"
    )
    for label, best, middle in (
        ("this project, table", ours_best, ours_median),
        ("this project, list", list_best, list_median),
    ):
        print(f"{label:<22}{best / 1e3:>9.2f}{middle / 1e3:>9.2f}{_rate(best):>9}")
    for form, best, middle in (("table", ours_best, ours_median), ("list", list_best, list_median)):
        print(
            f"{'speedup, ' + form:<22}{theirs_best / best:>8.1f}x{theirs_median / middle:>8.1f}x"
            f"   (goal >= {args.goal:g}x)"
        )
    for form, best in (("table", ours_best), ("list", list_best)):
        record_figure(
            "routing",
            f"resolve_agent(job, {'RoutingTable' if form == 'table' else '[names]'})",
            ours=best / 1e3,
            anchor=theirs_best / 1e3,
            anchor_label=f"openrtc {LEGACY_VERSION}",
            unit="us/job",
            ratio=theirs_best / best,
            goal=f">= {args.goal:g}x faster",
            met=theirs_best / best >= args.goal,
        )
    print(f"  {LEGACY_VERSION}: _resolve_agent_config(agents, ctx) per job")
    print("  this project, table: resolve_agent(job, RoutingTable) per job")
    print("  this project, list: resolve_agent(job, [names...]) per job (table cached by names)")

    if router_ns:
        print()
        print(f"{'custom router (step 0)':<34}{'us/job':>9}{'median':>9}{'added':>9}")
        print(f"{'none: the chain alone':<34}{ours_best / 1e3:>9.2f}{ours_median / 1e3:>9.2f}")
        for label, passes in router_ns.items():
            best, middle = _per_job(passes, n)
            print(
                f"{label:<34}{best / 1e3:>9.2f}{middle / 1e3:>9.2f}"
                f"{(best - ours_best) / 1e3:>+9.2f}"
            )
            record_figure(
                "routing",
                f"resolve_agent(job, RoutingTable + {label})",
                ours=best / 1e3,
                anchor=ours_best / 1e3,
                anchor_label="the chain alone",
                unit="us/job",
                goal="",
                met=None,
            )
        print(
            "  every job falls through these routers (checked: same route as the chain alone); "
            f"a call's budget is {ROUTER_BUDGET * 1e3:g} ms"
        )

    if ours_by_step:
        print()
        print(f"{'by step (best us/job)':<26}{'jobs':>6}{LEGACY_VERSION:>9}{'ours':>9}{'ratio':>8}")
        categories = Counter(r["category"] for r in records)
        for c in CATEGORIES:
            if c.key not in ours_by_step:
                continue
            count = categories[c.key]
            theirs_step = min(legacy["by_step_ns"][c.key]) / count / 1e3
            ours_step = min(ours_by_step[c.key]) / count / 1e3
            print(
                f"{f'{c.step} {c.label}':<26}{count:>6}{theirs_step:>9.2f}{ours_step:>9.2f}"
                f"{theirs_step / ours_step:>7.1f}x"
            )
    return speedups


def _our_pass(jobs: Sequence[Any], agents: RoutingTable | list[str]) -> Callable[[], None]:
    def run() -> None:
        resolve = resolve_agent
        registry = agents
        for job in jobs:
            resolve(job, registry)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time resolve_agent against openrtc 0.20.1's resolver on one corpus."
    )
    parser.add_argument("--jobs", type=int, default=20_000, help="distinct jobs (20000)")
    parser.add_argument("--repeat", type=int, default=7, help="timed passes per side (7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first (2)")
    parser.add_argument("--agents", type=int, default=8, help="registered agents (8)")
    parser.add_argument("--seed", type=int, default=20_251_128, help="corpus seed")
    parser.add_argument("--by-step", action="store_true", help="also time each routing step")
    parser.add_argument("--check", action="store_true", help="exit 1 if the speedup < --goal")
    parser.add_argument("--goal", type=float, default=GOAL, help=f"speedup goal ({GOAL:g})")
    parser.add_argument(
        "--venv", type=Path, default=REPO_ROOT / ".bench-venv", help="venv for 0.20.1"
    )
    parser.add_argument("--reinstall", action="store_true", help="reinstall the venv's packages")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.repeat < 1 or args.warmup < 0 or args.agents < 1:
        parser.error("--jobs, --repeat and --agents must be >= 1, --warmup >= 0")

    ours_from = Path(sys.modules[resolve_agent.__module__].__file__ or "").resolve()
    if not ours_from.is_relative_to(REPO_ROOT):
        raise SystemExit(f"this side imported openrtc from {ours_from}, not from {REPO_ROOT}")
    agents = agent_names(args.agents)
    records = CorpusMaker(args.seed, agents).corpus(args.jobs)
    python = ensure_legacy_venv(args.venv, reinstall=args.reinstall)

    table = RoutingTable(agents)
    jobs = build_jobs(records)
    with tempfile.TemporaryDirectory(prefix="openrtc-bench-") as tmp:
        corpus_path = Path(tmp) / "corpus.json"
        categories = [c.key for c in CATEGORIES]
        corpus_path.write_text(
            json.dumps({"agents": agents, "categories": categories, "jobs": records})
        )

        # Correctness first: nothing is timed until both sides agree on every job.
        chosen = run_legacy(python, corpus_path, "resolve", args)["chosen"]
        ours_routes: list[Any] = []
        for job in jobs:
            try:
                ours_routes.append(resolve_agent(job, table))
            except Exception as exc:
                ours_routes.append(f"!{type(exc).__name__}: {exc}")
        verify(records, ours_routes, chosen)

        legacy = run_legacy(python, corpus_path, "time", args)
    ours_ns = measure(_our_pass(jobs, table), repeat=args.repeat, warmup=args.warmup)
    # The docstring allows a plain list of names: the same jobs, routed that way.
    list_ns = measure(_our_pass(jobs, list(agents)), repeat=args.repeat, warmup=args.warmup)
    router_ns: dict[str, list[int]] = {}
    for label, function in ROUTERS:
        routed = RoutingTable(agents, router=Router(function, f"bench:{function.__name__}"))
        for job, expected in zip(jobs, ours_routes, strict=True):
            if resolve_agent(job, routed) != expected:
                raise SystemExit(f"{label}: a job routed otherwise than by the chain alone")
        router_ns[label] = measure(_our_pass(jobs, routed), repeat=args.repeat, warmup=args.warmup)
    ours_by_step: dict[str, list[int]] = {}
    if args.by_step:
        for category in categories:
            batch = [j for j, r in zip(jobs, records, strict=True) if r["category"] == category]
            if batch:
                ours_by_step[category] = measure(
                    _our_pass(batch, table), repeat=args.repeat, warmup=args.warmup
                )

    speedups = report(args, records, agents, legacy, ours_ns, list_ns, ours_by_step, router_ns)
    failed = [f"{form} {x:.2f}x" for form, x in speedups.items() if x < args.goal]
    if args.check and failed:
        print(f"FAIL: below the {args.goal:g}x goal: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

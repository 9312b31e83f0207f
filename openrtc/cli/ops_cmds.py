"""``openrtc status`` and ``openrtc dlq``: the operator's reads and repairs, from Redis."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

import typer
from rich.table import Table

from openrtc.cli.app import (
    AgentsDirPositional,
    JsonFlag,
    Namespace,
    RedisUrl,
    SigningKeyFile,
    _Checked,
    _fail,
    _load_pool,
    _out,
    _print_json,
    app,
)
from openrtc.cli.service_cmds import _signing
from openrtc.errors import OpenRTCError
from openrtc.settings import (
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    redact_url,
)
from openrtc.wire.messages import DeadReason


def _keys(namespace: str, redis_url: str) -> Any:
    """The key layout for ``redis_url``: hash-tagged per agent under a cluster URL."""
    from openrtc.store.streams import service_keys

    return service_keys(namespace, redis_url)


def _with_redis(redis_url: str, work: Any) -> Any:
    """Run ``work(redis)`` against Redis, turning connection errors into one line."""
    import anyio

    from openrtc.store.redis_access import misconfiguration
    from openrtc.store.streams import REDIS_DOWN, connect_redis

    async def go() -> Any:
        client = connect_redis(redis_url)
        try:
            return await work(client)
        finally:
            await client.aclose()

    try:
        return anyio.run(go)
    except OpenRTCError as exc:
        _fail(str(exc))
    except REDIS_DOWN as exc:
        _fail(f"Redis at {redact_url(redis_url)}: {misconfiguration(exc) or exc}")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m"


def _status_view(result: Any, namespace: str) -> Any:
    """The status tables as one renderable (printed once, or refreshed by --watch)."""
    from rich.console import Group
    from rich.text import Text

    only = f", tenant {result.tenant!r}" if result.tenant is not None else ""
    table = Table(title=f"Agents (namespace {namespace!r}{only})", title_justify="left")
    for column in ("agent", "workers", "running/capacity", "backlog", "pending", "oldest waiting"):
        table.add_column(column)
    for agent in result.agents:
        table.add_row(
            agent.agent,
            str(len(agent.workers)),
            f"{agent.running}/{agent.capacity}",
            str(agent.backlog),
            str(agent.pending),
            _age(agent.oldest_waiting_age),
        )
    workers = Table(title="Workers", title_justify="left")
    for column in ("worker", "agent", "running/capacity", "isolation", "host", "heartbeat"):
        workers.add_column(column)
    for agent in result.agents:
        for w in agent.workers:
            state = " (draining)" if w.draining else ""
            workers.add_row(
                w.id,
                agent.agent,
                f"{w.running}/{w.capacity}{state}",
                w.isolation,
                f"{w.host}:{w.pid}",
                f"{w.heartbeat_age:.1f}s ago",
            )
    dispatchers = Table(title="Dispatchers", title_justify="left")
    for column in ("dispatcher", "LiveKit worker", "agent name", "held jobs", "heartbeat"):
        dispatchers.add_column(column)
    for d in result.dispatchers:
        dispatchers.add_row(
            d.id + (" (draining)" if d.draining else ""),
            d.livekit_worker_id or "(not registered)",
            repr(d.agent_name),
            str(d.held_jobs),
            f"{d.heartbeat_age:.1f}s ago",
        )
    footer = Text(f"dead letters{only}: {result.dead_letters}  (openrtc dlq list)")
    return Group(table, workers, dispatchers, footer)


def _watch_status(
    redis_url: str,
    keys: Any,
    names: list[str],
    interval: float,
    json_output: bool,
    tenant: str | None = None,
) -> None:
    """Refresh the status every ``interval`` s until Ctrl-C (exit 0)."""
    import anyio
    from rich.live import Live

    from openrtc.ops.monitor import read_status
    from openrtc.store.streams import connect_redis

    async def go() -> None:
        client = connect_redis(redis_url)
        try:
            if json_output:
                while True:
                    result = await read_status(client, keys, names, tenant=tenant)
                    sys.stdout.write(json.dumps(result.to_json()) + "\n")
                    sys.stdout.flush()
                    await anyio.sleep(interval)
            with Live(console=_out, auto_refresh=False, screen=False) as live:
                while True:
                    result = await read_status(client, keys, names, tenant=tenant)
                    live.update(_status_view(result, keys.namespace), refresh=True)
                    await anyio.sleep(interval)
        finally:
            await client.aclose()

    _with_redis_loop(redis_url, go)


def _with_redis_loop(redis_url: str, go: Callable[[], Any]) -> None:
    """Run a command that loops until Ctrl-C (or SIGTERM), which ends it with exit code 0."""
    import threading

    import anyio

    from openrtc.store.streams import REDIS_DOWN
    from openrtc.supervision import stop_signals

    async def until_stopped() -> None:
        # A cancel scope, not asyncio's own SIGINT handling: that cancels the
        # main task once, and a blocking XREAD in redis-py can swallow it.
        with anyio.CancelScope() as scope:
            if threading.current_thread() is not threading.main_thread():
                await go()  # called in-process (tests); no signals to handle here
                return
            with stop_signals(lambda _: scope.cancel(), lambda _: scope.cancel()):
                await go()

    try:
        anyio.run(until_stopped)
    except KeyboardInterrupt:  # before the handlers were in place
        raise typer.Exit(0) from None
    except REDIS_DOWN as exc:
        _fail(f"Redis at {redact_url(redis_url)}: {exc}")


@app.command("status", cls=_Checked)
def status(
    agents_dir_arg: AgentsDirPositional = None,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    agents_dir: Annotated[
        Path | None,
        typer.Option(
            "--agents-dir",
            envvar="OPENRTC_AGENTS_DIR",
            help="Also list these agents, even before they have a stream.",
        ),
    ] = None,
    json_output: JsonFlag = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", help="With --watch: seconds between reads.")
    ] = 2.0,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Health check: exit 1 with one line per problem (waiting calls and no live "
            "worker, or an old waiting call), else exit 0 with one OK line.",
        ),
    ] = False,
    max_wait: Annotated[
        float,
        typer.Option(
            "--max-wait",
            envvar="OPENRTC_MAX_WAIT",
            help="With --check: seconds the oldest waiting call may wait.",
        ),
    ] = 10.0,
    tenant: Annotated[
        str | None,
        typer.Option(
            "--tenant",
            help="Count only this tenant's calls (waiting, running, dead letters); "
            "workers and dispatchers are shown whole.",
        ),
    ] = None,
) -> None:
    """Streams, backlog, pending jobs, live workers and dispatchers, dead letters."""
    from openrtc.ops.monitor import check_status, read_status, status_summary

    if watch and check:
        _fail("use one of --watch and --check", 2)
    directory = agents_dir_arg if agents_dir_arg is not None else agents_dir
    names = _load_pool(directory).list_agents() if directory and directory.is_dir() else []
    keys = _keys(namespace, redis_url)
    if watch:
        _watch_status(redis_url, keys, names, interval, json_output, tenant)
        return
    result = _with_redis(redis_url, lambda r: read_status(r, keys, names, tenant=tenant))
    if check:
        problems = check_status(result, max_wait=max_wait)
        if json_output:
            _print_json({"ok": not problems, "problems": problems})
        else:
            for problem in problems:
                typer.echo(problem)
            if not problems:
                typer.echo(status_summary(result))
        raise typer.Exit(1 if problems else 0)
    if json_output:
        _print_json(result.to_json())
        return
    _out.print(_status_view(result, namespace))


dlq = typer.Typer(help="Inspect, replay and purge the dead letters.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")


ReasonFilter = Annotated[
    DeadReason | None, typer.Option("--reason", help="Only letters with this reason.")
]
AgentFilter = Annotated[
    str | None,
    typer.Option("--agent", help="Only letters for this agent (or that asked for it)."),
]
SinceFilter = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Only letters since then: a duration ago (30s, 10m, 2h, 1d) or an ISO time.",
    ),
]


def _since(value: str | None) -> float | None:
    import time

    from openrtc.ops.monitor import parse_since

    if value is None:
        return None
    try:
        return parse_since(value, now=time.time())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--since'") from None


class _LetterFilters(TypedDict):
    reason: str | None
    agent: str | None
    since: float | None


def _letter_filters(
    reason: DeadReason | None, agent: str | None, since: str | None
) -> _LetterFilters:
    """``--reason``, ``--agent`` and ``--since`` as the monitor's readers take them.

    Raises ``BadParameter`` for an unreadable ``--since`` (before any Redis call).
    """
    return {"reason": reason.value if reason else None, "agent": agent, "since": _since(since)}


def _letter_row(d: Any, now: float) -> list[str]:
    from openrtc.ops.monitor import agent_label

    return [
        d.id,
        _age(now - d.dead_at) if d.dead_at else "-",
        d.reason,
        agent_label(d) if not d.agent else d.agent,
        d.job_id,
        d.room,
        d.error,
    ]


@dlq.command("list", cls=_Checked)
def dlq_list(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    count: Annotated[int, typer.Option("--count", "-n", help="Most entries to show.")] = 50,
    reason: ReasonFilter = None,
    agent: AgentFilter = None,
    since: SinceFilter = None,
    json_output: JsonFlag = False,
) -> None:
    """The newest dead letters, one line each."""
    import time

    from openrtc.ops.monitor import list_dead_letters

    filters = _letter_filters(reason, agent, since)
    letters = _with_redis(
        redis_url,
        lambda r: list_dead_letters(r, _keys(namespace, redis_url), count=count, **filters),
    )
    if json_output:
        _print_json({"dead_letters": [d.summary() for d in letters]})
        return
    if not letters:
        typer.echo("No dead letters.")
        return
    table = Table(
        title=f"Dead letters (newest first, namespace {namespace!r})", title_justify="left"
    )
    for column in ("id", "age", "reason", "agent", "job", "room", "error"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for d in letters:
        table.add_row(*_letter_row(d, now))
    _out.print(table)


@dlq.command("stats", cls=_Checked)
def dlq_stats(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    reason: ReasonFilter = None,
    agent: AgentFilter = None,
    since: SinceFilter = None,
    json_output: JsonFlag = False,
) -> None:
    """Dead letters counted by reason and by agent, with the oldest and the newest."""
    import time

    from openrtc.ops.monitor import dead_letter_stats, scan_dead_letters

    filters = _letter_filters(reason, agent, since)

    async def work(r: Any) -> Any:
        letters = scan_dead_letters(r, _keys(namespace, redis_url), **filters)
        return dead_letter_stats([d async for d in letters])

    stats = _with_redis(redis_url, work)
    if json_output:
        _print_json(stats.to_json())
        return
    typer.echo(f"dead letters: {stats.total}")
    if not stats.total:
        return
    now = time.time()
    for title, counts in (("reason", stats.by_reason), ("agent", stats.by_agent)):
        table = Table(title=f"By {title}", title_justify="left")
        table.add_column(title)
        table.add_column("count", justify="right")
        for key, n in counts.items():
            table.add_row(key, str(n))
        _out.print(table)
    for label, letter in (("oldest", stats.oldest), ("newest", stats.newest)):
        if letter is not None:
            row = _letter_row(letter, now)
            typer.echo(f"{label}: {row[0]} ({row[1]} ago) {row[2]} {row[3]} {row[4]}".rstrip())


@dlq.command("follow", cls=_Checked)
def dlq_follow(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    reason: ReasonFilter = None,
    agent: AgentFilter = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (for piping).")
    ] = False,
) -> None:
    """Print new dead letters as they arrive, until Ctrl-C."""
    import time

    from openrtc.ops.monitor import dead_letter_tail, follow_dead_letters
    from openrtc.store.streams import connect_redis

    async def go() -> None:
        client = connect_redis(redis_url)
        try:
            keys = _keys(namespace, redis_url)
            # Printed once the start is fixed: from here on none is missed.
            tail = await dead_letter_tail(client, keys)
            typer.echo(
                f"following dead letters in namespace {namespace!r} (Ctrl-C stops)", err=True
            )
            letters = follow_dead_letters(
                client, keys, reason=reason.value if reason else None, agent=agent, after=tail
            )
            async for d in letters:
                if json_output:
                    line = json.dumps(d.summary(), ensure_ascii=False)
                else:
                    line = "  ".join(c for c in _letter_row(d, time.time()) if c)
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        finally:
            await client.aclose()

    _with_redis_loop(redis_url, go)


@dlq.command("show", cls=_Checked)
def dlq_show(
    entry_id: Annotated[str, typer.Argument(help="The dead letter's entry id.")],
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """One dead letter in full (JSON), the job decoded, credentials redacted."""
    from openrtc.ops.monitor import list_dead_letters

    letters = _with_redis(
        redis_url,
        lambda r: list_dead_letters(r, _keys(namespace, redis_url), ids=[entry_id]),
    )
    if not letters:
        _fail(f"no dead letter {entry_id!r}")
    _print_json(letters[0].detail())


@dlq.command("replay", cls=_Checked)
def dlq_replay(
    entry_ids: Annotated[list[str] | None, typer.Argument(help="Entry ids to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every listed entry.")] = False,
    reason: Annotated[
        DeadReason | None, typer.Option("--reason", help="With --all: only these.")
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Send to this agent instead of the original.")
    ] = None,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    json_output: JsonFlag = False,
    signing_key_file: SigningKeyFile = None,
) -> None:
    """Put dead letters back on their agent's stream as new jobs.

    With a signing key (OPENRTC_SIGNING_KEY or --signing-key-file) each is
    signed anew: replaying vouches for it, a `forged` letter included.
    """
    from openrtc.agents.registry import validate_agent_name
    from openrtc.ops.monitor import list_dead_letters, replay_dead_letters

    if not entry_ids and not replay_all:
        _fail("name entry ids, or pass --all", 2)
    if agent is not None:
        try:
            agent = validate_agent_name(agent)
        except OpenRTCError as exc:
            _fail(str(exc), 2)
    keys = _keys(namespace, redis_url)
    try:
        signing = _signing(signing_key_file)
    except OpenRTCError as exc:
        _fail(str(exc), 2)

    async def work(r: Any) -> list[Any]:
        letters = await list_dead_letters(
            r, keys, ids=entry_ids or [], reason=reason.value if reason else None, count=10_000
        )
        unroutable = [d.id for d in letters if not (agent or d.agent)]
        if unroutable:
            raise typer.BadParameter(
                f"entries without an agent (unknown-agent) need --agent: {unroutable}"
            )
        return await replay_dead_letters(r, keys, letters, agent=agent, signing=signing)

    try:
        results = _with_redis(redis_url, work)
    except typer.BadParameter as exc:
        _fail(str(exc), 2)
    _print_replays(results, json_output=json_output)


def _print_replays(results: list[Any], *, json_output: bool) -> None:
    """What ``dlq replay`` did, one line per letter (or JSON)."""
    replayed = [r for r in results if r.outcome == "replayed"]
    skipped = [r for r in results if r.outcome != "replayed"]
    if json_output:
        _print_json(
            {
                "replayed": [
                    {"dead_letter": r.dead_letter, "entry": r.entry, "agent": r.agent}
                    for r in replayed
                ],
                "skipped": [
                    {"dead_letter": r.dead_letter, "reason": r.outcome, "entry": r.entry}
                    for r in skipped
                ],
            }
        )
        return
    for r in replayed:
        typer.echo(f"{r.dead_letter} -> {r.entry} ({r.agent})")
    for r in skipped:
        why = {
            "gone": "no longer there (replayed or purged meanwhile)",
            "already-queued": f"its job is queued or running already as {r.entry}",
            "no-job-id": "it carries no job id",
        }[r.outcome]
        typer.echo(f"{r.dead_letter} skipped: {why}")
    typer.echo(f"replayed {len(replayed)} dead letter(s)")


@dlq.command("purge", cls=_Checked)
def dlq_purge(
    entry_ids: Annotated[list[str] | None, typer.Argument(help="Entry ids to delete.")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="Delete every dead letter.")] = False,
    older_than: Annotated[
        float | None, typer.Option("--older-than", help="Delete those older than N seconds.")
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (needed when stdin is no terminal).")
    ] = False,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """Delete dead letters (by id, by age, or --all), after asking unless --yes."""
    from openrtc.ops.monitor import purge_dead_letters, purge_plan

    if not entry_ids and not purge_all and older_than is None:
        _fail("name entry ids, or pass --older-than or --all", 2)
    keys = _keys(namespace, redis_url)
    ids = entry_ids or []
    upto: str | None = None
    if not yes:
        if not sys.stdin.isatty():
            _fail("dlq purge deletes for good: pass --yes to run it without a terminal", 2)
        count, upto = _with_redis(
            redis_url, lambda r: purge_plan(r, keys, ids=ids, older_than=older_than)
        )
        if count == 0:
            typer.echo("deleted 0 dead letter(s)")
            return
        if not typer.confirm(f"Delete {count} dead letter(s) in namespace {namespace!r}?"):
            typer.echo("nothing deleted")
            raise typer.Exit(1)
    removed = _with_redis(
        redis_url,
        lambda r: purge_dead_letters(r, keys, ids=ids, older_than=older_than, upto=upto),
    )
    typer.echo(f"deleted {removed} dead letter(s)")


# --------------------------------------------------------------------------- sessions

sessions = typer.Typer(
    help="Call reports: one per ended call, with its usage (and cost).", no_args_is_help=True
)
app.add_typer(sessions, name="sessions")

TenantFilter = Annotated[str | None, typer.Option("--tenant", help="Only calls for this tenant.")]
OutcomeFilter = Annotated[
    str | None,
    typer.Option("--outcome", help="Only calls that ended so: ended, agent_ended, failed."),
]
ReportAgentFilter = Annotated[str | None, typer.Option("--agent", help="Only this agent's calls.")]
ReportSinceFilter = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Only calls that ended since then: a duration ago (30s, 10m, 2h, 1d) or an ISO time.",
    ),
]
PricesFile = Annotated[
    Path | None,
    typer.Option(
        "--prices",
        envvar="OPENRTC_PRICES",
        help="A TOML price table (per model per 1k prompt/completion tokens, per TTS "
        "character, per STT second): each report gets a cost (docs/operating.md).",
    ),
]


def _prices(path: Path | None) -> Any:
    from openrtc.ops.monitor import Prices

    if path is None:
        return None
    try:
        return Prices.from_toml(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="'--prices'") from None


def _report_filters(
    agent: str | None, tenant: str | None, outcome: str | None, since: str | None
) -> dict[str, Any]:
    return {"agent": agent, "tenant": tenant, "outcome": outcome, "since": _since(since)}


def _report_row(doc: dict[str, Any]) -> list[str]:
    import datetime

    ended = doc.get("ended_at") or 0
    usage = doc.get("usage") or {}
    row = [
        datetime.datetime.fromtimestamp(ended).strftime("%Y-%m-%d %H:%M:%S") if ended else "-",
        str(doc.get("agent", "")),
        str(doc.get("tenant", "")) or "-",
        str(doc.get("job_id", "")),
        f"{doc.get('duration_s', 0):.0f}s",
        str(doc.get("outcome", "")),
        str(doc.get("turns", 0)),
        str(doc.get("takeovers", 0)),
        f"{usage.get('llm_prompt_tokens', 0)}/{usage.get('llm_completion_tokens', 0)}",
        str(usage.get("tts_characters", 0)),
    ]
    if "cost" in doc:
        row.append(f"{doc['cost']:.4f}")
    return row


_REPORT_COLUMNS = (
    "ended", "agent", "tenant", "job", "duration", "outcome", "turns", "takeovers",
    "llm tokens (in/out)", "tts chars",
)  # fmt: skip


@sessions.command("list", cls=_Checked)
def sessions_list(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    count: Annotated[int, typer.Option("--count", "-n", help="Most reports to show.")] = 50,
    agent: ReportAgentFilter = None,
    tenant: TenantFilter = None,
    outcome: OutcomeFilter = None,
    since: ReportSinceFilter = None,
    prices: PricesFile = None,
    json_output: JsonFlag = False,
) -> None:
    """The newest call reports, one line each."""
    from openrtc.ops.monitor import list_reports

    filters = _report_filters(agent, tenant, outcome, since)
    table_prices = _prices(prices)
    reports = _with_redis(
        redis_url,
        lambda r: list_reports(r, _keys(namespace, redis_url), count=count, **filters),
    )
    docs = [report.shown(table_prices) for report in reports]
    if json_output:
        _print_json({"sessions": docs})
        return
    if not docs:
        typer.echo("No call reports.")
        return
    table = Table(title=f"Calls (newest first, namespace {namespace!r})", title_justify="left")
    for column in _REPORT_COLUMNS + (("cost",) if table_prices else ()):
        table.add_column(column, overflow="fold")
    for doc in docs:
        table.add_row(*_report_row(doc))
    _out.print(table)


@sessions.command("show", cls=_Checked)
def sessions_show(
    job_id: Annotated[str, typer.Argument(help="The call's job id (or its report's entry id).")],
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    prices: PricesFile = None,
    key_file: SigningKeyFile = None,
) -> None:
    """One call's report in full (JSON), its transcript included where kept."""
    from openrtc.ops.monitor import list_reports

    table_prices = _prices(prices)
    signing = _signing(key_file)

    async def work(r: Any) -> Any:
        keys = _keys(namespace, redis_url)
        found = await list_reports(r, keys, job_id=job_id, signing=signing)
        if not found and "-" in job_id:
            found = await list_reports(r, keys, ids=[job_id], signing=signing)
        return found

    reports = _with_redis(redis_url, work)
    if not reports:
        _fail(f"no call report for {job_id!r}")
    doc = reports[0].shown(table_prices)
    if signing is not None:
        doc["signature"] = reports[0].signature
    _print_json(doc)


@sessions.command("follow", cls=_Checked)
def sessions_follow(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    agent: ReportAgentFilter = None,
    tenant: TenantFilter = None,
    outcome: OutcomeFilter = None,
    prices: PricesFile = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (for piping).")
    ] = False,
) -> None:
    """Print call reports as calls end, until Ctrl-C."""
    from openrtc.ops.monitor import follow_reports
    from openrtc.store.streams import connect_redis

    table_prices = _prices(prices)

    async def go() -> None:
        client = connect_redis(redis_url)
        try:
            keys = _keys(namespace, redis_url)
            typer.echo(
                f"following call reports in namespace {namespace!r} (Ctrl-C stops)", err=True
            )
            reports = follow_reports(client, keys, agent=agent, tenant=tenant, outcome=outcome)
            async for report in reports:
                doc = report.shown(table_prices)
                if json_output:
                    line = json.dumps(doc, ensure_ascii=False)
                else:
                    line = "  ".join(_report_row(doc))
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        finally:
            await client.aclose()

    _with_redis_loop(redis_url, go)


@sessions.command("stats", cls=_Checked)
def sessions_stats(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    agent: ReportAgentFilter = None,
    tenant: TenantFilter = None,
    outcome: OutcomeFilter = None,
    since: ReportSinceFilter = None,
    prices: PricesFile = None,
    json_output: JsonFlag = False,
) -> None:
    """Calls, duration, usage (and cost, with --prices) summed by agent and by tenant."""
    from openrtc.ops.monitor import report_stats, scan_reports

    filters = _report_filters(agent, tenant, outcome, since)
    table_prices = _prices(prices)

    async def work(r: Any) -> Any:
        found = scan_reports(r, _keys(namespace, redis_url), **filters)
        return report_stats([x async for x in found], table_prices)

    stats = _with_redis(redis_url, work)
    if json_output:
        _print_json(stats)
        return
    typer.echo(f"calls: {stats['total']['calls']}")
    if not stats["total"]["calls"]:
        return
    for title in ("agent", "tenant"):
        table = Table(title=f"By {title}", title_justify="left")
        columns = [title, "calls", "duration s", "turns", "llm in", "llm out", "tts chars", "stt s"]
        for column in columns + (["cost"] if table_prices else []):
            table.add_column(column)
        for name, row in stats[f"by_{title}"].items():
            cells = [name or "-", str(row["calls"]), f"{row['duration_s']:.0f}", str(row["turns"])]
            cells += [str(row["llm_prompt_tokens"]), str(row["llm_completion_tokens"])]
            cells += [str(row["tts_characters"]), f"{row['stt_audio_seconds']:.1f}"]
            if table_prices:
                cells.append(f"{row['cost']:.4f}")
            table.add_row(*cells)
        _out.print(table)


# --------------------------------------------------------------------------- top


def _sort_key(value: str) -> str:
    from openrtc.wire.top import SORT_KEYS

    if value not in SORT_KEYS:
        raise typer.BadParameter(
            f"{value!r} is not one of {', '.join(SORT_KEYS)}", param_hint="'--sort'"
        )
    return value


def _session_state(value: str | None) -> str | None:
    from openrtc.wire.top import SESSION_STATES

    if value is not None and value not in SESSION_STATES:
        raise typer.BadParameter(
            f"{value!r} is not one of {', '.join(SESSION_STATES)}", param_hint="'--state'"
        )
    return value


@app.command("top", cls=_Checked)
def top(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    once: Annotated[
        bool, typer.Option("--once", help="Print the table once and exit (for scripts).")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="With --once: print the sessions and workers as JSON.")
    ] = False,
    sort: Annotated[
        str,
        typer.Option(
            "--sort",
            callback=_sort_key,
            help="Sort by: cpu, memory, duration, turns, latency, blocks, agent, worker, "
            "state, job (numbers largest first).",
        ),
    ] = "cpu",
    reverse: Annotated[bool, typer.Option("--reverse", help="The other way round.")] = False,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only this agent's sessions.")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only this tenant's sessions.")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state",
            callback=_session_state,
            help="Only sessions in this state: joining, initializing, idle, listening, "
            "thinking, speaking.",
        ),
    ] = None,
    worker: Annotated[
        str | None, typer.Option("--worker", help="Only this worker's sessions.")
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between refreshes (interactive).")
    ] = 2.0,
) -> None:
    """Every running session of every live worker, live (like htop): CPU, memory, state."""
    from openrtc.ops.top import RowFilter, TopState, read_fleet, render_table, top_document

    if json_output and not once:
        _fail("--json needs --once (the interactive view is for a terminal)", 2)
    if not once and not (sys.stdin.isatty() and sys.stdout.isatty()):
        _fail("not a terminal: use --once (with --json for scripts)", 2)
    rows_filter = RowFilter(agent=agent, tenant=tenant, state=state, worker=worker)
    keys = _keys(namespace, redis_url)
    if once:
        fleet = _with_redis(redis_url, lambda r: read_fleet(r, keys))
        if json_output:
            _print_json(top_document(fleet, rows_filter, sort, reverse=reverse))
            return
        from openrtc.ops.top import fleet_header

        rows = fleet.shown(rows_filter, sort, reverse=reverse)
        typer.echo(fleet_header(fleet, len(rows)))
        for line in render_table(rows, sort=sort, reverse=reverse):
            typer.echo(line)
        return
    _top_interactive(
        redis_url,
        keys,
        TopState(sort=sort, reverse=reverse, rows_filter=rows_filter),
        interval=interval,
        title=f"openrtc top  {namespace}@{redact_url(redis_url)}",
    )


def _top_interactive(redis_url: str, keys: Any, state: Any, *, interval: float, title: str) -> None:
    """The curses view, one Redis client kept across refreshes (redis-py reconnects)."""
    from openrtc.ops.top import Fleet, read_fleet, run_interactive
    from openrtc.store.redis_access import misconfiguration
    from openrtc.store.streams import REDIS_DOWN, connect_redis

    client: Any = None

    async def read() -> Fleet:
        nonlocal client
        if client is None:
            client = connect_redis(redis_url)
        return await read_fleet(client, keys)

    def describe(exc: BaseException) -> str:
        reason = misconfiguration(exc) or str(exc) or type(exc).__name__
        return _without_password(reason, redis_url)

    async def close() -> None:
        if client is not None:
            await client.aclose()

    run_interactive(
        read,
        state=state,
        title=title,
        interval=interval,
        describe_error=describe,
        errors=REDIS_DOWN,
        close=close,
    )


def _without_password(text: str, redis_url: str) -> str:
    """``text`` with the URL's password masked, should a library ever echo it."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(redis_url).password
    except ValueError:
        return text
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(str(secret), "***")
    return text

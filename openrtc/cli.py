"""The ``openrtc`` command line.

Every read command prints a readable table by default and machine-readable
JSON with ``--json``. Errors the operator can fix print one line on stderr and
exit 1; nothing here prints a traceback for them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from openrtc import __version__
from openrtc.agents import AgentPool
from openrtc.errors import OpenRTCError
from openrtc.logs import LogFormat, configure_logging
from openrtc.routing import STEP_SOURCES, explain_route, resolve_agent
from openrtc.settings import DEFAULT_NAMESPACE, DEFAULT_REDIS_URL
from openrtc.supervision import freeze_imports

#: Root options also accepted after the subcommand (``openrtc status --log-level DEBUG``).
_ANYWHERE_OPTIONS = ("--log-level", "--log-format")


class _Root(typer.core.TyperGroup):
    """The root group: moves :data:`_ANYWHERE_OPTIONS` given after a subcommand to before it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # click's Context
        return super().parse_args(ctx, _hoist_root_options(args))


def _hoist_root_options(args: list[str]) -> list[str]:
    """``args`` with the root options found after the subcommand moved before it.

    Stops at ``--``; a value is the next word or follows ``=``.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            rest.extend(args[i:])
            break
        name = word.split("=", 1)[0]
        if name in _ANYWHERE_OPTIONS:
            if "=" in word or i + 1 >= len(args):
                front.append(word)
                i += 1
            else:
                front.extend(args[i : i + 2])
                i += 2
            continue
        rest.append(word)
        i += 1
    return front + rest


app = typer.Typer(
    name="openrtc",
    cls=_Root,
    help="Route LiveKit calls to voice agents over Redis streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# No markup: every cell is data from Redis ("[/x]" in a room name would raise).
_out = Console(highlight=False, soft_wrap=True, markup=False)

AgentsDir = Annotated[
    Path,
    typer.Option(
        "--agents-dir",
        envvar="OPENRTC_AGENTS_DIR",
        help="Directory with one module per agent.",
        show_default=True,
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _load_pool(agents_dir: Path) -> AgentPool:
    try:
        return AgentPool.from_directory(agents_dir)
    except OpenRTCError as exc:
        _fail(str(exc))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"openrtc {__version__}")
        raise typer.Exit()


_SERVICES = frozenset({"dispatcher", "worker", "dev"})


@app.callback()
def _root(
    ctx: typer.Context,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            envvar="OPENRTC_LOG_LEVEL",
            help="DEBUG, INFO, WARNING... [default: INFO for services, WARNING otherwise]"
            " (also accepted after the command)",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="OPENRTC_LOG_FORMAT",
            help="text, or json: one object per line with the job's id, agent and room"
            " (also accepted after the command)",
        ),
    ] = LogFormat.TEXT,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    if log_level is None:
        log_level = "INFO" if ctx.invoked_subcommand in _SERVICES else "WARNING"
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}", 2)
    configure_logging(level, log_format)


@app.command("list")
def list_agents(
    agents_dir: AgentsDir = Path("agents"),
    json_output: JsonFlag = False,
    plain: Annotated[
        bool, typer.Option("--plain", help="One tab-separated line per agent.")
    ] = False,
) -> None:
    """Show the registered agents and their providers, in registration order."""
    pool = _load_pool(agents_dir)
    rows = [config.describe() for config in pool]
    if json_output:
        _print_json({"agents": rows})
        return
    if plain:
        for row in rows:
            typer.echo("\t".join(v if v is not None else "-" for v in row.values()))
        return
    if not rows:
        typer.echo(f"No agents in {agents_dir}.")
        return
    table = Table(title=f"Agents in {agents_dir} (registration order)", title_justify="left")
    for column in ("#", "name", "class", "stt", "llm", "tts", "greeting"):
        table.add_column(column, overflow="fold")
    for i, row in enumerate(rows, 1):
        table.add_row(str(i), *(v if v is not None else "-" for v in row.values()))
    _out.print(table)


@app.command("route")
def route(
    agents_dir: AgentsDir = Path("agents"),
    job_metadata: Annotated[
        str, typer.Option("--job-metadata", help="The job's (dispatch) metadata.")
    ] = "",
    room_metadata: Annotated[
        str, typer.Option("--room-metadata", help="The room's metadata.")
    ] = "",
    room: Annotated[str, typer.Option("--room", help="The room name.")] = "",
    json_output: JsonFlag = False,
) -> None:
    """Dry-run the routing chain for a job and say which step matched and why."""
    from livekit.protocol.agent import Job
    from livekit.protocol.models import Room

    pool = _load_pool(agents_dir)
    job = Job(id="dry-run", metadata=job_metadata, room=Room(name=room, metadata=room_metadata))
    try:
        result = resolve_agent(job, pool.routing_table)
    except (ValueError, RuntimeError) as exc:
        if json_output:
            _print_json({"error": str(exc)})
        _fail(str(exc))
    if json_output:
        _print_json({"agent": result.agent, "step": result.step, "source": result.source})
        return
    typer.echo(f"agent: {result.agent}")
    typer.echo(f"step:  {result.step} ({STEP_SOURCES[result.step]})")
    for line in explain_route(job, pool.routing_table):
        typer.echo(f"  {line}")


LiveKitUrl = Annotated[
    str, typer.Option("--livekit-url", envvar="LIVEKIT_URL", help="LiveKit server URL.")
]
ApiKey = Annotated[
    str, typer.Option("--api-key", envvar="LIVEKIT_API_KEY", help="LiveKit API key.")
]
ApiSecret = Annotated[
    str,
    typer.Option(
        "--api-secret",
        envvar="LIVEKIT_API_SECRET",
        help="LiveKit API secret (prefer the variable: flags show in `ps`).",
        show_default=False,
    ),
]
RedisUrl = Annotated[str, typer.Option("--redis-url", envvar="REDIS_URL", help="Redis URL.")]
Namespace = Annotated[
    str, typer.Option("--namespace", envvar="OPENRTC_NAMESPACE", help="Redis key namespace.")
]


def _run_service(service: Any) -> None:
    """Run a service until it stops; SIGTERM/SIGINT drain it, a second signal aborts."""
    import signal

    import anyio

    from openrtc.supervision import stop_signals

    async def serve() -> None:
        with anyio.CancelScope() as scope:

            def stop(signum: signal.Signals) -> None:
                logging.getLogger("openrtc").info(
                    "%s: stopping gracefully (again to abort)", signum.name
                )
                service.request_stop()

            def abort(signum: signal.Signals) -> None:
                logging.getLogger("openrtc").warning("%s again: aborting", signum.name)
                scope.cancel()

            with stop_signals(stop, abort):
                await service.run()

    anyio.run(serve)


def _serve(agents_dir: Path, build: Callable[[AgentPool], Any], *, freeze: bool = False) -> None:
    """Build a service for the agents directory and run it; fixable errors print one line.

    ``freeze``: move what is imported by now out of the collector's way
    (:func:`openrtc.supervision.freeze_imports`), for the dispatcher.
    """
    pool = _load_pool(agents_dir)
    try:
        service = build(pool)
    except OpenRTCError as exc:
        _fail(str(exc))
    if freeze:
        freeze_imports()
    from openrtc import tracing

    # Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set.
    tracing.configure_from_env(f"openrtc-{type(service).__name__.lower()}")
    try:
        _run_service(service)
    finally:
        tracing.shutdown()


@app.command("dispatcher")
def dispatcher(
    agents_dir: AgentsDir = Path("agents"),
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    agent_name: Annotated[
        str,
        typer.Option(
            "--agent-name",
            envvar="OPENRTC_AGENT_NAME",
            help="Name to register with LiveKit: empty for automatic dispatch, "
            "a name for explicit dispatch to it.",
        ),
    ] = "",
    when_no_worker: Annotated[
        str,
        typer.Option(
            "--when-no-worker",
            envvar="OPENRTC_WHEN_NO_WORKER",
            help="queue (wait for an autoscaler; expire to the dead letters) or reject.",
        ),
    ] = "queue",
    max_backlog: Annotated[
        int,
        typer.Option(
            "--max-backlog",
            envvar="OPENRTC_MAX_BACKLOG",
            help="Jobs an agent may have waiting beyond free worker slots.",
        ),
    ] = 100,
    wait_replicas: Annotated[
        int,
        typer.Option(
            "--wait-replicas",
            envvar="OPENRTC_WAIT_REPLICAS",
            help="Replicas that must have each job before it counts as enqueued (Redis WAIT); "
            "0 = off.",
        ),
    ] = 0,
) -> None:
    """Register with LiveKit and publish each routed job to its agent's Redis stream."""
    from openrtc.dispatcher import Dispatcher
    from openrtc.settings import DispatcherSettings, LiveKitSettings

    def build(pool: AgentPool) -> Dispatcher:
        settings = DispatcherSettings(
            livekit=LiveKitSettings(livekit_url, api_key, api_secret),
            redis_url=redis_url,
            namespace=namespace,
            agent_name=agent_name,
            when_no_worker=when_no_worker,  # type: ignore[arg-type]  # validated in settings
            max_backlog=max_backlog,
            wait_replicas=wait_replicas,
        )
        return Dispatcher(settings, pool)

    _serve(agents_dir, build, freeze=True)


@app.command("worker")
def worker(
    agent: Annotated[str, typer.Option("--agent", help="The agent this worker serves.")],
    agents_dir: AgentsDir = Path("agents"),
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", envvar="OPENRTC_CONCURRENCY", help="Sessions at once."),
    ] = 10,
    isolation: Annotated[
        str,
        typer.Option(
            "--isolation",
            envvar="OPENRTC_ISOLATION",
            help="coroutine (sessions share this process) or process (one child per session).",
        ),
    ] = "coroutine",
    lease: Annotated[
        float,
        typer.Option(
            "--lease",
            envvar="OPENRTC_LEASE",
            help="Seconds without renewal after which another worker takes a call over.",
        ),
    ] = 5.0,
    max_deliveries: Annotated[
        int,
        typer.Option(
            "--max-deliveries",
            envvar="OPENRTC_MAX_DELIVERIES",
            help="Deliveries after which a job goes to the dead letters.",
        ),
    ] = 5,
    max_queue_age: Annotated[
        float,
        typer.Option(
            "--max-queue-age",
            envvar="OPENRTC_MAX_QUEUE_AGE",
            help="Seconds a job may wait before it expires to the dead letters.",
        ),
    ] = 30.0,
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout",
            envvar="OPENRTC_DRAIN_TIMEOUT",
            help="On SIGTERM, seconds running calls may go on before others take them over.",
        ),
    ] = 60.0,
    forget_consumers_after: Annotated[
        float,
        typer.Option(
            "--forget-consumers-after",
            envvar="OPENRTC_FORGET_CONSUMERS_AFTER",
            help="Seconds a consumer holding nothing may go unread before it leaves the group.",
        ),
    ] = 300.0,
) -> None:
    """Consume one agent's stream and run its sessions in their rooms."""
    from openrtc.settings import LiveKitSettings, WorkerSettings
    from openrtc.worker import Worker

    def build(pool: AgentPool) -> Worker:
        settings = WorkerSettings(
            livekit=LiveKitSettings(livekit_url, api_key, api_secret),
            agent=agent,
            redis_url=redis_url,
            namespace=namespace,
            concurrency=concurrency,
            isolation=isolation,  # type: ignore[arg-type]  # validated in settings
            lease=lease,
            max_deliveries=max_deliveries,
            max_queue_age=max_queue_age,
            drain_timeout=drain_timeout,
            forget_consumers_after=forget_consumers_after,
        )
        return Worker(settings, pool)

    _serve(agents_dir, build)


def _with_redis(redis_url: str, work: Any) -> Any:
    """Run ``work(redis)`` against Redis, turning connection errors into one line."""
    import anyio

    from openrtc.settings import redact_url
    from openrtc.streams import REDIS_DOWN, connect_redis

    async def go() -> Any:
        client = connect_redis(redis_url)
        try:
            return await work(client)
        finally:
            await client.aclose()

    try:
        return anyio.run(go)
    except REDIS_DOWN as exc:
        _fail(f"Redis at {redact_url(redis_url)}: {exc}")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m"


@app.command("status")
def status(
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
) -> None:
    """Streams, backlog, pending jobs, live workers and dispatchers, dead letters."""
    from openrtc.keys import Keys
    from openrtc.monitor import read_status

    names = _load_pool(agents_dir).list_agents() if agents_dir and agents_dir.is_dir() else []
    result = _with_redis(redis_url, lambda r: read_status(r, Keys(namespace), names))
    if json_output:
        _print_json(result.to_json())
        return
    table = Table(title=f"Agents (namespace {namespace!r})", title_justify="left")
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
    _out.print(table)
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
    _out.print(workers)
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
    _out.print(dispatchers)
    _out.print(f"dead letters: {result.dead_letters}  (openrtc dlq list)")


dlq = typer.Typer(help="Inspect, replay and purge the dead letters.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")


@dlq.command("list")
def dlq_list(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    count: Annotated[int, typer.Option("--count", "-n", help="Most entries to show.")] = 50,
    reason: Annotated[
        str | None, typer.Option("--reason", help="unknown-agent, malformed, expired, ...")
    ] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """The newest dead letters, one line each."""
    from openrtc.keys import Keys
    from openrtc.monitor import list_dead_letters

    letters = _with_redis(
        redis_url,
        lambda r: list_dead_letters(r, Keys(namespace), count=count, reason=reason, agent=agent),
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
    import time as _time

    for d in letters:
        table.add_row(
            d.id,
            _age(_time.time() - d.dead_at) if d.dead_at else "-",
            d.reason,
            d.agent or (f"({d.requested_agent}?)" if d.requested_agent else ""),
            d.job_id,
            d.room,
            d.error,
        )
    _out.print(table)


@dlq.command("show")
def dlq_show(
    entry_id: Annotated[str, typer.Argument(help="The dead letter's entry id.")],
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """One dead letter in full (JSON), the job decoded, credentials redacted."""
    from openrtc.keys import Keys
    from openrtc.monitor import list_dead_letters

    letters = _with_redis(
        redis_url, lambda r: list_dead_letters(r, Keys(namespace), ids=[entry_id])
    )
    if not letters:
        _fail(f"no dead letter {entry_id!r}")
    _print_json(letters[0].detail())


@dlq.command("replay")
def dlq_replay(
    entry_ids: Annotated[list[str] | None, typer.Argument(help="Entry ids to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every listed entry.")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="With --all: only these.")] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Send to this agent instead of the original.")
    ] = None,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    json_output: JsonFlag = False,
) -> None:
    """Put dead letters back on their agent's stream as new jobs."""
    from openrtc.agents import validate_agent_name
    from openrtc.keys import Keys
    from openrtc.monitor import list_dead_letters, replay_dead_letters

    if not entry_ids and not replay_all:
        _fail("name entry ids, or pass --all", 2)
    if agent is not None:
        try:
            agent = validate_agent_name(agent)
        except OpenRTCError as exc:
            _fail(str(exc), 2)
    keys = Keys(namespace)

    async def work(r: Any) -> list[Any]:
        letters = await list_dead_letters(r, keys, ids=entry_ids or [], reason=reason, count=10_000)
        unroutable = [d.id for d in letters if not (agent or d.agent)]
        if unroutable:
            raise typer.BadParameter(
                f"entries without an agent (unknown-agent) need --agent: {unroutable}"
            )
        return await replay_dead_letters(r, keys, letters, agent=agent)

    try:
        results = _with_redis(redis_url, work)
    except typer.BadParameter as exc:
        _fail(str(exc), 2)
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


@dlq.command("purge")
def dlq_purge(
    entry_ids: Annotated[list[str] | None, typer.Argument(help="Entry ids to delete.")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="Delete every dead letter.")] = False,
    older_than: Annotated[
        float | None, typer.Option("--older-than", help="Delete those older than N seconds.")
    ] = None,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """Delete dead letters (by id, by age, or --all)."""
    from openrtc.keys import Keys
    from openrtc.monitor import purge_dead_letters

    if not entry_ids and not purge_all and older_than is None:
        _fail("name entry ids, or pass --older-than or --all", 2)
    removed = _with_redis(
        redis_url,
        lambda r: purge_dead_letters(
            r, Keys(namespace), ids=entry_ids or [], older_than=older_than
        ),
    )
    typer.echo(f"deleted {removed} dead letter(s)")


@app.command("call")
def call(
    room: Annotated[str, typer.Option("--room", help="Room to call into.")],
    metadata: Annotated[
        str | None,
        typer.Option("--metadata", help="Create the room first, with this metadata."),
    ] = None,
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for an agent.")] = 20.0,
    listen: Annotated[float, typer.Option("--listen", help="Seconds to wait for audio.")] = 10.0,
    delete: Annotated[
        bool, typer.Option("--delete/--keep", help="Delete the room afterwards.")
    ] = True,
    json_output: JsonFlag = False,
) -> None:
    """Join a room as a caller and report which agent answered and whether it was heard."""
    import dataclasses

    import anyio

    from openrtc.caller import close_native_runtime, place_call
    from openrtc.settings import LiveKitSettings

    try:
        credentials = LiveKitSettings(livekit_url, api_key, api_secret)
    except OpenRTCError as exc:
        _fail(str(exc))
    try:
        result = anyio.run(
            lambda: place_call(
                credentials, room, metadata=metadata, wait=wait, listen=listen, delete_room=delete
            )
        )
    except Exception as exc:
        _fail(f"call failed: {type(exc).__name__}: {exc}")
    finally:
        # Before any exit path: an abort at interpreter shutdown would turn
        # this call's result into a crash.
        close_native_runtime()
    if json_output:
        _print_json({**dataclasses.asdict(result), "ok": result.ok})
    elif result.agent is None:
        typer.echo(f"{room}: {result.error}")
    else:
        heard = f"heard after {result.heard_after:.2f}s" if result.heard_after else "not heard"
        typer.echo(
            f"{room}: agent '{result.agent}' ({result.identity}) joined after "
            f"{result.joined_after:.2f}s, {heard}"
        )
    if not result.ok:
        raise typer.Exit(1)


@app.command("dev")
def dev(
    agents_dir: AgentsDir = Path("agents"),
    env_file: Annotated[
        Path, typer.Option("--env-file", help="Where to write the stack's settings (mode 0600).")
    ] = Path(".openrtc/dev.env"),
    isolation: Annotated[
        str, typer.Option("--isolation", help="coroutine or process.")
    ] = "coroutine",
) -> None:
    """The whole stack on this machine: LiveKit, Redis, a dispatcher, a worker per agent."""
    import anyio

    from openrtc.dev import dev_stack, write_env_file

    pool = _load_pool(agents_dir)
    if len(pool) == 0:
        _fail("No agents are registered in the pool.")
    if isolation not in ("coroutine", "process"):
        _fail(f"--isolation must be coroutine or process, not {isolation!r}", 2)

    async def serve() -> None:
        from openrtc.supervision import stop_signals

        async with dev_stack(
            agents_dir,
            isolation="process" if isolation == "process" else "coroutine",
            log_dir=env_file.parent / "logs",
        ) as stack:
            write_env_file(env_file, stack)
            typer.echo(f"LiveKit  {stack.livekit.url}  (API key {stack.livekit.api_key})")
            typer.echo(f"Redis    {stack.redis.url}")
            typer.echo(f"agents   {', '.join(pool.list_agents())} (one worker each)")
            typer.echo(f"settings {env_file} (includes the API secret; mode 0600)")
            typer.echo(f"try:     set -a; . {env_file}; set +a; openrtc status")
            typer.echo("Ctrl-C stops everything.")
            stopped = anyio.Event()
            with stop_signals(lambda _: stopped.set(), lambda _: stopped.set()):
                await stopped.wait()

    freeze_imports()
    try:
        anyio.run(serve)
    except OpenRTCError as exc:
        _fail(str(exc))


def main() -> None:
    """Console-script entry point."""
    app()

"""The ``openrtc`` command line.

Every read command prints a readable table by default and machine-readable
JSON with ``--json``. Errors the operator can fix print one line on stderr and
exit 1; nothing here prints a traceback for them.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from openrtc import __version__
from openrtc.agents import AgentPool
from openrtc.errors import OpenRTCError
from openrtc.routing import STEP_SOURCES, explain_route, resolve_agent

app = typer.Typer(
    name="openrtc",
    help="Route LiveKit calls to voice agents over Redis streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_out = Console(highlight=False, soft_wrap=True)

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
            help="DEBUG, INFO, WARNING... [default: INFO for services, WARNING otherwise]",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    if log_level is None:
        log_level = "INFO" if ctx.invoked_subcommand in _SERVICES else "WARNING"
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}", 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Third-party chatter stays at WARNING unless DEBUG was asked for.
    if level > logging.DEBUG:
        for noisy in ("livekit", "aiohttp", "asyncio"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


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

    async def serve() -> None:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    count = 0
                    async for signum in signals:
                        count += 1
                        if count == 1:
                            logging.getLogger("openrtc").info(
                                "%s: stopping gracefully (again to abort)",
                                signal.Signals(signum).name,
                            )
                            service.request_stop()
                        else:
                            tg.cancel_scope.cancel()

            tg.start_soon(watch_signals)
            await service.run()
            tg.cancel_scope.cancel()

    anyio.run(serve)


@app.command("dispatcher")
def dispatcher(
    agents_dir: AgentsDir = Path("agents"),
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0",
    namespace: Namespace = "openrtc",
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
) -> None:
    """Register with LiveKit and publish each routed job to its agent's Redis stream."""
    from openrtc.dispatcher import Dispatcher
    from openrtc.settings import DispatcherSettings, LiveKitSettings

    pool = _load_pool(agents_dir)
    try:
        settings = DispatcherSettings(
            livekit=LiveKitSettings(livekit_url, api_key, api_secret),
            redis_url=redis_url,
            namespace=namespace,
            agent_name=agent_name,
            when_no_worker=when_no_worker,  # type: ignore[arg-type]  # validated in settings
            max_backlog=max_backlog,
        )
        service = Dispatcher(settings, pool)
    except OpenRTCError as exc:
        _fail(str(exc))
    _run_service(service)


@app.command("worker")
def worker(
    agent: Annotated[str, typer.Option("--agent", help="The agent this worker serves.")],
    agents_dir: AgentsDir = Path("agents"),
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0",
    namespace: Namespace = "openrtc",
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
) -> None:
    """Consume one agent's stream and run its sessions in their rooms."""
    from openrtc.settings import LiveKitSettings, WorkerSettings
    from openrtc.worker import Worker

    pool = _load_pool(agents_dir)
    try:
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
        )
        service = Worker(settings, pool)
    except OpenRTCError as exc:
        _fail(str(exc))
    _run_service(service)


def main() -> None:
    """Console-script entry point."""
    app()

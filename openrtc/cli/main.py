"""The ``openrtc`` command line.

Every read command prints a readable table by default and machine-readable
JSON with ``--json``. Errors the operator can fix print one line on stderr and
exit 1; nothing here prints a traceback for them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypedDict

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from openrtc import __version__
from openrtc.agents.registry import AgentPool
from openrtc.agents.routing import STEP_SOURCES, explain_route, resolve_agent
from openrtc.errors import OpenRTCError
from openrtc.ops.logs import LogFormat, configure_logging
from openrtc.settings import (
    DEFAULT_DISPATCHER_HTTP_PORT,
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    DEFAULT_WORKER_HTTP_PORT,
    MAX_CHECKPOINT_BYTES,
    DispatcherSettings,
    SettingError,
    WorkerSettings,
    check_numbers,
    default_of,
    redact_url,
)
from openrtc.supervision import freeze_imports
from openrtc.wire.messages import DeadReason

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


class _Checked(typer.core.TyperCommand):
    """A command whose numbers are checked against their bounds before it runs.

    The bounds live in :data:`openrtc.settings.NUMBERS`; a value outside
    them is one line naming its flag and variable, exit 2, and the command
    has not loaded an agent or connected to anything yet.
    """

    def invoke(self, ctx: Any) -> Any:  # click's Context
        try:
            check_numbers(ctx.params)
        except SettingError as exc:
            _fail(str(exc), 2)
        return super().invoke(ctx)


def _dispatcher_default(name: str) -> Any:
    return default_of(DispatcherSettings, name)


def _worker_default(name: str) -> Any:
    return default_of(WorkerSettings, name)


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
# The agents directory may also come first, as `openrtc list ./agents` (openrtc 0.20.1).
AgentsDirPositional = Annotated[
    Path | None,
    typer.Argument(
        help="Directory with one module per agent (the same as --agents-dir).",
        metavar="AGENTS_DIR",
        show_default=False,
    ),
]


class IsolationMode(StrEnum):
    """``--isolation`` values."""

    COROUTINE = "coroutine"
    PROCESS = "process"


class NoWorkerPolicyChoice(StrEnum):
    """``--when-no-worker`` values."""

    QUEUE = "queue"
    REJECT = "reject"


_ISOLATION = IsolationMode(_worker_default("isolation"))
_WHEN_NO_WORKER = NoWorkerPolicyChoice(_dispatcher_default("when_no_worker"))


# Provider defaults for agents that set none, named as in openrtc 0.20.1.
DefaultStt = Annotated[
    str | None,
    typer.Option(
        "--default-stt",
        envvar="OPENRTC_DEFAULT_STT",
        help="STT for agents whose @agent_config sets none (a LiveKit inference string).",
    ),
]
DefaultLlm = Annotated[
    str | None,
    typer.Option(
        "--default-llm",
        envvar="OPENRTC_DEFAULT_LLM",
        help="LLM for agents whose @agent_config sets none (a LiveKit inference string).",
    ),
]
DefaultTts = Annotated[
    str | None,
    typer.Option(
        "--default-tts",
        envvar="OPENRTC_DEFAULT_TTS",
        help="TTS for agents whose @agent_config sets none (a LiveKit inference string, "
        "or openrtc/tones for the offline tone TTS).",
    ),
]
DefaultGreeting = Annotated[
    str | None,
    typer.Option(
        "--default-greeting",
        envvar="OPENRTC_DEFAULT_GREETING",
        help="Greeting for agents whose @agent_config sets none.",
    ),
]


def _agents_dir(positional: Path | None, option: Path) -> Path:
    """The agents directory: the positional one, else ``--agents-dir`` (or its variable).

    Both on the command line and different is an error; the variable (and the
    default, ``agents``) give way to the positional one.
    """
    if positional is None:
        return option
    from_env = os.environ.get("OPENRTC_AGENTS_DIR")
    if option not in (positional, Path("agents")) and (
        from_env is None or option != Path(from_env)
    ):
        _fail(f"the agents directory is given twice ({positional} and --agents-dir {option})", 2)
    return positional


def _defaults(
    stt: str | None, llm: str | None, tts: str | None, greeting: str | None
) -> dict[str, str | None]:
    """Provider defaults for the pool, also exported for the processes this one starts."""
    from openrtc.agents.compat import export_provider_defaults

    defaults = {
        "default_stt": stt,
        "default_llm": llm,
        "default_tts": tts,
        "default_greeting": greeting,
    }
    export_provider_defaults(defaults)
    return defaults


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _load_pool(agents_dir: Path, defaults: dict[str, str | None] | None = None) -> AgentPool:
    try:
        return AgentPool.from_directory(agents_dir, **(defaults or {}))
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


@app.command("list", cls=_Checked)
def list_agents(
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    json_output: JsonFlag = False,
    plain: Annotated[
        bool, typer.Option("--plain", help="One tab-separated line per agent.")
    ] = False,
    resources: Annotated[
        bool,
        typer.Option("--resources", help="With --json: source file sizes and this process's RSS."),
    ] = False,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
) -> None:
    """Show the registered agents and their providers, in registration order."""
    from openrtc.agents.compat import list_payload

    agents_dir = _agents_dir(agents_dir_arg, agents_dir)
    pool = _load_pool(
        agents_dir, _defaults(default_stt, default_llm, default_tts, default_greeting)
    )
    rows = [config.describe() for config in pool]
    if json_output:
        _print_json(list_payload(pool, resources=resources))
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


@app.command("route", cls=_Checked)
def route(
    agents_dir_arg: AgentsDirPositional = None,
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

    pool = _load_pool(_agents_dir(agents_dir_arg, agents_dir))
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

SigningKeyFile = Annotated[
    Path | None,
    typer.Option(
        "--signing-key-file",
        envvar="OPENRTC_SIGNING_KEY_FILE",
        help="File holding the key that signs entries and checkpoints (first line), and "
        "optionally the previous key, still accepted (second line). Or set "
        "OPENRTC_SIGNING_KEY (and OPENRTC_SIGNING_KEY_PREVIOUS).",
        show_default=False,
    ),
]
RequireSigning = Annotated[
    bool,
    typer.Option(
        "--require-signing/--no-require-signing",
        envvar="OPENRTC_REQUIRE_SIGNING",
        help="Refuse to start without a signing key (for a Redis others can write to).",
    ),
]


def _signing(key_file: Path | None) -> Any:
    """The signing keys from the key file or the environment (``None``: unsigned)."""
    from openrtc.wire.signing import keys_from

    return keys_from(os.environ, key_file)


_HTTP_PORT_HELP = (
    "Port of the /healthz, /readyz and /metrics server; 0 = off. "
    "[default: {default}; if another service on this host has it, a free port, logged]"
)
HttpPort = Annotated[
    int | None,
    typer.Option(
        "--http-port",
        envvar="OPENRTC_HTTP_PORT",
        help=_HTTP_PORT_HELP.format(default=DEFAULT_WORKER_HTTP_PORT),
        show_default=False,
    ),
]
DispatcherHttpPort = Annotated[
    int | None,
    typer.Option(
        "--http-port",
        envvar="OPENRTC_HTTP_PORT",
        help=_HTTP_PORT_HELP.format(default=DEFAULT_DISPATCHER_HTTP_PORT),
        show_default=False,
    ),
]


def _http_port(port: int | None, default: int) -> dict[str, Any]:
    """Settings for ``--http-port``: a port asked for is that port or an error;
    the default falls back to a free one (several services share a host)."""
    if port is None:
        return {"http_port": default, "http_port_fallback": True}
    return {"http_port": port}


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

    try:
        anyio.run(serve)
    except OpenRTCError as exc:  # e.g. the HTTP port is taken
        _fail(str(exc))


def _serve(
    agents_dir: Path,
    build: Callable[[AgentPool], Any],
    *,
    freeze: bool = False,
    defaults: dict[str, str | None] | None = None,
) -> None:
    """Build a service for the agents directory and run it; fixable errors print one line.

    ``freeze``: move what is imported by now out of the collector's way
    (:func:`openrtc.supervision.freeze_imports`), for the dispatcher.
    """
    pool = _load_pool(agents_dir, defaults)
    try:
        service = build(pool)
    except OpenRTCError as exc:
        _fail(str(exc))
    if freeze:
        freeze_imports()
    from openrtc.ops import tracing

    # Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set.
    tracing.configure_from_env(f"openrtc-{type(service).__name__.lower()}")
    try:
        _run_service(service)
    except OpenRTCError as exc:  # a start-up check refused the settings
        _fail(str(exc))
    finally:
        tracing.shutdown()


@app.command("dispatcher", cls=_Checked)
def dispatcher(
    agents_dir_arg: AgentsDirPositional = None,
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
        NoWorkerPolicyChoice,
        typer.Option(
            "--when-no-worker",
            envvar="OPENRTC_WHEN_NO_WORKER",
            help="queue (wait for an autoscaler; expire to the dead letters) or reject.",
        ),
    ] = _WHEN_NO_WORKER,
    max_backlog: Annotated[
        int,
        typer.Option(
            "--max-backlog",
            envvar="OPENRTC_MAX_BACKLOG",
            help="Jobs an agent may have waiting beyond free worker slots.",
        ),
    ] = _dispatcher_default("max_backlog"),
    wait_replicas: Annotated[
        int,
        typer.Option(
            "--wait-replicas",
            envvar="OPENRTC_WAIT_REPLICAS",
            help="Replicas that must have each job before it counts as enqueued (Redis WAIT); "
            "0 = off.",
        ),
    ] = _dispatcher_default("wait_replicas"),
    reconcile_interval: Annotated[
        float,
        typer.Option(
            "--reconcile-interval",
            envvar="OPENRTC_RECONCILE_INTERVAL",
            help="Seconds between looks for rooms with a caller and no agent "
            "(one dispatcher at a time); 0 = off.",
        ),
    ] = _dispatcher_default("reconcile_interval"),
    reconcile_grace: Annotated[
        float,
        typer.Option(
            "--reconcile-grace",
            envvar="OPENRTC_RECONCILE_GRACE",
            help="Seconds a room may have a caller and no agent before it is dispatched again.",
        ),
    ] = _dispatcher_default("reconcile_grace"),
    http_port: DispatcherHttpPort = None,
    dead_letter_maxlen: Annotated[
        int,
        typer.Option(
            "--dead-letter-maxlen",
            envvar="OPENRTC_DEAD_LETTER_MAXLEN",
            help="Dead letters kept; past it the oldest are trimmed (approximately).",
        ),
    ] = _dispatcher_default("dead_letter_maxlen"),
    signing_key_file: SigningKeyFile = None,
    require_signing: RequireSigning = False,
) -> None:
    """Register with LiveKit and publish each routed job to its agent's Redis stream."""
    from openrtc.dispatcher.dispatcher import Dispatcher
    from openrtc.settings import DispatcherSettings, LiveKitSettings

    def build(pool: AgentPool) -> Dispatcher:
        settings = DispatcherSettings(
            livekit=LiveKitSettings(livekit_url, api_key, api_secret),
            redis_url=redis_url,
            namespace=namespace,
            agent_name=agent_name,
            when_no_worker="reject" if when_no_worker is NoWorkerPolicyChoice.REJECT else "queue",
            max_backlog=max_backlog,
            wait_replicas=wait_replicas,
            reconcile_interval=reconcile_interval,
            reconcile_grace=reconcile_grace,
            **_http_port(http_port, DEFAULT_DISPATCHER_HTTP_PORT),
            dead_letter_maxlen=dead_letter_maxlen,
            signing=_signing(signing_key_file),
            require_signing=require_signing,
        )
        return Dispatcher(settings, pool)

    _serve(_agents_dir(agents_dir_arg, agents_dir), build, freeze=True)


@app.command("worker", cls=_Checked)
def worker(
    agent: Annotated[str, typer.Option("--agent", help="The agent this worker serves.")],
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", envvar="OPENRTC_CONCURRENCY", help="Sessions at once."),
    ] = _worker_default("concurrency"),
    isolation: Annotated[
        IsolationMode,
        typer.Option(
            "--isolation",
            envvar="OPENRTC_ISOLATION",
            help="coroutine (sessions share this process) or process (one child per session).",
        ),
    ] = _ISOLATION,
    idle_processes: Annotated[
        int,
        typer.Option(
            "--idle-processes",
            envvar="OPENRTC_IDLE_PROCESSES",
            help="With --isolation process: warm child processes kept ready for new calls.",
        ),
    ] = _worker_default("idle_processes"),
    lease: Annotated[
        float,
        typer.Option(
            "--lease",
            envvar="OPENRTC_LEASE",
            help="Seconds without renewal after which another worker takes a call over.",
        ),
    ] = _worker_default("lease"),
    crash_detection: Annotated[
        bool,
        typer.Option(
            "--crash-detection/--no-crash-detection",
            envvar="OPENRTC_CRASH_DETECTION",
            help="Take a crashed worker's calls over at once (its connections closed), "
            "not after the lease.",
        ),
    ] = _worker_default("crash_detection"),
    handover: Annotated[
        bool,
        typer.Option(
            "--handover/--no-handover",
            envvar="OPENRTC_HANDOVER",
            help="On SIGTERM, hand running calls to peers with free slots (at a turn "
            "boundary, conversation kept) instead of waiting for them to end.",
        ),
    ] = _worker_default("handover"),
    max_deliveries: Annotated[
        int,
        typer.Option(
            "--max-deliveries",
            envvar="OPENRTC_MAX_DELIVERIES",
            help="Deliveries after which a job goes to the dead letters.",
        ),
    ] = _worker_default("max_deliveries"),
    max_queue_age: Annotated[
        float,
        typer.Option(
            "--max-queue-age",
            envvar="OPENRTC_MAX_QUEUE_AGE",
            help="Seconds a job may wait before it expires to the dead letters.",
        ),
    ] = _worker_default("max_queue_age"),
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout",
            envvar="OPENRTC_DRAIN_TIMEOUT",
            help="On SIGTERM, seconds running calls may go on before others take them over.",
        ),
    ] = _worker_default("drain_timeout"),
    forget_consumers_after: Annotated[
        float,
        typer.Option(
            "--forget-consumers-after",
            envvar="OPENRTC_FORGET_CONSUMERS_AFTER",
            help="Seconds a consumer holding nothing may go unread before it leaves the group.",
        ),
    ] = _worker_default("forget_consumers_after"),
    load_threshold: Annotated[
        float | None,
        typer.Option(
            "--load-threshold",
            envvar="OPENRTC_LOAD_THRESHOLD",
            help="Host CPU share (0-1] at or above which new calls go to peers below theirs.",
        ),
    ] = _worker_default("load_threshold"),
    http_port: HttpPort = None,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
    dead_letter_maxlen: Annotated[
        int,
        typer.Option(
            "--dead-letter-maxlen",
            envvar="OPENRTC_DEAD_LETTER_MAXLEN",
            help="Dead letters kept; past it the oldest are trimmed (approximately).",
        ),
    ] = _worker_default("dead_letter_maxlen"),
    checkpoint_max_bytes: Annotated[
        int,
        typer.Option(
            "--checkpoint-max-bytes",
            envvar="OPENRTC_CHECKPOINT_MAX_BYTES",
            help="Largest conversation checkpoint per call (long texts shortened, then the "
            f"oldest turns dropped); 0 = no checkpoints; at most {MAX_CHECKPOINT_BYTES}.",
        ),
    ] = _worker_default("checkpoint_max_bytes"),
    signing_key_file: SigningKeyFile = None,
    require_signing: RequireSigning = False,
) -> None:
    """Consume one agent's stream and run its sessions in their rooms."""
    from openrtc.settings import LiveKitSettings, WorkerSettings
    from openrtc.worker.worker import Worker

    def build(pool: AgentPool) -> Worker:
        settings = WorkerSettings(
            livekit=LiveKitSettings(livekit_url, api_key, api_secret),
            agent=agent,
            redis_url=redis_url,
            namespace=namespace,
            concurrency=concurrency,
            isolation="process" if isolation is IsolationMode.PROCESS else "coroutine",
            idle_processes=idle_processes,
            lease=lease,
            crash_detection=crash_detection,
            handover=handover,
            max_deliveries=max_deliveries,
            max_queue_age=max_queue_age,
            drain_timeout=drain_timeout,
            forget_consumers_after=forget_consumers_after,
            load_threshold=load_threshold,
            **_http_port(http_port, DEFAULT_WORKER_HTTP_PORT),
            dead_letter_maxlen=dead_letter_maxlen,
            checkpoint_max_bytes=checkpoint_max_bytes,
            signing=_signing(signing_key_file),
            require_signing=require_signing,
        )
        return Worker(settings, pool)

    _serve(
        _agents_dir(agents_dir_arg, agents_dir),
        build,
        defaults=_defaults(default_stt, default_llm, default_tts, default_greeting),
    )


@app.command("start", cls=_Checked)
def start(
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    livekit_url: Annotated[
        str,
        typer.Option("--livekit-url", "--url", envvar="LIVEKIT_URL", help="LiveKit server URL."),
    ] = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            "--max-concurrent-sessions",
            envvar="OPENRTC_CONCURRENCY",
            help="Sessions at once, per agent.",
        ),
    ] = _worker_default("concurrency"),
    isolation: Annotated[
        IsolationMode,
        typer.Option(
            "--isolation",
            envvar="OPENRTC_ISOLATION",
            help="coroutine (sessions share this process) or process (one child per session).",
        ),
    ] = _ISOLATION,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
    signing_key_file: SigningKeyFile = None,
    require_signing: RequireSigning = False,
) -> None:
    """A dispatcher and a worker per agent in one process (openrtc 0.20.1's `start`).

    Runs against LIVEKIT_URL and REDIS_URL. To scale, run `openrtc dispatcher`
    and `openrtc worker --agent NAME` as separate processes instead.
    """
    from openrtc.devtools.allinone import AllInOne
    from openrtc.settings import DispatcherSettings, LiveKitSettings, WorkerSettings

    def build(pool: AgentPool) -> AllInOne:
        if len(pool) == 0:
            raise OpenRTCError("No agents are registered in the pool.")
        credentials = LiveKitSettings(livekit_url, api_key, api_secret)
        signing = {"signing": _signing(signing_key_file), "require_signing": require_signing}
        workers = [
            WorkerSettings(
                livekit=credentials,
                agent=name,
                redis_url=redis_url,
                namespace=namespace,
                concurrency=concurrency,
                isolation="process" if isolation is IsolationMode.PROCESS else "coroutine",
                **signing,
            )
            for name in pool.list_agents()
        ]
        dispatcher = DispatcherSettings(
            livekit=credentials, redis_url=redis_url, namespace=namespace, **signing
        )
        return AllInOne(dispatcher, workers, pool)

    _serve(
        _agents_dir(agents_dir_arg, agents_dir),
        build,
        freeze=True,
        defaults=_defaults(default_stt, default_llm, default_tts, default_greeting),
    )


def _keys(namespace: str, redis_url: str) -> Any:
    """The key layout for ``redis_url``: hash-tagged per agent under a cluster URL."""
    from openrtc.store.redis_url import is_cluster_url
    from openrtc.wire.keys import Keys

    return Keys(namespace, cluster=is_cluster_url(redis_url))


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
    footer = Text(f"dead letters: {result.dead_letters}  (openrtc dlq list)")
    return Group(table, workers, dispatchers, footer)


def _watch_status(
    redis_url: str, keys: Any, names: list[str], interval: float, json_output: bool
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
                    result = await read_status(client, keys, names)
                    sys.stdout.write(json.dumps(result.to_json()) + "\n")
                    sys.stdout.flush()
                    await anyio.sleep(interval)
            with Live(console=_out, auto_refresh=False, screen=False) as live:
                while True:
                    result = await read_status(client, keys, names)
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
) -> None:
    """Streams, backlog, pending jobs, live workers and dispatchers, dead letters."""
    from openrtc.ops.monitor import check_status, read_status, status_summary

    if watch and check:
        _fail("use one of --watch and --check", 2)
    directory = agents_dir_arg if agents_dir_arg is not None else agents_dir
    names = _load_pool(directory).list_agents() if directory and directory.is_dir() else []
    keys = _keys(namespace, redis_url)
    if watch:
        _watch_status(redis_url, keys, names, interval, json_output)
        return
    result = _with_redis(redis_url, lambda r: read_status(r, keys, names))
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


@app.command("call", cls=_Checked)
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

    from openrtc.devtools.caller import close_native_runtime, place_call
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


@app.command("dev", cls=_Checked)
def dev(
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    env_file: Annotated[
        Path, typer.Option("--env-file", help="Where to write the stack's settings (mode 0600).")
    ] = Path(".openrtc/dev.env"),
    isolation: Annotated[
        IsolationMode, typer.Option("--isolation", help="coroutine or process.")
    ] = IsolationMode.COROUTINE,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = "",
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """The whole stack on this machine: LiveKit, Redis, a dispatcher, a worker per agent.

    A server of a kind is started only when its URL (LIVEKIT_URL, REDIS_URL) is unset.
    """
    import anyio

    from openrtc.devtools.dev import dev_stack, write_env_file
    from openrtc.settings import LiveKitSettings

    agents_dir = _agents_dir(agents_dir_arg, agents_dir)
    pool = _load_pool(
        agents_dir, _defaults(default_stt, default_llm, default_tts, default_greeting)
    )
    if len(pool) == 0:
        _fail("No agents are registered in the pool.")
    external_livekit = None
    if livekit_url:
        try:
            external_livekit = LiveKitSettings(livekit_url, api_key, api_secret)
        except OpenRTCError as exc:
            _fail(str(exc))

    def progress(line: str) -> None:
        # stderr: progress, not the stack's settings.
        typer.echo(f"[dev] {line}", err=True)

    async def serve() -> None:
        from openrtc.supervision import stop_signals

        async with dev_stack(
            agents_dir,
            isolation="process" if isolation is IsolationMode.PROCESS else "coroutine",
            log_dir=env_file.parent / "logs",
            livekit=external_livekit,
            redis_url=redis_url or None,
            namespace=namespace,
            progress=progress,
        ) as stack:
            write_env_file(env_file, stack)
            typer.echo(f"LiveKit  {stack.livekit.url}  (API key {stack.livekit.api_key})")
            typer.echo(f"Redis    {redact_url(stack.redis.url)}")
            typer.echo(f"agents   {', '.join(pool.list_agents())} (one worker each)")
            for name, url in stack.http_urls.items():
                typer.echo(f"http     {url}  ({name}: /healthz /readyz /metrics)")
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

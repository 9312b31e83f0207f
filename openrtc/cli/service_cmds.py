"""``openrtc dispatcher``, ``openrtc worker`` and ``openrtc start``: the services."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from openrtc.agents.registry import AgentPool
from openrtc.cli.app import (
    _ISOLATION,
    _WHEN_NO_WORKER,
    AgentsDir,
    AgentsDirPositional,
    ApiKey,
    ApiSecret,
    DefaultGreeting,
    DefaultLlm,
    DefaultStt,
    DefaultTts,
    IsolationMode,
    LiveKitUrl,
    Namespace,
    NoWorkerPolicyChoice,
    RedisUrl,
    RequireSigning,
    SigningKeyFile,
    TenantsFile,
    _agents_dir,
    _Checked,
    _defaults,
    _dispatcher_default,
    _fail,
    _load_pool,
    _worker_default,
    app,
)
from openrtc.errors import OpenRTCError
from openrtc.settings import (
    DEFAULT_DISPATCHER_HTTP_PORT,
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    DEFAULT_WORKER_HTTP_PORT,
    MAX_CHECKPOINT_BYTES,
    DispatcherSettings,
    WorkerSettings,
)
from openrtc.supervision import freeze_imports


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


DeadLetterMaxlen = Annotated[
    int,
    typer.Option(
        "--dead-letter-maxlen",
        envvar="OPENRTC_DEAD_LETTER_MAXLEN",
        help="Dead letters kept; past it the oldest are trimmed (approximately).",
    ),
]
ReportMaxlen = Annotated[
    int,
    typer.Option(
        "--report-maxlen",
        envvar="OPENRTC_REPORT_MAXLEN",
        help="Call reports kept; past it the oldest are trimmed (approximately).",
    ),
]
ReportMaxAge = Annotated[
    float,
    typer.Option(
        "--report-max-age",
        envvar="OPENRTC_REPORT_MAX_AGE",
        help="Seconds a call report is kept; older ones are trimmed.",
    ),
]
ObserverTimeout = Annotated[
    float,
    typer.Option(
        "--observer-timeout",
        envvar="OPENRTC_OBSERVER_TIMEOUT",
        help="Seconds one session observer call may take before it is abandoned and logged.",
    ),
]
TopInterval = Annotated[
    float,
    typer.Option(
        "--top-interval",
        envvar="OPENRTC_TOP_INTERVAL",
        help="Seconds between snapshots of this worker's sessions for `openrtc top`; 0: none.",
    ),
]
Isolation = Annotated[
    IsolationMode,
    typer.Option(
        "--isolation",
        envvar="OPENRTC_ISOLATION",
        help="coroutine (sessions share this process) or process (one child per session).",
    ),
]


# -- `openrtc dispatcher`'s own options
AgentName = Annotated[
    str,
    typer.Option(
        "--agent-name",
        envvar="OPENRTC_AGENT_NAME",
        help="Name to register with LiveKit: empty for automatic dispatch, "
        "a name for explicit dispatch to it.",
    ),
]
WhenNoWorker = Annotated[
    NoWorkerPolicyChoice,
    typer.Option(
        "--when-no-worker",
        envvar="OPENRTC_WHEN_NO_WORKER",
        help="queue (wait for an autoscaler; expire to the dead letters) or reject.",
    ),
]
MaxBacklog = Annotated[
    int,
    typer.Option(
        "--max-backlog",
        envvar="OPENRTC_MAX_BACKLOG",
        help="Jobs an agent may have waiting beyond free worker slots.",
    ),
]
WaitReplicas = Annotated[
    int,
    typer.Option(
        "--wait-replicas",
        envvar="OPENRTC_WAIT_REPLICAS",
        help="Replicas that must have each job before it counts as enqueued (Redis WAIT); 0 = off.",
    ),
]
ReconcileInterval = Annotated[
    float,
    typer.Option(
        "--reconcile-interval",
        envvar="OPENRTC_RECONCILE_INTERVAL",
        help="Seconds between looks for rooms with a caller and no agent "
        "(one dispatcher at a time); 0 = off.",
    ),
]
ReconcileGrace = Annotated[
    float,
    typer.Option(
        "--reconcile-grace",
        envvar="OPENRTC_RECONCILE_GRACE",
        help="Seconds a room may have a caller and no agent before it is dispatched again.",
    ),
]

# -- `openrtc worker`'s own options
Agent = Annotated[str, typer.Option("--agent", help="The agent this worker serves.")]
Concurrency = Annotated[
    int,
    typer.Option("--concurrency", envvar="OPENRTC_CONCURRENCY", help="Sessions at once."),
]
IdleProcesses = Annotated[
    int,
    typer.Option(
        "--idle-processes",
        envvar="OPENRTC_IDLE_PROCESSES",
        help="With --isolation process: warm child processes kept ready for new calls.",
    ),
]
Lease = Annotated[
    float,
    typer.Option(
        "--lease",
        envvar="OPENRTC_LEASE",
        help="Seconds without renewal after which another worker takes a call over.",
    ),
]
CrashDetection = Annotated[
    bool,
    typer.Option(
        "--crash-detection/--no-crash-detection",
        envvar="OPENRTC_CRASH_DETECTION",
        help="Take a crashed worker's calls over at once (its connections closed), "
        "not after the lease.",
    ),
]
Reload = Annotated[
    bool,
    typer.Option(
        "--reload/--no-reload",
        envvar="OPENRTC_RELOAD",
        help="Hot reload, for a developer's own stack: a saved agent module serves new "
        "calls, and live calls move to it at their next turn, with their conversation.",
    ),
]
Handover = Annotated[
    bool,
    typer.Option(
        "--handover/--no-handover",
        envvar="OPENRTC_HANDOVER",
        help="On SIGTERM, hand running calls to peers with free slots (at a turn "
        "boundary, conversation kept) instead of waiting for them to end.",
    ),
]
MaxDeliveries = Annotated[
    int,
    typer.Option(
        "--max-deliveries",
        envvar="OPENRTC_MAX_DELIVERIES",
        help="Deliveries after which a job goes to the dead letters.",
    ),
]
MaxQueueAge = Annotated[
    float,
    typer.Option(
        "--max-queue-age",
        envvar="OPENRTC_MAX_QUEUE_AGE",
        help="Seconds a job may wait before it expires to the dead letters.",
    ),
]
DrainTimeout = Annotated[
    float,
    typer.Option(
        "--drain-timeout",
        envvar="OPENRTC_DRAIN_TIMEOUT",
        help="On SIGTERM, seconds running calls may go on before others take them over.",
    ),
]
ForgetConsumersAfter = Annotated[
    float,
    typer.Option(
        "--forget-consumers-after",
        envvar="OPENRTC_FORGET_CONSUMERS_AFTER",
        help="Seconds a consumer holding nothing may go unread before it leaves the group.",
    ),
]
LoadThreshold = Annotated[
    float | None,
    typer.Option(
        "--load-threshold",
        envvar="OPENRTC_LOAD_THRESHOLD",
        help="Host CPU share (0-1] at or above which new calls go to peers below theirs.",
    ),
]
MemoryWarnMb = Annotated[
    float | None,
    typer.Option(
        "--memory-warn-mb",
        envvar="OPENRTC_MEMORY_WARN_MB",
        help="Memory (MB, PSS with the session processes) over which a warning is logged.",
    ),
]
MemoryLimitMb = Annotated[
    float | None,
    typer.Option(
        "--memory-limit-mb",
        envvar="OPENRTC_MEMORY_LIMIT_MB",
        help="Memory (MB) at which the worker hands its calls to peers and exits "
        "(code 75) to be restarted.",
    ),
]
SessionMemoryLimitMb = Annotated[
    float | None,
    typer.Option(
        "--session-memory-limit-mb",
        envvar="OPENRTC_SESSION_MEMORY_LIMIT_MB",
        help="Process isolation: a session process's own memory (MB, USS) at which its "
        "call is handed over and the process replaced.",
    ),
]
MaxConsecutiveFailures = Annotated[
    int,
    typer.Option(
        "--max-consecutive-failures",
        envvar="OPENRTC_MAX_CONSECUTIVE_FAILURES",
        help="Calls failed in a row after which the worker takes no new jobs "
        "(/readyz 503) for --failure-cooldown; 0 = off.",
    ),
]
FailureCooldown = Annotated[
    float,
    typer.Option(
        "--failure-cooldown",
        envvar="OPENRTC_FAILURE_COOLDOWN",
        help="Seconds a worker stopped by --max-consecutive-failures waits to try again.",
    ),
]
CheckpointMaxBytes = Annotated[
    int,
    typer.Option(
        "--checkpoint-max-bytes",
        envvar="OPENRTC_CHECKPOINT_MAX_BYTES",
        help="Largest conversation checkpoint per call (long texts shortened, then the "
        f"oldest turns dropped); 0 = no checkpoints; at most {MAX_CHECKPOINT_BYTES}.",
    ),
]

# -- `openrtc start`'s own spellings (openrtc 0.20.1's flag names also accepted)
StartLiveKitUrl = Annotated[
    str,
    typer.Option("--livekit-url", "--url", envvar="LIVEKIT_URL", help="LiveKit server URL."),
]
StartConcurrency = Annotated[
    int,
    typer.Option(
        "--concurrency",
        "--max-concurrent-sessions",
        envvar="OPENRTC_CONCURRENCY",
        help="Sessions at once, per agent.",
    ),
]


def _http_port(port: int | None, default: int) -> dict[str, Any]:
    """Settings for ``--http-port``: a port asked for is that port or an error;
    the default falls back to a free one (several services share a host)."""
    if port is None:
        return {"http_port": default, "http_port_fallback": True}
    return {"http_port": port}


def _service_settings(
    livekit_url: str,
    api_key: str,
    api_secret: str,
    redis_url: str,
    namespace: str,
    http_port: dict[str, Any],
    dead_letter_maxlen: int,
    signing_key_file: Path | None,
    require_signing: bool,
) -> dict[str, Any]:
    """The settings ``openrtc dispatcher`` and ``openrtc worker`` share, as keyword arguments.

    Called inside each command's ``build``: a missing signing key file is then
    a one-line error (:func:`_serve`), not a traceback.
    """
    from openrtc.settings import LiveKitSettings

    return {
        "livekit": LiveKitSettings(livekit_url, api_key, api_secret),
        "redis_url": redis_url,
        "namespace": namespace,
        **http_port,
        "dead_letter_maxlen": dead_letter_maxlen,
        "signing": _signing(signing_key_file),
        "require_signing": require_signing,
    }


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
    # A worker that stopped over its memory limit: its supervisor restarts it.
    if code := getattr(service, "exit_code", 0):
        raise typer.Exit(code)


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
    agent_name: AgentName = "",
    when_no_worker: WhenNoWorker = _WHEN_NO_WORKER,
    max_backlog: MaxBacklog = _dispatcher_default("max_backlog"),
    wait_replicas: WaitReplicas = _dispatcher_default("wait_replicas"),
    reconcile_interval: ReconcileInterval = _dispatcher_default("reconcile_interval"),
    reconcile_grace: ReconcileGrace = _dispatcher_default("reconcile_grace"),
    http_port: DispatcherHttpPort = None,
    dead_letter_maxlen: DeadLetterMaxlen = _dispatcher_default("dead_letter_maxlen"),
    signing_key_file: SigningKeyFile = None,
    require_signing: RequireSigning = False,
) -> None:
    """Register with LiveKit and publish each routed job to its agent's Redis stream."""
    from openrtc.dispatcher.dispatcher import Dispatcher

    def build(pool: AgentPool) -> Dispatcher:
        service = _service_settings(
            livekit_url,
            api_key,
            api_secret,
            redis_url,
            namespace,
            _http_port(http_port, DEFAULT_DISPATCHER_HTTP_PORT),
            dead_letter_maxlen,
            signing_key_file,
            require_signing,
        )
        settings = DispatcherSettings(
            **service,
            agent_name=agent_name,
            when_no_worker="reject" if when_no_worker is NoWorkerPolicyChoice.REJECT else "queue",
            max_backlog=max_backlog,
            wait_replicas=wait_replicas,
            reconcile_interval=reconcile_interval,
            reconcile_grace=reconcile_grace,
        )
        return Dispatcher(settings, pool)

    _serve(_agents_dir(agents_dir_arg, agents_dir), build, freeze=True)


@app.command("worker", cls=_Checked)
def worker(
    agent: Agent,
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    concurrency: Concurrency = _worker_default("concurrency"),
    isolation: Isolation = _ISOLATION,
    idle_processes: IdleProcesses = _worker_default("idle_processes"),
    lease: Lease = _worker_default("lease"),
    crash_detection: CrashDetection = _worker_default("crash_detection"),
    handover: Handover = _worker_default("handover"),
    max_deliveries: MaxDeliveries = _worker_default("max_deliveries"),
    max_queue_age: MaxQueueAge = _worker_default("max_queue_age"),
    drain_timeout: DrainTimeout = _worker_default("drain_timeout"),
    forget_consumers_after: ForgetConsumersAfter = _worker_default("forget_consumers_after"),
    load_threshold: LoadThreshold = _worker_default("load_threshold"),
    http_port: HttpPort = None,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
    dead_letter_maxlen: DeadLetterMaxlen = _worker_default("dead_letter_maxlen"),
    checkpoint_max_bytes: CheckpointMaxBytes = _worker_default("checkpoint_max_bytes"),
    report_maxlen: ReportMaxlen = _worker_default("report_maxlen"),
    report_max_age: ReportMaxAge = _worker_default("report_max_age"),
    observer_timeout: ObserverTimeout = _worker_default("observer_timeout"),
    top_interval: TopInterval = _worker_default("top_interval"),
    signing_key_file: SigningKeyFile = None,
    require_signing: RequireSigning = False,
    reload: Reload = _worker_default("reload"),
    memory_warn_mb: MemoryWarnMb = None,
    memory_limit_mb: MemoryLimitMb = None,
    session_memory_limit_mb: SessionMemoryLimitMb = None,
    max_consecutive_failures: MaxConsecutiveFailures = _worker_default("max_consecutive_failures"),
    failure_cooldown: FailureCooldown = _worker_default("failure_cooldown"),
    tenants: TenantsFile = None,
) -> None:
    """Consume one agent's stream and run its sessions in their rooms."""
    from openrtc.worker.worker import Worker

    def build(pool: AgentPool) -> Worker:
        service = _service_settings(
            livekit_url,
            api_key,
            api_secret,
            redis_url,
            namespace,
            _http_port(http_port, DEFAULT_WORKER_HTTP_PORT),
            dead_letter_maxlen,
            signing_key_file,
            require_signing,
        )
        settings = WorkerSettings(
            **service,
            agent=agent,
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
            checkpoint_max_bytes=checkpoint_max_bytes,
            report_maxlen=report_maxlen,
            report_max_age=report_max_age,
            observer_timeout=observer_timeout,
            top_interval=top_interval,
            reload=reload,
            memory_warn_mb=memory_warn_mb,
            memory_limit_mb=memory_limit_mb,
            session_memory_limit_mb=session_memory_limit_mb,
            max_consecutive_failures=max_consecutive_failures,
            failure_cooldown=failure_cooldown,
            tenants_file=str(tenants) if tenants is not None else "",
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
    livekit_url: StartLiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    namespace: Namespace = DEFAULT_NAMESPACE,
    concurrency: StartConcurrency = _worker_default("concurrency"),
    isolation: Isolation = _ISOLATION,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
    signing_key_file: SigningKeyFile = None,
    require_signing: RequireSigning = False,
    tenants: TenantsFile = None,
) -> None:
    """A dispatcher and a worker per agent in one process (openrtc 0.20.1's `start`).

    Runs against LIVEKIT_URL and REDIS_URL. To scale, run `openrtc dispatcher`
    and `openrtc worker --agent NAME` as separate processes instead.
    """
    from openrtc.devtools.allinone import AllInOne
    from openrtc.settings import LiveKitSettings

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
                tenants_file=str(tenants) if tenants is not None else "",
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

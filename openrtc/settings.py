"""Settings as plain data: what the services need, with no behaviour attached.

Configuration follows LiveKit's conventions (``LIVEKIT_URL``,
``LIVEKIT_API_KEY``, ``LIVEKIT_API_SECRET``) plus ``REDIS_URL``; the CLI maps
flags and environment variables onto these classes. Secrets are kept out of
every ``repr`` so a settings object can be logged safely.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from openrtc.errors import ConfigError
from openrtc.wire.keys import DEFAULT_NAMESPACE
from openrtc.wire.signing import SigningKeys

NoWorkerPolicy = Literal["queue", "reject"]

__all__ = [
    "DEFAULT_CHECKPOINT_MAX_BYTES",
    "DEFAULT_DEAD_LETTER_MAXLEN",
    "DEFAULT_DEDUP_TTL",
    "DEFAULT_DISPATCHER_HTTP_PORT",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_NAMESPACE",
    "DEFAULT_OBSERVER_TIMEOUT",
    "DEFAULT_REDIS_URL",
    "DEFAULT_STATUS_TTL",
    "DEFAULT_WORKER_HTTP_PORT",
    "MAX_CHECKPOINT_BYTES",
    "NUMBERS",
    "Bound",
    "DispatcherSettings",
    "LiveKitSettings",
    "SettingError",
    "WorkerSettings",
    "check_numbers",
    "default_of",
    "number_problem",
    "redact_url",
]

#: The Redis every service and command uses unless told otherwise.
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
#: The CLI's HTTP ports (``--http-port``): apart from each other so a
#: dispatcher and a worker can share a host, and apart from livekit-agents'
#: health server (8081) and LiveKit's own ports (7880-7882).
DEFAULT_DISPATCHER_HTTP_PORT: Final = 8181
DEFAULT_WORKER_HTTP_PORT: Final = 8182
#: How long a job's record (and with it its id's de-duplication) lives, in s.
DEFAULT_DEDUP_TTL: Final = 24 * 3600.0
#: How long a worker told to stop (SIGTERM: a deploy, a scale-down) lets its
#: calls go on, in s. livekit-agents waits an hour, because there a call still
#: running at the deadline is cut. Here it is not: a peer takes it over within
#: a lease. So the drain only has to outlast nearly every call, not the
#: longest: 30 minutes is several times a receptionist's or booking call, and
#: keeps a rolling restart of a worker pool bounded. Kubernetes' grace period
#: must exceed it (workers/deployment.yaml).
DEFAULT_DRAIN_TIMEOUT: Final = 1800.0
#: Dead letters kept (approximate ``MAXLEN`` on the dead-letter stream): the
#: oldest are trimmed past it. ~1-2 KB each, so about 10-20 MB at most.
DEFAULT_DEAD_LETTER_MAXLEN: Final = 10_000
#: Call reports kept (approximate ``MAXLEN`` on the reports stream): the oldest
#: are trimmed past it. ~1-3 KB each without transcripts, so about 0.1-0.3 GB at most.
DEFAULT_REPORT_MAXLEN: Final = 100_000
#: Call reports older than this are trimmed (s; ``MINID`` on Redis's clock).
DEFAULT_REPORT_MAX_AGE: Final = 30 * 86400.0
#: How long one session observer call may take (s) before it is abandoned and logged.
DEFAULT_OBSERVER_TIMEOUT: Final = 5.0
#: How often a worker publishes its running sessions for ``openrtc top`` (s).
DEFAULT_TOP_INTERVAL: Final = 2.0
#: How long ``openrtc connect`` waits for the agent to join, by default (s): a
#: LiveKit server reports a dispatch's job seconds late, a worker may be starting.
DEFAULT_CONNECT_TIMEOUT: Final = 30.0
#: A dispatcher's status stream expires this long after its last event (s).
DEFAULT_STATUS_TTL: Final = 3600.0
#: Largest conversation checkpoint kept per call, by default (bytes).
DEFAULT_CHECKPOINT_MAX_BYTES: Final = 64 * 1024
#: The most ``--checkpoint-max-bytes`` may be. Redis refuses strings over
#: 512 MB, but the bound that matters comes much earlier: a checkpoint is
#: re-encoded and written on every turn (and piped from a session process),
#: and read back whole on a takeover, while the caller waits. 16 MiB is a
#: quarter of a million words, far more than any model's context.
MAX_CHECKPOINT_BYTES: Final = 16 * 1024 * 1024

_DAY: Final = 86400.0


class SettingError(ConfigError):
    """A setting outside its bounds (:data:`NUMBERS`); the message names it as operators set it."""


@dataclass(frozen=True, slots=True)
class Bound:
    """The values one numeric setting may take, and its names where an operator sets it."""

    low: float
    high: float
    #: ``low`` itself is refused: the value must be more than it.
    above: bool = False
    #: One value outside ``[low, high]`` that is accepted and means "off".
    off: float | None = None
    unit: str = ""
    flag: str = ""
    env: str = ""

    def admits(self, value: float) -> bool:
        """Whether ``value`` is allowed (NaN and infinities never are)."""
        if self.off is not None and value == self.off:
            return True
        if not math.isfinite(value):
            return False
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def rule(self) -> str:
        """The bounds in words: ``more than 0 and at most 86400 seconds``."""
        low = f"more than {_number(self.low)}" if self.above else f"at least {_number(self.low)}"
        rule = f"{low} and at most {_number(self.high)}" + (f" {self.unit}" if self.unit else "")
        return rule if self.off is None else f"{_number(self.off)} (off) or {rule}"

    def label(self, name: str) -> str:
        """How the operator knows the setting: its flag and variable, else its name."""
        named = [n for n in (self.flag, self.env) if n]
        if not named:
            return name
        return named[0] + (f" ({named[1]})" if len(named) > 1 else "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


#: Every numeric setting of every service and command, by its name (the
#: settings field, or the command's parameter): what it may be, and its
#: flag and variable. Each is checked here and only here
#: (:func:`check_numbers`), at start-up, before anything connects. The
#: bounds keep out values that would lose calls quietly (a queue age of 0
#: expires every call, a drain of 0 hands nothing over) and values past
#: what any deployment needs (a typo of three zeros).
NUMBERS: Final[Mapping[str, Bound]] = {
    # Both services.
    "heartbeat_interval": Bound(0, 60, above=True, unit="seconds"),
    "membership_ttl": Bound(0, 3600, above=True, unit="seconds"),
    "dedup_ttl": Bound(1, 30 * _DAY, unit="seconds"),
    "dead_letter_maxlen": Bound(
        1, 10_000_000, flag="--dead-letter-maxlen", env="OPENRTC_DEAD_LETTER_MAXLEN"
    ),
    "report_maxlen": Bound(100, 10_000_000, flag="--report-maxlen", env="OPENRTC_REPORT_MAXLEN"),
    "report_max_age": Bound(
        3600, 366 * _DAY, unit="seconds", flag="--report-max-age", env="OPENRTC_REPORT_MAX_AGE"
    ),
    "http_port": Bound(1, 65535, off=0, flag="--http-port", env="OPENRTC_HTTP_PORT"),
    "health_max_lag": Bound(0, 3600, above=True, unit="seconds"),
    # The dispatcher.
    "max_backlog": Bound(0, 10**9, flag="--max-backlog", env="OPENRTC_MAX_BACKLOG"),
    "enqueue_timeout": Bound(0, 10, above=True, unit="seconds"),
    "load_interval": Bound(0, 60, above=True, unit="seconds"),
    "reconnect_initial": Bound(0, 60, above=True, unit="seconds"),
    "reconnect_max": Bound(0, 3600, above=True, unit="seconds"),
    "wait_replicas": Bound(1, 100, off=0, flag="--wait-replicas", env="OPENRTC_WAIT_REPLICAS"),
    "wait_timeout": Bound(0, 10, above=True, unit="seconds"),
    "reconcile_interval": Bound(
        0.1,
        3600,
        off=0,
        unit="seconds",
        flag="--reconcile-interval",
        env="OPENRTC_RECONCILE_INTERVAL",
    ),
    "reconcile_grace": Bound(
        0, 3600, unit="seconds", flag="--reconcile-grace", env="OPENRTC_RECONCILE_GRACE"
    ),
    # The worker.
    "concurrency": Bound(1, 10_000, flag="--concurrency", env="OPENRTC_CONCURRENCY"),
    "idle_processes": Bound(0, 1000, flag="--idle-processes", env="OPENRTC_IDLE_PROCESSES"),
    # Renewed every lease / 3: below 0.3 s the renewals would be the load.
    "lease": Bound(0.3, 3600, above=True, unit="seconds", flag="--lease", env="OPENRTC_LEASE"),
    "crash_grace": Bound(0, 60, above=True, unit="seconds"),
    "max_deliveries": Bound(1, 1000, flag="--max-deliveries", env="OPENRTC_MAX_DELIVERIES"),
    # Below a second, calls a busy worker reads in ordinary time would expire.
    "max_queue_age": Bound(
        1, _DAY, unit="seconds", flag="--max-queue-age", env="OPENRTC_MAX_QUEUE_AGE"
    ),
    "drain_timeout": Bound(
        0, _DAY, above=True, unit="seconds", flag="--drain-timeout", env="OPENRTC_DRAIN_TIMEOUT"
    ),
    "takeover_grace": Bound(0, 600, above=True, unit="seconds"),
    "observer_timeout": Bound(
        0,
        3600,
        above=True,
        unit="seconds",
        flag="--observer-timeout",
        env="OPENRTC_OBSERVER_TIMEOUT",
    ),
    "top_interval": Bound(0, 60, unit="seconds", flag="--top-interval", env="OPENRTC_TOP_INTERVAL"),
    "forget_consumers_after": Bound(
        0,
        30 * _DAY,
        above=True,
        unit="seconds",
        flag="--forget-consumers-after",
        env="OPENRTC_FORGET_CONSUMERS_AFTER",
    ),
    "status_ttl": Bound(1, 30 * _DAY, unit="seconds"),
    "load_threshold": Bound(
        0, 1, above=True, flag="--load-threshold", env="OPENRTC_LOAD_THRESHOLD"
    ),
    # Below 64 MB not even the runtime fits: the worker would stop at once.
    "memory_warn_mb": Bound(
        64, 1_048_576, unit="MB", flag="--memory-warn-mb", env="OPENRTC_MEMORY_WARN_MB"
    ),
    "memory_limit_mb": Bound(
        64, 1_048_576, unit="MB", flag="--memory-limit-mb", env="OPENRTC_MEMORY_LIMIT_MB"
    ),
    "session_memory_limit_mb": Bound(
        16,
        1_048_576,
        unit="MB",
        flag="--session-memory-limit-mb",
        env="OPENRTC_SESSION_MEMORY_LIMIT_MB",
    ),
    "max_consecutive_failures": Bound(
        1,
        10_000,
        off=0,
        flag="--max-consecutive-failures",
        env="OPENRTC_MAX_CONSECUTIVE_FAILURES",
    ),
    "failure_cooldown": Bound(
        0,
        _DAY,
        above=True,
        unit="seconds",
        flag="--failure-cooldown",
        env="OPENRTC_FAILURE_COOLDOWN",
    ),
    # Below 4 KiB hardly a turn fits: every takeover would start afresh.
    "checkpoint_max_bytes": Bound(
        4096,
        MAX_CHECKPOINT_BYTES,
        off=0,
        unit="bytes",
        flag="--checkpoint-max-bytes",
        env="OPENRTC_CHECKPOINT_MAX_BYTES",
    ),
    # A tenant's entry in tenants.toml (openrtc.tenant_file): named by its key
    # there. Caps and breaker thresholds are carried for the fleet-wide caps and
    # breakers (issue 21 items 3 and 5), which enforce them.
    "tenant.max_sessions": Bound(1, 1_000_000),
    "tenant.max_sessions_per_agent": Bound(1, 1_000_000),
    "tenant.breaker.failure_ratio": Bound(0, 1, above=True),
    "tenant.breaker.min_sessions": Bound(1, 100_000),
    "tenant.breaker.window": Bound(1, _DAY, unit="seconds"),
    "tenant.breaker.cooldown": Bound(1, _DAY, unit="seconds"),
    # Commands (not services).
    "interval": Bound(0.1, 3600, unit="seconds", flag="--interval"),
    "max_wait": Bound(0, _DAY, unit="seconds", flag="--max-wait", env="OPENRTC_MAX_WAIT"),
    "count": Bound(1, 1_000_000, flag="--count"),
    "older_than": Bound(0, 100 * 365 * _DAY, unit="seconds", flag="--older-than"),
    "wait": Bound(0, 3600, above=True, unit="seconds", flag="--wait"),
    "listen": Bound(0, 3600, unit="seconds", flag="--listen"),
    "timeout": Bound(0, 3600, above=True, unit="seconds", flag="--timeout"),
}


def check_numbers(values: Mapping[str, Any]) -> None:
    """Refuse the first numeric value in ``values`` outside its :data:`NUMBERS` bounds.

    ``values`` maps setting names to values; what is not a number (text,
    flags, ``None`` for "not set") is not checked. A number with no entry is
    a programming error (``KeyError``): every numeric setting has bounds.

    :raises SettingError: one line naming the setting's flag and variable.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if (problem := number_problem(name, value)) is not None:
            raise SettingError(f"{NUMBERS[name].label(name)} {problem}")


def number_problem(name: str, value: float) -> str | None:
    """``must be <rule>, not <value>`` when ``value`` is outside ``name``'s
    :data:`NUMBERS` bounds, else ``None`` (for callers that name the setting
    their own way: a key of ``tenants.toml``)."""
    bound = NUMBERS[name]
    return None if bound.admits(value) else f"must be {bound.rule()}, not {value}"


def default_of(settings: type, name: str) -> Any:
    """The default of the field ``name`` of a settings class: the CLI shows and uses it."""
    for f in fields(settings):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(f"{settings.__name__}.{name} has no default")


def _numbers_of(settings: Any) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (Redis URLs may carry one).

    Both places count: the user-info part and redis-py's ``password`` and
    ``ssl_password`` query options.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name in _SECRET_OPTIONS for name, _ in query):
        shown = [(name, "***" if name in _SECRET_OPTIONS else value) for name, value in query]
        parts = parts._replace(query=urlencode(shown, safe="/*"))
    if parts.password is not None:
        user = parts.username or ""
        # Everything after the credentials, as written: a cluster or Sentinel
        # URL lists several host:port pairs there.
        hosts = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:***@{hosts}")
    return urlunsplit(parts)


_SECRET_OPTIONS: Final = frozenset({"password", "ssl_password"})


def _check_signing(signing: SigningKeys | None, required: bool) -> None:
    if required and signing is None:
        raise SettingError(
            "--require-signing (OPENRTC_REQUIRE_SIGNING): no signing key "
            "(set OPENRTC_SIGNING_KEY or --signing-key-file)"
        )


def new_instance_id(prefix: str) -> str:
    """A readable unique id for a process: ``<prefix>-<host>-<pid>-<random>``."""
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{prefix}-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class LiveKitSettings:
    """Where the LiveKit server is and the credentials to act as an agent worker."""

    url: str
    api_key: str
    api_secret: str = field(repr=False)

    def __post_init__(self) -> None:
        missing = [
            name
            for name, value in (
                ("LIVEKIT_URL", self.url),
                ("LIVEKIT_API_KEY", self.api_key),
                ("LIVEKIT_API_SECRET", self.api_secret),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (set the variable or pass the flag)")
        if not self.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ConfigError(
                f"LIVEKIT_URL must start with ws://, wss://, http:// or https://: {self.url!r}"
            )

    @property
    def ws_url(self) -> str:
        """The URL with a WebSocket scheme, as rooms and the /agent endpoint want it."""
        if self.url.startswith("http"):
            return "ws" + self.url[4:]
        return self.url

    @property
    def http_url(self) -> str:
        """The URL with an HTTP scheme, as the server API wants it."""
        if self.url.startswith("ws"):
            return "http" + self.url[2:]
        return self.url


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    """Everything one dispatcher process needs. Times are seconds."""

    livekit: LiveKitSettings
    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    #: Name registered with LiveKit. Empty: automatic dispatch (every new room);
    #: a name: explicit dispatch to that name only (see LIVEKIT.md).
    agent_name: str = ""
    dispatcher_id: str = field(default_factory=lambda: new_instance_id("dispatcher"))
    #: A job for an agent with no live worker: ``queue`` it (an autoscaler may
    #: start one; it expires to the dead letters if none does) or ``reject`` it
    #: (answer unavailable so LiveKit can try another dispatcher).
    when_no_worker: NoWorkerPolicy = "queue"
    #: Jobs an agent may have waiting beyond its workers' free slots before new
    #: ones are answered unavailable.
    max_backlog: int = 100
    #: How long an assignment may wait for Redis before it is failed towards LiveKit.
    enqueue_timeout: float = 2.0
    #: How long a job id is remembered for de-duplication.
    dedup_ttl: float = DEFAULT_DEDUP_TTL
    heartbeat_interval: float = 1.0
    #: A dispatcher or worker that has not heartbeated for this long is gone.
    membership_ttl: float = 5.0
    #: How often the load is reported to LiveKit (livekit-agents uses 2.5 s).
    load_interval: float = 2.5
    reconnect_initial: float = 0.25
    reconnect_max: float = 10.0
    cluster_keys: bool = False
    #: Replicas that must have each enqueued job before it counts as written
    #: (Redis ``WAIT`` after each enqueue pipeline); 0 = off. A shortfall
    #: within ``wait_timeout`` is logged, the job is kept.
    wait_replicas: int = 0
    wait_timeout: float = 0.5
    #: How often the reconciler (run by one dispatcher at a time, the holder
    #: of a Redis lease) looks for rooms with a caller and no agent; 0: off.
    reconcile_interval: float = 2.0
    #: How long a room has had a caller and no agent (and no job of ours
    #: queued for it) before the reconciler dispatches it again.
    reconcile_grace: float = 3.0
    #: Port of the /healthz, /readyz and /metrics server; 0 = none (the CLI's
    #: default is DEFAULT_DISPATCHER_HTTP_PORT, see the README).
    http_port: int = 0
    http_host: str = "0.0.0.0"
    #: When ``http_port`` is taken, serve on a free port instead (logged): for
    #: the CLI's default port, which several services on one host share; a
    #: port asked for (``--http-port``) must be that port or nothing.
    http_port_fallback: bool = False
    #: /healthz answers 503 when the event loop lags more than this (s).
    health_max_lag: float = 5.0
    #: Dead letters kept; the oldest are trimmed past it (approximately).
    dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN
    #: Signs job and control entries (and, in a worker, checkpoints) and
    #: refuses unsigned or forged ones (openrtc.wire.signing); ``None``: off, as
    #: before signing existed (a warning at start-up).
    signing: SigningKeys | None = field(default=None, repr=False)
    #: Refuse to start without ``signing``: for a Redis others can write to.
    require_signing: bool = False

    def __post_init__(self) -> None:
        check_numbers(_numbers_of(self))
        _check_signing(self.signing, self.require_signing)
        if self.wait_timeout >= self.enqueue_timeout:
            raise SettingError("wait_timeout must be less than enqueue_timeout")
        if self.membership_ttl <= self.heartbeat_interval:
            raise SettingError("membership_ttl must be more than heartbeat_interval")
        if self.reconnect_initial > self.reconnect_max:
            raise SettingError("reconnect_initial must be at most reconnect_max")
        if self.when_no_worker not in ("queue", "reject"):
            raise ConfigError(
                f"when_no_worker must be 'queue' or 'reject', not {self.when_no_worker!r}"
            )


Isolation = Literal["coroutine", "process"]


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Everything one worker process needs. Times are seconds."""

    livekit: LiveKitSettings
    agent: str
    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    worker_id: str = field(default_factory=lambda: new_instance_id("worker"))
    #: Sessions at once in this worker.
    concurrency: int = 10
    #: ``coroutine``: sessions share this process and its prewarmed models
    #: (the default: density). ``process``: one child process per session.
    isolation: Isolation = "coroutine"
    #: A running job's claim lapses after this long without renewal; another
    #: worker then takes the call over. Renewed every ``lease / 3``.
    lease: float = 5.0
    #: Take a crashed worker's calls over as soon as its process is seen gone
    #: (its liveness subscription closed), instead of after the lease. Frozen
    #: and partitioned workers are still left to the lease.
    crash_detection: bool = True
    #: Draining (SIGTERM), hand running calls to peers with free slots, each at
    #: a turn boundary with its checkpoint, instead of waiting for them to end.
    handover: bool = True
    #: A worker's liveness subscription must stay gone this long before its
    #: peers believe it crashed: a live worker's reconnect takes milliseconds.
    #: (At most half the lease: detection is never slower than the lease.)
    crash_grace: float = 0.3
    #: Deliveries after which a job goes to the dead letters (``max-deliveries``).
    max_deliveries: int = 5
    #: A job that waited longer than this before any worker started it goes to
    #: the dead letters as ``expired`` instead of starting late.
    max_queue_age: float = 30.0
    #: On SIGTERM, how long running sessions may go on before they are left
    #: for other workers to take over.
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    heartbeat_interval: float = 1.0
    membership_ttl: float = 5.0
    #: Warm child processes kept ready in ``process`` isolation
    #: (``--idle-processes``); a job takes one instead of waiting for a fork.
    idle_processes: int = 1
    #: Hot reload (``--reload``, a developer's own stack; ``openrtc dev`` has its
    #: own): a saved agent module serves new calls, and moves live ones at their
    #: next turn boundary, with their conversation.
    reload: bool = False
    #: The tenants file (``--tenants``, ``OPENRTC_TENANTS``); ``""``: the agents
    #: directory's ``tenants.toml`` if there is one (openrtc.tenant_file).
    tenants_file: str = ""
    #: A worker that took a call over ignores LiveKit's termination of the
    #: replaced participant for this long (it is caused by the takeover itself).
    takeover_grace: float = 10.0
    #: A consumer in the group that holds nothing and has not read for this
    #: long belongs to a worker that is gone: it is removed from the group.
    forget_consumers_after: float = 300.0
    #: How long a job record written by this worker lives (as the dispatcher's).
    dedup_ttl: float = DEFAULT_DEDUP_TTL
    #: Dead letters kept; the oldest are trimmed past it (approximately).
    dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN
    #: Call reports kept; the oldest are trimmed past it (approximately).
    report_maxlen: int = DEFAULT_REPORT_MAXLEN
    #: Call reports older than this are trimmed (s).
    report_max_age: float = DEFAULT_REPORT_MAX_AGE
    #: Each session observer call (``@on_session_start``/``_end``) is abandoned
    #: and logged after this long (s).
    observer_timeout: float = DEFAULT_OBSERVER_TIMEOUT
    #: How often this worker publishes its running sessions for ``openrtc top``
    #: (s); 0: never.
    top_interval: float = DEFAULT_TOP_INTERVAL
    #: A dispatcher's status stream expires this long after the last event a
    #: worker sent it, so the streams of dispatchers that are gone do not pile up.
    status_ttl: float = DEFAULT_STATUS_TTL
    cluster_keys: bool = False
    #: Host CPU use in (0, 1] at or above which this worker leaves new calls
    #: to peers below theirs (livekit-agents' ``load_threshold``); ``None``:
    #: off. When every worker is above it they all go on reading.
    load_threshold: float | None = None
    #: Port of the /healthz, /readyz and /metrics server; 0 = none (the CLI's
    #: default is DEFAULT_WORKER_HTTP_PORT, see the README).
    http_port: int = 0
    http_host: str = "0.0.0.0"
    #: When ``http_port`` is taken, serve on a free port instead (logged): for
    #: the CLI's default port, which several services on one host share; a
    #: port asked for (``--http-port``) must be that port or nothing.
    http_port_fallback: bool = False
    #: /healthz answers 503 when the event loop lags more than this (s).
    health_max_lag: float = 5.0
    #: Largest conversation checkpoint kept per call (bytes; long texts are
    #: shortened, then the oldest turns dropped); 0 = no checkpoints,
    #: takeovers start afresh. At most MAX_CHECKPOINT_BYTES.
    checkpoint_max_bytes: int = DEFAULT_CHECKPOINT_MAX_BYTES
    #: Memory (MB; the worker's, with its session processes) over which one
    #: warning is logged; ``None``: off (openrtc.worker.guards).
    memory_warn_mb: float | None = None
    #: Memory (MB) at which the worker drains (its calls handed to peers with
    #: their conversation) and exits with code 75 to be restarted; ``None``: off.
    memory_limit_mb: float | None = None
    #: ``process`` isolation: a session process's own memory (MB) at which its
    #: call is handed over and the process replaced; ``None``: off.
    session_memory_limit_mb: float | None = None
    #: Calls in a row whose sessions ended ``failed`` (one failing again counts
    #: once) after which the worker takes no new jobs (``/readyz`` 503) for
    #: ``failure_cooldown``; 0: off.
    max_consecutive_failures: int = 5
    failure_cooldown: float = 60.0
    #: Signs job and control entries (and, in a worker, checkpoints) and
    #: refuses unsigned or forged ones (openrtc.wire.signing); ``None``: off, as
    #: before signing existed (a warning at start-up).
    signing: SigningKeys | None = field(default=None, repr=False)
    #: Refuse to start without ``signing``: for a Redis others can write to.
    require_signing: bool = False

    def __post_init__(self) -> None:
        check_numbers(_numbers_of(self))
        _check_signing(self.signing, self.require_signing)
        if self.membership_ttl <= self.heartbeat_interval:
            raise SettingError("membership_ttl must be more than heartbeat_interval")
        if (
            self.memory_warn_mb is not None
            and self.memory_limit_mb is not None
            and self.memory_warn_mb >= self.memory_limit_mb
        ):
            raise SettingError("--memory-warn-mb must be less than --memory-limit-mb")
        if self.session_memory_limit_mb is not None and self.isolation != "process":
            raise SettingError("--session-memory-limit-mb needs --isolation process")
        if self.isolation not in ("coroutine", "process"):
            raise ConfigError(f"isolation must be 'coroutine' or 'process', not {self.isolation!r}")

"""Settings as plain data: what the services need, with no behaviour attached.

Configuration follows LiveKit's conventions (``LIVEKIT_URL``,
``LIVEKIT_API_KEY``, ``LIVEKIT_API_SECRET``) plus ``REDIS_URL``; the CLI maps
flags and environment variables onto these classes. Secrets are kept out of
every ``repr`` so a settings object can be logged safely.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from openrtc.errors import ConfigError
from openrtc.keys import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from openrtc.signing import SigningKeys

NoWorkerPolicy = Literal["queue", "reject"]

__all__ = [
    "DEFAULT_DEAD_LETTER_MAXLEN",
    "DEFAULT_DEDUP_TTL",
    "DEFAULT_DISPATCHER_HTTP_PORT",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_NAMESPACE",
    "DEFAULT_REDIS_URL",
    "DEFAULT_STATUS_TTL",
    "DEFAULT_WORKER_HTTP_PORT",
    "DispatcherSettings",
    "LiveKitSettings",
    "WorkerSettings",
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
#: A dispatcher's status stream expires this long after its last event (s).
DEFAULT_STATUS_TTL: Final = 3600.0


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
        raise ConfigError(
            "require_signing: no signing key (set OPENRTC_SIGNING_KEY or --signing-key-file)"
        )


def _check_http(port: int, max_lag: float) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"http_port must be in [0, 65535] (0 = off), not {port}")
    if max_lag <= 0:
        raise ConfigError("health_max_lag must be more than 0 seconds")


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
    #: refuses unsigned or forged ones (openrtc.signing); ``None``: off, as
    #: before signing existed (a warning at start-up).
    signing: SigningKeys | None = field(default=None, repr=False)
    #: Refuse to start without ``signing``: for a Redis others can write to.
    require_signing: bool = False

    def __post_init__(self) -> None:
        _check_http(self.http_port, self.health_max_lag)
        _check_signing(self.signing, self.require_signing)
        if self.reconcile_interval < 0:
            raise ConfigError("reconcile_interval must be >= 0 (0: off)")
        if self.reconcile_grace < 0:
            raise ConfigError("reconcile_grace must be >= 0")
        if self.wait_replicas < 0:
            raise ConfigError("wait_replicas must be >= 0")
        if self.dead_letter_maxlen < 1:
            raise ConfigError("dead_letter_maxlen must be >= 1")
        if not 0 < self.wait_timeout < self.enqueue_timeout:
            raise ConfigError("wait_timeout must be in (0, enqueue_timeout) seconds")
        if self.when_no_worker not in ("queue", "reject"):
            raise ConfigError(
                f"when_no_worker must be 'queue' or 'reject', not {self.when_no_worker!r}"
            )
        if self.max_backlog < 0:
            raise ConfigError("max_backlog must be >= 0")
        if not 0 < self.enqueue_timeout <= 10:
            raise ConfigError("enqueue_timeout must be in (0, 10] seconds")


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
    #: Largest conversation checkpoint kept per call (bytes; the oldest turns
    #: are dropped first); 0 = no checkpoints, takeovers start afresh.
    checkpoint_max_bytes: int = 64 * 1024
    #: Signs job and control entries (and, in a worker, checkpoints) and
    #: refuses unsigned or forged ones (openrtc.signing); ``None``: off, as
    #: before signing existed (a warning at start-up).
    signing: SigningKeys | None = field(default=None, repr=False)
    #: Refuse to start without ``signing``: for a Redis others can write to.
    require_signing: bool = False

    def __post_init__(self) -> None:
        _check_http(self.http_port, self.health_max_lag)
        _check_signing(self.signing, self.require_signing)
        if self.checkpoint_max_bytes < 0:
            raise ConfigError("checkpoint_max_bytes must be >= 0 (0 = no checkpoints)")
        if self.load_threshold is not None and not 0 < self.load_threshold <= 1:
            raise ConfigError("load_threshold must be in (0, 1]")
        if self.concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        if self.isolation not in ("coroutine", "process"):
            raise ConfigError(f"isolation must be 'coroutine' or 'process', not {self.isolation!r}")
        if self.lease <= 0.3:
            raise ConfigError("lease must be more than 0.3 seconds")
        if self.max_deliveries < 1:
            raise ConfigError("max_deliveries must be >= 1")
        if self.crash_grace <= 0:
            raise ConfigError("crash_grace must be more than 0 seconds")
        if self.idle_processes < 0:
            raise ConfigError("idle_processes must be >= 0")
        if self.forget_consumers_after <= 0:
            raise ConfigError("forget_consumers_after must be more than 0 seconds")
        if self.dead_letter_maxlen < 1:
            raise ConfigError("dead_letter_maxlen must be >= 1")
        if self.status_ttl < 1:
            raise ConfigError("status_ttl must be at least 1 second")

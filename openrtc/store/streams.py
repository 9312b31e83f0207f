"""The Redis stream layer: enqueue jobs, dead letters, status and control events.

Job streams are ``<ns>:jobs:<agent>`` with one consumer group, ``workers``.
The dispatcher adds entries through one Lua script per job that checks and
writes the job's record hash (de-duplication by LiveKit job id) and the
stream entry atomically, so the same job is never enqueued twice, even when an
add is retried after a lost reply. Job streams are never trimmed: a stream
holds only waiting and running jobs (workers delete entries once
acknowledged), and its size is bounded by the dispatcher's admission policy
(``max_backlog``), so a running call's entry can never be cut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, urlsplit

import anyio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from openrtc.errors import ConfigError
from openrtc.settings import (
    DEFAULT_DEAD_LETTER_MAXLEN,
    DEFAULT_DEDUP_TTL,
    DEFAULT_STATUS_TTL,
    DispatcherSettings,
    WorkerSettings,
    redact_url,
)
from openrtc.store.redis_url import client_from_url, is_cluster_url
from openrtc.store.scripts import pack_fields, register
from openrtc.wire.keys import ENDED_TTL, WORKERS_GROUP, Keys
from openrtc.wire.messages import (
    HANDOVER_FIELD,
    ControlEvent,
    DeadReason,
    JobMessage,
    RecordField,
    StatusEvent,
    dead_letter_fields,
    decode_job_record,
)
from openrtc.wire.reports import REPORT_FIELD, CallReport
from openrtc.wire.signing import SigningKeys, sign_control, sign_job, sign_report

__all__ = [
    "REDIS_DOWN",
    "EnqueueResult",
    "GroupRow",
    "RedisClient",
    "RefusedCommand",
    "ReportWrite",
    "StreamStore",
    "connect_redis",
    "service_keys",
    "workers_group",
]

logger = logging.getLogger("openrtc.streams")

#: Cap on the status and control streams (approximate MAXLEN); the dead-letter
#: stream's is a setting (``dead_letter_maxlen``).
SIDE_STREAM_MAXLEN: Final = 10_000
#: The agent's workers start a sweep of its whole pending list at most once
#: per this fraction of the lease, so a dead worker's entry is found within
#: about half a lease of becoming reclaimable.
RECLAIM_SWEEP: Final = 0.5
#: The shared sweep state outlives the agent's last reclaim pass this long (s).
RECLAIM_STATE_TTL: Final = 60.0
#: What a Redis call raises when Redis is unreachable or too slow: every
#: ``except`` that rides an outage out names this one tuple. (``TimeoutError``
#: is an ``OSError`` already; it is named for ``anyio.fail_after``'s readers.)
REDIS_DOWN: Final = (RedisError, OSError, TimeoutError)
#: The asyncio client the services hold; named here so that only
#: ``openrtc.store`` imports redis (an import-linter contract).
RedisClient = Redis
#: A command Redis refused (a missing ACL grant, a wrong type): a mistake to
#: report, not an outage to ride out.
RefusedCommand = ResponseError


def service_keys(namespace: str, redis_url: str, *, cluster_keys: bool = False) -> Keys:
    """The key builder of a service on ``redis_url``.

    Keys are hash-tagged per agent under Redis Cluster, or when asked
    (``cluster_keys``: a proxy in front of a cluster hides the scheme).
    """
    return Keys(namespace, cluster=cluster_keys or is_cluster_url(redis_url))


def connect_redis(url: str, *, client_name: str | None = None) -> Redis:
    """A redis-py asyncio client with timeouts short enough to fail fast.

    Responses stay bytes: job entries carry a serialized protobuf. A command
    that meets a closed connection (Redis restarted or failed over since the
    connection was pooled) is sent again on a fresh one, twice at most; a
    timeout is not retried, since the command may have run.

    TLS and its files come with the URL, as redis-py reads them:
    ``rediss://user:password@host:6380/0?ssl_ca_certs=/etc/ca.pem`` (also
    ``ssl_certfile``, ``ssl_keyfile`` for a client certificate). A file named
    there that does not exist, or a URL redis-py cannot parse, raises
    :class:`~openrtc.errors.ConfigError` with the password redacted.
    """
    for name, values in parse_qs(urlsplit(url).query).items():
        for value in values if name in _SSL_FILE_OPTIONS else ():
            if not Path(value).is_file():
                raise ConfigError(f"Redis at {redact_url(url)}: {name}: no such file {value}")
    try:
        client: Redis = client_from_url(
            url,
            decode_responses=False,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            health_check_interval=10,
            client_name=client_name,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), 2),
            retry_on_error=[RedisConnectionError],
            # Neither CLIENT SETINFO nor CLIENT MAINT_NOTIFICATIONS (Redis
            # Enterprise's maintenance events) on connect: commands the ACL
            # (redis_access.ACL_COMMANDS) would have to grant, and Redis 7.0
            # does not know them.
            driver_info=None,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
    except ValueError as exc:
        raise ConfigError(f"Redis at {redact_url(url)}: {exc}") from None
    return client


#: URL options naming files (redis-py's ``ssl_*`` keywords).
_SSL_FILE_OPTIONS: Final = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """Where a job went: ``queued`` (new entry) or ``duplicate`` (already there)."""

    outcome: Literal["queued", "duplicate"]
    entry_id: str


class StreamStore:
    """Stream operations shared by the dispatcher, the workers and the CLI."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        dedup_ttl: float = DEFAULT_DEDUP_TTL,
        wait_replicas: int = 0,
        wait_timeout: float = 0.5,
        dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN,
        status_ttl: float = DEFAULT_STATUS_TTL,
        signing: SigningKeys | None = None,
    ) -> None:
        self.redis = redis
        #: Signs the job and control entries this store adds (``None``: unsigned).
        self.signing = signing
        #: Dead letters kept (approximate MAXLEN): the oldest are trimmed.
        self.dead_letter_maxlen = dead_letter_maxlen
        #: Seconds a status stream lives after its last event.
        self.status_ttl = max(1, int(status_ttl))
        # WAIT after each enqueue pipeline: the jobs are acknowledged only once
        # that many replicas have them (or the timeout passed), so a failover
        # right after does not lose them. 0: off (docs/redis.md, "Durability").
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = int(wait_timeout * 1000)
        self._under_replicated_logged = 0.0
        self.keys = keys
        #: Seconds a job record (and with it the job id's de-duplication) lives.
        self.dedup_ttl = int(dedup_ttl)
        #: The Lua scripts (:mod:`openrtc.store.scripts`), registered on this client.
        self.scripts = register(redis)
        self._enqueue_loaded = False
        self._known_groups: set[str] = set()
        #: The client was made for this store (:meth:`for_service`): its owner closes it.
        self.owns_redis = False

    @classmethod
    def for_service(
        cls,
        settings: DispatcherSettings | WorkerSettings,
        member_id: str,
        *,
        redis: Redis | None = None,
        **options: Any,
    ) -> StreamStore:
        """The store of a dispatcher or worker: its keys, a client, the settings' limits.

        ``redis``: a client to use (tests, benchmarks); by default one is made
        from ``settings.redis_url``, named ``openrtc:<member_id>``, and
        :attr:`owns_redis` is set (the service closes it on exit). ``options``:
        the :class:`StreamStore` arguments only one kind of service has
        (``wait_replicas`` and ``wait_timeout``; ``status_ttl``).
        """
        keys = service_keys(
            settings.namespace, settings.redis_url, cluster_keys=settings.cluster_keys
        )
        client = redis or connect_redis(settings.redis_url, client_name=f"openrtc:{member_id}")
        store = cls(
            client,
            keys,
            dedup_ttl=settings.dedup_ttl,
            dead_letter_maxlen=settings.dead_letter_maxlen,
            signing=settings.signing,
            **options,
        )
        store.owns_redis = redis is None
        return store

    async def ensure_group(self, agent: str) -> None:
        """Create ``agent``'s stream and consumer group if missing (idempotent).

        The group starts at ``0`` so entries added before it existed (for
        example while Redis was restarted under a running dispatcher) are
        delivered, not skipped.
        """
        stream = self.keys.jobs(agent)
        try:
            await self.redis.xgroup_create(stream, WORKERS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self.redis.sadd(self.keys.agents, agent)

    async def enqueue(self, messages: Sequence[JobMessage]) -> list[EnqueueResult]:
        """Add jobs to their agents' streams in one round trip, de-duplicated by job id."""
        if not messages:
            return []
        for attempt in range(2):
            if not self._enqueue_loaded:
                await self.redis.script_load(self.scripts.enqueue.script)
                self._enqueue_loaded = True
            # EVALSHA queued directly: redis-py's Script object would add a
            # SCRIPT EXISTS round trip to every pipeline.
            pipe = self.redis.pipeline(transaction=False)
            for message in messages:
                fields = message.encode()
                if self.signing is not None:
                    fields = sign_job(self.signing, fields)
                args: list[Any] = [
                    "EVALSHA",
                    self.scripts.enqueue.sha,
                    2,
                    self.keys.job(message.agent, message.job_id),
                    self.keys.jobs(message.agent),
                    self.dedup_ttl,
                    message.dispatcher_id,
                    pack_fields(fields),
                    message.tenant,
                ]
                pipe.execute_command(*args)
            if self._wait_replicas and not self.keys.cluster:
                pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
            replies = await pipe.execute(raise_on_error=False)
            if self._wait_replicas and self.keys.cluster:
                replies.append(await self._wait_cluster())
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                # Redis lost its script cache (restart, SCRIPT FLUSH): load it
                # and write again; the script's de-duplication makes it safe.
                self._enqueue_loaded = False
                continue
            break
        if self._wait_replicas:
            self._check_replicated(replies.pop())
        results = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            added, entry_id = reply
            results.append(EnqueueResult("queued" if added == 1 else "duplicate", _text(entry_id)))
        return results

    async def _wait_cluster(self) -> Any:
        # WAIT has no key, so a cluster pipeline cannot route it: it is sent to
        # every master at once (its replicas are per master) and the fewest
        # replicas any of them reached counts.
        nodes = cast(Any, self.redis).get_primaries()
        acked: list[Any] = []

        async def one(node: Any) -> None:
            try:
                acked.append(
                    await node.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
                )
            except REDIS_DOWN as exc:
                acked.append(exc)

        async with anyio.create_task_group() as tg:
            for node in nodes:
                tg.start_soon(one, node)
        counts = [a for a in acked if isinstance(a, int)]
        return min(counts) if len(counts) == len(acked) and counts else 0

    def _check_replicated(self, acked: Any) -> None:
        # The jobs are on the primary either way: failing them now would lose
        # calls Redis already holds, so a shortfall is reported, not raised.
        if isinstance(acked, int) and acked >= self._wait_replicas:
            return
        now = time.monotonic()
        if now - self._under_replicated_logged >= 10.0:
            self._under_replicated_logged = now
            logger.warning(
                "enqueued jobs reached %s of %d replicas within %d ms (WAIT): "
                "a failover now could lose them",
                acked if isinstance(acked, int) else f"? ({acked})",
                self._wait_replicas,
                self._wait_timeout_ms,
            )

    async def dead_letter(
        self,
        reason: DeadReason,
        error: str,
        *,
        original: Mapping[bytes, bytes],
        origin: str = "",
        origin_id: str = "",
        once_for: str | None = None,
    ) -> str | None:
        """Add a dead letter; returns its entry id.

        With ``once_for`` (a job id, or an entry's stream and id), a letter
        already added under that tag is not added again and ``None`` is
        returned: several dispatchers, or a retried write, leave exactly one.
        """
        fields: dict[Any, Any] = dead_letter_fields(
            reason, error, original=original, origin=origin, origin_id=origin_id
        )
        if once_for is None:
            entry_id = await self.redis.xadd(
                self.keys.dead_letter, fields, maxlen=self.dead_letter_maxlen, approximate=True
            )
            return _text(entry_id)
        flat: list[Any] = [self.dedup_ttl, self.dead_letter_maxlen]
        for key, value in fields.items():
            flat += [key, value]
        added = await self.scripts.dead_letter_once(
            keys=[self.keys.dead_letter_seen(once_for), self.keys.dead_letter], args=flat
        )
        return _text(added) if added else None

    async def add_report(self, report: CallReport, *, maxlen: int, max_age: float) -> str | None:
        """Add a call's report, once per call: ``None`` if it has one already.

        Signed like job entries when the store signs. The stream keeps about
        ``maxlen`` reports, none older than ``max_age`` seconds.
        """
        keys, args = self.report_arguments(ReportWrite(report, maxlen, max_age))
        added = await self.scripts.add_report(keys=keys, args=args)
        return _text(added) if added else None

    def report_arguments(self, write: ReportWrite) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of :data:`openrtc.store.scripts.ADD_REPORT` for ``write``."""
        report = write.report
        fields: dict[bytes, bytes] = {REPORT_FIELD: report.encode()}
        if self.signing is not None:
            fields = sign_report(self.signing, fields)
        # The marker lives as long as the job's record: a second writer can
        # only come while the job is still known (a redelivery, a peer's
        # takeover), and a marker per call for the stream's whole age would
        # cost more than the reports.
        flat: list[Any] = [
            max(1, self.dedup_ttl),
            write.maxlen,
            max(1, int(write.max_age * 1000)),
        ]
        for key, value in fields.items():
            flat += [key, value]
        return [self.keys.report_seen(report.job_id), self.keys.reports], flat

    def status_commands(self, dispatcher_id: str, event: StatusEvent) -> list[tuple[Any, ...]]:
        """The commands of one status event (XADD, the stream's expiry), to pipeline."""
        key = self.keys.status(dispatcher_id)
        flat = [part for pair in event.encode().items() for part in pair]
        return [
            ("XADD", key, "MAXLEN", "~", SIDE_STREAM_MAXLEN, "*", *flat),
            ("EXPIRE", key, self.status_ttl),
        ]

    async def pipelined(
        self, commands: Sequence[tuple[Any, ...]], scripts: Sequence[AsyncScript] = ()
    ) -> list[Any]:
        """Send ``commands`` in one round trip (no MULTI: none needs the others' atomicity).

        ``scripts``: those whose ``EVALSHA`` is among the commands. If Redis
        lost its script cache (a restart, SCRIPT FLUSH), they are loaded and
        the first refused command sent again with every one after it, so the
        order holds (the end's SUCCESS event after its acknowledgement); each
        is safe to repeat (a status event again, a report once per call).
        Raises the first error reply.
        """
        replies = await self._send(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            for script in scripts:
                await self.redis.script_load(script.script)
            first = missing[0]
            replies[first:] = await self._send(commands[first:])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def publish_status(self, dispatcher_id: str, event: StatusEvent) -> None:
        """Send a job status event to the dispatcher that holds the job's socket."""
        await self.pipelined(self.status_commands(dispatcher_id, event))

    async def read_status(
        self, dispatcher_id: str, after: bytes, *, count: int, block_ms: int, trim: bool = False
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The dispatcher's status events after ``after``, waiting up to ``block_ms``.

        ``trim``: the events up to ``after`` (relayed) are trimmed in the same
        round trip, before the read: a trim of its own cost a round trip per
        batch relayed.
        """
        key = self.keys.status(dispatcher_id)
        if trim:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xtrim(key, minid=after)
            pipe.xread({key: after}, count=count, block=block_ms)
            _, reply = await pipe.execute()
        else:
            reply = await self.redis.xread({key: after}, count=count, block=block_ms)
        return list(reply[0][1]) if reply else []

    async def publish_termination(self, agent: str, job_id: str, reason: str) -> None:
        """Tell ``agent``'s workers that LiveKit terminated ``job_id``.

        Both a control event (for the worker running it now) and a mark on the
        job record (for a worker that reclaims the job later) are written.
        """
        fields = ControlEvent(job_id, reason).encode()
        if self.signing is not None:
            fields = sign_control(self.signing, agent, fields)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(
            self.keys.control(agent),
            dict[Any, Any](fields),
            maxlen=SIDE_STREAM_MAXLEN,
            approximate=True,
        )
        record = self.keys.job(agent, job_id)
        pipe.hset(record, RecordField.TERMINATED, reason.encode())
        pipe.expire(record, self.dedup_ttl)
        await pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a lease renewal found: entries taken by another worker, entries Redis forgot."""

    lost: list[str]
    forgotten: list[str]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry handed to this worker, and how often it has been delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int
    #: The job's record, decoded, once read for this delivery (``None``: not
    #: read; a first delivery is judged without it, see :meth:`JobConsumer.start_unread`).
    record: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ReportWrite:
    """A call's report to add (once per call) as a job ends: :meth:`JobConsumer.end`."""

    report: CallReport
    maxlen: int
    max_age: float


class JobConsumer:
    """One worker's side of an agent's job stream (consumer group ``workers``)."""

    def __init__(self, store: StreamStore, agent: str, consumer: str) -> None:
        self.store = store
        self.redis = store.redis
        self.agent = agent
        self.consumer = consumer
        self.stream = store.keys.jobs(agent)
        self._scripts = store.scripts

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """New entries (never delivered before), at most ``count``.

        Without their job records: a first delivery's record is as the
        enqueue wrote it unless something happened since, which the start
        checks (:meth:`start_unread`) instead of a read of its own.
        A missing group (Redis restarted empty) is created again from ``0``.
        """
        try:
            reply: Any = await self.redis.xreadgroup(
                WORKERS_GROUP, self.consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.store.ensure_group(self.agent)
            return []
        if not reply:
            return []
        return [
            Delivery(_text(entry_id), dict(fields or {}), 1) for entry_id, fields in _entries(reply)
        ]

    async def reclaim(self, min_idle: float, count: int) -> list[Delivery]:
        """Entries whose holder stopped renewing for ``min_idle`` seconds, now ours.

        At most ``count`` (the free slots): one pass of the sweep of the
        pending list the agent's workers share (:data:`openrtc.store.scripts.RECLAIM`),
        started at most once every ``min_idle / 2``.
        """
        try:
            entries, counts = await self._scripts.reclaim(
                keys=[self.stream, self.store.keys.reclaim(self.agent)],
                args=[
                    WORKERS_GROUP,
                    self.consumer,
                    int(min_idle * 1000),
                    count,
                    max(1, int(min_idle * 1000 * RECLAIM_SWEEP)),
                    int(max(RECLAIM_STATE_TTL, min_idle * 10) * 1000),
                ],
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.store.ensure_group(self.agent)
            return []
        result = []
        for (entry_id, flat), deliveries in zip(entries, counts, strict=True):
            if flat is None:  # trimmed while pending; nothing to serve
                await self.ack(_text(entry_id))
                continue
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            result.append(Delivery(_text(entry_id), fields, int(deliveries)))
        return result

    async def held_by_consumer(self) -> dict[str, int]:
        """Entries each consumer of the group holds now (``XPENDING`` summary).

        Exact at every moment (Redis keeps it with each read, claim and ack),
        where heartbeats are a second old: what spreading a burst needs.
        """
        try:
            summary: Any = await self.redis.xpending(self.stream, WORKERS_GROUP)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return {}
        return {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}

    async def oldest_unread_ms(self) -> int | None:
        """Redis time (ms) the oldest entry no worker has read was added; None if none."""
        try:
            groups: Any = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return None
        last = next(
            (
                g.get("last-delivered-id")
                for g in groups
                if _text(g.get("name", b"")) == WORKERS_GROUP
            ),
            None,
        )
        if last is None:
            return None
        entries: Any = await self.redis.xrange(self.stream, f"({_text(last)}", "+", count=1)
        if not entries:
            return None
        return int(_text(entries[0][0]).split("-")[0])

    async def reclaim_crashed(self, grace: float, count: int, scan: float) -> list[Delivery]:
        """Entries of watched workers whose process is gone, now ours, at once.

        At most ``count``. A worker counts as gone once its liveness channel
        (:meth:`watch`) has had no subscriber for ``grace`` seconds; the
        agent's workers share one look at every watched worker per ``scan``
        seconds (:data:`openrtc.store.scripts.CRASHED`). Frozen or partitioned
        workers keep their subscription: they are left to :meth:`reclaim`.
        """
        keys = self.store.keys
        try:
            entries, counts = await self._scripts.crashed(
                keys=[self.stream, keys.alive(self.agent)],
                args=[
                    WORKERS_GROUP,
                    self.consumer,
                    keys.alive_channel(self.agent, ""),
                    int(grace * 1000),
                    count,
                    max(1, int(scan * 1000)),
                    int(RECLAIM_STATE_TTL * 1000),
                ],
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.store.ensure_group(self.agent)
            return []
        result = []
        for (entry_id, flat), deliveries in zip(entries, counts, strict=True):
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            result.append(Delivery(_text(entry_id), fields, int(deliveries)))
        return result

    @property
    def alive_channel(self) -> str:
        """The shard channel this worker stays subscribed to while it lives."""
        return self.store.keys.alive_channel(self.agent, self.consumer)

    async def watch(self) -> None:
        """Ask peers to watch this worker for a crash (once subscribed to :attr:`alive_channel`)."""
        key = self.store.keys.alive(self.agent)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, self.consumer, "0")
        pipe.pexpire(key, int(RECLAIM_STATE_TTL * 1000))
        await pipe.execute()

    async def unwatch(self) -> None:
        """Stop being watched (a clean exit, nothing left pending)."""
        await self.redis.hdel(
            self.store.keys.alive(self.agent), self.consumer, f"@free:{self.consumer}"
        )

    async def redeliver(self, entry_id: str) -> Delivery | None:
        """Deliver an entry this worker holds to it again (counted); ``None`` if not ours."""
        reply = await self._scripts.redeliver(
            keys=[self.stream], args=[WORKERS_GROUP, self.consumer, entry_id]
        )
        if not reply:
            return None
        (new_id, flat), deliveries = reply
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return Delivery(_text(new_id), fields, int(deliveries))

    async def renew(
        self,
        held: Mapping[str, str],
        healthy: Mapping[str, int] | None = None,
        *,
        deliveries: Mapping[str, int] | None = None,
    ) -> Renewal:
        """Extend the lease on the entries in ``held`` (entry id -> job id).

        ``healthy``: entry id -> the mark (``RecordField.HEALTHY``, its
        delivery count) its record gets, if the entry is still ours: a session
        that lived a lease. ``deliveries``: entry id -> the delivery count this
        worker claimed it with (a pending entry that names another holder with
        fewer is from before that claim: Redis lost it). Says which entries
        another worker took (step aside) and which Redis forgot (write them
        back with :meth:`write_back`).
        """
        if not held:
            return Renewal([], [])
        ids = list(held)
        marks, counts = healthy or {}, deliveries or {}
        records = [self.store.keys.job(self.agent, held[i]) for i in ids]
        pairs: list[Any] = []
        for entry_id in ids:
            mark = marks.get(entry_id)
            pairs += [entry_id, "" if mark is None else mark, counts.get(entry_id, 0)]
        lost, forgotten = await self._scripts.renew(
            keys=[self.stream, *records],
            args=[WORKERS_GROUP, self.consumer, self.store.dedup_ttl, *pairs],
        )
        return Renewal([_text(x) for x in lost], [_text(x) for x in forgotten])

    async def write_back(
        self, job_id: str, fields: Mapping[bytes, bytes], *, forgotten: str = ""
    ) -> str:
        """Re-create a running call's entry (pending on this consumer) and record.

        For a call Redis forgot: without it a later crash of this worker would
        leave the call with nobody to take it over. ``forgotten``: the entry id
        Redis forgot this worker held; deleted if Redis still has it (restored
        unread, or read by a peer that has not started it), so the job keeps
        one entry. Returns the new entry id.
        """
        flat: list[bytes] = []
        for key, value in fields.items():
            flat.append(key)
            flat.append(value)
        entry_id = await self._scripts.write_back(
            keys=[self.stream, self.store.keys.job(self.agent, job_id)],
            args=[WORKERS_GROUP, self.consumer, self.store.dedup_ttl, forgotten, *flat],
        )
        return _text(entry_id)

    async def start(
        self,
        entry_id: str,
        job_id: str,
        fields: Mapping[str, str | int | float] | None = None,
        *,
        status: tuple[str, StatusEvent] | None = None,
    ) -> bool:
        """Mark the job running here, if its entry is still pending on this consumer.

        The last step before joining: ``False`` means another worker has the
        call (a live worker wrote back the entry this one read as new).
        ``fields``: more of the record's (:class:`~openrtc.wire.messages.RecordField`).
        ``status``: (dispatcher id, event) sent in the same round trip (the
        RUNNING event; the status stream is the dispatcher's slot, not the
        agent's, so it is pipelined beside the script, not inside it). It is
        sent whatever the mark's answer: when the entry is not ours, another
        worker runs the call, and its dispatcher drops a second RUNNING.
        """
        return bool(await self._start(entry_id, job_id, fields, status, fresh=False))

    async def start_unread(
        self,
        entry_id: str,
        job_id: str,
        fields: Mapping[str, str | int | float] | None = None,
        *,
        status: tuple[str, StatusEvent] | None = None,
    ) -> bool | None:
        """:meth:`start` for an entry judged without its record (``Delivery.record`` ``None``).

        ``None``: not marked, the record is not as the enqueue wrote it (the
        call ran, was terminated, its room made anew): read it and judge the
        entry again. See :data:`openrtc.store.scripts.START`.
        """
        marked = await self._start(entry_id, job_id, fields, status, fresh=True)
        return None if marked == 2 else bool(marked)

    async def _start(
        self,
        entry_id: str,
        job_id: str,
        fields: Mapping[str, str | int | float] | None,
        status: tuple[str, StatusEvent] | None,
        *,
        fresh: bool,
    ) -> int:
        flat: list[Any] = [part for pair in (fields or {}).items() for part in pair]
        keys = [self.stream, self.store.keys.job(self.agent, job_id)]
        args = [
            WORKERS_GROUP,
            self.consumer,
            entry_id,
            self.store.dedup_ttl,
            "1" if fresh else "",
            *flat,
        ]
        script = self._scripts.start
        if status is None:
            return int(await script(keys=keys, args=args))
        replies = await self.store.pipelined(
            [_evalsha(script, keys, args), *self.store.status_commands(*status)], [script]
        )
        return int(replies[0])

    async def end(
        self,
        entry_id: str,
        job_id: str,
        *,
        checkpoint: bool = False,
        status: tuple[str, StatusEvent] | None = None,
        report: ReportWrite | None = None,
        ended: tuple[str, str] | None = None,
    ) -> str | None:
        """The job is done with, in one round trip: what ended it, then :data:`FINISH`.

        In this order, each safe to send again: the call's ``report`` (once
        per call), the ``ended`` mark (room, sid: the agent ended the call, the
        reconciler leaves the room alone), then the entry acknowledged and
        deleted, the record marked done, the ``checkpoint`` deleted if asked,
        and the ``status`` event (dispatcher id, event). The report and the
        mark come before the acknowledgement: a crash between leaves the call
        to a peer, never a call without its report. On one Redis a pipeline
        keeps that order; under Redis Cluster their keys are other slots, on
        other nodes, so they are a round trip before the rest.

        Returns the report's entry id when this write added it (``None``: no
        report, or the call had one already).
        """
        store = self.store
        first: list[tuple[Any, ...]] = []
        if report is not None:
            keys, args = store.report_arguments(report)
            first.append(_evalsha(self._scripts.add_report, keys, args))
        if ended is not None:
            room, sid = ended
            first.append(("SET", store.keys.ended(room), sid, "EX", ENDED_TTL))
        finish = self._scripts.finish
        rest: list[tuple[Any, ...]] = [
            _evalsha(
                finish,
                [
                    self.stream,
                    store.keys.job(self.agent, job_id),
                    store.keys.checkpoint(self.agent, job_id),
                ],
                [WORKERS_GROUP, entry_id, store.dedup_ttl, "1" if checkpoint else ""],
            )
        ]
        if status is not None:
            rest += store.status_commands(*status)
        scripts = [finish, self._scripts.add_report]
        if first and store.keys.cluster:
            replies = await store.pipelined(first, scripts)
            await store.pipelined(rest, scripts)
        else:
            replies = await store.pipelined([*first, *rest], scripts)
        if report is None or not replies[0]:
            return None
        return _text(replies[0])

    async def released(
        self, entry_id: str, job_id: str
    ) -> Literal["present", "moved", "forgotten"]:
        """Where an entry released for a handover is now.

        See :data:`openrtc.store.scripts.RELEASED`.
        """
        where = await self._scripts.released(
            keys=[self.stream, self.store.keys.job(self.agent, job_id)],
            args=[WORKERS_GROUP, self.consumer, entry_id],
        )
        return cast(Literal["present", "moved", "forgotten"], _text(where))

    async def release(self, entry_id: str, job_id: str, *, handover: bool = False) -> str | None:
        """Give an entry this worker holds back as a waiting one; ``None`` if not ours.

        ``handover``: its call still runs here, and the worker that reads the
        new entry takes it over from its checkpoint (``JobMessage.handover_from``).
        """
        extra = [HANDOVER_FIELD, self.consumer] if handover else []
        new_id = await self._scripts.release(
            keys=[self.stream, self.store.keys.job(self.agent, job_id)],
            args=[WORKERS_GROUP, self.consumer, entry_id, *extra],
        )
        return _text(new_id) if new_id else None

    async def ack(self, entry_id: str) -> None:
        """Acknowledge and delete an entry: the job is finished with."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, WORKERS_GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        await pipe.execute()

    async def dead_letter(self, delivery: Delivery, reason: DeadReason, error: str) -> str | None:
        """Move an entry to the dead letters (then acknowledge it): never blocks the stream.

        Safe to retry as a whole: the letter is added once per entry, however
        often the acknowledgement after it has to be tried again.
        """
        entry = await self.store.dead_letter(
            reason,
            error,
            original=delivery.fields,
            origin=self.stream,
            origin_id=delivery.entry_id,
            once_for=f"{self.stream}/{delivery.entry_id}",
        )
        await self.ack(delivery.entry_id)
        return entry

    async def forget_consumers(self, idle: float) -> list[str]:
        """Remove consumers of workers that are gone: nothing pending, idle ``idle`` s.

        A living worker reads every second, so it is never that idle; one
        whose calls are still pending is kept until peers reclaim them.
        """
        removed = await self._scripts.forget_consumers(
            keys=[self.stream], args=[WORKERS_GROUP, int(idle * 1000), self.consumer]
        )
        return [_text(name) for name in removed]

    async def leave_group(self) -> bool:
        """Remove this worker's own consumer, if it holds nothing (a clean exit)."""
        return bool(
            await self._scripts.leave_group(keys=[self.stream], args=[WORKERS_GROUP, self.consumer])
        )

    async def job_record(self, job_id: str) -> dict[str, str]:
        """The job's record hash (state, worker, terminated, last error...); never garbage.

        Decoded by :func:`~openrtc.wire.messages.decode_job_record`: a value that is
        not UTF-8 is replaced, not raised on (it stopped the worker).
        """
        raw = await self.redis.hgetall(self.store.keys.job(self.agent, job_id))
        return decode_job_record(raw)

    async def update_record(self, job_id: str, fields: Mapping[str, str | int | float]) -> None:
        """Update the job's record (:class:`RecordField`), keeping its expiry."""
        key = self.store.keys.job(self.agent, job_id)
        pipe = self.redis.pipeline(transaction=False)
        mapping: dict[Any, Any] = dict(fields)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, self.store.dedup_ttl)
        await pipe.execute()


def _evalsha(script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
    """An EVALSHA command to pipeline (redis-py's Script in a pipeline would add a
    SCRIPT EXISTS round trip): :meth:`StreamStore.pipelined` loads it if Redis lost it."""
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    # XREADGROUP's RESP2 reply: [[stream, [(id, fields), ...]], ...]
    return [entry for _, entries in reply for entry in entries]


def _group_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _group_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True, slots=True)
class GroupRow:
    """A job stream's workers group, as ``XINFO GROUPS`` reports it."""

    pending: int
    consumers: int
    #: Entries no worker has read yet.
    backlog: int
    last_delivered: str


def workers_group(groups: Any, length: int) -> GroupRow | None:
    """The workers group among an ``XINFO GROUPS`` reply, ``None`` when there is none yet."""
    for group in groups:
        if _group_text(group.get("name")) != WORKERS_GROUP:
            continue
        pending = _group_int(group.get("pending"))
        lag = group.get("lag")
        # Redis reports no lag when deletions make it unknowable; workers
        # delete acknowledged entries, so what is left in the stream is
        # exactly the backlog plus the pending.
        backlog = _group_int(lag) if lag is not None else max(0, length - pending)
        last = _group_text(group.get("last-delivered-id")) or "0-0"
        return GroupRow(pending, _group_int(group.get("consumers")), backlog, last)
    return None

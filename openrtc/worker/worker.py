"""The worker runtime: consume one agent's stream and run its sessions in their rooms.

One readable set of loops under one task group (``openrtc worker --agent dental``):

- **consume**: read new entries while there are free slots; reclaim entries
  whose holder stopped renewing (a worker that froze or died); each is checked (its
  room still there?) concurrently with the others and becomes a session, or a
  dead letter (``malformed``, ``expired``, ``max-deliveries``).
- **lease**: renew the claim on every entry this worker holds, from the read
  that delivered it until it is acknowledged or released, every ``lease / 3``.
  An entry another worker now owns means that worker took the call over, so
  the local session steps aside; an entry Redis forgot (a restart without
  persistence) is written back, and the call goes on.
- **crashes**: a worker holds a liveness subscription while its process
  lives; peers take the calls of one whose subscription closed (a killed
  process) over at once, within about a second, not a lease.
- **control**: LiveKit's terminations, relayed by the dispatcher, end sessions.
- **heartbeat**: capacity and running sessions, for the dispatcher's
  backpressure and ``openrtc status``.

Delivery is at least once and never twice at a time: a running job's entry
stays pending until its session ends, so a killed worker's calls are taken
over by its peers within about a second (a frozen one's within a lease); a
living worker's calls never are. In ``process`` isolation a session whose
child process died is started again by its own worker at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup, TaskStatus
from livekit import api

from openrtc.agents.registry import AgentPool
from openrtc.errors import ConfigError
from openrtc.ops import tracing
from openrtc.ops.http import OpsServer, ops_server, serving
from openrtc.ops.logs import log_context
from openrtc.ops.metrics import WorkerMetrics
from openrtc.session.runners import CoroutineRunner, ProcessRunner, SessionRunner
from openrtc.session.session import (
    AGENT_NOT_BUILT,
    HANDOVER_TURN_WAIT,
    SessionControl,
    SessionOutcome,
)
from openrtc.settings import WorkerSettings, redact_url
from openrtc.store.checkpoint import CheckpointStore, CheckpointWriter
from openrtc.store.membership import Presence, hold_liveness, live_members, redis_time
from openrtc.store.redis_access import check_redis_access
from openrtc.store.redis_health import check_durability
from openrtc.store.streams import (
    REDIS_DOWN,
    Delivery,
    JobConsumer,
    RedisClient,
    RefusedCommand,
    StreamStore,
    connect_redis,
    service_keys,
)
from openrtc.supervision import StateLog, backoff_delay, describe
from openrtc.wire.keys import ENDED_TTL
from openrtc.wire.messages import (
    ID_MAX,
    ControlEvent,
    DeadReason,
    ForgedEntry,
    JobMessage,
    JobStatus,
    MalformedEntry,
    RecordField,
    RecordState,
    StatusEvent,
    peek_job_header,
)
from openrtc.wire.signing import log_signing, verify_control, verify_job
from openrtc.worker.acceptance import Action, Start, Verdict, judge, start_kind
from openrtc.worker.spread import DEFER_STEP, MAX_DEFER, CpuLoad, PeerLoad, decide

__all__ = ["Worker", "WorkerStats"]

logger = logging.getLogger("openrtc.worker")

#: How long a blocking read waits before the loop looks at its state again.
READ_BLOCK_MS: Final = 1000
#: How often entries of dead workers are looked for.
RECLAIM_INTERVAL: Final = 1.0
#: How often each worker asks whether a watched peer crashed; every watched
#: worker is looked at about this often, shared by the agent's workers.
CRASH_CHECK_INTERVAL: Final = 0.15
#: A session whose process died this way is started again by its own worker.
PROCESS_DIED: Final = "session process died"
#: Room checks (LiveKit API calls) one worker runs at once.
ROOM_CHECKS: Final = 8
#: Longest wait for one room check; past it the room is assumed to be there.
ROOM_CHECK_TIMEOUT: Final = 3.0
#: Beyond the session's own wait for a turn boundary: its answer's way back.
HANDOVER_SLACK: Final = 2.0
#: While draining, how often to look again for peers with room for our calls.
HANDOVER_RECHECK: Final = 2.0
#: Calls handed over at once, each until its peer has joined (or
#: HANDOVER_JOIN_WAIT): a peer starting many sessions at once starts each
#: later, and the caller hears the gap.
HANDOVER_CONCURRENCY: Final = 2
HANDOVER_JOIN_WAIT: Final = 5.0
#: A room check's answer: live, with the job's own agent in it already.
OURS_IN_ROOM: Final = "ours"


@dataclass(slots=True)
class WorkerStats:
    """Counters since start (tests); operators read them on ``/metrics`` (openrtc.ops.metrics)."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    taken_over: int = 0
    reclaimed: int = 0
    handed_over: int = 0
    dead_lettered: int = 0


@dataclass(slots=True)
class _Claim:
    """An entry this worker holds: leased from its read until acknowledged or released."""

    delivery: Delivery
    message: JobMessage | None = None
    #: Set once its session starts.
    control: SessionControl | None = None
    joined_at: float = 0.0
    reclaimed: bool = False
    #: Another worker owns the entry now: never start it, step aside if running.
    lost: bool = False
    #: Being acknowledged, dead-lettered or released: no more renewals.
    settled: bool = False
    #: Its running call was handed to a peer (a drain): no more checkpoints,
    #: they would overwrite the successor's.
    handed_over: bool = False
    #: The entry it was released as, for a peer (a handover): watched until
    #: the peer has joined; written back as ours if Redis loses it first.
    released: str = ""
    #: A handover of its call is under way (the drain asked for one).
    asked: bool = False
    #: How its session starts (openrtc.worker.acceptance.start_kind).
    start: Start = Start.FRESH
    #: Set with ``lost`` by the lease (a contested start waits for it).
    lost_event: anyio.Event = field(default_factory=anyio.Event)
    #: The session's checkpoint writer, when it keeps checkpoints.
    writer: CheckpointWriter | None = None
    #: Set when the worker forgets it (its session, if any, is over).
    dropped: anyio.Event = field(default_factory=anyio.Event)
    #: Tracing on only: when it was read (ns), and the claim span.
    read_ns: int = 0
    span: Any = None

    @property
    def entry_id(self) -> str:
        return self.delivery.entry_id

    @property
    def renewable(self) -> bool:
        # A session stopping for a takeover (lease lost, drain timeout) is left
        # to lapse; one ending for good (terminated) stays ours until it is
        # acknowledged, however long its agent takes to hang up.
        stepping_aside = self.control is not None and self.control.takeover
        return not (self.settled or self.lost or stepping_aside)


@dataclass(slots=True)
class _Gate:
    """Free session slots; readers wait here when the worker is full."""

    free: int
    changed: anyio.Event = field(default_factory=anyio.Event)

    def take(self) -> None:
        self.free -= 1

    def give(self) -> None:
        self.free += 1
        self.changed.set()
        self.changed = anyio.Event()


class Worker:
    """Serves one agent's job stream.

    Args:
        settings: connection, capacity and lease settings.
        pool: the agents directory's registry; ``settings.agent`` must be in it.
        runner: how sessions run (default: by ``settings.isolation``).
        redis: an existing client (tests); by default one is made and closed.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        pool: AgentPool,
        *,
        runner: SessionRunner | None = None,
        redis: RedisClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.agent not in pool:
            known = ", ".join(pool.list_agents()) or "none"
            raise ConfigError(
                f"Agent '{settings.agent}' is not registered in the agents directory "
                f"(registered: {known})."
            )
        self.settings = settings
        self.config = pool.get(settings.agent)
        # Built once now: an agent whose constructor raises fails the worker
        # at start-up (AgentBuildError, one line), never each call in its room.
        self.config.build()
        self.keys = service_keys(
            settings.namespace, settings.redis_url, cluster_keys=settings.cluster_keys
        )
        self.stats = WorkerStats()
        self.metrics = WorkerMetrics(settings.agent)
        self._clock = clock
        self._own_redis = redis is None
        self._redis = redis or connect_redis(
            settings.redis_url, client_name=f"openrtc:{settings.worker_id}"
        )
        self.store = StreamStore(
            self._redis,
            self.keys,
            dedup_ttl=settings.dedup_ttl,
            dead_letter_maxlen=settings.dead_letter_maxlen,
            status_ttl=settings.status_ttl,
            signing=settings.signing,
        )
        self.consumer = JobConsumer(self.store, settings.agent, settings.worker_id)
        self.checkpoints = CheckpointStore(
            self._redis, self.keys, settings.agent, settings.dedup_ttl, signing=settings.signing
        )
        self._presence = Presence(
            self._redis,
            self.keys.workers(settings.agent),
            self.keys.worker(settings.worker_id),
            settings.worker_id,
            settings.membership_ttl,
        )
        if runner is None:
            if settings.isolation == "process":
                runner = ProcessRunner(self.config, settings)
            else:
                runner = CoroutineRunner(self.config, settings)
        self.runner = runner
        self._gate = _Gate(settings.concurrency)
        # Every entry held, by entry id: being checked, or running a session.
        self._claims: dict[str, _Claim] = {}
        self._room_checks = anyio.CapacityLimiter(ROOM_CHECKS)
        self._lkapi: api.LiveKitAPI | None = None
        self._draining = False
        self._stop = anyio.Event()
        self._ready = anyio.Event()
        self._startup: anyio.CancelScope | None = None
        self._redis_state = StateLog("Redis", logger)
        # After Redis comes back from an outage every holder's entries look
        # idle for the outage's length: no reclaiming until they had a lease
        # to renew them.
        self._reclaim_after = 0.0
        #: Redis's clock minus this host's, measured with each heartbeat.
        self._redis_clock_offset = 0.0
        self._tg: TaskGroup | None = None
        # Spreading calls by load (openrtc.worker.spread): the agent's other live
        # workers, worker id -> (capacity, above its CPU threshold), refreshed
        # with each heartbeat; their held calls are read before each read.
        self._peers: dict[str, tuple[int, bool]] = {}
        self._defer_since: float | None = None
        self._defer_progress = 0
        self._cpu = CpuLoad() if settings.load_threshold is not None else None
        self._cpu_load = 0.0
        self._overloaded = False
        #: The /healthz, /readyz and /metrics server; ``None`` when off.
        self.http: OpsServer | None = ops_server(
            settings, self.metrics, readiness=self.readiness, refresh=self._refresh_metrics
        )

    # -- lifecycle -----------------------------------------------------------

    @property
    def ready(self) -> anyio.Event:
        """Set once the worker consumes its stream."""
        return self._ready

    @property
    def running(self) -> list[JobMessage]:
        """The jobs whose sessions run now."""
        return [c.message for c in self._claims.values() if c.control and c.message]

    @property
    def running_jobs(self) -> list[str]:
        """Job ids of the sessions running now."""
        return [m.job_id for m in self.running]

    def request_stop(self) -> None:
        """Drain: stop taking jobs, let running calls finish up to ``drain_timeout``.

        Honoured in every state: a worker still waiting for Redis at start-up
        stops at once.
        """
        self._stop.set()
        if self._startup is not None:
            self._startup.cancel()

    def readiness(self) -> str | None:
        """``None`` when taking jobs, else why not (one line, for ``/readyz``)."""
        if self._draining or self._stop.is_set():
            return "draining: taking no new jobs"
        unreachable = self._redis_state.state == "unreachable"
        redis = f"Redis unreachable: {self._redis_state.detail}" if unreachable else ""
        if not self._ready.is_set():
            return f"starting: {redis or 'joining the consumer group'}"
        return redis or None

    async def _refresh_metrics(self) -> None:
        """Set the gauges read at scrape time (no I/O)."""
        m, agent = self.metrics, self.settings.agent
        m.sessions_running.labels(agent).set(len(self.running))
        capacity = 0 if self._draining else self.settings.concurrency
        m.session_capacity.labels(agent).set(capacity)
        m.redis_connected.set(self._redis_state.state == "connected")
        m.draining.set(self._draining or self._stop.is_set())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_stop` and the drain are done (or cancellation)."""
        # Every line of this worker (its tasks inherit it) names it.
        with log_context(worker_id=self.settings.worker_id):
            async with serving(self.http):
                await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        s = self.settings
        logger.info(
            "worker %s for agent '%s' starting: %s isolation, %d slots, lease %.1fs, "
            "Redis %s, namespace %r",
            s.worker_id,
            s.agent,
            s.isolation,
            s.concurrency,
            s.lease,
            redact_url(s.redis_url),
            s.namespace,
        )
        log_signing(logger, s.signing)
        try:
            with anyio.CancelScope() as self._startup:
                if self._stop.is_set():
                    self._startup.cancel()
                await check_redis_access(self._redis, s.redis_url, logger)
                await self.runner.prepare()
                await self._until_redis(self.store.ensure_group, s.agent)
                await check_durability(self._redis, logger)
                await self._until_redis(self._beat)
                await self._until_redis(self._refresh_peers)
                await self._until_redis(self._measure_redis_clock)
            self._startup = None
            if self._stop.is_set():
                logger.info("stop requested while starting; nothing to drain")
                return
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.runner.maintain)
                if s.crash_detection:
                    # Subscribed (and watched) before the first read: no entry
                    # is ever held by a worker whose crash would go unseen.
                    await tg.start(
                        hold_liveness, self._redis, self.consumer.alive_channel, self.consumer.watch
                    )
                    tg.start_soon(self._crash_loop)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._lease_loop)
                tg.start_soon(self._control_loop)
                tg.start_soon(self._consume_loop)
                self._ready.set()
                task_status.started()
                await self._stop.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                with contextlib.suppress(*REDIS_DOWN):
                    # Nothing left pending on it: its consumer need not outlive
                    # it, nor be watched. (Calls left by a drain timeout stay
                    # watched: peers take them once the subscription is gone.)
                    if await self.consumer.leave_group() and s.crash_detection:
                        await self.consumer.unwatch()
                with contextlib.suppress(*REDIS_DOWN):
                    await self._presence.leave()
                await self.runner.aclose()
                if self._lkapi is not None:
                    await self._lkapi.aclose()
                if self._own_redis:
                    await self._redis.aclose()
            logger.info("worker %s stopped", s.worker_id)

    async def _drain(self) -> None:
        self._draining = True
        logger.info(
            "draining: no new jobs; %d running session(s) %smay go on for up to %.0fs",
            len(self.running),
            "go to peers as they have free slots, or " if self.settings.handover else "",
            self.settings.drain_timeout,
        )
        # Entries still being checked are released by their check (never
        # started while draining); running sessions may finish, or leave once
        # the peer they were handed to has joined in their place.
        with anyio.move_on_after(self.settings.drain_timeout):
            async with anyio.create_task_group() as tg:
                if self.settings.handover:
                    tg.start_soon(self._hand_over_to_peers, tg)
                while self._claims:
                    await self._gate.changed.wait()
                tg.cancel_scope.cancel()
        if self._claims:
            # Not acknowledged: their entries stay pending, and another worker
            # takes the calls over once the lease lapses.
            logger.warning("drain timeout: leaving %d call(s) to other workers", len(self._claims))
            for claim in self._claims.values():
                if claim.control is not None:
                    claim.control.stop("worker drain timeout", takeover=True)

    async def _hand_over_to_peers(self, tg: TaskGroup) -> None:
        """While draining: hand running calls to peers as they have free slots.

        Looked at again every :data:`HANDOVER_RECHECK` seconds: a peer that
        starts after the SIGTERM (a rollout without surge) still takes the
        calls, and one that is full now may have room later.
        """
        limiter = anyio.CapacityLimiter(HANDOVER_CONCURRENCY)
        while True:
            waiting = [
                c
                for c in self._claims.values()
                if c.control is not None
                and c.message is not None
                and not c.asked
                and not (c.settled or c.lost or c.control.stopping)
            ]
            if waiting:
                # Calls being handed over, or handed over with the peer not
                # joined yet, hold a slot there already (their entries unread).
                in_flight = sum(1 for c in self._claims.values() if c.asked)
                free = max(0, await self._peer_slots() - in_flight)
                if free:
                    logger.info(
                        "handing %d of %d running call(s) to peers (%d free slots)",
                        min(free, len(waiting)),
                        len(waiting),
                        free,
                    )
                for claim in waiting[:free]:
                    claim.asked = True
                    tg.start_soon(self._hand_over, claim, limiter)
            await anyio.sleep(HANDOVER_RECHECK)

    async def _peer_slots(self) -> int:
        """Free session slots of the agent's other live workers (0 if Redis does not answer).

        Beats first: peers see this worker draining (capacity 0) and do not
        count it, as it no longer counts them once they drain.
        """
        try:
            with anyio.fail_after(self.settings.lease / 3):
                await self._beat()
                await self._refresh_peers()
                held = await self.consumer.held_by_consumer() if self._peers else {}
        except (*REDIS_DOWN, TimeoutError) as exc:
            logger.warning("draining: cannot see peers (%s); running calls stay here", exc)
            return 0
        return sum(
            max(0, capacity - held.get(worker_id, 0))
            for worker_id, (capacity, overloaded) in self._peers.items()
            if not overloaded
        )

    async def _hand_over(self, claim: _Claim, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            if not await self._hand_over_one(claim):
                return
            # Paced: the next call goes once this one's peer is in.
            with anyio.move_on_after(HANDOVER_JOIN_WAIT):
                await claim.dropped.wait()
        await self._watch_released(claim)

    async def _watch_released(self, claim: _Claim) -> None:
        """Until the peer has joined (our session ends): is the released entry still there?

        Redis can lose it before a peer reads it (a restart without
        persistence, a failover right after the release): then nobody owns
        the call. It is written back as ours, and handed over again later.
        """
        message = claim.message
        assert message is not None
        while not claim.dropped.is_set():
            with anyio.move_on_after(self.settings.lease / 3):
                await claim.dropped.wait()
            if claim.dropped.is_set() or not claim.released:
                return
            try:
                with anyio.fail_after(self.settings.lease / 3):
                    where = await self.consumer.released(claim.released, message.job_id)
            except (*REDIS_DOWN, TimeoutError) as exc:
                logger.warning("job %s: handed-over entry not checked (%s)", message.job_id, exc)
                continue
            if where == "moved":
                return  # a peer has it; it joins, or the lease brings it back
            if where == "forgotten" and not claim.dropped.is_set():
                await self._take_back(claim)
                return

    async def _take_back(self, claim: _Claim) -> None:
        """Redis lost the entry of a call this worker handed over: the call is ours again."""
        message = claim.message
        assert message is not None
        released, old = claim.released, claim.entry_id
        try:
            with anyio.fail_after(self.settings.lease / 3):
                new = await self.consumer.write_back(
                    message.job_id, claim.delivery.fields, forgotten=released
                )
        except (*REDIS_DOWN, TimeoutError) as exc:
            logger.warning("job %s: not taken back yet (%s)", message.job_id, exc)
            return
        if self._claims.get(old) is claim:
            del self._claims[old]
            self._claims[new] = claim
        claim.delivery = dataclasses.replace(claim.delivery, entry_id=new)
        claim.released = ""
        claim.settled = claim.handed_over = claim.asked = False
        logger.warning(
            "job %s: Redis lost the handed-over entry %s before a peer took the call; "
            "written back as ours (%s), handed over again when a peer has room",
            message.job_id,
            released,
            new,
        )

    async def _hand_over_one(self, claim: _Claim) -> bool:
        """Hand a running call to a peer: at a turn boundary, with its last checkpoint.

        True when its entry went back to the stream for a peer.

        The entry goes back to the stream marked as a handover; the peer that
        reads it joins with the job's identity and the restored conversation,
        which removes this session's participant (it ends as taken over). Any
        failure leaves the entry unrenewed, so a peer takes the call over after
        the lease instead: never two entries, never a lost call.
        """
        message, control = claim.message, claim.control
        if message is None or control is None:
            return False
        control.ask_handover()
        with anyio.move_on_after(HANDOVER_TURN_WAIT + HANDOVER_SLACK):
            await control.handover_ready.wait()
        if claim.writer is not None:
            with anyio.move_on_after(self.settings.lease / 3):
                await claim.writer.flush()
        if claim.settled or claim.lost or control.stopping:
            return False  # it ended, or went to another worker, meanwhile
        claim.settled = claim.handed_over = True
        try:
            with anyio.fail_after(self.settings.lease / 3):
                new_id = await self.consumer.release(claim.entry_id, message.job_id, handover=True)
        except (*REDIS_DOWN, TimeoutError) as exc:
            logger.warning(
                "job %s: not handed over (%s); a peer takes it over after the lease",
                message.job_id,
                exc,
            )
            return False
        if new_id is None:
            logger.warning("job %s: not handed over: the entry is not ours", message.job_id)
            return False
        claim.released = new_id
        self.stats.handed_over += 1
        self.metrics.handed_over.inc()
        logger.info(
            "job %s: handed over at a turn boundary (entry %s -> %s); leaving when a peer joins",
            message.job_id,
            claim.entry_id,
            new_id,
        )
        return True

    async def _until_redis(self, func: Callable[..., Any], *args: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await func(*args)
            except REDIS_DOWN as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(backoff_delay(attempt, 0.1, 2.0))
                attempt += 1

    # -- consuming -----------------------------------------------------------

    async def _consume_loop(self) -> None:
        last_reclaim = 0.0
        last_forget = time.monotonic()
        outage = False
        while not self._is_draining():
            if self._gate.free <= 0:
                with anyio.move_on_after(RECLAIM_INTERVAL):
                    await self._gate.changed.wait()
                continue
            try:
                deliveries: list[Delivery] = []
                now = time.monotonic()
                if now - last_reclaim >= RECLAIM_INTERVAL and now >= self._reclaim_after:
                    last_reclaim = now
                    wanted = self._gate.free
                    deliveries = await self.consumer.reclaim(self.settings.lease, wanted)
                    if len(deliveries) >= wanted:
                        # Every free slot filled: more dead calls may wait
                        # behind these, so the next pass runs as soon as a
                        # slot frees, not a reclaim interval later.
                        last_reclaim = 0.0
                deferred = False
                if not deliveries:
                    count = await self._read_count()
                    deferred = count == 0
                    if count:
                        block = int(min(READ_BLOCK_MS, RECLAIM_INTERVAL * 1000))
                        deliveries = await self.consumer.read(count, block)
                if now - last_forget >= self.settings.forget_consumers_after / 2:
                    last_forget = now
                    gone = await self.consumer.forget_consumers(
                        self.settings.forget_consumers_after
                    )
                    if gone:
                        logger.info("removed consumers of workers that are gone: %s", gone)
                if outage:
                    outage = False
                    self._reclaim_after = time.monotonic() + self.settings.lease
                self._redis_state.set("connected", redact_url(self.settings.redis_url))
            except REDIS_DOWN as exc:
                outage = True
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(0.5)
                continue
            if deferred:
                # A less loaded peer reads the next entry; look again soon,
                # or at once when a call of ours ends.
                with anyio.move_on_after(DEFER_STEP):
                    await self._gate.changed.wait()
                continue
            self._take(deliveries)

    def _take(self, deliveries: list[Delivery]) -> None:
        """Hold each delivered entry and check it (concurrently) into a session."""
        for delivery in deliveries:
            held = self._claims.get(delivery.entry_id)
            if held is not None:
                # Our own entry, reclaimed because a renewal was late: the
                # reclaim just renewed it. Never a second session for one job.
                if delivery.deliveries == 1 and held.control is not None:
                    # Read again as new: Redis lost our read (restored from a
                    # snapshot); the job's record names us again.
                    assert self._tg is not None
                    self._tg.start_soon(self._mark_started, held)
                continue
            if delivery.deliveries > 1:
                self.stats.reclaimed += 1
                self.metrics.reclaimed.inc()
            # Held (and leased) from this moment: its check may be slow.
            claim = _Claim(delivery)
            if tracing.enabled:
                claim.read_ns = time.time_ns()
            self._claims[delivery.entry_id] = claim
            self._gate.take()
            assert self._tg is not None
            self._tg.start_soon(self._accept, claim)

    async def _crash_loop(self) -> None:
        """Take over the calls of peers whose process is gone, without waiting for a lease."""
        grace = min(self.settings.crash_grace, self.settings.lease / 2)
        refused = False
        while True:
            await anyio.sleep(CRASH_CHECK_INTERVAL)
            if time.monotonic() < self._reclaim_after:
                continue
            # Also when full (or draining): the pass records this worker's
            # free slots, by which peers share a crashed worker's calls.
            free = 0 if self._draining else max(0, self._gate.free)
            try:
                with anyio.fail_after(self.settings.lease / 3):
                    deliveries = await self.consumer.reclaim_crashed(
                        grace, free, CRASH_CHECK_INTERVAL
                    )
            except RefusedCommand as exc:  # a refused command (the ACL?), not an outage
                if not refused:
                    logger.error("crash detection failed (leases still apply): %s", exc)
                refused = True
                continue
            except REDIS_DOWN:
                continue  # the consume loop reports outages, and waits a lease after one
            if deliveries:
                logger.warning(
                    "taking over %d call(s) of crashed worker(s) (liveness gone for %.1fs)",
                    len(deliveries),
                    grace,
                )
            self._take(deliveries)

    def _is_draining(self) -> bool:
        return self._draining

    async def _read_count(self) -> int:
        """How many new entries to read now: 0 to leave the next one to a peer.

        Alone, as many as there are free slots. With peers, one at a time and
        only when :func:`openrtc.worker.spread.decide` says this worker is the one to
        take it: one ``XPENDING`` round trip between reads, none for a read
        that is already waiting (an idle worker's join path is unchanged).
        """
        if not self._peers:
            return self._gate.free
        held = await self.consumer.held_by_consumer()
        # Counted as the peers count it, from the same reply.
        me = PeerLoad(
            held.get(self.settings.worker_id, 0), self.settings.concurrency, self._overloaded
        )
        peers = [
            PeerLoad(held.get(worker_id, 0), capacity, overloaded)
            for worker_id, (capacity, overloaded) in self._peers.items()
        ]
        decision = decide(me, peers)
        if not decision.read and me.held < me.capacity:
            # Bounded: peers that show room but make no progress (none reads,
            # none ends a call) while a job waits must not strand it.
            now = time.monotonic()
            progress = sum(p.held for p in peers)
            if self._defer_since is None:
                logger.debug("leaving the next job to a peer: %s", decision.reason)
            if self._defer_since is None or progress != self._defer_progress:
                self._defer_since, self._defer_progress = now, progress
            stalled = now - self._defer_since
            if stalled >= MAX_DEFER:
                oldest = await self.consumer.oldest_unread_ms()
                if oldest is not None:
                    # Counted from when it arrived, too: a job that came just
                    # now has not been left waiting by anyone yet.
                    waited = self._clock() + self._redis_clock_offset - oldest / 1000
                    decision = decide(me, peers, stalled=min(stalled, waited))
        if decision.read:
            self._defer_since = None
            return 1
        return 0

    def _drop(self, claim: _Claim) -> None:
        """Forget a claim and free its slot."""
        if self._claims.get(claim.entry_id) is claim:
            del self._claims[claim.entry_id]
            self._gate.give()
        claim.dropped.set()

    async def _accept(self, claim: _Claim) -> None:
        """Decide what a held entry becomes: a session, a dead letter, or nothing."""
        job_id, _ = peek_job_header(claim.delivery.fields)
        # The session task started by the check inherits these.
        with log_context(job_id=job_id, agent=self.settings.agent, room=_peek_room(claim)):
            await self._accept_in_context(claim)

    async def _accept_in_context(self, claim: _Claim) -> None:
        started = False
        try:
            started = await self._check(claim)
        except Exception:
            # No entry may stop the worker. Left pending and no longer renewed,
            # it comes back after a lease, counted, until max-deliveries sends
            # it to the dead letters undecoded.
            claim.settled = True
            logger.exception(
                "entry %s (delivery %d): unexpected error; left for redelivery",
                claim.entry_id,
                claim.delivery.deliveries,
            )
        finally:
            if claim.span is not None:
                claim.span.set_attribute("openrtc.session_started", started)
                claim.span.end()
            if not started:
                self._drop(claim)

    async def _check(self, claim: _Claim) -> bool:
        """Checks an entry and starts its session; False when it did not start one.

        The decision is :func:`openrtc.worker.acceptance.judge`'s; here are its reads
        (the job's record, then the entry decoded) and what follows from it.
        """
        delivery = claim.delivery
        job_id, dispatcher_id = peek_job_header(delivery.fields)
        record = await self._job_record(job_id)
        message: JobMessage | MalformedEntry | None = None
        verdict = self._judge(delivery, message, record)
        if verdict.action is Action.DECODE:
            try:
                if self.settings.signing is not None:
                    # Before decoding: nothing an unsigned entry says is acted on.
                    verify_job(self.settings.signing, delivery.fields)
                message = JobMessage.decode(delivery.fields)
            except MalformedEntry as exc:
                message = exc
            verdict = self._judge(delivery, message, record)
        if isinstance(message, JobMessage):
            claim.message = message
            if tracing.enabled:
                claim.span = tracing.start_span(
                    "openrtc.worker.claim",
                    parent=message.traceparent,
                    start_time=claim.read_ns or None,
                    attributes={
                        tracing.JOB_ID: message.job_id,
                        tracing.AGENT: message.agent,
                        tracing.ROOM: message.room,
                        "openrtc.worker_id": self.settings.worker_id,
                        "openrtc.entry_id": claim.entry_id,
                        "openrtc.delivery": delivery.deliveries,
                    },
                )
        else:
            message = None
        room: str | None = None
        if verdict.reason is DeadReason.EXPIRED and message is not None:
            # Old, yet maybe not waiting: restored by a Redis that lost the
            # read of a worker serving it (a snapshot taken before the read).
            async with self._room_checks:
                room = await self._check_room(message)
            if room == OURS_IN_ROOM:
                verdict = Verdict(Action.START)
        if verdict.action is Action.DEAD_LETTER:
            assert verdict.reason is not None
            if (
                await self._dead_letter(claim, verdict.reason, verdict.error, message, job_id)
                and message is None
                and verdict.reason is DeadReason.MAX_DELIVERIES
            ):
                # Given up on undecoded: its dispatcher is told from the peeked ids.
                await self._publish(
                    dispatcher_id, job_id, JobStatus.FAILED, f"{verdict.reason}: {verdict.error}"
                )
            return False
        assert message is not None
        if verdict.action is Action.RETRY:
            logger.error("job %s: %s; retried later", message.job_id, verdict.error)
            claim.lost = True  # not renewed: reclaimed after the lease
            return False
        if verdict.action is Action.FINISH:
            logger.info("job %s was %s; not joining", message.job_id, verdict.error)
            await self._finish(claim, message)
            await self._status(message, JobStatus.SUCCESS, "")
            return False
        # Concurrently with the rest of the batch, each bounded: a slow LiveKit
        # API delays calls, it does not let their leases lapse.
        if room is None:
            async with self._room_checks:
                room = await self._check_room(message)
        if claim.lost:
            logger.warning(
                "job %s: another worker took the entry while its room was checked; not joining",
                message.job_id,
            )
            return False
        claim.start = start_kind(
            delivery.deliveries,
            bool(message.handover_from),
            (record or {}).get(RecordField.STATE) == RecordState.RUNNING,
            room == OURS_IN_ROOM,
        )
        if claim.start is Start.CONTESTED and not await self._contest(claim, message):
            return False
        if self._draining and claim.start is Start.CONTESTED:
            # Not released: a copy under a new id would be one the call's
            # worker cannot tell from its own. Left unrenewed, it is deleted
            # by that worker's write-back, or reclaimed after a lease.
            claim.settled = True
            return False
        if self._draining:
            await self._release(claim, message)
            return False
        if room not in ("live", OURS_IN_ROOM):
            if room == "gone":
                logger.info(
                    "job %s: room %s is gone; nothing to join", message.job_id, message.room
                )
            else:
                logger.warning(
                    "job %s: room %s already has its agent (%s); not joining a second",
                    message.job_id,
                    message.room,
                    room,
                )
            await self._finish(claim, message)
            await self._status(message, JobStatus.SUCCESS, "")
            return False
        if not await self._mark_started(claim):
            logger.warning(
                "job %s: its entry is no longer ours (another worker serves the call); not joining",
                message.job_id,
            )
            return False
        # Any takeover: our joining removes the previous agent participant.
        claim.reclaimed = claim.start is not Start.FRESH
        if delivery.deliveries > 1:
            logger.warning(
                "job %s (room %s): taking the call over (delivery %d)",
                message.job_id,
                message.room,
                delivery.deliveries,
            )
        elif message.handover_from:
            logger.info(
                "job %s (room %s): taking the call over from draining worker %s",
                message.job_id,
                message.room,
                message.handover_from,
            )
        # Contested, with the job's agent in the room: the caller was greeted,
        # whether or not Redis kept the checkpoint that says so.
        contested_live = claim.start is Start.CONTESTED and room == OURS_IN_ROOM
        claim.control = SessionControl(greeted=contested_live)
        assert self._tg is not None
        self._tg.start_soon(self._serve, claim)
        return True

    async def _contest(self, claim: _Claim, message: JobMessage) -> bool:
        """A first delivery of a call that runs: wait a lease for the worker serving it.

        Redis lost that worker's read (restored from a snapshot taken before
        it, a failover). A live worker renews within a lease, sees this
        worker's read of the restored entry as a stray one and writes the call
        back, deleting it (:data:`openrtc.store.scripts.RENEW`): this claim is then
        lost and nobody joins. A worker that does not (dead, frozen past a
        lease) loses the call to this one, which takes it over from the
        checkpoint. True to go on.
        """
        logger.warning(
            "job %s (room %s): delivered as new, but the call runs already (Redis lost "
            "another worker's read?); waiting up to %.1fs for that worker before taking it over",
            message.job_id,
            message.room,
            self.settings.lease,
        )
        with anyio.move_on_after(self.settings.lease):
            await claim.lost_event.wait()
        if claim.lost:
            logger.info(
                "job %s: the worker serving it claimed it back; not joining", message.job_id
            )
            return False
        return True

    async def _mark_started(self, claim: _Claim) -> bool:
        """The job's record says it runs here (its entry still ours); False if not ours.

        With Redis unreachable it is assumed ours: nobody else can take it meanwhile.
        """
        message = claim.message
        assert message is not None
        try:
            with anyio.fail_after(self.settings.lease / 3):
                ours = await self.consumer.start(
                    claim.entry_id,
                    message.job_id,
                    {
                        RecordField.ATTEMPT: claim.delivery.deliveries,
                        RecordField.STARTED_AT: f"{self._clock():.6f}",
                    },
                )
        except (*REDIS_DOWN, TimeoutError) as exc:
            logger.warning("job %s: record not updated: %s", message.job_id, exc)
            return True
        if not ours:
            claim.lost = True
        return ours

    def _judge(
        self,
        delivery: Delivery,
        message: JobMessage | MalformedEntry | None,
        record: dict[str, str] | None,
    ) -> Verdict:
        return judge(
            delivery.deliveries,
            message,
            record,
            self._clock(),
            self.settings,
            redis_offset=self._redis_clock_offset,
        )

    async def _job_record(self, job_id: str) -> dict[str, str] | None:
        """The job's record; ``{}`` without a job id, ``None`` when Redis does not answer."""
        if not job_id:
            return {}
        try:
            return await self.consumer.job_record(job_id)
        except REDIS_DOWN as exc:
            logger.warning("job %s: cannot read its record (%s)", job_id, exc)
            return None

    async def _measure_redis_clock(self) -> None:
        before = self._clock()
        now = await redis_time(self._redis, self.keys.jobs(self.settings.agent))
        after = self._clock()
        self._redis_clock_offset = now - (before + after) / 2

    async def _release(self, claim: _Claim, message: JobMessage) -> None:
        """Hand an unstarted entry back to the stream, for a peer to read at once."""
        claim.settled = True
        try:
            with anyio.fail_after(self.settings.lease / 3):
                new_id = await self.consumer.release(claim.entry_id, message.job_id)
        except REDIS_DOWN as exc:
            # Still pending on us and no longer renewed: a peer reclaims it
            # after the lease.
            logger.warning("job %s: not released (%s); left to the lease", message.job_id, exc)
            return
        logger.info(
            "job %s: draining, handed back unstarted (entry %s -> %s)",
            message.job_id,
            claim.entry_id,
            new_id,
        )

    async def _check_room(self, message: JobMessage) -> str:
        """``live``, ``gone``, :data:`OURS_IN_ROOM`, or the identity of another job's agent.

        :data:`OURS_IN_ROOM`: live, and the job's own agent is there already (a
        takeover, a handover, or Redis lost the read of a worker serving it).

        ``gone``: the job's room (the same room, not a namesake) no longer
        exists; joining would create it again with only the agent in it,
        waiting for a caller who has hung up. An agent of ours with another
        identity already in the room is the previous job's, back after a
        LiveKit restart made the room (and this job) anew: a second agent
        would talk over it. On an API error the room is assumed live: a worker
        that cannot check must not drop calls.
        """
        if self._lkapi is None:
            creds = self.settings.livekit
            # One client for the worker's life: a fresh one per job would pay
            # a TCP connect on every call's critical path.
            self._lkapi = api.LiveKitAPI(creds.http_url, creds.api_key, creds.api_secret)
        lkapi = self._lkapi
        people = api.ListParticipantsResponse()

        async def list_people() -> None:
            nonlocal people
            # A room that is gone has nobody to list: the room listing says so.
            with contextlib.suppress(Exception):
                people = await lkapi.room.list_participants(
                    api.ListParticipantsRequest(room=message.room)
                )

        try:
            with anyio.fail_after(ROOM_CHECK_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    # Beside the room, at once: whether the job's own agent is
                    # there already (num_participants does not count agents).
                    tg.start_soon(list_people)
                    rooms = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[message.room]))
                same = [
                    r
                    for r in rooms.rooms
                    if r.sid == message.job.room.sid or not message.job.room.sid
                ]
                if not same:
                    return "gone"
        except Exception as exc:
            logger.warning("job %s: cannot check room %s: %s", message.job_id, message.room, exc)
            return "live"
        ours = False
        for p in people.participants:
            if p.kind != api.ParticipantInfo.Kind.AGENT:
                continue
            if same[0].num_participants >= 2 and message.is_another_job_of_my_agent(
                p.identity, p.attributes
            ):
                return p.identity
            ours = ours or p.identity == message.accept.identity
        return OURS_IN_ROOM if ours else "live"

    async def _serve(self, claim: _Claim) -> None:
        message, control = claim.message, claim.control
        assert message is not None
        assert control is not None
        self.stats.started += 1
        self.metrics.started.inc()
        span = None
        if claim.span is not None:
            span = tracing.start_span(
                "openrtc.session",
                parent=claim.span,
                attributes={
                    tracing.JOB_ID: message.job_id,
                    tracing.AGENT: message.agent,
                    tracing.ROOM: message.room,
                    "openrtc.isolation": self.settings.isolation,
                    "openrtc.takeover": claim.reclaimed,
                },
            )
        try:

            async def announce() -> None:
                # Off the join's critical path: the session connects meanwhile.
                # (The record was marked before: _mark_started.)
                await self._status(message, JobStatus.RUNNING, "")

            async def mark_joined() -> None:
                await control.joined.wait()
                claim.joined_at = time.monotonic()
                if span is not None:
                    _trace_joined(span, message)
                logger.info(
                    "job %s: agent '%s' joined room %s as %s (%.0f ms after enqueue)",
                    message.job_id,
                    message.agent,
                    message.room,
                    message.accept.identity,
                    (self._clock() - message.enqueued_at) * 1000,
                )
                # A session that lived a lease is no crash loop: the deliveries
                # so far were takeovers of a working call, not failures.
                await anyio.sleep(self.settings.lease)
                try:
                    await self.consumer.update_record(
                        message.job_id, {RecordField.HEALTHY: claim.delivery.deliveries}
                    )
                except REDIS_DOWN as exc:
                    logger.warning("job %s: record not updated: %s", message.job_id, exc)

            writer = await self._checkpointing(claim, message, control)
            async with anyio.create_task_group() as tg:
                tg.start_soon(announce)
                async with anyio.create_task_group() as watch:
                    watch.start_soon(mark_joined)
                    if writer is not None:
                        watch.start_soon(writer.run)
                    try:
                        with tracing.use_span(span) if span is not None else _no_span:
                            outcome = await self.runner.run(
                                message, control, worker_id=self.settings.worker_id
                            )
                    except Exception as exc:  # a runner bug must not take the worker down
                        logger.exception("job %s: the session runner failed", message.job_id)
                        outcome = SessionOutcome(
                            "failed", "session runner error", f"{type(exc).__name__}: {exc}"
                        )
                    if writer is not None and outcome.status == "failed":
                        # The next delivery resumes from it: the last turn counts.
                        with anyio.move_on_after(self.settings.lease / 3):
                            await writer.flush()
                    watch.cancel_scope.cancel()
            if span is not None:
                _trace_outcome(span, outcome)
                span = None
            await self._settle(claim, message, outcome)
            if writer is not None and outcome.status == "success" and not claim.handed_over:
                with contextlib.suppress(*REDIS_DOWN):
                    await self.checkpoints.delete(message.job_id)
        finally:
            if span is not None:  # cancelled
                span.end()
            self._drop(claim)
        if (
            outcome.status == "failed"
            and outcome.reason in (PROCESS_DIED, AGENT_NOT_BUILT)
            and not (control.stopping or claim.lost or self._draining)
        ):
            await self._redeliver(claim)

    async def _redeliver(self, claim: _Claim) -> None:
        """Start a call whose session process died again at once, as a takeover.

        Counted as a delivery (a call that kills every process still ends in
        the dead letters); an entry no longer ours, or Redis down, is left to
        the lease.
        """
        try:
            with anyio.fail_after(self.settings.lease / 3):
                delivery = await self.consumer.redeliver(claim.entry_id)
        except REDIS_DOWN as exc:
            logger.warning(
                "entry %s: not started again (%s); left to the lease", claim.entry_id, exc
            )
            return
        if delivery is None or self._draining:
            return
        logger.warning("entry %s: its session process died; starting it again", claim.entry_id)
        self._take([delivery])

    async def _checkpointing(
        self, claim: _Claim, message: JobMessage, control: SessionControl
    ) -> CheckpointWriter | None:
        """Wire the session to its checkpoints: the last one to resume from, a writer.

        Only a redelivered or handed-over job can have a checkpoint; reading
        it is one GET before the join. Unreadable (Redis down) means a fresh start.
        """
        if not (self.config.checkpoint and self.settings.checkpoint_max_bytes > 0):
            return None
        job_id = message.job_id
        # A handover, not a crash: the caller lost nothing, no resume line.
        control.handover = bool(message.handover_from) and claim.delivery.deliveries == 1
        if claim.start is not Start.FRESH:
            try:
                with anyio.fail_after(self.settings.lease / 3):
                    control.resume = await self.checkpoints.load(job_id)
            except (*REDIS_DOWN, TimeoutError) as exc:
                logger.warning("job %s: checkpoint not read (%s); starting afresh", job_id, exc)

        async def save(data: bytes) -> bool:
            # Fenced by the entry (as it is now: a write-back renames it).
            return await self.checkpoints.save(
                job_id, data, entry_id=claim.entry_id, consumer=self.settings.worker_id
            )

        writer = CheckpointWriter(
            save,
            label=f"job {job_id}",
            # A session stepping aside must not overwrite its successor's state.
            allowed=lambda: not (claim.lost or claim.handed_over or control.takeover),
        )
        claim.writer = writer
        control.checkpoint = writer.offer
        control.checkpoint_max_bytes = self.settings.checkpoint_max_bytes
        return writer

    async def _settle(self, claim: _Claim, message: JobMessage, outcome: SessionOutcome) -> None:
        if claim.handed_over and outcome.status == "success" and await self._released_lost(claim):
            # The call ended here, and Redis lost the entry it was handed over
            # as: nobody else will ever finish it.
            claim.handed_over = False
        if outcome.status == "taken_over" or claim.handed_over:
            # Handed over, however the session ended: the peer has the job now
            # (its record, its entry, its checkpoint), and finishes it.
            self.stats.taken_over += 1
            self.metrics.ended("taken_over")
            logger.log(
                logging.INFO if claim.handed_over else logging.WARNING,
                "job %s: another worker took the call over (%s); stepping aside",
                message.job_id,
                outcome.reason,
            )
            return
        if outcome.status == "failed":
            self.stats.failed += 1
            self.metrics.ended("failed")
            claim.settled = True
            logger.error(
                "job %s: session failed (delivery %d of %d): %s",
                message.job_id,
                claim.delivery.deliveries,
                self.settings.max_deliveries,
                outcome.error,
            )
            with contextlib.suppress(*REDIS_DOWN):
                await self.consumer.update_record(
                    message.job_id, {RecordField.LAST_ERROR: outcome.error}
                )
            # Left pending and no longer renewed: after the lease it is
            # delivered again, to this worker or another, until the limit.
            return
        self.stats.succeeded += 1
        self.metrics.ended("succeeded")
        logger.info("job %s ended: %s", message.job_id, outcome.reason)
        if outcome.ended_by_agent:
            await self._mark_ended(message)
        await self._finish(claim, message)
        await self._status(message, JobStatus.SUCCESS, "")

    async def _mark_ended(self, message: JobMessage) -> None:
        """The agent ended the call on purpose: the reconciler leaves its room alone.

        Written before the acknowledgement: a crash between the two leaves the
        call to a peer, never the room to a new dispatch.
        """
        key, sid = self.keys.ended(message.room), message.job.room.sid or message.room
        await self._until_redis(lambda: self._redis.set(key, sid, ex=ENDED_TTL))

    async def _released_lost(self, claim: _Claim) -> bool:
        """Whether Redis lost the entry this claim's call was handed over as."""
        if not (claim.released and claim.message):
            return False
        try:
            with anyio.fail_after(self.settings.lease / 3):
                where = await self.consumer.released(claim.released, claim.message.job_id)
        except (*REDIS_DOWN, TimeoutError):
            return False
        return where == "forgotten"

    async def _finish(self, claim: _Claim, message: JobMessage) -> None:
        """The job is done with: acknowledge (and delete) its entry, mark its record."""
        # Settled first: a renewal racing the ack must not take the vanished
        # entry for one Redis forgot and write it back.
        claim.settled = True
        try:
            await self._until_redis(self.consumer.ack, claim.entry_id)
            await self.consumer.update_record(message.job_id, {RecordField.STATE: RecordState.DONE})
        except REDIS_DOWN as exc:
            logger.warning("job %s: record not updated: %s", message.job_id, exc)

    async def _dead_letter(
        self,
        claim: _Claim,
        reason: DeadReason,
        error: str,
        message: JobMessage | None,
        job_id: str = "",
    ) -> bool:
        """Move the entry to the dead letters; tell its dispatcher if ``message``."""
        claim.settled = True
        delivery = claim.delivery
        self.stats.dead_lettered += 1
        self.metrics.dead_letters.labels(self.settings.agent, reason.value).inc()
        job = message.job_id if message else job_id or "?"
        logger.error(
            "entry %s (job %s) -> dead letters (%s): %s", delivery.entry_id, job, reason, error
        )
        try:
            await self._until_redis(self.consumer.dead_letter, delivery, reason, error)
        except Exception:
            logger.exception("entry %s could not be dead-lettered", delivery.entry_id)
            return False
        if message is not None:
            await self._status(message, JobStatus.FAILED, f"{reason}: {error}")
        return True

    async def _status(self, message: JobMessage, status: JobStatus, error: str) -> None:
        await self._publish(message.dispatcher_id, message.job_id, status, error)

    async def _publish(
        self, dispatcher_id: str, job_id: str, status: JobStatus, error: str
    ) -> None:
        if not dispatcher_id or not job_id:
            return
        try:
            with anyio.fail_after(2):
                await self.store.publish_status(
                    dispatcher_id, StatusEvent(job_id, status, error, self.settings.worker_id)
                )
        except REDIS_DOWN as exc:
            logger.warning("job %s: status %s not sent: %s", job_id, status, exc)

    # -- leases, control, membership -------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.lease / 3)
            held = {
                c.entry_id: c.message.job_id if c.message else ""
                for c in self._claims.values()
                if c.renewable
            }
            if not held:
                continue
            try:
                with anyio.fail_after(self.settings.lease / 3):
                    renewal = await self.consumer.renew(held)
            except REDIS_DOWN as exc:
                self.metrics.renewals_failed.inc(len(held))
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                continue
            for entry_id in renewal.lost:
                claim = self._claims.get(entry_id)
                if claim is None or claim.settled:
                    continue
                self.metrics.lost.inc()
                claim.lost = True
                claim.lost_event.set()
                if claim.control is not None and claim.message is not None:
                    logger.warning("job %s: lease lost to another worker", claim.message.job_id)
                    claim.control.stop("lease lost", takeover=True)
            for entry_id in renewal.forgotten:
                claim = self._claims.get(entry_id)
                if claim is not None and not claim.settled:
                    await self._write_back(claim)

    async def _write_back(self, claim: _Claim) -> None:
        """Redis forgot a call this worker holds: put its entry and record back, ours."""
        if claim.message is None:
            return  # not even decoded yet: it will be dropped by its own check
        old = claim.entry_id
        try:
            with anyio.fail_after(self.settings.lease / 3):
                new = await self.consumer.write_back(
                    claim.message.job_id, claim.delivery.fields, forgotten=old
                )
        except REDIS_DOWN as exc:
            logger.warning("job %s: entry not written back yet: %s", claim.message.job_id, exc)
            return
        if claim.settled:
            # It ended while being written back: the new entry is done with too.
            with contextlib.suppress(*REDIS_DOWN):
                await self.consumer.ack(new)
            return
        if self._claims.get(old) is claim:
            del self._claims[old]
            self._claims[new] = claim
        claim.delivery = dataclasses.replace(claim.delivery, entry_id=new)
        logger.warning(
            "job %s: Redis had lost its entry (restarted without persistence?); "
            "written back as %s, the call goes on",
            claim.message.job_id,
            new,
        )

    async def _control_loop(self) -> None:
        key = self.keys.control(self.settings.agent)
        last_id: bytes | str = "$"
        while True:
            try:
                reply: Any = await self._redis.xread({key: last_id}, count=100, block=READ_BLOCK_MS)
            except REDIS_DOWN as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(0.5)
                continue
            for entry_id, fields in reply[0][1] if reply else []:
                last_id = entry_id
                try:
                    if self.settings.signing is not None:
                        verify_control(self.settings.signing, self.settings.agent, fields)
                    event = ControlEvent.decode(fields)
                except ForgedEntry as exc:
                    # Not a job: nothing to dead-letter, and nobody's call ends.
                    logger.warning("ignoring forged control event %s: %s", entry_id, exc)
                    continue
                except MalformedEntry as exc:
                    logger.warning("ignoring malformed control event %s: %s", entry_id, exc)
                    continue
                self._terminate(event.job_id)

    def _terminate(self, job_id: str) -> None:
        for claim in self._claims.values():
            running = claim.control
            if running is None or claim.message is None or claim.message.job_id != job_id:
                continue
            if claim.handed_over:
                # The peer it was handed to joined with its identity and removed
                # this session's participant: LiveKit reports exactly that.
                logger.info("job %s: termination caused by its handover; ignored", job_id)
                return
            since_join = time.monotonic() - claim.joined_at if claim.joined_at else 0.0
            if claim.reclaimed and since_join < self.settings.takeover_grace:
                # Our joining with the job's identity removed the previous
                # agent participant, and LiveKit reports exactly that.
                logger.info("job %s: termination caused by our takeover; ignored", job_id)
                return
            logger.info("job %s: terminated by LiveKit", job_id)
            running.stop("terminated by LiveKit")

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_interval)
            try:
                with anyio.fail_after(max(1.0, self.settings.heartbeat_interval * 2)):
                    await self._beat()
                    await self._refresh_peers()
                    await self._measure_redis_clock()
                # Also when the consume loop does not read (all slots busy).
                self._redis_state.set("connected", redact_url(self.settings.redis_url))
            except REDIS_DOWN as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)

    async def _refresh_peers(self) -> None:
        """The agent's other live workers: capacity (0 while draining), CPU state."""
        ids = [
            m
            for m in await live_members(self._redis, self.keys.workers(self.settings.agent))
            if m != self.settings.worker_id
        ]
        pipe = self._redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hmget(self.keys.worker(worker_id), ["capacity", "overloaded"])
        records = await pipe.execute() if ids else []
        peers: dict[str, tuple[int, bool]] = {}
        for worker_id, (capacity, overloaded) in zip(ids, records, strict=True):
            if capacity is None:  # gone between the two reads
                continue
            with contextlib.suppress(ValueError):
                peers[worker_id] = (int(capacity), overloaded in (b"1", "1"))
        self._peers = peers

    def _measure_cpu(self) -> None:
        threshold = self.settings.load_threshold
        if self._cpu is None or threshold is None:
            return
        self._cpu_load = self._cpu.sample()
        overloaded = self._cpu_load >= threshold
        if overloaded != self._overloaded:
            logger.log(
                logging.WARNING if overloaded else logging.INFO,
                "CPU load %.0f%% %s the threshold %.0f%%: %s",
                self._cpu_load * 100,
                "at or above" if overloaded else "back under",
                threshold * 100,
                "new calls go to peers below it while they have room"
                if overloaded
                else "reading new calls again",
            )
        self._overloaded = overloaded

    async def _beat(self) -> None:
        s = self.settings
        self._measure_cpu()
        await self._presence.beat(
            {
                "agent": s.agent,
                "capacity": 0 if self._draining else s.concurrency,
                "running": len(self.running),
                "isolation": s.isolation,
                "jobs": ",".join(self.running_jobs),
                "draining": int(self._draining),
                "overloaded": int(self._overloaded),
                "cpu": f"{self._cpu_load:.3f}",
            }
        )


_no_span: Final = contextlib.nullcontext()


def _peek_room(claim: _Claim) -> str:
    """The entry's room name for log lines before it is decoded; ``""`` if unusable."""
    raw = claim.delivery.fields.get(b"room", b"")
    text = raw[:ID_MAX].decode(errors="replace") if isinstance(raw, bytes) else ""
    return text if text.isprintable() else ""


def _trace_joined(span: Any, message: JobMessage) -> None:
    """The agent is in the room: an event on the session span, and the join as a span."""
    span.add_event("agent joined", {"openrtc.identity": message.accept.identity})
    join = tracing.start_span(
        "openrtc.session.join",
        parent=span,
        start_time=span.start_time,
        attributes={tracing.JOB_ID: message.job_id, tracing.ROOM: message.room},
    )
    join.end()


def _trace_outcome(span: Any, outcome: SessionOutcome) -> None:
    span.set_attributes(
        {"openrtc.outcome": outcome.status, "openrtc.outcome_reason": outcome.reason}
    )
    if outcome.status == "failed":
        tracing.end_failed(span, outcome.error or outcome.reason)
    else:
        span.end()

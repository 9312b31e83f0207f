"""The worker runtime: consume one agent's stream and run its sessions in their rooms.

One readable set of loops under one task group (``openrtc worker --agent dental``):

- **consume**: read new entries while there are free slots; reclaim entries
  whose holder stopped renewing (a worker that died); each becomes a session,
  or a dead letter (``malformed``, ``expired``, ``max-deliveries``).
- **lease**: renew the claim on every running entry every ``lease / 3``; an
  entry this worker no longer owns means another worker took the call over,
  so the local session steps aside.
- **control**: LiveKit's terminations, relayed by the dispatcher, end sessions.
- **heartbeat**: capacity and running sessions, for the dispatcher's
  backpressure and ``openrtc status``.

Delivery is at least once and never twice at a time: a running job's entry
stays pending until its session ends, so a killed worker's calls are taken
over by its peers within about one lease; a living worker's calls never are.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from livekit import api
from redis.asyncio import Redis
from redis.exceptions import RedisError

from openrtc.agents import AgentConfig, AgentPool
from openrtc.errors import ConfigError
from openrtc.keys import Keys
from openrtc.membership import heartbeat, leave
from openrtc.messages import DeadReason, JobMessage, JobStatus, MalformedEntry, StatusEvent
from openrtc.redis_health import check_durability
from openrtc.session import SessionControl, SessionOutcome, new_job_process, run_session
from openrtc.settings import WorkerSettings, redact_url
from openrtc.streams import Delivery, JobConsumer, StreamStore, connect_redis
from openrtc.supervision import StateLog, describe

__all__ = ["SessionRunner", "Worker", "WorkerStats"]

logger = logging.getLogger("openrtc.worker")

#: How long a blocking read waits before the loop looks at its state again.
READ_BLOCK_MS: Final = 1000
#: How often entries of dead workers are looked for.
RECLAIM_INTERVAL: Final = 1.0


class SessionRunner(Protocol):
    """Runs one session to its end: in this process, or in a child process."""

    async def prepare(self) -> None: ...

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome: ...

    async def aclose(self) -> None: ...


class CoroutineRunner:
    """Sessions as tasks in this process, sharing one prewarmed ``JobProcess``."""

    def __init__(self, config: AgentConfig, settings: WorkerSettings) -> None:
        self._config = config
        self._settings = settings
        self._proc = new_job_process("coroutine")

    async def prepare(self) -> None:
        if self._config.prewarm is not None:
            logger.info("prewarming agent '%s'", self._config.name)
            await anyio.to_thread.run_sync(self._config.prewarm, self._proc)

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome:
        return await run_session(
            message, self._config, self._settings.livekit, self._proc, control, worker_id=worker_id
        )

    async def aclose(self) -> None:
        return None


@dataclass(slots=True)
class WorkerStats:
    """Counters since start."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    taken_over: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0


@dataclass(slots=True)
class _Running:
    message: JobMessage
    delivery: Delivery
    control: SessionControl
    joined_at: float = 0.0
    reclaimed: bool = False


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
        redis: Redis | None = None,
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
        self.keys = Keys(settings.namespace, cluster=settings.cluster_keys)
        self.stats = WorkerStats()
        self._clock = clock
        self._own_redis = redis is None
        self._redis = redis or connect_redis(
            settings.redis_url, client_name=f"openrtc:{settings.worker_id}"
        )
        self.store = StreamStore(self._redis, self.keys)
        self.consumer = JobConsumer(self.store, settings.agent, settings.worker_id)
        if runner is None:
            if settings.isolation == "process":
                from openrtc.process_runner import ProcessRunner

                runner = ProcessRunner(self.config, settings)
            else:
                runner = CoroutineRunner(self.config, settings)
        self.runner = runner
        self._gate = _Gate(settings.concurrency)
        self._running: dict[str, _Running] = {}  # by entry id
        self._checking: set[str] = set()  # entries accepted, not yet running
        self._lkapi: api.LiveKitAPI | None = None
        self._draining = False
        self._stop = anyio.Event()
        self._ready = anyio.Event()
        self._redis_state = StateLog("Redis", logger)
        self._tg: TaskGroup | None = None

    # -- lifecycle -----------------------------------------------------------

    @property
    def ready(self) -> anyio.Event:
        """Set once the worker consumes its stream."""
        return self._ready

    @property
    def running_jobs(self) -> list[str]:
        """Job ids of the sessions running now."""
        return [r.message.job_id for r in self._running.values()]

    def request_stop(self) -> None:
        """Drain: stop taking jobs, let running calls finish up to ``drain_timeout``."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_stop` and the drain are done (or cancellation)."""
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
        try:
            await self.runner.prepare()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._until_redis(self.store.ensure_group, s.agent)
                await check_durability(self._redis, logger)
                await self._beat()
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
                with contextlib.suppress(RedisError, OSError):
                    await leave(
                        self._redis,
                        registry_key=self.keys.workers(s.agent),
                        record_key=self.keys.worker(s.worker_id),
                        member=s.worker_id,
                    )
                await self.runner.aclose()
                if self._lkapi is not None:
                    await self._lkapi.aclose()
                if self._own_redis:
                    await self._redis.aclose()
            logger.info("worker %s stopped", s.worker_id)

    async def _drain(self) -> None:
        self._draining = True
        count = len(self._running)
        logger.info(
            "draining: no new jobs; %d running session(s) may go on for up to %.0fs",
            count,
            self.settings.drain_timeout,
        )
        with anyio.move_on_after(self.settings.drain_timeout):
            while self._running:
                await self._gate.changed.wait()
        if self._running:
            # Not acknowledged: their entries stay pending, and another worker
            # takes the calls over once the lease lapses.
            logger.warning("drain timeout: leaving %d call(s) to other workers", len(self._running))
            for running in self._running.values():
                running.control.stop("worker drain timeout", takeover=True)

    async def _until_redis(self, func: Callable[..., Any], *args: Any) -> Any:
        delay = 0.1
        while True:
            try:
                return await func(*args)
            except (RedisError, OSError) as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- consuming -----------------------------------------------------------

    async def _consume_loop(self) -> None:
        last_reclaim = 0.0
        while not self._is_draining():
            if self._gate.free <= 0:
                with anyio.move_on_after(RECLAIM_INTERVAL):
                    await self._gate.changed.wait()
                continue
            try:
                deliveries: list[Delivery] = []
                now = time.monotonic()
                if now - last_reclaim >= RECLAIM_INTERVAL:
                    last_reclaim = now
                    deliveries = await self.consumer.reclaim(self.settings.lease, self._gate.free)
                    self.stats.reclaimed += len(deliveries)
                if not deliveries:
                    block = int(min(READ_BLOCK_MS, RECLAIM_INTERVAL * 1000))
                    deliveries = await self.consumer.read(self._gate.free, block)
                self._redis_state.set("connected", redact_url(self.settings.redis_url))
            except (RedisError, OSError) as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(0.5)
                continue
            for delivery in deliveries:
                await self._accept(delivery)

    def _is_draining(self) -> bool:
        return self._draining

    async def _accept(self, delivery: Delivery) -> None:
        """Decide what an entry becomes: a session, a dead letter, or nothing."""
        if delivery.entry_id in self._running or delivery.entry_id in self._checking:
            # Our own call, reclaimed because a renewal was late: the XAUTOCLAIM
            # just renewed it. Never a second session for one job.
            return
        try:
            message = JobMessage.decode(delivery.fields)
        except MalformedEntry as exc:
            await self._dead_letter(delivery, DeadReason.MALFORMED, str(exc), None)
            return
        if message.agent != self.settings.agent:
            # A real job on the wrong stream: nobody will serve it, so its
            # dispatcher is told it failed, like any other dead-lettered job.
            error = f"entry for agent '{message.agent}' on agent '{self.settings.agent}' stream"
            await self._dead_letter(delivery, DeadReason.MALFORMED, error, message)
            return
        try:
            record = await self.consumer.job_record(message.job_id)
        except (RedisError, OSError) as exc:
            logger.error("job %s: cannot read its record (%s); retried later", message.job_id, exc)
            return  # still pending on us: reclaimed after the lease
        started_before = record.get("state") == "running"
        if delivery.deliveries > self.settings.max_deliveries:
            error = record.get("last_error") or "no error recorded"
            await self._dead_letter(
                delivery,
                DeadReason.MAX_DELIVERIES,
                f"gave up after {delivery.deliveries - 1} deliveries"
                f" (max {self.settings.max_deliveries}); last error: {error}",
                message,
            )
            return
        if record.get("terminated") and not started_before:
            # Terminated while it waited (its dispatch was deleted, the room
            # closed): nobody should join. A call that had started is another
            # matter: the termination is then the dead worker's agent leaving,
            # and the takeover below is what the caller needs.
            logger.info("job %s was terminated before it started; not joining", message.job_id)
            await self._finish(delivery, message, "done")
            await self._status(message, JobStatus.SUCCESS, "")
            return
        waited = self._clock() - message.enqueued_at
        if not started_before and waited > self.settings.max_queue_age:
            await self._dead_letter(
                delivery,
                DeadReason.EXPIRED,
                f"waited {waited:.1f}s for a worker (limit {self.settings.max_queue_age:.0f}s)",
                message,
            )
            return
        # The room check is a LiveKit API call: keep the lease meanwhile.
        self._checking.add(delivery.entry_id)
        try:
            live = await self._room_is_live(message)
        finally:
            self._checking.discard(delivery.entry_id)
        if not live:
            logger.info("job %s: room %s is gone; nothing to join", message.job_id, message.room)
            await self._finish(delivery, message, "done")
            await self._status(message, JobStatus.SUCCESS, "")
            return
        reclaimed = delivery.deliveries > 1
        if reclaimed:
            logger.warning(
                "job %s (room %s): taking the call over (delivery %d)",
                message.job_id,
                message.room,
                delivery.deliveries,
            )
        running = _Running(message, delivery, SessionControl(), reclaimed=reclaimed)
        self._running[delivery.entry_id] = running
        self._gate.take()
        assert self._tg is not None
        self._tg.start_soon(self._serve, running)

    async def _room_is_live(self, message: JobMessage) -> bool:
        """Does the job's room still exist (the same room, not a namesake)?

        Joining a deleted room would create it again with only the agent in
        it, waiting for a caller who has hung up. On an API error we assume
        the room is there: a worker that cannot check must not drop calls.
        """
        if self._lkapi is None:
            creds = self.settings.livekit
            # One client for the worker's life: a fresh one per job would pay
            # a TCP connect on every call's critical path.
            self._lkapi = api.LiveKitAPI(creds.http_url, creds.api_key, creds.api_secret)
        try:
            with anyio.fail_after(3):
                rooms = await self._lkapi.room.list_rooms(
                    api.ListRoomsRequest(names=[message.room])
                )
        except Exception as exc:
            logger.warning("job %s: cannot check room %s: %s", message.job_id, message.room, exc)
            return True
        return any(r.sid == message.job.room.sid or not message.job.room.sid for r in rooms.rooms)

    async def _serve(self, running: _Running) -> None:
        message, delivery, control = running.message, running.delivery, running.control
        self.stats.started += 1
        try:

            async def announce() -> None:
                # Off the join's critical path: the session connects meanwhile.
                try:
                    await self.consumer.update_record(
                        message.job_id,
                        state="running",
                        worker=self.settings.worker_id,
                        attempt=delivery.deliveries,
                        started_at=f"{self._clock():.6f}",
                    )
                except (RedisError, OSError) as exc:
                    logger.warning("job %s: record not updated: %s", message.job_id, exc)
                await self._status(message, JobStatus.RUNNING, "")

            async def mark_joined() -> None:
                await control.joined.wait()
                running.joined_at = time.monotonic()
                logger.info(
                    "job %s: agent '%s' joined room %s as %s (%.0f ms after enqueue)",
                    message.job_id,
                    message.agent,
                    message.room,
                    message.accept.identity,
                    (self._clock() - message.enqueued_at) * 1000,
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(announce)
                async with anyio.create_task_group() as watch:
                    watch.start_soon(mark_joined)
                    try:
                        outcome = await self.runner.run(
                            message, control, worker_id=self.settings.worker_id
                        )
                    except Exception as exc:  # a runner bug must not take the worker down
                        logger.exception("job %s: the session runner failed", message.job_id)
                        outcome = SessionOutcome(
                            "failed", "session runner error", f"{type(exc).__name__}: {exc}"
                        )
                    watch.cancel_scope.cancel()
            await self._settle(running, outcome)
        finally:
            self._running.pop(delivery.entry_id, None)
            self._gate.give()

    async def _settle(self, running: _Running, outcome: SessionOutcome) -> None:
        message, delivery = running.message, running.delivery
        if outcome.status == "taken_over":
            self.stats.taken_over += 1
            logger.warning(
                "job %s: another worker took the call over (%s); stepping aside",
                message.job_id,
                outcome.reason,
            )
            return
        if outcome.status == "failed":
            self.stats.failed += 1
            logger.error(
                "job %s: session failed (delivery %d of %d): %s",
                message.job_id,
                delivery.deliveries,
                self.settings.max_deliveries,
                outcome.error,
            )
            with contextlib.suppress(RedisError, OSError):
                await self.consumer.update_record(message.job_id, last_error=outcome.error)
            # Left pending and no longer renewed: after the lease it is
            # delivered again, to this worker or another, until the limit.
            return
        self.stats.succeeded += 1
        logger.info("job %s ended: %s", message.job_id, outcome.reason)
        await self._finish(delivery, message, "done")
        await self._status(message, JobStatus.SUCCESS, "")

    async def _finish(self, delivery: Delivery, message: JobMessage, state: str) -> None:
        try:
            await self._until_redis(self.consumer.ack, delivery.entry_id)
            await self.consumer.update_record(message.job_id, state=state)
        except (RedisError, OSError) as exc:
            logger.warning("job %s: record not updated: %s", message.job_id, exc)

    async def _dead_letter(
        self, delivery: Delivery, reason: DeadReason, error: str, message: JobMessage | None
    ) -> None:
        self.stats.dead_lettered += 1
        job = message.job_id if message else "?"
        logger.error(
            "entry %s (job %s) -> dead letters (%s): %s", delivery.entry_id, job, reason, error
        )
        try:
            await self._until_redis(self.consumer.dead_letter, delivery, reason, error)
        except Exception:
            logger.exception("entry %s could not be dead-lettered", delivery.entry_id)
            return
        if message is not None:
            await self._status(message, JobStatus.FAILED, f"{reason}: {error}")

    async def _status(self, message: JobMessage, status: JobStatus, error: str) -> None:
        if not message.dispatcher_id:
            return
        try:
            with anyio.fail_after(2):
                await self.store.publish_status(
                    message.dispatcher_id,
                    StatusEvent(message.job_id, status, error, self.settings.worker_id),
                )
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("job %s: status %s not sent: %s", message.job_id, status, exc)

    # -- leases, control, membership -------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.lease / 3)
            # A session stopping for a takeover (lease lost, drain timeout) is
            # left to lapse; one ending for good (terminated) stays ours until
            # it is acknowledged, however long its agent takes to hang up.
            ids = [e for e, r in self._running.items() if not r.control.takeover]
            ids.extend(self._checking)
            if not ids:
                continue
            try:
                with anyio.fail_after(self.settings.lease / 3):
                    lost = await self.consumer.renew(ids)
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                continue
            for entry_id in lost:
                running = self._running.get(entry_id)
                if running is not None:
                    logger.warning("job %s: lease lost to another worker", running.message.job_id)
                    running.control.stop("lease lost", takeover=True)

    async def _control_loop(self) -> None:
        key = self.keys.control(self.settings.agent)
        last_id: bytes | str = "$"
        while True:
            try:
                reply: Any = await self._redis.xread({key: last_id}, count=100, block=READ_BLOCK_MS)
            except (RedisError, OSError) as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(0.5)
                continue
            for entry_id, fields in reply[0][1] if reply else []:
                last_id = entry_id
                if fields.get(b"type") == b"terminate":
                    self._terminate(fields.get(b"job_id", b"").decode(errors="replace"))

    def _terminate(self, job_id: str) -> None:
        for running in self._running.values():
            if running.message.job_id != job_id:
                continue
            since_join = time.monotonic() - running.joined_at if running.joined_at else 0.0
            if running.reclaimed and since_join < self.settings.takeover_grace:
                # Our joining with the job's identity removed the previous
                # agent participant, and LiveKit reports exactly that.
                logger.info("job %s: termination caused by our takeover; ignored", job_id)
                return
            logger.info("job %s: terminated by LiveKit", job_id)
            running.control.stop("terminated by LiveKit")

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_interval)
            try:
                with anyio.fail_after(max(1.0, self.settings.heartbeat_interval * 2)):
                    await self._beat()
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_state.set("unreachable", describe(exc), level=logging.ERROR)

    async def _beat(self) -> None:
        s = self.settings
        await heartbeat(
            self._redis,
            registry_key=self.keys.workers(s.agent),
            record_key=self.keys.worker(s.worker_id),
            member=s.worker_id,
            fields={
                "agent": s.agent,
                "capacity": 0 if self._draining else s.concurrency,
                "running": len(self._running),
                "isolation": s.isolation,
                "jobs": ",".join(self.running_jobs),
                "draining": int(self._draining),
            },
            ttl=s.membership_ttl,
        )

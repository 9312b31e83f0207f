"""The worker runtime: consume one agent's stream and run its sessions in their rooms.

A worker (``openrtc worker --agent dental``) is made of parts, each a module here
with one ``run(*, task_status)``, started in this order from :attr:`Worker.steps`
under one task group:

1. **sessions** (``sessions.py``): the session runner's upkeep; the supervisor runs
   each started call's session to its outcome, and starts a call whose session
   process died again at once (``process`` isolation).
2. **crash watch** (``crash_watch.py``, with ``crash_detection``): this worker's
   liveness subscription, then peers whose subscription closed (a killed
   process) have their calls taken over at once, within about a second.
3. **heartbeat** (``heartbeat.py``): capacity and running calls for the
   dispatcher's backpressure and ``openrtc status``; the peer view; Redis's clock.
4. **leases** (``leases.py``): renew every held entry every ``lease / 3``; step
   aside from a call another worker took, write back one Redis forgot.
5. **control** (``control.py``): LiveKit's terminations, relayed by the
   dispatcher, end sessions.
6. **intake** (``intake.py``): read new entries while there are free slots
   (spread by load among peers), reclaim those of frozen or dead peers.
7. **guards** (``guards.py``, with a memory limit set): the worker's memory
   and its session processes' measured; over ``--memory-limit-mb`` it drains
   and exits (code 75) to be restarted; a session process over
   ``--session-memory-limit-mb`` has its call handed over. (The run of failed
   sessions is the outcomes': ``limits.FailureGuard``.)
8. **top** (``top.py``, unless ``--top-interval 0``): the running sessions
   (state, turns, latency, CPU, memory, loop blocks) published for ``openrtc top``.
9. **reloader** (``reloader.py``, with ``--reload``): a saved agent module
   serves new calls, and live calls move to it at their next turn boundary.
10. **tenants watcher** (``tenants_watch.py``, with a tenants file): a changed
    ``tenants.toml`` applies to new calls; an invalid one is logged, the last
    good one stays.

Not loops: the **entry check** (``entry_check.py``: each held entry checked,
concurrently, into a session or a dead letter), the **room check** (``rooms.py``)
and the **outcomes** (``outcomes.py``: acknowledge, dead-letter, release,
status). After a stop request the **drainer** (``drainer.py``) hands running
calls to peers or lets them finish, then the steps are cancelled.

Shared state: the worker context (``context.py``: settings, clients, counters,
the Redis clock offset), the claim table (``claims.py``: held entries and free
slots) and the peer view (``heartbeat.PeerView``), each attribute with one writer.

Delivery is at least once and never twice at a time: a running job's entry
stays pending until its session ends, so a killed worker's calls are taken
over by its peers within about a second (a frozen one's within a lease); a
living worker's calls never are.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from openrtc.agents.registry import AgentConfig, AgentPool
from openrtc.agents.tenants import TenantsConfig
from openrtc.errors import ConfigError
from openrtc.ops.http import OpsServer, ops_server, serving
from openrtc.ops.logs import log_context
from openrtc.ops.metrics import WorkerMetrics
from openrtc.session.runners import CoroutineRunner, ProcessRunner, SessionRunner
from openrtc.settings import WorkerSettings, redact_url
from openrtc.store.checkpoint import CheckpointStore
from openrtc.store.membership import Presence
from openrtc.store.redis_access import check_redis_access
from openrtc.store.redis_health import check_durability
from openrtc.store.streams import (
    JobConsumer,
    RedisClient,
    StreamStore,
)
from openrtc.tenant_file import TenantsError, find_tenants_file, load_tenants, reference_problems
from openrtc.wire.messages import JobMessage
from openrtc.wire.signing import log_signing
from openrtc.worker.claims import ClaimTable
from openrtc.worker.context import READ_BLOCK_MS, WorkerContext, WorkerStats, logger
from openrtc.worker.control import ControlListener
from openrtc.worker.crash_watch import CrashWatch
from openrtc.worker.drainer import Drainer
from openrtc.worker.entry_check import EntryCheck
from openrtc.worker.guards import Guards
from openrtc.worker.heartbeat import Heartbeat, PeerView
from openrtc.worker.intake import Intake
from openrtc.worker.leases import LeaseKeeper
from openrtc.worker.limits import FailureGuard
from openrtc.worker.outcomes import Outcomes
from openrtc.worker.reloader import Reloader
from openrtc.worker.rooms import ROOM_CHECK_TIMEOUT, RoomCheck
from openrtc.worker.sessions import SessionSupervisor
from openrtc.worker.spread import CpuLoad
from openrtc.worker.tenants_watch import TenantsWatcher
from openrtc.worker.top import TopPublisher

__all__ = ["READ_BLOCK_MS", "ROOM_CHECK_TIMEOUT", "Step", "Worker", "WorkerStats"]

#: One part of a running worker: runs until cancelled, started once it is ready.
Step = Callable[..., Coroutine[Any, Any, None]]


class Worker:
    """Serves one agent's job stream.

    Args:
        settings: connection, capacity and lease settings.
        pool: the agents directory's registry; ``settings.agent`` must be in it.
        runner: how sessions run (default: by ``settings.isolation``).
        redis: an existing client (tests); by default one is made and closed.
        clock: wall-clock time (tests skew it).
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
        self.pool = pool
        self.config = pool.get(settings.agent)
        # Built once now: an agent whose constructor raises fails the worker
        # at start-up (AgentBuildError, one line), never each call in its room.
        self.config.build()
        # Checked before any client is made: every problem one line (TenantsError).
        self.tenants_path = _tenants_path(settings, self.config)
        self._tenants_read: bytes | None = None
        tenants = TenantsConfig()
        if self.tenants_path is not None:
            # Read before it is checked: an edit in between is a change to the watcher.
            self._tenants_read = _read(self.tenants_path)
            tenants = load_tenants(self.tenants_path)
            if problems := reference_problems(tenants, os.environ):
                raise TenantsError(problems)
        self.ctx = ctx = _context(settings, self.config, redis, clock)
        ctx.observers = pool.observers
        ctx.tenants = tenants
        self.keys, self.store, self.consumer = ctx.keys, ctx.store, ctx.consumer
        self.checkpoints, self.stats, self.metrics = ctx.checkpoints, ctx.stats, ctx.metrics
        self._presence = Presence(
            ctx.redis_client,
            ctx.keys.workers(settings.agent),
            ctx.keys.worker(settings.worker_id),
            settings.worker_id,
            settings.membership_ttl,
        )
        if runner is None:
            if settings.isolation == "process":
                runner = ProcessRunner(self.config, settings, hidden_env=ctx.tenants.env_names())
            else:
                runner = CoroutineRunner(self.config, settings)
        self.runner = runner
        self._build_parts(ctx, runner)
        self._stop = anyio.Event()
        #: The process's exit code once it stopped: 0, or
        #: :data:`openrtc.worker.limits.EXIT_MEMORY_LIMIT` after its memory limit.
        self.exit_code = 0
        self._ready = anyio.Event()
        self._startup: anyio.CancelScope | None = None
        #: The /healthz, /readyz and /metrics server; ``None`` when off.
        self.http: OpsServer | None = ops_server(
            settings, self.metrics, readiness=self.readiness, refresh=self._refresh_metrics
        )

    def _build_parts(self, ctx: WorkerContext, runner: SessionRunner) -> None:
        self.claims = ClaimTable(ctx.settings.concurrency)
        cpu = CpuLoad() if ctx.settings.load_threshold is not None else None
        self.peer_view = PeerView(cpu=cpu)
        self.rooms = RoomCheck(ctx.settings)
        self.outcomes = Outcomes(ctx)
        self.sessions = SessionSupervisor(ctx, self.claims, self.outcomes, runner)
        self.entry_check = EntryCheck(ctx, self.claims, self.outcomes, self.sessions, self.rooms)
        self.crash_watch = CrashWatch(ctx, self.claims, self.entry_check)
        self.heartbeat = Heartbeat(ctx, self.claims, self._presence, self.peer_view)
        self.leases = LeaseKeeper(ctx, self.claims)
        self.control = ControlListener(ctx, self.claims)
        self.intake = Intake(ctx, self.claims, self.peer_view, self.entry_check)
        self.drainer = Drainer(ctx, self.claims, self.heartbeat, self.peer_view)
        self.guards = Guards(ctx, self.claims, self.drainer, self._stop_for)
        self.top = TopPublisher(ctx, self.claims)
        self.reloader: Reloader | None = None
        if ctx.settings.reload:
            if self.config.source_path is None:
                raise ConfigError(
                    f"Agent '{ctx.settings.agent}' was not discovered from a file: "
                    "there is nothing to reload."
                )
            self.reloader = Reloader(self.pool, self.config.source_path.parent, [self])
        self.tenants_watcher: TenantsWatcher | None = None
        if self.tenants_path is not None:
            hidden = runner.hidden_env if isinstance(runner, ProcessRunner) else None
            self.tenants_watcher = TenantsWatcher(
                ctx, self.tenants_path, self._tenants_read, hidden_env=hidden
            )

    @property
    def steps(self) -> list[Step]:
        """The worker's steps, started in this order (the module docstring says what each does)."""
        return [
            self.sessions.run,
            # Subscribed (and watched) before the first read: no entry is ever
            # held by a worker whose crash would go unseen.
            *([self.crash_watch.run] if self.settings.crash_detection else []),
            self.heartbeat.run,
            self.leases.run,
            self.control.run,
            self.intake.run,
            self.guards.run,
            self.top.run,
            *([self.reloader.run] if self.reloader is not None else []),
            *([self.tenants_watcher.run] if self.tenants_watcher is not None else []),
        ]

    # -- public surface ------------------------------------------------------

    @property
    def agent(self) -> str:
        """The agent this worker serves."""
        return self.settings.agent

    async def reload(self, config: AgentConfig) -> None:
        """Serve ``config`` (the agent's reloaded code): new calls run it, and each
        live call moves to it at its next turn boundary (hot reload)."""
        self.config = self.ctx.config = config
        await self.runner.reload(config)
        for claim in self.claims:
            if claim.control is not None:
                claim.control.ask_reload(config)

    @property
    def ready(self) -> anyio.Event:
        """Set once the worker consumes its stream."""
        return self._ready

    @property
    def running(self) -> list[JobMessage]:
        """The jobs whose sessions run now."""
        return self.claims.running

    @property
    def running_jobs(self) -> list[str]:
        """Job ids of the sessions running now."""
        return [m.job_id for m in self.running]

    @property
    def _peers(self) -> dict[str, tuple[int, bool]]:
        # Read by tests (test_spread, test_clock_skew): the peer view's workers.
        return self.peer_view.peers

    @property
    def _overloaded(self) -> bool:
        # Read by tests (test_spread): at or above the CPU threshold.
        return self.peer_view.overloaded

    def request_stop(self) -> None:
        """Drain: stop taking jobs, let running calls finish up to ``drain_timeout``.

        Honoured in every state: a worker still waiting for Redis at start-up
        stops at once.
        """
        self._stop.set()
        if self._startup is not None:
            self._startup.cancel()

    def _stop_for(self, code: int) -> None:
        """Drain and exit with ``code`` (a guard's: over the memory limit)."""
        self.exit_code = code
        self.request_stop()

    def readiness(self) -> str | None:
        """``None`` when taking jobs, else why not (one line, for ``/readyz``)."""
        if self.exit_code:
            return f"draining: over the memory limit (exit code {self.exit_code} follows)"
        if self.ctx.draining or self._stop.is_set():
            return "draining: taking no new jobs"
        if (failing := self.ctx.failures.refusing()) is not None:
            return failing
        state = self.ctx.redis_state
        unreachable = state.state == "unreachable"
        redis = f"Redis unreachable: {state.detail}" if unreachable else ""
        if not self._ready.is_set():
            return f"starting: {redis or 'joining the consumer group'}"
        return redis or None

    async def _refresh_metrics(self) -> None:
        """Set the gauges read at scrape time (no I/O)."""
        m, agent, draining = self.metrics, self.settings.agent, self.ctx.draining
        m.sessions_running.labels(agent).set(len(self.running))
        refusing = draining or self.ctx.failures.refusing() is not None
        m.session_capacity.labels(agent).set(0 if refusing else self.settings.concurrency)
        m.redis_connected.set(self.ctx.redis_state.state == "connected")
        m.draining.set(draining or self._stop.is_set())

    # -- running -------------------------------------------------------------

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
                await self._start_up()
            self._startup = None
            if self._stop.is_set():
                logger.info("stop requested while starting; nothing to drain")
                return
            async with anyio.create_task_group() as tg:
                self.ctx.tg = tg
                for step in self.steps:
                    await tg.start(step)
                self._ready.set()
                task_status.started()
                await self._stop.wait()
                await self.drainer.drain()
                await self.outcomes.observers_done()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await self._shut_down()
            logger.info("worker %s stopped", s.worker_id)

    async def _start_up(self) -> None:
        """Redis reachable and writable, the consumer group there, a first beat and look."""
        ctx, s = self.ctx, self.settings
        await check_redis_access(ctx.redis_client, s.redis_url, logger)
        await self.runner.prepare()
        await ctx.until_redis(self.store.ensure_group, s.agent)
        await check_durability(ctx.redis_client, logger)
        await ctx.until_redis(self.heartbeat.beat)
        await ctx.until_redis(self.heartbeat.refresh_peers)
        await ctx.until_redis(self.heartbeat.measure_redis_clock)

    async def _shut_down(self) -> None:
        ctx = self.ctx

        async def leave_group() -> None:
            # Nothing left pending on it: its consumer need not outlive it, nor
            # be watched. (Calls left by a drain timeout stay watched: peers
            # take them once the subscription is gone.)
            if await self.consumer.leave_group() and self.settings.crash_detection:
                await self.consumer.unwatch()

        await ctx.redis(leave_group, within=math.inf)
        await ctx.redis(self._presence.leave, within=math.inf)
        await self.runner.aclose()
        await self.rooms.aclose()
        if self.store.owns_redis:
            await ctx.redis_client.aclose()


def _tenants_path(settings: WorkerSettings, config: AgentConfig) -> Path | None:
    """The tenants file: ``--tenants``, else the agents directory's ``tenants.toml``."""
    agents_dir = config.source_path.parent if config.source_path is not None else None
    return find_tenants_file(settings.tenants_file, agents_dir)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None  # load_tenants says why, in one line


def _context(
    settings: WorkerSettings,
    config: AgentConfig,
    redis: RedisClient | None,
    clock: Callable[[], float],
) -> WorkerContext:
    """The worker's context: its keys and Redis clients (one connection pool)."""
    store = StreamStore.for_service(
        settings, settings.worker_id, redis=redis, status_ttl=settings.status_ttl
    )
    keys, client = store.keys, store.redis
    return WorkerContext(
        settings=settings,
        config=config,
        keys=keys,
        redis_client=client,
        store=store,
        consumer=JobConsumer(store, settings.agent, settings.worker_id),
        checkpoints=CheckpointStore(
            client, keys, settings.agent, settings.dedup_ttl, signing=settings.signing
        ),
        metrics=WorkerMetrics(settings.agent),
        clock=clock,
        failures=FailureGuard(settings.max_consecutive_failures, settings.failure_cooldown),
    )

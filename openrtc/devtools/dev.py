"""``openrtc dev``: the whole stack on one machine.

Real Redis and LiveKit servers on free loopback ports (:mod:`openrtc.devtools.devstack`),
or the ones ``REDIS_URL`` and ``LIVEKIT_URL`` name, one dispatcher, and one
worker per registered agent, in this process. The
connection settings are written to an env file readable only by you; the API
secret is never printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio

from openrtc.agents.registry import AgentPool
from openrtc.devtools.devstack import (
    LiveKitServer,
    RedisServer,
    find_livekit_binary,
    find_redis_binary,
    free_port,
)
from openrtc.dispatcher.dispatcher import Dispatcher
from openrtc.errors import ConfigError
from openrtc.settings import (
    DEFAULT_NAMESPACE,
    DispatcherSettings,
    Isolation,
    LiveKitSettings,
    WorkerSettings,
    redact_url,
)
from openrtc.worker.reloader import Reloader
from openrtc.worker.worker import Worker

__all__ = ["DevStack", "ExternalRedis", "dev_stack", "write_env_file"]

logger = logging.getLogger("openrtc.dev")


@dataclass(frozen=True)
class ExternalRedis:
    """A Redis that ``openrtc dev`` uses but did not start (``REDIS_URL``)."""

    url: str


@dataclass
class DevStack:
    """The running pieces.

    ``redis`` and ``livekit`` are the servers this stack started, or the
    endpoints it was pointed at (``REDIS_URL``, ``LIVEKIT_URL``): either has
    ``url``, and the LiveKit one ``api_key`` and ``api_secret``.
    """

    redis: RedisServer | ExternalRedis
    livekit: LiveKitServer | LiveKitSettings
    dispatcher: Dispatcher
    workers: list[Worker]
    namespace: str

    @property
    def http_urls(self) -> dict[str, str]:
        """Each service's /healthz, /readyz, /metrics base URL, by service."""
        services: list[tuple[str, Dispatcher | Worker]] = [("dispatcher", self.dispatcher)]
        services += [(f"worker {w.settings.agent}", w) for w in self.workers]
        return {
            name: f"http://127.0.0.1:{service.settings.http_port}"
            for name, service in services
            if service.settings.http_port
        }

    @property
    def credentials(self) -> LiveKitSettings:
        return LiveKitSettings(self.livekit.url, self.livekit.api_key, self.livekit.api_secret)


def write_env_file(path: Path, stack: DevStack) -> None:
    """Write the stack's settings as ``KEY=value`` lines, mode 0600, atomically.

    A new file (``mkstemp`` creates it 0600) replaces whatever was there, so an
    older file's looser mode, or a symlink to somewhere else, never receives
    the secret, and a reader never sees half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(
                f"LIVEKIT_URL={stack.livekit.url}\n"
                f"LIVEKIT_API_KEY={stack.livekit.api_key}\n"
                f"LIVEKIT_API_SECRET={stack.livekit.api_secret}\n"
                f"REDIS_URL={stack.redis.url}\n"
                f"OPENRTC_NAMESPACE={stack.namespace}\n"
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


Progress = Callable[[str], None]

#: How often a server that is still starting is reported.
PROGRESS_EVERY: Final = 5.0


def _ignore(_: str) -> None:
    pass


async def _timed(what: str, step: Callable[[], object], progress: Progress) -> None:
    """Run a blocking start-up ``step`` in a thread, reporting elapsed time until it is done."""
    started = time.monotonic()

    async def tick() -> None:
        while True:
            await anyio.sleep(PROGRESS_EVERY)
            progress(f"{what}: still starting ({time.monotonic() - started:.0f}s)")

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await anyio.to_thread.run_sync(step)
        tg.cancel_scope.cancel()
    progress(f"{what}: ready after {time.monotonic() - started:.1f}s")


async def _check_redis(url: str) -> None:
    from openrtc.store.streams import connect_redis

    client = connect_redis(url)
    try:
        with anyio.fail_after(5):
            await client.ping()
    except Exception as exc:
        raise ConfigError(
            f"Redis at {redact_url(url)} (REDIS_URL) is not reachable: {type(exc).__name__}"
        ) from None
    finally:
        await client.aclose()


def _check_livekit(url: str) -> None:
    http = "http" + url.removeprefix("ws") if url.startswith("ws") else url
    try:
        with urllib.request.urlopen(http, timeout=5) as response:
            response.read()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"LiveKit at {redact_url(url)} (LIVEKIT_URL) is not reachable: {type(exc).__name__}"
        ) from None


async def _redis(
    servers: contextlib.AsyncExitStack, url: str | None, log_dir: Path | None, progress: Progress
) -> RedisServer | ExternalRedis:
    """The Redis at ``url`` once it answers, else one started here (stopped with ``servers``)."""
    if url:
        progress(f"Redis: using {redact_url(url)} (REDIS_URL), starting none")
        await _check_redis(url)
        return ExternalRedis(url)
    # Durable like a deployment (AOF in the server's temporary directory),
    # so the services' start-up check has nothing to warn about.
    server = RedisServer(
        log_path=log_dir / "redis.log" if log_dir else None,
        appendonly=True,
    )
    binary = find_redis_binary()
    progress(f"redis-server: starting {binary} on 127.0.0.1:{server.port}")
    servers.callback(server.close)
    await _timed("redis-server", server.start, progress)
    return server


async def _livekit(
    servers: contextlib.AsyncExitStack,
    livekit: LiveKitSettings | None,
    log_dir: Path | None,
    progress: Progress,
) -> LiveKitServer | LiveKitSettings:
    """The LiveKit ``livekit`` once it answers, else one started here (stopped with ``servers``)."""
    if livekit is not None:
        progress(f"LiveKit: using {redact_url(livekit.url)} (LIVEKIT_URL), starting none")
        await anyio.to_thread.run_sync(_check_livekit, livekit.url)
        return livekit
    server = LiveKitServer(log_path=log_dir / "livekit.log" if log_dir else None)
    binary = find_livekit_binary()
    progress(f"livekit-server: starting {binary} on 127.0.0.1:{server.port}")
    servers.callback(server.close)
    await _timed("livekit-server", server.start, progress)
    return server


def _services(
    pool: AgentPool,
    credentials: LiveKitSettings,
    redis_url: str,
    *,
    namespace: str,
    concurrency: int,
    isolation: Isolation,
    http: bool,
) -> tuple[Dispatcher, list[Worker]]:
    """A dispatcher and a worker per agent, not started yet."""

    def http_port() -> dict[str, Any]:
        return {"http_port": free_port(), "http_host": "127.0.0.1"} if http else {}

    dispatcher = Dispatcher(
        DispatcherSettings(
            livekit=credentials, redis_url=redis_url, namespace=namespace, **http_port()
        ),
        pool,
    )
    workers = [
        Worker(
            WorkerSettings(
                livekit=credentials,
                agent=name,
                redis_url=redis_url,
                namespace=namespace,
                concurrency=concurrency,
                isolation=isolation,
                drain_timeout=5.0,
                **http_port(),
            ),
            pool,
        )
        for name in pool.list_agents()
    ]
    return dispatcher, workers


@asynccontextmanager
async def dev_stack(
    agents_dir: str | Path,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    concurrency: int = 10,
    isolation: Isolation = "coroutine",
    log_dir: Path | None = None,
    livekit: LiveKitSettings | None = None,
    redis_url: str | None = None,
    progress: Progress = _ignore,
    http: bool = True,
    reload: bool = False,
) -> AsyncIterator[DevStack]:
    """Start servers, a dispatcher and a worker per agent; stop them all on exit.

    With ``livekit`` or ``redis_url`` given, that server is used as it is and
    none of its kind is started. ``progress`` receives one line per step
    (what starts, where, and the elapsed time), also while a server is slow
    to come up. ``http``: give each service its own /healthz, /readyz, /metrics
    server on a free loopback port (several workers on one host cannot share
    the services' default ports). ``reload``: hot reload (:mod:`openrtc.worker.reloader`),
    one watcher for all the workers.
    """
    from openrtc.agents.compat import provider_defaults_from_env

    pool = AgentPool.from_directory(agents_dir, **provider_defaults_from_env())
    if len(pool) == 0:
        raise ConfigError("No agents are registered in the pool.")
    if log_dir is not None:
        await anyio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as servers:
        redis = await _redis(servers, redis_url, log_dir, progress)
        lk = await _livekit(servers, livekit, log_dir, progress)
        dispatcher, workers = _services(
            pool,
            LiveKitSettings(lk.url, lk.api_key, lk.api_secret),
            redis.url,
            namespace=namespace,
            concurrency=concurrency,
            isolation=isolation,
            http=http,
        )
        started = time.monotonic()
        progress(f"services: starting a dispatcher and {len(workers)} worker(s)")
        async with anyio.create_task_group() as tg:
            for worker in workers:
                await tg.start(worker.run)
            await tg.start(dispatcher.run)
            with anyio.fail_after(15):
                await dispatcher.registered.wait()
            if reload:
                await tg.start(Reloader(pool, Path(agents_dir), workers).run)
                progress(f"hot reload: on, watching {agents_dir} (--no-reload: off)")
            progress(f"services: ready after {time.monotonic() - started:.1f}s")
            try:
                yield DevStack(redis, lk, dispatcher, workers, namespace)
            finally:
                dispatcher.request_stop()
                for worker in workers:
                    worker.request_stop()

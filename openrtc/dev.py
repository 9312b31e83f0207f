"""``openrtc dev``: the whole stack on one machine.

Real Redis and LiveKit servers on free loopback ports (:mod:`openrtc.devstack`),
one dispatcher, and one worker per registered agent, in this process. The
connection settings are written to an env file readable only by you; the API
secret is never printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from openrtc.agents import AgentPool
from openrtc.devstack import LiveKitServer, RedisServer, free_port
from openrtc.dispatcher import Dispatcher
from openrtc.settings import (
    DEFAULT_NAMESPACE,
    DispatcherSettings,
    Isolation,
    LiveKitSettings,
    WorkerSettings,
)
from openrtc.worker import Worker

__all__ = ["DevStack", "dev_stack", "write_env_file"]

logger = logging.getLogger("openrtc.dev")


@dataclass
class DevStack:
    """The running pieces."""

    redis: RedisServer | None
    livekit: LiveKitServer
    dispatcher: Dispatcher
    workers: list[Worker]
    namespace: str
    #: The Redis the services use: the stack's own server, or ``REDIS_URL``'s.
    redis_url: str = ""

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
                f"REDIS_URL={stack.redis_url}\n"
                f"OPENRTC_NAMESPACE={stack.namespace}\n"
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@asynccontextmanager
async def dev_stack(
    agents_dir: str | Path,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    concurrency: int = 10,
    isolation: Isolation = "coroutine",
    log_dir: Path | None = None,
    http: bool = True,
    redis_url: str | None = None,
) -> AsyncIterator[DevStack]:
    """Start servers, a dispatcher and a worker per agent; stop them all on exit.

    ``redis_url``: use that Redis (a single server, a cluster or a Sentinel
    URL, see :mod:`openrtc.redis_url`) instead of starting one.

    ``http``: give each service its own /healthz, /readyz, /metrics server on
    a free loopback port (several workers on one host cannot share the
    services' default ports).
    """
    pool = AgentPool.from_directory(agents_dir)
    if len(pool) == 0:
        from openrtc.errors import ConfigError

        raise ConfigError("No agents are registered in the pool.")
    if log_dir is not None:
        await anyio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    # Durable like a deployment (AOF in the server's temporary directory), so
    # the services' start-up check has nothing to warn about.
    redis = (
        None
        if redis_url
        else RedisServer(log_path=log_dir / "redis.log" if log_dir else None, appendonly=True)
    )
    livekit = LiveKitServer(log_path=log_dir / "livekit.log" if log_dir else None)
    if redis is not None:
        await anyio.to_thread.run_sync(redis.start)
    url = redis.url if redis is not None else str(redis_url)
    try:
        await anyio.to_thread.run_sync(livekit.start)
        credentials = LiveKitSettings(livekit.url, livekit.api_key, livekit.api_secret)

        def http_port() -> dict[str, Any]:
            return {"http_port": free_port(), "http_host": "127.0.0.1"} if http else {}

        dispatcher = Dispatcher(
            DispatcherSettings(
                livekit=credentials, redis_url=url, namespace=namespace, **http_port()
            ),
            pool,
        )
        workers = [
            Worker(
                WorkerSettings(
                    livekit=credentials,
                    agent=name,
                    redis_url=url,
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
        async with anyio.create_task_group() as tg:
            for worker in workers:
                await tg.start(worker.run)
            await tg.start(dispatcher.run)
            with anyio.fail_after(15):
                await dispatcher.registered.wait()
            try:
                yield DevStack(redis, livekit, dispatcher, workers, namespace, url)
            finally:
                dispatcher.request_stop()
                for worker in workers:
                    worker.request_stop()
    finally:
        livekit.close()
        if redis is not None:
            redis.close()

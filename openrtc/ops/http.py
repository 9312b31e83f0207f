"""Each service's small HTTP server: ``/healthz``, ``/readyz``, ``/metrics``.

- ``GET /healthz``: 200 while the process and its event loop are alive; 503
  when the loop is stalled (or was, when the request came in) for more than
  ``max_lag`` seconds.
- ``GET /readyz``: 200 ``ready``, or 503 with one line saying why not (the
  service's ``readiness()``).
- ``GET /metrics``: the service's own Prometheus registry, in the text format.

How a stalled loop is reported: the handlers run on the service's loop, so
while it is blocked nothing here can answer, and a probe's own timeout is
what reports a loop that never comes back (Kubernetes and Docker count a
timeout as a failure). A stall that ends is reported from the heartbeat: a
task wakes every ``interval``; the lag is how late it woke up, or how long
ago it last ran when it has not run yet. A request that arrived during a
stall is served right after it, when either measure still shows the stall,
so it answers 503; once the loop keeps time again, 200. A watchdog thread
could answer during the stall itself, but it would say "alive" for a process
whose loop (and so every call it serves) is stuck: the one answer a liveness
probe must not give.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final, Protocol

import anyio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from openrtc.errors import ConfigError
from openrtc.store.streams import REDIS_DOWN
from openrtc.supervision import describe, unwrap_group

__all__ = ["LoopHealth", "OpsServer", "ops_server", "serving"]

logger = logging.getLogger("openrtc.http")

#: How often the loop heartbeat wakes up.
HEARTBEAT_INTERVAL: Final = 0.25
#: Longest a scrape waits for the service's Redis reads.
SCRAPE_TIMEOUT: Final = 2.0


class LoopHealth:
    """The event loop's lag, measured by a heartbeat task (see the module docstring)."""

    def __init__(
        self,
        max_lag: float,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        gauge: Gauge | None = None,
    ) -> None:
        self.max_lag = max_lag
        self.interval = interval
        self._gauge = gauge
        self._last_beat = time.monotonic()
        self._last_lag = 0.0

    def lag(self) -> float:
        """The loop's lag now: the last heartbeat's, or the time it is overdue."""
        overdue = time.monotonic() - self._last_beat - self.interval
        return max(self._last_lag, overdue, 0.0)

    def problem(self) -> str | None:
        """Why the loop is not healthy, or ``None``."""
        lag = self.lag()
        if lag > self.max_lag:
            return f"event loop stalled: {lag:.1f}s behind (limit {self.max_lag:g}s)"
        return None

    async def run(self) -> None:
        """Beat forever (cancel to stop)."""
        while True:
            due = time.monotonic() + self.interval
            await anyio.sleep(self.interval)
            now = time.monotonic()
            self._last_lag = max(0.0, now - due)
            self._last_beat = now
            if self._gauge is not None:
                self._gauge.set(self._last_lag)


class OpsServer:
    """One service's health, readiness and metrics endpoints.

    Args:
        host, port: where to listen; port 0 (off) means no server at all, not this class.
        registry: the service's Prometheus registry.
        readiness: ``None`` when ready, else a one-line reason.
        refresh: called before each scrape to set gauges read at scrape time;
            a Redis error or a timeout in it is logged and the scrape goes on.
        loop: the loop-lag heartbeat.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        fallback: bool = False,
        registry: CollectorRegistry,
        readiness: Callable[[], str | None],
        refresh: Callable[[], Awaitable[None]],
        loop: LoopHealth,
    ) -> None:
        self.host = host
        self.port = port
        self._fallback = fallback
        self.loop = loop
        self._registry = registry
        self._readiness = readiness
        self._refresh = refresh
        self._app = web.Application()
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/readyz", self._readyz)
        self._app.router.add_get("/metrics", self._metrics)

    async def _healthz(self, request: web.Request) -> web.Response:
        problem = self.loop.problem()
        if problem is not None:
            return web.Response(status=503, text=problem + "\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = self._readiness() or self.loop.problem()
        if reason is not None:
            return web.Response(status=503, text=reason.splitlines()[0] + "\n")
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            with anyio.fail_after(SCRAPE_TIMEOUT):
                await self._refresh()
        except REDIS_DOWN as exc:
            logger.debug("metrics read from Redis failed: %s", describe(exc))
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Listen (raising :class:`ConfigError` if the port is taken) and beat until exit."""
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            try:
                await site.start()
            except OSError as exc:
                if self._fallback:
                    site = web.TCPSite(runner, self.host, 0)
                    await site.start()
                    taken, self.port = self.port, _bound_port(site)
                    logger.warning(
                        "HTTP port %d is taken (another openrtc service on this host?): "
                        "serving on %d instead; set --http-port (OPENRTC_HTTP_PORT) to choose",
                        taken,
                        self.port,
                    )
                else:
                    raise ConfigError(
                        f"cannot serve HTTP on {self.host}:{self.port} ({exc.strerror or exc}); "
                        "choose another --http-port (OPENRTC_HTTP_PORT), or 0 to turn it off"
                    ) from exc
            logger.info("serving /healthz, /readyz, /metrics on http://%s:%d", self.host, self.port)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.loop.run)
                    try:
                        yield
                    finally:
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The service's own error (a refused Redis password...), not a
                # group around it: the command reports it in one line.
                raise unwrap_group(group) from None
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await runner.cleanup()


class HttpSettings(Protocol):
    """The settings a service's ops server is built from (both services' have them)."""

    @property
    def http_host(self) -> str: ...
    @property
    def http_port(self) -> int: ...
    @property
    def http_port_fallback(self) -> bool: ...
    @property
    def health_max_lag(self) -> float: ...


class ServiceMetrics(Protocol):
    """The part of a service's metrics the ops server serves and feeds."""

    @property
    def registry(self) -> CollectorRegistry: ...
    @property
    def loop_lag(self) -> Gauge: ...


def ops_server(
    settings: HttpSettings,
    metrics: ServiceMetrics,
    *,
    readiness: Callable[[], str | None],
    refresh: Callable[[], Awaitable[None]],
) -> OpsServer | None:
    """A service's ops server as its settings ask; ``None`` when off (``http_port`` 0).

    The one way the dispatcher and the worker build theirs: ``readiness`` and
    ``refresh`` are the service's own (see :class:`OpsServer`).
    """
    if not settings.http_port:
        return None
    return OpsServer(
        settings.http_host,
        settings.http_port,
        fallback=settings.http_port_fallback,
        registry=metrics.registry,
        readiness=readiness,
        refresh=refresh,
        loop=LoopHealth(settings.health_max_lag, gauge=metrics.loop_lag),
    )


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the listening sockets there only
    sockets = getattr(server, "sockets", None) or ()
    for sock in sockets:
        return int(sock.getsockname()[1])
    raise RuntimeError("the HTTP server is listening on no socket")


@asynccontextmanager
async def serving(server: OpsServer | None) -> AsyncIterator[None]:
    """Run ``server`` around a service's body; nothing at all when it is off (``None``)."""
    if server is None:
        yield
        return
    async with server.running():
        yield

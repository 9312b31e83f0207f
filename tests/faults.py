"""Fault injection for tests against the real servers: a LiveKit API that answers slowly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream, SocketAttribute

#: Requests to LiveKit's server API (Twirp); the WebSocket signal is never delayed.
API_REQUEST = b"POST /twirp/"


@dataclass
class SlowApi:
    """A loopback TCP proxy in front of a LiveKit server that delays its API requests.

    Point a worker's LiveKit URL at :attr:`url`: its room checks (API calls)
    wait :attr:`delay` seconds, its sessions' signalling passes at once, and
    media goes to the server's own RTC ports as before.
    """

    port: int
    delay: float
    api_requests: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@asynccontextmanager
async def slow_api(target_port: int, delay: float) -> AsyncIterator[SlowApi]:
    """Run a :class:`SlowApi` proxy to ``127.0.0.1:target_port`` until exit."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy = SlowApi(listener.extra(SocketAttribute.local_port), delay)

    async def pump(source: ByteStream, sink: ByteStream, *, upstream: bool) -> None:
        try:
            async for chunk in source:
                if upstream and chunk.startswith(API_REQUEST):
                    proxy.api_requests += 1
                    await anyio.sleep(proxy.delay)
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def handle(client: ByteStream) -> None:
        async with client:
            try:
                server = await anyio.connect_tcp("127.0.0.1", target_port)
            except OSError:
                return
            async with server, anyio.create_task_group() as tg:

                async def both(source: ByteStream, sink: ByteStream, *, upstream: bool) -> None:
                    await pump(source, sink, upstream=upstream)
                    tg.cancel_scope.cancel()  # one side closed: the connection is over

                tg.start_soon(lambda: both(client, server, upstream=True))
                tg.start_soon(lambda: both(server, client, upstream=False))

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()

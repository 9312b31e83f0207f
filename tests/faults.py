"""Fault injection for tests against the real servers: loopback proxies that delay.

- :func:`slow_api` sits in front of a LiveKit server and holds back its server
  API's requests (room checks), while the WebSocket signal passes at once.
- :func:`slow_replies` sits in front of Redis and holds back its replies: a
  command runs on time and its answer arrives late (a lost reply, as a
  client that times out sees it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream, SocketAttribute

#: Requests to LiveKit's server API (Twirp); the WebSocket signal is never delayed.
API_REQUEST = b"POST /twirp/"


@dataclass
class DelayProxy:
    """A loopback TCP proxy; its delays can be changed while it runs.

    ``request_delay`` holds back client chunks that start with
    ``request_prefix`` (counted in ``requests_delayed``); ``reply_delay``
    holds back every chunk from the server.
    """

    port: int
    request_prefix: bytes = b""
    request_delay: float = 0.0
    reply_delay: float = 0.0
    requests_delayed: int = 0

    @property
    def url(self) -> str:
        """A LiveKit URL through the proxy."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        """A Redis URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"


@asynccontextmanager
async def delay_proxy(target_port: int, **knobs: object) -> AsyncIterator[DelayProxy]:
    """Run a :class:`DelayProxy` to ``127.0.0.1:target_port`` until exit."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy = DelayProxy(listener.extra(SocketAttribute.local_port), **knobs)  # type: ignore[arg-type]

    async def pump(source: ByteStream, sink: ByteStream, *, upstream: bool) -> None:
        try:
            async for chunk in source:
                if upstream:
                    if proxy.request_delay and chunk.startswith(proxy.request_prefix):
                        proxy.requests_delayed += 1
                        await anyio.sleep(proxy.request_delay)
                elif proxy.reply_delay:
                    await anyio.sleep(proxy.reply_delay)
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


@asynccontextmanager
async def slow_api(livekit_port: int, delay: float) -> AsyncIterator[DelayProxy]:
    """A LiveKit server whose API requests wait ``delay`` s (signal and media do not)."""
    async with delay_proxy(livekit_port, request_prefix=API_REQUEST, request_delay=delay) as p:
        yield p


@asynccontextmanager
async def slow_replies(redis_port: int) -> AsyncIterator[DelayProxy]:
    """A Redis whose replies can be held back (set ``reply_delay``)."""
    async with delay_proxy(redis_port) as proxy:
        yield proxy

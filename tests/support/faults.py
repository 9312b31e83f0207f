"""Fault injection for tests against the real servers (proxies: :mod:`openrtc.devtools.devstack`).

- :func:`slow_api` sits in front of a LiveKit server and holds back its server
  API's requests (room checks), while the WebSocket signal passes at once.
- :func:`slow_replies` sits in front of Redis and holds back its replies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from openrtc.devtools.devstack import API_REQUEST, DelayProxy, delay_proxy


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

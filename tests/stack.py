"""Helpers shared by the tests that run real services: rooms, a dispatcher, workers."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from livekit import api

from openrtc.agents import AgentPool
from openrtc.devstack import LiveKitServer
from openrtc.dispatcher import Dispatcher
from openrtc.settings import DispatcherSettings, LiveKitSettings, WorkerSettings
from openrtc.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_AGENTS = ROOT / "examples" / "offline_agents"


def unique(prefix: str) -> str:
    """A name no other test uses (namespaces, rooms)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def creds(livekit: LiveKitServer) -> LiveKitSettings:
    return LiveKitSettings(livekit.url, livekit.api_key, livekit.api_secret)


async def new_room(livekit: LiveKitServer, name: str, metadata: str = "") -> api.Room:
    """A room on the real server; its ``sid`` is what a job's room snapshot carries."""
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        return await lk.room.create_room(api.CreateRoomRequest(name=name, metadata=metadata))


async def delete_room(livekit: LiveKitServer, name: str) -> None:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        await lk.room.delete_room(api.DeleteRoomRequest(room=name))


async def live_rooms(livekit: LiveKitServer, name: str) -> list[api.Room]:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        reply = await lk.room.list_rooms(api.ListRoomsRequest(names=[name]))
    return list(reply.rooms)


@asynccontextmanager
async def dispatching(settings: DispatcherSettings) -> AsyncIterator[Dispatcher]:
    """A dispatcher for the offline agents, registered, until exit."""
    dispatcher = Dispatcher(settings, AgentPool.from_directory(OFFLINE_AGENTS))
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        with anyio.fail_after(10):
            await dispatcher.registered.wait()
        try:
            yield dispatcher
        finally:
            dispatcher.request_stop()


def dispatcher_settings(
    livekit: LiveKitServer, redis_url: str, namespace: str, **overrides: Any
) -> DispatcherSettings:
    options: dict[str, Any] = {
        "heartbeat_interval": 0.2,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        **overrides,
    }
    return DispatcherSettings(
        livekit=creds(livekit), redis_url=redis_url, namespace=namespace, **options
    )


@asynccontextmanager
async def working(
    livekit: LiveKitServer,
    redis_url: str,
    ns: str,
    agent: str,
    *,
    pool: AgentPool | None = None,
    via: LiveKitSettings | None = None,
    clock: Callable[[], float] = time.time,
    **overrides: Any,
) -> AsyncIterator[Worker]:
    """A worker serving ``agent`` (from ``pool``, default the offline agents) until exit.

    ``via``: the LiveKit URL and keys the worker uses, when not ``livekit``'s
    own (a fault-injecting proxy in front of it).
    """
    settings = WorkerSettings(
        livekit=via or creds(livekit),
        agent=agent,
        redis_url=redis_url,
        namespace=ns,
        **{"heartbeat_interval": 0.2, "drain_timeout": 5.0, **overrides},
    )
    worker = Worker(settings, pool or AgentPool.from_directory(OFFLINE_AGENTS), clock=clock)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(60):
            await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.request_stop()

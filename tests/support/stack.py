"""Helpers shared by the tests that run real services: rooms, a dispatcher, workers."""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from livekit import api
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.devstack import LiveKitServer
from openrtc.dispatcher.dispatcher import Dispatcher
from openrtc.session.runners import SessionRunner
from openrtc.session.session import SessionControl, SessionOutcome
from openrtc.settings import DispatcherSettings, LiveKitSettings, WorkerSettings
from openrtc.wire.messages import JobMessage
from openrtc.worker.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_AGENTS = ROOT / "examples" / "offline_agents"


def unique(prefix: str) -> str:
    """A name no other test uses (namespaces, rooms)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def eventually(
    check: Callable[[], Any | Awaitable[Any]],
    what: str = "",
    *,
    within: float = 10.0,
    interval: float = 0.05,
) -> Any:
    """Poll ``check`` (plain or async) until it returns something true, and return that.

    The one polling helper of the suite: a generous deadline, never a hang,
    and a failure that says what was awaited (``what``, else the check's name).
    """
    try:
        with anyio.fail_after(within):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await anyio.sleep(interval)
    except TimeoutError:
        name = what or getattr(check, "__name__", "the condition")
        raise AssertionError(f"timed out after {within:g}s waiting for {name}") from None


def creds(livekit: LiveKitServer) -> LiveKitSettings:
    return LiveKitSettings(livekit.url, livekit.api_key, livekit.api_secret)


async def new_room(livekit: LiveKitServer, name: str, metadata: str = "") -> api.Room:
    """A room on the real server; its ``sid`` is what a job's room snapshot carries."""
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        return await lk.room.create_room(api.CreateRoomRequest(name=name, metadata=metadata))


async def delete_room(livekit: LiveKitServer, name: str) -> None:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        await lk.room.delete_room(api.DeleteRoomRequest(room=name))


async def agents_in(lk: api.LiveKitAPI, room: str) -> list[str]:
    """The identities of the agent participants (kind AGENT) LiveKit lists in ``room``."""
    reply = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
    return [p.identity for p in reply.participants if p.kind == api.ParticipantInfo.Kind.AGENT]


async def live_rooms(livekit: LiveKitServer, name: str) -> list[api.Room]:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        reply = await lk.room.list_rooms(api.ListRoomsRequest(names=[name]))
    return list(reply.rooms)


@asynccontextmanager
async def dispatching(
    settings: DispatcherSettings, pool: AgentPool | None = None, *, redis: Redis | None = None
) -> AsyncIterator[Dispatcher]:
    """A registered dispatcher for ``pool`` (default: the offline agents) until exit.

    On exit it is asked to stop and must return by itself within 10 s (its
    drain bound): a dispatcher that does not stop fails the test.
    """
    dispatcher = Dispatcher(settings, pool or AgentPool.from_directory(OFFLINE_AGENTS), redis=redis)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(dispatcher.run)
            await dispatcher.registered.wait()
        try:
            yield dispatcher
        finally:
            dispatcher.request_stop()
            tg.cancel_scope.deadline = anyio.current_time() + 10
    if tg.cancel_scope.cancelled_caught:
        raise AssertionError("the dispatcher did not stop within 10 s of request_stop()")


def dispatcher_settings(
    livekit: LiveKitServer | LiveKitSettings,
    redis_url: str,
    namespace: str | None = None,
    **overrides: Any,
) -> DispatcherSettings:
    """The suite's one dispatcher settings builder: fast heartbeats and reconnects.

    ``livekit``: the real server, or the URL and keys of a stand-in or proxy;
    ``namespace``: a fresh one unless given.
    """
    options: dict[str, Any] = {
        "heartbeat_interval": 0.2,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        **overrides,
    }
    return DispatcherSettings(
        livekit=livekit if isinstance(livekit, LiveKitSettings) else creds(livekit),
        redis_url=redis_url,
        namespace=namespace or unique("ns"),
        **options,
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
    runner: SessionRunner | None = None,
    **overrides: Any,
) -> AsyncIterator[Worker]:
    """A worker serving ``agent`` (from ``pool``, default the offline agents) until exit.

    ``via``: the LiveKit URL and keys the worker uses, when not ``livekit``'s
    own (a fault-injecting proxy in front of it); ``runner``: how sessions
    run, when not as the worker's settings say.
    """
    settings = WorkerSettings(
        livekit=via or creds(livekit),
        agent=agent,
        redis_url=redis_url,
        namespace=ns,
        **{"heartbeat_interval": 0.2, "drain_timeout": 5.0, **overrides},
    )
    worker = Worker(
        settings, pool or AgentPool.from_directory(OFFLINE_AGENTS), clock=clock, runner=runner
    )
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(90):
            await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.request_stop()


class HoldingRunner:
    """A session runner that joins no room and holds each call until told to end it.

    For tests of who reads which job: thirty real agent sessions in one test
    process on a two-core machine made the rtc library time out.
    """

    def __init__(self) -> None:
        self.controls: list[SessionControl] = []

    async def prepare(self) -> None:
        return None

    async def maintain(self) -> None:
        return None

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome:
        self.controls.append(control)
        control.joined.set()
        await control.wait_stop()
        return SessionOutcome("success", control.stop_reason)

    async def aclose(self) -> None:
        return None

    def end_all(self) -> None:
        for control in self.controls:
            control.stop("test over")

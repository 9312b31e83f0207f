"""What the dispatcher's parts share: one :class:`DispatcherContext`, and the handler tasks.

Each mutable attribute has one writer, named beside it (Redis's health
excepted: every part that meets a failure says so); every other part only
reads it. The parts are in :mod:`openrtc.dispatcher.dispatcher`'s list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup, TaskStatus
from livekit.protocol import agent as proto

from openrtc.agents.routing import RoutingTable
from openrtc.dispatcher.admission import AdmissionPolicy
from openrtc.dispatcher.enqueuer import InFlight
from openrtc.dispatcher.ledger import JobLedger
from openrtc.dispatcher.livekit_protocol import AgentSocket, SocketClosed
from openrtc.ops.metrics import DispatcherMetrics
from openrtc.settings import DispatcherSettings
from openrtc.store.membership import LoadView
from openrtc.store.streams import RedisClient, StreamStore
from openrtc.supervision import StateLog
from openrtc.wire.keys import Keys

__all__ = ["DispatcherContext", "Handlers", "fail_job", "logger", "send_quietly"]

#: Every part logs as the dispatcher did when it was one class.
logger: Final = logging.getLogger("openrtc.dispatcher")


class Handlers:
    """The short tasks the parts start per job (a dead letter, a failure, a termination).

    They run in a task group of the dispatcher's, not a connection's: an
    enqueue under way when the socket drops still completes, and the caller
    is still served. Each counts in ``inflight`` until it ends, so a drain
    waits for it.
    """

    def __init__(self, inflight: InFlight) -> None:
        self._inflight = inflight
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the handlers' task group open until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    def start(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` as a handler; its exception is logged, never raised."""
        assert self._tg is not None
        self._inflight.add()
        self._tg.start_soon(self._tracked, func, *args)

    async def _tracked(self, func: Callable[..., Any], *args: Any) -> None:
        try:
            await func(*args)
        except Exception:
            logger.exception("handler %s failed", getattr(func, "__name__", func))
        finally:
            self._inflight.done()


@dataclass(slots=True)
class DispatcherContext:
    """The state the dispatcher's parts share (see the module docstring)."""

    settings: DispatcherSettings
    keys: Keys
    table: RoutingTable
    policy: AdmissionPolicy
    clock: Callable[[], float]
    store: StreamStore
    metrics: DispatcherMetrics
    #: Agents' loads and Redis's health; refreshed by the membership keeper
    #: (``redis_ok`` also cleared by the assignment desk when a write fails).
    view: LoadView
    #: The jobs this dispatcher knows, by state (moved by the desks and the relay).
    jobs: JobLedger = field(default_factory=JobLedger)
    #: What a drain waits for: jobs on their way to Redis, handler tasks.
    inflight: InFlight = field(default_factory=InFlight)
    #: The LiveKit connection's state, logged on change. Writer: the LiveKit link.
    livekit_state: StateLog = field(default_factory=lambda: StateLog("LiveKit connection", logger))
    #: Redis's state, logged on change: "connected" by the membership keeper;
    #: "unreachable" by whichever part meets the failure (keeper, relay, assignment desk).
    redis_state: StateLog = field(default_factory=lambda: StateLog("Redis", logger))
    #: The registered socket, ``None`` between connections. Writer: the LiveKit link.
    socket: AgentSocket | None = None
    #: True once a stop was requested. Writer: :meth:`Dispatcher._drain`.
    draining: bool = False
    handlers: Handlers = field(init=False)

    def __post_init__(self) -> None:
        self.handlers = Handlers(self.inflight)

    @property
    def redis(self) -> RedisClient:
        """The store's client."""
        return self.store.redis

    def is_draining(self) -> bool:
        """:attr:`draining`, as a call: type narrowing does not assume it stays put
        across an await."""
        return self.draining


async def send_quietly(socket: AgentSocket, message: proto.WorkerMessage) -> None:
    """Send ``message``; a closed socket is not an error here (its receive loop notices)."""
    try:
        await socket.send(message)
    except SocketClosed:
        logger.debug("socket closed before %s could be sent", message.WhichOneof("message"))


async def fail_job(socket: AgentSocket, job_id: str, error: str) -> None:
    """Tell LiveKit the job failed with ``error`` (so it is offered to nobody else)."""
    await send_quietly(
        socket,
        proto.WorkerMessage(
            update_job=proto.UpdateJobStatus(
                job_id=job_id, status=proto.JobStatus.JS_FAILED, error=error
            )
        ),
    )

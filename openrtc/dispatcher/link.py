"""The LiveKit link: one registered ``/agent`` socket, kept open.

It registers with LiveKit (:func:`~openrtc.dispatcher.livekit_protocol.open_agent_socket`),
reconnects with capped, jittered exponential backoff, reports the load every
``load_interval``, and hands what the server sends to the desks: an offer to
the availability desk (answered at once), an assignment to the assignment
desk, a termination to the status relay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
import anyio
from anyio.abc import TaskStatus
from livekit.protocol import agent as proto

from openrtc.dispatcher.context import DispatcherContext, logger, send_quietly
from openrtc.dispatcher.livekit_protocol import (
    AgentSocket,
    ProtocolError,
    SocketClosed,
    open_agent_socket,
)
from openrtc.ops.logs import log_context
from openrtc.supervision import backoff_delay, describe, unwrap_group

__all__ = ["LiveKitLink"]

_CONNECTION_ERRORS: Final = (
    SocketClosed,
    ProtocolError,
    OSError,
    aiohttp.ClientError,
    TimeoutError,
)
#: A connection that lasted this long (seconds) starts the backoff over.
_STABLE_AFTER: Final = 30


class LiveKitLink:
    """The agent-worker socket (see the module docstring).

    Args:
        ctx: the dispatcher's shared state (this link writes ``ctx.socket``).
        answer: the availability desk's answer to an offer (no I/O).
        assign: the assignment desk's intake (no await).
        terminate: the status relay's termination handler (run as a handler task).
    """

    def __init__(
        self,
        ctx: DispatcherContext,
        answer: Callable[[proto.AvailabilityRequest], proto.WorkerMessage],
        assign: Callable[[AgentSocket, proto.JobAssignment], None],
        terminate: Callable[[str], Awaitable[None]],
    ) -> None:
        self._ctx = ctx
        self._answer = answer
        self._assign = assign
        self._terminate = terminate
        #: Set once the first registration with LiveKit succeeded.
        self.registered = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Stay registered until the dispatcher drains (or cancellation)."""
        ctx = self._ctx
        attempt = 0
        async with aiohttp.ClientSession() as http:
            task_status.started()
            while not ctx.is_draining():
                connected_at = await self._connect_once(http)
                if ctx.is_draining():
                    break
                if connected_at is not None and time.monotonic() - connected_at > _STABLE_AFTER:
                    attempt = 0
                delay = backoff_delay(
                    attempt, ctx.settings.reconnect_initial, ctx.settings.reconnect_max
                )
                attempt += 1
                ctx.metrics.livekit_reconnects.inc()
                logger.debug("reconnecting to LiveKit in %.2fs (attempt %d)", delay, attempt)
                await anyio.sleep(delay)

    async def _connect_once(self, http: aiohttp.ClientSession) -> float | None:
        """Register and serve one socket until it ends; when it connected (monotonic)."""
        ctx = self._ctx
        connected_at = None
        try:
            async with open_agent_socket(
                http, ctx.settings.livekit, agent_name=ctx.settings.agent_name
            ) as socket:
                connected_at = time.monotonic()
                ctx.socket = socket
                ctx.livekit_state.set(
                    "registered", f"worker id {socket.worker_id} at {ctx.settings.livekit.url}"
                )
                self.registered.set()
                await self._serve(socket)
        except _CONNECTION_ERRORS as exc:
            if not ctx.is_draining():
                ctx.livekit_state.set("lost", describe(exc), level=logging.WARNING)
        finally:
            ctx.socket = None
            forgotten = ctx.jobs.socket_dropped()
            if forgotten is not None:
                logger.info(
                    "LiveKit forgets the %d jobs of a dropped socket; running calls go on",
                    forgotten,
                )
        return connected_at

    async def _serve(self, socket: AgentSocket) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report_load, socket)
                await self._receive(socket)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    async def _receive(self, socket: AgentSocket) -> None:
        async for message in socket.messages():
            kind = message.WhichOneof("message")
            if kind == "availability":
                # Quietly: when the socket has just died, the frames already
                # received behind this one (assignments among them) are still
                # handled; the iterator ends with SocketClosed after them.
                await send_quietly(socket, self._answer(message.availability))
            elif kind == "assignment":
                self._assign(socket, message.assignment)
            elif kind == "termination":
                with log_context(job_id=message.termination.job_id):
                    self._ctx.handlers.start(self._terminate, message.termination.job_id)
            elif kind in ("pong", "register"):
                continue
            elif kind == "go_away":
                # The server is going down: re-register (with backoff) rather
                # than wait for the socket to be cut.
                raise SocketClosed("server sent go_away")
            else:
                logger.warning("ignoring unexpected server message %r", kind)

    async def _report_load(self, socket: AgentSocket) -> None:
        ctx = self._ctx
        while True:
            # Quietly: a dead socket is noticed by the receive loop, which
            # first handles what was already received.
            await send_quietly(socket, self._status(ctx.policy.reported_load(ctx.view.loads)))
            await anyio.sleep(ctx.settings.load_interval)

    def _status(self, load: float) -> proto.WorkerMessage:
        draining = self._ctx.draining
        return proto.WorkerMessage(
            update_worker=proto.UpdateWorkerStatus(
                status=proto.WorkerStatus.WS_FULL if draining else proto.WorkerStatus.WS_AVAILABLE,
                load=load,
                job_count=self._ctx.jobs.held_count,
                draining=draining,
            )
        )

    async def close(self) -> None:
        """Tell LiveKit this dispatcher is full and draining; close the socket once
        ``inflight`` work is done (or the enqueue timeout passed)."""
        ctx = self._ctx
        socket = ctx.socket
        if socket is not None:
            await send_quietly(
                socket,
                proto.WorkerMessage(
                    update_worker=proto.UpdateWorkerStatus(
                        status=proto.WorkerStatus.WS_FULL,
                        draining=True,
                        job_count=ctx.jobs.held_count,
                    )
                ),
            )
        with anyio.move_on_after(ctx.settings.enqueue_timeout + 1):
            await ctx.inflight.wait_idle()
        if socket is not None:
            await socket.close()

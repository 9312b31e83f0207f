"""The LiveKit agent-worker protocol: one registered ``/agent`` WebSocket.

livekit-agents' own ``Worker`` couples this socket to its process pool, with
no seam to hand an assigned job to somebody else, so the client is written
here, on livekit-agents' protocol types (``livekit.protocol.agent``) and the
aiohttp client it already depends on. Everything that touches the socket is in
this module; reconnection policy lives with the caller (the dispatcher).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import aiohttp
import anyio
from livekit import api
from livekit.protocol import agent, models

from openrtc import __version__
from openrtc.settings import LiveKitSettings

__all__ = ["AgentSocket", "ProtocolError", "SocketClosed", "open_agent_socket"]

logger = logging.getLogger("openrtc.livekit")

#: WebSocket-level ping period; a dead peer is noticed within about this long.
HEARTBEAT_SECONDS: Final = 10.0
#: What LiveKit records as our SDK version (visible in its logs).
WORKER_VERSION: Final = f"openrtc-dispatch/{__version__}"


class ProtocolError(Exception):
    """The server broke the protocol (e.g. no register response)."""


class SocketClosed(Exception):
    """The WebSocket closed; the caller reconnects."""


@dataclass(frozen=True, slots=True)
class Registration:
    """What the server said when it accepted our registration."""

    worker_id: str
    server_version: str
    region: str


class AgentSocket:
    """A registered agent-worker connection. Sends are serialized by a lock."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, registration: Registration) -> None:
        self._ws = ws
        self._send_lock = anyio.Lock(fast_acquire=True)
        self.registration = registration

    @property
    def worker_id(self) -> str:
        """The id LiveKit gave this registration (changes on every reconnect)."""
        return self.registration.worker_id

    async def send(self, message: agent.WorkerMessage) -> None:
        """Send one message; raises :class:`SocketClosed` if the socket is gone."""
        payload = message.SerializeToString()
        async with self._send_lock:
            if self._ws.closed:
                raise SocketClosed("socket closed")
            try:
                await self._ws.send_bytes(payload)
            except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
                raise SocketClosed(f"send failed: {exc}") from exc

    async def messages(self) -> AsyncIterator[agent.ServerMessage]:
        """Server messages until the socket closes (then :class:`SocketClosed`).

        Frames that are not binary or do not parse are logged and skipped: a
        confused server must not take the dispatcher down.
        """
        while True:
            frame = await self._ws.receive()
            if frame.type == aiohttp.WSMsgType.BINARY:
                message = agent.ServerMessage()
                try:
                    message.ParseFromString(frame.data)
                except Exception as exc:  # protobuf raises DecodeError, or worse on garbage
                    logger.warning("ignoring unparsable frame (%d bytes): %s", len(frame.data), exc)
                    continue
                yield message
            elif frame.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                code = self._ws.close_code
                raise SocketClosed(f"socket closed by server (code {code})")
            else:
                logger.warning("ignoring unexpected %s frame", frame.type.name)

    async def close(self) -> None:
        """Close the socket: LiveKit unregisters this worker."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await self._ws.close()


def agent_url(base_url: str) -> str:
    """``<LIVEKIT_URL>/agent`` with a WebSocket scheme."""
    url = base_url.rstrip("/")
    if url.startswith("http"):
        url = "ws" + url[4:]
    return f"{url}/agent"


@asynccontextmanager
async def open_agent_socket(
    session: aiohttp.ClientSession,
    settings: LiveKitSettings,
    *,
    agent_name: str = "",
    namespace: str = "",
    register_timeout: float = 10.0,
) -> AsyncIterator[AgentSocket]:
    """Connect to ``/agent``, register as a room-job worker, and yield the socket.

    Raises:
        aiohttp.ClientError / OSError: the server cannot be reached.
        ProtocolError: the server answered something other than a registration.
        TimeoutError: no registration within ``register_timeout`` seconds.
    """
    token = api.AccessToken(settings.api_key, settings.api_secret).with_grants(
        api.VideoGrants(agent=True)
    )
    headers = {"Authorization": f"Bearer {token.to_jwt()}"}
    with anyio.fail_after(register_timeout):
        ws = await session.ws_connect(
            agent_url(settings.url), headers=headers, heartbeat=HEARTBEAT_SECONDS, autoping=True
        )
    try:
        request = agent.WorkerMessage()
        register = request.register
        register.type = agent.JobType.JT_ROOM
        register.agent_name = agent_name
        register.namespace = namespace
        register.version = WORKER_VERSION
        register.allowed_permissions.CopyFrom(
            models.ParticipantPermission(
                can_publish=True,
                can_subscribe=True,
                can_publish_data=True,
                can_update_metadata=True,
                agent=True,
            )
        )
        with anyio.fail_after(register_timeout):
            await ws.send_bytes(request.SerializeToString())
            frame = await ws.receive()
        if frame.type != aiohttp.WSMsgType.BINARY:
            raise ProtocolError(f"expected a register response, got a {frame.type.name} frame")
        response = agent.ServerMessage()
        response.ParseFromString(frame.data)
        if response.WhichOneof("message") != "register":
            raise ProtocolError(
                f"expected a register response, got {response.WhichOneof('message')!r}"
            )
        registration = Registration(
            worker_id=response.register.worker_id,
            server_version=response.register.server_info.version,
            region=response.register.server_info.region,
        )
        socket = AgentSocket(ws, registration)
        yield socket
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await ws.close()

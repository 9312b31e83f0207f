"""A protocol-level stand-in for LiveKit's ``/agent`` endpoint, for fault injection.

Development tooling, not used by the services: the tests' dispatcher fault
injection and ``bench/dispatch.py`` (which may not import ``tests``) both drive it.

It speaks the real protobuf messages over a real WebSocket, so the dispatcher
runs unmodified against it; what it adds is control the real server does not
give on demand: answer deadlines we choose, sockets dropped mid-flow, restarts,
malformed frames, floods. It never replaces the real-server tests.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web
from livekit.protocol import agent as proto
from livekit.protocol import models

from openrtc.wire.messages import agent_identity

_ids = itertools.count(1)


def make_job(
    room: str, *, metadata: str = "", room_metadata: str = "", job_id: str | None = None
) -> proto.Job:
    """A job shaped like the real server's (room snapshot with a TURN password)."""
    n = next(_ids)
    return proto.Job(
        id=job_id or f"AJ_standin{n:08d}",
        dispatch_id=f"AD_standin{n:08d}",
        type=proto.JobType.JT_ROOM,
        metadata=metadata,
        room=models.Room(
            sid=f"RM_standin{n:08d}", name=room, metadata=room_metadata, turn_password="s3cret-turn"
        ),
    )


@dataclass
class WorkerConn:
    """One registered worker (a dispatcher) as the stand-in sees it."""

    worker_id: str
    agent_name: str
    ws: web.WebSocketResponse
    availability: dict[str, asyncio.Future[proto.AvailabilityResponse]] = field(
        default_factory=dict
    )
    job_updates: list[proto.UpdateJobStatus] = field(default_factory=list)
    worker_updates: list[proto.UpdateWorkerStatus] = field(default_factory=list)
    late_answers: list[str] = field(default_factory=list)
    #: Job ids whose assignment frame was written to this socket.
    assigned: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class StandIn:
    """The stand-in server. Use :func:`running_standin` to start one."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.workers: list[WorkerConn] = []
        self.registered = asyncio.Event()
        self.frames_received = 0
        #: The bearer tokens workers presented, in connection order.
        self.tokens: list[str] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/agent", self._agent)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop like a crashed server: every socket is cut."""
        for worker in list(self.workers):
            self.drop(worker)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.workers.clear()
        self.registered = asyncio.Event()

    async def restart(self, downtime: float = 0.0) -> None:
        await self.stop()
        await asyncio.sleep(downtime)
        await self.start()

    # -- the endpoint ---------------------------------------------------------

    async def _agent(self, request: web.Request) -> web.WebSocketResponse:
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            raise web.HTTPUnauthorized()
        self.tokens.append(authorization.removeprefix("Bearer "))
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        worker = await self._register(ws)
        if worker is None:
            return ws
        self.workers.append(worker)
        self.registered.set()
        try:
            async for frame in ws:
                if frame.type != WSMsgType.BINARY:
                    continue
                self.frames_received += 1
                incoming = proto.WorkerMessage()
                incoming.ParseFromString(frame.data)
                await self._receive(worker, incoming)
        finally:
            worker.closed.set()
            if worker in self.workers:
                self.workers.remove(worker)
        return ws

    async def _register(self, ws: web.WebSocketResponse) -> WorkerConn | None:
        """Answer the socket's first message, a registration (else close it: ``None``)."""
        first = await ws.receive()
        if first.type != WSMsgType.BINARY:
            await ws.close()
            return None
        message = proto.WorkerMessage()
        message.ParseFromString(first.data)
        if message.WhichOneof("message") != "register":
            await ws.close()
            return None
        worker = WorkerConn(
            worker_id=f"AW_standin{next(_ids):06d}",
            agent_name=message.register.agent_name,
            ws=ws,
        )
        await ws.send_bytes(
            proto.ServerMessage(
                register=proto.RegisterWorkerResponse(
                    worker_id=worker.worker_id,
                    server_info=models.ServerInfo(version="standin"),
                )
            ).SerializeToString()
        )
        return worker

    async def _receive(self, worker: WorkerConn, incoming: proto.WorkerMessage) -> None:
        """Record a registered worker's message (answer it, for a ping)."""
        kind = incoming.WhichOneof("message")
        if kind == "availability":
            answer = incoming.availability
            future = worker.availability.pop(answer.job_id, None)
            if future is None or future.done():
                worker.late_answers.append(answer.job_id)
            else:
                future.set_result(answer)
        elif kind == "update_job":
            worker.job_updates.append(incoming.update_job)
        elif kind == "update_worker":
            worker.worker_updates.append(incoming.update_worker)
        elif kind == "ping":
            await worker.ws.send_bytes(
                proto.ServerMessage(
                    pong=proto.WorkerPong(
                        last_timestamp=incoming.ping.timestamp,
                        timestamp=int(time.time() * 1000),
                    )
                ).SerializeToString()
            )

    # -- driving it -------------------------------------------------------------

    async def wait_registered(self, count: int = 1, within: float = 10.0) -> list[WorkerConn]:
        deadline = time.monotonic() + within
        while len(self.workers) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.workers)} of {count} workers registered")
            await asyncio.sleep(0.01)
        return list(self.workers)

    async def offer(
        self,
        job: proto.Job,
        worker: WorkerConn | None = None,
        *,
        deadline: float = 3.0,
        assign: bool = True,
    ) -> proto.AvailabilityResponse | None:
        """Offer ``job`` as the server does: availability, then (if accepted) assignment.

        Returns the answer, or ``None`` when none came within ``deadline``
        (the real server's psrpc timeout is 3 s).
        """
        worker = worker or self.workers[0]
        future: asyncio.Future[proto.AvailabilityResponse] = (
            asyncio.get_running_loop().create_future()
        )
        worker.availability[job.id] = future
        await worker.ws.send_bytes(
            proto.ServerMessage(availability=proto.AvailabilityRequest(job=job)).SerializeToString()
        )
        try:
            answer = await asyncio.wait_for(future, deadline)
        except TimeoutError:
            worker.availability.pop(job.id, None)
            return None
        if assign and answer.available and not answer.terminate:
            await self.assign(job, worker, identity=answer.participant_identity)
        return answer

    async def assign(
        self, job: proto.Job, worker: WorkerConn | None = None, *, identity: str = ""
    ) -> None:
        """Send ``job``'s assignment (after an accept, or unsolicited) as the server does."""
        worker = worker or self.workers[0]
        assigned = proto.Job()
        assigned.CopyFrom(job)
        assigned.state.status = proto.JobStatus.JS_RUNNING
        assigned.state.participant_identity = identity or agent_identity(job.id)
        assigned.state.worker_id = worker.worker_id
        await worker.ws.send_bytes(
            proto.ServerMessage(
                assignment=proto.JobAssignment(job=assigned, token="standin.jwt.token")
            ).SerializeToString()
        )
        worker.assigned.append(job.id)

    async def terminate(self, job_id: str, worker: WorkerConn | None = None) -> None:
        worker = worker or self.workers[0]
        await worker.ws.send_bytes(
            proto.ServerMessage(termination=proto.JobTermination(job_id=job_id)).SerializeToString()
        )

    async def send_raw(self, data: bytes | str, worker: WorkerConn | None = None) -> None:
        worker = worker or self.workers[0]
        if isinstance(data, str):
            await worker.ws.send_str(data)
        else:
            await worker.ws.send_bytes(data)

    def drop(self, worker: WorkerConn | None = None) -> None:
        """Cut a socket without a close handshake (as a crashed server or network does)."""
        worker = worker or self.workers[0]
        transport = worker.ws._req.transport if worker.ws._req else None
        if transport is not None:
            transport.abort()


@asynccontextmanager
async def running_standin(port: int = 0) -> AsyncIterator[StandIn]:
    standin = StandIn(port)
    await standin.start()
    try:
        yield standin
    finally:
        await standin.stop()

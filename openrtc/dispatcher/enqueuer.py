"""The dispatcher's way to Redis: every assignment that arrives together, in one pipeline.

:class:`BatchEnqueuer` takes each assigned job without a task or an await
(LiveKit's socket is read by one loop, which must never wait on Redis), and
one loop writes what has gathered meanwhile in one round trip
(:meth:`openrtc.store.streams.StreamStore.enqueue`). Each job is reported back
exactly once, written or not, through the ``done`` callback; a job that waited
past its deadline is reported failed without being sent.

:class:`InFlight` counts the work a drain must wait for: jobs on their way to
Redis and the dispatcher's handler tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from openrtc.agents.routing import Route
from openrtc.dispatcher.livekit_protocol import AgentSocket
from openrtc.store.streams import EnqueueResult, StreamStore
from openrtc.wire.messages import JobMessage

__all__ = ["MAX_BATCH", "BatchEnqueuer", "InFlight", "Pending"]

#: Most assignments written to Redis in one pipeline.
MAX_BATCH: Final = 512
#: Assignments that may wait for the enqueue loop before new ones are refused.
MAX_WAITING: Final = 100_000


class InFlight:
    """A count of unfinished work, and a way to wait until there is none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = anyio.Event()

    def add(self) -> None:
        self.count += 1

    def done(self) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is in flight."""
        while self.count:
            self._idle = anyio.Event()
            await self._idle.wait()


@dataclass(slots=True)
class Pending:
    """One job on its way to Redis."""

    message: JobMessage
    #: ``time.monotonic()`` past which it is failed, not written.
    deadline: float
    #: The LiveKit socket its assignment came on (its status goes back there).
    socket: AgentSocket
    route: Route
    #: The enqueue span (tracing on only), ended with the result.
    span: Any = None


#: Called once per job: the result, or the error that kept it from Redis.
Done = Callable[[Pending, EnqueueResult | None, BaseException | None], None]


class BatchEnqueuer:
    """Writes assigned jobs to their streams in batches (see the module docstring).

    Args:
        store: the stream layer.
        inflight: counts each job from :meth:`submit` until it is reported.
        done: reports one job (never raises into the loop: a bug in it is the caller's).
        failed: told of a batch that Redis did not take (before its jobs are reported).
    """

    def __init__(
        self,
        store: StreamStore,
        inflight: InFlight,
        done: Done,
        failed: Callable[[BaseException], None],
    ) -> None:
        self._store = store
        self._inflight = inflight
        self._done = done
        self._failed = failed
        self._send, self._receive = anyio.create_memory_object_stream[Pending](
            max_buffer_size=MAX_WAITING
        )

    def submit(self, pending: Pending) -> None:
        """Queue one job for the next batch; no await. Refused at once when overloaded."""
        self._inflight.add()
        try:
            self._send.send_nowait(pending)
        except anyio.WouldBlock:
            self._report(pending, None, RuntimeError("dispatcher overloaded"))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The enqueue loop: one pipeline per batch, until cancelled."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await self._write(batch)

    async def _write(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        live = []
        for p in batch:
            if p.deadline > now:
                live.append(p)
            else:
                self._report(p, None, TimeoutError("waited too long for Redis"))
        if not live:
            return
        try:
            with anyio.fail_after(max(p.deadline for p in live) - now):
                results = await self._store.enqueue([p.message for p in live])
        except Exception as exc:  # every failure is reported per job
            self._failed(exc)
            for p in live:
                self._report(p, None, exc)
            return
        for p, result in zip(live, results, strict=True):
            self._report(p, result, None)

    def _report(
        self, pending: Pending, result: EnqueueResult | None, error: BaseException | None
    ) -> None:
        try:
            self._done(pending, result, error)
        finally:
            self._inflight.done()

"""Control listener: LiveKit's terminations, relayed by the dispatcher, end sessions."""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus

from openrtc.wire.messages import ControlEvent, ForgedEntry, MalformedEntry
from openrtc.wire.signing import verify_control
from openrtc.worker.claims import ClaimTable
from openrtc.worker.context import DOWN, READ_BLOCK_MS, WorkerContext, logger

__all__ = ["ControlListener"]


class ControlListener:
    """The control step: reads the agent's control stream from now on."""

    def __init__(self, ctx: WorkerContext, claims: ClaimTable) -> None:
        self._ctx = ctx
        self._claims = claims

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ctx = self._ctx
        key = ctx.keys.control(ctx.settings.agent)
        last_id: bytes | str = "$"
        task_status.started()
        while True:
            reply: Any = await ctx.redis(
                partial(ctx.redis_client.xread, {key: last_id}, count=100, block=READ_BLOCK_MS),
                within=math.inf,
                outage=True,
            )
            if reply is DOWN:
                await anyio.sleep(0.5)
                continue
            for entry_id, fields in reply[0][1] if reply else []:
                last_id = entry_id
                self._handle(entry_id, fields)

    def _handle(self, entry_id: Any, fields: dict[bytes, bytes]) -> None:
        settings = self._ctx.settings
        try:
            if settings.signing is not None:
                verify_control(settings.signing, settings.agent, fields)
            event = ControlEvent.decode(fields)
        except ForgedEntry as exc:
            # Not a job: nothing to dead-letter, and nobody's call ends.
            logger.warning("ignoring forged control event %s: %s", entry_id, exc)
            return
        except MalformedEntry as exc:
            logger.warning("ignoring malformed control event %s: %s", entry_id, exc)
            return
        self.terminate(event.job_id)

    def terminate(self, job_id: str) -> None:
        """End the session of ``job_id``, unless LiveKit reports our own takeover or handover."""
        for claim in self._claims:
            running = claim.control
            if running is None or claim.message is None or claim.message.job_id != job_id:
                continue
            if claim.handed_over:
                # The peer it was handed to joined with its identity and removed
                # this session's participant: LiveKit reports exactly that.
                logger.info("job %s: termination caused by its handover; ignored", job_id)
                return
            since_join = time.monotonic() - claim.joined_at if claim.joined_at else 0.0
            if claim.reclaimed and since_join < self._ctx.settings.takeover_grace:
                # Our joining with the job's identity removed the previous
                # agent participant, and LiveKit reports exactly that.
                logger.info("job %s: termination caused by our takeover; ignored", job_id)
                return
            logger.info("job %s: terminated by LiveKit", job_id)
            running.stop("terminated by LiveKit")

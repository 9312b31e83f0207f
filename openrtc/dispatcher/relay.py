"""The status relay: job statuses from the workers to LiveKit, terminations the other way.

Workers write each job's status events (running, success, failed) to the
stream of the dispatcher that enqueued it (:meth:`Keys.status`); the relay
reads that stream and tells LiveKit, on the socket that holds the job
(``UpdateJobStatus``). A ``JobTermination`` from LiveKit is published to the
job's agent, whose workers end the session.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus
from livekit.protocol import agent as proto

from openrtc.dispatcher.context import DispatcherContext, logger, send_quietly
from openrtc.ops.logs import add_log_context, log_context
from openrtc.store.streams import REDIS_DOWN
from openrtc.supervision import describe
from openrtc.wire.messages import JobStatus, MalformedEntry, StatusEvent

__all__ = ["StatusRelay"]

_STATUS_TO_PROTO: Final = {
    JobStatus.RUNNING: proto.JobStatus.JS_RUNNING,
    JobStatus.SUCCESS: proto.JobStatus.JS_SUCCESS,
    JobStatus.FAILED: proto.JobStatus.JS_FAILED,
}
#: Status events read per XREAD.
_BATCH: Final = 256


class StatusRelay:
    """Statuses to LiveKit, terminations to the workers (see the module docstring)."""

    def __init__(self, ctx: DispatcherContext) -> None:
        self._ctx = ctx

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Relay this dispatcher's status stream until cancelled (Redis outages waited out)."""
        ctx = self._ctx
        me = ctx.settings.dispatcher_id
        last_id = b"0-0"
        # The events relayed are trimmed by the next read's round trip.
        relayed = False
        task_status.started()
        while True:
            try:
                entries = await ctx.store.read_status(
                    me, last_id, count=_BATCH, block_ms=1000, trim=relayed
                )
            except REDIS_DOWN as exc:
                ctx.redis_state.set("unreachable", describe(exc), level=logging.ERROR)
                await anyio.sleep(1)
                continue
            relayed = False
            for entry_id, fields in entries:
                last_id = entry_id
                relayed = True
                await self._relay_entry(entry_id, fields)

    async def _relay_entry(self, entry_id: Any, fields: Any) -> None:
        try:
            event = StatusEvent.decode(fields)
        except MalformedEntry as exc:
            logger.warning("ignoring malformed status event %s: %s", entry_id, exc)
            return
        try:
            # The room is not known here; the agent is, for a held job.
            agent = self._ctx.jobs.held.get(event.job_id, "")
            with log_context(job_id=event.job_id, agent=agent, tenant=event.tenant):
                await self._relay(event)
        except Exception:
            # Whatever one event holds, it must not stop the loop that relays
            # every other job's status (and the dispatcher).
            logger.exception("status event %s not relayed", entry_id)

    async def _relay(self, event: StatusEvent) -> None:
        ctx = self._ctx
        socket = ctx.socket
        if socket is None or not ctx.jobs.is_held(event.job_id):
            logger.debug("status %s for job %s not held here: dropped", event.status, event.job_id)
            return
        if event.status in (JobStatus.SUCCESS, JobStatus.FAILED):
            ctx.jobs.ended(event.job_id)
        ctx.metrics.statuses_relayed.labels(event.status.value).inc()
        logger.info(
            "job %s %s%s",
            event.job_id,
            event.status.value,
            f": {event.error}" if event.error else "",
        )
        await send_quietly(
            socket,
            proto.WorkerMessage(
                update_job=proto.UpdateJobStatus(
                    job_id=event.job_id, status=_STATUS_TO_PROTO[event.status], error=event.error
                )
            ),
        )

    async def terminate(self, job_id: str) -> None:
        """LiveKit terminated the job: tell its agent's workers (a handler task)."""
        ctx = self._ctx
        add_log_context(tenant=ctx.jobs.tenant_of(job_id))
        agent = ctx.jobs.terminated(job_id)
        if agent is None:
            logger.debug("termination for job %s that this dispatcher does not hold", job_id)
            return
        ctx.metrics.terminations.inc()
        try:
            with anyio.fail_after(ctx.settings.enqueue_timeout):
                await ctx.store.publish_termination(agent, job_id, "livekit")
        except REDIS_DOWN as exc:
            logger.error("job %s: termination not delivered to workers: %s", job_id, describe(exc))
            return
        logger.info("job %s terminated by LiveKit; told %s workers", job_id, agent)

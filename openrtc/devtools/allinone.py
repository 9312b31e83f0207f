"""``openrtc start``: a dispatcher and one worker per agent in one process.

The ``openrtc`` 0.20.1 package's ``openrtc start ./agents`` ran every agent
in one livekit-agents worker. Here the same command runs the same roles this
project splits into processes (the dispatcher and a worker per agent) in
one process against the configured LiveKit and Redis, so a deployment that
runs ``openrtc start`` keeps answering calls once it has a Redis. Nothing is
shared between them but the pool: they talk through Redis as separate
processes would, and can later be split without any change to Redis.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from openrtc.agents.registry import AgentPool
from openrtc.dispatcher.dispatcher import Dispatcher
from openrtc.settings import DispatcherSettings, WorkerSettings
from openrtc.worker.worker import Worker

__all__ = ["AllInOne"]

logger = logging.getLogger("openrtc.start")


class AllInOne:
    """A dispatcher and a worker per agent of ``pool``, run and stopped together."""

    def __init__(
        self,
        dispatcher_settings: DispatcherSettings,
        worker_settings: list[WorkerSettings],
        pool: AgentPool,
    ) -> None:
        self.dispatcher = Dispatcher(dispatcher_settings, pool)
        self.workers = [Worker(settings, pool) for settings in worker_settings]

    def request_stop(self) -> None:
        """Drain everything: the dispatcher stops taking jobs, the workers finish theirs."""
        self.dispatcher.request_stop()
        for worker in self.workers:
            worker.request_stop()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until all have stopped; one failing stops the others (one task group)."""
        logger.info(
            "openrtc start: a dispatcher and %d worker(s) (%s) in this process; to scale, "
            "run `openrtc dispatcher` and `openrtc worker --agent NAME` as separate processes",
            len(self.workers),
            ", ".join(w.settings.agent for w in self.workers),
        )
        async with anyio.create_task_group() as tg:
            # Workers first: a job routed at once finds its group's consumer.
            for worker in self.workers:
                await tg.start(worker.run)
            await tg.start(self.dispatcher.run)
            task_status.started()

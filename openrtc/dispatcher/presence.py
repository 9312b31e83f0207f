"""The membership keeper: this dispatcher's heartbeat, and its view of the agents' loads.

Every ``heartbeat_interval`` it writes the dispatcher's presence and reads
each agent's workers and backlog into the
:class:`~openrtc.store.membership.LoadView` (which the availability desk
reads without I/O), notes whether Redis answers, forgets offers LiveKit never
assigned, and settles the jobs whose failed enqueue may have landed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
from anyio.abc import TaskStatus

from openrtc.dispatcher.context import DispatcherContext, logger
from openrtc.settings import redact_url
from openrtc.store.redis_health import check_durability
from openrtc.store.streams import REDIS_DOWN
from openrtc.supervision import describe

__all__ = ["OFFER_TTL", "MembershipKeeper"]

#: An accepted job whose assignment has not arrived after this long is dropped
#: from memory (LiveKit gave up on it: our answer was late or the socket died).
OFFER_TTL: Final = 15.0


class MembershipKeeper:
    """Heartbeat and load view (see the module docstring).

    Args:
        ctx: the dispatcher's shared state.
        settle_unsure: marks terminated the jobs whose enqueue may have landed;
            ``False`` when Redis failed meanwhile.
    """

    def __init__(
        self, ctx: DispatcherContext, settle_unsure: Callable[[], Awaitable[bool]]
    ) -> None:
        self._ctx = ctx
        self._settle_unsure = settle_unsure
        self._durability_checked = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refresh once (started: the first answers have a view), then every interval."""
        ctx = self._ctx
        await self.refresh()
        task_status.started()
        while True:
            await anyio.sleep(ctx.settings.heartbeat_interval)
            await self.refresh()
            for job_id in ctx.jobs.expire_offers(ctx.clock() - OFFER_TTL):
                logger.warning("job %s was accepted but never assigned by LiveKit", job_id)

    async def refresh(self) -> None:
        """Heartbeat and read the loads once; a Redis failure is noted, not raised."""
        ctx = self._ctx
        socket = ctx.socket
        try:
            with anyio.fail_after(max(1.0, ctx.settings.heartbeat_interval * 2)):
                await ctx.view.refresh(
                    {
                        "livekit_worker_id": socket.worker_id if socket else "",
                        "agents": ",".join(ctx.table.names),
                        "agent_name": ctx.settings.agent_name,
                        "held_jobs": ctx.jobs.held_count,
                        "draining": int(ctx.draining),
                    }
                )
        except REDIS_DOWN as exc:
            ctx.view.lost()
            ctx.redis_state.set("unreachable", describe(exc), level=logging.ERROR)
            return
        ctx.redis_state.set("connected", redact_url(ctx.settings.redis_url))
        if await self._settle_unsure() and not self._durability_checked:
            self._durability_checked = True  # once: at start-up, when Redis first answers
            await check_durability(ctx.redis, logger)

    async def leave(self) -> None:
        """Remove this dispatcher's presence (at exit; Redis may be gone)."""
        with contextlib.suppress(*REDIS_DOWN):
            await self._ctx.view.presence.leave()

"""Hot reload: a saved agent module serves new calls and moves the live ones.

:class:`Reloader` watches an agents directory (``watchfiles``). On a save it
imports again every agent the save touches (:mod:`openrtc.agents.reloading`:
the agent's module, or a helper module it imports) and hands each new
configuration to the workers of that agent (:meth:`Worker.reload
<openrtc.worker.worker.Worker.reload>`): new sessions run it, and each live
session moves to it at its next turn boundary with its conversation. A module
that fails to import keeps the old code serving and prints one line, ``file:line:
error``; the next good save reloads.

One per process: ``openrtc dev`` runs one for all its workers (they share the
imported modules); ``openrtc worker --reload`` runs one as its own step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol

import anyio
import watchfiles
from anyio.abc import TaskStatus

from openrtc.agents.registry import AgentConfig, AgentPool
from openrtc.agents.reloading import Reloaded, reload_agents

__all__ = ["Reloadable", "Reloader"]

logger = logging.getLogger("openrtc.reload")

#: Changes are grouped until none came for this long (an editor's save is
#: several writes), then applied; milliseconds.
SETTLE_MS: Final = 50
#: At most this long from the first change of a group to its reload; milliseconds.
GROUP_MS: Final = 400


class Reloadable(Protocol):
    """What a reload is handed to: a worker of one agent."""

    @property
    def agent(self) -> str: ...

    async def reload(self, config: AgentConfig) -> None: ...


class Reloader:
    """Watches ``directory`` and reloads the agents of ``pool`` its saves touch."""

    def __init__(self, pool: AgentPool, directory: Path, workers: Sequence[Reloadable]) -> None:
        self._pool = pool
        self._directory = directory.resolve()
        self._workers = workers

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reload on every save until cancelled."""
        logger.info("hot reload: watching %s", self._directory)
        task_status.started()
        async for changes in watchfiles.awatch(
            self._directory,
            watch_filter=watchfiles.PythonFilter(),
            debounce=GROUP_MS,
            step=SETTLE_MS,
        ):
            await self.apply({Path(path) for _, path in changes})

    async def apply(self, changed: set[Path]) -> Reloaded:
        """Reload what ``changed`` touches; hand each agent's new code to its workers."""
        reloaded = reload_agents(self._pool, self._directory, changed)
        for line in reloaded.errors:
            # One line a developer reads in the terminal: where, and what.
            logger.error("reload failed, the old code keeps serving: %s", line)
        for config in reloaded.configs:
            logger.info("reloaded agent '%s' (%s)", config.name, config.class_label)
            for worker in self._workers:
                if worker.agent == config.name:
                    await worker.reload(config)
        if not reloaded.configs and not reloaded.errors:
            names = ", ".join(sorted(p.name for p in changed))
            logger.info("saved %s: no registered agent imports it; nothing reloaded", names)
        return reloaded

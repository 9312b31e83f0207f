"""The tenants file reloaded on change: new calls get the new entries.

:class:`TenantsWatcher` watches the file's directory with the hot reload's
machinery (``watchfiles``, grouped as :mod:`openrtc.worker.reloader` groups an
editor's writes; the directory, not the file, so a save by rename and a
Kubernetes ConfigMap's symlink swap are both seen). Each change whose content
differs is read and checked as at start-up (:func:`openrtc.tenant_file.load_tenants`):

- valid: it replaces :attr:`WorkerContext.tenants <openrtc.worker.context.WorkerContext.tenants>`;
  calls that start from now on take their tenant's new entry, live calls keep
  the one they started with (their session has it);
- invalid: each problem is logged at ERROR, one line each, and the last good
  file stays in force; the next good save applies.

In ``process`` isolation a new ``env:`` reference that the session processes
were not started without (:attr:`ProcessRunner.hidden_env
<openrtc.session.runners.ProcessRunner.hidden_env>`) is refused the same way:
every session process would inherit it. A restart applies it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import watchfiles
from anyio.abc import TaskStatus

from openrtc.agents.tenants import TenantsConfig
from openrtc.tenant_file import TenantsError, load_tenants, reference_problems
from openrtc.worker.context import WorkerContext
from openrtc.worker.reloader import GROUP_MS, SETTLE_MS, STOP_MS

__all__ = ["TenantsWatcher"]

logger = logging.getLogger("openrtc.worker")


class TenantsWatcher:
    """Reads the tenants file again when it changes (a worker step)."""

    def __init__(
        self,
        ctx: WorkerContext,
        path: Path,
        loaded: bytes | None,
        *,
        hidden_env: frozenset[str] | None = None,
    ) -> None:
        self._ctx = ctx
        self._path = path.absolute()
        #: ``process`` isolation: the variables its session processes started without.
        self._hidden_env = hidden_env
        #: The content in force (read before it was checked at start-up).
        self._last = loaded

    def _read(self) -> bytes | None:
        try:
            return self._path.read_bytes()
        except OSError:
            return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Apply each change of the file until cancelled."""
        task_status.started()
        async for _ in watchfiles.awatch(
            self._path.parent,
            debounce=GROUP_MS,
            step=SETTLE_MS,
            rust_timeout=STOP_MS,
            recursive=False,
        ):
            self.apply()

    def apply(self) -> bool:
        """Read the file again; whether a new configuration is in force."""
        data = self._read()
        if data == self._last:
            return False  # another file of the directory, or the same content saved again
        self._last = data
        if data is None:
            logger.error("tenants file %s is gone; the last good one stays in force", self._path)
            return False
        try:
            config = load_tenants(self._path)
        except TenantsError as exc:
            self._refuse(exc.lines)
            return False
        problems = reference_problems(config, os.environ)
        problems += self._new_hidden(config)
        if problems:
            self._refuse(problems)
            return False
        self._ctx.tenants = config
        logger.info(
            "tenants file %s reloaded: %d tenant(s); new calls use it",
            self._path,
            len(config.tenants),
        )
        return True

    def _new_hidden(self, config: TenantsConfig) -> list[str]:
        if self._hidden_env is None:
            return []
        return [
            f"{self._path}: env:{name}: a credential variable the session processes were "
            "started with (they would all hold it); restart the worker to use it"
            for name in sorted(config.env_names() - self._hidden_env)
        ]

    def _refuse(self, lines: list[str]) -> None:
        for line in lines:
            logger.error("tenants file not reloaded: %s", line)
        logger.error("the last good tenants file stays in force (%s)", self._path)

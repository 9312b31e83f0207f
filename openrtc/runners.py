"""How a worker runs a session: the :class:`SessionRunner` protocol and its two runners.

- :class:`CoroutineRunner` (``coroutine`` isolation, the default): sessions are
  tasks in the worker's own process, sharing one prewarmed ``JobProcess``:
  density.
- :class:`ProcessRunner` (``process`` isolation): one child process per
  session, as livekit-agents runs jobs.

``process`` isolation in more detail: the parent keeps ``idle_processes``
children warm (imports done, agents discovered, prewarm run) so a job does not
wait for Python to start. A child serves exactly one session and exits
(:mod:`openrtc.session_child`). Parent and child talk in JSON lines:
the child's stdout carries ``ready``, ``joined`` and the ``outcome``; its stdin
carries the job and, later, a ``stop``. A child whose stdin closes (its
worker died) leaves the room at once, so a killed worker never leaves a
second agent behind when a peer takes the call over.

A child needs a room, not the API: the parent mints the job's room token and
sends it with its own LiveKit URL; the API key and secret never reach a
child's environment or stdin. Anything else a child prints on stdout (agent
code may ``print``) is skipped.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
from typing import Any, Final, Protocol

import anyio
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.text import TextReceiveStream

from openrtc.agents import AgentConfig
from openrtc.logs import child_env
from openrtc.messages import JobMessage
from openrtc.session import (
    SessionControl,
    SessionOutcome,
    new_job_process,
    room_access,
    run_session,
)
from openrtc.settings import WorkerSettings

__all__ = ["CoroutineRunner", "ProcessRunner", "SessionRunner"]

logger = logging.getLogger("openrtc.worker.process")
_coroutine_logger = logging.getLogger("openrtc.worker")

READY_TIMEOUT: Final = 60.0
EXIT_GRACE: Final = 15.0
#: What a child must not inherit from the worker's environment.
PARENT_ONLY_ENV: Final = ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")


class SessionRunner(Protocol):
    """Runs one session to its end: in this process, or in a child process."""

    async def prepare(self) -> None: ...

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome: ...

    async def aclose(self) -> None: ...


class CoroutineRunner:
    """Sessions as tasks in this process, sharing one prewarmed ``JobProcess``."""

    def __init__(self, config: AgentConfig, settings: WorkerSettings) -> None:
        self._config = config
        self._settings = settings
        self._proc = new_job_process("coroutine")

    async def prepare(self) -> None:
        if self._config.prewarm is not None:
            _coroutine_logger.info("prewarming agent '%s'", self._config.name)
            await anyio.to_thread.run_sync(self._config.prewarm, self._proc)

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome:
        return await run_session(
            message, self._config, self._settings.livekit, self._proc, control, worker_id=worker_id
        )

    async def aclose(self) -> None:
        return None


class _Lines:
    """JSON lines from a child's stdout."""

    def __init__(self, stream: ByteReceiveStream) -> None:
        self._text = TextReceiveStream(stream)
        self._buffer = ""
        self._stray = 0

    async def next(self) -> dict[str, Any] | None:
        """The next JSON object line; ``None`` at end of output. Other lines are skipped."""
        # A loop, not recursion: a child may print any number of stray lines.
        while True:
            while "\n" not in self._buffer:
                try:
                    self._buffer += await self._text.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return None
            line, self._buffer = self._buffer.split("\n", 1)
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
            self._stray += 1
            # Once per child at warning level: agent code printing to stdout
            # is worth knowing about, not worth a log line per print.
            log = logger.warning if self._stray == 1 else logger.debug
            log("ignoring stray stdout from a session process (not JSON): %.120s", line)


class _Child:
    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self.lines = _Lines(process.stdout)

    async def send(self, value: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((json.dumps(value) + "\n").encode())

    async def kill(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()


class ProcessRunner:
    """Runs each session in a child process from a small warm pool."""

    def __init__(self, config: AgentConfig, settings: WorkerSettings) -> None:
        if config.source_path is None:
            raise ValueError("process isolation needs agents discovered from a directory")
        self._config = config
        self._settings = settings
        self._idle: list[_Child] = []
        self._lock = anyio.Lock()

    def _command(self) -> list[str]:
        assert self._config.source_path is not None
        return [
            sys.executable,
            "-m",
            "openrtc.session_child",
            str(self._config.source_path.parent),
            self._config.name,
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PARENT_ONLY_ENV}
        env["LIVEKIT_URL"] = self._settings.livekit.url
        env.update(child_env())  # the child logs as this worker does
        return env

    async def _spawn(self) -> _Child:
        process = await anyio.open_process(self._command(), env=self._env(), stderr=None)
        child = _Child(process)
        with anyio.fail_after(READY_TIMEOUT):
            first = await child.lines.next()
        if not first or not first.get("ready"):
            await child.kill()
            error = (first or {}).get("error", f"exit code {process.returncode}")
            raise RuntimeError(f"session process failed to start: {error}")
        return child

    async def prepare(self) -> None:
        for _ in range(self._settings.idle_processes):
            self._idle.append(await self._spawn())

    async def _acquire(self) -> _Child:
        async with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.process.returncode is None:
                    return child
            return await self._spawn()

    async def _refill(self) -> None:
        async with self._lock:
            if len(self._idle) < self._settings.idle_processes:
                try:
                    self._idle.append(await self._spawn())
                except Exception:
                    logger.exception("could not start a warm session process")

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome:
        try:
            access = room_access(self._settings.livekit, message)
        except ValueError as exc:
            return SessionOutcome("failed", "no room token for this job", str(exc))
        try:
            child = await self._acquire()
        except Exception as exc:
            return SessionOutcome("failed", "no session process", str(exc))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refill)
                await child.send(
                    {
                        "worker_id": worker_id,
                        "url": access.url,
                        "token": access.token,
                        "fields": {
                            k.decode(): base64.b64encode(v).decode()
                            for k, v in message.encode().items()
                        },
                    }
                )

                async def forward_stop() -> None:
                    await control.wait_stop()
                    await child.send({"stop": control.stop_reason, "takeover": control.takeover})

                tg.start_soon(forward_stop)
                outcome = await self._outcome(child, control)
                tg.cancel_scope.cancel()
            return outcome
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(EXIT_GRACE) as scope:
                # EOF on stdin ends the child's reader thread, so it can exit.
                if child.process.stdin is not None:
                    await child.process.stdin.aclose()
                await child.process.wait()
            if scope.cancelled_caught:
                await child.kill()

    async def _outcome(self, child: _Child, control: SessionControl) -> SessionOutcome:
        while True:
            event = await child.lines.next()
            if event is None:
                code = await child.process.wait()
                return SessionOutcome(
                    "failed", "session process died", f"session process exited with code {code}"
                )
            if event.get("joined"):
                control.joined.set()
            elif "outcome" in event:
                o = event["outcome"]
                return SessionOutcome(o["status"], o.get("reason", ""), o.get("error", ""))

    async def aclose(self) -> None:
        for child in self._idle:
            await child.kill()
        self._idle.clear()

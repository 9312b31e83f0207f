"""How a worker runs a session: the :class:`SessionRunner` protocol and its two runners.

- :class:`CoroutineRunner` (``coroutine`` isolation, the default): sessions are
  tasks in the worker's own process, sharing one prewarmed ``JobProcess``:
  density.
- :class:`ProcessRunner` (``process`` isolation): one child process per
  session, as livekit-agents runs jobs.

``process`` isolation in more detail (livekit-agents' own model: children
forked from a warm process). At start the worker launches one *zygote*
(:mod:`openrtc.session.child`) with the API secret removed from its
environment: it imports livekit-agents and the agent modules and runs the
agent's ``prewarm`` once, then only forks. Each child is forked from it, so it
starts in milliseconds and shares the zygote's pages copy-on-write. The worker
keeps ``idle_processes`` children ready (refilled in the background by
:meth:`ProcessRunner.maintain` in the worker's task group); a job takes an idle
child, or forks one if none is ready; at most :data:`SPAWN_CONCURRENCY`
children start at once. The zygote reports each child's exit; a dead zygote is
replaced.

A child serves exactly one session and exits. Worker and child talk in JSON
lines over a socket pair that is the child's stdin and stdout: the child sends
``ready``, ``joined``, its ``checkpoint`` and ``room_sid`` lines,
``handover_ready``, ``moved`` (to reloaded code), ``observer_failed`` (a
start observer raised or timed out: the worker counts it) and the ``outcome``; the
worker sends the job and, later, a ``handover`` request, a ``reload`` or a
``stop``. A child whose stdin closes (its worker died) leaves the room at
once, so a killed worker never leaves a second agent behind when a peer takes
the call over.

A child needs a room, not the API: the parent mints the job's room token and
sends it with its own LiveKit URL; the API key and secret never reach the
zygote's or a child's environment or stdin. Tenants' credentials neither: the
zygote starts without any variable a ``tenants.toml`` credential references
(``hidden_env``), and each child gets its own call's tenant's settings, values
resolved by the worker, on its job line (docs/tenants.md). Anything else a child prints on
stdout (agent code may ``print``) is skipped.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Final, Protocol

import anyio
from anyio.abc import ByteReceiveStream, Process, UNIXSocketStream
from anyio.streams.text import TextReceiveStream

from openrtc.agents.registry import AgentConfig
from openrtc.ops.logs import child_env
from openrtc.session import ffi_routing
from openrtc.session.live import install_loop_accounting
from openrtc.session.session import (
    SessionControl,
    SessionOutcome,
    new_job_process,
    room_access,
    run_session,
)
from openrtc.settings import WorkerSettings
from openrtc.wire import signing
from openrtc.wire.messages import JobMessage

__all__ = ["CoroutineRunner", "ProcessRunner", "SessionRunner"]

logger = logging.getLogger("openrtc.worker.process")
_coroutine_logger = logging.getLogger("openrtc.worker")

READY_TIMEOUT: Final = 60.0
EXIT_GRACE: Final = 15.0
#: Children starting at once (their runtimes start in parallel on a few cores).
SPAWN_CONCURRENCY: Final = max(1, min(os.cpu_count() or 1, 4))
#: What a child must not inherit from the worker's environment: the worker
#: alone signs and verifies (openrtc.wire.signing), a child never needs a key.
PARENT_ONLY_ENV: Final = (
    "LIVEKIT_API_KEY",
    "LIVEKIT_API_SECRET",
    signing.KEY_ENV,
    signing.PREVIOUS_KEY_ENV,
    signing.KEY_FILE_ENV,
)


class SessionRunner(Protocol):
    """Runs one session to its end: in this process, or in a child process."""

    async def prepare(self) -> None: ...

    async def maintain(self) -> None:
        """Background upkeep for the worker's lifetime (run in its task group)."""
        ...

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome: ...

    async def reload(self, config: AgentConfig) -> None:
        """New sessions run ``config`` (the agent's reloaded code); live ones are asked apart."""
        ...

    async def aclose(self) -> None: ...


class CoroutineRunner:
    """Sessions as tasks in this process, sharing one prewarmed ``JobProcess``."""

    def __init__(self, config: AgentConfig, settings: WorkerSettings) -> None:
        self._config = config
        self._settings = settings
        self._proc = new_job_process("coroutine")

    async def prepare(self) -> None:
        # Many sessions share this process's livekit-rtc event queue: deliver
        # each caller-audio frame to its own stream, not to all of them.
        ffi_routing.install()
        if self._settings.top_interval > 0:
            # Each session's share of the loop, and its blocks, for ``openrtc top``.
            install_loop_accounting()
        if self._config.prewarm is not None:
            _coroutine_logger.info("prewarming agent '%s'", self._config.name)
            await anyio.to_thread.run_sync(self._config.prewarm, self._proc)

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome:
        return await run_session(
            message, self._config, self._settings.livekit, self._proc, control, worker_id=worker_id
        )

    async def maintain(self) -> None:
        return None

    async def reload(self, config: AgentConfig) -> None:
        # ``prewarm`` ran once for this process; what it loaded stays.
        self._config = config

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


class _Exits:
    """Exit codes of the zygote's children, as the zygote reports them."""

    #: Reports kept for children nobody asked about yet (bounded: pids are reused).
    KEEP: Final = 1024

    def __init__(self, on_exit: Callable[[], None]) -> None:
        self._codes: dict[int, int] = {}
        self._changed = anyio.Event()
        self._on_exit = on_exit

    def record(self, pid: int, code: int) -> None:
        self._codes[pid] = code
        while len(self._codes) > self.KEEP:
            del self._codes[next(iter(self._codes))]
        self._on_exit()
        self._changed.set()
        self._changed = anyio.Event()

    def code(self, pid: int) -> int | None:
        return self._codes.get(pid)

    def forget(self, pid: int) -> None:
        self._codes.pop(pid, None)

    async def wait(self, pid: int) -> int | None:
        """The exit code; ``None`` if the process is gone unreported (its zygote died)."""
        while pid not in self._codes:
            with anyio.move_on_after(0.2):
                await self._changed.wait()
            if pid not in self._codes and not _exists(pid):
                return None
        return self._codes[pid]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Child:
    """A session process forked by the zygote; its stdin and stdout are ``stream``."""

    def __init__(
        self, stream: UNIXSocketStream, lines: _Lines, pid: int, exits: _Exits, code: int
    ) -> None:
        self.stream = stream
        self.lines = lines
        self.pid = pid
        self._exits = exits
        #: Which reload of the agent's code it runs (:attr:`_Zygote.code`).
        self.code = code

    @property
    def returncode(self) -> int | None:
        return self._exits.code(self.pid)

    async def send(self, value: dict[str, Any]) -> None:
        await self.stream.send((json.dumps(value) + "\n").encode())

    async def close_input(self) -> None:
        """EOF on the child's stdin: it ends its reader and exits (or leaves its room)."""
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self.stream.send_eof()

    async def wait(self) -> int | None:
        try:
            return await self._exits.wait(self.pid)
        finally:
            if self.returncode is not None or not _exists(self.pid):
                await self.stream.aclose()

    async def kill(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.returncode is None:  # once reaped, its pid may be another process's
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            with anyio.move_on_after(EXIT_GRACE):
                await self._exits.wait(self.pid)
            await self.stream.aclose()
            self._exits.forget(self.pid)


class _Zygote:
    """The warm process session processes are forked from (:mod:`openrtc.session.child`)."""

    def __init__(self, command: list[str], env: dict[str, str], exits: _Exits) -> None:
        self._command = command
        self._env = env
        self._exits = exits
        self._process: Process | None = None
        self._control: socket.socket | None = None
        self._sending = anyio.Lock()
        #: Reloads of the agent's code asked so far; a child forked now runs this one.
        self.code = 0

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await anyio.open_process(
                [*self._command, str(theirs.fileno())],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        with anyio.fail_after(READY_TIMEOUT):
            first = await self._receive()
        if not first or not first.get("ready"):
            await self.aclose()
            error = (first or {}).get("error", "exited")
            raise RuntimeError(f"session processes cannot start: {error}")
        logger.info("session zygote %d warm", first.get("pid", self._process.pid))

    async def _receive(self) -> dict[str, Any] | None:
        assert self._control is not None
        while True:
            await anyio.wait_readable(self._control)
            try:
                data = self._control.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not data:
                return None
            value = json.loads(data)
            return value if isinstance(value, dict) else {}

    async def read_reports(self) -> None:
        """Record the children's exits until the zygote is gone."""
        if self._control is None:
            return
        while (report := await self._receive()) is not None:
            if "exit" in report:
                self._exits.record(int(report["exit"]), int(report["code"]))
            elif report.get("reloaded") is False:
                logger.error("the session zygote kept the old code: %s", report.get("error"))

    async def fork(self) -> tuple[UNIXSocketStream, int]:
        """A new child: the worker's end of its stdin/stdout socket, and its :attr:`code`."""
        control = self._control
        if control is None:
            raise RuntimeError("the session zygote is not running")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            async with self._sending:
                await self._send(control, b"F", [theirs.fileno()])
                code = self.code
        except BaseException as exc:
            ours.close()
            if isinstance(exc, OSError):
                raise RuntimeError(f"the session zygote is gone: {exc}") from exc
            raise
        finally:
            theirs.close()
        return await UNIXSocketStream.from_socket(ours), code

    async def reload(self) -> None:
        """Have the zygote import the agent's module again: children forked after this run it."""
        control = self._control
        if control is None:  # a zygote started from now on imports the new code anyway
            self.code += 1
            return
        async with self._sending:
            # Gone: its replacement imports the new code anyway.
            with contextlib.suppress(OSError):
                await self._send(control, b"R", [])
            # Messages are handled in order: every fork asked after this one is new code.
            self.code += 1

    @staticmethod
    async def _send(control: socket.socket, data: bytes, fds: list[int]) -> None:
        # One writer at a time (the caller holds ``_sending``): anyio allows a single
        # waiter per socket, and forks are requested in parallel. A send takes microseconds.
        while True:
            try:
                socket.send_fds(control, [data], fds)
                return
            except BlockingIOError:
                await anyio.wait_writable(control)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._control is not None:
                self._control.close()  # EOF: the zygote exits
                self._control = None
            if self._process is not None:
                with anyio.move_on_after(EXIT_GRACE) as scope:
                    await self._process.wait()
                if scope.cancelled_caught:
                    self._process.kill()
                    await self._process.wait()
                await self._process.aclose()
                self._process = None


class ProcessRunner:
    """Runs each session in a child forked from a warm zygote; keeps a pool of idle ones."""

    def __init__(
        self,
        config: AgentConfig,
        settings: WorkerSettings,
        *,
        hidden_env: frozenset[str] = frozenset(),
    ) -> None:
        if config.source_path is None:
            raise ValueError("process isolation needs agents discovered from a directory")
        self._config = config
        self._settings = settings
        #: Variables no session process inherits: the tenants' credentials
        #: (``env:`` references). A child gets its own tenant's values on its
        #: socket with its job, so no process holds another tenant's.
        self.hidden_env = hidden_env
        self._exits = _Exits(self._poke)
        self._zygote = _Zygote(self._command(), self._env(), self._exits)
        self._idle: list[_Child] = []
        self._filling = 0
        self._spawning = anyio.Semaphore(SPAWN_CONCURRENCY)
        self._wake = anyio.Event()

    def _command(self) -> list[str]:
        assert self._config.source_path is not None
        return [
            sys.executable,
            "-m",
            "openrtc.session.child",
            str(self._config.source_path.parent),
            self._config.name,
        ]

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in PARENT_ONLY_ENV and k not in self.hidden_env
        }
        env["LIVEKIT_URL"] = self._settings.livekit.url
        env.update(child_env())  # the child logs as this worker does
        return env

    def _poke(self) -> None:
        self._wake.set()

    async def _spawn(self) -> _Child:
        # Bounded: every child starts its runtime at once on a few cores.
        async with self._spawning:
            stream, code = await self._zygote.fork()
            lines = _Lines(stream)
            try:
                with anyio.fail_after(READY_TIMEOUT):
                    first = await lines.next()
            except BaseException:
                await stream.aclose()
                raise
            if not first or not first.get("ready"):
                await stream.aclose()  # EOF: a child that did start exits
                raise RuntimeError(f"session process failed to start: {first}")
            return _Child(stream, lines, int(first["pid"]), self._exits, code)

    async def prepare(self) -> None:
        await self._zygote.start()
        async with anyio.create_task_group() as tg:
            for _ in range(self._settings.idle_processes):
                tg.start_soon(self._fill_one, False)

    async def _fill_one(self, counted: bool = True) -> None:
        """One more idle child; ``counted``: started by :meth:`maintain` (``_filling``)."""
        try:
            self._idle.append(await self._spawn())
        except Exception:
            logger.exception("could not start a warm session process")
            if counted:
                await anyio.sleep(1.0)  # not a hot loop while the zygote is down
        finally:
            if counted:
                self._filling -= 1
            self._poke()

    async def maintain(self) -> None:
        """Keep ``idle_processes`` ready children (and the zygote) until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_zygote)
            while True:
                for dead in [c for c in self._idle if c.returncode is not None]:
                    self._idle.remove(dead)
                    logger.warning(
                        "an idle session process (pid %d) exited with code %s; replacing it",
                        dead.pid,
                        dead.returncode,
                    )
                    await dead.kill()
                for stale in [c for c in self._idle if c.code != self._zygote.code]:
                    self._idle.remove(stale)  # it has the code from before a reload
                    await stale.kill()
                while len(self._idle) + self._filling < self._settings.idle_processes:
                    self._filling += 1
                    tg.start_soon(self._fill_one)
                await self._wake.wait()
                self._wake = anyio.Event()

    async def _keep_zygote(self) -> None:
        while True:
            await self._zygote.read_reports()
            logger.error("the session zygote exited; starting a new one")
            await self._zygote.aclose()
            try:
                await self._zygote.start()
            except Exception:
                logger.exception("could not start the session zygote")
                await anyio.sleep(1.0)
            self._poke()

    async def _acquire(self) -> _Child:
        try:
            while self._idle:
                child = self._idle.pop(0)
                if child.returncode is None and child.code == self._zygote.code:
                    return child
                await child.kill()
            return await self._spawn()
        finally:
            self._poke()

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
        control.pid = child.pid
        try:
            async with anyio.create_task_group() as tg:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    # A child that died since it was ready: its EOF is reported below.
                    await child.send(
                        {
                            "worker_id": worker_id,
                            "url": access.url,
                            "token": access.token,
                            "checkpoint": (control.resume or b"").decode(errors="replace"),
                            "checkpoint_max_bytes": control.checkpoint_max_bytes,
                            "checkpointing": control.checkpoint is not None,
                            "handover": control.handover,
                            "greeted": control.greeted,
                            "observer_timeout": control.observer_timeout,
                            # What ``openrtc top`` shows of it, unless top is off.
                            "live": self._settings.top_interval > 0,
                            # Its own tenant's settings and credentials, and no one else's.
                            "tenant": (
                                control.tenant.to_wire() if control.tenant is not None else None
                            ),
                            "fields": {
                                k.decode(): base64.b64encode(v).decode()
                                for k, v in message.encode().items()
                            },
                        }
                    )

                async def forward_stop() -> None:
                    await control.wait_stop()
                    stop = {"stop": control.stop_reason, "takeover": control.takeover}
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await child.send(stop)

                async def forward_reload() -> None:
                    while True:
                        await control.wait_reload_asked()
                        # The child imports the agent's module again itself.
                        with contextlib.suppress(
                            anyio.BrokenResourceError, anyio.ClosedResourceError
                        ):
                            await child.send({"reload": True})

                async def forward_handover() -> None:
                    while True:  # asked again when Redis lost the handed-over entry
                        await control.wait_handover_asked()
                        with contextlib.suppress(
                            anyio.BrokenResourceError, anyio.ClosedResourceError
                        ):
                            await child.send({"handover": True})
                        await control.wait_handover_off()
                        with contextlib.suppress(
                            anyio.BrokenResourceError, anyio.ClosedResourceError
                        ):
                            await child.send({"handover_off": True})

                tg.start_soon(forward_stop)
                tg.start_soon(forward_handover)
                tg.start_soon(forward_reload)
                outcome = await self._outcome(child, control)
                tg.cancel_scope.cancel()
            return outcome
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(EXIT_GRACE) as scope:
                # EOF on stdin ends the child's reader, so it can exit.
                await child.close_input()
                await child.wait()
            if scope.cancelled_caught:
                await child.kill()
            self._exits.forget(child.pid)

    async def _outcome(self, child: _Child, control: SessionControl) -> SessionOutcome:
        while True:
            event = await child.lines.next()
            if event is None:
                with anyio.move_on_after(EXIT_GRACE):
                    code = await child.wait()
                return SessionOutcome(
                    "failed", "session process died", f"session process exited with code {code}"
                )
            if event.get("joined"):
                control.joined.set()
            elif "checkpoint" in event:
                if control.checkpoint is not None and isinstance(event["checkpoint"], str):
                    control.checkpoint(event["checkpoint"].encode())
            elif "room_sid" in event:
                if control.room_remade is not None and isinstance(event["room_sid"], str):
                    control.room_remade(event["room_sid"])
            elif "live" in event:
                control.live.update(event["live"])
            elif event.get("moved"):
                control.moved()
            elif "observer_failed" in event:
                if control.observer_failed is not None and isinstance(
                    event["observer_failed"], str
                ):
                    control.observer_failed(event["observer_failed"])
            elif event.get("handover_ready"):
                # After the child's last checkpoint line: the worker has it.
                control.handover_ready.set()
            elif "outcome" in event:
                o = event["outcome"]
                return SessionOutcome(
                    o["status"],
                    o.get("reason", ""),
                    o.get("error", ""),
                    ended_by_agent=o.get("ended_by_agent") is True,
                    call=o["call"] if isinstance(o.get("call"), dict) else None,
                )

    async def reload(self, config: AgentConfig) -> None:
        """Children forked from now on run the reloaded code; idle ones are replaced."""
        self._config = config
        await self._zygote.reload()
        self._poke()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for child in idle:
            await child.kill()
        await self._zygote.aclose()

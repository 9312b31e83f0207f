"""The session processes of ``process`` isolation: a warm zygote and the children it forks.

``python -m openrtc.session.child AGENTS_DIR AGENT CONTROL_FD`` starts the
*zygote*: it imports livekit-agents and the agent modules, runs the agent's
``prewarm`` once, freezes what it built for the garbage collector (so children
keep sharing those pages copy-on-write) and then only forks. It never runs an
event loop or a thread, so a plain ``fork`` of it is safe (a fork of the
worker, with its event loop, threads and Redis connections, would not be).

``CONTROL_FD`` is a ``SOCK_SEQPACKET`` Unix socket to the worker. The zygote
sends ``{"ready": true}`` (or ``{"ready": false, "error": ...}``) on it once
warm, then each message it receives carries one file descriptor: the child's
end of a fresh socket pair. It forks a child with that socket as stdin and
stdout, and reports each child's exit as ``{"exit": PID, "code": CODE}``
(``CODE`` negative for a signal, as :mod:`subprocess` does). A message ``R``
without a descriptor (hot reload) makes it import the agent's module again, so
children forked after it run the new code; it answers ``{"reloaded": ...}``.
It exits when the worker closes the control socket.

A child serves exactly one session and exits; see :mod:`openrtc.session.runners` for
its line protocol. The job line carries the room URL and token the worker
minted: neither the zygote nor a child ever holds the API secret.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import anyio
from anyio.streams.text import TextReceiveStream

logger = logging.getLogger("openrtc.worker.process")


def _emit(value: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Our worker closed its end (it was stopped or killed, or gave up waiting):
        # nobody is left to tell. Its EOF on our stdin stops the session.
        pass


async def _serve(pool: Any, config: Any, proc: Any) -> int:
    """One session, in a forked child: stdin and stdout are its socket to the worker."""
    from openrtc.session.session import run_session

    _emit({"ready": True, "pid": os.getpid()})
    lines = _Lines()
    first = await lines.next()
    if first is None:
        return 0  # the worker went away before giving us a job
    job = json.loads(first)
    message, access, control = _session_of(job)
    # The agents directory's start observers: imported here (functions do not
    # cross the socket); which session runs them its worker's first line says.
    control.on_start = pool.observers.start
    async with anyio.create_task_group() as tg:
        tg.start_soon(_follow_the_worker, lines, control, tg, partial(_reload, pool, config.name))
        tg.start_soon(_report_joined, control)
        if job.get("live"):
            tg.start_soon(_report_live, control.live)
        outcome = await run_session(
            message, config, access, proc, control, worker_id=job["worker_id"]
        )
        _emit(
            {
                "outcome": {
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "error": outcome.error,
                    "ended_by_agent": outcome.ended_by_agent,
                    # The call's totals, for its report: on the outcome line,
                    # not left to a checkpoint line still on its way.
                    "call": outcome.call,
                }
            }
        )
        tg.cancel_scope.cancel()
    return 0


class _Lines:
    """stdin, line by line."""

    def __init__(self) -> None:
        self._stdin = TextReceiveStream(_StdinStream())
        self._buffer = ""

    async def next(self) -> str | None:
        """The next line, ``None`` once stdin is closed."""
        while "\n" not in self._buffer:
            try:
                self._buffer += await self._stdin.receive()
            except anyio.EndOfStream:
                return None
        line, self._buffer = self._buffer.split("\n", 1)
        return line


def _session_of(job: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The job's message, room access and session control, from the worker's first line."""
    from openrtc.agents.tenants import TenantSettings
    from openrtc.session.session import RoomAccess, SessionControl
    from openrtc.wire.messages import JobMessage

    message = JobMessage.decode({k.encode(): base64.b64decode(v) for k, v in job["fields"].items()})
    access = RoomAccess(job["url"], job["token"])
    control = SessionControl()
    # The child has no Redis: its worker read the checkpoint and writes the new ones.
    control.resume = job.get("checkpoint", "").encode() or None
    control.checkpoint_max_bytes = int(job.get("checkpoint_max_bytes", 0))
    if job.get("checkpointing"):
        control.checkpoint = lambda data: _emit({"checkpoint": data.decode()})
    control.handover = bool(job.get("handover"))
    control.greeted = bool(job.get("greeted"))
    control.room_remade = lambda sid: _emit({"room_sid": sid})
    control.on_moved = lambda: _emit({"moved": True})
    if "observer_timeout" in job:
        control.observer_timeout = float(job["observer_timeout"])
    control.observer_failed = lambda hook: _emit({"observer_failed": hook})
    if job.get("tenant"):
        control.tenant = TenantSettings.from_wire(job["tenant"])
    return message, access, control


def _reload(pool: Any, agent: str) -> Any:
    """The agent's module imported again (hot reload); ``None`` if it fails (logged)."""
    from openrtc.agents.reloading import reload_agent

    try:
        return reload_agent(pool, agent)
    except Exception as exc:
        logger.error("agent '%s': not reloaded in this session process: %s", agent, exc)
        return None


async def _follow_the_worker(
    lines: _Lines, control: Any, tg: anyio.abc.TaskGroup, reload: Callable[[], Any]
) -> None:
    """The worker's commands (stop, handover and its call-off, reload); its death stops
    the session."""
    while True:
        line = await lines.next()
        if line is None:  # our worker died: leave the room now
            control.stop("worker process gone", takeover=True)
            return
        command = json.loads(line)
        if "stop" in command:
            control.stop(command["stop"], takeover=bool(command.get("takeover")))
        elif command.get("handover"):
            control.ask_handover()
            # Each ask is answered (again after a handover that went nowhere).
            tg.start_soon(_report_handover_ready, control.handover_ready)
        elif command.get("handover_off"):
            control.call_off_handover()
        elif command.get("reload") and (config := reload()) is not None:
            control.ask_reload(config)


async def _report_joined(control: Any) -> None:
    await control.joined.wait()
    _emit({"joined": True})


#: How often a session process looks whether what ``top`` shows of it changed (s).
LIVE_REPORT_INTERVAL: Final = 1.0


async def _report_live(live: Any) -> None:
    """What ``openrtc top`` shows of this session, to the worker whenever it changed."""
    from openrtc.session.live import install_loop_accounting

    install_loop_accounting()
    sent: dict[str, Any] = {}
    while True:
        shown = live.shown()
        if shown != sent:
            _emit({"live": shown})
            sent = shown
        await anyio.sleep(LIVE_REPORT_INTERVAL)


async def _report_handover_ready(ready: anyio.Event) -> None:
    await ready.wait()
    _emit({"handover_ready": True})


class _StdinStream(anyio.abc.ByteReceiveStream):
    """stdin as an anyio byte stream (reads in a worker thread)."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        stdin: Any = sys.stdin.buffer  # a BufferedReader: read1 returns what is there
        data: bytes = await anyio.to_thread.run_sync(stdin.read1, max_bytes, abandon_on_cancel=True)
        if not data:
            raise anyio.EndOfStream
        return data

    async def aclose(self) -> None:
        return None


def _send(control: socket.socket, value: dict[str, Any]) -> bool:
    """Tell the worker; False when it has closed its end (it stopped, or gave up
    waiting for us): nobody is left to tell."""
    try:
        control.send(json.dumps(value).encode())
    except OSError:
        return False
    return True


def _warm(agents_dir: str, agent: str) -> tuple[Any, Any, Any]:
    """Everything a session needs before its job: imports, discovery, ``prewarm``."""
    from livekit.rtc._ffi_client import get_ffi_lib

    from openrtc.agents.compat import provider_defaults_from_env
    from openrtc.agents.registry import AgentPool
    from openrtc.session.session import new_job_process

    # The defaults the worker was given (its flags are exported to the environment).
    pool = AgentPool.from_directory(agents_dir, **provider_defaults_from_env())
    config = pool.get(agent)
    proc = new_job_process("process")
    if config.prewarm is not None:
        config.prewarm(proc)
    # The native library's dlopen, once here rather than per child; its
    # runtime (threads) starts per child, on first use after the fork.
    get_ffi_lib()
    if threading.active_count() > 1:
        # A fork copies only the calling thread: state those threads guard may be
        # left locked in every child. prewarm should load, not start, things.
        logger.warning(
            "agent '%s': prewarm left %d thread(s) running; session processes are forked "
            "from this process and will not have them",
            agent,
            threading.active_count() - 1,
        )
    # Children must not dirty the pages of what was built here: cyclic GC
    # writes to every tracked object's header, which unshares the page.
    gc.collect()
    gc.freeze()
    return pool, config, proc


def _reload_warm(warm: tuple[Any, Any, Any]) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
    """The zygote's agent imported again (hot reload): what children forked from now on run.

    ``prewarm`` does not run again (as in ``coroutine`` isolation). A module that
    fails keeps the old code (the worker imported it first, so this is rare).
    """
    from openrtc.agents.reloading import reload_agent

    pool, config, proc = warm
    try:
        config = reload_agent(pool, config.name)
    except Exception as exc:
        return warm, {"reloaded": False, "error": str(exc)}
    gc.collect()
    gc.freeze()
    return (pool, config, proc), {"reloaded": True}


def worker_gone(exc: BaseException) -> bool:
    """Whether ``exc`` only says our worker closed its end of our socket: a
    ``BrokenPipeError``, or a group (from a task group) of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(BrokenPipeError)[1] is None
    return isinstance(exc, BrokenPipeError)


def _child(channel: int, control: socket.socket, wakeup: tuple[int, int], warm: Any) -> None:
    """In a freshly forked child: become a session process; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        control.close()
        for fd in wakeup:
            os.close(fd)
        os.dup2(channel, 0)
        os.dup2(channel, 1)
        os.close(channel)
        code = anyio.run(_serve, *warm)
    except BaseException as exc:
        if worker_gone(exc):
            # A write other than _emit's (agent code's print) met the closed socket.
            code = 0
        else:
            # In the log's format (JSON lines stay JSON), not a bare traceback.
            logger.exception("session process failed")
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _zygote(agents_dir: str, agent: str, control_fd: int) -> int:
    control = socket.socket(fileno=control_fd)
    try:
        warm = _warm(agents_dir, agent)
    except Exception as exc:
        _send(control, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    # A terminal's Ctrl-C reaches the whole process group: the worker drains its
    # sessions and then closes their sockets; neither we nor (inheriting this)
    # the children should die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGCHLD wakes the loop below through this pipe, so exits are reported at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    if not _send(control, {"ready": True, "pid": os.getpid()}):
        return 0
    while True:
        readable, _, _ = select.select([control.fileno(), wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if not _send(control, {"exit": pid, "code": os.waitstatus_to_exitcode(status)}):
                    return 0
        if control.fileno() in readable:
            try:
                data, fds, _, _ = socket.recv_fds(control, 64, 4)
            except ConnectionError:
                return 0
            if not data:
                return 0  # the worker is gone; children notice on their own sockets
            if data == b"R":
                warm, report = _reload_warm(warm)
                if not _send(control, report):
                    return 0
            for fd in fds:
                sys.stdout.flush()
                sys.stderr.flush()
                if os.fork() == 0:
                    _child(fd, control, (wake_r, wake_w), warm)
                os.close(fd)


def main() -> None:
    from openrtc.ops.logs import configure_logging

    agents_dir, agent, control_fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # What agent code prints goes to stderr: a child's stdout is its socket to the worker.
    os.dup2(2, 1)
    # As the worker logs (runners.ProcessRunner passes its level and format);
    # forked children inherit it.
    configure_logging(
        os.environ.get("OPENRTC_LOG_LEVEL", "INFO"), os.environ.get("OPENRTC_LOG_FORMAT", "text")
    )
    sys.exit(_zygote(agents_dir, agent, control_fd))


if __name__ == "__main__":
    main()

"""``openrtc console``: one agent's session on this machine, with no LiveKit or Redis server.

The session is the one a worker runs: :func:`~openrtc.session.session.new_agent_session`
builds it from the agent's providers, the agent is built as sessions build
it, its ``prewarm`` runs first, and it says its greeting. It starts without
a room, inside a job context of livekit-agents' own console kind (a
``fake_job``), so ``get_job_context()``, tools and shutdown callbacks work as
in a call; the job's metadata names the agent, as a dispatch would.

Text mode (:func:`run_text`): each input line is one user turn, run with
``AgentSession.run`` as livekit-agents' console text mode runs it; what the
agent says in the turn is one output line. Audio mode (:func:`run_audio`):
livekit-agents' local console (microphone, speaker, Ctrl+T for its text
mode) drives the same session, which runs on an event loop of its own.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TextIO

import anyio
import anyio.from_thread
from livekit import rtc
from livekit.agents import AgentSession, llm
from livekit.protocol.agent import Job
from livekit.protocol.models import Room

from openrtc.agents.registry import AgentConfig
from openrtc.errors import OpenRTCError
from openrtc.session import livekit_parts as parts
from openrtc.session.livekit_parts import JobAcceptArguments, JobProcess, RunningJobInfo
from openrtc.session.session import _close, new_agent_session, new_job_process, say_greeting
from openrtc.wire.messages import agent_identity

__all__ = [
    "CONSOLE_JOB_ID",
    "ConsoleError",
    "console_job",
    "prepare",
    "reply_line",
    "run_audio",
    "run_text",
]

logger = logging.getLogger("openrtc.console")

#: The console's job id and room name (what the agent sees in ``ctx.job`` / ``ctx.room``).
CONSOLE_JOB_ID: Final = "console"
#: How often the terminal side looks whether the session has started or ended.
_POLL: Final = 0.05


class ConsoleError(OpenRTCError):
    """The console cannot run here (no sound devices, the agent failed to start): one line."""


def console_job(config: AgentConfig) -> RunningJobInfo:
    """The job a console session runs as: a ``fake_job`` whose metadata names the agent."""
    job = Job(
        id=CONSOLE_JOB_ID,
        agent_name=config.name,
        metadata=json.dumps({"agent": config.name}),
        room=Room(name=CONSOLE_JOB_ID, sid=f"RM_{CONSOLE_JOB_ID}"),
    )
    return RunningJobInfo(
        accept_arguments=JobAcceptArguments(
            name=config.name, identity=agent_identity(CONSOLE_JOB_ID), metadata="", attributes={}
        ),
        job=job,
        url="",
        token="",
        worker_id=CONSOLE_JOB_ID,
        fake_job=True,
    )


def prepare(config: AgentConfig) -> JobProcess:
    """The process object the agent's sessions share, prewarmed (on this, the main, thread:
    a plugin imported by ``prewarm`` registers only there)."""
    proc = new_job_process("coroutine")
    if config.prewarm is not None:
        logger.info("prewarming agent '%s'", config.name)
        config.prewarm(proc)
    return proc


def reply_line(texts: list[str]) -> str:
    """What the agent said in one turn, as one line (its messages, then their lines, joined)."""
    return " ".join(" ".join(text.split("\n")).strip() for text in texts if text.strip())


class _Said:
    """The agent's messages since the last :meth:`take`, in conversation order."""

    def __init__(self, session: AgentSession[Any], tools_to: TextIO) -> None:
        self._texts: list[str] = []
        self._tools_to = tools_to
        session.on("conversation_item_added", self._on_item)
        session.on("function_tools_executed", self._on_tools)

    def _on_item(self, event: Any) -> None:
        item = event.item
        if isinstance(item, llm.ChatMessage) and item.role == "assistant" and item.text_content:
            self._texts.append(item.text_content)

    def _on_tools(self, event: Any) -> None:
        # Tool calls are the author's to see, not part of the reply: on the other stream.
        for call, output in event.zipped():
            result = "(no output)" if output is None else output.output
            line = f"tool {call.name}({call.arguments}) -> {result}"
            print(line, file=self._tools_to, flush=True)

    def take(self) -> list[str]:
        texts, self._texts = self._texts, []
        return texts


class _Ended:
    """The session ended by itself (the agent ended the call, or its session closed)."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reason = ""

    def finish(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


@asynccontextmanager
async def _started(
    config: AgentConfig,
    proc: JobProcess,
    ended: _Ended,
    on_session: Callable[[AgentSession[Any]], None],
) -> AsyncIterator[AgentSession[Any]]:
    """The agent's session, started without a room and greeted; closed on the way out.

    ``on_session`` sees the session before it starts (to listen to its events).
    """
    room = rtc.Room()
    ctx = parts.new_job_context(proc, console_job(config), room, ended.finish)
    with parts.current_job(ctx):
        session: AgentSession[Any] | None = None
        try:
            try:
                session = new_agent_session(config, proc)
                session.on("close", lambda e: ended.finish(f"session closed ({e.reason.value})"))
                on_session(session)
                agent = config.build()
                # capture_run: the start's own turn (a reply on_enter asks for) is awaited too.
                entered = await session.start(agent=agent, capture_run=True)
                greeting = say_greeting(session, config)
                if entered is not None:
                    await entered
                if greeting is not None:
                    await greeting
            except Exception as exc:
                reason = str(exc) if isinstance(exc, OpenRTCError) else _named(exc)
                raise ConsoleError(f"the agent failed to start: {reason}") from exc
            yield session
        finally:
            with anyio.CancelScope(shield=True):
                await _close(ctx, room, session, ended.reason or "console closed")


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def run_text(
    config: AgentConfig, proc: JobProcess, lines: TextIO, out: TextIO, err: TextIO
) -> None:
    """Talk to the agent by text: each line of ``lines`` a user turn, its reply a line of ``out``.

    The greeting (what the agent says before the first turn) is the first
    line, when it says anything; blank input lines are skipped; the agent's
    tool calls go to ``err``, one line each. Returns at the end of ``lines``
    or when the agent ends the call; raises :class:`ConsoleError` when a turn fails.
    """
    ended = _Ended()
    said: list[_Said] = []
    failure: ConsoleError | None = None

    def emit(texts: list[str]) -> None:
        if texts:
            print(reply_line(texts), file=out, flush=True)

    async def converse(session: AgentSession[Any], done: anyio.CancelScope) -> None:
        nonlocal failure
        while True:
            line = await anyio.to_thread.run_sync(lines.readline, abandon_on_cancel=True)
            if not line:
                break
            if not line.strip():
                continue
            try:
                await session.run(user_input=line.strip())
            except Exception as exc:
                failure = ConsoleError(f"the agent failed to answer: {_named(exc)}")
                break
            finally:
                emit(said[0].take())
        done.cancel()

    async with _started(config, proc, ended, lambda s: said.append(_Said(s, err))) as session:
        emit(said[0].take())
        async with anyio.create_task_group() as tg:
            tg.start_soon(converse, session, tg.cancel_scope)
            await ended.event.wait()  # the agent ended the call
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


def sound_devices(input_device: int | str | None, output_device: int | str | None) -> None:
    """Raise :class:`ConsoleError` (one line) unless both sound devices can be opened here."""
    try:
        import sounddevice as sd  # type: ignore[import-untyped]
    except (ImportError, OSError) as exc:
        raise ConsoleError(f"no sound devices here ({exc}); use --text") from None
    for device, kind in ((input_device, "input"), (output_device, "output")):
        try:
            sd.query_devices(device, kind=kind)
        except Exception as exc:
            raise ConsoleError(f"no {kind} sound device here ({exc}); use --text") from None


def run_audio(
    config: AgentConfig,
    proc: JobProcess,
    *,
    input_device: int | str | None = None,
    output_device: int | str | None = None,
) -> None:
    """Talk to the agent through this machine's microphone and speaker, until Ctrl+C.

    livekit-agents' local console owns the terminal (its text mode is Ctrl+T
    away); the session runs in a thread of its own, as it does under
    livekit-agents' ``console``. Raises :class:`ConsoleError` before taking
    the terminal when a sound device is missing.
    """
    sound_devices(input_device, output_device)
    console = parts.local_console("audio")

    async def serve() -> None:
        ended = _Ended()  # made on the session's loop, which it belongs to
        async with _started(config, proc, ended, lambda _: None):
            await ended.event.wait()

    # The console's loops block this thread until a key or a signal: the
    # session ending by itself interrupts them as Ctrl+C would (SIGUSR1, so a
    # signal that arrives once they are left is ignored).
    looping = threading.Event()

    def interrupt(_signum: int, _frame: Any) -> None:
        if looping.is_set():
            raise KeyboardInterrupt

    main = threading.main_thread().ident

    def interrupt_main(_: Any) -> None:
        if looping.is_set() and main is not None:
            signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    failure: BaseException | None = None
    try:
        with anyio.from_thread.start_blocking_portal() as portal, parts.terminal_kept():
            served = portal.start_task_soon(serve)
            served.add_done_callback(interrupt_main)
            try:
                while not console.io_acquired and not served.done():
                    time.sleep(_POLL)
                looping.set()
                while not served.done() and parts.console_mode_until_toggled(
                    console, input_device=input_device, output_device=output_device
                ):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                looping.clear()
                served.cancel()  # the session closes; leaving the portal waits for that
            if not served.cancelled():
                failure = served.exception()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    if failure is not None:
        if isinstance(failure, ConsoleError):
            raise failure
        raise ConsoleError(f"the agent session failed: {_named(failure)}")

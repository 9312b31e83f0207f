"""The parts of livekit-agents the session seam relies on that are not public API, in one place.

:mod:`openrtc.session.session` runs a job as livekit-agents' own job process
does, which takes constructors, private attributes and module-private hooks
that the framework does not promise to keep. The seam reaches them only
through this module, and :data:`PARTS` lists every one of them (with the
signatures and members relied on); ``tests/test_session_seam.py`` checks each
entry by name, so an upgrade that moves one fails there, naming it, instead of
sessions failing at run time. ``pyproject.toml`` pins the minor series for the
same reason.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal

from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.job import (
    JobAcceptArguments,
    JobContext,
    JobExecutorType,
    JobProcess,
    RunningJobInfo,
    _JobContextVar,
)
from livekit.agents.utils import http_context
from livekit.agents.voice.room_io import types as room_io_types

__all__ = [
    "PARTS",
    "JobAcceptArguments",
    "JobContext",
    "JobExecutorType",
    "JobProcess",
    "Part",
    "RunningJobInfo",
    "cleanup_job_context",
    "close_http_context",
    "console_mode_until_toggled",
    "current_job",
    "default_text_input",
    "local_console",
    "new_job_context",
    "room_sid",
    "session_userdata",
    "shutdown_callbacks",
    "terminal_kept",
]


@dataclass(frozen=True, slots=True)
class Part:
    """One part of livekit-agents (or livekit-rtc) the seam relies on.

    ``owner``: the dotted path of the module or class that holds it;
    ``name``: the attribute. ``kind`` says what is relied on: ``"callable"``,
    that it can be called and takes the parameters named in ``expect`` (the
    seam passes them by keyword);
    ``"attribute"``, that the owner has it; ``"instance"``, that an instance of
    the owner has it (set by its constructor); ``"members"``, that the enum or
    ``Literal`` has at least the members (values) in ``expect``.
    """

    owner: str
    name: str
    kind: Literal["callable", "attribute", "instance", "members"]
    why: str
    expect: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.owner}.{self.name}"


_JOB: Final = "livekit.agents.job"
_CONTEXT: Final = "livekit.agents.job.JobContext"
_HTTP: Final = "livekit.agents.utils.http_context"
_SESSION: Final = "livekit.agents.voice.agent_session.AgentSession"
_EVENTS: Final = "livekit.agents.voice.events"
_ROOM_IO_TYPES: Final = "livekit.agents.voice.room_io.types"
_LEGACY_CLI: Final = "livekit.agents.cli._legacy"
_CONSOLE: Final = "livekit.agents.cli.cli.AgentsConsole"

#: The AgentSession events the seam listens to (``session.on(...)``).
SESSION_EVENTS: Final = (
    "close",
    "agent_state_changed",
    "user_state_changed",
    "conversation_item_added",
    "function_tools_executed",
    "tool_execution_updated",
)

#: Every non-public part of livekit-agents (and livekit-rtc) the seam relies on.
PARTS: Final[tuple[Part, ...]] = (
    Part(
        _JOB,
        "RunningJobInfo",
        "callable",
        "the job as the framework's job process receives it",
        ("accept_arguments", "job", "url", "token", "worker_id", "fake_job"),
    ),
    Part(
        _JOB,
        "JobAcceptArguments",
        "callable",
        "the identity and attributes LiveKit was answered with",
        ("name", "identity", "metadata", "attributes"),
    ),
    Part(
        _JOB,
        "JobContext",
        "callable",
        "built by hand: ctx.job, ctx.room, get_job_context() for agent code",
        ("proc", "info", "room", "on_connect", "on_shutdown", "inference_executor"),
    ),
    Part(_CONTEXT, "_on_setup", "callable", "what the job process runs before the entrypoint"),
    Part(_CONTEXT, "_on_cleanup", "callable", "what the job process runs after the shutdown"),
    Part(_CONTEXT, "connect", "callable", "joins the room (the session's join)"),
    Part(
        _CONTEXT,
        "_shutdown_callbacks",
        "instance",
        "run by the seam's close, as the job process runs them",
    ),
    Part(
        _JOB,
        "JobProcess",
        "callable",
        "the per-process object prewarm functions get",
        ("executor_type", "user_arguments", "http_proxy"),
    ),
    Part(_JOB, "JobExecutorType", "members", "the JobProcess's kind", ("PROCESS", "THREAD")),
    Part(_JOB, "_JobContextVar", "attribute", "what get_job_context() reads"),
    Part(_HTTP, "_new_session_ctx", "callable", "the session's HTTP client, as a job gets one"),
    Part(_HTTP, "_close_http_ctx", "callable", "closes that client at the session's end"),
    Part(_SESSION, "_userdata", "instance", "checkpointed and restored as set (no getter raise)"),
    Part(
        _ROOM_IO_TYPES,
        "_default_text_input_cb",
        "callable",
        "a caller's typed line, answered as livekit-agents does (when not paused)",
        ("sess", "ev"),
    ),
    Part(
        _EVENTS,
        "EventTypes",
        "members",
        "the session events the seam listens to",
        SESSION_EVENTS,
    ),
    Part(
        _EVENTS,
        "CloseReason",
        "members",
        "a close for these is the agent ending the call",
        ("USER_INITIATED", "TASK_COMPLETED"),
    ),
    Part(
        "livekit.agents.llm.ChatContext",
        "to_dict",
        "callable",
        "the checkpoint's history",
        ("exclude_timestamp", "exclude_config_update"),
    ),
    Part("livekit.agents.Agent", "on_enter", "callable", "called on the instance: shadowed"),
    Part("livekit.rtc.Room", "_info", "instance", "the room's sid, kept current by the server"),
    # openrtc console's audio mode: livekit-agents' local console, without its worker.
    Part(_LEGACY_CLI, "AgentsConsole", "callable", "the local console: sound devices, text mode"),
    Part(
        _CONSOLE,
        "_instance",
        "attribute",
        "the console AgentSession.start consults (livekit-agents' console sets it so too)",
    ),
    Part(
        _LEGACY_CLI,
        "_audio_mode",
        "callable",
        "the console's audio mode, until Ctrl+T",
        ("input_device", "output_device"),
    ),
    Part(_LEGACY_CLI, "_text_mode", "callable", "the console's text mode, until Ctrl+T or Ctrl+C"),
    Part(_LEGACY_CLI, "_ToggleMode", "attribute", "what the console's modes raise on Ctrl+T"),
)


def local_console(mode: Literal["audio", "text"]) -> Any:
    """livekit-agents' local console, made the one the next ``AgentSession.start`` takes
    its sound (or text) from, as its ``console`` command makes it."""
    from livekit.agents.cli import _legacy, cli

    console = _legacy.AgentsConsole.get_instance()
    cli.AgentsConsole._instance = console  # type: ignore[assignment]
    console.console_mode = mode
    console.enabled = True
    return console


def console_mode_until_toggled(
    console: Any, *, input_device: int | str | None, output_device: int | str | None
) -> bool:
    """Run the console's current mode: ``True`` when Ctrl+T switched it, ``False`` at its end."""
    from livekit.agents.cli import _legacy

    try:
        if console.console_mode == "text":
            _legacy._text_mode(console)
            return False
        _legacy._audio_mode(console, input_device=input_device, output_device=output_device)  # type: ignore[arg-type]
    except _legacy._ToggleMode:
        console.console_mode = "audio" if console.console_mode == "text" else "text"
        return True
    return False


@contextmanager
def terminal_kept() -> Iterator[None]:
    """The terminal's settings restored on the way out (the console reads keys raw)."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except Exception:  # not a terminal: nothing to restore
        yield
        return
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def new_job_context(
    proc: JobProcess, info: RunningJobInfo, room: rtc.Room, on_shutdown: Callable[[str], None]
) -> JobContext:
    """The job context livekit-agents' job process builds, set up for the entrypoint."""
    ctx = JobContext(
        proc=proc,
        info=info,
        room=room,
        on_connect=lambda: None,
        on_shutdown=on_shutdown,
        inference_executor=None,  # type: ignore[arg-type]  # only turn detectors use it
    )
    ctx._on_setup()
    return ctx


@contextmanager
def current_job(ctx: JobContext) -> Iterator[None]:
    """``ctx`` as the job agent code sees (``get_job_context()``), with its HTTP client."""
    token = _JobContextVar.set(ctx)
    http_context._new_session_ctx()
    try:
        yield
    finally:
        _JobContextVar.reset(token)


def shutdown_callbacks(ctx: JobContext) -> list[Callable[[str], Awaitable[None]]]:
    """The agent's shutdown callbacks (``ctx.add_shutdown_callback``), in order."""
    return list(ctx._shutdown_callbacks)


async def cleanup_job_context(ctx: JobContext) -> None:
    await ctx._on_cleanup()


async def close_http_context() -> None:
    """Close the session's HTTP client (see :func:`current_job`)."""
    await http_context._close_http_ctx()


def room_sid(room: rtc.Room) -> str:
    """The room's sid, kept current by the server's updates (no public event)."""
    return room._info.sid


async def default_text_input(session: AgentSession[Any], event: Any) -> None:
    """What livekit-agents does with a caller's typed line (interrupt, then reply)."""
    await room_io_types._default_text_input_cb(sess=session, ev=event)


def session_userdata(session: AgentSession[Any]) -> Any:
    """The session's userdata, ``None`` when unset (the property raises then)."""
    return session._userdata

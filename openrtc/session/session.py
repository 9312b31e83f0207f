"""Run one job's agent session in its room, as livekit-agents' own job runner would.

This is the worker's seam into livekit-agents. It builds the same objects the
framework's job process builds (``RunningJobInfo``, ``JobProcess``,
``JobContext``) so the user's agent code runs unchanged: ``get_job_context()``
and ``ctx.job`` give the real job id and metadata, tools, ``on_enter`` and node
hooks work. Those constructors are not public API: every part of
livekit-agents relied on is reached through, and listed in,
:mod:`openrtc.session.livekit_parts`; ``pyproject.toml`` pins livekit-agents
to one minor series and ``tests/test_session_seam.py`` fails by name when an
upgrade moves one.

A session runs as named steps (:class:`_SessionRun`): build the agent session
and the agent, join, look whether the room was already replaced, then, with
the replaced-room watcher running from the join on, announce, start and
greet; watch for the end (caller left or room gone, the worker's stop, a
replaced room, the agent ending the call); close.

The room token is minted by the worker from the API secret it holds, for the
identity the dispatcher answered LiveKit with, and used only against the
worker's own configured LiveKit URL: the stream never carries a bearer
credential and an entry never decides where one is sent (docs/delivery.md,
"Tokens"). A ``process``-isolation child receives the token, not the secret.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import anyio
from livekit import api, rtc
from livekit.agents import Agent, AgentSession, CloseReason, ToolCallStarted, llm, metrics, voice

from openrtc.agents.observers import Observer, observe, starts_call
from openrtc.agents.registry import AgentConfig, redact_numbers
from openrtc.agents.reloading import is_pinned
from openrtc.agents.tenants import (
    TenantConfig,
    TenantSettings,
    tenant_scope,
    tenant_settings,
    tenant_settings_scope,
)
from openrtc.errors import AgentBuildError
from openrtc.ops.logs import log_context
from openrtc.session import live
from openrtc.session import livekit_parts as parts
from openrtc.session.live import LiveState
from openrtc.session.livekit_parts import (
    JobAcceptArguments,
    JobContext,
    JobExecutorType,
    JobProcess,
    RunningJobInfo,
)
from openrtc.settings import DEFAULT_OBSERVER_TIMEOUT, LiveKitSettings
from openrtc.store.checkpoint import Checkpoint, agent_has_spoken, mark_interrupted, plain_data
from openrtc.wire.messages import (
    JOINED_ATTRIBUTE,
    JobMessage,
    agent_identity,
    participant_attributes,
)
from openrtc.wire.reports import CallTally, cap_transcript

__all__ = [
    "RoomAccess",
    "SessionControl",
    "SessionOutcome",
    "mint_token",
    "new_agent_session",
    "new_job_process",
    "room_access",
    "run_session",
    "say_greeting",
    "with_tenant",
]

logger = logging.getLogger("openrtc.session")

#: The attribute LiveKit stamps on an agent's token with its registered name.
LIVEKIT_AGENT_NAME_ATTRIBUTE: Final = "lk.agent_name"
#: LiveKit's own agent token lifetime (``BuildAgentToken``). Long calls need no
#: more: the server sends connected participants a refreshed token every 5 min.
TOKEN_TTL: Final = datetime.timedelta(hours=1)
CLOSE_TIMEOUT: Final = 10.0
#: A session's outcome reason when the agent could not be built (before the join).
AGENT_NOT_BUILT: Final = "the agent could not be built"
#: Why a session closes when its agent ended the call (the worker closing it
#: finishes the session first, with its own reason).
_ENDED_BY_AGENT: Final = frozenset({CloseReason.USER_INITIATED, CloseReason.TASK_COMPLETED})
#: After a reconnect or an agent joining, how long to look for the room's new sid.
ROOM_SID_WAIT: Final = 10.0
ROOM_SID_POLL: Final = 0.1
#: Shortest time between two checkpoints of one session: turns that come
#: faster are coalesced into one write of the latest state.
CHECKPOINT_INTERVAL: Final = 0.05
#: Asked to hand its call over, a session waits at most this long for a turn
#: boundary (neither the agent nor the caller speaking), then hands over anyway.
HANDOVER_TURN_WAIT: Final = 10.0
#: A hot reload's move of a call waits this long for the new agent to run.
MOVE_TIMEOUT: Final = 5.0
#: How long announcing the join may hold up the session's start.
ANNOUNCE_TIMEOUT: Final = 2.0


async def _announce(room: rtc.Room, job_id: str) -> None:
    """Tell the room's participants at once that this agent is in
    (:data:`~openrtc.wire.messages.JOINED_ATTRIBUTE`): an older job's agent there
    leaves now, not seconds later when this session has started."""
    try:
        with anyio.fail_after(ANNOUNCE_TIMEOUT):
            await room.local_participant.set_attributes(
                {JOINED_ATTRIBUTE: str(int(time.time() * 1000))}
            )
    except Exception as exc:  # the next batch of updates tells them anyway
        logger.warning("job %s: join not announced: %s", job_id, exc)


def _between_turns(session: AgentSession[Any]) -> bool:
    """Neither side is speaking and the agent is not preparing a reply."""
    return session.agent_state in ("listening", "idle") and session.user_state != "speaking"


async def _turn_boundary(session: AgentSession[Any]) -> None:
    """Until the session is between turns (at once if it is)."""
    wake = [anyio.Event()]

    def _on_state(_: Any) -> None:
        wake[0].set()

    session.on("agent_state_changed", _on_state)
    session.on("user_state_changed", _on_state)
    try:
        while not _between_turns(session):
            await wake[0].wait()
            wake[0] = anyio.Event()
    finally:
        session.off("agent_state_changed", _on_state)
        session.off("user_state_changed", _on_state)


@dataclass
class SessionOutcome:
    """How a session ended.

    ``success``: the call ended (room deleted, caller left, terminated) and the
    job is done. ``failed``: the agent could not run (``error`` says why); the
    job may be retried. ``taken_over``: another worker joined with the job's
    identity; this one steps aside without acknowledging anything.
    """

    status: Literal["success", "failed", "taken_over"]
    reason: str
    error: str = ""
    #: The agent ended the call (``ctx.shutdown()``, ``session.shutdown()``),
    #: while the caller may stay: the room is not to be dispatched again.
    ended_by_agent: bool = False
    #: The call's totals so far, this session's included
    #: (:class:`~openrtc.wire.reports.CallTally` as a dict), with the
    #: ``transcript`` where the agent keeps one: what the call's report is made
    #: of if this session ends the call. ``None``: the session never started.
    call: dict[str, Any] | None = None


@dataclass
class SessionControl:
    """The worker's handle on a running session."""

    joined: anyio.Event = field(default_factory=anyio.Event)
    _stop: anyio.Event = field(default_factory=anyio.Event)
    stop_reason: str = ""
    takeover: bool = False
    #: The job's last checkpoint (encoded), when this session takes a call over.
    resume: bytes | None = None
    #: Where checkpoints go (must not block); ``None``: this session keeps none.
    checkpoint: Callable[[bytes], None] | None = None
    checkpoint_max_bytes: int = 0
    #: This session takes its call over from a draining worker (a handover):
    #: it resumes from ``resume`` without the agent's resume line.
    handover: bool = False
    #: The caller was greeted by an earlier session of the call, whatever the
    #: checkpoint says (one Redis lost): the agent does not greet again.
    greeted: bool = False
    #: Told the sid of the room this session is in when it is not the job's
    #: (LiveKit made the room anew, a restart); must not block. ``None``: untold.
    room_remade: Callable[[str], None] | None = None
    #: Set by the session once it is at a turn boundary after :meth:`ask_handover`
    #: and its last checkpoint was offered: the call can go to a peer now.
    handover_ready: anyio.Event = field(default_factory=anyio.Event)
    _handover_asked: anyio.Event = field(default_factory=anyio.Event)
    _handover_off: anyio.Event = field(default_factory=anyio.Event)
    #: The agent's reloaded configuration (hot reload), once :meth:`ask_reload` was asked.
    reloaded: AgentConfig | None = None
    _reload_asked: anyio.Event = field(default_factory=anyio.Event)
    #: Moves of the call to reloaded code so far (hot reload; the agent runs it now).
    moves: int = 0
    #: Told of each move too (a session process tells its worker); must not block.
    on_moved: Callable[[], None] | None = None
    #: The session process's pid (``process`` isolation; 0: none): the memory guard
    #: measures it.
    pid: int = 0
    #: The ``@on_session_start`` observers, run if this session starts its call
    #: (:func:`~openrtc.agents.observers.starts_call`), each bounded by ``observer_timeout``.
    on_start: Sequence[Observer] = ()
    observer_timeout: float = DEFAULT_OBSERVER_TIMEOUT
    #: Told the hook of each observer call that raised or timed out (a session
    #: process tells its worker); must not block.
    observer_failed: Callable[[str], None] | None = None
    #: What ``openrtc top`` shows of the session; written by it (or its process's lines).
    live: LiveState = field(default_factory=LiveState)
    #: The call's tenant's settings, credentials resolved (``tenants.toml``), fixed
    #: when the call starts here; ``None``: no overrides (no tenants file).
    tenant: TenantSettings | None = field(default=None, repr=False)

    def stop(self, reason: str, *, takeover: bool = False) -> None:
        """End the session (idempotent; the first reason wins)."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self.takeover = takeover
            self._stop.set()

    def ask_handover(self) -> None:
        """Ask the session for a turn boundary and its last checkpoint (see ``handover_ready``).

        May be asked again after a handover that went nowhere (Redis lost the
        released entry): ``handover_ready`` is then a new event.
        """
        if self.handover_ready.is_set():
            self.handover_ready = anyio.Event()
        self._handover_off.set()  # a new ask: the previous handover, if any, is over
        self._handover_off = anyio.Event()
        self._handover_asked.set()

    async def wait_handover_asked(self) -> None:
        """Until a handover is asked; each ask is answered once."""
        await self._handover_asked.wait()
        self._handover_asked = anyio.Event()

    def call_off_handover(self) -> None:
        """The asked handover went nowhere (not released, or Redis lost the released
        entry): the session takes turns again until it is asked anew."""
        self._handover_off.set()

    async def wait_handover_off(self) -> None:
        """Until the current handover is called off (see :meth:`call_off_handover`)."""
        await self._handover_off.wait()

    def ask_reload(self, config: AgentConfig) -> None:
        """Move the call to ``config``'s (reloaded) code at its next turn boundary."""
        self.reloaded = config
        self._reload_asked.set()

    async def wait_reload_asked(self) -> AgentConfig:
        """Until a reload is asked; the latest reloaded configuration."""
        await self._reload_asked.wait()
        self._reload_asked = anyio.Event()
        assert self.reloaded is not None
        return self.reloaded

    def moved(self) -> None:
        """The call runs the reloaded code now."""
        self.moves += 1
        if self.on_moved is not None:
            self.on_moved()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_stop(self) -> None:
        await self._stop.wait()


def new_job_process(isolation: Literal["coroutine", "process"]) -> JobProcess:
    """The per-process object livekit-agents hands to prewarm functions."""
    executor = JobExecutorType.PROCESS if isolation == "process" else JobExecutorType.THREAD
    return JobProcess(executor_type=executor, user_arguments=None, http_proxy=None)


def new_agent_session(config: AgentConfig, proc: JobProcess) -> AgentSession[Any]:
    """The agent's session from its providers (pool defaults where unset), not started.

    What every session of the agent runs on: the worker's, in its room, and
    ``openrtc console``'s, without one. ``proc`` is the prewarmed process
    object (a VAD a ``prewarm`` loaded into ``proc.userdata["vad"]`` is used).
    """
    options = dict(config.session_kwargs)
    if config.stt is None:
        # Nothing to detect turns with (text input needs none): say so,
        # instead of livekit-agents warning on every session that its
        # turn detector has no VAD.
        options.setdefault("turn_detection", "manual")
    return AgentSession(
        stt=config.stt,  # type: ignore[arg-type]
        llm=config.llm,  # type: ignore[arg-type]
        tts=config.tts,  # type: ignore[arg-type]
        vad=proc.userdata.get("vad"),
        **options,
    )


def with_tenant(config: AgentConfig, tenant: TenantConfig) -> AgentConfig:
    """``config`` with the tenant's provider and greeting overrides (``tenants.toml``).

    A provider the tenant names replaces the agent's (provider strings are
    made providers as the agent's are); ``greeting = ""`` silences the greeting.
    """
    from openrtc.agents.compat import resolve_provider

    changes: dict[str, Any] = {
        key: resolve_provider(value)
        for key, value in (("stt", tenant.stt), ("llm", tenant.llm), ("tts", tenant.tts))
        if value is not None
    }
    if tenant.greeting is not None:
        changes["greeting"] = tenant.greeting or None
    return dataclasses.replace(config, **changes) if changes else config


def say_greeting(session: AgentSession[Any], config: AgentConfig) -> voice.SpeechHandle | None:
    """The agent's greeting, said now; ``None`` when it has none."""
    return session.say(config.greeting) if config.greeting else None


@dataclass(frozen=True, slots=True)
class RoomAccess:
    """Where a session connects and the room token it connects with."""

    url: str
    token: str = field(repr=False)


def mint_token(credentials: LiveKitSettings, message: JobMessage) -> str:
    """A room token equivalent to the one LiveKit minted for the dispatcher's answer.

    Kind AGENT, valid :data:`TOKEN_TTL`, for the job's room and the job's agent
    identity only: raises ``ValueError`` for a message that names another
    identity (decoding already refuses those entries; this is the last line
    before a credential is signed). The participant name is the routed agent's
    name, whatever the entry says (``dlq replay --agent`` changes the agent).
    """
    expected = agent_identity(message.job_id)
    if message.accept.identity != expected:
        raise ValueError(
            f"participant identity {message.accept.identity[:80]!r} is not the job's ({expected!r})"
        )
    attributes = dict(message.accept.attributes)
    attributes[LIVEKIT_AGENT_NAME_ATTRIBUTE] = message.job.agent_name
    attributes.update(
        participant_attributes(room_created_ms=message.room_created_ms, queued_ms=message.queued_ms)
    )
    return (
        api.AccessToken(credentials.api_key, credentials.api_secret)
        .with_identity(message.accept.identity)
        .with_name(message.agent)
        .with_metadata(message.accept.metadata)
        .with_attributes(attributes)
        .with_kind("agent")
        .with_ttl(TOKEN_TTL)
        .with_grants(
            api.VideoGrants(
                room_join=True,
                room=message.room,
                agent=True,
                can_publish=True,
                can_subscribe=True,
                can_publish_data=True,
                can_update_own_metadata=True,
            )
        )
        .to_jwt()
    )


def room_access(credentials: LiveKitSettings, message: JobMessage) -> RoomAccess:
    """The worker's own LiveKit URL and a token for the job (``message.livekit_url`` is unused)."""
    return RoomAccess(credentials.ws_url, mint_token(credentials, message))


async def run_session(
    message: JobMessage,
    config: AgentConfig,
    access: LiveKitSettings | RoomAccess,
    proc: JobProcess,
    control: SessionControl,
    *,
    worker_id: str,
) -> SessionOutcome:
    """Join the job's room as its agent and run the agent until the call ends.

    ``access``: the worker's credentials (the token is minted here), or a
    :class:`RoomAccess` minted by the parent of a session process.
    """
    # Its tasks' loop time is the session's, as every line they log names the job.
    live.attribute_to(control.live)
    # The agent's code reads the call's tenant (openrtc.current_tenant()) and its
    # settings (openrtc.tenant_settings()), in this process or in a session
    # process alike: both run the session here.
    tenant = control.tenant or TenantSettings(TenantConfig(message.tenant))
    config = with_tenant(config, tenant.config)
    with (
        log_context(
            job_id=message.job_id,
            agent=message.agent,
            tenant=message.tenant,
            room=message.room,
            worker_id=worker_id,
        ),
        tenant_scope(message.tenant),
        tenant_settings_scope(tenant),
    ):
        return await _run_session(message, config, access, proc, control, worker_id=worker_id)


async def _run_session(
    message: JobMessage,
    config: AgentConfig,
    access: LiveKitSettings | RoomAccess,
    proc: JobProcess,
    control: SessionControl,
    *,
    worker_id: str,
) -> SessionOutcome:
    if isinstance(access, LiveKitSettings):
        try:
            access = room_access(access, message)
        except ValueError as exc:
            return SessionOutcome("failed", "no room token for this job", str(exc))
    run = _SessionRun(message, config, proc, control, _running_job_info(message, access, worker_id))
    with parts.current_job(run.ctx):
        try:
            return await run.serve()
        finally:
            with anyio.CancelScope(shield=True):
                await run.close()


def _running_job_info(message: JobMessage, access: RoomAccess, worker_id: str) -> RunningJobInfo:
    """What livekit-agents' job process is given for this job."""
    return RunningJobInfo(
        accept_arguments=JobAcceptArguments(
            name=message.agent,
            identity=message.accept.identity,
            metadata=message.accept.metadata,
            attributes=dict(message.accept.attributes),
        ),
        job=message.job,
        url=access.url,
        token=access.token,
        worker_id=worker_id,
        fake_job=False,
    )


class _End:
    """Why the session ends: the first reason reported wins."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.reason: str | None = None
        #: The room's disconnect reason (``rtc.DisconnectReason`` name), if that ended it.
        self.disconnect = ""
        #: The agent ended the call.
        self.on_purpose = False
        #: Another agent serves the room now: leave it before closing the session.
        self.replaced = False

    def finish(
        self, reason: str, *, disconnect: str = "", on_purpose: bool = False, replaced: bool = False
    ) -> None:
        if not self._event.is_set():
            self.reason = reason
            self.disconnect, self.on_purpose, self.replaced = disconnect, on_purpose, replaced
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def on_disconnected(self, reason: Any = None) -> None:
        """The room's ``disconnected`` event."""
        name = str(reason)
        if isinstance(reason, int):
            name = rtc.DisconnectReason.Name(reason)  # type: ignore[arg-type]
        self.finish(f"room disconnected ({name})", disconnect=name)

    def on_job_shutdown(self, reason: str) -> None:
        """The job context's shutdown (``ctx.shutdown()`` by the agent)."""
        self.finish(reason or "shutdown requested by the agent", on_purpose=True)

    def on_session_close(self, event: Any) -> None:
        """The agent session's ``close`` event."""
        self.finish(
            f"session closed ({event.reason.value})", on_purpose=event.reason in _ENDED_BY_AGENT
        )


class _RoomWatch:
    """Whether the server replaced this session's room (see ``JobMessage.replaced_by``),
    or made it anew with this session in it (:meth:`remade_sid`).

    Marks as changed what may show it: a reconnect, an agent joining.
    """

    def __init__(self, room: rtc.Room, message: JobMessage) -> None:
        self._room = room
        self._message = message
        self._changed = anyio.Event()
        self._sid = message.job.room.sid
        room.on("reconnected", lambda: self.changed())
        room.on("participant_connected", self._on_participant)

    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        if participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self.changed()

    def changed(self) -> None:
        self._changed.set()

    async def wait_changed(self) -> None:
        """Until something changed since the last wait."""
        await self._changed.wait()
        self._changed = anyio.Event()

    def replaced_by(self) -> str:
        """The agent that serves this room now, if the server replaced it."""
        room = self._room
        if room.connection_state != rtc.ConnectionState.CONN_CONNECTED:
            # Leaving in the middle of a reconnect does not stop it: the
            # engine finished rejoining after disconnect() and left a ghost
            # agent in the room. Decide once the connection has settled.
            return ""
        agents = [
            (other.identity, other.attributes)
            for other in room.remote_participants.values()
            if other.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ]
        return self._message.replaced_by(parts.room_sid(room), agents)

    def remade_sid(self) -> str:
        """The room's sid when it is not the last one seen (LiveKit made it anew), once each."""
        if self._room.connection_state != rtc.ConnectionState.CONN_CONNECTED:
            return ""
        sid = parts.room_sid(self._room)
        if not sid or sid == self._sid:
            return ""
        self._sid = sid
        return sid


class _SessionRun:
    """One session of a job, as named steps; :meth:`serve` runs them, :meth:`close` ends it."""

    def __init__(
        self,
        message: JobMessage,
        config: AgentConfig,
        proc: JobProcess,
        control: SessionControl,
        info: RunningJobInfo,
    ) -> None:
        self.message = message
        self.config = config
        self.proc = proc
        self.control = control
        self.room = rtc.Room()
        self.end = _End()
        self.watch = _RoomWatch(self.room, message)
        self.room.on("disconnected", self.end.on_disconnected)
        self.ctx = parts.new_job_context(proc, info, self.room, self.end.on_job_shutdown)
        self.session: AgentSession[Any] | None = None
        self.saving: _Checkpointing | None = None
        self.worker_id = info.worker_id
        self.usage: _CallUsage | None = None
        #: This session is its call's first (set once its checkpoint is read).
        self.starts_call = False
        self.inputs = _Inputs(message.job_id)

    async def serve(self) -> SessionOutcome:
        """Build, join, start and run the session until its end; how it ended."""
        try:
            session = self.session = self._new_agent_session()
            saved = self._saved_checkpoint(session)
            agent = await self._build_agent(session, saved)
            if isinstance(agent, SessionOutcome):
                return agent
            await self._join()
            # Joining may itself show the room was replaced: a session that
            # (re)joins after the newer room's agent is in sees no event for
            # it. Leave before a word is said.
            if successor := self.watch.replaced_by():
                self.end.finish(
                    f"room replaced by the server; {successor} serves it now", replaced=True
                )
                return SessionOutcome("success", self.end.reason or "", call=self._call())
        except Exception as exc:
            return self._failed_to_start(exc)
        async with anyio.create_task_group() as tg:
            # From the join on, not after the start: an agent whose start is
            # slow (toolsets, MCP servers: seconds) would keep a replaced room.
            tg.start_soon(self._leave_a_replaced_room)
            if failed := await self._start(session, agent, saved):
                tg.cancel_scope.cancel()
                return failed
            if self.starts_call:
                # Beside the session, after its greeting was asked for: the
                # caller never waits for an observer.
                tg.start_soon(self._observe_start, session)
            tg.start_soon(self._stop_when_told)
            tg.start_soon(self._get_ready_for_a_handover, session)
            tg.start_soon(self._move_to_reloaded_code, session)
            if self.saving is not None:
                tg.start_soon(self.saving.run)
            await self.end.wait()
            tg.cancel_scope.cancel()
        return self._outcome()

    def _new_agent_session(self) -> AgentSession[Any]:
        session = new_agent_session(self.config, self.proc)
        session.on("close", self.end.on_session_close)
        return session

    def _saved_checkpoint(self, session: AgentSession[Any]) -> Checkpoint | None:
        """The checkpoint this session resumes from, if any; checkpointing set up if kept."""
        control, config = self.control, self.config
        self.starts_call = starts_call(
            resumed=bool(control.resume), handover=control.handover, greeted=control.greeted
        )
        saved = Checkpoint.decode(control.resume) if control.resume else None
        if not config.checkpoint:
            saved = None
        tally = CallTally.from_dict(saved.call if saved is not None else None)
        self.usage = _CallUsage(session, tally, self.worker_id, resumed=saved is not None)
        live.follow(session, control.live, started_at=tally.started_at, turns_before=tally.turns)
        if control.checkpoint is not None and config.checkpoint:
            self.saving = _Checkpointing(
                session, control.checkpoint, control.checkpoint_max_bytes, self.usage
            )
        return saved

    async def _build_agent(
        self, session: AgentSession[Any], saved: Checkpoint | None
    ) -> Agent | SessionOutcome:
        """The agent (restored from ``saved``), or the failed outcome.

        Built before the room is joined: a constructor that raises fails the
        session without the caller seeing an agent come and go.
        """
        try:
            if saved is not None:
                return await _restore(session, self.config, saved, self.message.job_id)
            # Agents are constructed without arguments, as livekit-agents'
            # examples and the PyPI openrtc package do.
            return self.config.build()
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, AgentBuildError) else exc
            logger.error("job %s: %s", self.message.job_id, exc)
            return SessionOutcome("failed", AGENT_NOT_BUILT, f"{type(cause).__name__}: {cause}")

    async def _join(self) -> None:
        await self.ctx.connect()
        self.control.joined.set()

    async def _start(
        self, session: AgentSession[Any], agent: Agent, saved: Checkpoint | None
    ) -> SessionOutcome | None:
        """Announce the join, start the agent and greet (or resume); the outcome if that failed."""
        try:
            await _announce(self.room, self.message.job_id)
            self.watch.changed()
            await session.start(agent=agent, room=self.room, room_options=self.inputs.options())
            self._greet(session, saved)
        except Exception as exc:
            if self.end.replaced:
                # It left a replaced room while starting: not the agent's fault.
                logger.info("job %s: start cut short by leaving: %s", self.message.job_id, exc)
                return None
            return self._failed_to_start(exc)
        return None

    def _greet(self, session: AgentSession[Any], saved: Checkpoint | None) -> None:
        """The greeting to a caller not greeted yet; else, on a takeover, the resume line.

        A checkpoint can say "not greeted": its session lost the call before
        the greeting was said. That caller hears the greeting, not an apology
        from an agent it never heard.
        """
        config, control, saving = self.config, self.control, self.saving
        greeted = control.greeted or (
            saved is not None and (saved.greeted or agent_has_spoken(saved.history))
        )
        if saving is not None:
            saving.greeted = greeted
        if not greeted:
            greeting = say_greeting(session, config)
            if greeting is not None and saving is not None:
                greeting.add_done_callback(lambda _: saving.said_greeting())
        elif saved is not None and config.resume_line and not control.handover:
            session.say(config.resume_line)

    async def _observe_start(self, session: AgentSession[Any]) -> None:
        """The ``@on_session_start`` observers, with the live session and the job's context."""
        control = self.control

        def failed(observer: Observer) -> None:
            if control.observer_failed is not None:
                control.observer_failed(observer.hook)

        await observe(
            control.on_start,
            session,
            self.ctx,
            bound=control.observer_timeout,
            failed=failed,
            what=f"job {self.message.job_id}",
        )

    def _failed_to_start(self, exc: Exception) -> SessionOutcome:
        logger.exception("job %s: the agent failed to start", self.message.job_id)
        return SessionOutcome("failed", "agent failed to start", f"{type(exc).__name__}: {exc}")

    async def _stop_when_told(self) -> None:
        await self.control.wait_stop()
        self.end.finish(self.control.stop_reason)

    async def _leave_a_replaced_room(self) -> None:
        """Leave the room once the new job's agent is in it.

        Two agents would talk over each other. Until the new job's agent is
        there, this one keeps the caller company: LiveKit may not have
        dispatched the new room at all. Looked at once at the start too: the
        other job's agent may be there already (a room dispatched twice, this
        job the later).
        """
        self.watch.changed()
        while True:
            await self.watch.wait_changed()
            # The room's new sid comes with no event: look a while.
            for _ in range(int(ROOM_SID_WAIT / ROOM_SID_POLL)):
                if successor := self.watch.replaced_by():
                    self.end.finish(
                        f"room replaced or dispatched twice; {successor} serves it now",
                        replaced=True,
                    )
                    # At once, even while the session still starts: the
                    # caller stops hearing this agent; the session closes after.
                    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                        await _leave(self.room)
                    return
                if (sid := self.watch.remade_sid()) and self.control.room_remade is not None:
                    # Not replaced: still this call, in a new room. A taker
                    # knows the room by this sid once this agent is gone.
                    self.control.room_remade(sid)
                await anyio.sleep(ROOM_SID_POLL)

    async def _get_ready_for_a_handover(self, session: AgentSession[Any]) -> None:
        """On each handover ask: wait for a turn boundary, stop taking turns, offer
        the last checkpoint; take turns again if the handover is called off.

        The peer resumes from that checkpoint and joins seconds later: a line
        this session answered meanwhile would be acknowledged to the caller and
        unknown to the agent that carries the call on. Unanswered, the caller
        says it again to the peer.
        """
        while True:  # asked again when Redis lost the handed-over entry
            await self.control.wait_handover_asked()
            # Between turns, so the peer's checkpoint has the whole last one.
            with anyio.move_on_after(HANDOVER_TURN_WAIT):
                await _turn_boundary(session)
            self.inputs.pause(session)
            if self.saving is not None:
                self.saving.offer_now()
            self.control.handover_ready.set()
            await self.control.wait_handover_off()
            self.inputs.resume(session)
            logger.info("job %s: handover called off; the call goes on here", self.message.job_id)

    async def _move_to_reloaded_code(self, session: AgentSession[Any]) -> None:
        """On each hot reload of the agent's code: move the call to it at a turn boundary.

        The agent is rebuilt from the reloaded class and carries on the
        conversation (its context, userdata and ``checkpoint_state``) without
        entering again: no greeting, no ``on_enter``. A pinned call
        (:func:`openrtc.pin_reload`) stays on the code it started with.
        """
        job_id = self.message.job_id
        while True:
            config = await self.control.wait_reload_asked()
            if is_pinned(session):
                logger.info(
                    "job %s: pinned (pin_reload); it finishes on the code it started with", job_id
                )
                return
            await _turn_boundary(session)
            running = anyio.Event()
            try:
                agent = await _reloaded_agent(session, config, running)
            except Exception as exc:
                logger.error(
                    "job %s: the reloaded agent cannot be built (%s: %s); "
                    "the call stays on the code it has",
                    job_id,
                    type(exc).__name__,
                    exc,
                )
                continue
            # The call keeps its tenant's overrides (those it started with).
            self.config = with_tenant(config, tenant_settings().config)
            session.update_agent(agent)
            with anyio.move_on_after(MOVE_TIMEOUT):
                await running.wait()
            logger.info("job %s: moved to the reloaded code (%s)", job_id, type(agent).__qualname__)
            self.control.moved()

    def _outcome(self) -> SessionOutcome:
        reason = self.end.reason or ""
        if self.control.takeover or self.end.disconnect == "DUPLICATE_IDENTITY":
            return SessionOutcome("taken_over", reason)
        return SessionOutcome(
            "success", reason, ended_by_agent=self.end.on_purpose, call=self._call()
        )

    def _call(self) -> dict[str, Any] | None:
        """The call's totals and, where the agent keeps one, its transcript (redacted)."""
        if self.usage is None:
            return None
        call = self.usage.tally().to_dict()
        if self.config.transcript and self.session is not None:
            call["transcript"] = _transcript(self.session, self.config)
        return call

    async def close(self) -> None:
        reason = self.end.reason if self.end.is_set() else "worker stopping"
        await _close(self.ctx, self.room, self.session, reason or "", leave_first=self.end.replaced)


class _Inputs:
    """The caller's audio and typed lines into the session, which a handover pauses."""

    def __init__(self, job_id: str) -> None:
        self._job_id = job_id
        self._paused = False
        self._audio_was_on = False

    def options(self) -> voice.room_io.RoomOptions:
        """The room options the session starts with: typed lines through :meth:`_text`."""
        return voice.room_io.RoomOptions(
            text_input=voice.room_io.TextInputOptions(text_input_cb=self._text)
        )

    async def _text(self, session: AgentSession[Any], event: voice.room_io.TextInputEvent) -> None:
        if self._paused:
            logger.info("job %s: a typed line while handing over; left to the peer", self._job_id)
            return
        await parts.default_text_input(session, event)

    def pause(self, session: AgentSession[Any]) -> None:
        self._paused = True
        self._audio_was_on = session.input.audio_enabled
        session.input.set_audio_enabled(False)

    def resume(self, session: AgentSession[Any]) -> None:
        self._paused = False
        if self._audio_was_on:
            session.input.set_audio_enabled(True)


class _Checkpointing:
    """Hands the session's latest state to ``sink`` after every committed turn.

    Event handlers only mark the state changed; :meth:`run`, a task of the
    session, builds the checkpoint and offers it, so speech never waits for a
    serialization or a write, and turns in quick succession cost one checkpoint.
    """

    def __init__(
        self,
        session: AgentSession[Any],
        sink: Callable[[bytes], None],
        cap: int,
        usage: _CallUsage | None = None,
    ) -> None:
        self._session = session
        self._sink = sink
        self._cap = cap
        self._usage = usage
        self._changed = anyio.Event()
        self._warned = False
        self.greeted = False
        #: Tool calls seen starting whose output is not in the history yet: a
        #: crash now must show them as interrupted, not forget them.
        self._calls: dict[str, llm.FunctionCall] = {}
        for event in ("conversation_item_added", "function_tools_executed"):
            session.on(event, lambda _: self.touch())
        self._usage_seen: Any = None
        session.on("session_usage_updated", self._on_usage)
        session.on("tool_execution_updated", self._on_tool)

    def touch(self) -> None:
        self._changed.set()

    def said_greeting(self) -> None:
        self.greeted = True
        self.touch()

    def _on_usage(self, event: Any) -> None:
        # A turn's usage arrives after its conversation item, and a takeover
        # must resume the call's totals with it. Sent for every metric, VAD's
        # too (every second or so): only a change is worth a checkpoint.
        seen = [u.model_dump() for u in event.usage.model_usage]
        if seen != self._usage_seen:
            self._usage_seen = seen
            self.touch()

    def _on_tool(self, event: Any) -> None:
        if isinstance(event.update, ToolCallStarted):
            call = event.update.function_call
            self._calls[call.call_id] = call
            self.touch()

    def snapshot(self) -> bytes | None:
        session = self._session
        items = session.history.to_dict(exclude_timestamp=False, exclude_config_update=True)
        history: list[dict[str, Any]] = items["items"]
        done = {i.get("call_id") for i in history if i.get("type") == "function_call_output"}
        listed = {i.get("call_id") for i in history if i.get("type") == "function_call"}
        for call_id in [c for c in self._calls if c in done]:
            del self._calls[call_id]
        for call_id, call in self._calls.items():
            if call_id not in listed:
                history.append(call.model_dump(mode="json", exclude_none=True))
        agent = session.current_agent
        hook = getattr(agent, "checkpoint_state", None)
        state = plain_data(hook()) if callable(hook) else None
        cls = type(agent)
        checkpoint = Checkpoint(
            agent_class=f"{cls.__module__}:{cls.__qualname__}",
            greeted=self.greeted or agent_has_spoken(history),
            history=history,
            userdata=plain_data(parts.session_userdata(session)),
            state=state,
            call=self._usage.tally().to_dict() if self._usage is not None else None,
        )
        return checkpoint.encode(self._cap)

    def offer_now(self) -> None:
        """Hand the current state over at once (a handover's last checkpoint)."""
        self._changed = anyio.Event()
        self._offer()

    def _offer(self) -> None:
        try:
            data = self.snapshot()
        except Exception:
            logger.exception("building a checkpoint failed")
            data = None
        if data is None:
            if not self._warned:
                logger.warning("no checkpoint fits in %d bytes; none written", self._cap)
                self._warned = True
        else:
            self._sink(data)

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            self._offer()
            await anyio.sleep(CHECKPOINT_INTERVAL)


class _CallUsage:
    """The call's totals: those carried in from earlier sessions plus this one's.

    This session's usage is livekit-agents' own (``AgentSession.usage``: its
    ``ModelUsageCollector`` over every ``metrics_collected``, per model);
    turns are the caller's messages committed here; latency samples are read
    off the committed messages' metrics (the LLM's time to first token on the
    agent's, the end-of-turn delay on the caller's).
    """

    def __init__(
        self, session: AgentSession[Any], base: CallTally, worker_id: str, *, resumed: bool
    ) -> None:
        self._session = session
        self._base = base
        if not base.started_at:
            base.started_at = time.time()
        if resumed:
            base.takeovers += 1
        base.workers.append(worker_id)
        self._here = CallTally()
        session.on("conversation_item_added", self._on_item)

    def _on_item(self, event: Any) -> None:
        item = event.item
        if getattr(item, "type", "") != "message":
            return
        measured = getattr(item, "metrics", None) or {}
        if item.role == "user":
            self._here.turns += 1
            if (delay := measured.get("end_of_turn_delay")) is not None:
                self._here.add_end_of_turn(delay)
        elif item.role == "assistant" and (ttft := measured.get("llm_node_ttft")) is not None:
            self._here.add_ttft(ttft)

    def tally(self) -> CallTally:
        """The call's totals now (a new tally)."""
        here = CallTally(
            turns=self._here.turns,
            llm_ttft=self._here.llm_ttft,
            end_of_turn=self._here.end_of_turn,
            llm_ttft_count=self._here.llm_ttft_count,
            end_of_turn_count=self._here.end_of_turn_count,
        )
        for usage in self._session.usage.model_usage:
            if isinstance(usage, metrics.LLMModelUsage):
                here.add_llm(usage.model or usage.provider, usage.input_tokens, usage.output_tokens)
            elif isinstance(usage, metrics.TTSModelUsage):
                here.tts_characters += usage.characters_count
            elif isinstance(usage, metrics.STTModelUsage):
                here.stt_audio_seconds += usage.audio_duration
        return self._base.plus(here)


def _transcript(session: AgentSession[Any], config: AgentConfig) -> list[dict[str, str]]:
    """What was said (the session's history, a resumed call's earlier turns included),
    each line through the agent's redaction hook; a line the hook fails on is left out."""
    redact = config.redact or redact_numbers
    lines: list[dict[str, str]] = []
    for item in session.history.items:
        if item.type != "message" or item.role not in ("user", "assistant"):
            continue
        text = item.text_content or ""
        try:
            kept = redact(item.role, text)
        except Exception as exc:
            logger.warning("the transcript's redaction hook failed (%s); line left out", exc)
            continue
        if kept is not None:
            lines.append({"role": item.role, "text": str(kept)})
    return cap_transcript(lines)


def _agent_class(config: AgentConfig, name: str) -> type[Agent]:
    """The agent class a checkpoint names (``module:qualname``), else the entry agent's.

    Discovered modules are named after their path, which may differ on the
    worker that resumes (a new release): the entry agent's module is searched
    for the same class name too.
    """
    module_name, _, qualname = name.partition(":")
    for module in (sys.modules.get(module_name), sys.modules.get(config.agent_cls.__module__)):
        found: Any = module
        for part in qualname.split(".") if qualname else ():
            found = getattr(found, part, None)
        if module is not None and isinstance(found, type) and issubclass(found, Agent):
            return found
    if name:
        logger.warning(
            "checkpoint names agent %s, not found here: resuming with the entry agent", name
        )
    return config.agent_cls


async def _restore(
    session: AgentSession[Any], config: AgentConfig, saved: Checkpoint, job_id: str
) -> Agent:
    """The active agent of a checkpoint, with its history, userdata and own state back."""
    cls = _agent_class(config, saved.agent_class)
    try:
        agent: Agent = cls()  # type: ignore[call-arg]
    except TypeError:
        # An agent handed off to with constructor arguments cannot be rebuilt
        # from its class alone; the conversation goes on with the entry agent.
        logger.warning("job %s: %s needs arguments; resuming with the entry agent", job_id, cls)
        agent = config.agent_cls()  # type: ignore[call-arg]
    chat_ctx = llm.ChatContext.from_dict({"items": mark_interrupted(saved.history)})
    # The session's history goes on from the checkpoint (later checkpoints
    # keep it); the agent's context is what its model sees.
    session.history.insert(chat_ctx.items)
    await agent.update_chat_ctx(chat_ctx)
    if saved.userdata is not None:
        _restore_userdata(session, saved.userdata)
    restore = getattr(agent, "restore_state", None)
    if saved.state is not None and callable(restore):
        restore(saved.state)
    _resume_instead_of_entering(agent)
    logger.info(
        "job %s: resuming the conversation (%d items, agent %s)",
        job_id,
        len(chat_ctx.items),
        type(agent).__qualname__,
    )
    return agent


async def _reloaded_agent(
    session: AgentSession[Any], config: AgentConfig, running: anyio.Event
) -> Agent:
    """The session's current agent rebuilt from its reloaded class, carrying its state on.

    ``running`` is set once the session runs it (where it would have entered).
    """
    current = session.current_agent
    cls = _agent_class(config, f"{type(current).__module__}:{type(current).__qualname__}")
    try:
        agent: Agent = cls()  # type: ignore[call-arg]
    except TypeError:
        # Handed off to with constructor arguments: the entry agent carries on.
        agent = config.build()
    await agent.update_chat_ctx(current.chat_ctx.copy())
    save, restore = (
        getattr(current, "checkpoint_state", None),
        getattr(agent, "restore_state", None),
    )
    if callable(save) and callable(restore):
        restore(plain_data(save()))
    _resume_instead_of_entering(agent, hook=None, entered=running)
    return agent


def _resume_instead_of_entering(
    agent: Agent, hook: str | None = "on_resume", entered: anyio.Event | None = None
) -> None:
    """The session's start runs the resumed agent's ``hook`` (``on_resume()``), not ``on_enter()``.

    The agent was entered in the session before the takeover: its
    ``on_enter`` (where livekit-agents' examples greet) already ran. Once
    only: a later entry of the same agent (a handoff back) is an entry again.
    """

    async def resumed() -> None:
        delattr(agent, "on_enter")
        if entered is not None:
            entered.set()
        resume = getattr(agent, hook, None) if hook else None
        if callable(resume):
            await resume()

    # livekit-agents calls ``agent.on_enter()`` on the instance: shadowed here.
    setattr(agent, "on_enter", resumed)  # noqa: B010


def _restore_userdata(session: AgentSession[Any], data: dict[str, Any]) -> None:
    current = parts.session_userdata(session)
    if current is None:
        session.userdata = data
    elif isinstance(current, dict):
        current.update(data)
    else:
        # A dataclass or model the agent's session was given: its fields back.
        for key, value in data.items():
            if hasattr(current, key):
                try:
                    setattr(current, key, value)
                except Exception:
                    logger.debug("userdata field %s not restored", key)


async def _close(
    ctx: JobContext,
    room: rtc.Room,
    session: AgentSession[Any] | None,
    reason: str,
    *,
    leave_first: bool = False,
) -> None:
    """End the session, run the agent's shutdown callbacks, leave the room.

    ``leave_first``: another agent serves the room now, so the caller must
    stop hearing this one at once, before the session's own (slower) close.
    """
    with anyio.move_on_after(CLOSE_TIMEOUT) as scope:
        if leave_first:
            await _leave(room)
        if session is not None:
            try:
                await session.aclose()
            except Exception:
                logger.exception("closing the agent session failed")
        for callback in parts.shutdown_callbacks(ctx):
            try:
                await callback(reason)
            except Exception:
                logger.exception("a shutdown callback failed")
        await _leave(room)
        try:
            await parts.cleanup_job_context(ctx)
        except Exception:
            logger.exception("job context cleanup failed")
        try:
            await parts.close_http_context()
        except Exception:
            logger.exception("closing the session's HTTP client failed")
    if scope.cancelled_caught:
        logger.warning("closing the session took more than %.0fs; abandoned", CLOSE_TIMEOUT)


async def _leave(room: rtc.Room) -> None:
    """Leave the room (a no-op once left)."""
    try:
        await room.disconnect()
    except Exception:
        logger.exception("leaving the room failed")

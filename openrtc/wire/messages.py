"""The wire format of every stream entry: jobs, status events, dead letters.

Schema version 1 (field ``v``). All values are bytes on the wire; this module
is the only place that knows the field names. A job entry carries no bearer
credential: workers hold the API secret and mint the room token for the job's
identity themselves (docs/delivery.md, "Tokens").

Decoding never trusts its input: anything missing, mistyped or from a newer
schema raises :class:`MalformedEntry` with a reason, which the consumer turns
into a ``malformed`` dead letter instead of crashing or blocking the stream.
No other exception leaves a decoder, whatever the bytes (``tests/
test_decoders_fuzz.py`` fuzzes each one), and every reason is bounded to
:data:`ERROR_TEXT_MAX` characters: it is written to logs and dead letters.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson
from google.protobuf.message import DecodeError
from livekit.protocol.agent import Job

from openrtc.agents.registry import NAME_PATTERN
from openrtc.agents.tenants import DEFAULT_TENANT, is_tenant

SCHEMA_VERSION: Final = 1
#: The ``v`` field every versioned entry carries.
_VERSION: Final = str(SCHEMA_VERSION).encode()
#: Set on every job entry by the script that adds it, from Redis's own clock
#: (unix ms): a job's age is judged by one clock, not by the wall clock of
#: whichever host enqueued it.
QUEUED_AT_FIELD: Final = "queued_at"
#: Participant attribute naming the agent a participant runs.
AGENT_ATTRIBUTE: Final = "openrtc.agent"
#: Participant attribute (in the agent's token): when the room of the agent's
#: job was created, unix ms. A LiveKit server that restarts creates the room
#: anew; the old job's agent sees at once that the new job's is for a newer room.
ROOM_CREATED_ATTRIBUTE: Final = "openrtc.room_created_ms"
#: Participant attribute (in the agent's token): when the agent's job reached
#: its stream, Redis's clock, unix ms (:data:`QUEUED_AT_FIELD`). Of two jobs of
#: one agent in one room (two dispatches of it), the later one's agent leaves.
QUEUED_AT_ATTRIBUTE: Final = "openrtc.queued_ms"

#: Participant attribute the agent sets right after joining (unix ms). LiveKit
#: tells a room of a participant that publishes nothing only in its next batch
#: of updates (every 3 s), but of an attribute change at once: the old job's
#: agent learns of its successor now, not once the session has started
#: (seconds later on a loaded host, or with MCP servers to reach).
JOINED_ATTRIBUTE: Final = "openrtc.joined_ms"

Fields = Mapping[bytes, bytes]

#: The longest reason, status error or record value this module hands on.
ERROR_TEXT_MAX: Final = 1000
#: The longest job id or dispatcher id taken from an entry (LiveKit's are ~15).
ID_MAX: Final = 128
#: Timestamps as ``encode`` writes them (``%.6f``): no exponent, nan or inf.
_NUMBER: Final = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
#: Anything past this is no unix time (the year 5138).
_TIMESTAMP_MAX: Final = 1e11
#: Routing steps: 1-6 the chain; 0 the custom router (``source`` "custom router")
#: or, with no source, an entry that does not say.
_STEP: Final = re.compile(r"[0-6]")
#: The optional field carrying the call's trace context (W3C Trace Context).
TRACEPARENT_FIELD: Final = "traceparent"
#: On an entry a draining worker handed back with its call still running: the
#: worker's id. The worker that reads it resumes the call from its checkpoint,
#: as a takeover, but without a resume line (the caller lost nothing).
HANDOVER_FIELD: Final = "handover"
#: The call's tenant (:mod:`openrtc.agents.tenants`). An entry without it (from
#: a dispatcher older than tenants) is the default tenant's.
TENANT_FIELD: Final = "tenant"
#: A job or control entry's signature (:mod:`openrtc.wire.signing`), when signing is on.
SIGNATURE_FIELD: Final = b"sig"
#: A W3C ``traceparent`` of version 00's shape (55 characters).
_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class MalformedEntry(ValueError):
    """A stream entry that cannot be decoded; the message says why (bounded)."""

    def __init__(self, reason: str) -> None:
        super().__init__(bounded(reason))


class ForgedEntry(MalformedEntry):
    """An entry or checkpoint whose signature is missing or wrong (:mod:`openrtc.wire.signing`)."""


def bounded(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text)} chars)"
    return text[: max(0, limit - len(note))] + note


def _shown(text: str, limit: int = 40) -> str:
    """A piece of an untrusted value for a reason: quoted, escaped, short."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def agent_identity(job_id: str) -> str:
    """The participant identity of a job's agent (livekit-agents' own rule).

    The dispatcher answers LiveKit with it and workers refuse entries that
    carry any other: an entry must not make an agent join as someone else.
    """
    return f"agent-{job_id}"


def _text(fields: Fields, name: str, *, required: bool = True) -> str:
    raw = fields.get(name.encode())
    if raw is None:
        if required:
            raise MalformedEntry(f"missing field {name!r}")
        return ""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise MalformedEntry(f"field {name!r} is not UTF-8") from None


def _float(fields: Fields, name: str) -> float:
    """A unix time as ``encode`` writes it; 0.0 when absent."""
    text = _text(fields, name, required=False)
    if not text:
        return 0.0
    # float() alone takes "nan", "inf", "1e999" and "1_0": a nan enqueue time
    # never expires, so only our own plain decimal form is accepted.
    if not _NUMBER.fullmatch(text):
        raise MalformedEntry(f"field {name!r} is not a number: {_shown(text)}")
    value = float(text)
    if not (math.isfinite(value) and value < _TIMESTAMP_MAX):
        raise MalformedEntry(f"field {name!r} is out of range: {_shown(text)}")
    return value


def _attribute_ms(attributes: Mapping[str, str], name: str) -> int:
    """A unix-ms participant attribute; 0 when absent or not a number."""
    try:
        return max(0, int(attributes.get(name, "0")))
    except ValueError:
        return 0


def _millis(fields: Fields, name: str) -> int:
    """A unix time in whole milliseconds, as Redis's clock gives it; 0 when absent."""
    text = _text(fields, name, required=False)
    if not text:
        return 0
    if not (text.isascii() and text.isdecimal() and len(text) <= 14):
        raise MalformedEntry(f"field {name!r} is not a time in ms: {_shown(text)}")
    return int(text)


def _is_id(text: str) -> bool:
    """What an id must be, as it names keys and appears in every log line: short and printable."""
    return len(text) <= ID_MAX and text.isprintable()


def _id(fields: Fields, name: str, *, required: bool = True) -> str:
    """An id field (:func:`_is_id`); raises :class:`MalformedEntry` when it is not one."""
    text = _text(fields, name, required=required)
    if not _is_id(text):
        raise MalformedEntry(f"field {name!r} is not an id: {_shown(text)}")
    return text


def _check_version(fields: Fields) -> None:
    version = _text(fields, "v")
    if version != str(SCHEMA_VERSION):
        raise MalformedEntry(
            f"unsupported schema version {version[:10]!r} (this is v{SCHEMA_VERSION})"
        )


@dataclass(frozen=True, slots=True)
class AcceptArguments:
    """How the agent appears in the room (the availability answer's participant fields)."""

    identity: str
    name: str
    metadata: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


def participant_attributes(
    agent: str = "", *, room_created_ms: int = 0, queued_ms: int = 0
) -> dict[str, str]:
    """openrtc's attributes of an agent participant, each only when known (not empty, not 0).

    The one place they are built: the dispatcher's availability answer and
    every job entry carry the agent's (:func:`accept_arguments`); the room
    token a worker mints adds the two times :meth:`JobMessage.replaced_by`
    compares (:func:`openrtc.session.session.mint_token`).
    """
    attributes: dict[str, str] = {}
    if agent:
        attributes[AGENT_ATTRIBUTE] = agent
    if room_created_ms:
        attributes[ROOM_CREATED_ATTRIBUTE] = str(room_created_ms)
    if queued_ms:
        attributes[QUEUED_AT_ATTRIBUTE] = str(queued_ms)
    return attributes


def accept_arguments(job_id: str, agent: str) -> AcceptArguments:
    """How ``agent`` appears in the room of job ``job_id``: the one rule for every job entry.

    The dispatcher builds new entries with it, and ``openrtc dlq replay``
    rebuilds a dead letter's with it, so a replayed job joins exactly as a
    fresh one would. An empty ``agent`` (a job nobody can serve yet) gets no
    agent attribute.
    """
    return AcceptArguments(
        identity=agent_identity(job_id),
        name=agent,
        metadata="",
        attributes=participant_attributes(agent),
    )


@dataclass(frozen=True, slots=True)
class JobMessage:
    """One job routed to one agent, as it travels on ``<ns>:jobs:<agent>``."""

    job: Job
    agent: str
    accept: AcceptArguments
    #: The dispatcher's LiveKit URL, informational only: a worker connects to
    #: its own configured server, never to a URL an entry names.
    livekit_url: str
    step: int
    source: str
    dispatcher_id: str
    received_at: float
    routed_at: float
    enqueued_at: float = 0.0
    #: When the entry reached the stream, by Redis's own clock (0.0 when the
    #: entry predates the field); stamped by the enqueue script, never encoded.
    queued_at: float = 0.0
    #: The call's W3C trace context (``""`` when tracing is off or the entry's
    #: field was unusable: a trace is never a reason to refuse a job).
    traceparent: str = ""
    #: The draining worker that handed this running call over (``""``: none;
    #: an unusable value is none too).
    handover_from: str = ""
    #: The customer the call is for (:func:`openrtc.agents.tenants.resolve_tenant`).
    tenant: str = DEFAULT_TENANT

    @property
    def job_id(self) -> str:
        """The LiveKit job id (the de-duplication key)."""
        return str(self.job.id)

    @property
    def room(self) -> str:
        """The job's room name."""
        return str(self.job.room.name)

    @property
    def room_created_ms(self) -> int:
        """When the job's room was created (unix ms; 0 when LiveKit did not say)."""
        room = self.job.room
        return int(room.creation_time_ms or room.creation_time * 1000)

    def is_another_job_of_my_agent(self, identity: str, attributes: Mapping[str, str]) -> bool:
        """Is this agent participant the same agent serving another job?

        After a LiveKit restart a room can hold the agent of its old job and
        the agent of the new one: same agent attribute, other identity.
        """
        return identity != self.accept.identity and attributes.get(AGENT_ATTRIBUTE) == self.agent

    @property
    def queued_ms(self) -> int:
        """When the job reached its stream, Redis's clock, unix ms (0: unknown)."""
        return int(self.queued_at * 1000)

    def replaced_by(self, room_sid: str, agents: Iterable[tuple[str, Mapping[str, str]]]) -> str:
        """The identity of the agent this job's agent leaves the room to, if any.

        A LiveKit server that restarted has forgotten the room and this job:
        the room the caller rejoined is a new one, dispatched as a new job.
        Once that job's agent (another job of this agent, ``agents`` are the
        room's agent participants) is there, this job is the one to leave. It
        is known at once when that agent's room is newer than this job's
        (:data:`ROOM_CREATED_ATTRIBUTE`): only the older room's agents leave,
        whichever sees the other first. Without both times (an agent without
        the attribute), once the room's sid, ``room_sid`` (it comes in a later update, seconds
        late on a loaded server), is not this job's.

        Two jobs of this agent in the same room (dispatched twice: two
        reconcilers at once, a dispatch by hand) would talk over each other:
        the job queued later (:data:`QUEUED_AT_ATTRIBUTE`, Redis's clock; the
        job id breaks a tie) leaves, whichever sees the other first. An agent
        without that time (an older worker) is left to stay.
        """
        mine = self.room_created_ms
        moved = bool(room_sid and self.job.room.sid and room_sid != self.job.room.sid)
        for identity, attributes in agents:
            if not self.is_another_job_of_my_agent(identity, attributes):
                continue
            theirs = _attribute_ms(attributes, ROOM_CREATED_ATTRIBUTE)
            if mine and theirs and theirs != mine:
                if theirs > mine:
                    return identity
                continue  # theirs is the older room's agent: it leaves
            if not (mine and theirs) and moved:
                return identity
            queued = _attribute_ms(attributes, QUEUED_AT_ATTRIBUTE)
            if (
                self.queued_ms
                and queued
                and (queued, identity) < (self.queued_ms, self.accept.identity)
            ):
                return identity
        return ""

    def encode(self) -> dict[bytes, bytes]:
        """Stream entry fields. ``enqueued_at`` is stamped now if unset."""
        enqueued = self.enqueued_at or time.time()
        fields = {
            b"v": _VERSION,
            b"job_id": self.job_id.encode(),
            b"agent": self.agent.encode(),
            b"room": self.room.encode(),
            b"job": self.job.SerializeToString(),
            b"identity": self.accept.identity.encode(),
            b"name": self.accept.name.encode(),
            b"metadata": self.accept.metadata.encode(),
            b"attributes": orjson.dumps(dict(self.accept.attributes)),
            b"url": self.livekit_url.encode(),
            b"step": str(self.step).encode(),
            b"source": self.source.encode(),
            b"dispatcher": self.dispatcher_id.encode(),
            b"received_at": f"{self.received_at:.6f}".encode(),
            b"routed_at": f"{self.routed_at:.6f}".encode(),
            b"enqueued_at": f"{enqueued:.6f}".encode(),
            TENANT_FIELD.encode(): self.tenant.encode(),
        }
        if self.traceparent:
            fields[TRACEPARENT_FIELD.encode()] = self.traceparent.encode()
        if self.handover_from:
            fields[HANDOVER_FIELD.encode()] = self.handover_from.encode()
        return fields

    @classmethod
    def decode(cls, fields: Fields) -> JobMessage:
        """Parse stream entry fields; raises :class:`MalformedEntry`."""
        _check_version(fields)
        job = _decode_job(fields)
        job_id = _id(fields, "job_id")
        if job_id != job.id:
            raise MalformedEntry(
                f"job_id {_shown(job_id)} does not match the job ({_shown(job.id)})"
            )
        agent = _text(fields, "agent")
        if not NAME_PATTERN.fullmatch(agent):
            raise MalformedEntry(f"field 'agent' is not an agent name: {_shown(agent)}")
        attributes = _decode_attributes(fields)
        identity = _text(fields, "identity")
        if identity != agent_identity(job.id):
            raise MalformedEntry(
                f"participant identity {identity[:80]!r} is not the job's"
                f" ({agent_identity(job.id)!r})"
            )
        room = _text(fields, "room")
        if room != job.room.name:
            raise MalformedEntry(f"room {room[:80]!r} is not the job's room ({job.room.name!r})")
        step = _decode_step(fields)
        return cls(
            job=job,
            agent=agent,
            accept=AcceptArguments(
                identity=identity,
                name=_text(fields, "name", required=False),
                metadata=_text(fields, "metadata", required=False),
                attributes=attributes,
            ),
            livekit_url=_text(fields, "url"),
            step=step,
            source=_text(fields, "source", required=False),
            dispatcher_id=_id(fields, "dispatcher", required=False),
            received_at=_float(fields, "received_at"),
            routed_at=_float(fields, "routed_at"),
            enqueued_at=_float(fields, "enqueued_at"),
            queued_at=_millis(fields, QUEUED_AT_FIELD) / 1000,
            traceparent=_traceparent(fields),
            handover_from=_hint_id(fields, HANDOVER_FIELD),
            tenant=_tenant(fields),
        )


def _tenant(fields: Fields) -> str:
    """The entry's tenant; the default tenant's when it has none (an older dispatcher's)."""
    tenant = _text(fields, TENANT_FIELD, required=False)
    if not tenant:
        return DEFAULT_TENANT
    if not is_tenant(tenant):
        # The dispatcher writes only tenant names: this entry was not written by one.
        raise MalformedEntry(f"field {TENANT_FIELD!r} is not a tenant name: {_shown(tenant)}")
    return tenant


def peek_tenant(fields: Fields) -> str:
    """A job entry's tenant, undecoded: the default tenant's if unusable; never raises."""
    return _hint_tenant(fields) or DEFAULT_TENANT


def _hint_id(fields: Fields, name: str, valid: Callable[[str], bool] = _is_id) -> str:
    """An optional field that is only a hint: ``""`` when absent or not ``valid`` (an id).

    Never refuses the entry, and never raises: bytes past :data:`ID_MAX` are
    not decoded, and bytes that are not UTF-8 are read with replacement
    characters (a hint still, where :func:`_id` refuses them).
    """
    raw = fields.get(name.encode())
    if not isinstance(raw, bytes) or len(raw) > ID_MAX:
        return ""
    text = raw.decode(errors="replace")
    return text if valid(text) else ""


def _hint_tenant(fields: Fields) -> str:
    """The entry's tenant field if it is a tenant name, else ``""``; never raises."""
    return _hint_id(fields, TENANT_FIELD, is_tenant)


def _traceparent(fields: Fields) -> str:
    """The entry's ``traceparent`` if it is one, else ``""``; never raises."""
    raw = fields.get(TRACEPARENT_FIELD.encode())
    if not raw or len(raw) != 55:
        return ""
    text = raw.decode("ascii", errors="replace")
    if not _TRACEPARENT.fullmatch(text) or text.startswith("ff"):
        return ""
    _, trace_id, span_id, _ = text.split("-")
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return ""
    return text


class JobStatus(StrEnum):
    """What a worker reports about a job."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A job status event, from a worker to the dispatcher holding the job's socket."""

    job_id: str
    status: JobStatus
    error: str = ""
    worker_id: str = ""
    at: float = field(default_factory=time.time)
    #: The job's tenant, for the dispatcher's log lines (``""``: not said, or
    #: not a tenant name; only a hint, never a reason to drop the event).
    tenant: str = ""

    def encode(self) -> dict[bytes, bytes]:
        """Stream entry fields (the error bounded to :data:`ERROR_TEXT_MAX`)."""
        fields = {
            b"v": _VERSION,
            b"job_id": self.job_id.encode(),
            b"status": self.status.value.encode(),
            b"error": bounded(self.error).encode(),
            b"worker": self.worker_id.encode(),
            b"at": f"{self.at:.6f}".encode(),
        }
        if self.tenant:
            fields[TENANT_FIELD.encode()] = self.tenant.encode()
        return fields

    @classmethod
    def decode(cls, fields: Fields) -> StatusEvent:
        """Parse stream entry fields; raises :class:`MalformedEntry`."""
        _check_version(fields)
        status = _text(fields, "status")
        try:
            parsed = JobStatus(status)
        except ValueError:
            raise MalformedEntry(f"unknown status {_shown(status, 20)}") from None
        job_id = _id(fields, "job_id")
        if not job_id:
            raise MalformedEntry("empty job id")
        return cls(
            job_id=job_id,
            status=parsed,
            # Relayed to LiveKit as it is: a megabyte here would be a
            # megabyte on the dispatcher's one socket.
            error=bounded(_text(fields, "error", required=False)),
            worker_id=bounded(_text(fields, "worker", required=False), ID_MAX),
            at=_float(fields, "at"),
            tenant=_hint_tenant(fields),
        )


@dataclass(frozen=True, slots=True)
class ControlEvent:
    """LiveKit terminated a job, for the workers of its agent (``<ns>:control:<agent>``)."""

    job_id: str
    reason: str = ""

    def encode(self) -> dict[bytes, bytes]:
        """Stream entry fields."""
        return {
            b"type": b"terminate",
            b"job_id": self.job_id.encode(),
            b"reason": bounded(self.reason, ID_MAX).encode(),
        }

    @classmethod
    def decode(cls, fields: Fields) -> ControlEvent:
        """Parse stream entry fields; raises :class:`MalformedEntry`."""
        kind = _text(fields, "type")
        if kind != "terminate":
            raise MalformedEntry(f"unknown control event type {_shown(kind, 20)}")
        job_id = _id(fields, "job_id")
        if not job_id:
            raise MalformedEntry("empty job id")
        reason = _text(fields, "reason", required=False)
        return cls(job_id=job_id, reason=bounded(reason, ID_MAX))


class RecordField:
    """The fields of a job's record hash (``<ns>:job:<agent>:<job id>``), each named once.

    The scripts compose them into their Lua (:mod:`openrtc.store.scripts`); the
    worker and its policies (:mod:`openrtc.worker.acceptance`) read and write them
    by these names. The record only advises (:func:`decode_job_record`).
    """

    #: The job's live stream entry id.
    ENTRY: Final = "entry"
    #: Where the job is (:class:`RecordState`).
    STATE: Final = "state"
    #: The dispatcher that enqueued (or replayed) it.
    DISPATCHER: Final = "dispatcher"
    #: The worker whose session started it.
    WORKER: Final = "worker"
    #: The dead letter it was replayed from.
    REPLAYED_FROM: Final = "replayed_from"
    #: Why LiveKit terminated it (set by the dispatcher).
    TERMINATED: Final = "terminated"
    #: The delivery its session started on.
    ATTEMPT: Final = "attempt"
    #: When that session started (unix s).
    STARTED_AT: Final = "started_at"
    #: The delivery whose session lived a lease: the deliveries up to it were no failures.
    HEALTHY: Final = "healthy"
    #: The last session's error.
    LAST_ERROR: Final = "last_error"
    #: The sid of the room the job's session is in, when it is not the job's
    #: own: LiveKit made the room anew (a restart) and the session reconnected
    #: into it. A taker knows the call's room by it once the agent is gone.
    ROOM_SID: Final = "room_sid"
    #: The call's tenant (:data:`TENANT_FIELD` of its entry): set by the enqueue
    #: and again by the worker that starts it (a replayed or older entry).
    TENANT: Final = "tenant"


class RecordState:
    """The values of a job record's :attr:`RecordField.STATE`."""

    QUEUED: Final = "queued"
    RUNNING: Final = "running"
    DONE: Final = "done"


def decode_job_record(raw: Mapping[Any, Any]) -> dict[str, str]:
    """A job record hash (``<ns>:job:<agent>:<job id>``) as text; never raises.

    The record only advises (state, worker, last error, terminated), so what
    cannot be read is left out or replaced rather than refused: a key that is
    not UTF-8 is dropped, a value is decoded with replacement characters and
    cut to :data:`ERROR_TEXT_MAX`.
    """
    record: dict[str, str] = {}
    for key, value in raw.items():
        try:
            name = key.decode() if isinstance(key, bytes) else str(key)
        except UnicodeDecodeError:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        record[name] = bounded(text)
    return record


def peek_job_header(fields: Fields) -> tuple[str, str]:
    """``(job id, dispatcher id)`` of a job entry without decoding it; never raises.

    For an entry given up on before it is decoded (``max-deliveries``): the
    ids say whose record holds the last error and which dispatcher to tell.
    An id that is not short printable UTF-8 reads as ``""``.
    """

    def peek(name: bytes) -> str:
        raw = fields.get(name)
        if not isinstance(raw, bytes) or len(raw) > ID_MAX:
            return ""
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return ""
        return text if text.isprintable() else ""

    return peek(b"job_id"), peek(b"dispatcher")


class DeadReason(StrEnum):
    """Why a job went to the dead letters."""

    UNKNOWN_AGENT = "unknown-agent"
    MALFORMED = "malformed"
    MAX_DELIVERIES = "max-deliveries"
    EXPIRED = "expired"
    #: Unsigned, or signed by a key this worker does not hold (openrtc.wire.signing).
    FORGED = "forged"


#: Fields a dead letter adds on top of the original entry's fields.
DEAD_LETTER_FIELDS: Final = (b"reason", b"error", b"dead_at", b"origin", b"origin_id")
#: On an ``unknown-agent`` dead letter (whose ``agent`` is empty): the name the
#: job asked for, as bounded by :class:`openrtc.agents.routing.UnknownAgentError`.
REQUESTED_AGENT_FIELD: Final = b"requested_agent"


def dead_letter_fields(
    reason: DeadReason,
    error: str,
    *,
    original: Fields,
    origin: str = "",
    origin_id: str = "",
) -> dict[bytes, bytes]:
    """A dead-letter entry: the original fields kept whole, plus why and when.

    Keeping the original fields (not a summary) is what makes ``openrtc dlq
    replay`` lossless: replaying strips :data:`DEAD_LETTER_FIELDS` and re-adds
    the rest to the job stream.
    """
    entry = {k: v for k, v in original.items() if k not in DEAD_LETTER_FIELDS}
    entry.update(
        {
            b"reason": reason.value.encode(),
            b"error": error.encode(),
            b"dead_at": f"{time.time():.6f}".encode(),
            b"origin": origin.encode(),
            b"origin_id": origin_id.encode(),
        }
    )
    return entry


def replay_entry(letter: Fields, *, agent: str, now: float) -> dict[bytes, bytes]:
    """The job entry a dead letter becomes when replayed to ``agent``.

    Everything that made it dead is reset: the dead-letter fields go, the
    agent is ``agent``, the accept arguments follow :func:`accept_arguments`
    (an ``unknown-agent`` letter has none for the new agent; an entry from an
    older version may lack them) keeping the original metadata, and
    ``enqueued_at`` is ``now`` (else an ``expired`` letter expires again), and
    the old signature goes (the entry changed: the replay signs it anew). The
    delivery count starts afresh with the new entry, and the job's record is
    reset by the replay script (:mod:`openrtc.ops.monitor`).
    """
    entry = {
        k: v
        for k, v in letter.items()
        if k not in DEAD_LETTER_FIELDS and k not in (REQUESTED_AGENT_FIELD, SIGNATURE_FIELD)
    }
    job_id = entry.get(b"job_id", b"").decode(errors="replace")
    accept = accept_arguments(job_id, agent)
    entry.setdefault(b"v", _VERSION)
    entry[b"agent"] = agent.encode()
    entry[b"identity"] = accept.identity.encode()
    entry[b"name"] = accept.name.encode()
    entry.setdefault(b"metadata", accept.metadata.encode())
    entry[b"attributes"] = orjson.dumps(dict(accept.attributes))
    entry[b"enqueued_at"] = f"{now:.6f}".encode()
    entry.pop(QUEUED_AT_FIELD.encode(), None)  # the replay stamps a fresh one
    return entry


def _decode_job(fields: Fields) -> Job:
    """The entry's serialized ``Job``, with an id and a room name."""
    raw_job = fields.get(b"job")
    if raw_job is None:
        raise MalformedEntry("missing field 'job'")
    job = Job()
    try:
        job.ParseFromString(raw_job)
    except DecodeError as exc:
        raise MalformedEntry(f"field 'job' is not a serialized Job: {exc}") from None
    except Exception as exc:  # the C parser's other complaints (nesting, sizes)
        raise MalformedEntry(f"field 'job' is not a serialized Job: {type(exc).__name__}") from None
    if not job.id or not job.room.name:
        raise MalformedEntry("job has no id or no room name")
    return job


def _decode_attributes(fields: Fields) -> dict[str, str]:
    """The participant attributes: a JSON object of strings."""
    try:
        attributes = orjson.loads(fields.get(b"attributes") or b"{}")
    except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
        raise MalformedEntry("field 'attributes' is not JSON") from None
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise MalformedEntry("field 'attributes' is not an object of strings")
    return attributes


def _decode_step(fields: Fields) -> int:
    """The routing step (0 when absent)."""
    step_text = _text(fields, "step", required=False) or "0"
    # Not str.isdigit(): "²" passes it and int() raises, a ValueError that
    # killed every worker which read the entry.
    if not step_text.isascii() or not step_text.isdecimal():
        raise MalformedEntry(f"field 'step' is not an integer: {_shown(step_text, 10)}")
    if not _STEP.fullmatch(step_text):
        raise MalformedEntry(f"field 'step' is not a routing step: {_shown(step_text, 10)}")
    return int(step_text)

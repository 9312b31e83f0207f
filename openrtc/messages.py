"""The wire format of every stream entry: jobs, status events, dead letters.

Schema version 1 (field ``v``). All values are bytes on the wire; this module
is the only place that knows the field names. A job entry carries no bearer
credential: workers hold the API secret and mint the room token for the job's
identity themselves (docs/architecture.md, "Tokens").

Decoding never trusts its input: anything missing, mistyped or from a newer
schema raises :class:`MalformedEntry` with a reason, which the consumer turns
into a ``malformed`` dead letter instead of crashing or blocking the stream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import orjson
from google.protobuf.message import DecodeError
from livekit.protocol.agent import Job

SCHEMA_VERSION: Final = 1

Fields = Mapping[bytes, bytes]


class MalformedEntry(ValueError):
    """A stream entry that cannot be decoded; the message says why."""


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
    text = _text(fields, name, required=False)
    if not text:
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise MalformedEntry(f"field {name!r} is not a number: {text[:40]!r}") from None


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

    @property
    def job_id(self) -> str:
        """The LiveKit job id (the de-duplication key)."""
        return str(self.job.id)

    @property
    def room(self) -> str:
        """The job's room name."""
        return str(self.job.room.name)

    def encode(self) -> dict[bytes, bytes]:
        """Stream entry fields. ``enqueued_at`` is stamped now if unset."""
        enqueued = self.enqueued_at or time.time()
        return {
            b"v": b"1",
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
        }

    @classmethod
    def decode(cls, fields: Fields) -> JobMessage:
        """Parse stream entry fields; raises :class:`MalformedEntry`."""
        _check_version(fields)
        raw_job = fields.get(b"job")
        if raw_job is None:
            raise MalformedEntry("missing field 'job'")
        job = Job()
        try:
            job.ParseFromString(raw_job)
        except DecodeError as exc:
            raise MalformedEntry(f"field 'job' is not a serialized Job: {exc}") from None
        if not job.id or not job.room.name:
            raise MalformedEntry("job has no id or no room name")
        job_id = _text(fields, "job_id")
        if job_id != job.id:
            raise MalformedEntry(f"job_id {job_id!r} does not match the job ({job.id!r})")
        try:
            attributes = orjson.loads(fields.get(b"attributes") or b"{}")
        except orjson.JSONDecodeError:
            raise MalformedEntry("field 'attributes' is not JSON") from None
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
        ):
            raise MalformedEntry("field 'attributes' is not an object of strings")
        identity = _text(fields, "identity")
        if identity != agent_identity(job.id):
            raise MalformedEntry(
                f"participant identity {identity[:80]!r} is not the job's"
                f" ({agent_identity(job.id)!r})"
            )
        room = _text(fields, "room")
        if room != job.room.name:
            raise MalformedEntry(f"room {room[:80]!r} is not the job's room ({job.room.name!r})")
        step_text = _text(fields, "step", required=False) or "0"
        if not step_text.isdigit():
            raise MalformedEntry(f"field 'step' is not an integer: {step_text[:10]!r}")
        return cls(
            job=job,
            agent=_text(fields, "agent"),
            accept=AcceptArguments(
                identity=identity,
                name=_text(fields, "name", required=False),
                metadata=_text(fields, "metadata", required=False),
                attributes=attributes,
            ),
            livekit_url=_text(fields, "url"),
            step=int(step_text),
            source=_text(fields, "source", required=False),
            dispatcher_id=_text(fields, "dispatcher", required=False),
            received_at=_float(fields, "received_at"),
            routed_at=_float(fields, "routed_at"),
            enqueued_at=_float(fields, "enqueued_at"),
        )


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

    def encode(self) -> dict[bytes, bytes]:
        """Stream entry fields."""
        return {
            b"v": b"1",
            b"job_id": self.job_id.encode(),
            b"status": self.status.value.encode(),
            b"error": self.error.encode(),
            b"worker": self.worker_id.encode(),
            b"at": f"{self.at:.6f}".encode(),
        }

    @classmethod
    def decode(cls, fields: Fields) -> StatusEvent:
        """Parse stream entry fields; raises :class:`MalformedEntry`."""
        _check_version(fields)
        status = _text(fields, "status")
        try:
            parsed = JobStatus(status)
        except ValueError:
            raise MalformedEntry(f"unknown status {status[:20]!r}") from None
        return cls(
            job_id=_text(fields, "job_id"),
            status=parsed,
            error=_text(fields, "error", required=False),
            worker_id=_text(fields, "worker", required=False),
            at=_float(fields, "at"),
        )


class DeadReason(StrEnum):
    """Why a job went to the dead letters."""

    UNKNOWN_AGENT = "unknown-agent"
    MALFORMED = "malformed"
    MAX_DELIVERIES = "max-deliveries"
    EXPIRED = "expired"
    FAILED = "failed"


#: Fields a dead letter adds on top of the original entry's fields.
DEAD_LETTER_FIELDS: Final = (b"reason", b"error", b"dead_at", b"origin", b"origin_id")


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

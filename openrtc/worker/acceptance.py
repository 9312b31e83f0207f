"""Whether a worker starts a job it was handed: the worker's policy, as one pure function.

:func:`judge` is to the worker what :mod:`openrtc.dispatcher.admission` is to the
dispatcher: plain data in (the delivery, the decoded entry, the job's record,
the time, the settings), a :class:`Verdict` out, no I/O. The worker does the
reads before and the writes after (:meth:`openrtc.worker.worker.Worker._check`). The
rules, in order:

1. **Delivery limit** (before decoding: an entry that kills the worker while
   it is decoded must still end up somewhere): more than ``max_deliveries``
   failed deliveries -> ``max-deliveries`` dead letter. Deliveries that moved
   a call which had been running well (the record's ``healthy``) do not count.
2. **Forged** (signing on, and the entry unsigned or its signature wrong:
   :mod:`openrtc.wire.signing`) -> ``forged`` dead letter, its fields kept.
   **Malformed** -> ``malformed`` dead letter; a real job on another agent's
   stream too (its dispatcher is told it failed).
3. **Record unreadable** -> retry: left pending, reclaimed after a lease.
4. **Terminated before it started** (its room closed while it waited) ->
   finish without joining.
5. **Waited past** ``max_queue_age`` before any worker started it ->
   ``expired`` dead letter.
6. Otherwise -> check the room and start the session.

A job whose record says it ran already (``state == running``) is a takeover:
rules 4 and 5 do not apply to it.

An ``expired`` verdict is not final: the worker first checks the room, and a
job whose own agent is there already is no late start but a call Redis gave
out again (restored from a snapshot taken before its read): it starts,
contested.

How a started job starts is :func:`start_kind`'s: fresh (greeting), a
takeover (from its checkpoint), or contested: a first delivery of a call that
already runs (Redis lost a worker's read and gave the entry to this one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from openrtc.settings import WorkerSettings
from openrtc.wire.messages import (
    DeadReason,
    ForgedEntry,
    JobMessage,
    MalformedEntry,
    RecordField,
    RecordState,
)

__all__ = ["Action", "Start", "Verdict", "judge", "small_count", "start_kind", "waited"]


class Action(StrEnum):
    """What the worker does with a held entry."""

    #: Nothing decided that needs no decoding: decode the entry and judge again.
    DECODE = "decode"
    #: Move the entry to the dead letters (``Verdict.reason``, ``Verdict.error``).
    DEAD_LETTER = "dead-letter"
    #: The job's record could not be read: leave the entry for redelivery.
    RETRY = "retry"
    #: Done with, without joining: acknowledge it and report success.
    FINISH = "finish"
    #: Go on: check the room, then start the session.
    START = "start"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one held entry, and the text the dead letter or log carries."""

    action: Action
    reason: DeadReason | None = None
    error: str = ""


def small_count(text: str) -> int:
    """A count from a job record (data anyone could write): 0 unless plain digits."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


def waited(message: JobMessage, now: float, redis_offset: float = 0.0) -> float:
    """How long the job has waited at ``now`` (this host's clock), by Redis's clock.

    ``redis_offset`` is Redis's clock minus this host's: one clock judges every
    job's age, whichever host enqueued it. An entry from before the Redis
    stamp falls back to its dispatcher's ``enqueued_at``.
    """
    if message.queued_at:
        return now + redis_offset - message.queued_at
    return now - message.enqueued_at


def judge(
    deliveries: int,
    message: JobMessage | MalformedEntry | None,
    record: Mapping[str, str] | None,
    now: float,
    settings: WorkerSettings,
    *,
    redis_offset: float = 0.0,
) -> Verdict:
    """The verdict for an entry delivered ``deliveries`` times (see the module docstring).

    Args:
        deliveries: how often the entry has been delivered, this time included.
        message: ``None`` before decoding (only the delivery limit is judged,
            else :attr:`Action.DECODE`); the decoded job; or why it did not decode.
        record: the job's record hash; ``None`` when it could not be read.
        now: this host's clock (unix s).
        settings: the worker's settings (agent, limits).
        redis_offset: Redis's clock minus this host's.
    """
    known = record or {}
    failed = deliveries - small_count(known.get(RecordField.HEALTHY, ""))
    if deliveries > settings.max_deliveries and failed > settings.max_deliveries:
        last = known.get(RecordField.LAST_ERROR) or "no error recorded"
        return Verdict(
            Action.DEAD_LETTER,
            DeadReason.MAX_DELIVERIES,
            f"gave up after {failed - 1} deliveries"
            f" (max {settings.max_deliveries}); last error: {last}",
        )
    if message is None:
        return Verdict(Action.DECODE)
    if isinstance(message, ForgedEntry):
        return Verdict(Action.DEAD_LETTER, DeadReason.FORGED, str(message))
    if isinstance(message, MalformedEntry):
        return Verdict(Action.DEAD_LETTER, DeadReason.MALFORMED, str(message))
    if message.agent != settings.agent:
        return Verdict(
            Action.DEAD_LETTER,
            DeadReason.MALFORMED,
            f"entry for agent '{message.agent}' on agent '{settings.agent}' stream",
        )
    if record is None:
        return Verdict(Action.RETRY, error="its record could not be read")
    started_before = record.get(RecordField.STATE) == RecordState.RUNNING
    if started_before:
        return Verdict(Action.START)
    if record.get(RecordField.TERMINATED):
        # Terminated while it waited (its dispatch was deleted, the room
        # closed): nobody should join. A call that had started is another
        # matter: the termination is then the dead worker's agent leaving.
        return Verdict(Action.FINISH, error="terminated before it started")
    age = waited(message, now, redis_offset)
    if age > settings.max_queue_age:
        return Verdict(
            Action.DEAD_LETTER,
            DeadReason.EXPIRED,
            f"waited {age:.1f}s for a worker (limit {settings.max_queue_age:.0f}s)",
        )
    return Verdict(Action.START)


class Start(StrEnum):
    """How a session starts a job the worker decided to start."""

    #: A new call: the agent greets.
    FRESH = "fresh"
    #: The call ran elsewhere and that worker is gone (a lease lapsed, its
    #: process died) or handed it over: resume from the checkpoint, at once.
    TAKEOVER = "takeover"
    #: Delivered for the first time, yet the call runs (its record says so, or
    #: the job's agent is in the room): Redis lost the read of a worker that may
    #: still serve it. Wait a lease for that worker to claim the entry back
    #: (:data:`openrtc.store.scripts.RENEW`); only then take it over, never greeting.
    CONTESTED = "contested"


def start_kind(deliveries: int, handover: bool, record_running: bool, agent_in_room: bool) -> Start:
    """How to start a job delivered ``deliveries`` times.

    Args:
        deliveries: how often the entry has been delivered, this time included.
        handover: the entry was released by a draining worker for a peer.
        record_running: the job's record says a session started it.
        agent_in_room: a participant with the job's own identity is in the room.
    """
    if deliveries > 1 or handover:
        return Start.TAKEOVER
    if record_running or agent_in_room:
        return Start.CONTESTED
    return Start.FRESH

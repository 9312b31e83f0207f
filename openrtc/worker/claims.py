"""The entries a worker holds, and its free session slots.

:class:`ClaimTable` is the only writer of the table and of the gate: steps add a claim
(:meth:`ClaimTable.hold`), rename it (:meth:`ClaimTable.rename`, a write-back) and drop
it (:meth:`ClaimTable.drop`) through it. A claim's own fields are written by the step
that has the claim at that stage, named beside each field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from openrtc.session.session import SessionControl
from openrtc.store.checkpoint import CheckpointWriter
from openrtc.store.streams import Delivery
from openrtc.wire.messages import ID_MAX, JobMessage
from openrtc.wire.reports import CallTally
from openrtc.worker.acceptance import Start

__all__ = ["Claim", "ClaimTable", "Gate"]


@dataclass(slots=True)
class Claim:
    """An entry this worker holds: leased from its read until acknowledged or released."""

    #: Replaced (renamed entry) by the lease keeper's write-back or the drainer's take-back.
    delivery: Delivery
    #: Entry check: the decoded entry.
    message: JobMessage | None = None
    #: Entry check: set once its session starts.
    control: SessionControl | None = None
    #: Session supervisor: when its agent joined (monotonic).
    joined_at: float = 0.0
    #: Entry check: a takeover (its joining removes the previous agent participant).
    reclaimed: bool = False
    #: Another worker owns the entry now: never start it, step aside if running.
    #: Lease keeper (renewal said so), entry check (its start said so, or a retry).
    lost: bool = False
    #: Entry check: judged without its job record (a first delivery); its
    #: start checks the record (``start_unread``).
    record_assumed: bool = False
    #: Lease keeper: its record marked healthy (its session lived a lease).
    healthy_marked: bool = False
    #: Being acknowledged, dead-lettered or released: no more renewals.
    #: Outcomes, entry check, drainer (a handover; cleared by a take-back).
    settled: bool = False
    #: Drainer: its running call was handed to a peer: no more checkpoints,
    #: they would overwrite the successor's (outcomes clears it if Redis lost that entry).
    handed_over: bool = False
    #: Drainer: the entry it was released as, for a peer (a handover): watched until
    #: the peer has joined; written back as ours if Redis loses it first.
    released: str = ""
    #: Drainer: a handover of its call is under way.
    asked: bool = False
    #: Entry check: how its session starts (openrtc.worker.acceptance.start_kind).
    start: Start = Start.FRESH
    #: Lease keeper: set with ``lost`` (a contested start waits for it).
    lost_event: anyio.Event = field(default_factory=anyio.Event)
    #: Session supervisor: the session's checkpoint writer, when it keeps checkpoints.
    writer: CheckpointWriter | None = None
    #: Session supervisor and outcomes: the call's tally as far as this worker counted
    #: its usage (:meth:`openrtc.ops.metrics.WorkerMetrics.count_usage`): at the start,
    #: the one the session resumed from (counted by the sessions before it).
    counted: CallTally = field(default_factory=CallTally)
    #: The claim table: set when the worker forgets it (its session, if any, is over).
    dropped: anyio.Event = field(default_factory=anyio.Event)
    #: Tracing on only: when it was read (ns; intake), and the claim span (entry check).
    read_ns: int = 0
    span: Any = None

    @property
    def entry_id(self) -> str:
        return self.delivery.entry_id

    @property
    def renewable(self) -> bool:
        # A session stopping for a takeover (lease lost, drain timeout) is left
        # to lapse; one ending for good (terminated) stays ours until it is
        # acknowledged, however long its agent takes to hang up.
        stepping_aside = self.control is not None and self.control.takeover
        return not (self.settled or self.lost or stepping_aside)

    def room_hint(self) -> str:
        """The entry's room name for log lines before it is decoded; ``""`` if unusable."""
        raw = self.delivery.fields.get(b"room", b"")
        text = raw[:ID_MAX].decode(errors="replace") if isinstance(raw, bytes) else ""
        return text if text.isprintable() else ""


@dataclass(slots=True)
class Gate:
    """Free session slots; readers wait here when the worker is full."""

    free: int
    changed: anyio.Event = field(default_factory=anyio.Event)

    def take(self) -> None:
        self.free -= 1

    def give(self) -> None:
        self.free += 1
        self.changed.set()
        self.changed = anyio.Event()


class ClaimTable:
    """Every entry held, by entry id (being checked, or running a session), and the gate."""

    def __init__(self, slots: int) -> None:
        self._claims: dict[str, Claim] = {}
        self._gate = Gate(slots)

    def __len__(self) -> int:
        return len(self._claims)

    def __iter__(self) -> Iterator[Claim]:
        return iter(list(self._claims.values()))

    def get(self, entry_id: str) -> Claim | None:
        return self._claims.get(entry_id)

    @property
    def free(self) -> int:
        """Free session slots (negative never; 0 when full)."""
        return self._gate.free

    async def changed(self) -> None:
        """Until a slot frees (a claim is dropped)."""
        await self._gate.changed.wait()

    @property
    def running(self) -> list[JobMessage]:
        """The jobs whose sessions run now."""
        return [c.message for c in self._claims.values() if c.control and c.message]

    def hold(self, delivery: Delivery) -> Claim:
        """Hold a delivered entry (it is leased from now on) in a slot."""
        claim = Claim(delivery)
        self._claims[delivery.entry_id] = claim
        self._gate.take()
        return claim

    def drop(self, claim: Claim) -> None:
        """Forget a claim and free its slot."""
        if self._claims.get(claim.entry_id) is claim:
            del self._claims[claim.entry_id]
            self._gate.give()
        claim.dropped.set()

    def rename(self, claim: Claim, old_id: str, new_id: str) -> None:
        """Its entry ``old_id`` was written back as ``new_id``: hold it by that."""
        if self._claims.get(old_id) is claim:
            del self._claims[old_id]
            self._claims[new_id] = claim
        claim.delivery = dataclasses.replace(claim.delivery, entry_id=new_id)

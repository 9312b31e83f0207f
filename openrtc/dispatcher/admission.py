"""Backpressure: whether the dispatcher accepts a job, and the load it reports.

The policy is plain data (:class:`AdmissionPolicy`) over the membership view
(:class:`~openrtc.store.membership.AgentLoad`), so it is easy to read and to test:

- **Redis unreachable**: answer unavailable. The job cannot be enqueued, and
  another dispatcher (LiveKit tries the others) may still reach Redis.
- **No live worker for the agent**: ``when_no_worker="queue"`` (default)
  accepts while the backlog is under ``max_backlog``: an autoscaler (the KEDA
  ScaledObject in ``workers/``) starts a worker on stream lag, and a job that
  waits longer than the worker's ``max_queue_age`` goes to the dead letters as
  ``expired``, loudly, instead of starting late. ``"reject"`` answers
  unavailable so LiveKit can offer the job to another dispatcher.
- **Live workers**: accept while ``backlog < free slots + max_backlog``.

The load reported to LiveKit is the share of live worker capacity in use over
all agents (0 when no capacity is known), scaled below
:data:`LIVEKIT_LOAD_THRESHOLD`; ``WS_FULL`` only while draining. LiveKit never
asks a worker whose load is at its threshold: it drops the job for good ("no
servers available"), so a dispatcher reporting its busy workers' real share
lost every call that arrived while they were busy, instead of queueing it.
Turning a job away is admission's decision, per job and with a logged reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from openrtc.settings import NoWorkerPolicy
from openrtc.store.membership import AgentLoad

__all__ = ["LIVEKIT_LOAD_THRESHOLD", "Admission", "AdmissionPolicy"]

#: LiveKit's default worker load threshold: at or above it a worker is never
#: offered a job (livekit-server ``pkg/agent``, livekit-agents ``load_threshold``).
LIVEKIT_LOAD_THRESHOLD: Final = 0.7
#: The highest load a dispatcher reports: under the threshold with room to spare.
REPORTED_LOAD_MAX: Final = 0.6


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer for one job, and why (logged when a job is turned away)."""

    accept: bool
    reason: str


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """Turns the membership view into availability answers and a load figure."""

    when_no_worker: NoWorkerPolicy = "queue"
    max_backlog: int = 100

    def decide(self, load: AgentLoad | None, *, redis_ok: bool) -> Admission:
        """Accept or not a job for the agent whose load is ``load``."""
        if not redis_ok:
            return Admission(False, "Redis is unreachable")
        load = load or AgentLoad(agent="?")
        if load.workers == 0:
            if self.when_no_worker == "reject":
                return Admission(False, "no live worker (policy: reject)")
            if load.backlog >= self.max_backlog:
                return Admission(False, f"no live worker and {load.backlog} jobs already queued")
            return Admission(True, "queued for a worker to start")
        if load.backlog >= load.free + self.max_backlog:
            return Admission(
                False,
                f"backlog {load.backlog} >= free slots {load.free}"
                f" + max backlog {self.max_backlog}",
            )
        return Admission(True, "capacity available" if load.free > load.backlog else "queued")

    @staticmethod
    def reported_load(loads: Mapping[str, AgentLoad]) -> float:
        """Share of live capacity in use, scaled into [0, :data:`REPORTED_LOAD_MAX`].

        0 when no capacity is known. Never at LiveKit's threshold, whatever
        the workers' load: see the module docstring.
        """
        capacity = sum(load.capacity for load in loads.values())
        if capacity <= 0:
            return 0.0
        running = sum(load.running for load in loads.values())
        return min(1.0, max(0.0, running / capacity)) * REPORTED_LOAD_MAX

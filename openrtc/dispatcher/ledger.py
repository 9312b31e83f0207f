"""Which jobs a dispatcher knows, from its availability answer to their end.

A job passes through at most these states, each a map from job id:

- **offered**: we answered available; its assignment has not arrived yet.
- **assigning**: assigned, its stream entry is being written to Redis.
- **held**: enqueued, on the current LiveKit socket: its statuses are relayed
  to LiveKit until a final one. LiveKit forgets a socket's jobs when it drops,
  and so does the ledger.
- **unsure**: failed towards LiveKit while its enqueue may still have landed
  (a lost reply): marked terminated in Redis once Redis answers, so no worker
  joins a call LiveKit has failed.

No I/O here: the dispatcher (:mod:`openrtc.dispatcher.dispatcher`) moves jobs through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from livekit.protocol import agent as proto

from openrtc.agents.routing import Route, UnknownAgentError
from openrtc.agents.tenants import DEFAULT_TENANT

__all__ = ["JobLedger", "Offer"]

#: Jobs whose failed enqueue may have landed, remembered until Redis answers.
MAX_UNSURE: Final = 10_000


@dataclass(slots=True)
class Offer:
    """A job we said yes to, waiting for its assignment."""

    job: proto.Job
    route: Route | None
    error: UnknownAgentError | None
    received_at: float
    routed_at: float
    #: The availability span (tracing on only): the enqueue's parent.
    span: Any = None
    #: The job's tenant (:func:`openrtc.agents.tenants.resolve_tenant`).
    tenant: str = DEFAULT_TENANT


@dataclass(slots=True)
class JobLedger:
    """The jobs one dispatcher knows, by state (see the module docstring)."""

    offers: dict[str, Offer] = field(default_factory=dict)
    #: Job id -> agent. A termination may arrive right behind its assignment.
    assigning: dict[str, str] = field(default_factory=dict)
    #: Job id -> agent.
    held: dict[str, str] = field(default_factory=dict)
    #: Job id -> agent.
    unsure: dict[str, str] = field(default_factory=dict)
    #: Job id -> tenant, while assigning or held: for the lines of its termination.
    tenants: dict[str, str] = field(default_factory=dict)

    def offer(self, offer: Offer) -> None:
        """We answered available for ``offer.job``."""
        self.offers[offer.job.id] = offer

    def take_offer(self, job_id: str) -> Offer | None:
        """The offer an assignment completes, no longer waiting."""
        return self.offers.pop(job_id, None)

    def expire_offers(self, cutoff: float) -> list[str]:
        """Forget offers received before ``cutoff`` (never assigned); their job ids."""
        stale = [job_id for job_id, o in self.offers.items() if o.received_at < cutoff]
        for job_id in stale:
            del self.offers[job_id]
        return stale

    def assign(self, job_id: str, agent: str, tenant: str = DEFAULT_TENANT) -> None:
        """The job's entry is being written."""
        self.assigning[job_id] = agent
        self.tenants[job_id] = tenant

    def tenant_of(self, job_id: str) -> str:
        """The tenant of a job being assigned or held (``""``: not known here)."""
        return self.tenants.get(job_id, "")

    def written(self, job_id: str, agent: str, *, hold: bool) -> None:
        """The job's entry is in Redis; ``hold``: its socket is still the current one."""
        self.assigning.pop(job_id, None)
        if hold:
            self.held[job_id] = agent
        else:
            self.tenants.pop(job_id, None)

    def not_written(self, job_id: str, agent: str) -> None:
        """The write failed or timed out: it may still have landed."""
        self.assigning.pop(job_id, None)
        self.tenants.pop(job_id, None)
        if len(self.unsure) < MAX_UNSURE:
            self.unsure[job_id] = agent

    def settle(self, job_id: str) -> None:
        """An unsure job is marked terminated in Redis: nothing more to do for it."""
        self.unsure.pop(job_id, None)

    def unsure_jobs(self) -> Iterator[tuple[str, str]]:
        """(job id, agent) of the unsure jobs, oldest first; settle each while iterating."""
        while self.unsure:
            yield next(iter(self.unsure.items()))

    def is_held(self, job_id: str) -> bool:
        return job_id in self.held

    def ended(self, job_id: str) -> None:
        """A final status was relayed: LiveKit is done with the job."""
        self.held.pop(job_id, None)
        self.tenants.pop(job_id, None)

    def terminated(self, job_id: str) -> str | None:
        """The agent of a job LiveKit terminated, if we know the job (it is forgotten)."""
        agent = self.held.pop(job_id, None) or self.assigning.get(job_id)
        if job_id not in self.assigning:
            self.tenants.pop(job_id, None)
        if agent is None:
            offer = self.offers.pop(job_id, None)
            agent = offer.route.agent if offer and offer.route else None
        return agent

    def socket_dropped(self) -> int | None:
        """LiveKit forgot the socket's jobs: forget them too.

        Returns how many were held, ``None`` when no job was known at all.
        """
        count = len(self.held) if (self.held or self.offers) else None
        for job_id in self.held:
            self.tenants.pop(job_id, None)
        self.held.clear()
        self.offers.clear()
        return count

    @property
    def held_count(self) -> int:
        """Jobs held on the current socket (the job count LiveKit is told)."""
        return len(self.held)

"""Every Redis key and group name openrtc uses, in one place.

All keys live under a namespace (default ``openrtc``). Per-agent keys carry
the agent's name as one segment; with ``cluster=True`` that segment is wrapped
in a hash tag (``openrtc:jobs:{dental}``) so that all of one agent's keys land
in one Redis Cluster slot and the multi-key scripts in :mod:`openrtc.store.streams`
stay legal. On a single Redis (the default) keys read exactly as in the design:
``openrtc:jobs:dental``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The one consumer group on every job stream.
WORKERS_GROUP: Final = "workers"
#: How long a room whose agent ended the call on purpose is left alone by the
#: reconciler (s); renewed by each pass that still sees its caller.
ENDED_TTL: Final = 3600
#: The namespace every key lives under unless told otherwise.
DEFAULT_NAMESPACE: Final = "openrtc"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str = DEFAULT_NAMESPACE
    cluster: bool = False

    def _agent(self, agent: str) -> str:
        return f"{{{agent}}}" if self.cluster else agent

    def jobs(self, agent: str) -> str:
        """Stream of jobs routed to ``agent`` (consumer group :data:`WORKERS_GROUP`)."""
        return f"{self.namespace}:jobs:{self._agent(agent)}"

    def job(self, agent: str, job_id: str) -> str:
        """Hash recording one job: dedup marker, stream entry id, state, who runs it."""
        return f"{self.namespace}:job:{self._agent(agent)}:{job_id}"

    def checkpoint(self, agent: str, job_id: str) -> str:
        """One job's conversation checkpoint (JSON, expiring with its record)."""
        return f"{self.namespace}:checkpoint:{self._agent(agent)}:{job_id}"

    def control(self, agent: str) -> str:
        """Stream of control events (terminations) for ``agent``'s workers."""
        return f"{self.namespace}:control:{self._agent(agent)}"

    def reclaim(self, agent: str) -> str:
        """Hash shared by ``agent``'s workers: where their reclaim scan resumes (expires)."""
        return f"{self.namespace}:reclaim:{self._agent(agent)}"

    def alive(self, agent: str) -> str:
        """Hash of ``agent``'s workers watched for crashes: worker id -> 0, or since when
        (Redis ms) its liveness channel has had no subscriber (expires)."""
        return f"{self.namespace}:alive:{self._agent(agent)}"

    def alive_channel(self, agent: str, worker_id: str) -> str:
        """Shard channel a worker of ``agent`` stays subscribed to while its process lives."""
        return f"{self.alive(agent)}:{worker_id}"

    def workers(self, agent: str) -> str:
        """Sorted set of live workers of ``agent``, scored by heartbeat expiry (unix s)."""
        return f"{self.namespace}:workers:{self._agent(agent)}"

    def worker(self, worker_id: str) -> str:
        """Hash describing one worker: agent, capacity, running jobs, host, pid."""
        return f"{self.namespace}:worker:{worker_id}"

    def top(self, worker_id: str) -> str:
        """String: one worker's running sessions for ``openrtc top`` (JSON, expiring;
        :class:`openrtc.wire.top.WorkerSnapshot`)."""
        return f"{self.namespace}:top:{worker_id}"

    @property
    def dead_letter(self) -> str:
        """Stream of jobs that cannot be served.

        Under cluster it and its markers share the hash tag ``{dead-letter}``
        (one slot), so the add-once script stays single-slot; replaying a
        letter into an agent's slot is then done in ordered steps
        (:func:`openrtc.ops.monitor.replay_dead_letters`).
        """
        return f"{self.namespace}:{self._dlq}"

    def dead_letter_seen(self, tag: str) -> str:
        """Marker (with expiry) that one job or one entry was dead-lettered already."""
        return f"{self.namespace}:{self._dlq}:seen:{tag}"

    @property
    def _dlq(self) -> str:
        return "{dead-letter}" if self.cluster else "dead-letter"

    @property
    def reports(self) -> str:
        """Stream of call reports, one per ended call (bounded: ``report_maxlen``,
        ``report_max_age``). Under cluster it and its markers share the hash tag
        ``{reports}`` (one slot), so the add-once script stays single-slot."""
        return f"{self.namespace}:{self._reports}"

    def report_seen(self, job_id: str) -> str:
        """Marker (with expiry) that the call ``job_id`` has its report already."""
        return f"{self.namespace}:{self._reports}:seen:{job_id}"

    @property
    def _reports(self) -> str:
        return "{reports}" if self.cluster else "reports"

    def status(self, dispatcher_id: str) -> str:
        """Stream of job status events for the dispatcher holding those jobs' socket."""
        return f"{self.namespace}:status:{dispatcher_id}"

    @property
    def dispatchers(self) -> str:
        """Sorted set of live dispatchers, scored by heartbeat expiry (unix s)."""
        return f"{self.namespace}:dispatchers"

    def dispatcher(self, dispatcher_id: str) -> str:
        """Hash describing one dispatcher: LiveKit worker id, agents, load, host, pid."""
        return f"{self.namespace}:dispatcher:{dispatcher_id}"

    @property
    def reconciler_lease(self) -> str:
        """String naming the dispatcher that runs the reconciler now (expires: a lease)."""
        return f"{self.namespace}:reconciler:leader"

    def ended(self, room: str) -> str:
        """String: the sid of a room whose agent ended the call on purpose (expires,
        :data:`ENDED_TTL`): the reconciler does not dispatch that room again."""
        return f"{self.namespace}:ended:{room}"

    @property
    def agents(self) -> str:
        """Set of agent names that have (had) a job stream: what ``status`` scans."""
        return f"{self.namespace}:agents"

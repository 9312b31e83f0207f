"""What the dispatcher counts, read two ways, kept once.

The counts live in the dispatcher's Prometheus metrics
(:class:`~openrtc.ops.metrics.DispatcherMetrics`, labelled, on ``/metrics``);
:class:`DispatcherStats` is a snapshot of their totals, for the tests, the
benchmarks and the demo. :func:`refresh_gauges` sets the gauges read at
scrape time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from openrtc.ops.metrics import DispatcherMetrics, count
from openrtc.ops.monitor import read_status

if TYPE_CHECKING:
    from openrtc.dispatcher.context import DispatcherContext

__all__ = ["DispatcherStats", "refresh_gauges"]


@dataclass(slots=True)
class DispatcherStats:
    """Counters since start, read by the benchmarks and the tests.

    A snapshot (:meth:`read`) of the metrics operators read, with labels, on
    ``/metrics``.
    """

    offered: int = 0
    accepted: int = 0
    rejected: int = 0
    unknown_agent: int = 0
    enqueued: int = 0
    duplicates: int = 0
    enqueue_failed: int = 0
    statuses_relayed: int = 0
    terminations: int = 0
    reconnects: int = 0
    #: Reconciler passes this dispatcher ran (as the lease holder) and failed.
    reconcile_passes: int = 0
    reconcile_errors: int = 0
    #: Rooms with a caller and no agent that the reconciler dispatched again.
    reconciled: int = 0
    #: Such rooms left alone: their routing names an agent that is not registered.
    reconcile_unroutable: int = 0
    #: 1 while this dispatcher holds the reconciler lease.
    reconcile_leader: int = 0

    @classmethod
    def read(cls, m: DispatcherMetrics, *, reconcile_unroutable: int = 0) -> DispatcherStats:
        """The totals of ``m`` now (``reconcile_unroutable`` has no metric: given)."""
        return cls(
            offered=count(m.availability_answers),
            accepted=count(m.availability_answers, answer="accepted"),
            rejected=count(m.availability_answers, answer="rejected"),
            unknown_agent=count(m.unknown_agents),
            enqueued=count(m.jobs_routed),
            duplicates=count(m.duplicates),
            enqueue_failed=count(m.enqueue_failures),
            statuses_relayed=count(m.statuses_relayed),
            terminations=count(m.terminations),
            reconnects=count(m.livekit_reconnects),
            reconcile_passes=count(m.reconcile_passes, outcome="ok"),
            reconcile_errors=count(m.reconcile_passes, outcome="failed"),
            reconciled=count(m.reconciled),
            reconcile_unroutable=reconcile_unroutable,
            reconcile_leader=count(m.reconcile_leader),
        )

    def __str__(self) -> str:
        """The counts that are not zero, for people: ``offered 5, accepted 4, ...``."""
        counts = asdict(self).items()
        named = [f"{name.replace('_', ' ')} {value}" for name, value in counts if value]
        return ", ".join(named) or "nothing yet"


async def refresh_gauges(ctx: DispatcherContext) -> None:
    """Set the gauges read at scrape time: connections, and each agent's queue from Redis."""
    m = ctx.metrics
    m.livekit_connected.set(ctx.socket is not None)
    m.draining.set(ctx.draining)
    m.redis_connected.set(ctx.view.redis_ok)
    try:
        status = await read_status(ctx.redis, ctx.keys, ctx.table.names)
    except Exception:
        # Stale queue figures would mislead an alert: none rather than old ones.
        for gauge in m.queue_gauges:
            gauge.clear()
        m.redis_connected.set(0)
        raise
    for agent in status.agents:
        m.jobs_waiting.labels(agent.agent).set(agent.backlog)
        m.jobs_pending.labels(agent.agent).set(agent.pending)
        m.oldest_waiting.labels(agent.agent).set(agent.oldest_waiting_age or 0.0)
        m.live_workers.labels(agent.agent).set(len(agent.workers))
        m.agent_capacity.labels(agent.agent).set(agent.capacity)
        m.agent_running.labels(agent.agent).set(agent.running)
    m.dead_letter_backlog.set(status.dead_letters)

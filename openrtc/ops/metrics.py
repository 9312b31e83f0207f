"""Every Prometheus metric the services export, defined in one place.

Each service owns a :class:`~prometheus_client.CollectorRegistry` of its own
(never the process-wide default): tests, benchmarks and ``openrtc dev`` run
several services in one process, and each must report only its own counts.
Names follow Prometheus conventions: an ``openrtc_`` prefix, base units
(``_seconds``), ``_total`` on counters. The alert rules and the Grafana
dashboard under ``deploy/`` use these names; a test checks them against what
a real dispatcher and worker export.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, Metric

from openrtc import __version__
from openrtc.agents.routing import ROUTER_FALLTHROUGH_REASONS, Router
from openrtc.agents.tenants import TenantLabels
from openrtc.wire.reports import CallTally

__all__ = ["DispatcherMetrics", "WorkerMetrics", "count"]

#: Enqueue latency buckets (s): a pipeline round trip is ~1 ms on a LAN; the
#: enqueue timeout is 2 s by default.
_ENQUEUE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
#: Call durations (s): from a hang-up at the greeting to a two-hour call.
_CALL_BUCKETS: Final = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
#: Turn latencies (s): a voice turn feels slow past ~1 s; 10 s is a stalled model.
_TURN_BUCKETS: Final = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


def count(metric: Counter | Gauge, **labels: str) -> int:
    """A counter's total (or a gauge's value), summed over the children with ``labels``.

    The in-process reading of what ``/metrics`` shows: the services' counts
    for tests, benchmarks and the demo are read here, not kept a second time.
    """
    value = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if all(sample.labels.get(name) == want for name, want in labels.items()):
                value += sample.value
    return int(value)


class _Common:
    """What both services export: build info, connection state, loop health."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("openrtc_build", "openrtc version and Python.", registry=r).info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "service": service,
            }
        )
        self.redis_connected = Gauge(
            "openrtc_redis_connected", "1 while Redis answers this service, else 0.", registry=r
        )
        self.draining = Gauge(
            "openrtc_draining", "1 once the service was asked to stop.", registry=r
        )
        self.loop_lag = Gauge(
            "openrtc_event_loop_lag_seconds",
            "How late the event loop's last heartbeat woke up.",
            registry=r,
        )
        self.dead_letters = Counter(
            "openrtc_dead_letters",
            "Jobs this service moved to the dead letters, by reason.",
            ["agent", "reason"],
            registry=r,
        )


class _RouterCollector:
    """The custom router's counts, read at scrape time: the router counts plain
    integers on the answer path (cheaper than a Prometheus child's lock).
    Exported at zero by a dispatcher without a router, like every other metric."""

    def __init__(self) -> None:
        #: The dispatcher's router, if it has one (set by :meth:`DispatcherMetrics.watch_router`).
        self.router: Router | None = None

    def collect(self) -> Iterator[Metric]:
        router = self.router
        fallthroughs = CounterMetricFamily(
            "openrtc_router_fallthroughs",
            "Jobs the routing chain decided because the custom router raised or named "
            "no registered agent, by reason.",
            labels=["reason"],
        )
        for reason in ROUTER_FALLTHROUGH_REASONS:
            fallthroughs.add_metric([reason], router.fallthroughs[reason] if router else 0)
        yield fallthroughs
        slow = CounterMetricFamily(
            "openrtc_router_slow_calls",
            "Custom router calls over their budget on the answer path.",
        )
        slow.add_metric([], router.slow_calls if router else 0)
        yield slow


class DispatcherMetrics(_Common):
    """The dispatcher's metrics; the per-agent queue gauges are set at scrape time."""

    def __init__(self) -> None:
        super().__init__("dispatcher")
        # In this order: a registry lists its metrics in the order they were defined.
        self._define_routing()
        self._define_relaying()
        self._define_reconciler()
        self._define_livekit_link()
        self._define_queues()

    def _define_routing(self) -> None:
        """Availability answers and jobs written (or not) to the agents' streams."""
        r = self.registry
        self.availability_answers = Counter(
            "openrtc_availability_answers",
            "LiveKit availability requests answered, by answer.",
            ["answer"],
            registry=r,
        )
        self.jobs_routed = Counter(
            "openrtc_jobs_routed",
            "Jobs written to an agent's stream, by agent, routing step and tenant.",
            ["agent", "step", "tenant"],
            registry=r,
        )
        #: A job's tenant as the ``tenant`` label (bounded: openrtc.agents.tenants).
        self.tenant_label = TenantLabels()
        self.unknown_agents = Counter(
            "openrtc_unknown_agent_jobs",
            "Jobs that named an agent nobody registered.",
            registry=r,
        )
        self.duplicates = Counter(
            "openrtc_duplicate_assignments",
            "Assignments already enqueued (same LiveKit job id): not enqueued again.",
            registry=r,
        )
        self.enqueue_failures = Counter(
            "openrtc_enqueue_failures",
            "Assigned jobs that could not be written to Redis (the call is failed).",
            ["agent"],
            registry=r,
        )
        self.enqueue_latency = Histogram(
            "openrtc_enqueue_latency_seconds",
            "From LiveKit's assignment to the job written in its stream.",
            ["agent"],
            buckets=_ENQUEUE_BUCKETS,
            registry=r,
        )
        self._router_counts = _RouterCollector()
        r.register(self._router_counts)

    def watch_router(self, router: Router) -> None:
        """Export ``router``'s fallthroughs and slow calls (a dispatcher with a custom router)."""
        self._router_counts.router = router

    def _define_relaying(self) -> None:
        """What the dispatcher relays between the workers and LiveKit."""
        r = self.registry
        self.statuses_relayed = Counter(
            "openrtc_job_statuses_relayed",
            "Workers' job status events relayed to LiveKit, by status.",
            ["status"],
            registry=r,
        )
        self.terminations = Counter(
            "openrtc_job_terminations",
            "LiveKit job terminations relayed to workers.",
            registry=r,
        )

    def _define_reconciler(self) -> None:
        """The reconciler: rooms dispatched again, its passes, its lease."""
        r = self.registry
        self.reconciled = Counter(
            "openrtc_reconciler_dispatched",
            "Rooms with a caller and no agent that the reconciler dispatched again.",
            registry=r,
        )
        self.reconcile_passes = Counter(
            "openrtc_reconciler_passes",
            "Reconciler passes this dispatcher ran as the lease holder, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.reconcile_leader = Gauge(
            "openrtc_reconciler_leader",
            "1 while this dispatcher holds the reconciler lease.",
            registry=r,
        )

    def _define_livekit_link(self) -> None:
        """The registration with LiveKit."""
        r = self.registry
        self.livekit_reconnects = Counter(
            "openrtc_livekit_reconnects",
            "Reconnections to LiveKit after a lost registration.",
            registry=r,
        )
        self.livekit_connected = Gauge(
            "openrtc_livekit_connected",
            "1 while registered with LiveKit, else 0.",
            registry=r,
        )

    def _define_queues(self) -> None:
        """Per-agent queue and capacity gauges and the dead-letter backlog, read at scrape."""
        r = self.registry
        agent = ["agent"]
        self.jobs_waiting = Gauge(
            "openrtc_jobs_waiting",
            "Jobs in the agent's stream not yet delivered to a worker (read at scrape).",
            agent,
            registry=r,
        )
        self.jobs_pending = Gauge(
            "openrtc_jobs_pending",
            "Jobs delivered to a worker and not yet acknowledged (read at scrape).",
            agent,
            registry=r,
        )
        self.oldest_waiting = Gauge(
            "openrtc_oldest_waiting_job_age_seconds",
            "Age of the agent's oldest job not yet delivered; 0 when none waits.",
            agent,
            registry=r,
        )
        self.live_workers = Gauge(
            "openrtc_live_workers", "Workers of the agent with a live heartbeat.", agent, registry=r
        )
        self.agent_capacity = Gauge(
            "openrtc_agent_capacity",
            "Session slots of the agent's live workers.",
            agent,
            registry=r,
        )
        self.agent_running = Gauge(
            "openrtc_agent_sessions_running",
            "Sessions the agent's live workers report running.",
            agent,
            registry=r,
        )
        self.dead_letter_backlog = Gauge(
            "openrtc_dead_letter_entries",
            "Entries in the dead-letter stream (read at scrape).",
            registry=r,
        )
        self.queue_gauges = (
            self.jobs_waiting,
            self.jobs_pending,
            self.oldest_waiting,
            self.live_workers,
            self.agent_capacity,
            self.agent_running,
        )


class WorkerMetrics(_Common):
    """One worker's metrics (all labelled with its agent)."""

    def __init__(self, agent: str) -> None:
        super().__init__("worker")
        r = self.registry
        labels = ["agent"]
        self.sessions_running = Gauge(
            "openrtc_sessions_running", "Sessions running in this worker.", labels, registry=r
        )
        self.session_capacity = Gauge(
            "openrtc_session_capacity",
            "Sessions this worker may run at once (0 while draining).",
            labels,
            registry=r,
        )
        # Per call, so by tenant too (bounded: openrtc.agents.tenants.TenantLabels).
        self.sessions_started = Counter(
            "openrtc_sessions_started", "Sessions started.", [*labels, "tenant"], registry=r
        )
        self.sessions_ended = Counter(
            "openrtc_sessions_ended",
            "Sessions ended, by outcome: succeeded, failed, taken_over (another worker has it).",
            [*labels, "tenant", "outcome"],
            registry=r,
        )
        self.reclaims = Counter(
            "openrtc_reclaims",
            "Jobs taken over from a worker that stopped renewing its lease.",
            labels,
            registry=r,
        )
        self.lease_renewals_failed = Counter(
            "openrtc_lease_renewals_failed",
            "Lease renewals of held jobs that Redis did not answer.",
            labels,
            registry=r,
        )
        self.leases_lost = Counter(
            "openrtc_leases_lost",
            "Held jobs found owned by another worker at renewal.",
            labels,
            registry=r,
        )
        self.handovers = Counter(
            "openrtc_handovers",
            "Running calls this worker handed to a peer while draining.",
            labels,
            registry=r,
        )
        self.memory_bytes = Gauge(
            "openrtc_worker_memory_bytes",
            "The worker's memory (PSS, with its session processes), as its guard last "
            "measured it; only with a memory threshold set (no sample otherwise).",
            labels,
            registry=r,
        )
        self.observer_errors = Counter(
            "openrtc_observer_errors",
            "Session observer calls that raised or timed out, by hook (start, end).",
            [*labels, "hook"],
            registry=r,
        )
        self._define_usage()
        self.agent = agent
        self.handed_over = self.handovers.labels(agent)
        #: A call's tenant as its metrics' ``tenant`` label: its own for the
        #: first :data:`~openrtc.agents.tenants.TENANT_LABELS_MAX`, then ``other``.
        self.tenant_label = TenantLabels()
        self.reclaimed = self.reclaims.labels(agent)
        self.renewals_failed = self.lease_renewals_failed.labels(agent)
        self.lost = self.leases_lost.labels(agent)

    def _define_usage(self) -> None:
        """Calls' usage, turn latency and duration (issue 20).

        ``tenant`` is the call's tenant (bounded by :attr:`tenant_label`);
        ``model`` takes the few models an agent uses.
        """
        r = self.registry
        usage = ["agent", "tenant"]
        self.llm_tokens = Counter(
            "openrtc_llm_tokens",
            "LLM tokens the sessions here used, by model and kind (prompt, completion).",
            [*usage, "model", "kind"],
            registry=r,
        )
        self.tts_characters = Counter(
            "openrtc_tts_characters",
            "Characters the sessions here had synthesized.",
            usage,
            registry=r,
        )
        self.stt_audio_seconds = Counter(
            "openrtc_stt_audio_seconds",
            "Seconds of audio the sessions here had transcribed.",
            usage,
            registry=r,
        )
        self.llm_ttft = Histogram(
            "openrtc_llm_ttft_seconds",
            "Each agent reply's LLM time to first token.",
            ["agent"],
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.end_of_turn_delay = Histogram(
            "openrtc_end_of_turn_delay_seconds",
            "Each caller turn's end-of-turn delay: the caller stopped speaking -> the turn "
            "committed.",
            ["agent"],
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.call_duration = Histogram(
            "openrtc_call_duration_seconds",
            "Calls' durations, observed once per call with its report, by the report's outcome.",
            ["agent", "tenant", "outcome"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )

    def started(self, tenant: str) -> None:
        """Count a session's start, for a call of ``tenant``."""
        self.sessions_started.labels(self.agent, self.tenant_label(tenant)).inc()

    def ended(self, outcome: str, tenant: str) -> None:
        """Count a session's end: ``succeeded``, ``failed`` or ``taken_over``."""
        self.sessions_ended.labels(self.agent, self.tenant_label(tenant), outcome).inc()

    def observe_call(self, tenant: str, outcome: str, duration: float) -> None:
        """A call's duration, once per call (with its report)."""
        self.call_duration.labels(self.agent, self.tenant_label(tenant), outcome).observe(duration)

    def count_usage(self, counted: CallTally, now: CallTally, tenant: str) -> CallTally:
        """Count what ``now`` (a call's tally) holds beyond ``counted``; the new ``counted``.

        ``counted``: the tally this worker counted last for the session, or
        the one the session resumed from (earlier sessions counted it).
        """
        new = now.since(counted)
        agent = self.agent
        tenant = self.tenant_label(tenant)
        for model, tokens in new.llm.items():
            if tokens.prompt_tokens:
                self.llm_tokens.labels(agent, tenant, model, "prompt").inc(tokens.prompt_tokens)
            if tokens.completion_tokens:
                self.llm_tokens.labels(agent, tenant, model, "completion").inc(
                    tokens.completion_tokens
                )
        if new.tts_characters:
            self.tts_characters.labels(agent, tenant).inc(new.tts_characters)
        if new.stt_audio_seconds:
            self.stt_audio_seconds.labels(agent, tenant).inc(new.stt_audio_seconds)
        for value in new.llm_ttft:
            self.llm_ttft.labels(agent).observe(value)
        for value in new.end_of_turn:
            self.end_of_turn_delay.labels(agent).observe(value)
        return now

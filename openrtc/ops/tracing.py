"""OpenTelemetry traces of each call, off unless configured, free when off.

One trace per call::

    openrtc.dispatcher.availability      (root: LiveKit's AvailabilityRequest, the
    │                                     routing: agent, step, source; the answer)
    └── openrtc.dispatcher.enqueue       (assignment -> XADD; its context rides in
        │                                 the entry's ``traceparent`` field)
        └── openrtc.worker.claim         (read or reclaimed -> checked, decided)
            └── openrtc.session          (session start -> end: outcome)
                └── openrtc.session.join (session start -> agent in the room)

Every span carries ``openrtc.job_id``, ``openrtc.agent`` (once known) and
``openrtc.room``. livekit-agents' own spans (when exported through the global
provider, as the CLI does) nest under ``openrtc.session``.

Off by default: :data:`enabled` is False and every call site checks it before
doing anything, so an untraced service pays one attribute read per step and
never imports the SDK. :func:`configure_from_env` turns it on when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set (and ``OTEL_SDK_DISABLED`` is not ``true``); the OTLP/HTTP exporter reads
the rest of the ``OTEL_*`` variables (headers, timeout, service name via
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``) itself. The SDK and the
exporter are the ``openrtc[tracing]`` extra.

A ``traceparent`` that cannot be parsed (``messages.JobMessage`` already drops
what is not W3C-shaped) starts a new trace at the worker: it never fails a job.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "configure",
    "configure_from_env",
    "enabled",
    "shutdown",
    "start_span",
    "traceparent_of",
]

logger = logging.getLogger("openrtc.tracing")

#: True once :func:`configure` ran; read by every call site before tracing.
enabled: bool = False
_tracer: Tracer | None = None
_provider: TracerProvider | None = None

JOB_ID: Final = "openrtc.job_id"
AGENT: Final = "openrtc.agent"
ROOM: Final = "openrtc.room"
TENANT: Final = "openrtc.tenant"


def configure(provider: TracerProvider, *, set_global: bool = False) -> None:
    """Trace through ``provider`` from now on (tests pass one with an in-memory exporter).

    ``set_global``: also make it OpenTelemetry's global provider, so that
    livekit-agents' spans are exported with ours (once per process).
    """
    global enabled, _tracer, _provider
    from opentelemetry import trace

    if set_global:
        trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("openrtc")
    enabled = True


def configure_from_env(service_name: str, *, set_global: bool = True) -> bool:
    """Turn tracing on, exporting over OTLP/HTTP, when the ``OTEL_*`` variables ask for it.

    Returns whether it did. ``set_global``: see :func:`configure`. Without
    the SDK installed it says how to get it and stays off: traces are never
    worth a service that does not start.
    """
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        logger.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is not installed "
            "(pip install 'openrtc[tracing]'): %s; tracing stays off",
            exc,
        )
        return False
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, when set, win over ours.
    resource = Resource.create({"service.name": service_name})
    if "OTEL_SERVICE_NAME" in os.environ:
        resource = Resource.create()
    provider = TracerProvider(resource=resource)
    # The exporter reads its endpoint, headers and timeout from OTEL_* itself.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    configure(provider, set_global=set_global)
    logger.info("tracing: exporting spans over OTLP to %s", _without_credentials(endpoint))
    return True


def shutdown() -> None:
    """Flush and stop the exporter (at service exit); tracing is off afterwards."""
    global enabled, _tracer, _provider
    provider, _provider = _provider, None
    enabled, _tracer = False, None
    if provider is not None:
        provider.shutdown()


def start_span(
    name: str,
    *,
    parent: Span | str | None = None,
    start_time: int | None = None,
    attributes: dict[str, Any] | None = None,
) -> Span:
    """Start a span (the caller ends it). Call only when :data:`enabled`.

    ``parent``: a span, a W3C ``traceparent`` string (from a stream entry),
    or ``None`` for a new trace. An unusable ``traceparent`` starts a new trace.
    """
    from opentelemetry import trace
    from opentelemetry.context import Context

    assert _tracer is not None
    context: Context
    if parent is None or parent == "":
        context = Context()  # a root, whatever the ambient context holds
    elif isinstance(parent, str):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = TraceContextTextMapPropagator().extract({"traceparent": parent})
    else:
        context = trace.set_span_in_context(parent)
    return _tracer.start_span(
        name, context=context, start_time=start_time, attributes=attributes or None
    )


def traceparent_of(span: Span) -> str:
    """The W3C ``traceparent`` header value naming ``span``."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def end_failed(span: Span, error: str) -> None:
    """End ``span`` with an error status."""
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def use_span(span: Span) -> Any:
    """A context manager making ``span`` current (livekit-agents' spans nest under it)."""
    from opentelemetry import trace

    return trace.use_span(span, end_on_exit=False)


def _without_credentials(url: str) -> str:
    from openrtc.settings import redact_url

    return redact_url(url)

"""OpenTelemetry traces: one trace per call, from the availability request to the session's end.

A real call through real LiveKit and Redis, the dispatcher and a worker in
this process, the spans collected in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops import tracing
from openrtc.wire.keys import Keys
from openrtc.wire.messages import TRACEPARENT_FIELD
from tests.support.stack import (
    creds,
    delete_room,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_one_trace_from_the_availability_request_to_the_session_s_end(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    spans: InMemorySpanExporter,
    isolation: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="openrtc")
    ns = unique("ns")
    room = unique("trace")
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)),
        working(livekit_server, redis_server.url, ns, "dental", isolation=isolation) as worker,
    ):
        await new_room(livekit_server, room, '{"agent": "dental"}')
        async with caller_in(creds(livekit_server), room) as caller:
            agent = await caller.wait_agent(within=20)
            job_id = agent.identity.removeprefix("agent-")
            await delete_room(livekit_server, room)
            await eventually(lambda: worker.stats.succeeded == 1, "the session's end", within=20)
        await eventually(
            lambda: any(s.name == "openrtc.session" for s in spans.get_finished_spans()),
            "the session span",
        )

    finished = [s for s in spans.get_finished_spans() if s.name.startswith("openrtc.")]
    availability = _one(finished, "openrtc.dispatcher.availability")
    enqueue = _one(finished, "openrtc.dispatcher.enqueue")
    claim = _one(finished, "openrtc.worker.claim")
    session = _one(finished, "openrtc.session")
    join = _one(finished, "openrtc.session.join")

    # One trace, from the dispatcher's first span to the worker's session span.
    assert availability.parent is None
    trace_id = availability.context.trace_id
    for span in (enqueue, claim, session, join):
        assert span.context.trace_id == trace_id, span.name
    # The chain: each span's parent is the step before it.
    assert enqueue.parent is not None
    assert enqueue.parent.span_id == availability.context.span_id
    assert claim.parent is not None
    assert claim.parent.span_id == enqueue.context.span_id
    assert claim.parent.is_remote  # it came through the stream entry's traceparent
    assert session.parent is not None
    assert session.parent.span_id == claim.context.span_id
    assert join.parent is not None
    assert join.parent.span_id == session.context.span_id

    for span in (availability, enqueue, claim, session):
        attributes = span.attributes or {}
        assert attributes[tracing.JOB_ID] == job_id, span.name
        assert attributes[tracing.AGENT] == "dental", span.name
        assert attributes[tracing.ROOM] == room, span.name
    assert (availability.attributes or {})["openrtc.routing.step"] == 3  # room metadata
    assert (availability.attributes or {})["openrtc.routing.source"] == "room metadata"
    assert (availability.attributes or {})["openrtc.available"] is True
    assert (enqueue.attributes or {})["openrtc.outcome"] == "queued"
    assert (claim.attributes or {})["openrtc.session_started"] is True
    assert (session.attributes or {})["openrtc.outcome"] == "success"
    assert [e.name for e in session.events] == ["agent joined"]
    # In time order along the call.
    assert availability.start_time <= enqueue.start_time <= claim.start_time  # type: ignore[operator]
    assert claim.start_time <= session.start_time < session.end_time  # type: ignore[operator]


async def test_tracing_off_writes_no_traceparent(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    assert not tracing.enabled
    ns = unique("ns")
    room = unique("untraced")
    keys = Keys(ns)
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        await new_room(livekit_server, room, '{"agent": "dental"}')
        async with caller_in(creds(livekit_server), room):
            entries = await eventually(
                lambda: redis.xrange(keys.jobs("dental")), "the job entry", within=20
            )
            (_, fields) = entries[0]
            assert TRACEPARENT_FIELD.encode() not in fields
            await delete_room(livekit_server, room)


async def test_spans_are_exported_over_otlp_when_the_endpoint_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        assert not tracing.configure_from_env("openrtc-test", set_global=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        assert tracing.configure_from_env("openrtc-test", set_global=False)
        try:
            tracing.start_span("openrtc.dispatcher.availability").end()
        finally:
            # The batch is flushed on shutdown, from a thread: the loop must run meanwhile.
            await anyio.to_thread.run_sync(tracing.shutdown)
        assert not tracing.enabled
        await eventually(lambda: received, "the OTLP export")
    finally:
        await runner.cleanup()
    export = ExportTraceServiceRequest()
    export.ParseFromString(received[0])
    (resource_spans,) = export.resource_spans
    names = [s.name for scope in resource_spans.scope_spans for s in scope.spans]
    assert names == ["openrtc.dispatcher.availability"]
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "openrtc-test"

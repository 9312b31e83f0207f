"""Every decoder of what Redis holds, fuzzed: only ``MalformedEntry`` or a valid result.

Anyone who can write to Redis can put anything in a job entry, a status or
control entry, a job record or a dead letter. The services read them in loops
that must never die (issue 7, item 3: a job entry with ``step="²"`` raised a
plain ``ValueError`` that killed every worker in turn). Pure functions, no
servers: hypothesis builds field maps from a valid entry by replacing, adding
and dropping fields with hostile values, and from arbitrary bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from livekit.protocol.agent import Job, JobType
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from openrtc.agents.routing import SHOWN_NAME_MAX, UnknownAgentError, resolve_agent
from openrtc.ops import tracing
from openrtc.ops.monitor import _decode_entry
from openrtc.wire.messages import (
    ERROR_TEXT_MAX,
    ControlEvent,
    JobMessage,
    JobStatus,
    MalformedEntry,
    StatusEvent,
    accept_arguments,
    decode_job_record,
    peek_job_header,
)

pytestmark = pytest.mark.unit

TRACEPARENT_SHAPE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@contextlib.contextmanager
def traced() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for the block."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class _Room:
    name: str
    metadata: str


@dataclass
class _Job:
    room: _Room
    metadata: str = ""


# -- hostile values --------------------------------------------------------------

NASTY: list[bytes] = [
    b"",
    b"\xff",
    b"\xc3",  # a truncated two-byte sequence
    b"\xed\xa0\x80",  # a UTF-8-encoded lone surrogate
    "²".encode(),  # str.isdigit() is true, int() raises
    "٣".encode(),  # an Arabic-Indic digit: int() accepts it
    "\uff11".encode(),  # a full-width digit
    b"nan",
    b"inf",
    b"-inf",
    b"1e999",
    b"-1e999",
    b"1_000",
    b" 7 ",
    b"-1",
    b"0x10",
    b"9" * 5000,  # int() refuses more than 4300 digits
    b"x" * 200_000,
    b"[/bold] [red",  # rich markup
    b"\x00\n\r\x1b[31m",
    b"{}",
    b"[]",
    b"null",
    b'{"a": 1}',
    b'{"a": "\\ud800"}',
    b'{"a": {"b": "c"}}',
    b"[" * 5000,
    b"terminate",
    b"running",
    b"1",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _valid_job(job_id: str = "AJ_fuzz0001", room: str = "dental-call") -> Job:
    job = Job(id=job_id, type=JobType.JT_ROOM, metadata='{"agent": "dental"}')
    job.room.name = room
    job.room.sid = "RM_fuzz"
    return job


def _mangled_job(data: bytes, cut: int, flip: int) -> bytes:
    """A serialized Job with a cut or a flipped byte: protobuf's own garbage."""
    raw = bytearray(_valid_job().SerializeToString())
    if flip < len(raw):
        raw[flip] ^= 0xFF
    return bytes(raw[: max(0, len(raw) - cut)]) + data


values = st.one_of(
    st.sampled_from(NASTY),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(_json_bytes),
    st.builds(_mangled_job, st.binary(max_size=8), st.integers(0, 30), st.integers(0, 80)),
)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _valid_job_fields() -> dict[bytes, bytes]:
    now = time.time()
    return JobMessage(
        job=_valid_job(),
        agent="dental",
        accept=accept_arguments("AJ_fuzz0001", "dental"),
        livekit_url="ws://127.0.0.1:7880",
        step=3,
        source="room metadata",
        dispatcher_id="dispatcher-1",
        received_at=now,
        routed_at=now,
        enqueued_at=now,
        traceparent=TRACEPARENT,
    ).encode()


def _mutated(base: dict[bytes, bytes], names: list[bytes]) -> st.SearchStrategy[dict[bytes, bytes]]:
    """``base`` with some fields replaced or added (hostile values) and some dropped."""
    keys = st.sampled_from(names) | st.binary(max_size=12)

    def build(changes: dict[bytes, bytes], dropped: list[bytes]) -> dict[bytes, bytes]:
        fields = {k: v for k, v in base.items() if k not in dropped}
        fields.update(changes)
        return fields

    return st.builds(
        build,
        st.dictionaries(keys, values, max_size=6),
        st.lists(st.sampled_from(names), max_size=3),
    )


arbitrary_maps = st.dictionaries(st.binary(max_size=16), st.binary(max_size=64), max_size=12)

JOB_FIELDS = list(_valid_job_fields())
job_entries = _mutated(_valid_job_fields(), JOB_FIELDS) | arbitrary_maps

STATUS_BASE = StatusEvent("AJ_fuzz0001", JobStatus.FAILED, "boom", "worker-1").encode()
status_entries = _mutated(STATUS_BASE, list(STATUS_BASE)) | arbitrary_maps

CONTROL_BASE = ControlEvent("AJ_fuzz0001", "livekit").encode()
control_entries = _mutated(CONTROL_BASE, list(CONTROL_BASE)) | arbitrary_maps

RECORD_BASE = {
    b"entry": b"1-0",
    b"state": b"running",
    b"dispatcher": b"dispatcher-1",
    b"worker": b"worker-1",
    b"attempt": b"2",
    b"last_error": b"RuntimeError: boom",
    b"terminated": b"livekit",
}
record_entries = _mutated(RECORD_BASE, list(RECORD_BASE)) | arbitrary_maps

DEAD_BASE = {
    **_valid_job_fields(),
    b"reason": b"malformed",
    b"error": b"missing field 'v'",
    b"dead_at": b"1700000000.0",
    b"origin": b"openrtc:jobs:dental",
    b"origin_id": b"1-0",
}
dead_entries = _mutated(DEAD_BASE, list(DEAD_BASE)) | arbitrary_maps


def _check_error(exc: MalformedEntry) -> None:
    """A reason fit for a log line and a dead letter: bounded, encodable."""
    text = str(exc)
    assert text
    assert len(text) <= ERROR_TEXT_MAX
    text.encode()


def _finite(*numbers: float) -> None:
    for number in numbers:
        assert math.isfinite(number), number


# -- the decoders ----------------------------------------------------------------------


@FUZZ
@given(job_entries)
@example({**_valid_job_fields(), b"step": "²".encode()})
@example({**_valid_job_fields(), b"step": b"9" * 5000})
@example({**_valid_job_fields(), b"enqueued_at": b"nan"})
@example({**_valid_job_fields(), b"job_id": b"x" * 200_000})
def test_job_entries_decode_or_are_malformed(fields: dict[bytes, bytes]) -> None:
    try:
        message = JobMessage.decode(fields)
    except MalformedEntry as exc:
        _check_error(exc)
        return
    # A valid result is one the worker can use and write back as it is.
    assert message.job_id
    assert message.room
    assert message.accept.identity
    assert 0 <= message.step <= 6
    _finite(message.received_at, message.routed_at, message.enqueued_at)
    again = JobMessage.decode(message.encode())
    assert (
        again.job,
        again.agent,
        again.accept,
        again.step,
        again.dispatcher_id,
        again.traceparent,
    ) == (
        message.job,
        message.agent,
        message.accept,
        message.step,
        message.dispatcher_id,
        message.traceparent,
    )


traceparents = st.one_of(
    values,
    st.from_regex(r"\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z"),
    st.from_regex(r"\A[0-9a-fA-F-]{50,60}\Z"),
    st.just(TRACEPARENT.upper()),
    st.just("00-" + "0" * 32 + "-00f067aa0ba902b7-01"),
    st.just("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
)


@FUZZ
@given(traceparents)
def test_a_garbage_traceparent_never_breaks_a_job(raw: bytes | str) -> None:
    value = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    # The job decodes whatever the field holds: a trace is never a reason to refuse one.
    message = JobMessage.decode({**_valid_job_fields(), b"traceparent": value})
    assert message.traceparent in ("", value.decode("ascii", "replace"))
    if message.traceparent:
        assert TRACEPARENT_SHAPE.fullmatch(message.traceparent)
    # And the worker can always start its span from it.
    with traced() as exporter:
        span = tracing.start_span("openrtc.worker.claim", parent=message.traceparent)
        span.end()
        finished = exporter.get_finished_spans()
        if not message.traceparent:
            assert len(finished) == 1  # a new trace
            return
        _, trace_id, _, flags = message.traceparent.split("-")
        if int(flags, 16) & 1:
            (span_data,) = finished
            assert span_data.context.trace_id == int(trace_id, 16)
        else:
            assert not finished  # the caller's "not sampled" is kept


@FUZZ
@given(job_entries)
def test_the_job_header_peek_never_raises(fields: dict[bytes, bytes]) -> None:
    job_id, dispatcher = peek_job_header(fields)
    for text in (job_id, dispatcher):
        assert len(text) <= 128
        assert text.isprintable()
        text.encode()


@FUZZ
@given(status_entries)
@example({**STATUS_BASE, b"at": b"1e999"})
@example({**STATUS_BASE, b"error": b"x" * 200_000})
def test_status_entries_decode_or_are_malformed(fields: dict[bytes, bytes]) -> None:
    try:
        event = StatusEvent.decode(fields)
    except MalformedEntry as exc:
        _check_error(exc)
        return
    assert event.job_id
    assert len(event.error) <= ERROR_TEXT_MAX
    _finite(event.at)
    event.encode()


@FUZZ
@given(control_entries)
def test_control_entries_decode_or_are_malformed(fields: dict[bytes, bytes]) -> None:
    try:
        event = ControlEvent.decode(fields)
    except MalformedEntry as exc:
        _check_error(exc)
        return
    assert event.job_id
    assert ControlEvent.decode(event.encode()) == event


@FUZZ
@given(record_entries)
@example({b"state": b"\xff", b"\xfe": b"x", b"last_error": b"e" * 200_000})
def test_job_records_always_decode(raw: dict[bytes, bytes]) -> None:
    # A record is advisory: garbage reads as absent fields, never as an error.
    record = decode_job_record(raw)
    for key, value in record.items():
        assert isinstance(key, str)
        assert isinstance(value, str)
        assert len(value) <= ERROR_TEXT_MAX
        (key + value).encode()


@FUZZ
@given(dead_entries)
@example({**DEAD_BASE, b"dead_at": b"1e999", b"room": b"[/bold]"})
def test_dead_letters_always_decode_for_people(raw: dict[bytes, bytes]) -> None:
    letter = _decode_entry(b"1-0", raw)
    _finite(letter.dead_at)
    for view in (letter.summary(), letter.detail()):
        json.dumps(view, ensure_ascii=False).encode()
        orjson.dumps(view)


# -- pinned cases (each one crashed something before the fix) ---------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        (b"step", "²".encode(), "field 'step' is not an integer"),
        (b"step", "٣".encode(), "field 'step' is not an integer"),
        (b"step", b"9" * 5000, "field 'step' is not a routing step"),
        (b"step", b"7", "field 'step' is not a routing step"),
        (b"enqueued_at", b"nan", "field 'enqueued_at' is not a number"),
        (b"received_at", b"1e999", "field 'received_at' is not a number"),
        (b"received_at", b"inf", "field 'received_at' is not a number"),
        (b"routed_at", b"1_0", "field 'routed_at' is not a number"),
        (b"routed_at", b"999999999999", "field 'routed_at' is out of range"),
        (b"agent", b"x" * 65, "field 'agent' is not an agent name"),
        (b"dispatcher", b"d\n", "field 'dispatcher' is not an id"),
    ],
)
def test_pinned_job_entries_are_malformed(field: bytes, value: bytes, reason: str) -> None:
    with pytest.raises(MalformedEntry, match=reason):
        JobMessage.decode({**_valid_job_fields(), field: value})


@pytest.mark.parametrize("field", [b"job_id", b"agent", b"step", b"enqueued_at", b"v"])
def test_long_values_are_bounded_in_the_reason(field: bytes) -> None:
    fields = {**_valid_job_fields(), field: b"x" * 1_000_000}
    with pytest.raises(MalformedEntry) as excinfo:
        JobMessage.decode(fields)
    assert len(str(excinfo.value)) <= 100


def test_a_reason_is_cut_to_its_bound() -> None:
    reason = str(MalformedEntry("y" * 5000))
    assert len(reason) == ERROR_TEXT_MAX
    assert reason.endswith("... (5000 chars)")


# -- unknown agent names (issue 7, item 9) ---------------------------------------------


@FUZZ
@given(st.text(min_size=1, max_size=300))
def test_unknown_agent_names_are_quoted_whole_up_to_the_bound(name: str) -> None:
    error = UnknownAgentError(name, 3, "room metadata")
    if len(name) <= SHOWN_NAME_MAX:
        # Within the bound: exactly the documented message (DESIGN.md).
        assert str(error) == f"Unknown agent '{name}' requested via room metadata."
        assert error.agent == name
    else:
        assert error.agent == f"{name[:SHOWN_NAME_MAX]}…({len(name)} chars)"
        assert str(error) == f"Unknown agent '{error.agent}' requested via room metadata."
    assert error.agent_length == len(name)


def test_a_megabyte_name_from_room_metadata_is_cut() -> None:
    name = "n" * 1_000_000
    metadata = json.dumps({"agent": name})
    with pytest.raises(UnknownAgentError) as excinfo:
        resolve_agent(_Job(_Room("lobby", metadata)), ["dental"])
    message = str(excinfo.value)
    assert message == f"Unknown agent '{'n' * 64}…(1000000 chars)' requested via room metadata."
    assert excinfo.value.agent_length == 1_000_000

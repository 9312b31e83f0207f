"""The dispatcher's write: what ``StreamStore.enqueue`` puts in Redis, byte for byte."""

from __future__ import annotations

import random
import time
import uuid

import pytest
from livekit.protocol.agent import Job
from livekit.protocol.models import Room
from redis.asyncio import Redis

from openrtc.dispatcher.dispatcher import DispatcherStats
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import QUEUED_AT_FIELD, JobMessage, accept_arguments

pytestmark = pytest.mark.anyio


def _message(job_id: str, metadata: str, room_metadata: str) -> JobMessage:
    job = Job(
        id=job_id,
        metadata=metadata,
        room=Room(name=f"dental-{job_id}", sid="RM_x", metadata=room_metadata),
    )
    now = time.time()
    return JobMessage(
        job=job,
        agent="dental",
        accept=accept_arguments(job_id, "dental"),
        livekit_url="ws://127.0.0.1:7880",
        step=1,
        source="job metadata",
        dispatcher_id="d-test",
        received_at=now,
        routed_at=now,
        enqueued_at=now,
    )


# Real metadata is any UTF-8 text, and the serialized Job is arbitrary bytes:
# every byte value must reach the stream unchanged through the packed argument.
_RANDOM = random.Random(20261130)
_CASES = [
    ("", ""),
    ('{"agent": "dental"}', '{"agent": "dental", "caller": "+15551234567"}'),
    ("\x00\x01\x7f\x80", "\ud7ff\ue000\U0010ffff"),
    ("x" * 70_000, "é" * 1000),  # past MessagePack's 16-bit length forms
    *(
        (
            "".join(chr(_RANDOM.randrange(0x110000 - 0x800)) for _ in range(200)),
            bytes(_RANDOM.randrange(256) for _ in range(200)).decode("latin-1"),
        )
        for _ in range(8)
    ),
]


@pytest.mark.parametrize(("metadata", "room_metadata"), _CASES)
async def test_an_entry_reaches_the_stream_exactly_as_encoded(
    redis: Redis, metadata: str, room_metadata: str
) -> None:
    # Surrogates are not text: shift the random draws past them.
    metadata = "".join(c if c < "\ud800" else chr(ord(c) + 0x800) for c in metadata)
    keys = Keys(f"enq-{uuid.uuid4().hex[:8]}")
    store = StreamStore(redis, keys)
    message = _message(f"AJ_{uuid.uuid4().hex[:12]}", metadata, room_metadata)
    [result] = await store.enqueue([message])
    assert result.outcome == "queued"
    [(entry_id, fields)] = await redis.xrange(keys.jobs("dental"))
    assert entry_id.decode() == result.entry_id
    stamped = fields.pop(QUEUED_AT_FIELD.encode())
    assert stamped.isdigit()
    assert fields == message.encode()
    assert list(fields) == list(message.encode())  # field order kept too
    assert JobMessage.decode({**fields, QUEUED_AT_FIELD.encode(): stamped}).job == message.job
    [again] = await store.enqueue([message])
    assert (again.outcome, again.entry_id) == ("duplicate", result.entry_id)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("counts", "printed"),
    [
        ({}, "nothing yet"),
        ({"offered": 5, "accepted": 4}, "offered 5, accepted 4"),
        ({"unknown_agent": 1, "reconcile_leader": 1}, "unknown agent 1, reconcile leader 1"),
    ],
)
def test_dispatcher_counts_print_for_people(counts: dict[str, int], printed: str) -> None:
    # What the demo prints after its calls (it printed the dataclass repr before).
    assert str(DispatcherStats(**counts)) == printed

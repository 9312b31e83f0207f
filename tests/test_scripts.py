"""The Lua scripts built from shared fragments, against a real Redis.

Several scripts in :mod:`openrtc.store.scripts` are composed from one fragment
(the "pending on this consumer" fence, the counted claim that ends a reclaim
pass): these tests pin what each composed script does when the entry is, or
is no longer, the caller's, and that every script carries its fragment once.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from openrtc.store import scripts
from openrtc.store.checkpoint import CheckpointStore
from openrtc.store.streams import JobConsumer, StreamStore
from openrtc.wire.keys import WORKERS_GROUP, Keys
from tests.support.jobs import message
from tests.support.stack import eventually, unique

pytestmark = pytest.mark.anyio


async def _store(redis: Redis) -> tuple[Keys, StreamStore]:
    keys = Keys(unique("ns"))
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    return keys, store


async def test_the_owner_fence_lets_only_the_entry_s_consumer_act(redis: Redis) -> None:
    """START, REDELIVER, RELEASE and SAVE_CHECKPOINT, for the owner and for another."""
    keys, store = await _store(redis)
    stream = keys.jobs("dental")
    owner, other = JobConsumer(store, "dental", "w-own"), JobConsumer(store, "dental", "w-other")
    jobs = [message("dental", unique("dental")) for _ in range(2)]
    await store.enqueue(jobs)
    held = await owner.read(2, 100)
    assert len(held) == 2
    first, second = held
    job = first.fields[b"job_id"].decode()

    # Not the owner: nothing happens.
    assert not await other.start(first.entry_id, job)
    assert await other.redeliver(first.entry_id) is None
    assert await other.release(first.entry_id, job) is None
    checkpoints = CheckpointStore(redis, keys, "dental", 60)
    assert not await checkpoints.save(job, b"theirs", entry_id=first.entry_id, consumer="w-other")
    assert await checkpoints.load(job) is None
    assert await redis.hget(keys.job("dental", job), "state") == b"queued"

    # The owner: each acts.
    assert await owner.start(first.entry_id, job, {"attempt": 1})
    record = await redis.hgetall(keys.job("dental", job))
    assert (record[b"state"], record[b"worker"], record[b"attempt"]) == (
        b"running",
        b"w-own",
        b"1",
    )
    assert await checkpoints.save(job, b"mine", entry_id=first.entry_id, consumer="w-own")
    assert await checkpoints.load(job) == b"mine"
    again = await owner.redeliver(first.entry_id)
    assert again is not None
    assert (again.entry_id, again.deliveries) == (first.entry_id, 2)
    assert again.fields == first.fields
    released = await owner.release(first.entry_id, job, handover=True)
    assert released is not None
    assert released != first.entry_id
    [(_, fields)] = await redis.xrange(stream, released, released)
    assert fields[b"handover"] == b"w-own"
    assert await redis.hget(keys.job("dental", job), "entry") == released.encode()

    # Gone from the stream (released above): the fence holds for the owner too.
    assert not await owner.start(first.entry_id, job)
    assert await owner.redeliver(first.entry_id) is None
    assert await owner.release(first.entry_id, job) is None
    assert not await checkpoints.save(job, b"late", entry_id=first.entry_id, consumer="w-own")
    assert await checkpoints.load(job) == b"mine"

    # Pending, but deleted from the stream: REDELIVER and RELEASE say not ours.
    await redis.xdel(stream, second.entry_id)
    assert await owner.redeliver(second.entry_id) is None
    assert await owner.release(second.entry_id, "unused") is None


async def test_a_reclaim_pass_claims_idle_entries_with_their_counts(redis: Redis) -> None:
    keys, store = await _store(redis)
    stream = keys.jobs("dental")
    dead, peer = JobConsumer(store, "dental", "w-dead"), JobConsumer(store, "dental", "w-peer")
    await store.enqueue([message("dental", unique("dental")) for _ in range(3)])
    held = await dead.read(3, 100)
    assert len(held) == 3
    # Deleted from the stream while pending: XCLAIM drops it, nobody gets it.
    await redis.xdel(stream, held[0].entry_id)

    async def all_idle() -> bool:
        rows = await redis.xpending_range(stream, WORKERS_GROUP, "-", "+", 10)
        return len(rows) == 3 and all(int(r["time_since_delivered"]) >= 50 for r in rows)

    await eventually(all_idle, within=10)
    got = await peer.reclaim(min_idle=0.05, count=10)
    assert sorted(d.entry_id for d in got) == sorted(d.entry_id for d in held[1:])
    assert [d.deliveries for d in got] == [2, 2]
    assert [d.fields for d in got] == [d.fields for d in held[1:]]
    rows = await redis.xpending_range(stream, WORKERS_GROUP, "-", "+", 10)
    assert sorted(r["message_id"].decode() for r in rows) == sorted(d.entry_id for d in got)
    assert {r["consumer"] for r in rows} == {b"w-peer"}


async def test_a_crashed_worker_s_entries_are_claimed_after_the_grace(redis: Redis) -> None:
    keys, store = await _store(redis)
    dead, peer = JobConsumer(store, "dental", "w-dead"), JobConsumer(store, "dental", "w-peer")
    await store.enqueue([message("dental", unique("dental")) for _ in range(2)])
    held = await dead.read(2, 100)
    assert len(held) == 2
    await dead.watch()  # watched, and never subscribed: a dead process
    await peer.watch()
    pubsub = redis.pubsub()
    try:
        await pubsub.ssubscribe(peer.alive_channel)  # the caller's own subscription

        async def subscribed() -> bool:
            counts = await redis.execute_command("PUBSUB", "SHARDNUMSUB", peer.alive_channel)
            return int(counts[1]) > 0

        await eventually(subscribed, within=10)
        # The first look finds a suspect; a later one, past the grace, claims.
        got: list[str] = []

        async def claimed() -> bool:
            got.extend(d.entry_id for d in await peer.reclaim_crashed(0.0, 10, 0.001))
            return len(got) == 2

        await eventually(claimed, within=10)
        assert sorted(got) == sorted(d.entry_id for d in held)
        pending = await redis.xpending_range(
            keys.jobs("dental"), WORKERS_GROUP, "-", "+", 10, consumername="w-peer"
        )
        assert sorted(int(p["times_delivered"]) for p in pending) == [2, 2]
    finally:
        await pubsub.aclose()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fragment", "users"),
    [
        ("PENDING_ON", ["START", "RELEASE", "REDELIVER", "SAVE_CHECKPOINT"]),
        ("CLAIM_COUNTED", ["RECLAIM", "CRASHED"]),
    ],
)
def test_each_script_carries_its_shared_fragment_once(fragment: str, users: list[str]) -> None:
    """A fragment pasted by hand into one script would diverge from the others."""
    shared: str = getattr(scripts, fragment)
    for name in users:
        script: str = getattr(scripts, name)
        assert script.count(shared) == 1, name

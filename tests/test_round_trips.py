"""Redis round trips of one call's lifecycle, counted on a real Redis.

Each ``send`` of a packed request on the client's connections is one round
trip (a pipeline is one). The lifecycle is the worker's and the dispatcher's
Redis steps of one call, in the grouping the code makes them: enqueue, the
worker's read (with the job's record), the start (with its RUNNING status),
the end (report, acknowledgement, record, checkpoint and SUCCESS status).
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection

from openrtc.devtools.devstack import RedisCluster, RedisServer
from openrtc.store.streams import JobConsumer, Renewal, ReportWrite, StreamStore, connect_redis
from openrtc.wire.keys import Keys
from openrtc.wire.messages import JobMessage, JobStatus, RecordField, StatusEvent
from openrtc.wire.reports import CallReport
from tests.support.jobs import message
from tests.support.stack import unique

pytestmark = pytest.mark.anyio

#: The goal (issue 22): at most this many round trips for one call, enqueue to end.
GOAL: int = 4


class CountingConnection(Connection):
    """A connection that counts the requests it sends (one per round trip)."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        await super().send_packed_command(command, check_health)


async def lifecycle(
    redis: Redis, keys: Keys, store: StreamStore, consumer: JobConsumer
) -> tuple[JobMessage, int]:
    """One call's Redis steps, as the dispatcher and the worker make them.

    Returns the job and the round trips of its renewal (one, the healthy mark
    on it): a renewal runs every lease / 3 for all of a worker's calls
    whatever they are, so it is the per-call-second cost, not this one's.
    """
    job = message("dental", unique("dental"))
    await store.enqueue([job])
    [delivery] = await consumer.read(1, 100)  # its record is checked by the start
    running = (job.dispatcher_id, StatusEvent(job.job_id, JobStatus.RUNNING))
    fields = {RecordField.ATTEMPT: 1}
    assert await consumer.start_unread(delivery.entry_id, job.job_id, fields, status=running)
    before = CountingConnection.sent
    renewal = await consumer.renew({delivery.entry_id: job.job_id}, {delivery.entry_id: 1})
    assert renewal == Renewal([], [])
    renewals = CountingConnection.sent - before
    report = CallReport(job.job_id, "dental", job.room, 0.0, 1.0, "ended", tenant=job.tenant)
    added = await consumer.end(
        delivery.entry_id,
        job.job_id,
        checkpoint=True,
        status=(job.dispatcher_id, StatusEvent(job.job_id, JobStatus.SUCCESS)),
        report=ReportWrite(report, maxlen=100, max_age=3600),
        ended=(job.room, "RM_x"),
    )
    assert added is not None
    return job, renewals


async def test_one_call_costs_at_most_four_round_trips(redis_server: RedisServer) -> None:
    pool = ConnectionPool(port=redis_server.port, connection_class=CountingConnection)
    redis = Redis(connection_pool=pool)
    try:
        keys = Keys(unique("ns"))
        store = StreamStore(redis, keys)
        await store.ensure_group("dental")
        consumer = JobConsumer(store, "dental", "w-1")
        await lifecycle(redis, keys, store, consumer)  # the scripts loaded, a connection open
        counts: list[int] = []
        for _ in range(2):
            CountingConnection.sent = 0
            job, renewals = await lifecycle(redis, keys, store, consumer)
            counts.append(CountingConnection.sent - renewals)
            assert renewals == 1

        record = await consumer.job_record(job.job_id)
        assert record[RecordField.STATE] == "done"
        assert record[RecordField.HEALTHY] == "1"
        assert await redis.xlen(keys.jobs("dental")) == 0
        events = await redis.xrange(keys.status(job.dispatcher_id))
        ours = [
            StatusEvent.decode(f).status for _, f in events if f[b"job_id"] == job.job_id.encode()
        ]
        assert ours == [JobStatus.RUNNING, JobStatus.SUCCESS]
        assert await redis.xlen(keys.reports) == 3  # one per call
        assert await redis.get(keys.ended(job.room)) == b"RM_x"
        assert max(counts) <= GOAL, f"{counts} round trips for one call (goal {GOAL})"
    finally:
        await redis.aclose()
        await pool.aclose()


async def test_the_call_s_steps_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """The same steps under Redis Cluster: the report and the ended mark (other
    slots than the agent's) go a round trip before the acknowledgement."""
    redis = connect_redis(redis_cluster.url)
    try:
        keys = Keys(unique("ns"), cluster=True)
        store = StreamStore(redis, keys)
        await store.ensure_group("dental")
        consumer = JobConsumer(store, "dental", "w-1")
        for _ in range(2):
            job, _ = await lifecycle(redis, keys, store, consumer)
            record = await consumer.job_record(job.job_id)
            assert (record[RecordField.STATE], record[RecordField.HEALTHY]) == ("done", "1")
            assert await redis.get(keys.ended(job.room)) == b"RM_x"
        assert await redis.xlen(keys.jobs("dental")) == 0
        assert await redis.xlen(keys.reports) == 2
        # Each job's events in order; the first call's may repeat one (the
        # cluster's nodes had no scripts yet: the refused start is sent again
        # with its event, so the event never comes before the start).
        events = [StatusEvent.decode(f) for _, f in await redis.xrange(keys.status("d-1"))]
        for job_id in {e.job_id for e in events}:
            statuses = [e.status for e in events if e.job_id == job_id]
            assert [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s] == [
                JobStatus.RUNNING,
                JobStatus.SUCCESS,
            ], statuses
        assert len({e.job_id for e in events}) == 2
    finally:
        await redis.aclose()


async def test_a_first_delivery_s_record_is_checked_by_its_start(redis: Redis) -> None:
    """A first delivery is judged without its record (no round trip of its own):
    its start marks it only while the record is as the enqueue wrote it, and
    says so otherwise (the worker then reads it and judges again)."""
    keys = Keys(unique("ns"))
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    consumer = JobConsumer(store, "dental", "w-1")
    jobs = [message("dental", unique("dental")) for _ in range(4)]
    await store.enqueue(jobs)
    terminated, restored, remade, fresh = await consumer.read(4, 100)
    await store.publish_termination("dental", jobs[0].job_id, "livekit")
    await redis.hset(keys.job("dental", jobs[1].job_id), mapping={"state": "running"})
    await redis.hset(keys.job("dental", jobs[2].job_id), mapping={"room_sid": "RM_new"})
    for delivery, job in zip((terminated, restored, remade), jobs, strict=False):
        assert await consumer.start_unread(delivery.entry_id, job.job_id) is None
        assert (await consumer.job_record(job.job_id)).get(RecordField.WORKER) is None
    assert await consumer.start_unread(fresh.entry_id, jobs[3].job_id) is True
    assert (await consumer.job_record(jobs[3].job_id))[RecordField.STATE] == "running"
    # Not ours: False, as start says.
    other = JobConsumer(store, "dental", "w-2")
    assert await other.start_unread(fresh.entry_id, jobs[3].job_id) is False


async def test_a_lost_script_cache_keeps_a_pipeline_in_order(redis: Redis) -> None:
    """Redis lost its scripts (a restart, SCRIPT FLUSH): a pipeline's refused
    script is sent again with everything after it, so what follows it still
    lands after it (the end's SUCCESS event after its acknowledgement; a test
    saw the event with the entry still in the stream after a Redis restart)."""
    store = StreamStore(redis, Keys(unique("ns")))
    key = unique("order")
    script = redis.register_script("return redis.call('RPUSH', KEYS[1], 'script')")
    await redis.script_flush()
    commands = [("EVALSHA", script.sha, 1, key), ("RPUSH", key, "after")]
    await store.pipelined(commands, [script])
    pushed = [x.decode() for x in await redis.lrange(key, 0, -1)]
    assert pushed[-1] == "after", pushed
    assert "script" in pushed

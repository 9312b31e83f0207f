"""Poisoned entries against real servers (issue 7, items 3 and 9).

A garbage entry in front of a real job, a garbage job record, garbage on the
control and status streams, an entry past its delivery limit, and an unknown
agent name a megabyte long: the worker and the dispatcher serve on, and what
they copy into logs, dead letters and LiveKit is bounded.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import pytest
from livekit.protocol import agent as proto
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.devtools.standin import StandIn, make_job
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import ERROR_TEXT_MAX, JobStatus, StatusEvent, agent_identity
from tests.support.jobs import job_message
from tests.support.stack import (
    creds,
    delete_room,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)
from tests.support.standin import make_settings, offer, updates_for
from tests.support.waits import TEST_BUDGET, entry_gone, wait_dead_letters, wait_status

pytestmark = pytest.mark.anyio


def _with(fields: dict[bytes, bytes], **changes: bytes) -> dict[Any, Any]:
    return {**fields, **{k.encode(): v for k, v in changes.items()}}


async def test_garbage_in_front_of_real_jobs_is_dead_lettered_and_the_worker_serves_on(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    stream = keys.jobs("dental")
    room = await new_room(livekit_server, unique("dental-poison"))
    later_room = await new_room(livekit_server, unique("dental-later"))
    with anyio.fail_after(TEST_BUDGET):
        async with (
            caller_in(creds(livekit_server), room.name) as caller,
            caller_in(creds(livekit_server), later_room.name, "caller-2") as later_caller,
        ):
            good = job_message(livekit_server, room, "dental", dispatcher)
            template = job_message(livekit_server, room, "dental", dispatcher).encode()
            await store.ensure_group("dental")
            # Each of these stopped (or would mislead) the worker before the fix.
            garbage = {
                # "²".isdigit() is true and int("²") raised a plain ValueError.
                "superscript step": _with(template, step="²".encode()),
                # int() refuses more than 4300 digits.
                "huge step": _with(template, step=b"9" * 5000),
                # A nan enqueue time never expired.
                "nan time": _with(template, enqueued_at=b"nan"),
                "agent name of a megabyte": _with(template, agent=b"a" * 1_000_000),
            }
            entries = {}
            for what, fields in garbage.items():
                entries[what] = (await redis.xadd(stream, fields)).decode()
            # The real job's own record holds a value that is not UTF-8 (the
            # record read raised UnicodeDecodeError and stopped the worker).
            await redis.hset(keys.job("dental", good.job_id), b"note", b"\xff\xfe")
            [good_entry] = await store.enqueue([good])

            async with working(livekit_server, redis_server.url, ns, "dental") as worker:
                agent = await caller.wait_agent(within=20)
                assert agent.identity == agent_identity(good.job_id)
                dead = await wait_dead_letters(redis, keys, len(entries))
                reasons = {
                    "superscript step": "field 'step' is not an integer: '²'",
                    "huge step": "field 'step' is not a routing step",
                    "nan time": "field 'enqueued_at' is not a number: 'nan'",
                    "agent name of a megabyte": "field 'agent' is not an agent name: 'aaaa",
                }
                for what, entry_id in entries.items():
                    letter = dead[stream, entry_id]
                    assert letter[b"reason"] == b"malformed", what
                    assert reasons[what] in letter[b"error"].decode(), what
                    assert len(letter[b"error"]) <= 200, what
                    assert await entry_gone(redis, stream, entry_id), what
                assert worker.stats.dead_lettered == len(entries)

                # Garbage on the control stream is skipped; a real termination
                # after it still ends the call.
                control = keys.control("dental")
                for fields in (
                    {b"type": b"terminate", b"job_id": b"\xff\xfe"},
                    {b"type": b"terminate", b"job_id": b"j" * 1_000_000},
                    {b"type": b"\xff", b"job_id": good.job_id.encode()},
                    {b"junk": b"[/bold]"},
                ):
                    await redis.xadd(control, fields)
                assert worker.running_jobs == [good.job_id]
                await store.publish_termination("dental", good.job_id, "livekit")
                await caller.wait_no_agent(within=15)
                await wait_status(redis, keys, dispatcher, good.job_id, JobStatus.SUCCESS)
                assert await entry_gone(redis, stream, good_entry.entry_id)

                # Still serving: a job enqueued after all of it is started too.
                later = job_message(livekit_server, later_room, "dental", dispatcher)
                await store.enqueue([later])
                later_agent = await later_caller.wait_agent(within=20)
                assert later_agent.identity == agent_identity(later.job_id)
                assert worker.stats.started == 2
                await delete_room(livekit_server, later_room.name)
                await wait_status(redis, keys, dispatcher, later.job_id, JobStatus.SUCCESS)
    await delete_room(livekit_server, room.name)


async def test_an_entry_past_its_delivery_limit_is_dead_lettered_before_it_is_decoded(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    stream = keys.jobs("dental")
    room = await new_room(livekit_server, unique("dental-limit"))
    message = job_message(livekit_server, room, "dental", dispatcher)
    max_deliveries = 2
    with anyio.fail_after(TEST_BUDGET):
        await store.ensure_group("dental")
        # An entry that the decoder chokes on, already delivered to a worker
        # that died of it, and claimed as often as the limit allows.
        entry_id = (await redis.xadd(stream, _with(message.encode(), step="²".encode()))).decode()
        await redis.hset(keys.job("dental", message.job_id), b"last_error", b"worker died")
        await redis.xreadgroup(WORKERS_GROUP, "dead-worker", {stream: ">"}, count=1)
        for _ in range(max_deliveries):
            await redis.xclaim(stream, WORKERS_GROUP, "dead-worker", 0, [entry_id])
        async with (
            caller_in(creds(livekit_server), room.name) as caller,
            working(
                livekit_server,
                redis_server.url,
                ns,
                "dental",
                lease=1.0,
                max_deliveries=max_deliveries,
            ) as worker,
        ):
            dead = await wait_dead_letters(redis, keys, 1)
            letter = dead[stream, entry_id]
            # Not "malformed": the delivery count decided, before any decoding.
            assert letter[b"reason"] == b"max-deliveries"
            error = letter[b"error"].decode()
            assert f"(max {max_deliveries}); last error: worker died" in error
            assert await entry_gone(redis, stream, entry_id)
            event = await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.FAILED)
            assert event.error.startswith("max-deliveries: gave up after")
            assert worker.stats.started == 0
            assert caller.sightings == []
    await delete_room(livekit_server, room.name)


async def test_garbage_on_the_status_stream_does_not_stop_the_relay(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    store = StreamStore(client, keys)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        job = make_job("dental-status-garbage")
        assert (await offer(standin, job, worker)).available
        await eventually(lambda: dispatcher.stats.enqueued == 1, "the job enqueued")
        me = settings.dispatcher_id
        status_key = keys.status(me)
        for fields in (
            {b"v": b"1", b"job_id": job.id.encode(), b"status": b"running", b"at": b"nan"},
            {b"v": b"1", b"job_id": job.id.encode(), b"status": b"running", b"at": b"1e999"},
            {b"v": b"1", b"job_id": b"\xff" * 10, b"status": b"failed"},
            {b"v": b"1", b"job_id": b"j" * 1_000_000, b"status": b"failed"},
            {b"v": b"1", b"job_id": job.id.encode(), b"status": "²".encode()},
            {b"\xff": b"\xfe", b"[/x]": b""},
        ):
            await client.xadd(status_key, fields)
        # A real failure whose error is a megabyte: relayed, bounded.
        await store.publish_status(me, StatusEvent(job.id, JobStatus.RUNNING, worker_id="w1"))
        long_error = "boom " * 200_000
        await client.xadd(
            status_key,
            {
                b"v": b"1",
                b"job_id": job.id.encode(),
                b"status": b"failed",
                b"error": long_error.encode(),
                b"worker": b"w1",
            },
        )
        await eventually(
            lambda: len(updates_for(worker, job.id)) == 2, "the real statuses relayed", within=10
        )
        running, failed = updates_for(worker, job.id)
        assert running.status == proto.JobStatus.JS_RUNNING
        assert failed.status == proto.JobStatus.JS_FAILED
        assert failed.error.startswith("boom boom")
        assert len(failed.error) <= ERROR_TEXT_MAX
        assert dispatcher.stats.statuses_relayed == 2


async def test_an_unknown_agent_name_of_any_length_is_bounded_everywhere(
    standin: StandIn,
    client: Redis,
    pool: AgentPool,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    name = "g" * 100_000
    expected = f"Unknown agent '{'g' * 64}…(100000 chars)' requested via job metadata."
    async with dispatching(settings, pool, redis=client):
        (worker,) = await standin.wait_registered()
        job = make_job("lobby-long-ghost", metadata=json.dumps({"agent": name}))
        assert (await offer(standin, job, worker)).available

        await eventually(lambda: bool(updates_for(worker, job.id)), "the job failed")
        (update,) = updates_for(worker, job.id)
        assert update.status == proto.JobStatus.JS_FAILED
        assert update.error == expected

        async def dead_lettered() -> bool:
            return bool(await client.xlen(keys.dead_letter))

        await eventually(dead_lettered, "the dead letter", within=20)
        [(_, letter)] = await client.xrange(keys.dead_letter)
        assert letter[b"reason"] == b"unknown-agent"
        assert letter[b"error"] == expected.encode()
        assert letter[b"requested_agent"] == f"{'g' * 64}…(100000 chars)".encode()
    logged = [r.getMessage() for r in caplog.records]
    assert any(expected in line for line in logged)
    assert not [line for line in logged if "g" * 65 in line]

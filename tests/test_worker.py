"""The worker runtime against the real LiveKit server and real Redis, without a dispatcher.

Each test puts job entries on an agent's stream itself, shaped the way the
dispatcher shapes them (a real ``Job`` whose room is a room on the real server),
and watches what the worker does: who joins the room, what lands in the dead
letters, what the dispatcher's status stream receives, what membership shows.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.errors import ConfigError
from openrtc.settings import LiveKitSettings, WorkerSettings
from openrtc.store.streams import StreamStore, connect_redis
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import (
    AGENT_ATTRIBUTE,
    JobStatus,
    agent_identity,
)
from openrtc.worker.worker import Worker
from tests.support.jobs import AGENT_HEADER, job_message, write_agent
from tests.support.stack import (
    OFFLINE_AGENTS,
    creds,
    delete_room,
    eventually,
    live_rooms,
    new_room,
    unique,
    working,
)
from tests.support.waits import (
    TEST_BUDGET,
    entry_gone,
    reclaim_sweeps,
    statuses,
    wait_dead_letters,
    wait_status,
)

pytestmark = pytest.mark.anyio


# -- helpers -------------------------------------------------------------------


def _ignoring_missing(check: Any) -> Any:
    """``check``, but a missing key (``ResponseError``) counts as not yet."""

    async def wrapped() -> bool:
        try:
            return bool(await check())
        except ResponseError:
            return False

    return wrapped


BROKEN_AGENT = (
    AGENT_HEADER
    + """

@agent_config(name="broken", tts=ToneTTS())
class Broken(Agent):
    def __init__(self) -> None:
        # Built at the worker's start-up (outside a job), then failing in every
        # session: what the start-up check cannot see.
        if get_job_context(required=False) is not None:
            raise RuntimeError("no prompt configured for this line")
        super().__init__(instructions="Broken in every session.")
"""
)

# Saves its "transcript" on shutdown, which takes a few seconds (a slow database).
SLOW_GOODBYE_AGENT = (
    AGENT_HEADER
    + """

@agent_config(name="slowbye", tts=ToneTTS())
class SlowGoodbye(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Takes its time to hang up.")

    async def on_enter(self) -> None:
        async def save_transcript(reason: str) -> None:
            await asyncio.sleep({seconds})

        get_job_context().add_shutdown_callback(save_transcript)
"""
)

# Writes what ``get_job_context()`` shows it, as user agent code reads it.
PROBE_AGENT = (
    AGENT_HEADER
    + """

OUT = Path({out!r})


@agent_config(name="probe", tts=ToneTTS())
class Probe(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Reports its job.")

    async def on_enter(self) -> None:
        ctx = get_job_context()
        me = ctx.room.local_participant
        seen = {{
            "job_id": ctx.job.id,
            "metadata": ctx.job.metadata,
            "room": ctx.job.room.name,
            "room_sid": ctx.job.room.sid,
            "room_metadata": ctx.job.room.metadata,
            "identity": me.identity,
            "attributes": dict(me.attributes),
            "connected_room": ctx.room.name,
        }}
        OUT.write_text(json.dumps(seen))
"""
)


# -- 1. poison -----------------------------------------------------------------


async def test_poison_entries_are_dead_lettered_and_never_block_the_stream(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    dental_stream = keys.jobs("dental")
    broken_pool = AgentPool.from_directory(write_agent(tmp_path / "agents", "broken", BROKEN_AGENT))
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(livekit_server, redis_server.url, ns, "dental") as dental,
            working(
                livekit_server,
                redis_server.url,
                ns,
                "broken",
                pool=broken_pool,
                lease=1.0,
                max_deliveries=2,
            ) as broken,
        ):
            dental_room = await new_room(livekit_server, unique("dental-call"))
            broken_room = await new_room(livekit_server, unique("broken-call"))
            # Junk and an entry for another agent, straight onto dental's stream.
            no_schema = (await redis.xadd(dental_stream, {b"hello": b"world"})).decode()
            future = (await redis.xadd(dental_stream, {b"v": b"9", b"job": b"?"})).decode()
            bad_job = (await redis.xadd(dental_stream, {b"v": b"1", b"job": b"\xff\xfe"})).decode()
            stray = job_message(livekit_server, dental_room, "restaurant", dispatcher)
            stray_entry = (await redis.xadd(dental_stream, dict[Any, Any](stray.encode()))).decode()
            doomed = job_message(livekit_server, broken_room, "broken", dispatcher)
            [doomed_entry] = await store.enqueue([doomed])
            good = job_message(livekit_server, dental_room, "dental", dispatcher)
            [good_entry] = await store.enqueue([good])

            async with caller_in(creds(livekit_server), dental_room.name) as caller:
                # The stream is not blocked: the good job behind the junk is served.
                agent = await caller.wait_agent(within=20)
                assert agent.identity == agent_identity(good.job_id)
                assert agent.attributes.get(AGENT_ATTRIBUTE) == "dental"

                dead = await wait_dead_letters(redis, keys, 5, within=20)
                expected = {
                    no_schema: "missing field 'v'",
                    future: "unsupported schema version '9' (this is v1)",
                    bad_job: "field 'job' is not a serialized Job",
                    stray_entry: "entry for agent 'restaurant' on agent 'dental' stream",
                }
                for entry_id, error in expected.items():
                    letter = dead[dental_stream, entry_id]
                    assert letter[b"reason"] == b"malformed"
                    assert error in letter[b"error"].decode()
                    assert letter[b"origin"] == dental_stream.encode()
                    assert await entry_gone(redis, dental_stream, entry_id)
                # The original fields are kept whole (what makes a replay lossless).
                assert dead[dental_stream, no_schema][b"hello"] == b"world"
                assert dead[dental_stream, stray_entry][b"job_id"] == stray.job_id.encode()

                letter = dead[keys.jobs("broken"), doomed_entry.entry_id]
                assert letter[b"reason"] == b"max-deliveries"
                assert letter[b"job_id"] == doomed.job_id.encode()
                error = letter[b"error"].decode()
                assert "(max 2)" in error
                assert "last error: RuntimeError: no prompt configured for this line" in error
                assert await entry_gone(redis, keys.jobs("broken"), doomed_entry.entry_id)
                # Exactly max_deliveries attempts, then the dead letters.
                assert broken.stats.started == 2
                assert broken.stats.failed == 2
                assert broken.stats.dead_lettered == 1
                assert dental.stats.dead_lettered == 4

                # The dispatcher hears that the jobs it holds failed, and why.
                failed = await wait_status(redis, keys, dispatcher, doomed.job_id, JobStatus.FAILED)
                assert failed.error.startswith("max-deliveries: ")
                assert "RuntimeError: no prompt configured" in failed.error
                assert failed.worker_id == broken.settings.worker_id
                events = await statuses(redis, keys, dispatcher)
                doomed_events = [e.status for e in events if e.job_id == doomed.job_id]
                assert doomed_events == [JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.FAILED]
                stray_failed = await wait_status(
                    redis, keys, dispatcher, stray.job_id, JobStatus.FAILED
                )
                assert stray_failed.error.startswith("malformed: entry for agent 'restaurant'")

                await delete_room(livekit_server, dental_room.name)
                await wait_status(redis, keys, dispatcher, good.job_id, JobStatus.SUCCESS)
                assert await entry_gone(redis, dental_stream, good_entry.entry_id)
            assert dental.stats.started == 1
            assert dental.stats.succeeded == 1
            await delete_room(livekit_server, broken_room.name)


# -- 2. expiry -----------------------------------------------------------------


async def test_a_job_that_waited_too_long_expires_instead_of_starting(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    stale_room = await new_room(livekit_server, unique("dental-stale"))
    fresh_room = await new_room(livekit_server, unique("dental-fresh"))
    stale = job_message(livekit_server, stale_room, "dental", dispatcher)
    fresh = job_message(livekit_server, fresh_room, "dental", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            caller_in(creds(livekit_server), stale_room.name) as stale_caller,
            caller_in(creds(livekit_server), fresh_room.name, "caller-2") as fresh_caller,
        ):
            [stale_entry] = await store.enqueue([stale])
            queued_ms = int(stale_entry.entry_id.split("-")[0])

            async def older_than_the_limit() -> bool:
                # Its age is judged by Redis's clock from the moment it was queued.
                seconds, micros = await redis.time()
                return seconds * 1000 + micros // 1000 - queued_ms > 3_200

            await eventually(older_than_the_limit, "the job older than 3 s (Redis's clock)")
            async with working(
                livekit_server, redis_server.url, ns, "dental", max_queue_age=3.0
            ) as worker:
                dead = await wait_dead_letters(redis, keys, 1)
                letter = dead[keys.jobs("dental"), stale_entry.entry_id]
                assert letter[b"reason"] == b"expired"
                assert letter[b"job_id"] == stale.job_id.encode()
                assert "for a worker (limit 3s)" in letter[b"error"].decode()
                # Acknowledged after its letter is written (two steps).
                await eventually(
                    lambda: entry_gone(redis, keys.jobs("dental"), stale_entry.entry_id),
                    "the expired entry gone",
                )
                event = await wait_status(redis, keys, dispatcher, stale.job_id, JobStatus.FAILED)
                assert event.error.startswith("expired: waited 3.")

                # A job younger than the limit starts as usual.
                await store.enqueue([fresh])
                await fresh_caller.wait_agent(within=20)
                assert stale_caller.sightings == []  # nobody joined the expired call
                assert worker.stats.started == 1
                assert worker.running_jobs == [fresh.job_id]
                await delete_room(livekit_server, fresh_room.name)
                await wait_status(redis, keys, dispatcher, fresh.job_id, JobStatus.SUCCESS)
            events = await statuses(redis, keys, dispatcher)
            assert [e.status for e in events if e.job_id == stale.job_id] == [JobStatus.FAILED]
        await delete_room(livekit_server, stale_room.name)


# -- 3. termination ------------------------------------------------------------


async def test_a_termination_from_livekit_ends_the_session_and_it_stays_ended(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    lease = 1.0
    # Hanging up takes longer than a lease: the entry must stay ours meanwhile.
    agents = write_agent(
        tmp_path / "agents", "slowbye", SLOW_GOODBYE_AGENT.format(seconds=lease * 2.5)
    )
    room = await new_room(livekit_server, unique("slowbye-call"))
    message = job_message(livekit_server, room, "slowbye", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(
                livekit_server,
                redis_server.url,
                ns,
                "slowbye",
                pool=AgentPool.from_directory(agents),
                lease=lease,
            ) as worker,
            caller_in(creds(livekit_server), room.name) as caller,
        ):
            [entry] = await store.enqueue([message])
            agent = await caller.wait_agent(within=20)
            assert agent.identity == agent_identity(message.job_id)
            await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.RUNNING)

            await store.publish_termination("slowbye", message.job_id, "livekit")
            await caller.wait_no_agent(within=10)
            await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)
            assert await entry_gone(redis, keys.jobs("slowbye"), entry.entry_id)
            record = await redis.hgetall(keys.job("slowbye", message.job_id))
            assert record[b"state"] == b"done"
            assert record[b"terminated"] == b"livekit"
            # The call stays over: no second delivery, no agent coming back,
            # through reclaim sweeps (and the renewals between them).
            await reclaim_sweeps(redis, keys, "slowbye", 2)
            assert caller.agents() == []
            assert [s.sid for s in caller.sightings] == [agent.sid]
            assert worker.stats.started == 1
            assert worker.stats.reclaimed == 0
            assert worker.stats.succeeded == 1
            assert worker.running_jobs == []
            events = await statuses(redis, keys, dispatcher)
            assert [e.status for e in events] == [JobStatus.RUNNING, JobStatus.SUCCESS]
        await delete_room(livekit_server, room.name)


# -- 4. long calls -------------------------------------------------------------


async def test_a_long_call_is_never_redelivered_while_its_worker_lives(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    lease = 3.0  # renewed every second: a loaded machine must not make one late
    room = await new_room(livekit_server, unique("dental-long"))
    message = job_message(livekit_server, room, "dental", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(livekit_server, redis_server.url, ns, "dental", lease=lease) as first,
            working(livekit_server, redis_server.url, ns, "dental", lease=lease) as second,
            caller_in(creds(livekit_server), room.name) as caller,
        ):
            [entry] = await store.enqueue([message])
            agent = await caller.wait_agent(within=20)
            holder, other = (first, second) if first.running_jobs else (second, first)
            assert holder.running_jobs == [message.job_id]
            # Four reclaim sweeps, half a lease apart (each would claim an entry
            # idle past the lease): nobody took it over or got it again.
            await reclaim_sweeps(redis, keys, "dental", 4)
            assert [a.sid for a in caller.agents()] == [agent.sid]
            assert len(caller.sightings) == 1
            assert caller.max_agents_at_once == 1
            assert other.stats.reclaimed == 0
            assert holder.stats.reclaimed == 0
            assert first.stats.started + second.stats.started == 1
            assert holder.stats.taken_over == 0
            pending = await redis.xpending_range(
                keys.jobs("dental"), WORKERS_GROUP, entry.entry_id, entry.entry_id, 1
            )
            assert pending[0]["consumer"].decode() == holder.settings.worker_id
            assert pending[0]["times_delivered"] == 1

            await delete_room(livekit_server, room.name)
            await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)
            assert await entry_gone(redis, keys.jobs("dental"), entry.entry_id)


# -- 5. rooms that are gone ----------------------------------------------------


async def test_a_job_whose_room_is_gone_is_finished_without_joining(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    gone = await new_room(livekit_server, unique("dental-gone"))
    await delete_room(livekit_server, gone.name)
    # Same name, new room: the job belongs to the old one, so it is gone too.
    old = await new_room(livekit_server, unique("dental-namesake"))
    await delete_room(livekit_server, old.name)
    namesake = await new_room(livekit_server, old.name)
    assert namesake.sid != old.sid
    gone_job = job_message(livekit_server, gone, "dental", dispatcher)
    old_job = job_message(livekit_server, old, "dental", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with caller_in(creds(livekit_server), namesake.name) as caller:
            entries = await store.enqueue([gone_job, old_job])
            async with working(livekit_server, redis_server.url, ns, "dental") as worker:
                for job in (gone_job, old_job):
                    await wait_status(redis, keys, dispatcher, job.job_id, JobStatus.SUCCESS)
                for entry in entries:
                    assert await entry_gone(redis, keys.jobs("dental"), entry.entry_id)
                # A session would have started (counted) before the success.
                assert worker.stats.started == 0
                assert caller.sightings == []
            # Joining would have created the deleted room again.
            assert await live_rooms(livekit_server, gone.name) == []
            for job in (gone_job, old_job):
                record = await redis.hgetall(keys.job("dental", job.job_id))
                assert record[b"state"] == b"done"
            events = await statuses(redis, keys, dispatcher)
            assert sorted((e.job_id, e.status) for e in events) == sorted(
                [(gone_job.job_id, JobStatus.SUCCESS), (old_job.job_id, JobStatus.SUCCESS)]
            )
        await delete_room(livekit_server, namesake.name)


# -- 6. unregistered agents ----------------------------------------------------


async def test_a_worker_for_an_unregistered_agent_is_refused() -> None:
    known = "(registered: dental, restaurant, support)"
    settings = WorkerSettings(
        livekit=LiveKitSettings("ws://127.0.0.1:7880", "devkey", "not-a-real-secret"),
        agent="ghost",
    )
    with pytest.raises(ConfigError) as raised:
        Worker(settings, AgentPool.from_directory(OFFLINE_AGENTS))
    assert str(raised.value) == f"Agent 'ghost' is not registered in the agents directory {known}."

    env = dict(
        os.environ,
        LIVEKIT_URL="ws://127.0.0.1:7880",
        LIVEKIT_API_KEY="devkey",
        LIVEKIT_API_SECRET="not-a-real-secret",
    )
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "openrtc",
                "worker",
                "--agent",
                "ghost",
                "--agents-dir",
                str(OFFLINE_AGENTS),
            ],
            env=env,
            check=False,
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 1, (out, err)
    assert f"error: Agent 'ghost' is not registered in the agents directory {known}." in err
    assert "Traceback" not in out + err
    assert "not-a-real-secret" not in out + err


# -- 7. Redis going away -------------------------------------------------------


async def test_the_worker_survives_a_redis_restart(
    livekit_server: LiveKitServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openrtc")
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    server = RedisServer(log_path=tmp_path / "redis.log")
    with server, anyio.fail_after(TEST_BUDGET):
        async with working(livekit_server, server.url, ns, "dental") as worker:
            worker_id = worker.settings.worker_id
            await anyio.to_thread.run_sync(server.stop)
            # Down until the worker has seen it (its reads, renewals and beats fail).
            await eventually(
                lambda: "Redis unreachable" in caplog.text, "the worker to see the outage"
            )
            await anyio.to_thread.run_sync(server.start)

            redis = connect_redis(server.url)
            try:
                # Back empty: the worker makes its group and its membership again.
                async def group_back() -> bool:
                    groups = await redis.xinfo_groups(keys.jobs("dental"))
                    return any(g["name"] == WORKERS_GROUP.encode() for g in groups)

                async def member_back() -> bool:
                    return await redis.zscore(keys.workers("dental"), worker_id) is not None

                await eventually(_ignoring_missing(group_back), "the consumer group", within=10)
                await eventually(member_back, "the worker's membership", within=10)

                room = await new_room(livekit_server, unique("dental-after"))
                message = job_message(livekit_server, room, "dental", dispatcher)
                await StreamStore(redis, keys).enqueue([message])
                async with caller_in(creds(livekit_server), room.name) as caller:
                    agent = await caller.wait_agent(within=20)
                    assert agent.identity == agent_identity(message.job_id)
                    await delete_room(livekit_server, room.name)
                    await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)
                assert worker.stats.started == 1
                assert await redis.xlen(keys.jobs("dental")) == 0
            finally:
                await redis.aclose()
        # It did see the outage, and saw Redis come back.
        assert "Redis unreachable" in caplog.text
        assert caplog.text.rindex("Redis connected") > caplog.text.rindex("Redis unreachable")


# -- 8. membership -------------------------------------------------------------


async def test_membership_shows_capacity_and_running_calls_and_is_left_on_stop(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    room = await new_room(livekit_server, unique("dental-member"))
    message = job_message(livekit_server, room, "dental", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with working(
            livekit_server, redis_server.url, ns, "dental", concurrency=3, membership_ttl=2.0
        ) as worker:
            worker_id = worker.settings.worker_id
            record_key = keys.worker(worker_id)

            async def record() -> dict[str, str]:
                raw = await redis.hgetall(record_key)
                return {k.decode(): v.decode() for k, v in raw.items()}

            score = await redis.zscore(keys.workers("dental"), worker_id)
            assert score is not None
            assert time.time() < score <= time.time() + 2.0
            first = await record()
            assert first["agent"] == "dental"
            assert first["capacity"] == "3"
            assert first["running"] == "0"
            assert first["draining"] == "0"

            # The score keeps moving: the heartbeat is alive.
            async def moved() -> bool:
                later = await redis.zscore(keys.workers("dental"), worker_id)
                return later is not None and later > score

            await eventually(moved, "the heartbeat's score moving", within=5)

            async with caller_in(creds(livekit_server), room.name) as caller:
                await StreamStore(redis, keys).enqueue([message])
                await caller.wait_agent(within=20)

                async def shows_running() -> bool:
                    r = await record()
                    return r["running"] == "1" and r["jobs"] == message.job_id

                await eventually(shows_running, "running=1 in the worker's record", within=5)
                assert (await record())["capacity"] == "3"
                await delete_room(livekit_server, room.name)
                await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)

                async def shows_idle() -> bool:
                    return (await record())["running"] == "0"

                await eventually(shows_idle, "running=0 in the worker's record", within=5)
            assert await redis.zscore(keys.workers("dental"), worker_id) is not None
        # Stopped: the member is gone at once, not after its TTL.
        assert await redis.zscore(keys.workers("dental"), worker_id) is None
        assert await redis.exists(record_key) == 0


# -- 9. the agent sees its real job -------------------------------------------


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_the_agent_sees_the_real_job(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    isolation: str,
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    out = tmp_path / "seen.json"
    agents = write_agent(tmp_path / "agents", "probe", PROBE_AGENT.format(out=str(out)))
    room = await new_room(livekit_server, unique("probe-call"), '{"agent": "probe"}')
    metadata = json.dumps({"agent": "probe", "ticket": "T-42"})
    message = job_message(livekit_server, room, "probe", dispatcher, metadata=metadata)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(
                livekit_server,
                redis_server.url,
                ns,
                "probe",
                pool=AgentPool.from_directory(agents),
                isolation=isolation,
            ),
            caller_in(creds(livekit_server), room.name) as caller,
        ):
            await StreamStore(redis, keys).enqueue([message])
            await caller.wait_agent(within=30)

            async def written() -> bool:
                return out.exists() and out.stat().st_size > 0

            await eventually(written, "the agent's report", within=10)
            seen = json.loads(out.read_text())
            assert seen["job_id"] == message.job_id
            assert seen["metadata"] == metadata
            assert seen["room"] == room.name == seen["connected_room"]
            assert seen["room_sid"] == room.sid
            assert seen["room_metadata"] == '{"agent": "probe"}'
            assert seen["identity"] == agent_identity(message.job_id)
            assert seen["attributes"][AGENT_ATTRIBUTE] == "probe"
            await delete_room(livekit_server, room.name)
            await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)

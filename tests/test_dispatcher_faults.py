"""The dispatcher under faults, against the protocol stand-in and a real Redis.

Each test runs a real :class:`~openrtc.dispatcher.dispatcher.Dispatcher` in-process
against ``openrtc/devtools/standin.py`` (LiveKit's ``/agent`` protocol over a real
WebSocket) and a real ``redis-server``, then breaks something on purpose:
dropped sockets, a restarted server, garbage frames, duplicate offers, Redis
going away, floods, unknown agents. What is asserted is what LiveKit and the
workers would see: availability answers, ``UpdateJobStatus`` and
``UpdateWorkerStatus`` messages, and the entries in Redis.

Every wait is bounded, so a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from livekit.protocol import agent as proto
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from openrtc.agents.registry import AgentPool
from openrtc.devtools.devstack import RedisServer
from openrtc.devtools.standin import StandIn, WorkerConn, make_job
from openrtc.dispatcher.admission import REPORTED_LOAD_MAX
from openrtc.dispatcher.dispatcher import AGENT_ATTRIBUTE, Dispatcher
from openrtc.store.membership import heartbeat
from openrtc.store.streams import StreamStore, connect_redis
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import JobMessage, JobStatus, StatusEvent, agent_identity
from tests.support.faults import slow_replies
from tests.support.stack import dispatching, eventually
from tests.support.standin import API_SECRET, make_settings, offer, updates_for

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[1]
AGENTS = ("dental", "restaurant", "support")
ASSIGNMENT_TOKEN = "standin.jwt.token"
TURN_PASSWORD = "s3cret-turn"
GHOST_ERROR = "Unknown agent 'ghost' requested via job metadata."


# -- fixtures and helpers ------------------------------------------------------


async def stream_jobs(redis: Redis, keys: Keys, agent: str) -> list[JobMessage]:
    return [JobMessage.decode(fields) for _, fields in await redis.xrange(keys.jobs(agent))]


async def enqueued_ids(redis: Redis, keys: Keys) -> list[str]:
    """The job id of every entry in every agent's stream (duplicates kept)."""
    ids: list[str] = []
    for agent in AGENTS:
        ids.extend(message.job_id for message in await stream_jobs(redis, keys, agent))
    return ids


async def dead_letters(redis: Redis, keys: Keys) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await redis.xrange(keys.dead_letter)]


async def membership_refreshed(
    redis: Redis, keys: Keys, dispatcher_id: str, *, times: int = 2
) -> None:
    """Wait until the dispatcher has refreshed its membership view ``times`` times.

    Each refresh writes the dispatcher's heartbeat and then reads the agents'
    loads; two heartbeats seen after now mean a whole refresh started after now.
    """
    key = keys.dispatcher(dispatcher_id)
    last = await redis.hget(key, "heartbeat_at")
    seen = 0
    with anyio.fail_after(5):
        while seen < times:
            await anyio.sleep(0.02)
            current = await redis.hget(key, "heartbeat_at")
            if current != last:
                seen += 1
                last = current


def _enqueued(dispatcher: Dispatcher, count: int) -> bool:
    return dispatcher.stats.enqueued == count


def ghost_job(room: str = "lobby-ghost", **kwargs: Any) -> proto.Job:
    return make_job(room, metadata=json.dumps({"agent": "ghost"}), **kwargs)


def agent_of(job: proto.Job) -> str:
    """The agent the routing chain must pick for the jobs these tests build."""
    if job.metadata:
        name: str = json.loads(job.metadata)["agent"]
        return name
    return job.room.name.split("-", 1)[0]


# -- 1, 2: LiveKit connection faults ---------------------------------------------


async def test_reconnects_after_a_dropped_socket_and_serves_new_jobs(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (first,) = await standin.wait_registered()
        before = [make_job(f"{agent}-before") for agent in AGENTS]
        for job in before:
            assert (await offer(standin, job, first)).available
        await eventually(lambda: dispatcher.stats.enqueued == 3, "3 jobs enqueued")
        # Accepted, but LiveKit never gets to assign it: the socket dies first.
        orphan = make_job("dental-orphan")
        assert (await standin.offer(orphan, first, assign=False)) is not None
        # Assigned, and the socket dies right behind the assignment: the job
        # reached the dispatcher, so it is still served.
        last = make_job("support-last-words")
        assert (await offer(standin, last, first)).available

        standin.drop(first)
        with anyio.fail_after(5):
            await first.closed.wait()
        (second,) = await standin.wait_registered()
        assert second.worker_id != first.worker_id
        await eventually(
            lambda: dispatcher.livekit_worker_id == second.worker_id, "the new registration"
        )
        assert dispatcher.stats.reconnects >= 1

        after = [make_job(f"{agent}-after") for agent in AGENTS]
        for job in after:
            answer = await offer(standin, job, second)
            assert answer.available
            assert answer.participant_identity == agent_identity(job.id)
        # LiveKit may offer a job again; it is not enqueued a second time.
        assert (await offer(standin, before[0], second)).available
        await eventually(lambda: dispatcher.stats.enqueued == 7, "3 more jobs enqueued")
        await eventually(lambda: dispatcher.stats.duplicates == 1, "the re-offer seen as such")

        ids = await enqueued_ids(client, keys)
        assert sorted(ids) == sorted(job.id for job in [*before, last, *after])
        assert orphan.id not in ids
        for agent in AGENTS:
            rooms = [m.job.room.name for m in await stream_jobs(client, keys, agent)]
            expected = [f"{agent}-before", f"{agent}-after"]
            if agent == "support":
                expected.insert(1, "support-last-words")
            assert sorted(rooms) == sorted(expected)
        assert dispatcher.stats.enqueue_failed == 0


async def test_reregisters_after_a_server_restart(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (first,) = await standin.wait_registered()
        assert (await offer(standin, make_job("support-1"), first)).available
        await eventually(lambda: dispatcher.stats.enqueued == 1, "the first job enqueued")

        with anyio.fail_after(5):
            await standin.restart(downtime=0.5)
        (second,) = await standin.wait_registered()
        assert second.worker_id != first.worker_id
        await eventually(
            lambda: dispatcher.livekit_worker_id == second.worker_id, "the new registration"
        )

        jobs = [make_job(f"{agent}-after-restart") for agent in AGENTS]
        for job in jobs:
            assert (await offer(standin, job, second)).available
        await eventually(lambda: dispatcher.stats.enqueued == 4, "the new jobs enqueued")
        ids = await enqueued_ids(client, keys)
        assert len(ids) == len(set(ids)) == 4
        assert set(ids) >= {job.id for job in jobs}
        assert dispatcher.stats.reconnects >= 1


# -- 3: what a confused server may send --------------------------------------------


async def test_malformed_and_unexpected_messages_are_survived(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        worker_id = dispatcher.livekit_worker_id
        assert worker_id == worker.worker_id

        await standin.send_raw(b"\xff\xff\xff\xff\x0f garbage \x00\x01", worker)
        await standin.send_raw("a text frame, not protobuf", worker)
        await standin.send_raw(b"", worker)  # an empty ServerMessage
        await standin.send_raw(b"\xf8\x07\x01", worker)  # only an unknown field (127)
        pong = proto.ServerMessage(pong=proto.WorkerPong(last_timestamp=1, timestamp=2))
        await standin.send_raw(pong.SerializeToString(), worker)
        again = proto.ServerMessage(register=proto.RegisterWorkerResponse(worker_id="AW_impostor"))
        await standin.send_raw(again.SerializeToString(), worker)
        await standin.terminate("AJ_never_offered", worker)
        # An assignment for a job never offered: routed from what it carries.
        stray = make_job("restaurant-stray")
        await standin.assign(stray, worker)

        following = make_job("dental-following")
        answer = await offer(standin, following, worker)
        assert answer.available
        await eventually(lambda: dispatcher.stats.enqueued == 2, "both jobs enqueued")

        (stored,) = await stream_jobs(client, keys, "restaurant")
        assert stored.job_id == stray.id
        assert stored.accept.identity == agent_identity(stray.id)
        assert stored.accept.attributes == {AGENT_ATTRIBUTE: "restaurant"}
        assert stored.step == 5
        assert not stored.job.HasField("state")
        assert [m.job_id for m in await stream_jobs(client, keys, "dental")] == [following.id]

        # Same socket, same registration, nothing failed towards LiveKit.
        assert standin.workers == [worker]
        assert not worker.closed.is_set()
        assert dispatcher.livekit_worker_id == worker_id
        assert dispatcher.stats.reconnects == 0
        assert dispatcher.stats.terminations == 0
        assert worker.job_updates == []


# -- 4: the same job twice -----------------------------------------------------------


async def test_a_job_offered_twice_to_one_dispatcher_is_enqueued_once(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        job = make_job("dental-twice")
        assert (await offer(standin, job, worker)).available
        await eventually(lambda: dispatcher.stats.enqueued == 1, "the job enqueued")
        assert (await offer(standin, job, worker)).available
        await eventually(lambda: dispatcher.stats.duplicates == 1, "the duplicate counted")
        assert dispatcher.stats.enqueued == 1
        assert [m.job_id for m in await stream_jobs(client, keys, "dental")] == [job.id]
        assert worker.job_updates == []


async def test_a_job_offered_to_two_dispatchers_is_enqueued_once(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    other = make_settings(standin, redis_server.url, namespace=settings.namespace)
    keys = Keys(settings.namespace)
    async with (
        dispatching(settings, pool, redis=client) as one,
        dispatching(other, pool, redis=client) as two,
    ):
        workers = await standin.wait_registered(2)
        jobs = [make_job(f"support-both-{i}") for i in range(5)]
        answers = await asyncio.gather(
            *(offer(standin, job, worker) for job in jobs for worker in workers)
        )
        assert all(answer.available for answer in answers)
        await eventually(
            lambda: (
                one.stats.enqueued + one.stats.duplicates == 5
                and two.stats.enqueued + two.stats.duplicates == 5
            ),
            "every assignment stored or found a duplicate",
        )
        assert one.stats.enqueued + two.stats.enqueued == 5
        assert one.stats.duplicates + two.stats.duplicates == 5
        ids = await enqueued_ids(client, keys)
        assert sorted(ids) == sorted(job.id for job in jobs)


# -- 5: Redis going away -------------------------------------------------------------


async def test_redis_going_away_and_coming_back(standin: StandIn, pool: AgentPool) -> None:
    server = RedisServer().start()
    redis = connect_redis(server.url)
    try:
        settings = make_settings(standin, server.url)
        keys = Keys(settings.namespace)
        async with dispatching(settings, pool, redis=redis) as dispatcher:
            (worker,) = await standin.wait_registered()
            assert (await offer(standin, make_job("dental-before"), worker)).available
            await eventually(lambda: dispatcher.stats.enqueued == 1, "the first job enqueued")
            # Accepted while Redis was up; its assignment comes once it is down.
            caught = make_job("restaurant-caught")
            assert (await standin.offer(caught, worker, assign=False)) is not None

            await anyio.to_thread.run_sync(server.stop)
            await standin.assign(caught, worker)
            # Offers go on while Redis is down: each is answered in time (until
            # the dispatcher notices, perhaps accepted), and each accepted one
            # is failed towards LiveKit, naming Redis.
            answers: dict[str, proto.AvailabilityResponse] = {}
            with anyio.fail_after(10):
                while not answers or list(answers.values())[-1].available:
                    job = make_job(f"support-down-{len(answers)}")
                    answers[job.id] = await offer(standin, job, worker)
                    await anyio.sleep(0.05)
            accepted = [caught.id] + [j for j, answer in answers.items() if answer.available]
            await eventually(
                lambda: all(updates_for(worker, job_id) for job_id in accepted),
                "every accepted job failed",
                within=6,
            )
            for job_id in accepted:
                (update,) = updates_for(worker, job_id)
                assert update.status == proto.JobStatus.JS_FAILED
                assert "Redis" in update.error
                agent = "restaurant" if job_id == caught.id else "support"
                assert f"agent '{agent}'" in update.error
            assert dispatcher.stats.enqueue_failed == len(accepted)
            # Still answering (unavailable) on the same socket while Redis is down.
            assert not (await offer(standin, make_job("support-still-down"), worker)).available
            assert dispatcher.livekit_worker_id == worker.worker_id

            await anyio.to_thread.run_sync(server.start)

            async def groups_recreated() -> bool:
                try:
                    for agent in AGENTS:
                        if not await redis.exists(keys.jobs(agent)):
                            return False
                        groups = await redis.xinfo_groups(keys.jobs(agent))
                        if WORKERS_GROUP.encode() not in [g["name"] for g in groups]:
                            return False
                except RedisConnectionError:  # a pooled connection from before the restart
                    return False
                return True

            await eventually(groups_recreated, "the consumer groups recreated")
            # Answers flip back once the dispatcher sees Redis again.
            back: list[proto.Job] = []

            async def accepted_again() -> bool:
                back.append(make_job(f"support-back-{len(back)}"))
                return (await offer(standin, back[-1], worker)).available

            await eventually(accepted_again, "offers accepted again")
            after = make_job("support-after")
            assert (await offer(standin, after, worker)).available
            await eventually(
                lambda: dispatcher.stats.enqueued == 3, "the jobs after the outage enqueued"
            )
            # A worker of the restarted Redis gets them through its group.
            delivered = await redis.xreadgroup(
                WORKERS_GROUP, "w1", {keys.jobs("support"): ">"}, count=10
            )
            got = [JobMessage.decode(fields).job_id for _, fields in delivered[0][1]]
            assert got == [back[-1].id, after.id]
            assert dispatcher.livekit_worker_id == worker.worker_id
    finally:
        await redis.aclose()
        await anyio.to_thread.run_sync(server.close)


# -- 6: a flood with a drop in the middle ----------------------------------------------


async def test_a_flood_with_a_socket_drop_in_the_middle_loses_and_doubles_nothing(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url, max_backlog=10_000)
    keys = Keys(settings.namespace)

    def flood(tag: str, n: int) -> list[proto.Job]:
        jobs = []
        for i in range(n):
            if i % 10 == 9:
                jobs.append(ghost_job(f"lobby-{tag}-{i}"))
            else:
                jobs.append(make_job(f"{AGENTS[i % 3]}-{tag}-{i}"))
        return jobs

    answers: dict[str, proto.AvailabilityResponse | None] = {}
    send_failed: set[str] = set()
    answered_before_drop = anyio.Event()

    async def offer_one(job: proto.Job, worker: WorkerConn) -> None:
        try:
            answer = await standin.offer(job, worker, assign=False)
        except ConnectionError:  # the request itself could not be written
            send_failed.add(job.id)
            return
        answers[job.id] = answer
        if sum(a is not None for a in answers.values()) >= 60:
            answered_before_drop.set()
        if answer is not None and answer.available:
            # If the socket is gone, LiveKit forgets this job: nobody is assigned it.
            with contextlib.suppress(ConnectionError):
                await standin.assign(job, worker, identity=answer.participant_identity)

    async def drop_midway(worker: WorkerConn) -> None:
        await answered_before_drop.wait()
        standin.drop(worker)

    async with dispatching(settings, pool, redis=client) as dispatcher:
        (first,) = await standin.wait_registered()
        phase1 = flood("a", 150)
        with anyio.fail_after(10):
            await asyncio.gather(*(offer_one(j, first) for j in phase1), drop_midway(first))
            await first.closed.wait()
        (second,) = await standin.wait_registered()
        await eventually(lambda: dispatcher.livekit_worker_id == second.worker_id, "reconnect")
        phase2 = flood("b", 150)
        with anyio.fail_after(10):
            await asyncio.gather(*(offer_one(j, second) for j in phase2))

        # Nothing was lost in phase 2, and in phase 1 only what was in flight.
        assert not send_failed
        assert all(answers[job.id] is not None for job in phase2)
        assert all(answers[job.id].available for job in phase2)  # type: ignore[union-attr]
        in_flight = [job.id for job in phase1 if answers[job.id] is None]
        assert len(in_flight) <= 150 - 60

        jobs = {job.id: job for job in phase1 + phase2}
        assigned = first.assigned + second.assigned
        served = {j for j in assigned if agent_of(jobs[j]) != "ghost"}
        ghosts = {j for j, a in answers.items() if agent_of(jobs[j]) == "ghost" and a is not None}
        await eventually(
            lambda: dispatcher.stats.enqueued >= len(served), "every assigned job enqueued"
        )
        await eventually(
            lambda: _dead_letter_ids(client, keys, ghosts), "every accepted ghost dead-lettered"
        )
        await eventually(
            lambda: all(
                updates_for(second, j) for j in second.assigned if agent_of(jobs[j]) == "ghost"
            ),
            "every ghost assigned after the drop failed",
        )

        ids = await enqueued_ids(client, keys)
        dead = [fields[b"job_id"].decode() for fields in await dead_letters(client, keys)]
        everything = Counter(ids + dead)
        assert [job_id for job_id, n in everything.items() if n > 1] == []
        assert set(ids) == served
        assert ghosts <= set(dead)
        accepted_or_lost = {j for j, a in answers.items() if a is None or a.available}
        assert set(dead) <= accepted_or_lost
        assert all(agent_of(jobs[j]) == "ghost" for j in dead)
        for agent in AGENTS:
            for message in await stream_jobs(client, keys, agent):
                assert agent_of(jobs[message.job_id]) == agent
        assert dispatcher.stats.duplicates == 0
        for job in phase2:
            if agent_of(job) == "ghost":
                (update,) = updates_for(second, job.id)
                assert update.status == proto.JobStatus.JS_FAILED
                assert update.error == GHOST_ERROR
            else:
                assert updates_for(second, job.id) == []


async def _dead_letter_ids(redis: Redis, keys: Keys, expected: Iterable[str]) -> bool:
    dead = {fields[b"job_id"].decode() for fields in await dead_letters(redis, keys)}
    return set(expected) <= dead


# -- 7: unknown agents ---------------------------------------------------------------


async def test_an_unknown_agent_is_failed_and_dead_lettered_once(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    other = make_settings(standin, redis_server.url, namespace=settings.namespace)
    keys = Keys(settings.namespace)
    async with (
        dispatching(settings, pool, redis=client) as one,
        dispatching(other, pool, redis=client) as two,
    ):
        workers = {w.worker_id: w for w in await standin.wait_registered(2)}
        first = workers[one.livekit_worker_id or ""]
        second = workers[two.livekit_worker_id or ""]
        job = ghost_job("dental-sounds-like-an-agent")

        answer = await offer(standin, job, first)
        assert answer.available
        assert answer.participant_identity == agent_identity(job.id)
        await eventually(lambda: bool(updates_for(first, job.id)), "the job failed")
        (update,) = updates_for(first, job.id)
        assert update.status == proto.JobStatus.JS_FAILED
        assert update.error == GHOST_ERROR
        await eventually(lambda: _dead_letter_ids(client, keys, [job.id]), "the dead letter")

        (dead,) = await dead_letters(client, keys)
        assert dead[b"reason"] == b"unknown-agent"
        assert dead[b"error"] == GHOST_ERROR.encode()
        assert dead[b"job_id"] == job.id.encode()
        assert dead[b"room"] == b"dental-sounds-like-an-agent"
        assert dead[b"source"] == b"job metadata"
        # The whole job entry, for no agent; `dlq replay --agent X` names one.
        assert dead[b"agent"] == b""
        assert dead[b"requested_agent"] == b"ghost"
        assert dead[b"identity"] == agent_identity(job.id).encode()
        original = proto.Job()
        original.ParseFromString(dead[b"job"])
        assert original.id == job.id
        assert original.metadata == job.metadata
        assert original.room.name == job.room.name
        assert original.room.turn_password == ""

        # Offered again, to the same dispatcher and to another one: failed
        # again each time, never dead-lettered twice.
        assert (await offer(standin, job, first)).available
        assert (await offer(standin, job, second)).available
        await eventually(
            lambda: len(updates_for(first, job.id)) == 2 and len(updates_for(second, job.id)) == 1,
            "both re-offers failed",
        )
        assert {u.error for u in updates_for(first, job.id) + updates_for(second, job.id)} == {
            GHOST_ERROR
        }
    # Both dispatchers stopped: each drain waited for its handler tasks, the
    # dead-letter writes among them, so any (wrong) second letter has landed.
    assert len(await dead_letters(client, keys)) == 1
    assert one.stats.unknown_agent == 2
    assert two.stats.unknown_agent == 1
    assert await enqueued_ids(client, keys) == []


# -- 8: terminations -------------------------------------------------------------------


async def test_a_termination_reaches_the_agents_workers(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        job = make_job("restaurant-table-4")
        assert (await offer(standin, job, worker)).available
        await eventually(lambda: dispatcher.stats.enqueued == 1, "the job enqueued")

        await standin.terminate(job.id, worker)
        await eventually(
            lambda: client.exists(keys.control("restaurant")), "a control event", within=3
        )
        (event,) = [fields for _, fields in await client.xrange(keys.control("restaurant"))]
        assert event[b"type"] == b"terminate"
        assert event[b"job_id"] == job.id.encode()
        record = await client.hgetall(keys.job("restaurant", job.id))
        assert record[b"terminated"] == b"livekit"
        assert record[b"state"] == b"queued"
        assert dispatcher.stats.terminations == 1
        for agent in ("dental", "support"):
            assert not await client.exists(keys.control(agent))


async def test_a_termination_right_behind_the_assignment_is_not_lost(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        jobs = [make_job(f"support-quick-{i}") for i in range(5)]
        for job in jobs:
            assert (await standin.offer(job, worker, assign=False)) is not None
        for job in jobs:
            # LiveKit deletes the dispatch just after assigning it.
            await standin.assign(job, worker)
            await standin.terminate(job.id, worker)
        await eventually(lambda: dispatcher.stats.enqueued == 5, "the jobs enqueued")

        async def all_terminated() -> bool:
            events = await client.xrange(keys.control("support"))
            return {f[b"job_id"].decode() for _, f in events} == {job.id for job in jobs}

        await eventually(all_terminated, "a control event for each job", within=3)
        for job in jobs:
            assert await client.hget(keys.job("support", job.id), "terminated") == b"livekit"
        assert dispatcher.stats.terminations == 5


# -- 9: status relay -------------------------------------------------------------------


async def test_worker_status_events_are_relayed_to_livekit(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    store = StreamStore(client, keys)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        ok, bad = make_job("dental-ok"), make_job("support-bad")
        for job in (ok, bad):
            assert (await offer(standin, job, worker)).available
        await eventually(lambda: dispatcher.stats.enqueued == 2, "both jobs enqueued")
        me = settings.dispatcher_id

        await store.publish_status(me, StatusEvent(ok.id, JobStatus.RUNNING, worker_id="w1"))
        await store.publish_status(me, StatusEvent(ok.id, JobStatus.SUCCESS, worker_id="w1"))
        # Malformed entries on the status stream are skipped, not fatal.
        await client.xadd(keys.status(me), {b"v": b"1", b"job_id": bad.id, b"status": b"bogus"})
        await client.xadd(keys.status(me), {b"v": b"99", b"job_id": bad.id})
        await client.xadd(keys.status(me), {b"junk": b"\xff"})
        # Not held by this dispatcher: not relayed (LiveKit would not know it).
        await store.publish_status(me, StatusEvent("AJ_not_mine", JobStatus.FAILED, "nope"))
        # A job that already ended is no longer held.
        await store.publish_status(me, StatusEvent(ok.id, JobStatus.RUNNING))
        await store.publish_status(
            me, StatusEvent(bad.id, JobStatus.FAILED, error="agent crashed: boom")
        )

        await eventually(lambda: bool(updates_for(worker, bad.id)), "the failure relayed")
        assert [(u.job_id, u.status, u.error) for u in worker.job_updates] == [
            (ok.id, proto.JobStatus.JS_RUNNING, ""),
            (ok.id, proto.JobStatus.JS_SUCCESS, ""),
            (bad.id, proto.JobStatus.JS_FAILED, "agent crashed: boom"),
        ]
        assert dispatcher.stats.statuses_relayed == 3


# -- 10: backpressure ------------------------------------------------------------------


async def test_reject_policy_without_workers_answers_unavailable(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url, when_no_worker="reject")
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        for agent in AGENTS:
            assert not (await offer(standin, make_job(f"{agent}-nobody"), worker)).available
        assert dispatcher.stats.rejected == 3
        assert dispatcher.stats.accepted == 0
        assert worker.assigned == []
        assert [await client.xlen(keys.jobs(agent)) for agent in AGENTS] == [0, 0, 0]

        # A live worker for one agent: that agent's jobs are accepted again.
        await heartbeat(
            client,
            registry_key=keys.workers("dental"),
            record_key=keys.worker("dental-w1"),
            member="dental-w1",
            fields={"agent": "dental", "capacity": 2, "running": 0},
            ttl=30,
        )
        await membership_refreshed(client, keys, settings.dispatcher_id)
        assert (await offer(standin, make_job("dental-somebody"), worker)).available
        assert not (await offer(standin, make_job("support-nobody-2"), worker)).available


async def test_queue_policy_without_workers_accepts(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url, when_no_worker="queue")
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        jobs = [make_job(f"{agent}-queued") for agent in AGENTS]
        for job in jobs:
            assert (await offer(standin, job, worker)).available
        await eventually(lambda: dispatcher.stats.enqueued == 3, "the jobs queued")
        assert sorted(await enqueued_ids(client, keys)) == sorted(job.id for job in jobs)


async def test_backlog_beyond_free_slots_flips_answers_and_load_is_reported(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url, max_backlog=1)
    keys = Keys(settings.namespace)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        # dental: 4 slots, 3 in use -> 1 free; support: 6 free. Load 3/10.
        for member, agent, capacity, running in (("d1", "dental", 4, 3), ("s1", "support", 6, 0)):
            await heartbeat(
                client,
                registry_key=keys.workers(agent),
                record_key=keys.worker(member),
                member=member,
                fields={"agent": agent, "capacity": capacity, "running": running},
                ttl=30,
            )
        await membership_refreshed(client, keys, settings.dispatcher_id)

        # Accepted while backlog < free (1) + max_backlog (1): two jobs.
        answers = []
        for i in range(3):
            answer = await offer(standin, make_job(f"dental-{i}"), worker)
            answers.append(answer.available)
            if answer.available:
                await eventually(partial(_enqueued, dispatcher, sum(answers)), "the enqueue")
            await membership_refreshed(client, keys, settings.dispatcher_id)
        assert answers == [True, True, False]
        assert await client.xlen(keys.jobs("dental")) == 2
        # Other agents are unaffected.
        assert (await offer(standin, make_job("support-fine"), worker)).available

        # A worker takes the backlog: dental is accepted again.
        await client.xreadgroup(WORKERS_GROUP, "d1", {keys.jobs("dental"): ">"}, count=10)
        await membership_refreshed(client, keys, settings.dispatcher_id)
        assert (await offer(standin, make_job("dental-again"), worker)).available

        await eventually(
            lambda: any(
                abs(u.load - 0.3 * REPORTED_LOAD_MAX) < 1e-6 for u in worker.worker_updates
            ),
            "the load reported",
        )
        latest = worker.worker_updates[-1]
        assert latest.load == pytest.approx(0.3 * REPORTED_LOAD_MAX)
        assert latest.status == proto.WorkerStatus.WS_AVAILABLE
        assert not latest.draining


# -- 11: drain -------------------------------------------------------------------------


async def test_a_stop_drains_unregisters_and_leaves(
    standin: StandIn, client: Redis, pool: AgentPool, redis_server: RedisServer
) -> None:
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    dispatcher = Dispatcher(settings, pool, redis=client)
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            (worker,) = await standin.wait_registered()
            job = make_job("dental-last")
            assert (await offer(standin, job, worker)).available
            await eventually(lambda: dispatcher.stats.enqueued == 1, "the job enqueued")
            assert await client.zscore(keys.dispatchers, settings.dispatcher_id) is not None
            assert await client.exists(keys.dispatcher(settings.dispatcher_id))

            dispatcher.request_stop()
            await worker.closed.wait()
        # run() returned by itself: the task group exited without cancelling it.
    assert dispatcher.draining
    draining = [u for u in worker.worker_updates if u.draining]
    assert draining, "no draining UpdateWorkerStatus before the socket closed"
    assert draining[0].status == proto.WorkerStatus.WS_FULL
    assert draining[0].job_count == 1
    assert standin.workers == []
    assert await client.zscore(keys.dispatchers, settings.dispatcher_id) is None
    assert not await client.exists(keys.dispatcher(settings.dispatcher_id))
    assert [m.job_id for m in await stream_jobs(client, keys, "dental")] == [job.id]


# -- 12: secrets -----------------------------------------------------------------------


async def test_no_secret_reaches_redis_or_the_logs(
    standin: StandIn,
    client: Redis,
    pool: AgentPool,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(standin, redis_server.url)
    keys = Keys(settings.namespace)
    store = StreamStore(client, keys)
    async with dispatching(settings, pool, redis=client) as dispatcher:
        (worker,) = await standin.wait_registered()
        job = make_job("dental-secret", room_metadata='{"agent": "support"}')
        ghost = ghost_job()
        stray = make_job("restaurant-stray")
        assert (await offer(standin, job, worker)).available
        assert (await offer(standin, ghost, worker)).available
        await standin.assign(stray, worker)
        await eventually(lambda: dispatcher.stats.enqueued == 2, "the jobs enqueued")
        await eventually(lambda: _dead_letter_ids(client, keys, [ghost.id]), "the dead letter")
        await standin.terminate(job.id, worker)
        await store.publish_status(settings.dispatcher_id, StatusEvent(stray.id, JobStatus.RUNNING))
        await eventually(lambda: bool(updates_for(worker, stray.id)), "the status relayed")
        await eventually(lambda: client.exists(keys.control("support")), "the termination")
        standin.drop(worker)
        await standin.wait_registered()
        await eventually(lambda: len(standin.tokens) == 2, "a second registration")

    secrets = [API_SECRET, ASSIGNMENT_TOKEN, TURN_PASSWORD, *standin.tokens]
    stored: list[bytes] = []
    async for key in client.scan_iter(match=f"{settings.namespace}:*"):
        kind = await client.type(key)
        if kind == b"stream":
            for _, fields in await client.xrange(key):
                stored.extend(k + b"=" + v for k, v in fields.items())
        elif kind == b"hash":
            stored.extend(k + b"=" + v for k, v in (await client.hgetall(key)).items())
        elif kind == b"string":
            stored.append(await client.get(key) or b"")
    assert len(stored) > 20
    for secret in secrets:
        assert not [s for s in stored if secret.encode() in s], f"{secret[:12]}... in Redis"

    logged = caplog.text + "\n".join(
        str(record.__dict__) for record in caplog.records if record.name.startswith("openrtc")
    )
    assert "dental-secret" in logged  # the log was captured at all
    for secret in secrets:
        assert secret not in logged, f"{secret[:12]}... logged"


async def test_a_job_failed_towards_livekit_is_never_served_if_its_enqueue_landed_late(
    standin: StandIn, pool: AgentPool, redis_server: RedisServer, client: Redis
) -> None:
    """Redis ran the enqueue, but its answer came after the dispatcher gave up.

    A proxy holds Redis's reply past ``enqueue_timeout``: the dispatcher fails
    the job towards LiveKit though its entry landed. LiveKit and Redis must
    then agree: the job is marked terminated, so no worker joins a call that
    LiveKit has failed.
    """
    async with slow_replies(redis_server.port) as proxy:
        settings = make_settings(standin, proxy.redis_url, enqueue_timeout=0.5, wait_timeout=0.2)
        keys = Keys(settings.namespace)
        own = connect_redis(proxy.redis_url)
        async with dispatching(settings, pool, redis=own) as dispatcher:
            (worker,) = await standin.wait_registered()
            # A first job loads the enqueue script: later ones are one EVALSHA.
            assert (await offer(standin, make_job("dental-first"), worker)).available
            await eventually(lambda: dispatcher.stats.enqueued == 1, "the first job enqueued")
            job = make_job("dental-late")
            assert (await standin.offer(job, worker, assign=False)) is not None
            proxy.reply_delay = 2.0
            await standin.assign(job, worker)
            await eventually(lambda: bool(updates_for(worker, job.id)), "the job failed")
            proxy.reply_delay = 0.0
            (update,) = updates_for(worker, job.id)
            assert update.status == proto.JobStatus.JS_FAILED
            assert job.id in [m.job_id for m in await stream_jobs(client, keys, "dental")]

            async def marked() -> bool:
                return b"terminated" in await client.hgetall(keys.job("dental", job.id))

            await eventually(marked, "the job marked terminated", within=10)
            control = await client.xrange(keys.control("dental"))
            assert [fields[b"job_id"] for _, fields in control] == [job.id.encode()]
            assert dispatcher.stats.enqueue_failed == 1
        await own.aclose()

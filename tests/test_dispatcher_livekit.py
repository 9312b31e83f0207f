"""The dispatcher against the real LiveKit server and a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from livekit import api
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.wire.keys import Keys
from openrtc.wire.messages import AGENT_ATTRIBUTE, JobMessage, agent_identity
from tests.support.stack import OFFLINE_AGENTS, dispatcher_settings, dispatching, eventually, unique

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def livekit_api(livekit: LiveKitServer) -> AsyncIterator[api.LiveKitAPI]:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        yield lkapi


async def entries(redis: Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    result: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(key)
    return result


async def test_room_metadata_routes_to_the_agents_stream(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("lobby")
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as dispatcher:
        async with livekit_api(livekit_server) as lkapi:
            created = await lkapi.room.create_room(
                api.CreateRoomRequest(name=room, metadata='{"agent": "dental"}')
            )
            found = await eventually(lambda: entries(redis, keys.jobs("dental")))
            # Nothing else for this room trickles in: a later room's entry is
            # written after anything more this room's offer would have made.
            marker = unique("marker")
            await lkapi.room.create_room(
                api.CreateRoomRequest(name=marker, metadata='{"agent": "dental"}')
            )

            async def marker_in() -> list[str]:
                rooms = [
                    JobMessage.decode(f).room for _, f in await entries(redis, keys.jobs("dental"))
                ]
                return rooms if marker in rooms else []

            assert await eventually(marker_in, "the later room's entry") == [room, marker]
        assert (dispatcher.stats.offered, dispatcher.stats.enqueued) == (2, 2)
        message = JobMessage.decode(found[0][1])
        assert message.agent == "dental"
        assert (message.step, message.source) == (3, "room metadata")
        assert message.job.room.name == room
        assert message.job.room.sid == created.sid
        assert message.job.room.metadata == '{"agent": "dental"}'
        assert message.accept.identity == agent_identity(message.job_id)
        assert message.accept.attributes == {AGENT_ATTRIBUTE: "dental"}
        assert message.livekit_url == livekit_server.url
        assert message.dispatcher_id == dispatcher.settings.dispatcher_id
        assert message.received_at <= message.routed_at <= message.enqueued_at
        # No bearer credential at rest: no token, no TURN password.
        raw = b"".join(found[0][1].values())
        assert message.job.room.turn_password == ""
        assert b"token" not in b"".join(found[0][1].keys())
        assert not await entries(redis, keys.jobs("restaurant"))
        assert not await entries(redis, keys.dead_letter)
        assert livekit_server.api_secret.encode() not in raw


async def test_room_name_prefix_routes_to_restaurant(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = f"restaurant-room-42-{uuid.uuid4().hex[:6]}"
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)),
        livekit_api(livekit_server) as lkapi,
    ):
        await lkapi.room.create_room(api.CreateRoomRequest(name=room))
        found = await eventually(lambda: entries(redis, keys.jobs("restaurant")))
    message = JobMessage.decode(found[0][1])
    assert (message.agent, message.step, message.room) == ("restaurant", 5, room)
    assert not await entries(redis, keys.jobs("dental"))


async def test_explicit_dispatch_reaches_a_named_dispatcher(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    name = unique("openrtc-explicit")
    room = unique("call")
    settings = dispatcher_settings(livekit_server, redis_server.url, ns, agent_name=name)
    async with dispatching(settings), livekit_api(livekit_server) as lkapi:
        await lkapi.room.create_room(api.CreateRoomRequest(name=room))
        await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=name, room=room, metadata='{"agent": "support", "caller": "+1555"}'
            )
        )
        found = await eventually(lambda: entries(redis, keys.jobs("support")))
    message = JobMessage.decode(found[0][1])
    assert (message.agent, message.step, message.source) == ("support", 1, "job metadata")
    assert message.job.metadata == '{"agent": "support", "caller": "+1555"}'
    assert message.job.agent_name == name


async def test_unknown_agent_goes_to_the_dead_letters_once(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("lobby")
    assert livekit_server.log_path is not None
    log_path = livekit_server.log_path

    def server_logged_failure(job_id: str) -> bool:
        log = log_path.read_text(errors="replace")
        return any(
            job_id in line and "JS_FAILED" in line and "Unknown agent" in line
            for line in log.splitlines()
        )

    # Two dispatchers: LiveKit must still hand the job to only one of them.
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as first,
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as second,
    ):
        dispatchers = (first, second)
        async with livekit_api(livekit_server) as lkapi:
            await lkapi.room.create_room(
                api.CreateRoomRequest(name=room, metadata='{"agent": "ghost"}')
            )
            [(_, fields)] = await eventually(lambda: entries(redis, keys.dead_letter))
            job_id = fields[b"job_id"].decode()
            # The server ended the job (failed, with our error: it logs every
            # job end): it is offered to no one again.
            await eventually(
                lambda: server_logged_failure(job_id), "the job's end in the server log"
            )
            # And a later room's letter comes after anything more this one made.
            marker = unique("marker")
            await lkapi.room.create_room(
                api.CreateRoomRequest(name=marker, metadata='{"agent": "ghost"}')
            )

            async def marker_in() -> list[str]:
                rooms = [f[b"room"].decode() for _, f in await entries(redis, keys.dead_letter)]
                return rooms if marker in rooms else []

            assert await eventually(marker_in, "the later room's letter") == [room, marker]
        assert sum(d.stats.unknown_agent for d in dispatchers) == 2
    assert fields[b"reason"] == b"unknown-agent"
    assert fields[b"error"] == b"Unknown agent 'ghost' requested via room metadata."
    # The whole job entry, with no agent yet: `dlq replay --agent X` makes it X's.
    assert fields[b"agent"] == b""
    assert fields[b"requested_agent"] == b"ghost"
    assert fields[b"room"] == room.encode()
    assert fields[b"source"] == b"room metadata"
    for agent in ("dental", "restaurant", "support"):
        assert not await entries(redis, keys.jobs(agent))


async def test_two_dispatchers_enqueue_each_job_exactly_once(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    rooms = [f"dental-call-{uuid.uuid4().hex[:8]}" for _ in range(16)]
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as first,
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as second,
    ):
        async with livekit_api(livekit_server) as lkapi:
            for room in rooms:
                await lkapi.room.create_room(api.CreateRoomRequest(name=room))

            async def all_there() -> bool:
                return len(await entries(redis, keys.jobs("dental"))) >= len(rooms)

            await eventually(all_there)
            # No second entry of any room trickles in: a later room's entry is
            # written after anything more their offers would have made.
            marker = f"dental-marker-{uuid.uuid4().hex[:8]}"
            await lkapi.room.create_room(api.CreateRoomRequest(name=marker))

            async def marker_in() -> list[JobMessage]:
                found = [JobMessage.decode(f) for _, f in await entries(redis, keys.jobs("dental"))]
                return found if any(m.room == marker for m in found) else []

            found = await eventually(marker_in, "the later room's entry")
        assert sorted(m.room for m in found) == sorted([*rooms, marker])
        assert len({m.job_id for m in found}) == len(rooms) + 1
        assert first.stats.enqueued + second.stats.enqueued == len(rooms) + 1


async def test_survives_livekit_and_redis_restarts(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    own_livekit = LiveKitServer(log_path=livekit_server.log_path)
    own_redis = RedisServer()
    own_livekit.start()
    own_redis.start()
    client = Redis.from_url(own_redis.url)
    try:
        async with dispatching(dispatcher_settings(own_livekit, own_redis.url, ns)) as dispatcher:
            first_id = dispatcher.livekit_worker_id
            own_livekit.stop()
            own_livekit.start()

            async def reregistered() -> bool:
                worker = dispatcher.livekit_worker_id
                return worker is not None and worker != first_id

            await eventually(reregistered, within=15)
            async with livekit_api(own_livekit) as lkapi:
                await lkapi.room.create_room(api.CreateRoomRequest(name="dental-after-lk"))
                await eventually(lambda: entries(client, keys.jobs("dental")))

                own_redis.stop()
                await anyio.sleep(0.5)
                own_redis.start()  # empty: the data and the consumer groups are gone

                async def redis_back() -> bool:
                    try:  # the groups are made again once the dispatcher sees Redis back
                        return bool(await client.exists(keys.jobs("support")))
                    except RedisConnectionError:
                        return False

                await eventually(redis_back, within=10)
                await lkapi.room.create_room(api.CreateRoomRequest(name="dental-after-redis"))
                found = await eventually(lambda: entries(client, keys.jobs("dental")))
                assert [JobMessage.decode(f).room for _, f in found] == ["dental-after-redis"]
                groups = await client.xinfo_groups(keys.jobs("dental"))
                assert [g["name"] for g in groups] == [b"workers"]
    finally:
        await client.aclose()
        own_redis.close()
        own_livekit.close()


def test_cli_dispatcher_exits_zero_on_sigterm(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    env = dict(
        os.environ,
        LIVEKIT_URL=livekit_server.url,
        LIVEKIT_API_KEY=livekit_server.api_key,
        LIVEKIT_API_SECRET=livekit_server.api_secret,
        REDIS_URL=redis_server.url,
        OPENRTC_NAMESPACE=unique("ns"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrtc", "dispatcher", "--agents-dir", str(OFFLINE_AGENTS)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "LiveKit connection registered" in line:
                break
        else:
            pytest.fail("dispatcher never registered")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopped" in out
    assert livekit_server.api_secret not in out


def test_cli_dispatcher_refuses_missing_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    result = subprocess.run(
        [sys.executable, "-m", "openrtc", "dispatcher", "--agents-dir", str(OFFLINE_AGENTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "missing LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


async def test_rooms_are_still_dispatched_while_every_worker_is_busy(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """LiveKit skips, without asking, a worker whose load is at its threshold (0.7).

    The dispatcher once reported its workers' share in use as its load, so
    with every worker busy LiveKit dropped each new room's job for good
    ("no servers available"), never asking the dispatcher, which would have
    queued it. Busy workers must mean a queue, not lost calls.
    """
    from openrtc.devtools.caller import caller_in
    from tests.support.stack import creds, delete_room, working

    ns = unique("ns")
    keys = Keys(ns)
    settings = dispatcher_settings(livekit_server, redis_server.url, ns, load_interval=0.2)
    with anyio.fail_after(60):
        async with (
            dispatching(settings) as dispatcher,
            working(livekit_server, redis_server.url, ns, "dental", concurrency=1) as worker,
            livekit_api(livekit_server) as lkapi,
        ):
            first = unique("dental-busy")
            await lkapi.room.create_room(api.CreateRoomRequest(name=first))
            async with caller_in(creds(livekit_server), first) as caller:
                await caller.wait_agent(within=20)
                assert len(worker.running_jobs) == 1  # its one slot is taken

                def seen_busy() -> bool:
                    load = dispatcher.view.loads.get("dental")
                    return load is not None and load.running == 1 and load.free == 0

                # The dispatcher's view has the worker busy, and reports that
                # (every load_interval) from then on.
                await eventually(seen_busy, "the worker busy in the dispatcher's view")
                second = unique("dental-queued")
                await lkapi.room.create_room(api.CreateRoomRequest(name=second))

                async def queued() -> bool:
                    found = await entries(redis, keys.jobs("dental"))
                    rooms = [JobMessage.decode(f).job.room.name for _, f in found]
                    return second in rooms

                await eventually(queued, within=10)
                await delete_room(livekit_server, second)
                await delete_room(livekit_server, first)


async def _entries_by_room(redis: Redis, keys: Keys) -> dict[str, list[JobMessage]]:
    found: dict[str, list[JobMessage]] = {}
    for _, fields in await entries(redis, keys.jobs("dental")):
        message = JobMessage.decode(fields)
        found.setdefault(message.room, []).append(message)
    return found


async def test_the_real_server_offers_a_job_answered_unavailable_to_the_other_dispatcher(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """``available=false``: LiveKit tries the other registered dispatcher (docs: LIVEKIT.md).

    One dispatcher rejects every job (``when_no_worker='reject'``, no worker
    alive), the other queues them. LiveKit picks one at random for each room;
    rooms are made until the rejecting one was asked twice: each of those
    rooms is still enqueued, once, by the other.
    """
    ns = unique("ns")
    keys = Keys(ns)
    rooms: list[str] = []
    with anyio.fail_after(120):
        async with (
            dispatching(
                dispatcher_settings(livekit_server, redis_server.url, ns, when_no_worker="reject")
            ) as rejecting,
            dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as queueing,
            livekit_api(livekit_server) as lkapi,
        ):
            while rejecting.stats.rejected < 2 and len(rooms) < 40:
                room = unique("dental-unavailable")
                rooms.append(room)
                await lkapi.room.create_room(api.CreateRoomRequest(name=room))

                async def enqueued(room: str = room) -> bool:
                    return room in await _entries_by_room(redis, keys)

                await eventually(enqueued, f"room {room} enqueued", within=30)
            found = await _entries_by_room(redis, keys)
            print(
                f"\n{len(rooms)} rooms; the rejecting dispatcher asked "
                f"{rejecting.stats.offered} times, the other {queueing.stats.offered}"
            )
            assert rejecting.stats.rejected >= 2
            assert rejecting.stats.offered == rejecting.stats.rejected
            assert rejecting.stats.enqueued == 0
            assert queueing.stats.offered == len(rooms)
            assert sorted(found) == sorted(rooms)
            assert all(len(messages) == 1 for messages in found.values())
            assert {m.dispatcher_id for ms in found.values() for m in ms} == {
                queueing.settings.dispatcher_id
            }


async def test_the_real_server_offers_nothing_to_a_draining_dispatcher(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """A draining dispatcher reports ``WS_FULL`` (``draining``): LiveKit offers it no job.

    Two dispatchers; one is put in its drain's state (what ``request_stop``
    does first, before it waits for its in-flight work and closes the
    socket). Offers that reach it before its next status report are answered
    unavailable and go to the other. Rooms are made until twelve in a row were
    offered to the other only (a server that ignored ``WS_FULL`` would pick
    the draining one for each with even odds), and every room is enqueued
    once, by the other.
    """
    ns = unique("ns")
    keys = Keys(ns)
    rooms: list[str] = []
    with anyio.fail_after(150):
        async with (
            dispatching(
                dispatcher_settings(livekit_server, redis_server.url, ns, load_interval=0.2)
            ) as draining,
            dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)) as other,
            livekit_api(livekit_server) as lkapi,
        ):
            draining._ctx.draining = True  # its drain's first step, the socket kept open
            in_a_row = 0
            while in_a_row < 12 and len(rooms) < 60:
                asked = draining.stats.offered
                room = unique("dental-draining")
                rooms.append(room)
                await lkapi.room.create_room(api.CreateRoomRequest(name=room))

                async def enqueued(room: str = room) -> bool:
                    return room in await _entries_by_room(redis, keys)

                await eventually(enqueued, f"room {room} enqueued", within=30)
                in_a_row = in_a_row + 1 if draining.stats.offered == asked else 0
            found = await _entries_by_room(redis, keys)
            print(
                f"\n{len(rooms)} rooms; the draining dispatcher asked "
                f"{draining.stats.offered} times, the other {other.stats.offered}"
            )
            assert in_a_row == 12
            assert draining.stats.enqueued == 0
            assert sorted(found) == sorted(rooms)
            assert all(len(messages) == 1 for messages in found.values())
            assert {m.dispatcher_id for ms in found.values() for m in ms} == {
                other.settings.dispatcher_id
            }

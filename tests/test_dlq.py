"""Dead letters come back: every reason replays into a call an agent joins, exactly once.

Real LiveKit, real Redis, the real dispatcher and worker produce the dead
letters; ``openrtc dlq replay`` brings them back; a caller in the room sees
the agent join. Replay and purge race each other on real Redis connections.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from livekit.protocol.agent import Job
from livekit.protocol.models import Room
from redis.asyncio import Redis
from typer.testing import CliRunner

from openrtc.cli.main import app
from openrtc.devtools.caller import Caller, caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops.monitor import list_dead_letters, purge_dead_letters, replay_dead_letters
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import (
    AGENT_ATTRIBUTE,
    DeadReason,
    JobMessage,
    accept_arguments,
    agent_identity,
)
from tests.support.stack import (
    creds,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)

pytestmark = pytest.mark.anyio


async def cli(redis_server: RedisServer, ns: str, *args: str) -> Any:
    """Run the command line in a thread (it runs its own event loop)."""
    env = {"REDIS_URL": redis_server.url, "OPENRTC_NAMESPACE": ns}

    def invoke() -> Any:
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

    result = await anyio.to_thread.run_sync(invoke)
    assert "Traceback" not in result.output
    return result


async def wait_letter(redis: Redis, keys: Keys, reason: str, within: float = 20.0) -> Any:
    """The first dead letter with ``reason``, once there is one."""
    with anyio.fail_after(within):
        while True:
            for letter in await list_dead_letters(redis, keys):
                if letter.reason == reason:
                    return letter
            await anyio.sleep(0.05)


async def replay_and_answer(
    redis_server: RedisServer, ns: str, letter_id: str, caller: Caller, job_id: str, *args: str
) -> None:
    """Replay one dead letter from the command line; the job's agent joins the caller."""
    result = await cli(redis_server, ns, "dlq", "replay", letter_id, "--json", *args)
    assert result.exit_code == 0, result.output
    assert [r["dead_letter"] for r in json.loads(result.stdout)["replayed"]] == [letter_id]
    agent = await caller.wait_agent(within=20)
    assert agent.identity == agent_identity(job_id)
    assert agent.attributes.get(AGENT_ATTRIBUTE) == "dental"


def job_entry(
    job_id: str, room: str, sid: str, agent: str = "dental", url: str = "ws://127.0.0.1:1"
) -> JobMessage:
    return JobMessage(
        job=Job(id=job_id, room=Room(name=room, sid=sid)),
        agent=agent,
        accept=accept_arguments(job_id, agent),
        livekit_url=url,
        step=5,
        source="room name prefix",
        dispatcher_id="d-gone",
        received_at=time.time(),
        routed_at=time.time(),
    )


async def test_an_unknown_agent_dead_letter_replays_with_agent(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("lobby")
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        await new_room(livekit_server, room, '{"agent": "ghost"}')
        async with caller_in(creds(livekit_server), room) as caller:
            letter = await wait_letter(redis, keys, "unknown-agent")
            # The letter is the whole job entry, for nobody: --agent says who.
            assert letter.agent == ""
            assert letter.fields["requested_agent"] == "ghost"
            refused = await cli(redis_server, ns, "dlq", "replay", letter.id)
            assert refused.exit_code == 2
            async with working(livekit_server, redis_server.url, ns, "dental"):
                await replay_and_answer(
                    redis_server, ns, letter.id, caller, letter.job_id, "--agent", "dental"
                )
    assert await redis.xlen(keys.dead_letter) == 0


async def test_a_malformed_dead_letter_replays_once_fixed(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    # The entry an older replay of an unknown-agent dead letter wrote: no
    # accept arguments. The worker dead-letters it as malformed; replay
    # rebuilds them by the dispatcher's rule.
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("lobby")
    live = await new_room(livekit_server, room)
    job_id = f"AJ_{unique('m')}"
    fields = job_entry(job_id, room, live.sid, url=livekit_server.url).encode()
    for name in (b"identity", b"name", b"metadata", b"attributes"):
        del fields[name]
    async with (
        working(livekit_server, redis_server.url, ns, "dental"),
        caller_in(creds(livekit_server), room) as caller,
    ):
        await redis.xadd(keys.jobs("dental"), dict[Any, Any](fields))
        letter = await wait_letter(redis, keys, "malformed")
        assert "identity" in letter.error
        await replay_and_answer(redis_server, ns, letter.id, caller, job_id)


async def test_an_expired_dead_letter_replays(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("dental-call")
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        await new_room(livekit_server, room)
        async with caller_in(creds(livekit_server), room) as caller:
            [(entry_id, _)] = await eventually(
                lambda: redis.xrange(keys.jobs("dental")), "the job queued"
            )
            queued_ms = int(entry_id.split(b"-")[0])

            async def grown_old() -> bool:
                # Nobody serves dental yet: the job grows old, by Redis's clock.
                seconds, micros = await redis.time()
                return seconds * 1000 + micros // 1000 - queued_ms > 2_200

            await eventually(grown_old, "the job older than 2 s (Redis's clock)")
            async with working(livekit_server, redis_server.url, ns, "dental", max_queue_age=2.0):
                letter = await wait_letter(redis, keys, "expired")
                assert caller.agents() == []
                await replay_and_answer(redis_server, ns, letter.id, caller, letter.job_id)


async def test_a_max_deliveries_dead_letter_replays(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    room = unique("dental-call")
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        await new_room(livekit_server, room)
        async with caller_in(creds(livekit_server), room) as caller:
            with anyio.fail_after(10):
                while not await redis.xlen(keys.jobs("dental")):
                    await anyio.sleep(0.05)
            # Delivered to a worker that died before it did anything.
            await redis.xreadgroup(WORKERS_GROUP, "w-gone", {keys.jobs("dental"): ">"}, count=1)
            async with working(
                livekit_server, redis_server.url, ns, "dental", max_deliveries=1, lease=1.0
            ):
                letter = await wait_letter(redis, keys, "max-deliveries")
                assert caller.agents() == []
                await replay_and_answer(redis_server, ns, letter.id, caller, letter.job_id)


async def dead_letters(store: StreamStore, count: int, prefix: str) -> list[str]:
    ids = []
    for i in range(count):
        message = job_entry(f"AJ_{prefix}{i}", f"dental-{prefix}{i}", "RM_x")
        entry = await store.dead_letter(DeadReason.EXPIRED, "waited", original=message.encode())
        assert entry is not None
        ids.append(entry)
    return ids


async def test_concurrent_replays_of_one_letter_make_one_job(
    redis_server: RedisServer, redis: Redis
) -> None:
    keys = Keys(unique("ns"))
    await dead_letters(StreamStore(redis, keys), 20, "c")
    letters = await list_dead_letters(redis, keys, count=100)
    other = Redis.from_url(redis_server.url)
    try:
        for letter in letters:
            async with anyio.create_task_group() as tg:
                tg.start_soon(replay_dead_letters, redis, keys, [letter])
                tg.start_soon(replay_dead_letters, other, keys, [letter])
    finally:
        await other.aclose()
    entries = await redis.xrange(keys.jobs("dental"))
    job_ids = [fields[b"job_id"] for _, fields in entries]
    assert len(job_ids) == len(set(job_ids)) == 20
    assert await redis.xlen(keys.dead_letter) == 0


async def test_purge_racing_replay_loses_no_letter_and_doubles_no_job(
    redis_server: RedisServer, redis: Redis
) -> None:
    keys = Keys(unique("ns"))
    store = StreamStore(redis, keys)
    added = len(await dead_letters(store, 30, "r"))
    purged = 0
    clients = [Redis.from_url(redis_server.url) for _ in range(3)]
    try:
        letters = await list_dead_letters(redis, keys, count=100)

        async def replay(client: Redis) -> None:
            for letter in letters:
                await replay_dead_letters(client, keys, [letter])

        async def purge(client: Redis) -> None:
            nonlocal purged
            for letter in letters[::3]:
                purged += await purge_dead_letters(client, keys, ids=[letter.id])
                await anyio.lowlevel.checkpoint()
            purged += await purge_dead_letters(client, keys)  # all that are left

        async def write() -> None:
            nonlocal added
            writer = StreamStore(clients[2], keys)
            for round_ in range(10):
                added += len(await dead_letters(writer, 3, f"w{round_}_"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(replay, clients[0])
            tg.start_soon(replay, clients[1])
            tg.start_soon(purge, clients[1])
            tg.start_soon(write)
    finally:
        for client in clients:
            await client.aclose()
    entries = await redis.xrange(keys.jobs("dental"))
    job_ids = [fields[b"job_id"] for _, fields in entries]
    assert len(job_ids) == len(set(job_ids))  # no job twice
    remaining = await redis.xlen(keys.dead_letter)
    # Every letter is in exactly one place: still there, replayed, or purged.
    assert remaining + len(job_ids) + purged == added

"""The whole flow on a real Redis Cluster and through a real Sentinel failover."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import quote, urlencode

import anyio
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from typer.testing import CliRunner

from openrtc.cli.main import app
from openrtc.devtools.caller import Caller, caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisCluster, RedisSentinels, RedisServer
from openrtc.ops.monitor import list_dead_letters, read_status, replay_dead_letters
from openrtc.settings import redact_url
from openrtc.store.redis_url import client_from_url, is_cluster_url
from openrtc.store.streams import REDIS_DOWN, connect_redis
from openrtc.wire.keys import Keys
from openrtc.wire.messages import AGENT_ATTRIBUTE
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

AGENTS = ("dental", "restaurant", "support")


def two_agents_on_different_masters(cluster: RedisCluster) -> tuple[str, str]:
    # Slots follow the hash tag (the agent's name) only, whatever the namespace.
    keys = Keys("any", cluster=True)
    for a in AGENTS:
        for b in AGENTS:
            if cluster.master_of(keys.jobs(a)).port != cluster.master_of(keys.jobs(b)).port:
                return a, b
    raise AssertionError("the offline agents' slots all live on one master")


def cli(*args: str, redis_url: str, namespace: str, as_json: bool = True) -> Any:
    options = ["--redis-url", redis_url, "--namespace", namespace]
    result = CliRunner().invoke(app, [*args, *options, *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if as_json else result.output


async def test_urls_pick_the_client_and_the_key_layout(
    redis_cluster: RedisCluster, redis_sentinels: RedisSentinels, redis_server: RedisServer
) -> None:
    assert is_cluster_url(redis_cluster.url)
    assert not is_cluster_url(redis_sentinels.url)
    for url in (redis_cluster.url, redis_sentinels.url, redis_server.url):
        client = client_from_url(url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    assert redact_url("redis+cluster://u:secret@h1:1,h2:2") == "redis+cluster://u:***@h1:1,h2:2"


async def call_reaches(livekit: LiveKitServer, stack: AsyncExitStack, agent: str) -> Caller:
    room = unique(f"{agent}-call")
    await new_room(livekit, room)
    caller = await stack.enter_async_context(caller_in(creds(livekit), room))
    sighting = await caller.wait_agent(within=30)
    assert sighting.attributes.get(AGENT_ATTRIBUTE) == agent
    return caller


async def test_calls_and_every_command_on_a_cluster(
    livekit_server: LiveKitServer, redis_cluster: RedisCluster
) -> None:
    first, second = two_agents_on_different_masters(redis_cluster)
    ns, url = unique("ns"), redis_cluster.url
    keys = Keys(ns, cluster=True)
    assert (
        redis_cluster.master_of(keys.jobs(first)).port
        != redis_cluster.master_of(keys.jobs(second)).port
    )
    redis = connect_redis(url)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(redis.aclose)
        dispatcher = await stack.enter_async_context(
            dispatching(dispatcher_settings(livekit_server, url, ns))
        )
        assert dispatcher.keys.cluster
        workers = [
            await stack.enter_async_context(working(livekit_server, url, ns, agent))
            for agent in (first, second)
        ]
        for agent in (first, second):
            await call_reaches(livekit_server, stack, agent)
        assert [w.stats.started for w in workers] == [1, 1]

        # A job for an unknown agent goes to the dead letters (one slot of
        # their own); listed, replayed into an agent's slot, served.
        lost = unique("lost")
        await new_room(livekit_server, lost, '{"agent": "nobody"}')
        caller = await stack.enter_async_context(caller_in(creds(livekit_server), lost))
        letters = await eventually(lambda: list_dead_letters(redis, keys), "a dead letter")
        assert letters[0].requested_agent == "nobody"
        listed = await anyio.to_thread.run_sync(
            lambda: cli("dlq", "list", redis_url=url, namespace=ns)
        )
        assert [d["id"] for d in listed["dead_letters"]] == [letters[0].id]
        shown = await anyio.to_thread.run_sync(
            lambda: cli("dlq", "show", letters[0].id, redis_url=url, namespace=ns, as_json=False)
        )
        assert "nobody" in shown
        (replayed,) = await replay_dead_letters(redis, keys, letters, agent=first)
        assert replayed.outcome == "replayed"
        # Replaying the same letter again (a retry after a crash between the
        # two steps) enqueues nothing more.
        (again,) = await replay_dead_letters(redis, keys, letters, agent=first)
        assert again.outcome == "gone"
        sighting = await caller.wait_agent(within=30)
        assert sighting.attributes.get(AGENT_ATTRIBUTE) == first
        assert await redis.xlen(keys.dead_letter) == 0
        assert workers[0].stats.started == 2

        status = await read_status(redis, keys)
        assert {a.agent for a in status.agents} >= {first, second}
        assert all(len(a.workers) == 1 for a in status.agents if a.agent in (first, second))
        by_cli = await anyio.to_thread.run_sync(lambda: cli("status", redis_url=url, namespace=ns))
        assert len(by_cli["dispatchers"]) == 1
        await redis.xadd(keys.dead_letter, {b"reason": b"malformed"})
        purged = await anyio.to_thread.run_sync(
            lambda: cli(
                "dlq", "purge", "--all", "--yes", redis_url=url, namespace=ns, as_json=False
            )
        )
        assert "deleted 1 dead letter" in purged


@asynccontextmanager
async def restored(server: RedisServer) -> AsyncIterator[None]:
    """Start ``server`` again after the test (it rejoins as a replica), for the next tests."""
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(server.start)


async def first_write_after(redis: Redis, key: str, killed_at: float) -> float:
    """Seconds from ``killed_at`` until a write to ``key``'s slot succeeds."""
    with anyio.fail_after(60):
        while True:
            try:
                await redis.set(key, b"1", ex=60)
                return time.monotonic() - killed_at
            except REDIS_DOWN:
                await anyio.sleep(0.05)


async def test_stream_reads_go_on_when_the_node_that_named_their_keys_dies(
    redis_cluster: RedisCluster,
) -> None:
    """XREAD and XREADGROUP name their keys after a keyword (STREAMS), so
    redis-py's cluster client asked one fixed node (COMMAND GETKEYS) for them
    before every read, and never asked another once that node died: its slot
    map was refreshed, but no read reached it. A worker whose client had picked
    the killed master read no job and no control entry for as long as it lived
    (the failover test failed one run in two)."""
    keys = Keys(unique("ns"), cluster=True)
    client = connect_redis(redis_cluster.url)
    try:
        await client.ping()
        # The node redis-py asks: the one to kill. (A read of a key elsewhere
        # must go on: its slot's master is alive.)
        asked = client.commands_parser.node.port  # type: ignore[attr-defined]
        victim = next(n for n in redis_cluster.nodes if n.port == asked)
        candidates = [keys.control(a) for a in (*AGENTS, *(f"agent{i}" for i in range(50)))]
        key = next(k for k in candidates if redis_cluster.master_of(k).port != asked)
        lost = next(k for k in candidates if redis_cluster.master_of(k).port == asked)
        await client.xadd(key, {b"n": b"1"})
        async with restored(victim):
            await anyio.to_thread.run_sync(victim.kill)

            async def read() -> bool:
                try:
                    reply: Any = await client.xread({key: "0"}, count=1)
                except REDIS_DOWN:
                    return False
                return bool(reply)

            await eventually(read, "a stream read after the kill", within=20)
            # Nor does the failover of the killed master's slots.
            await first_write_after(client, lost, time.monotonic())
            assert await read()
    finally:
        await client.aclose()


@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
async def test_calls_go_on_when_the_primary_is_killed(
    livekit_server: LiveKitServer,
    redis_cluster: RedisCluster,
    redis_sentinels: RedisSentinels,
    topology: str,
) -> None:
    agent, ns = "dental", unique("ns")
    if topology == "cluster":
        url, keys = redis_cluster.url, Keys(ns, cluster=True)
        victim = redis_cluster.master_of(keys.jobs(agent))
    else:
        url, keys = redis_sentinels.url, Keys(ns)
        port = redis_sentinels.primary_port()
        victim = next(
            s for s in (redis_sentinels.primary, redis_sentinels.replica) if s and s.port == port
        )
    redis = connect_redis(url)
    lease = 3.0
    async with AsyncExitStack() as stack:
        stack.push_async_callback(redis.aclose)
        await stack.enter_async_context(dispatching(dispatcher_settings(livekit_server, url, ns)))
        worker = await stack.enter_async_context(
            working(livekit_server, url, ns, agent, lease=lease)
        )
        before = [await call_reaches(livekit_server, stack, agent) for _ in range(2)]
        agents_before = [c.agents()[0].sid for c in before]
        await stack.enter_async_context(restored(victim))

        killed_at = time.monotonic()
        await anyio.to_thread.run_sync(victim.kill)
        failover = await first_write_after(redis, f"{keys.jobs(agent)}:probe", killed_at)
        print(f"\n{topology}: kill -> first successful write {failover:.2f}s")
        assert failover < 30

        # Several lease renewals later the calls still run, on the same agent.
        await anyio.sleep(lease * 2)
        for caller, sid in zip(before, agents_before, strict=True):
            assert [a.sid for a in caller.agents()] == [sid]
            assert caller.max_agents_at_once == 1
        assert worker.stats.taken_over == 0
        assert len(worker.running_jobs) == 2
        # New calls after the failover are served.
        after = [await call_reaches(livekit_server, stack, agent) for _ in range(2)]
        assert worker.stats.started == 4
        for caller in [*before, *after]:
            await delete_room(livekit_server, caller.room.name)
        await eventually(lambda: not worker.running_jobs, "every call ended", within=30)
        assert worker.stats.succeeded == 4


@pytest.mark.parametrize("topology", ["single", "cluster", "sentinel"])
async def test_a_connection_closed_under_a_command_is_a_lost_connection(
    redis_server: RedisServer,
    redis_cluster: RedisCluster,
    redis_sentinels: RedisSentinels,
    topology: str,
) -> None:
    """redis-py's error paths close connections other tasks are using (the
    cluster client closes a node's on CLUSTERDOWN and repeated MOVED during a
    failover). Whatever moment the close lands, the command fails as
    REDIS_DOWN, which every loop rides out; it used to be an AttributeError
    that killed a worker in a cluster failover."""
    url = {
        "single": redis_server.url,
        "cluster": redis_cluster.url,
        "sentinel": redis_sentinels.url,
    }[topology]
    client = connect_redis(url)
    outcomes = []
    try:
        # The close takes a few event-loop turns; the command starts after
        # 0..7 of them, so one of them lands inside each window.
        for turns in range(8):
            if topology == "cluster":
                await client.initialize()  # type: ignore[attr-defined]
                node = client.get_node_from_key("probe")  # type: ignore[attr-defined]
                conn = node.acquire_connection()
                await conn.connect()
            else:
                conn = await client.connection_pool.get_connection()
            closing = anyio.Event()

            async def close(conn: Any = conn, closing: anyio.Event = closing) -> None:
                await conn.disconnect()
                closing.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(close)
                for _ in range(turns):
                    await anyio.lowlevel.checkpoint()
                try:
                    await conn.send_command("PING")
                    outcomes.append(await conn.read_response())
                except REDIS_DOWN as exc:
                    outcomes.append(type(exc).__name__)
            if topology == "cluster":
                node.release(conn)
            else:
                await client.connection_pool.release(conn)
        assert b"PONG" in outcomes, outcomes  # once the close is over, a fresh connection
        assert "ConnectionError" in outcomes, outcomes
        assert await client.ping()
    finally:
        await client.aclose()


#: Every character a query value must percent-encode, and '%' itself.
URL_HOSTILE_PASSWORD = "p&q=r#s%t+u v/w?x"


@pytest.mark.parametrize("topology", ["single", "cluster", "sentinel"])
async def test_a_password_with_url_characters_works_on_every_topology(
    redis_server: RedisServer,
    redis_cluster: RedisCluster,
    redis_sentinels: RedisSentinels,
    topology: str,
) -> None:
    """``?username=...&password=p%26q%3Dr...``: the data nodes get the
    password as written (cluster and Sentinel URLs used to hand them ``p``,
    or fail with ``unexpected keyword argument 'q'``)."""
    user = unique("acl-user")
    if topology == "single":
        url, ports = redis_server.url, [redis_server.port]
    elif topology == "cluster":
        url, ports = redis_cluster.url, [n.port for n in redis_cluster.nodes]
    else:
        url = redis_sentinels.url
        ports = [s.port for s in (redis_sentinels.primary, redis_sentinels.replica) if s]
    rules = ["on", f">{URL_HOSTILE_PASSWORD}", "~*", "&*", "+@all"]
    for port in ports:  # ACLs are per node
        with SyncRedis(port=port) as admin:
            admin.execute_command("ACL", "SETUSER", user, *rules)
    query = urlencode({"username": user, "password": URL_HOSTILE_PASSWORD}, quote_via=quote)
    assert "%26" in query  # the spelling: '&' encoded
    client = connect_redis(f"{url}?{query}")
    try:
        key = f"{{{user}}}:probe"
        assert await client.set(key, b"1", ex=60)
        assert await client.get(key) == b"1"
    finally:
        await client.aclose()
        for port in ports:
            with SyncRedis(port=port) as admin:
                admin.execute_command("ACL", "DELUSER", user)

"""Start-up warns once when Redis would lose jobs (AOF off, eviction on), never otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import anyio
import pytest
from redis.asyncio import Redis

from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.store.redis_health import check_durability
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from tests.support.jobs import message
from tests.support.stack import dispatcher_settings, dispatching, eventually, unique, working

pytestmark = pytest.mark.anyio

DURABLE = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")
VOLATILE = ("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")


@pytest.fixture(scope="module")
def volatile_redis() -> Iterator[RedisServer]:
    with RedisServer(args=VOLATILE) as server:
        yield server


@pytest.fixture(scope="module")
def durable_redis() -> Iterator[RedisServer]:
    with RedisServer(args=DURABLE) as server:
        yield server


def durability_warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and r.levelno == logging.WARNING and "not durable" in r.getMessage()
    ]


async def calls(redis: Redis, command: str) -> int:
    """How many times the server ran ``command`` (``INFO commandstats``; "config|get")."""
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def beats(redis: Redis, record: str, count: int) -> None:
    """Wait for ``count`` more heartbeats of a member (its record's ``heartbeat_at``)."""
    last = await redis.hget(record, "heartbeat_at")
    for _ in range(count):

        async def moved(since: bytes | None = last) -> bytes | None:
            now = await redis.hget(record, "heartbeat_at")
            return now if now != since else None

        last = await eventually(moved, f"a heartbeat of {record}", within=30)


@pytest.mark.parametrize(("durable", "expected"), [(False, 1), (True, 0)])
async def test_services_warn_once_at_start_up_about_a_redis_that_loses_jobs(
    livekit_server: LiveKitServer,
    volatile_redis: RedisServer,
    durable_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    durable: bool,
    expected: int,
) -> None:
    caplog.set_level(logging.DEBUG, logger="openrtc")
    url = (durable_redis if durable else volatile_redis).url
    ns = unique("ns")
    keys = Keys(ns)
    redis = Redis.from_url(url)
    try:
        before = await calls(redis, "config|get")
        async with (
            dispatching(dispatcher_settings(livekit_server, url, ns)) as dispatcher,
            working(livekit_server, url, ns, "dental") as worker,
        ):

            async def both_checked() -> bool:
                # Each check reads two settings with CONFIG GET.
                return await calls(redis, "config|get") >= before + 4

            await eventually(both_checked, "both durability checks", within=30)
            # Then more heartbeats and membership refreshes: a check run again
            # with them would have run by now.
            await beats(redis, keys.dispatcher(dispatcher.settings.dispatcher_id), 3)
            await beats(redis, keys.worker(worker.settings.worker_id), 3)
            assert await calls(redis, "config|get") == before + 4
    finally:
        await redis.aclose()
    for logger in ("openrtc.dispatcher", "openrtc.worker"):
        found = durability_warnings(caplog, logger)
        assert len(found) == expected, (logger, found)
    if not durable:
        (text,) = durability_warnings(caplog, "openrtc.worker")
        assert "appendonly no" in text
        assert "allkeys-lru" in text


async def test_the_check_reads_info_when_config_is_refused_and_gives_up_quietly(
    volatile_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.health")
    log = logging.getLogger("test.health")
    admin = Redis.from_url(volatile_redis.url)
    try:
        # As on managed Redis: CONFIG refused by ACL, then INFO refused too.
        await admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all")
        await admin.execute_command("ACL", "SETUSER", "app", "-config")
    finally:
        await admin.aclose()
    url = f"redis://app:pw@127.0.0.1:{volatile_redis.port}/0"
    limited = Redis.from_url(url)
    try:
        problems = await check_durability(limited, log)
        assert len(problems) == 2, problems  # from INFO persistence / INFO memory
        admin = Redis.from_url(volatile_redis.url)
        await admin.execute_command("ACL", "SETUSER", "app", "-info")
        await admin.aclose()
        caplog.clear()
        assert await check_durability(limited, log) == []
        assert [r.levelno for r in caplog.records] == [logging.DEBUG]
        assert "not checked" in caplog.records[0].getMessage()
    finally:
        await limited.aclose()


async def test_enqueue_waits_for_a_replica_and_reports_a_shortfall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="openrtc.streams")
    keys = Keys(unique("ns"))
    with RedisServer(args=DURABLE) as primary:
        redis = Redis.from_url(primary.url)
        try:
            alone = StreamStore(redis, keys, wait_replicas=1, wait_timeout=0.3)
            waits = await calls(redis, "wait")
            started = time.monotonic()
            (result,) = await alone.enqueue([message("dental", "dental-1")])
            assert result.outcome == "queued"  # kept on the primary
            # It asked Redis to wait, and waited out the timeout (a lower bound:
            # a loaded machine only lengthens it).
            assert await calls(redis, "wait") == waits + 1
            assert time.monotonic() - started >= 0.25
            assert any("0 of 1 replicas" in r.getMessage() for r in caplog.records)

            with RedisServer(args=("--replicaof", "127.0.0.1", str(primary.port))) as replica:
                copy = Redis.from_url(replica.url)
                try:
                    with anyio.fail_after(20):
                        while (await copy.info("replication"))["master_link_status"] != "up":
                            await anyio.sleep(0.05)
                    caplog.clear()
                    store = StreamStore(redis, keys, wait_replicas=1, wait_timeout=60.0)
                    started = time.monotonic()
                    await store.enqueue([message("dental", "dental-2")])
                    # Acknowledged by the replica, not waited out (a liveness
                    # bound far from the timeout; how fast: bench/dispatch.py --wait-replicas).
                    assert time.monotonic() - started < 30.0
                    assert await copy.xlen(keys.jobs("dental")) == 2  # on the replica already
                    assert caplog.records == []
                finally:
                    await copy.aclose()
        finally:
            await redis.aclose()

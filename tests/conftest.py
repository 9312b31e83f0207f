"""Shared fixtures: real Redis and LiveKit servers on loopback.

The servers are started here, once per test session, from the binaries that
``scripts/setup.sh`` installs. A missing binary makes the tests that need it
fail with a message naming that script; nothing is skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.devstack import LiveKitServer, RedisCluster, RedisSentinels, RedisServer
from openrtc.devtools.standin import StandIn, running_standin
from openrtc.store.streams import connect_redis
from tests.support.paths import LOG_DIR
from tests.support.stack import OFFLINE_AGENTS


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    server = RedisServer(log_path=LOG_DIR / "redis.log")
    with server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """Three masters, three replicas; a silent master is replaced after 1 s."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with RedisCluster(log_dir=LOG_DIR) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinels() -> Iterator[RedisSentinels]:
    """A primary, a replica and three Sentinels (quorum 2, down after 1 s)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with RedisSentinels(log_dir=LOG_DIR) as sentinels:
        yield sentinels


@pytest.fixture(scope="session")
def livekit_server() -> Iterator[LiveKitServer]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    server = LiveKitServer(log_path=LOG_DIR / "livekit.log")
    with server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[object]:
    """A plain redis-py asyncio client on a flushed database."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url, decode_responses=False)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client made like the services' own (``connect_redis``), database not flushed.

    Tests that use it keep to a namespace of their own.
    """
    redis = connect_redis(redis_server.url)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture(scope="module")
def pool() -> AgentPool:
    """The offline example agents (no STT or LLM), discovered once per module."""
    return AgentPool.from_directory(OFFLINE_AGENTS)


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    """A protocol-level LiveKit stand-in, for fault injection."""
    async with running_standin() as server:
        yield server

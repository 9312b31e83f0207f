"""Key hygiene: weeks of workers and dispatchers coming and going leave Redis as it was.

Many short-lived dispatchers (registered with the protocol stand-in, which
registers in milliseconds) and workers (on the real LiveKit server) come and
go around one long-lived worker, as rolling deploys and autoscaling make them;
some are "killed" (what a ``kill -9`` leaves: a heartbeat never renewed, a
consumer with a call pending on it). With short TTLs the keys, per kind, and
the group's consumers must come back to what they were before, and the one
stream that does not expire, the dead letters, must stay within its bound.
"""

from __future__ import annotations

from collections import Counter

import anyio
import pytest
from livekit import api
from redis.asyncio import Redis

from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.devtools.standin import StandIn, make_job
from openrtc.settings import LiveKitSettings
from openrtc.store.membership import Presence
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import DeadReason, JobMessage
from tests.support.jobs import job_message
from tests.support.stack import dispatcher_settings, dispatching, eventually, unique, working

pytestmark = pytest.mark.anyio

TEST_BUDGET = 120.0
#: Short lives for everything that expires, so the test takes seconds.
TTL = 1.0
SHORT = {
    "dedup_ttl": TTL,
    "membership_ttl": 0.5,
    "heartbeat_interval": 0.1,
}
WORKER_SHORT = {**SHORT, "status_ttl": TTL, "forget_consumers_after": TTL, "lease": 1.0}


async def census(redis: Redis, ns: str) -> Counter[str]:
    """Keys of the namespace by kind, plus the members of its sets and the consumers."""
    kinds: Counter[str] = Counter()
    async for raw in redis.scan_iter(match=f"{ns}:*", count=1000):
        key = raw.decode()
        rest = key[len(ns) + 1 :].split(":")
        kind = ":".join(rest[:2]) if rest[:2] == ["dead-letter", "seen"] else rest[0]
        kinds[f"key {kind}"] += 1
        kind_type = (await redis.type(raw)).decode()
        if kind_type == "zset":
            kinds[f"members of {kind}"] += await redis.zcard(raw)
        elif kind_type == "stream" and kind == "jobs":
            for group in await redis.xinfo_groups(raw):
                kinds["consumers"] += group["consumers"]
    # Bounded, not expiring: checked against its bound instead.
    del kinds["key dead-letter"]
    return kinds


def settle(census_now: Counter[str], baseline: Counter[str]) -> bool:
    return +census_now == +baseline


async def test_keys_and_consumers_return_to_baseline_after_many_short_lived_services(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    standin: StandIn,
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    stream = keys.jobs("dental")
    via_standin = LiveKitSettings(standin.url, "devkey", "hygiene-test-api-secret-0123456789abc")

    async def one_dispatcher() -> None:
        """A dispatcher that routes a served job and an unknown agent's (a dead letter)."""
        settings = dispatcher_settings(
            via_standin, redis_server.url, ns, dead_letter_maxlen=100, **SHORT
        )
        async with dispatching(settings):
            conn = await eventually(
                lambda: [w for w in standin.workers if not w.closed.is_set()],
                "the dispatcher registered with the stand-in",
            )
            for job in (
                make_job(unique("dental-gone")),  # served: its room is not on LiveKit
                make_job(unique("lobby"), metadata='{"agent": "ghost"}'),
            ):
                answer = await standin.offer(job, conn[0])
                assert answer is not None
                assert answer.available

    async def served_and_reported() -> bool:
        # Every job was served (stream empty) and its status sent back.
        return await redis.xlen(stream) == 0

    with anyio.fail_after(TEST_BUDGET):
        async with working(livekit_server, redis_server.url, ns, "dental", **WORKER_SHORT) as live:
            # One round first: what exists for good once the agents are known.
            await one_dispatcher()
            await eventually(served_and_reported, "the first jobs served")
            consumers = {live.settings.worker_id}
            baseline = await eventually(
                lambda: _census_without_transients(redis, ns),
                "the first round's records and status streams expired",
                within=20,
            )
            assert baseline["consumers"] == len(consumers)

            # Killed, not stopped: a worker with a call pending on its consumer
            # and a heartbeat it never renews, and a dispatcher's heartbeat.
            await StreamStore(redis, keys).enqueue([_job(livekit_server)])
            await redis.xreadgroup(WORKERS_GROUP, "killed-worker", {stream: ">"}, count=1)
            ttl = SHORT["membership_ttl"]
            await Presence(
                redis, keys.workers("dental"), keys.worker("killed-worker"), "killed-worker", ttl
            ).beat({"agent": "dental", "capacity": 1, "running": 1})
            await Presence(
                redis, keys.dispatchers, keys.dispatcher("killed-dispatcher"), "killed", ttl
            ).beat({"agents": "dental"})
            killed_at = anyio.current_time()
            assert +(await census(redis, ns)) != +baseline
            for _round in range(4):
                await one_dispatcher()
                async with working(livekit_server, redis_server.url, ns, "dental", **WORKER_SHORT):
                    pass
            # Registries drop members ten TTLs after they expired, at the next
            # heartbeat of a live member: a dispatcher that starts later.
            await anyio.sleep(max(0.0, killed_at + 11 * ttl - anyio.current_time()))
            await one_dispatcher()
            await eventually(served_and_reported, "every job served")

            async def back_to_baseline() -> bool:
                return settle(await census(redis, ns), baseline)

            try:
                await eventually(back_to_baseline, "the keys back to their baseline", within=30)
            except AssertionError:
                now = await census(redis, ns)
                raise AssertionError(f"baseline {dict(baseline)}, now {dict(now)}") from None
            rows = await redis.xinfo_consumers(stream, WORKERS_GROUP)
            assert {r["name"].decode() for r in rows} == consumers
    # The dead letters stay within their bound (approximate: whole nodes of
    # 100 entries are trimmed, so at most one node more than the bound).
    letters = StreamStore(redis, keys, dead_letter_maxlen=100)
    for n in range(500):
        await letters.dead_letter(
            DeadReason.MALFORMED, "bad", original={b"n": str(n).encode()}, once_for=f"x{n}"
        )
    assert 100 <= await redis.xlen(keys.dead_letter) < 200


async def _census_without_transients(redis: Redis, ns: str) -> Counter[str] | None:
    """The census once nothing that expires is left (job records, markers, status)."""
    now = await census(redis, ns)
    transient = ("key job", "key dead-letter:seen", "key status")
    if any(now[k] for k in transient):
        return None
    return now


def _job(livekit: LiveKitServer) -> JobMessage:
    room = api.Room(name=unique("dental-gone"), sid=f"RM_{unique('x')}")
    return job_message(livekit, room, "dental", "killed-dispatcher")

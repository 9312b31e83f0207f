"""Benchmark recovery at scale: a dead worker's entries behind many live pending ones.

Run from the repository root::

    .venv/bin/python bench/reclaim.py                     # 1,000 and 10,000 live entries
    .venv/bin/python bench/reclaim.py --check             # exit 1 if a goal is missed
    .venv/bin/python bench/reclaim.py --live 10000 --reclaimers 100

On a throwaway ``redis-server``: ``--live`` entries pending on ten consumers
that renew them every ``lease / 3`` (``XCLAIM ... JUSTID``, as living workers
do), then ``--dead`` entries of a consumer that never renews. Reclaimers run
``JobConsumer.reclaim`` as the worker's consume loop does (a pass every
second, the next one at once when a pass filled every free slot) with
``--slots`` free slots, and finish each entry they take at once.

It prints, for each size:

1. **recovery**: seconds from the moment the dead entries became reclaimable
   (their idle time reached the lease) until every one was taken; goal: within
   one lease;
2. **Redis time per pass**: ``INFO commandstats`` ``usec_per_call`` of the
   reclaim script (the only ``EVALSHA`` run here) and the longest pass
   (``SLOWLOG``: the one that starts a sweep walks the whole list), and Redis's total reclaim
   time per second of wall time with ``--reclaimers`` workers passing once a
   second each, with the agent's shared cursor and, for comparison, with one
   cursor per worker (each walking the whole list alone).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _lib.figures import record_figure
from redis.asyncio import Redis

from openrtc.devtools.devstack import RedisServer
from openrtc.store.streams import (
    RECLAIM_STATE_TTL,
    RECLAIM_SWEEP,
    JobConsumer,
    StreamStore,
)
from openrtc.wire.keys import WORKERS_GROUP, Keys

LIVE_CONSUMERS = 10
RECLAIM_INTERVAL = 1.0  # openrtc.worker.worker.RECLAIM_INTERVAL


async def deliver(redis: Redis, stream: str, consumer: str, n: int) -> list[bytes]:
    for start in range(0, n, 1_000):
        pipe = redis.pipeline(transaction=False)
        for _ in range(min(1_000, n - start)):
            pipe.xadd(stream, {b"job_id": b"AJ_bench", b"payload": b"x" * 200})
        await pipe.execute()
    reply = await redis.xreadgroup(WORKERS_GROUP, consumer, {stream: ">"}, count=n)
    return [entry_id for entry_id, _ in reply[0][1]]


async def renew(redis: Redis, stream: str, held: dict[str, list[bytes]], lease: float) -> None:
    while True:
        for consumer, ids in held.items():
            for i in range(0, len(ids), 1_000):
                chunk = ids[i : i + 1_000]
                await redis.xclaim(stream, WORKERS_GROUP, consumer, 0, chunk, justid=True)
        await asyncio.sleep(lease / 3)


async def evalsha_stats(redis: Redis) -> tuple[int, float]:
    stats = await redis.info("commandstats")
    row = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(row["calls"]), float(row["usec"])


async def run_size(redis: Redis, live: int, args: argparse.Namespace) -> dict[str, float]:
    await redis.flushdb()
    keys = Keys(f"bench-{live}")
    store = StreamStore(redis, keys)
    stream = keys.jobs("dental")
    await store.ensure_group("dental")
    held: dict[str, list[bytes]] = {}
    for c in range(LIVE_CONSUMERS):
        held[f"live-{c}"] = await deliver(redis, stream, f"live-{c}", live // LIVE_CONSUMERS)
    dead = set(await deliver(redis, stream, "dead", args.dead))
    eligible_at = time.monotonic() + args.lease
    renewer = asyncio.create_task(renew(redis, stream, held, args.lease))
    try:
        await asyncio.sleep(args.lease / 2)
        await redis.config_resetstat()
        await redis.config_set("slowlog-log-slower-than", 0)
        await redis.config_set("slowlog-max-len", 10_000)
        await redis.slowlog_reset()
        consumer = JobConsumer(store, "dental", "reclaimer")
        taken: set[bytes] = set()
        last = 0.0
        while taken != dead:
            now = time.monotonic()
            if now - last >= RECLAIM_INTERVAL:
                last = now
                got = await consumer.reclaim(args.lease, args.slots)
                for d in got:
                    taken.add(d.entry_id.encode())
                    await consumer.ack(d.entry_id)
                if len(got) >= args.slots:
                    last = 0.0
            if now > eligible_at + 10 * args.lease:
                break
            await asyncio.sleep(0.01)
        recovered = time.monotonic() - eligible_at
        calls, usec = await evalsha_stats(redis)
        per_pass = usec / max(1, calls)
        longest = max(
            (e["duration"] for e in await redis.slowlog_get(10_000) if b"EVALSHA" in e["command"]),
            default=0,
        )
        await redis.config_set("slowlog-log-slower-than", 10_000)
        # Steady state (nothing to take): many workers, one pass a second each.
        shared = await steady(redis, store, stream, args, shared_cursor=True)
        alone = await steady(redis, store, stream, args, shared_cursor=False)
    finally:
        renewer.cancel()
    ok = taken == dead
    print(
        f"live {live:>6}: {len(taken)}/{len(dead)} dead entries recovered "
        f"{recovered:5.2f} s after they became reclaimable (lease {args.lease:g} s, "
        f"{args.slots} slot(s)); {calls} passes, {per_pass:6.0f} us Redis each, "
        f"longest {longest} us"
    )
    print(
        f"              {args.reclaimers} workers passing once a second: Redis busy "
        f"{shared / 1000:6.1f} ms/s with the shared cursor, "
        f"{alone / 1000:6.1f} ms/s with a cursor per worker"
    )
    return {
        "recovered": recovered if ok else float("inf"),
        "per_pass": per_pass,
        "longest": longest,
        "shared": shared,
        "alone": alone,
    }


async def steady(
    redis: Redis, store: StreamStore, stream: str, args: argparse.Namespace, *, shared_cursor: bool
) -> float:
    """Redis's reclaim time (us) per second of wall time, ``--reclaimers`` passing once a second."""
    await redis.config_resetstat()
    seconds = 3.0
    start = time.monotonic()
    n = args.reclaimers
    while time.monotonic() - start < seconds:
        tick = time.monotonic()
        for i in range(n):
            state = store.keys.reclaim("dental") if shared_cursor else f"bench:cursor:{i}"
            await store.scripts.reclaim(
                keys=[stream, state],
                args=[
                    WORKERS_GROUP,
                    f"w{i}",
                    int(args.lease * 1000),
                    10,
                    int(args.lease * 1000 * RECLAIM_SWEEP),
                    int(RECLAIM_STATE_TTL * 1000),
                ],
            )
            await asyncio.sleep(max(0.0, (i + 1) / n - (time.monotonic() - tick)))
    _, usec = await evalsha_stats(redis)
    return usec / (time.monotonic() - start)


async def main(args: argparse.Namespace) -> int:
    failed = False
    with RedisServer() as server:
        redis = Redis.from_url(server.url)
        try:
            for live in args.live:
                r = await run_size(redis, live, args)
                met = r["recovered"] <= args.lease
                failed |= not met
                record_figure(
                    "reclaim",
                    f"recovery behind {live} live pending entries",
                    ours=r["recovered"],
                    anchor=args.lease,
                    anchor_label="one lease",
                    unit="s",
                    goal="<= one lease after they become reclaimable",
                    met=met,
                )
        finally:
            await redis.aclose()
    return 1 if failed and args.check else 0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--live",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1_000, 10_000],
        help="live pending entries ahead of the dead ones (comma-separated sizes)",
    )
    parser.add_argument("--dead", type=int, default=5)
    parser.add_argument("--slots", type=int, default=1, help="the reclaimer's free slots")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--reclaimers", type=int, default=100)
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))

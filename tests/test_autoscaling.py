"""What the autoscaler reads: the job stream's length is waiting + running calls.

``workers/scaledobject.yaml`` scales workers on ``XLEN`` of the agent's job
stream. That is only right while every way a call ends or moves keeps one
entry per live call; these tests drive the real stream operations against a
real Redis and check it, and check why the group's lag would be wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from openrtc.settings import DEFAULT_DRAIN_TIMEOUT
from openrtc.store.streams import JobConsumer, StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import DeadReason
from tests.support.jobs import message
from tests.support.stack import unique

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


async def _group(redis: Redis, stream: str) -> dict[str, Any]:
    [group] = await redis.xinfo_groups(stream)
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in group.items()}


async def test_stream_length_is_waiting_plus_running_through_every_operation(
    redis: Redis,
) -> None:
    keys = Keys(unique("ns"))
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    stream = keys.jobs("dental")
    await store.enqueue([message("dental", f"dental-{i}") for i in range(6)])
    consumer = JobConsumer(store, "dental", "w-1")

    async def calls() -> int:
        return int(await redis.xlen(stream))

    assert await calls() == 6  # 6 waiting
    got = await consumer.read(count=4, block_ms=100)
    assert len(got) == 4
    assert await calls() == 6  # 4 running, 2 waiting

    await consumer.ack(got[0].entry_id)  # a call ended
    assert await calls() == 5
    assert await consumer.release(got[1].entry_id, "unused") is not None  # a drain hands it back
    assert await calls() == 5
    await consumer.dead_letter(got[2], DeadReason.EXPIRED, "too old")  # to the dead letters
    assert await calls() == 4

    group = await _group(redis, stream)
    assert (group["pending"], group["lag"]) == (1, 3)  # running 1, waiting 3
    assert await calls() == group["pending"] + group["lag"]

    # Redis loses the running call (a restart without persistence) and its
    # worker writes it back: still one live call.
    running = got[3]
    await redis.xack(stream, "workers", running.entry_id)
    await redis.xdel(stream, running.entry_id)
    await consumer.write_back(running.fields[b"job_id"].decode(), running.fields)
    assert await calls() == 4

    # Calls end in any order: a later one ends while an earlier one runs and
    # others wait. XLEN still counts them; the group's lag, the other
    # candidate, reads NULL from then on whenever calls are waiting (a deleted
    # entry inside the stream). KEDA's go-redis reads NULL as -1: an inactive
    # trigger, scaling workers to the minimum under a backlog.
    await store.enqueue([message("dental", f"dental-late-{i}") for i in range(2)])
    _earlier, later = await consumer.read(count=2, block_ms=100)
    await consumer.ack(later.entry_id)
    group = await _group(redis, stream)
    waiting = len(await redis.xrange(stream, f"({group['last-delivered-id'].decode()}", "+"))
    assert (group["pending"], waiting) == (2, 3)
    assert await calls() == group["pending"] + waiting
    assert group["lag"] is None


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_manifests_scale_on_the_stream_length_within_the_slots() -> None:
    docs = {d["kind"]: d for d in _documents(ROOT / "workers" / "scaledobject.yaml")}
    [trigger] = docs["ScaledObject"]["spec"]["triggers"]
    meta = trigger["metadata"]
    # With a consumerGroup KEDA reads XPENDING or the lag, never XLEN.
    assert "consumerGroup" not in meta
    assert meta["stream"] == Keys().jobs("dental")
    assert trigger["authenticationRef"]["name"] == docs["TriggerAuthentication"]["metadata"]["name"]
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1

    [deployment] = _documents(ROOT / "workers" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    concurrency = int(args[args.index("--concurrency") + 1])
    drain = float(args[args.index("--drain-timeout") + 1])
    assert 0 < int(meta["streamLength"]) <= concurrency
    assert drain == DEFAULT_DRAIN_TIMEOUT
    # Kubernetes' SIGKILL comes after the drain and the takeover of what is left.
    assert pod["terminationGracePeriodSeconds"] > drain
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert re.fullmatch(
        r"openrtc-worker-\w+", docs["ScaledObject"]["spec"]["scaleTargetRef"]["name"]
    )

"""The lease, against real Redis and LiveKit: a late renewal, a lost lease, stepping aside.

A worker renews the entries of its running calls every ``lease / 3``; a peer
reclaims an entry idle for a lease. These tests make a renewal late (the
entry's idle time raised in Redis, or the whole worker process stopped) and
check what the worker and its peers can be seen to do: Redis's pending list,
the room's participants, the worker's counters and its /metrics page.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer, free_port
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import WORKERS_GROUP, Keys
from tests.support.jobs import job_message
from tests.support.processes import worker_process_logged
from tests.support.stack import (
    HoldingRunner,
    creds,
    delete_room,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)
from tests.support.waits import wait_member

pytestmark = pytest.mark.anyio


async def test_a_worker_that_reclaims_its_own_late_entry_runs_no_second_session(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """'Our own entry, reclaimed because a renewal was late': never a second session.

    The entry's idle time is raised past the lease in Redis (``XCLAIM ... IDLE``
    to its own consumer), as a renewal that came late would leave it; the
    worker's next reclaim pass claims it back to itself (its delivery count
    goes up). The renewal and the reclaim pass race, so this is repeated
    until a reclaim pass has won twice: by the second, the worker has dealt
    with the first (one consume loop reads, then takes, then reads again).
    """
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    stream = keys.jobs("dental")
    lease = 2.0
    room = await new_room(livekit_server, unique("dental-late-renewal"))
    message = job_message(livekit_server, room, "dental", "d")
    runner = HoldingRunner()
    with anyio.fail_after(120):
        async with working(
            livekit_server, redis_server.url, ns, "dental", lease=lease, runner=runner
        ) as worker:
            [entry] = await store.enqueue([message])
            await eventually(lambda: worker.running_jobs == [message.job_id], "the call running")
            me = worker.settings.worker_id
            delivered = 1
            while delivered < 3:
                await redis.xclaim(
                    stream,
                    WORKERS_GROUP,
                    me,
                    0,
                    [entry.entry_id],
                    idle=int(lease * 1000 * 50),
                    justid=True,
                )

                async def moved(before: int = delivered) -> tuple[str, int] | None:
                    [row] = await redis.xpending_range(
                        stream, WORKERS_GROUP, entry.entry_id, entry.entry_id, 1
                    )
                    count = int(row["times_delivered"])
                    renewed = row["time_since_delivered"] < lease * 1000
                    return (row["consumer"].decode(), count) if count > before or renewed else None

                consumer, count = await eventually(moved, "a renewal or a reclaim pass", within=20)
                assert consumer == me
                delivered = count
            # Twice reclaimed by itself: one session all along, no reclaim counted.
            assert len(runner.controls) == 1
            assert worker.running_jobs == [message.job_id]
            assert worker.stats.reclaimed == 0
            assert worker.stats.started == 1
            runner.end_all()
    await delete_room(livekit_server, room.name)


async def metric(port: int, name: str, **labels: str) -> float:
    """One sample of a service's /metrics page (0 when absent or not serving)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as reply,
        ):
            text = await reply.text()
    except (aiohttp.ClientError, TimeoutError):
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize("peer_joins", [True, False], ids=["peer-joins", "lease-only"])
async def test_a_frozen_worker_past_its_lease_steps_aside_for_the_peer_that_took_over(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    peer_joins: bool,
) -> None:
    """SIGSTOP past the lease, a peer takes the call over, SIGCONT: the woken one steps aside.

    Frozen, the worker keeps its Redis sockets (and its liveness subscription),
    so only the lease can move the call. ``peer-joins``: the peer's agent joins
    with the job's identity; the woken worker learns it from LiveKit
    (``DUPLICATE_IDENTITY``) or from its next renewal, whichever comes first,
    and no rejoin of its own follows. ``lease-only``: the peer holds the call
    without joining (a session runner that joins no room), so LiveKit says
    nothing and only the woken worker's renewal can tell it the call is gone:
    it counts a lost lease, ends its session as taken over, and its agent
    leaves the room.
    """
    ns = unique("ns")
    keys = Keys(ns)
    lease = 2.0
    port = free_port()
    room = unique("dental-frozen")
    log = tmp_path / "frozen-worker.log"
    runner = None if peer_joins else HoldingRunner()
    with anyio.fail_after(150):
        async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
            frozen = worker_process_logged(
                livekit_server,
                redis_server.url,
                ns,
                log,
                *("--lease", str(lease), "--http-port", str(port)),
            )
            try:
                await wait_member(redis, keys, "dental")
                await new_room(livekit_server, room)
                async with caller_in(creds(livekit_server), room) as caller:
                    original = await caller.wait_agent(within=30)
                    async with working(
                        livekit_server, redis_server.url, ns, "dental", lease=lease, runner=runner
                    ) as peer:
                        await wait_member(redis, keys, "dental", 2)
                        frozen.send_signal(signal.SIGSTOP)
                        try:
                            if peer_joins:
                                replacement = await caller.wait_agent(
                                    within=60, other_than=original.sid
                                )
                                assert replacement.identity == original.identity
                            else:
                                await eventually(
                                    lambda: peer.stats.reclaimed == 1,
                                    "the peer's reclaim",
                                    within=60,
                                )
                            assert peer.stats.reclaimed == 1
                        finally:
                            frozen.send_signal(signal.SIGCONT)

                        async def stepped_aside() -> bool:
                            ended = await metric(
                                port,
                                "openrtc_sessions_ended_total",
                                agent="dental",
                                outcome="taken_over",
                            )
                            return ended >= 1

                        await eventually(
                            stepped_aside, "taken_over on the woken worker's /metrics", within=60
                        )
                        if peer_joins:
                            # Its session is over: no rejoin followed the
                            # takeover, the peer's agent is the only one.
                            assert [a.sid for a in caller.agents()] == [replacement.sid]
                            later = [s for s in caller.sightings if s.at >= replacement.at]
                            assert {s.sid for s in later} == {replacement.sid}
                        else:
                            lost = await metric(port, "openrtc_leases_lost_total", agent="dental")
                            assert lost == 1
                            await caller.wait_no_agent(within=30)
                            assert [s.sid for s in caller.sightings] == [original.sid]
                        assert peer.stats.taken_over == 0
                        assert len(peer.running_jobs) == 1
                        # The entry is the peer's; the woken worker holds nothing.
                        [row] = await redis.xpending_range(
                            keys.jobs("dental"), WORKERS_GROUP, "-", "+", 10
                        )
                        assert row["consumer"].decode() == peer.settings.worker_id
                        if runner is not None:
                            runner.end_all()
                        await delete_room(livekit_server, room)
                frozen.send_signal(signal.SIGTERM)
                await anyio.to_thread.run_sync(lambda: frozen.wait(30))
                text = log.read_text()
                if not peer_joins:
                    assert "lease lost to another worker" in text, text
                assert "another worker took the call over" in text, text
                assert "stepping aside" in text, text
                assert frozen.returncode == 0, text
            finally:
                if frozen.poll() is None:
                    frozen.send_signal(signal.SIGCONT)
                    frozen.kill()
                    frozen.wait(10)


@pytest.mark.parametrize("grace", [600.0, 0.01], ids=["within-grace", "past-grace"])
async def test_a_termination_right_after_a_takeover_is_ignored_for_takeover_grace(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
    grace: float,
) -> None:
    """``takeover_grace``: the takeover's own join makes LiveKit terminate the job.

    A worker that died holding the entry (read by a consumer that never renews
    it); a peer takes the call over after the lease. The termination LiveKit
    relays when that join removes the dead worker's participant is ignored
    within ``takeover_grace`` of joining; past it, a termination ends the call.
    """
    caplog.set_level(logging.INFO, logger="openrtc")
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    room = await new_room(livekit_server, unique("dental-takeover-grace"))
    message = job_message(livekit_server, room, "dental", "d")
    await store.ensure_group("dental")
    await store.enqueue([message])
    # Delivered to a worker that died with it.
    await redis.xreadgroup(WORKERS_GROUP, "w-gone", {keys.jobs("dental"): ">"}, count=1)
    runner = HoldingRunner()
    with anyio.fail_after(120):
        async with working(
            livekit_server,
            redis_server.url,
            ns,
            "dental",
            lease=1.0,
            runner=runner,
            takeover_grace=grace,
        ) as peer:
            await eventually(lambda: peer.running_jobs == [message.job_id], "the takeover")
            assert peer.stats.reclaimed == 1
            [control] = runner.controls
            # Its join is timed from here (the takeover_grace's start).
            joined = f"job {message.job_id}: agent 'dental' joined room"
            await eventually(lambda: joined in caplog.text, "the peer's session joined")
            await store.publish_termination("dental", message.job_id, "livekit")
            if grace > 1:
                line = f"job {message.job_id}: termination caused by our takeover; ignored"
                await eventually(lambda: line in caplog.text, "the termination ignored")
                assert not control.stopping
                assert peer.running_jobs == [message.job_id]
                runner.end_all()
            else:
                await eventually(lambda: not peer.running_jobs, "the call ended", within=30)
                assert control.stop_reason == "terminated by LiveKit"
    await delete_room(livekit_server, room.name)

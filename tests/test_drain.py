"""A draining worker: its running calls handed to peers, or left; real Redis, real LiveKit rooms.

The sessions run in a :class:`HandingRunner`: no agent joins (a two-core
machine cannot run a dozen real sessions at once in one test process), but
the runner plays both sides of a handover as a real session does. The old
session answers the worker's handover ask at its next turn boundary; the
new one (a peer's, ``control.handover``) "joins" after a while, which ends
the old one as taken over, as LiveKit's duplicate-identity removal does.
What the tests check is what can be seen: which worker runs which call,
the workers' counters, Redis's stream and the workers' logs.
"""

from __future__ import annotations

import logging
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from livekit import api
from redis.asyncio import Redis

from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.session.session import SessionControl, SessionOutcome
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import JobMessage
from openrtc.worker.worker import Worker
from tests.support.jobs import job_message
from tests.support.processes import worker_process_logged
from tests.support.stack import delete_room, eventually, new_room, unique, working
from tests.support.waits import wait_member

pytestmark = pytest.mark.anyio


@dataclass
class HandingRunner:
    """Sessions of every worker of a test, both sides of each handover.

    ``turn``: seconds the old session takes to reach a turn boundary once
    asked; ``join``: seconds the new one takes to join.
    """

    turn: float = 0.0
    join: float = 0.5
    #: The first session of each call, by job id.
    first: dict[str, SessionControl] = field(default_factory=dict)
    #: Handovers that reached a peer's session, by job id, and how many
    #: were arrived but not joined at that moment (this one included).
    arrived: dict[str, int] = field(default_factory=dict)
    joining: int = 0
    replaced: set[str] = field(default_factory=set)
    controls: list[SessionControl] = field(default_factory=list)

    async def prepare(self) -> None:
        return None

    async def maintain(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def run(
        self, message: JobMessage, control: SessionControl, *, worker_id: str
    ) -> SessionOutcome:
        self.controls.append(control)
        job = message.job_id
        if control.handover:
            self.joining += 1
            self.arrived[job] = self.joining
            try:
                await anyio.sleep(self.join)
            finally:
                self.joining -= 1
            self.replaced.add(job)
            self.first[job].stop("replaced by its handover", takeover=True)
            control.joined.set()
            await control.wait_stop()
            return SessionOutcome("success", control.stop_reason)
        self.first[job] = control
        control.joined.set()

        async def answer_handovers() -> None:
            while True:
                await control.wait_handover_asked()
                await anyio.sleep(self.turn)
                control.handover_ready.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_handovers)
            await control.wait_stop()
            tg.cancel_scope.cancel()
        if job in self.replaced:
            return SessionOutcome("taken_over", control.stop_reason)
        return SessionOutcome("success", control.stop_reason)

    def end_all(self) -> None:
        for control in self.controls:
            control.stop("test over")


async def calls_on(
    livekit: LiveKitServer, store: StreamStore, worker: Worker, count: int
) -> list[api.Room]:
    """``count`` calls (real rooms) enqueued and running on ``worker``."""
    rooms = [await new_room(livekit, unique("dental-handover")) for _ in range(count)]
    await store.enqueue([job_message(livekit, room, "dental", "d") for room in rooms])
    await eventually(lambda: len(worker.running_jobs) == count, f"{count} calls running")
    return rooms


async def stopped(caplog: pytest.LogCaptureFixture, worker: Worker, within: float) -> None:
    """Until the worker's run is over (its last log line)."""
    line = f"worker {worker.settings.worker_id} stopped"
    await eventually(lambda: line in caplog.text, "the worker stopped", within=within)


async def test_handovers_go_two_at_a_time_each_until_its_peer_is_in(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Paced: a peer starting every call at once starts each later (the caller's gap).

    Four calls, a peer with room for all: the draining worker releases two,
    and the next only once one of those has its peer joined; so no handover
    reaches the peer while two others are still joining.
    """
    caplog.set_level(logging.INFO, logger="openrtc")
    ns = unique("ns")
    store = StreamStore(redis, Keys(ns))
    runner = HandingRunner(join=1.0)
    rooms: list[api.Room] = []
    with anyio.fail_after(120):
        async with AsyncExitStack() as stack:
            draining = await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    "dental",
                    runner=runner,
                    concurrency=4,
                    drain_timeout=60.0,
                )
            )
            rooms = await calls_on(livekit_server, store, draining, 4)
            peer = await stack.enter_async_context(
                working(
                    livekit_server, redis_server.url, ns, "dental", runner=runner, concurrency=8
                )
            )
            await wait_member(redis, Keys(ns), "dental", 2)
            draining.request_stop()
            await stopped(caplog, draining, within=60)
            assert draining.stats.handed_over == 4
            assert draining.stats.taken_over == 4
            assert sorted(peer.running_jobs) == sorted(runner.first)
            print(f"\nhandovers joining when each arrived: {runner.arrived}")
            assert max(runner.arrived.values()) <= 2, runner.arrived
            runner.end_all()
    for room in rooms:
        await delete_room(livekit_server, room.name)


async def test_calls_being_handed_over_count_against_the_peer_s_free_slots(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Four calls, a peer with two free slots, turns slower than the worker's next look.

    The two calls asked for a handover but not yet released (their session
    is mid-turn) already hold the peer's two slots: the next look must not
    hand over two more, which would wait unread in the stream while their
    sessions go on here. So two are handed over, two stay (left to the
    lease at the drain timeout).
    """
    caplog.set_level(logging.INFO, logger="openrtc")
    ns = unique("ns")
    store = StreamStore(redis, Keys(ns))
    # A turn boundary three seconds away: longer than the next look (two).
    runner = HandingRunner(turn=3.0, join=0.5)
    rooms: list[api.Room] = []
    with anyio.fail_after(120):
        async with AsyncExitStack() as stack:
            draining = await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    "dental",
                    runner=runner,
                    concurrency=4,
                    drain_timeout=15.0,
                    lease=30.0,
                )
            )
            rooms = await calls_on(livekit_server, store, draining, 4)
            peer = await stack.enter_async_context(
                working(
                    livekit_server, redis_server.url, ns, "dental", runner=runner, concurrency=2
                )
            )
            await wait_member(redis, Keys(ns), "dental", 2)
            draining.request_stop()
            await stopped(caplog, draining, within=60)
            assert "drain timeout: leaving 2 call(s) to other workers" in caplog.text
            assert draining.stats.handed_over == 2, caplog.text
            assert len(peer.running_jobs) == 2
            # Nothing handed over waits unread: each entry is held, two by
            # the peer and two (left to the lease) by the stopped worker.
            stream = Keys(ns).jobs("dental")
            summary = await redis.xpending(stream, WORKERS_GROUP)
            held = {c["name"].decode(): int(c["pending"]) for c in summary["consumers"]}
            assert held == {peer.settings.worker_id: 2, draining.settings.worker_id: 2}
            assert await redis.xlen(stream) == 4
            runner.end_all()
    for room in rooms:
        await delete_room(livekit_server, room.name)


async def test_with_every_peer_full_calls_stay_until_the_drain_timeout_then_go_by_the_lease(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No free slot anywhere: nothing is handed over; the call is left to the lease.

    Its peer, once it has room, takes it over as a crashed worker's call.
    """
    caplog.set_level(logging.INFO, logger="openrtc")
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    runner = HandingRunner()
    rooms: list[api.Room] = []
    with anyio.fail_after(120):
        async with AsyncExitStack() as stack:
            peer = await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    "dental",
                    runner=runner,
                    concurrency=1,
                    lease=3.0,
                )
            )
            rooms += await calls_on(livekit_server, store, peer, 1)
            draining = await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    "dental",
                    runner=runner,
                    concurrency=1,
                    lease=3.0,
                    drain_timeout=5.0,
                )
            )
            rooms += await calls_on(livekit_server, store, draining, 1)
            [job] = draining.running_jobs
            draining.request_stop()
            await stopped(caplog, draining, within=30)
            assert "drain timeout: leaving 1 call(s) to other workers" in caplog.text
            assert draining.stats.handed_over == 0
            assert "handing " not in caplog.text
            [own] = [c for j, c in runner.first.items() if j != job]
            own.stop("the peer's own call ended")
            await eventually(
                lambda: peer.running_jobs == [job], "the peer took the call", within=30
            )
            assert peer.stats.reclaimed == 1
            runner.end_all()
    for room in rooms:
        await delete_room(livekit_server, room.name)


async def test_a_peer_that_starts_after_the_sigterm_still_takes_the_calls(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rollout without surge: the draining worker looks for peers again until one is up."""
    caplog.set_level(logging.INFO, logger="openrtc")
    ns = unique("ns")
    store = StreamStore(redis, Keys(ns))
    runner = HandingRunner()
    rooms: list[api.Room] = []
    drain_timeout = 90.0
    with anyio.fail_after(120):
        async with AsyncExitStack() as stack:
            draining = await stack.enter_async_context(
                working(
                    livekit_server,
                    redis_server.url,
                    ns,
                    "dental",
                    runner=runner,
                    concurrency=2,
                    drain_timeout=drain_timeout,
                )
            )
            rooms = await calls_on(livekit_server, store, draining, 2)
            draining.request_stop()
            await eventually(lambda: "draining: no new jobs" in caplog.text, "the drain")
            peer = await stack.enter_async_context(
                working(livekit_server, redis_server.url, ns, "dental", runner=runner)
            )
            # Well before its drain timeout: the calls went to the peer.
            await stopped(caplog, draining, within=drain_timeout / 2)
            assert draining.stats.handed_over == 2
            assert sorted(peer.running_jobs) == sorted(runner.first)
            assert "drain timeout" not in caplog.text
            runner.end_all()
    for room in rooms:
        await delete_room(livekit_server, room.name)


async def test_a_second_sigterm_aborts_the_drain_and_leaves_the_call_to_the_lease(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """SIGTERM drains (the call may go on for the drain timeout); a second one aborts at once.

    The call's entry stays pending on the aborted worker, unacknowledged:
    a peer takes it over as a dead worker's.
    """
    ns = unique("ns")
    keys = Keys(ns)
    store = StreamStore(redis, keys)
    log = tmp_path / "worker.log"
    room = await new_room(livekit_server, unique("dental-abort"))
    message = job_message(livekit_server, room, "dental", "d")
    drain_timeout = 300
    with anyio.fail_after(300):  # a worker process starts slowly on a loaded machine
        worker = worker_process_logged(
            livekit_server,
            redis_server.url,
            ns,
            log,
            "--no-handover",
            "--drain-timeout",
            str(drain_timeout),
        )
        try:
            await wait_member(redis, keys, "dental")
            [entry] = await store.enqueue([message])
            await eventually(lambda: "joined room" in log.read_text(), "the call joined", within=60)
            worker.send_signal(signal.SIGTERM)
            await eventually(lambda: "draining: no new jobs" in log.read_text(), "the drain")
            worker.send_signal(signal.SIGTERM)
            # Far below the drain timeout: the abort, not the end of the drain.
            code = await anyio.to_thread.run_sync(lambda: worker.wait(drain_timeout / 5))
            text = log.read_text()
            assert "SIGTERM: stopping gracefully (again to abort)" in text, text
            assert "SIGTERM again: aborting" in text, text
            assert "drain timeout" not in text, text
            assert code == 0, text
            [row] = await redis.xpending_range(keys.jobs("dental"), WORKERS_GROUP, "-", "+", 10)
            assert row["message_id"].decode() == entry.entry_id
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    await delete_room(livekit_server, room.name)

"""Step: this worker's running sessions published for ``openrtc top``, every ``top_interval``.

Each snapshot (:class:`~openrtc.wire.top.WorkerSnapshot`) says, per session,
what its :class:`~openrtc.session.live.LiveState` says (state, turns, latency,
blocks) and what it costs: in ``process`` isolation its process's CPU and
memory, in ``coroutine`` isolation its callbacks' share of this process's
event loop (its memory is the worker's). One ``SET`` with an expiry per
interval: a worker that dies drops out; one that stops removes its snapshot.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from functools import partial
from typing import Final

import anyio
from anyio.abc import TaskStatus

from openrtc.store.top import publish_snapshot, withdraw_snapshot
from openrtc.wire.top import SessionRow, WorkerSnapshot
from openrtc.worker.claims import ClaimTable
from openrtc.worker.context import WorkerContext

__all__ = ["TopPublisher"]

#: A snapshot outlives this many intervals (a late one is not a dead worker).
TTL_INTERVALS: Final = 3


class _Rate:
    """CPU shares from cumulative seconds: the share of one core since the last reading."""

    def __init__(self) -> None:
        self._last: dict[object, tuple[float, float]] = {}

    def share(self, key: object, seconds: float, now: float) -> float | None:
        """``None`` at the first reading of ``key`` (nothing to compare with yet)."""
        last = self._last.get(key)
        self._last[key] = (now, seconds)
        if last is None or now <= last[0]:
            return None
        return round(max(0.0, seconds - last[1]) / (now - last[0]), 4)

    def keep(self, keys: set[object]) -> None:
        """Forget every key not in ``keys`` (sessions that ended)."""
        for key in self._last.keys() - keys:
            del self._last[key]


class TopPublisher:
    """The top step: a snapshot of the running sessions, every ``top_interval``."""

    def __init__(self, ctx: WorkerContext, claims: ClaimTable) -> None:
        self._ctx = ctx
        self._claims = claims
        self._rate = _Rate()
        self._me = os.getpid()
        self._host = socket.gethostname()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ctx, interval = self._ctx, self._ctx.settings.top_interval
        task_status.started()
        if interval <= 0:
            return
        ttl = max(interval * TTL_INTERVALS, 1.0)
        try:
            while True:
                # Silent when Redis is down: the heartbeat says so, once.
                await ctx.redis(partial(self.publish, ttl), within=interval)
                await anyio.sleep(interval)
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(ctx.step_timeout),
                contextlib.suppress(Exception),
            ):
                await withdraw_snapshot(ctx.redis_client, ctx.keys, ctx.settings.worker_id)

    async def publish(self, ttl: float) -> None:
        """One snapshot, written (expiring after ``ttl`` seconds)."""
        ctx = self._ctx
        await publish_snapshot(ctx.redis_client, ctx.keys, self.snapshot(), ttl=ttl)

    def snapshot(self) -> WorkerSnapshot:
        """What this worker runs now, and what each session costs since the last snapshot."""
        s, now, wall = self._ctx.settings, time.monotonic(), time.time()
        rows: list[SessionRow] = []
        seen: set[object] = {"worker"}
        for claim in self._claims:
            message, control = claim.message, claim.control
            if message is None or control is None:
                continue
            live = control.live
            # A session started again (a new process) is measured afresh.
            key = (message.job_id, control.pid)
            seen.add(key)
            cpu: float | None
            rss: int | None = None
            if control.pid:
                cpu, rss = self._process(control.pid, key, now)
            else:
                cpu = self._rate.share(key, live.loop_s, now)
            started = live.started_at or wall
            rows.append(
                SessionRow(
                    job_id=message.job_id,
                    agent=message.agent,
                    room=message.room,
                    worker=s.worker_id,
                    started_at=round(started, 3),
                    duration_s=round(max(0.0, wall - started), 1),
                    tenant=message.tenant,
                    state=live.state,
                    turns=live.turns,
                    latency_s=None if live.latency_s is None else round(live.latency_s, 3),
                    cpu=cpu,
                    rss_bytes=rss,
                    blocks=live.blocks,
                    longest_block_s=round(live.longest_block_s, 3),
                )
            )
        self._rate.keep(seen)
        me = proc_stat(self._me) or (0.0, 0)
        return WorkerSnapshot(
            worker=s.worker_id,
            agent=s.agent,
            host=self._host,
            pid=os.getpid(),
            isolation=s.isolation,
            at=round(wall, 3),
            cpu=self._rate.share("worker", me[0], now) or 0.0,
            rss_bytes=me[1],
            sessions=rows,
        )

    def _process(self, pid: int, key: object, now: float) -> tuple[float | None, int | None]:
        """A session process's CPU share and resident memory; ``None`` once it is gone."""
        read = proc_stat(pid)
        if read is None:
            return None, None
        seconds, rss = read
        return self._rate.share(key, seconds, now), rss


_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_stat(pid: int) -> tuple[float, int] | None:
    """A process's CPU seconds (user + system) and resident bytes, from one read of
    ``/proc/PID/stat``; ``None`` if it is gone (or there is no ``/proc``).

    One file, not psutil's two (``stat`` and ``statm``): at 50 session
    processes a snapshot's cost is mostly these reads.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # After the command name (which may hold spaces and parentheses): field 3 on.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return (int(rest[11]) + int(rest[12])) / _TICKS, int(rest[21]) * _PAGE
    except (IndexError, ValueError):
        return None

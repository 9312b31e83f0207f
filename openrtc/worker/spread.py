"""Calls spread by load: whether a worker reads its agent's next job now or leaves it to a peer.

Workers of one agent compete for the same stream. A worker that reads
whenever it has a free slot takes most of a burst (one worker took 7 of 8
calls, another 16 of 30), so each worker reads one entry at a time and,
before each read, applies :func:`decide` to the loads its peers show:

- **Held calls** are the entries each worker holds (its pending entries in the
  consumer group, which Redis keeps exact: ``XPENDING``), so a burst is seen
  as it is taken, not one heartbeat later.
- A worker **defers** while it holds more calls than the least loaded live
  peer that has a free slot and is not above its CPU threshold. That peer
  reads the entry instead (it is blocked in its own read, so at once), which
  keeps every worker within one call of the others: never more than
  ``ceil(calls/N) + 1`` while another has room.
- A worker whose **CPU load** is at or above its ``load_threshold`` (as
  livekit-agents' ``load_threshold``) defers while a peer below its own
  threshold has room. When every worker is above it, they all go on reading,
  spread by held calls as above: the agent is served slower, never starved
  (an autoscaler should add workers; ``openrtc status`` shows the loads).
- Deferring is bounded (:data:`MAX_DEFER`): when a job waits and the peers'
  held calls have not changed for that long (none read, none ended a call),
  the worker reads it anyway. A peer that shows room but does not read
  (frozen, or gone within its membership TTL) delays a call by about that
  much, never strands it; peers that read, however slowly, are waited for.

Idle workers all hold nothing and read at once: the join path is unchanged.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import psutil

__all__ = ["DEFER_STEP", "MAX_DEFER", "CpuLoad", "PeerLoad", "ReadDecision", "decide"]

#: How long a deferring worker waits before it looks again.
DEFER_STEP: Final = 0.1
#: How long a job waits while the less loaded peers make no progress before
#: a more loaded worker reads it.
MAX_DEFER: Final = 0.5


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """One live worker of the agent, as the others see it."""

    held: int
    capacity: int
    #: At or above its own CPU threshold.
    overloaded: bool = False


@dataclass(frozen=True, slots=True)
class ReadDecision:
    """Read now, or wait ``DEFER_STEP`` and ask again; ``reason`` says why."""

    read: bool
    reason: str


def decide(me: PeerLoad, peers: Sequence[PeerLoad], *, stalled: float = 0.0) -> ReadDecision:
    """Whether the worker whose load is ``me`` reads the next entry now.

    ``peers``: the other live workers of the agent; ``stalled``: how long a
    job has been waiting while the peers' held calls did not change (0 when
    none waits or they did).
    """
    if me.held >= me.capacity:
        return ReadDecision(False, "no free slot")
    if stalled >= MAX_DEFER:
        return ReadDecision(True, f"a job waited {stalled:.2f}s while no peer read")
    open_peers = [p for p in peers if p.held < p.capacity]
    cool = [p for p in open_peers if not p.overloaded]
    if me.overloaded:
        if cool:
            return ReadDecision(False, "CPU above threshold while a peer below it has room")
        # Every worker with room is above its threshold: read anyway (slower
        # calls, not lost ones), still spread by held calls among them.
        rivals = open_peers
    else:
        rivals = cool
    if rivals:
        least = min(p.held for p in rivals)
        if me.held > least:
            return ReadDecision(False, f"holding {me.held} while a peer with room holds {least}")
    return ReadDecision(True, "least loaded")


class CpuLoad:
    """The host's CPU use in [0, 1], averaged over the last ``window`` seconds.

    Host-wide, as livekit-agents measures its ``load_threshold``: with
    ``process`` isolation the sessions burn CPU in child processes, which a
    process's own times would miss. Each :meth:`sample` is one non-blocking
    ``psutil.cpu_percent`` reading (the use since the previous one), taken
    with the worker's heartbeat.
    """

    def __init__(
        self,
        window: float = 2.5,
        *,
        read: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._read = read or (lambda: psutil.cpu_percent(interval=None) / 100.0)
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._read()  # the first reading has nothing to compare with

    def sample(self) -> float:
        """Take a reading and return the average over the window."""
        now = self._clock()
        self._samples.append((now, min(1.0, max(0.0, self._read()))))
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()
        return sum(v for _, v in self._samples) / len(self._samples)

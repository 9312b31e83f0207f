"""Small pieces both services use to stay up: backoff, state-change logs, error text."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = [
    "StateLog",
    "backoff_delay",
    "describe",
    "freeze_imports",
    "stop_signals",
    "unwrap_group",
]

#: The signals that stop a service: the first drains it, a second aborts.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StateLog:
    """Logs a component's state only when it changes (no log flood on a flapping link)."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._logger = logger
        self._what = what
        self._state: str | None = None
        self._detail = ""

    @property
    def state(self) -> str | None:
        """The last state set (``None`` before any), for readiness probes."""
        return self._state

    @property
    def detail(self) -> str:
        """The detail given with the last state change."""
        return self._detail

    def set(self, state: str, detail: str = "", *, level: int = logging.INFO) -> None:
        if state != self._state:
            self._state = state
            self._detail = detail
            self._logger.log(level, "%s %s%s", self._what, state, f": {detail}" if detail else "")


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Capped exponential backoff, jittered between half and all of it (attempt 0 first)."""
    ceiling = min(maximum, initial * math.pow(2, attempt))
    return random.uniform(ceiling / 2, ceiling)


def freeze_imports() -> None:
    """Move everything allocated so far out of the garbage collector's full passes.

    For a service's command, once its imports are done: livekit-agents and its
    dependencies live as long as the process, and scanning them stalls the
    event loop for ~100 ms under load. Process-wide: never from library code
    that tests run again and again in one process.
    """
    gc.collect()
    gc.freeze()


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error inside a task group's exception group, if there is one.

    A connection's task group fails as a whole when its socket dies; the
    reconnect loop wants that error, not a group around it.
    """
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group


def describe(exc: BaseException | None) -> str:
    """``Type: message`` for a log line (just the message when the type says it all)."""
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


@contextmanager
def stop_signals(
    on_stop: Callable[[signal.Signals], None], on_abort: Callable[[signal.Signals], None]
) -> Iterator[None]:
    """Call ``on_stop`` in the running event loop at the first SIGTERM/SIGINT, ``on_abort`` after.

    A plain ``signal.signal`` handler, not asyncio's ``add_signal_handler``:
    asyncio learns of a signal only from a byte the C handler writes to the
    loop's self-pipe, and that pipe is the one every ``call_soon_threadsafe``
    writes to. Under heavy native callback load (livekit's FFI thread) the pipe
    is full, the byte is dropped and the signal is lost for good. A Python
    handler runs in the main thread whatever the pipe holds, and its
    ``call_soon_threadsafe`` is queued even when its own wake-up byte is
    dropped: a full pipe means the loop is about to wake anyway.
    """
    loop = asyncio.get_running_loop()
    received = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        callback = on_stop if received == 1 else on_abort
        loop.call_soon_threadsafe(callback, signal.Signals(signum))

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

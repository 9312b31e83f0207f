"""Small pieces both services use to stay up: backoff, state-change logs, error text."""

from __future__ import annotations

import logging
import math
import random

__all__ = ["StateLog", "backoff_delay", "describe", "unwrap_group"]


class StateLog:
    """Logs a component's state only when it changes (no log flood on a flapping link)."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._logger = logger
        self._what = what
        self._state: str | None = None

    def set(self, state: str, detail: str = "", *, level: int = logging.INFO) -> None:
        if state != self._state:
            self._state = state
            self._logger.log(level, "%s %s%s", self._what, state, f": {detail}" if detail else "")


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Capped exponential backoff, jittered between half and all of it (attempt 0 first)."""
    ceiling = min(maximum, initial * math.pow(2, attempt))
    return random.uniform(ceiling / 2, ceiling)


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

"""A running session as ``openrtc top`` sees it: its state, turns, latency, and loop time.

The session writes its :class:`LiveState` (a session process sends it to its
worker as ``live`` lines); the worker publishes it (:mod:`openrtc.worker.top`).

Loop time and blocks are attributed by :func:`install_loop_accounting`: every
callback the event loop runs is timed, and its time is added to the session
whose context it runs in (:func:`attribute_to`). A task inherits the context it
was created in, so everything a session's tasks do is its own, livekit-agents'
included; a callback that holds the loop over :data:`BLOCK_S` is a *block* of
that session. It costs two clock reads per callback.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

__all__ = ["BLOCK_S", "LiveState", "attribute_to", "install_loop_accounting"]

#: A callback that holds the event loop this long (s) is a block: every other
#: session in the process stalls meanwhile (asyncio's own slow-callback bound).
BLOCK_S: Final = 0.1


@dataclass(slots=True)
class LiveState:
    """What a running session is doing now. Writers: its session, its loop callbacks."""

    #: The agent's state (livekit-agents' ``agent_state``), ``joining`` before it runs.
    state: str = "joining"
    #: When the call's first session started (unix s; a takeover carries it on).
    started_at: float = 0.0
    #: Caller turns in the call so far.
    turns: int = 0
    #: The last reply's latency (s): caller stopped speaking -> agent speaking, else
    #: the LLM's time to first token (a typed turn has no end of speech).
    latency_s: float | None = None
    #: Seconds its callbacks held the event loop (coroutine and process isolation).
    loop_s: float = 0.0
    #: Callbacks that held the loop over :data:`BLOCK_S`, and the longest.
    blocks: int = 0
    longest_block_s: float = 0.0
    #: Callbacks timed (what the accounting costs is in proportion).
    callbacks: int = 0

    def shown(self) -> dict[str, Any]:
        """What a session process sends its worker (the fields it cannot see itself)."""
        return {
            "state": self.state,
            "started_at": self.started_at,
            "turns": self.turns,
            "latency_s": self.latency_s,
            "blocks": self.blocks,
            "longest_block_s": self.longest_block_s,
        }

    def update(self, data: Any) -> None:
        """Take what a session process sent (:meth:`shown`); anything malformed is ignored."""
        if not isinstance(data, dict):
            return
        if isinstance(state := data.get("state"), str):
            self.state = state
        for name in ("started_at", "longest_block_s"):
            if _number(value := data.get(name)):
                setattr(self, name, float(value))
        for name in ("turns", "blocks"):
            if _number(value := data.get(name)):
                setattr(self, name, int(value))
        latency = data.get("latency_s")
        if latency is None or _number(latency):
            self.latency_s = latency


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


_current: contextvars.ContextVar[LiveState | None] = contextvars.ContextVar(
    "openrtc_live_session", default=None
)


def attribute_to(live: LiveState) -> None:
    """Count the loop time of this task, and of every task it creates from now on, to ``live``."""
    _current.set(live)


def install_loop_accounting() -> None:
    """Time every event-loop callback in this process and add it to its session (idempotent).

    Wraps ``asyncio.Handle._run``, the one place asyncio runs callbacks and task
    steps in (Python 3.8-3.13); a loop that bypasses it (uvloop) attributes nothing.
    """
    handle: Any = asyncio.Handle
    if getattr(handle._run, "_openrtc_accounting", False):
        return
    original = handle._run
    clock = time.perf_counter

    def _run(self: Any) -> None:
        live = self._context.get(_current)
        if live is None:
            return original(self)  # type: ignore[no-any-return]
        started = clock()
        # No try/finally: ``_run`` handles what its callback raises (but
        # SystemExit and KeyboardInterrupt, which end the loop anyway).
        original(self)
        spent = clock() - started
        live.loop_s += spent
        live.callbacks += 1
        if spent >= BLOCK_S:
            live.blocks += 1
            if spent > live.longest_block_s:
                live.longest_block_s = spent
        return None

    _run._openrtc_accounting = True  # type: ignore[attr-defined]
    handle._run = _run


def follow(session: Any, live: LiveState, *, started_at: float, turns_before: int) -> None:
    """Keep ``live`` up to date from the session's events (an ``AgentSession``, not started).

    ``started_at`` and ``turns_before``: the call's, from the sessions before this one.
    """
    live.started_at = started_at
    live.turns = turns_before

    def on_state(event: Any) -> None:
        live.state = str(event.new_state)

    def on_item(event: Any) -> None:
        item = event.item
        if getattr(item, "type", "") != "message":
            return
        if item.role == "user":
            live.turns += 1
        elif item.role == "assistant":
            measured = getattr(item, "metrics", None) or {}
            latency = measured.get("e2e_latency", measured.get("llm_node_ttft"))
            if _number(latency):
                live.latency_s = float(latency)

    session.on("agent_state_changed", on_state)
    session.on("conversation_item_added", on_item)

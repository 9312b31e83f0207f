"""Session observers: the ``@on_session_start`` and ``@on_session_end`` functions of agents.

An observer is the author's own code beside every call: it sees the call
start (the live ``AgentSession`` and the job's ``JobContext``) and end (the
call's :class:`~openrtc.wire.reports.CallReport`). A call may run as several
sessions (a crash takeover, a handover on a deploy); observers see the
*call*, once each:

- ``on_session_start`` runs in the call's first session only
  (:func:`starts_call`): a session that resumes a checkpoint, takes a
  handover, or knows the caller was greeted is not the call's start. It runs
  where the session runs (the session process in ``process`` isolation),
  beside the session's start, after the greeting was asked for: the caller
  never waits for it.
- ``on_session_end`` runs in the worker that wrote the call's report, and
  only when this write was the first (the report's once-marker): once per
  call, ended or given up, however many workers it passed through.

Each observer call is isolated (:func:`observe`): bounded by a timeout, an
exception or a timeout logged once with the observer's ``module:function``,
never raised. Observers of one hook run at once, started in registration order:
a slow one delays none of the others.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from openrtc.errors import AgentRegistryError

__all__ = [
    "Hook",
    "Observer",
    "Observers",
    "observe",
    "on_session_end",
    "on_session_start",
    "starts_call",
]

logger = logging.getLogger("openrtc.observers")

#: Which moment of a call an observer sees (its decorator's name without ``on_session_``).
Hook = Literal["start", "end"]
_ATTR: Final = "__openrtc_observes__"
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Observer:
    """One observer function, the hook it observes and how logs name it (``module:function``)."""

    function: Callable[..., Any]
    hook: Hook
    label: str


@dataclass(frozen=True, slots=True)
class Observers:
    """An agents directory's observers, each hook's in registration order."""

    start: tuple[Observer, ...] = ()
    end: tuple[Observer, ...] = ()


def _mark(function: _F, hook: Hook) -> _F:
    if not callable(function) or isinstance(function, type):
        raise AgentRegistryError(f"@on_session_{hook} marks a function, not {function!r}.")
    if inspect.isasyncgenfunction(function) or inspect.isgeneratorfunction(function):
        raise AgentRegistryError(
            f"@on_session_{hook} marks a plain or an async function, not a generator."
        )
    hooks = set(getattr(function, _ATTR, ()))
    hooks.add(hook)
    setattr(function, _ATTR, frozenset(hooks))
    return function


def on_session_start(function: _F) -> _F:
    """Mark ``function(session, ctx)`` to run when a call starts.

    Discovery registers it from any module of the agents directory. It is
    called once per call, in the call's first session, with the live
    ``AgentSession`` (started, its greeting asked for) and the job's
    ``JobContext`` (``ctx.job.id``, ``ctx.room``): attach listeners, tag the
    call in your own systems. A session that takes a call over (a crash, a
    handover) does not call it again.

    An ``async`` function runs on the session's event loop (it may use the
    session); a plain function runs in a thread of its own (it may block, and must
    not touch the session). Either is bounded by the worker's
    ``--observer-timeout``; an exception or a timeout is logged and the call
    goes on. It never delays the caller: it runs beside the session.

        @openrtc.on_session_start
        async def tag(session: AgentSession, ctx: JobContext) -> None:
            session.on("metrics_collected", ...)

    The function is returned unchanged.
    """
    return _mark(function, "start")


def on_session_end(function: _F) -> _F:
    """Mark ``function(report)`` to run when a call ended, with its :class:`CallReport`.

    Once per call (ended, ended by the agent, or given up), across takeovers
    and handovers: by the worker that wrote the call's report, after writing
    it. Runs in the worker process (both isolation modes), as an ``async``
    function on its loop or a plain one in a thread of its own, bounded by
    ``--observer-timeout``; an exception or a timeout is logged.

        @openrtc.on_session_end
        def bill(report: CallReport) -> None:
            billing.record(report.job_id, report.to_dict()["usage"])

    The function is returned unchanged.
    """
    return _mark(function, "end")


def marked_hooks(value: object) -> frozenset[Hook]:
    """The hooks ``value`` was marked to observe (none for anything else)."""
    if not callable(value):
        return frozenset()
    hooks = getattr(value, _ATTR, None)
    return hooks if isinstance(hooks, frozenset) else frozenset()


def starts_call(*, resumed: bool, handover: bool, greeted: bool) -> bool:
    """Whether a session is its call's first: it runs the start observers.

    ``resumed``: it has a checkpoint of the call (a takeover, a session process
    started again); ``handover``: a draining worker handed the call to it;
    ``greeted``: an earlier session greeted the caller. Any of them says the
    call started before. Known only through the checkpoint: a takeover that
    finds none (the first session died before its first checkpoint landed,
    Redis lost it, the agent keeps none) starts the call afresh, start
    observers and greeting included.
    """
    return not (resumed or handover or greeted)


async def observe(
    observers: Sequence[Observer],
    *args: Any,
    bound: float,
    failed: Callable[[Observer], None] | None = None,
    what: str = "",
) -> None:
    """Call every observer with ``args``, each isolated; until all returned or timed out.

    They run at once (started in registration order), each bounded by
    ``bound`` seconds. An exception or a timeout is logged once, naming the
    observer and ``what`` (the job), and told to ``failed``; nothing is raised.
    """
    if not observers:
        return
    async with anyio.create_task_group() as tg:
        for observer in observers:
            tg.start_soon(_call, observer, args, bound, failed, what)


async def _call(
    observer: Observer,
    args: tuple[Any, ...],
    bound: float,
    failed: Callable[[Observer], None] | None,
    what: str,
) -> None:
    name = f"observer {observer.label} (on_session_{observer.hook})"
    suffix = f" for {what}" if what else ""
    try:
        with anyio.move_on_after(bound) as scope:
            if inspect.iscoroutinefunction(observer.function):
                await observer.function(*args)
            else:
                result = await _in_a_thread(partial(observer.function, *args), observer.label)
                if inspect.isawaitable(result):
                    await result
        if not scope.cancelled_caught:
            return
        logger.warning("%s%s took more than %gs; abandoned", name, suffix, bound)
    except Exception as exc:
        logger.error("%s%s failed: %s: %s", name, suffix, type(exc).__name__, exc, exc_info=exc)
    if failed is not None:
        try:
            failed(observer)
        except Exception:
            logger.exception("counting a failed observer failed")


async def _in_a_thread(function: Callable[[], Any], label: str) -> Any:
    """``function()`` in a thread of its own, so a blocking observer does not stop the loop.

    A daemon thread, not anyio's pool: a thread cannot be cancelled, so at the
    timeout it is abandoned, left to finish on its own, and one that never
    returns must not hold the process's exit (Python joins pool threads).
    """
    done = anyio.Event()
    token = anyio.lowlevel.current_token()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:
            # sys.exit() in an observer must not stop the loop's process.
            outcome["error"] = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
        finally:
            # Abandoned (timed out, cancelled, its loop closed): nobody is waiting.
            with contextlib.suppress(Exception):
                anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=run, name=f"observer {label}", daemon=True).start()
    await done.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")

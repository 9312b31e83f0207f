"""Deliver each audio frame event to its own stream, not to every stream in the process.

livekit-rtc hands every event of the native runtime to every subscriber of
one process-wide queue: each ``rtc.AudioStream`` subscribes to all
``audio_stream_event``\\ s and drops those of other streams once its task has
been woken for them. One session per process (livekit-agents' model) has one
stream, so that costs nothing. A ``coroutine``-isolation worker runs N sessions
in one process, each with a stream of its caller's audio (20 frames a second
at livekit-agents' 50 ms frames): every frame is then queued, with a
``call_soon_threadsafe`` (a lock, and a write to the event loop's wake-up
socket), for all N streams, and N tasks wake to discard it. The work grows as
N squared, on the thread the runtime delivers events from (holding the GIL)
and on the event loop.

:func:`install` replaces the client's queue with :class:`RoutedFfiQueue`,
which knows each stream's handle (recorded as the stream is created) and
queues a frame event for its stream only. Everything else is delivered as
before: other events, subscribers without a filter (requests waiting for
their callback), and any frame event whose stream it does not know yet (the
first frames may arrive before the stream is recorded), which goes to every
stream as livekit-rtc does.

This reaches into livekit-rtc internals (``FfiClient._queue``,
``AudioStream._ffi_handle``/``_ffi_queue``); ``tests/test_ffi_routing.py``
fails if an upgrade moves them. Installed by the coroutine runner only: a
session process has one stream and must not start the native runtime before
it forks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from livekit.rtc import AudioStream
from livekit.rtc._ffi_client import FfiClient, FfiQueue
from livekit.rtc._proto import ffi_pb2 as proto_ffi
from livekit.rtc._utils import Queue

__all__ = ["RoutedFfiQueue", "install", "installed"]

logger = logging.getLogger("openrtc.ffi_routing")

_Event = proto_ffi.FfiEvent


class RoutedFfiQueue(FfiQueue[_Event]):
    """``FfiQueue`` that queues an audio frame event for its own stream only."""

    def __init__(self, previous: FfiQueue[_Event] | None = None) -> None:
        super().__init__()
        if previous is not None:
            # Subscribers made before the swap (a room already connected) stay.
            with previous._lock:
                self._subscribers = list(previous._subscribers)
        #: Stream handle -> that stream's queue.
        self._streams: dict[int, Queue[_Event]] = {}
        #: ids of the queues in ``_streams``: skipped for other streams' frames.
        self._stream_queues: set[int] = set()

    def route(self, handle: int, queue: Queue[_Event]) -> None:
        """From now on, frame events of ``handle`` go to ``queue`` only (of the streams)."""
        with self._lock:
            self._streams[handle] = queue
            self._stream_queues.add(id(queue))

    def routed(self) -> int:
        """How many streams are routed (for tests)."""
        with self._lock:
            return len(self._streams)

    def unsubscribe(self, queue: Queue[_Event]) -> None:
        with self._lock:
            super().unsubscribe(queue)
            if id(queue) in self._stream_queues:
                self._stream_queues.discard(id(queue))
                for handle in [h for h, q in self._streams.items() if q is queue]:
                    del self._streams[handle]

    def put(self, item: _Event) -> None:
        if item.WhichOneof("message") != "audio_stream_event":
            super().put(item)
            return
        with self._lock:
            target = self._streams.get(item.audio_stream_event.stream_handle)
            if target is None:
                super().put(item)  # not recorded yet: every stream, as livekit-rtc does
                return
            for queue, loop, filter_fn in self._subscribers:
                if queue is not target and id(queue) in self._stream_queues:
                    continue  # another stream: it would only drop the event
                if queue is not target and filter_fn is not None and not _accepts(filter_fn, item):
                    continue
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except Exception as exc:  # a closed loop; as FfiQueue.put
                    logger.error("error putting to queue: %s", exc)


def _accepts(filter_fn: Callable[[_Event], bool], item: _Event) -> bool:
    try:
        return filter_fn(item)
    except Exception:
        return True  # as FfiQueue.put: deliver on a filter error


_original_init: Callable[..., None] | None = None


def _record_stream(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: AudioStream, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        queue = FfiClient.instance.queue
        if isinstance(queue, RoutedFfiQueue):
            queue.route(self._ffi_handle.handle, self._ffi_queue)

    return __init__


def installed() -> bool:
    """Whether this process routes frame events (see :func:`install`)."""
    return _original_init is not None and isinstance(FfiClient.instance.queue, RoutedFfiQueue)


def install() -> None:
    """Route audio frame events to their stream in this process (idempotent).

    Call on the event loop's thread, before sessions start; starts livekit-rtc's
    native runtime if it is not running yet.
    """
    global _original_init
    client = FfiClient.instance
    if not isinstance(client._queue, RoutedFfiQueue):
        client._queue = RoutedFfiQueue(client._queue)
    if _original_init is None:
        _original_init = AudioStream.__init__
        AudioStream.__init__ = _record_stream(_original_init)  # type: ignore[method-assign]

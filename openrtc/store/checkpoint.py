"""Conversation checkpoints: what a session saves so a takeover can resume the call.

A checkpoint is one JSON document per job (key :meth:`openrtc.wire.keys.Keys.checkpoint`,
expiring with the job's record): the chat history as livekit-agents serializes
it (``ChatContext.to_dict()`` items), the active agent class, whether the
greeting was said, the session's ``userdata`` where it is plain data, and what
the agent's own ``checkpoint_state()`` hook returned.

The parts here are pure (no LiveKit, no session): encoding under a size cap
(long texts shortened first, then the oldest items dropped), scrubbing
secret-looking keys, marking tool calls that were in flight as interrupted,
and a coalescing writer that keeps only the latest state and retries it, so
a slow or failed write never holds up a session and a Redis outage only
delays checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio

from openrtc.settings import DEFAULT_CHECKPOINT_MAX_BYTES
from openrtc.store.scripts import SAVE_CHECKPOINT
from openrtc.supervision import backoff_delay
from openrtc.wire.keys import WORKERS_GROUP, Keys
from openrtc.wire.messages import ForgedEntry
from openrtc.wire.signing import SigningKeys, open_checkpoint, seal_checkpoint

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "CUT_MARKER",
    "DEFAULT_CHECKPOINT_MAX_BYTES",
    "INTERRUPTED_OUTPUT",
    "Checkpoint",
    "CheckpointStore",
    "CheckpointWriter",
    "agent_has_spoken",
    "cut_text",
    "idempotency_key",
    "mark_interrupted",
    "plain_data",
    "shorten_history",
]

logger = logging.getLogger("openrtc.checkpoint")

VERSION: Final = 1
#: What the model is shown for a tool call that was running when the session died.
INTERRUPTED_OUTPUT: Final = (
    "interrupted: the session restarted while this call was running, so its outcome is "
    "unknown. Do not assume it succeeded or failed; tell the caller and ask before retrying."
)
#: Keys never kept in ``userdata`` or agent state, at any depth.
SECRET_KEY: Final = re.compile(r"secret|token|password|passwd|api_?key|credential", re.I)
#: What replaces the middle of a text cut to fit the checkpoint: the model
#: resumed from it sees that something was there, and how much.
CUT_MARKER: Final = "[... {cut} characters cut here to fit the call's checkpoint ...]"
#: A text is never cut shorter than this share of the cap (and never below
#: :data:`MIN_CUT_BYTES`, marker included): only texts that are large for
#: the cap are cut; a long call of ordinary turns loses its oldest turns
#: whole rather than every turn's middle.
CUT_FLOOR_SHARE: Final = 16
MIN_CUT_BYTES: Final = 512
#: Longest one write may take before it counts as failed (and is retried).
WRITE_TIMEOUT: Final = 2.0


def plain_data(value: Any) -> dict[str, Any] | None:
    """``value`` as a JSON-ready dict without secret-looking keys; ``None`` if it is not data.

    Accepts dicts, dataclass instances and pydantic models (anything with
    ``model_dump``); anything else, or anything that does not survive a JSON
    round trip, is left out rather than guessed at.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            value = dataclasses.asdict(value)
        except Exception:
            return None
    elif hasattr(value, "model_dump") and not isinstance(value, type):
        try:
            value = value.model_dump(mode="json")
        except Exception:
            return None
    if not isinstance(value, Mapping):
        return None
    try:
        data = json.loads(json.dumps(_scrub(value)))
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _scrub(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def agent_has_spoken(items: list[dict[str, Any]]) -> bool:
    """The history holds something the agent said: its caller was greeted.

    A greeting's words enter the history when its playout ends, a loop turn
    before its speech handle is done; a checkpoint taken at that turn boundary
    (a handover's) must not let the next session greet again.
    """
    return any(i.get("type") == "message" and i.get("role") == "assistant" for i in items)


def mark_interrupted(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history with an error output after every tool call that has none.

    A call without output was running when the session died: the model is
    told so instead of seeing a dangling call it might simply repeat (a
    booking made twice is worse than a dropped call).
    """
    answered = {i.get("call_id") for i in items if i.get("type") == "function_call_output"}
    out: list[dict[str, Any]] = []
    for item in items:
        out.append(item)
        if item.get("type") == "function_call" and item.get("call_id") not in answered:
            output: dict[str, Any] = {
                "type": "function_call_output",
                "call_id": item.get("call_id", ""),
                "name": item.get("name", ""),
                "output": INTERRUPTED_OUTPUT,
                "is_error": True,
                "reply_required": False,
            }
            if isinstance(item.get("created_at"), int | float):
                output["created_at"] = item["created_at"] + 1e-6
            out.append(output)
    return out


#: One encoder for every size taken: ``json.dumps`` with separators builds a new one each call.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"))


def _size(value: Any) -> int:
    """Bytes ``value`` takes in a checkpoint document."""
    return len(_COMPACT.encode(value))


def _text_slots(
    items: list[dict[str, Any]], kind: str, floor: int
) -> list[tuple[int, int | None, int]]:
    """``(item index, content index or None, encoded size)`` of each text ``kind`` names.

    ``tool``: the output of each tool call; ``message``: each text part of
    each user or assistant message. Texts too short to ever be cut (at most
    ``floor`` bytes, whatever they hold) are left out unmeasured.
    """
    slots: list[tuple[int, int | None, int]] = []

    def add(n: int, part: int | None, text: object) -> None:
        # A character takes at most 12 bytes in JSON (a surrogate pair, escaped).
        if isinstance(text, str) and len(text) * 12 + 2 > floor:
            slots.append((n, part, _size(text)))

    for n, item in enumerate(items):
        if kind == "tool" and item.get("type") == "function_call_output":
            add(n, None, item.get("output"))
        elif kind == "message" and item.get("type") == "message":
            content = item.get("content")
            if isinstance(content, list):
                for part, text in enumerate(content):
                    add(n, part, text)
    return slots


def _cap_for(sizes: list[int], excess: int, floor: int) -> int:
    """The largest cap (at least ``floor``) cutting ``excess`` bytes off ``sizes``.

    Every text over the cap is cut to it and the others are kept whole, so
    the longest texts give the most; if even cutting all to the floor is not
    enough, the floor (and the oldest turns go after).
    """
    low, high = floor, max(sizes, default=floor)
    if sum(max(0, s - low) for s in sizes) < excess:
        return low
    while low < high:
        middle = (low + high + 1) // 2
        if sum(max(0, s - middle) for s in sizes) >= excess:
            low = middle
        else:
            high = middle - 1
    return low


def cut_text(text: str, limit: int) -> str:
    """``text`` with its middle replaced by :data:`CUT_MARKER`, encoding to at most ``limit``.

    The head (two thirds) and the tail are kept: a pasted document's
    opening and its last lines say most about it. ``text`` itself if it
    already fits.
    """
    if _size(text) <= limit:
        return text
    keep = max(0, limit - _size(CUT_MARKER.format(cut=len(text))))
    while True:
        head, tail = keep * 2 // 3, keep // 3
        cut = len(text) - head - tail
        out = text[:head] + CUT_MARKER.format(cut=cut) + (text[len(text) - tail :] if tail else "")
        size = _size(out)
        if size <= limit or keep == 0:
            return out
        # Characters that need escaping take more than one byte each.
        keep = max(0, min(keep - 1, keep * limit // size))


def shorten_history(
    items: list[dict[str, Any]], budget: int, floor: int = MIN_CUT_BYTES
) -> list[dict[str, Any]]:
    """``items`` with long texts cut (tool outputs first) until they take ``budget`` bytes.

    Pure: the items given are not changed, cut ones are copies. No text is
    cut below ``floor`` bytes: what is still over the budget then is for the
    caller to drop, oldest first.
    """
    return _shorten(items, [_size(i) + 1 for i in items], budget, floor)[0]


def _shorten(
    items: list[dict[str, Any]], sizes: list[int], budget: int, floor: int
) -> tuple[list[dict[str, Any]], list[int]]:
    """:func:`shorten_history`, given each item's size (plus its comma); the sizes after."""
    total = sum(sizes)
    if total <= budget:
        return items, sizes
    out, sizes = list(items), list(sizes)
    for kind in ("tool", "message"):
        excess = total - budget
        if excess <= 0:
            break
        slots = _text_slots(out, kind, floor)
        cap = _cap_for([size for _, _, size in slots], excess, floor)
        for n, part, size in slots:
            if size <= cap:
                continue
            item = dict(out[n])
            if part is None:
                item["output"] = cut_text(item["output"], cap)
            else:
                content = list(item["content"])
                content[part] = cut_text(content[part], cap)
                item["content"] = content
            size = _size(item) + 1
            total += size - sizes[n]
            out[n], sizes[n] = item, size
    return out, sizes


@dataclass
class Checkpoint:
    """One job's conversation state. ``agent_class`` is ``module:qualname``."""

    agent_class: str = ""
    greeted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    userdata: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    #: History items dropped so far to stay under the cap.
    dropped: int = 0
    #: The call's running totals (:class:`openrtc.wire.reports.CallTally` as a
    #: dict): usage, turns, takeovers, workers, since the call's first session.
    #: ``None`` in checkpoints written before reports existed.
    call: dict[str, Any] | None = None

    def encode(self, max_bytes: int) -> bytes | None:
        """JSON of at most ``max_bytes``: long items shortened first, then the oldest dropped.

        What goes, in order, until the document fits: the middle of long tool
        outputs, then the middle of long user and assistant texts (each cut
        to the same length, never below a sixteenth of the cap, with
        :data:`CUT_MARKER` where the text was), then whole items from the
        oldest end, then any that no longer make sense at the head (a tool
        output whose call was dropped, a handoff marker), so the history
        still starts with a message. One pasted document must not cost the
        whole conversation before it. If even no history fits, ``userdata``
        and ``state`` go too; ``None`` if nothing fits at all.
        """
        # userdata and state are kept unless they alone are over the cap.
        extras = len(self._dump([], self.dropped, True)) <= max_bytes
        budget = max_bytes - len(self._dump([], self.dropped, extras))
        # Start from an estimate, not from the top: a long call's history is
        # re-encoded on every turn and should not be serialized n times.
        floor = max(MIN_CUT_BYTES, max_bytes // CUT_FLOOR_SHARE)
        sizes = [_size(i) + 1 for i in self.history]
        history, sizes = _shorten(self.history, sizes, budget, floor)
        total = max_bytes - budget + sum(sizes)
        start = 0
        while start < len(history) and total > max_bytes:
            total -= sizes[start]
            start += 1
        while True:
            while start < len(history) and history[start].get("type") != "message":
                start += 1
            data = self._dump(history[start:], self.dropped + start, extras)
            if len(data) <= max_bytes:
                return data
            if start >= len(history):
                return None
            start += 1

    def _dump(self, history: list[dict[str, Any]], dropped: int, extras: bool) -> bytes:
        doc = {
            "v": VERSION,
            "agent_class": self.agent_class,
            "greeted": self.greeted,
            "dropped": dropped,
            "userdata": self.userdata if extras else None,
            "state": self.state if extras else None,
            "history": history,
        }
        if self.call is not None:
            # Never dropped: small (bounded samples), and the report of a call
            # taken over needs it.
            doc["call"] = self.call
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | str) -> Checkpoint | None:
        """The checkpoint in ``data``; ``None`` (and a warning) if it is not one of ours."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if doc.get("v") != VERSION:
                raise ValueError(f"unknown checkpoint version {doc.get('v')!r}")
            history = doc.get("history") or []
            if not isinstance(history, list) or not all(isinstance(i, dict) for i in history):
                raise ValueError("history is not a list of items")
            userdata, state = doc.get("userdata"), doc.get("state")
            call = doc.get("call")
            return cls(
                agent_class=str(doc.get("agent_class") or ""),
                greeted=bool(doc.get("greeted")),
                history=history,
                userdata=userdata if isinstance(userdata, dict) else None,
                state=state if isinstance(state, dict) else None,
                dropped=int(doc.get("dropped") or 0),
                call=call if isinstance(call, dict) else None,
            )
        except (TypeError, ValueError) as exc:
            logger.warning("ignoring an unreadable checkpoint: %s", exc)
            return None


class CheckpointStore:
    """Checkpoints in Redis, one key per job, expiring with the job's record.

    With ``signing``, each is stored signed for its agent and job
    (:func:`openrtc.wire.signing.seal_checkpoint`), and one that does not verify is
    not loaded: the takeover starts afresh rather than from injected history.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        agent: str,
        ttl: float,
        *,
        signing: SigningKeys | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._agent = agent
        self._ttl_ms = max(1000, int(ttl * 1000))
        self._save = redis.register_script(SAVE_CHECKPOINT)
        self._signing = signing

    async def load(self, job_id: str) -> bytes | None:
        """The job's checkpoint; ``None`` when there is none, or it is forged (logged)."""
        stored = await self._redis.get(self._keys.checkpoint(self._agent, job_id))
        if stored is None:
            return None
        raw = stored.encode() if isinstance(stored, str) else stored
        try:
            return open_checkpoint(self._signing, self._agent, job_id, raw)
        except ForgedEntry as exc:
            logger.warning(
                "job %s: refusing a forged checkpoint (%s); starting afresh", job_id, exc
            )
            return None

    async def save(self, job_id: str, data: bytes, *, entry_id: str, consumer: str) -> bool:
        """Write ``data`` if the job's entry ``entry_id`` is still ``consumer``'s; else False."""
        if self._signing is not None:
            data = seal_checkpoint(self._signing, self._agent, job_id, data)
        written = await self._save(
            keys=[self._keys.checkpoint(self._agent, job_id), self._keys.jobs(self._agent)],
            args=[data, self._ttl_ms, WORKERS_GROUP, entry_id, consumer],
        )
        return bool(written)

    async def delete(self, job_id: str) -> None:
        await self._redis.delete(self._keys.checkpoint(self._agent, job_id))


class CheckpointWriter:
    """Writes the latest offered checkpoint; older unwritten ones are simply replaced.

    :meth:`offer` never blocks (it is called from the session's event
    handlers); :meth:`run` does the writing in its own task. A write that
    fails or takes longer than :data:`WRITE_TIMEOUT` is retried with backoff
    until it succeeds or a newer state replaces it, so a Redis outage delays
    checkpoints and nothing else.
    """

    def __init__(
        self,
        save: Callable[[bytes], Awaitable[bool | None]],
        *,
        label: str = "",
        allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self._save = save
        self._label = label
        self._allowed = allowed
        self._pending: bytes | None = None
        #: The last checkpoint written: Redis may lose it (see :meth:`rewrite`).
        self._last: bytes | None = None
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self.written = 0
        self.failures = 0
        self.refused = 0

    def offer(self, data: bytes) -> None:
        """Replace what is to be written next."""
        self._pending = data
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def rewrite(self) -> None:
        """Write the last checkpoint again (unless a newer one is on its way).

        For a Redis that lost it with everything else (a restart without
        persistence): the session writes only on change, and a crash before
        its next turn would leave its taker nothing to resume from.
        """
        if self._pending is None and self._last is not None:
            self.offer(self._last)

    async def run(self) -> None:
        """Write until cancelled."""
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            data, self._pending = self._pending, None
            if data is None or not self._allowed():
                self._idle.set()
                continue
            try:
                with anyio.fail_after(WRITE_TIMEOUT):
                    written = await self._save(data)
            except Exception as exc:
                self.failures += 1
                if attempt == 0:
                    logger.warning("%s: checkpoint not written (%s); retrying", self._label, exc)
                written = None
            else:
                if written is False:
                    # The entry is not ours in Redis: another worker has the
                    # call (then ``allowed`` turns false and this stops), or a
                    # Redis that lost it gets it back from us (write-back).
                    self.refused += 1
                    if attempt == 0:
                        logger.warning("%s: checkpoint refused: not our entry now", self._label)
                else:
                    if attempt:
                        logger.info("%s: checkpoints written again", self._label)
                    attempt = 0
                    self.written += 1
                    self._last = data
                    if self._pending is None:
                        self._idle.set()
                    continue
            if self._pending is None:
                self._pending = data  # nothing newer: this one is still the latest
            await anyio.sleep(backoff_delay(attempt, 0.2, 2.0))
            attempt += 1
            self._wake.set()

    async def flush(self) -> None:
        """Until the latest offer is written (needs :meth:`run`; bound it with a timeout)."""
        await self._idle.wait()


def idempotency_key(ctx: Any) -> str:
    """A stable key for one tool call of one job: ``<job id>:<call id>``.

    Pass the tool's ``RunContext``. A resumed session never runs a call whose
    result it has again, and shows a call that was cut off as interrupted; a
    tool with side effects (a booking, a payment) sends this key to its
    backend so a call that did complete before a crash is not done twice.
    """
    from livekit.agents import get_job_context

    return f"{get_job_context().job.id}:{ctx.function_call.call_id}"

"""The pure parts of checkpoints: size cap, what is kept, interrupted calls, the writer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from livekit.agents import llm

from openrtc.checkpoint import (
    INTERRUPTED_OUTPUT,
    Checkpoint,
    CheckpointWriter,
    mark_interrupted,
    plain_data,
)
from openrtc.offline import offline_reply


def message(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [text], "id": f"item_{text[:8]}"}


def call(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "book", "arguments": "{}"}


def output(call_id: str) -> dict[str, Any]:
    return {
        "type": "function_call_output",
        "call_id": call_id,
        "name": "book",
        "output": "ok",
        "is_error": False,
    }


def turns(n: int, size: int = 100) -> list[dict[str, Any]]:
    return [message("user" if i % 2 else "assistant", f"{i:04d}" + "x" * size) for i in range(n)]


@pytest.mark.parametrize(
    ("history", "cap"),
    [
        (turns(0), 300),
        (turns(5), 10_000),
        (turns(50), 1_000),
        (turns(200, 1000), 64 * 1024),
        ([call("c1"), output("c1"), *turns(20)], 1_500),
        ([*turns(3), call("c1"), output("c1"), *turns(3)], 700),
    ],
)
def test_a_checkpoint_never_exceeds_its_cap_and_drops_the_oldest_first(
    history: list[dict[str, Any]], cap: int
) -> None:
    data = Checkpoint(agent_class="m:A", greeted=True, history=history).encode(cap)
    assert data is not None
    assert len(data) <= cap
    kept = Checkpoint.decode(data)
    assert kept is not None
    assert kept.greeted
    assert kept.agent_class == "m:A"
    # A suffix of the history: the newest turns survive, oldest went first.
    assert kept.history == history[len(history) - len(kept.history) :]
    assert kept.dropped == len(history) - len(kept.history)
    # What is left starts with a message: no output without its call.
    assert not kept.history or kept.history[0]["type"] == "message"


def test_userdata_too_big_for_the_cap_goes_and_the_history_stays() -> None:
    big = {"notes": "y" * 5000}
    data = Checkpoint(history=turns(3), userdata=big, state=big).encode(2000)
    assert data is not None
    assert len(data) <= 2000
    kept = Checkpoint.decode(data)
    assert kept is not None
    assert kept.userdata is None
    assert kept.state is None
    assert len(kept.history) == 3


def test_nothing_fits_in_a_tiny_cap() -> None:
    assert Checkpoint(history=turns(3)).encode(20) is None


@dataclass
class Booking:
    name: str
    party: int
    api_key: str = "sk-live-123"


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"name": "Ada", "token": "t", "nested": {"password": "p", "x": 1}},
            {"name": "Ada", "nested": {"x": 1}},
        ),
        (Booking("Ada", 4), {"name": "Ada", "party": 4}),
        ({"when": Opaque()}, None),
        (Opaque(), None),
        (None, None),
        ([1, 2], None),
    ],
)
def test_userdata_is_kept_as_plain_data_without_secrets(value: object, expected: object) -> None:
    assert plain_data(value) == expected


def test_a_tool_call_in_flight_is_shown_as_interrupted_and_answered_ones_are_left() -> None:
    history = [message("user", "book it"), call("done"), output("done"), call("cut")]
    marked = mark_interrupted(history)
    assert marked[:4] == history
    assert marked[4]["call_id"] == "cut"
    assert marked[4]["is_error"] is True
    assert marked[4]["output"] == INTERRUPTED_OUTPUT
    # livekit-agents reads it back: the model sees the call and its outcome.
    ctx = llm.ChatContext.from_dict({"items": marked})
    assert [i.type for i in ctx.items][-2:] == ["function_call", "function_call_output"]


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[]", b'{"v": 99}', b'{"v": 1, "history": [1]}']
)
def test_an_unreadable_checkpoint_is_ignored(data: bytes) -> None:
    assert Checkpoint.decode(data) is None


def chat(*items: tuple[str, str]) -> llm.ChatContext:
    ctx = llm.ChatContext.empty()
    for role, text in items:
        ctx.add_message(role=role, content=text)  # type: ignore[arg-type]
    return ctx


@pytest.mark.parametrize(
    ("ctx", "tools", "reply"),
    [
        (chat(), [], "I am listening."),
        (chat(("user", "hello")), [], "Noted: hello"),
        (
            chat(
                ("assistant", "Hi"), ("user", "my name is Ada"), ("user", "What did I say first?")
            ),
            [],
            "You first said: my name is Ada",
        ),
        (chat(("user", "book a table for 4")), [], "Noted: book a table for 4"),
        (
            chat(("user", "please book a table for 4")),
            ["book_table"],
            {"name": "book_table", "arguments": {"party_size": 4}},
        ),
    ],
)
def test_the_offline_llm_answers_from_the_history(
    ctx: llm.ChatContext, tools: list[str], reply: object
) -> None:
    assert offline_reply(ctx, tools) == reply


@pytest.mark.anyio
async def test_the_writer_keeps_the_latest_and_retries_until_it_is_written() -> None:
    written: list[bytes] = []
    fail = True

    async def save(data: bytes) -> None:
        if fail:
            raise ConnectionError("Redis is down")
        written.append(data)

    writer = CheckpointWriter(save, label="test")
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        for n in range(5):
            writer.offer(json.dumps(n).encode())  # never blocks, whatever Redis does
        await anyio.sleep(0.5)
        assert written == []
        assert writer.failures >= 1
        fail = False
        with anyio.fail_after(10):
            await writer.flush()
        tg.cancel_scope.cancel()
    # Coalesced: only the latest state was worth writing.
    assert written == [b"4"]


@pytest.mark.anyio
async def test_a_refused_checkpoint_is_retried_only_while_the_call_is_ours() -> None:
    tries: list[bytes] = []
    ours = True

    async def save(data: bytes) -> bool:
        tries.append(data)
        return False  # the entry is not ours in Redis

    writer = CheckpointWriter(save, label="test", allowed=lambda: ours)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        writer.offer(b"1")
        with anyio.fail_after(5):
            while len(tries) < 2:
                await anyio.sleep(0.05)
        ours = False  # the lease loop found another worker holds it
        with anyio.fail_after(5):
            await writer.flush()
        settled = len(tries)
        await anyio.sleep(1.0)
        tg.cancel_scope.cancel()
    assert len(tries) == settled  # no more tries once it is not ours
    assert writer.refused == settled
    assert writer.written == 0

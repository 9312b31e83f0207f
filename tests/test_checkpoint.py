"""The pure parts of checkpoints: size cap, what is kept, interrupted calls, the writer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from livekit.agents import Agent, AgentSession, llm

from openrtc.agents.offline import offline_reply
from openrtc.session.session import _Checkpointing
from openrtc.store.checkpoint import (
    INTERRUPTED_OUTPUT,
    Checkpoint,
    CheckpointWriter,
    cut_text,
    mark_interrupted,
    plain_data,
    shorten_history,
)


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


def said(item_id: str, role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [text], "id": item_id}


def tool_output(call_id: str, text: str) -> dict[str, Any]:
    return {**output(call_id), "output": text}


def text_of(item: dict[str, Any]) -> str:
    return str(item["output"] if item["type"] == "function_call_output" else item["content"][0])


HUGE = "paste " + "z" * 70_000
#: The issue's call: two small turns, a pasted document (and its echo), one more.
PASTED = [
    said("a1", "user", "remember apple"),
    said("a2", "assistant", "Noted: remember apple"),
    said("p1", "user", "remember pear"),
    said("p2", "assistant", "Noted: remember pear"),
    said("h1", "user", HUGE),
    said("h2", "assistant", f"Noted: {HUGE}"),
    said("u1", "user", "remember plum"),
    said("u2", "assistant", "Noted: remember plum"),
]
CUT = re.compile(
    r"(.*)\[\.\.\. (\d+) characters cut here to fit the call's checkpoint \.\.\.\](.*)", re.S
)


@pytest.mark.parametrize(
    ("history", "cap", "cut", "dropped"),
    [
        pytest.param(turns(5), 10_000, set(), 0, id="fits: nothing changes"),
        pytest.param(PASTED, 64 * 1024, {"h1", "h2"}, 0, id="a pasted document is shortened"),
        pytest.param(
            [said("q", "user", "y" * 30_000), call("c1"), tool_output("c1", "o" * 60_000)],
            64 * 1024,
            {"c1"},
            0,
            id="a tool output is cut before a long text",
        ),
        pytest.param(
            [said("q", "user", "y" * 50_000), call("c1"), tool_output("c1", "o" * 50_000)],
            32 * 1024,
            {"q", "c1"},
            0,
            id="texts are cut once tool outputs are at their floor",
        ),
        pytest.param(turns(200, 1000), 64 * 1024, set(), 140, id="ordinary turns go whole"),
        pytest.param(
            [said(f"t{i:02d}", "user", f"{i:02d}" + "w" * 40_000) for i in range(30)],
            64 * 1024,
            {f"t{i:02d}" for i in range(15, 30)},
            15,
            id="texts at their floor, then the oldest go",
        ),
        pytest.param(
            [said("e", "user", "\u00e9" * 40_000 + "\U0001f600" * 20_000), *turns(4)],
            16 * 1024,
            {"e"},
            0,
            id="escaped characters count as their bytes",
        ),
    ],
)
def test_long_items_are_shortened_with_a_marker_before_turns_are_dropped(
    history: list[dict[str, Any]], cap: int, cut: set[str], dropped: int
) -> None:
    data = Checkpoint(history=history).encode(cap)
    assert data is not None
    assert len(data) <= cap
    kept = Checkpoint.decode(data)
    assert kept is not None
    assert kept.dropped == dropped
    # The newest items, in order; each whole, or cut in its middle with a marker.
    originals = history[dropped:]
    assert len(kept.history) == len(originals)
    shortened = set()
    for original, item in zip(originals, kept.history, strict=True):
        if item == original:
            continue
        name = str(original.get("id") or original.get("call_id"))
        shortened.add(name)
        match = CUT.fullmatch(text_of(item))
        assert match is not None, name
        head, count, tail = match.group(1), int(match.group(2)), match.group(3)
        whole = text_of(original)
        assert whole.startswith(head)
        assert whole.endswith(tail)
        assert len(head) + count + len(tail) == len(whole)
        assert len(head) > 0
    assert shortened == cut
    # livekit-agents reads it back.
    llm.ChatContext.from_dict({"items": kept.history})


def test_after_a_pasted_document_the_agent_still_knows_what_was_said_first() -> None:
    data = Checkpoint(history=PASTED).encode(64 * 1024)
    assert data is not None
    kept = Checkpoint.decode(data)
    assert kept is not None
    ctx = llm.ChatContext.from_dict({"items": kept.history})
    ctx.add_message(role="user", content="what did I say first?")
    assert offline_reply(ctx, []) == "You first said: remember apple"


def test_shortening_leaves_the_history_it_was_given_alone() -> None:
    before = json.dumps(PASTED)
    shorter = shorten_history(PASTED, 10_000)
    assert json.dumps(PASTED) == before
    assert shorter[0] is PASTED[0]  # kept items are not copied


@pytest.mark.parametrize("limit", [600, 1_000, 5_000])
@pytest.mark.parametrize("text", ["x" * 20_000, '"\\' * 5_000, "\u00e9\U0001f600" * 4_000])
def test_a_cut_text_encodes_within_its_limit(text: str, limit: int) -> None:
    out = cut_text(text, limit)
    assert len(json.dumps(out)) <= limit
    assert CUT.fullmatch(out)


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


@pytest.mark.anyio  # AgentSession() wants a running loop
@pytest.mark.parametrize(
    ("said", "greeted"),
    [
        ([], False),
        ([("user", "hello?")], False),
        ([("assistant", "Welcome to the line.")], True),
        ([("user", "hello?"), ("assistant", "Welcome to the line.")], True),
    ],
)
async def test_a_checkpoint_is_greeted_once_the_agent_has_spoken(
    said: list[tuple[str, str]], greeted: bool
) -> None:
    """The state at the greeting's end: its words are in the history and the
    agent listens, but the greeting's speech handle is not done yet (its done
    callback runs a loop turn later). A handover's checkpoint taken then must
    say the caller was greeted, or the peer greets again (seen in the chaos
    ledger: a deploy right as a call began, the greeting heard twice)."""
    session: AgentSession[Any] = AgentSession()
    session.update_agent(Agent(instructions="Offline lobby."))
    for role, text in said:
        session.history.add_message(role=role, content=text)  # type: ignore[arg-type]
    offered: list[bytes] = []
    checkpointing = _Checkpointing(session, offered.append, 64 * 1024)
    checkpointing.offer_now()
    (data,) = offered
    saved = Checkpoint.decode(data)
    assert saved is not None
    assert saved.greeted is greeted

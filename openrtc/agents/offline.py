"""Offline providers for tests and the demo: a rule-based LLM and the tone TTS.

Neither needs a cloud key nor a model download. :class:`OfflineLLM` answers
from the chat history it is given, deterministically, so a test can check
that a conversation survived a takeover: asked "what did I say first?", it
answers with the first user message of the history. It reports usage: a
token is a word (of every text of the chat it is shown, and of its reply),
so call reports have counts to sum. It can call one tool:
a user message like "book a table for 4" becomes a ``book_table`` call (with
``party_size``) when the agent has a tool of that name. Callers type with
livekit-agents' room text input (topic ``lk.chat``) and read the agent's
replies from its transcription streams (topic ``lk.transcription``).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from livekit.agents import APIConnectOptions, llm
from livekit.agents.llm.tool_context import get_fnc_tool_names
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr

from openrtc.agents.tone_tts import ToneTTS

__all__ = ["FIRST_QUESTION", "OfflineLLM", "ToneTTS", "offline_reply"]

#: The question answered from the history (case-insensitive, anywhere in the message).
FIRST_QUESTION = "what did i say first"
_BOOKING = re.compile(r"\bbook\b.*\btable\b.*?\bfor\s+(\d+)", re.IGNORECASE)


def _user_texts(chat_ctx: llm.ChatContext) -> list[str]:
    return [
        item.text_content or ""
        for item in chat_ctx.items
        if item.type == "message" and item.role == "user"
    ]


def offline_reply(chat_ctx: llm.ChatContext, tool_names: list[str]) -> str | dict[str, Any]:
    """What :class:`OfflineLLM` says next: text, or a tool call (``{"name", "arguments"}``)."""
    items = chat_ctx.items
    if items and items[-1].type == "function_call_output":
        out = items[-1]
        return f"Done: {out.output}" if not out.is_error else f"That did not work: {out.output}"
    said = _user_texts(chat_ctx)
    if not said:
        return "I am listening."
    last = said[-1].strip()
    if FIRST_QUESTION in last.lower():
        return f"You first said: {said[0].strip()}"
    booking = _BOOKING.search(last)
    if booking and "book_table" in tool_names:
        return {"name": "book_table", "arguments": {"party_size": int(booking.group(1))}}
    return f"Noted: {last}"


class OfflineLLM(llm.LLM[Any]):
    """A deterministic ``livekit.agents`` LLM for tests and demos (see :func:`offline_reply`)."""

    @property
    def model(self) -> str:
        return "rules"

    @property
    def provider(self) -> str:
        return "openrtc"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        return _OfflineStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _OfflineStream(llm.LLMStream):
    async def _run(self) -> None:
        reply = offline_reply(self.chat_ctx, get_fnc_tool_names(self.tools))
        request = uuid.uuid4().hex
        if isinstance(reply, dict):
            call = llm.FunctionToolCall(
                name=reply["name"],
                arguments=json.dumps(reply["arguments"]),
                call_id=f"call_{uuid.uuid4().hex[:12]}",
            )
            delta = llm.ChoiceDelta(role="assistant", tool_calls=[call])
        else:
            delta = llm.ChoiceDelta(role="assistant", content=reply)
        self._event_ch.send_nowait(llm.ChatChunk(id=request, delta=delta))
        # Deterministic usage, so calls run on it have token counts to report:
        # a "token" is a word, of every text it was shown and of its reply.
        prompt = sum(_words(item) for item in self.chat_ctx.items)
        completion = len(str(reply if isinstance(reply, str) else json.dumps(reply)).split())
        usage = llm.CompletionUsage(
            completion_tokens=completion, prompt_tokens=prompt, total_tokens=prompt + completion
        )
        self._event_ch.send_nowait(llm.ChatChunk(id=request, usage=usage))


def _words(item: Any) -> int:
    """Words of one chat item as :class:`OfflineLLM` counts them as prompt tokens."""
    if item.type == "message":
        return len((item.text_content or "").split())
    if item.type == "function_call":
        return len(item.arguments.split()) + 1
    if item.type == "function_call_output":
        return len(str(item.output).split())
    return 0

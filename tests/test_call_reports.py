"""One report per call, whatever happened to it: real LiveKit, real Redis, a texting caller.

A call runs on three workers in turn (a SIGKILL takeover, then a SIGTERM
handover); the report the last one writes holds the usage of all three
sessions. The offline LLM counts words as tokens, so the sums are known.
"""

from __future__ import annotations

import json
import signal
from contextlib import AsyncExitStack

import pytest
from redis.asyncio import Redis

from openrtc.agents.registry import redact_numbers
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.store.checkpoint import Checkpoint
from openrtc.wire.keys import Keys
from openrtc.wire.reports import REPORT_FIELD, CallReport, CallTally, percentile
from tests.support.conversation import GREETING, THREE_THINGS
from tests.support.processes import LEASE, worker_process_killed_on_exit
from tests.support.stack import delete_room, eventually, unique, working
from tests.test_resume import agent_listening, greeted_call

pytestmark = pytest.mark.anyio


async def tally_of(redis: Redis, key: str) -> CallTally:
    data = await redis.get(key)
    saved = Checkpoint.decode(data) if data else None
    return CallTally.from_dict(saved.call if saved else None)


async def test_a_call_taken_over_and_handed_over_leaves_one_report_with_all_its_usage(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """Done when (issue 20): three turns, a SIGKILL takeover, a SIGTERM handover:
    exactly one report, the usage of all sessions summed, ``takeovers == 2``."""
    ns, agent = unique("ns"), "dental"
    keys = Keys(ns)
    replies = [f"Noted: {thing}" for thing in THREE_THINGS]
    with (
        worker_process_killed_on_exit(livekit_server, redis_server.url, ns) as first,
        worker_process_killed_on_exit(livekit_server, redis_server.url, ns) as second,
    ):
        async with (
            greeted_call(livekit_server, redis, ns, agent, "dental-report", GREETING) as call,
            AsyncExitStack() as stack,
        ):
            caller, transcript, key = call.caller, call.transcript, call.key
            await transcript.ask(THREE_THINGS[0], replies[0])

            async def turns_saved(n: int) -> bool:
                tally = await tally_of(redis, key)
                completion = sum(m.completion_tokens for m in tally.llm.values())
                # The turn and its usage (its metrics come after its message).
                return tally.turns == n and completion == sum(len(r.split()) for r in replies[:n])

            await eventually(lambda: turns_saved(1), "turn 1 and its usage checkpointed")
            # `second` is up (it was started first); the first worker dies.
            first.send_signal(signal.SIGKILL)
            taker = await caller.wait_agent(within=30, other_than=call.original.sid)
            await agent_listening(caller, taker.identity)
            await transcript.ask(THREE_THINGS[1], replies[1])
            await eventually(lambda: turns_saved(2), "turn 2 checkpointed on the taker")
            assert (await tally_of(redis, key)).takeovers == 1

            last = await stack.enter_async_context(
                working(livekit_server, redis_server.url, ns, agent, lease=LEASE)
            )
            second.send_signal(signal.SIGTERM)
            handed = await caller.wait_agent(within=30, other_than=taker.sid)
            await agent_listening(caller, handed.identity)
            assert last.running_jobs == [call.message.job_id]
            await transcript.ask(THREE_THINGS[2], replies[2])
            assert second.wait(30) == 0
            assert await redis.xlen(keys.reports) == 0  # nobody reported a call still on

            # The caller hangs up: the room goes, the call ends on `last`.
            await delete_room(livekit_server, call.message.room)

            async def reported() -> bool:
                return await redis.xlen(keys.reports) > 0

            await eventually(reported, "the call's report", within=30)
            await eventually(lambda: not last.running_jobs, "the session over")
            entries = await redis.xrange(keys.reports)
            assert len(entries) == 1, entries
            report = json.loads(entries[0][1][REPORT_FIELD])

    assert report["job_id"] == call.message.job_id
    assert report["agent"] == "dental"
    assert report["tenant"] == ""
    assert report["room"] == call.message.room
    assert report["outcome"] == "ended", report
    assert report["turns"] == 3
    assert report["takeovers"] == 2
    assert len(report["workers"]) == 3
    assert report["workers"][2] == last.settings.worker_id
    assert len(set(report["workers"])) == 3
    usage = report["usage"]
    assert usage["llm_completion_tokens"] == sum(len(r.split()) for r in replies)
    assert usage["llm_by_model"]["rules"]["completion_tokens"] == usage["llm_completion_tokens"]
    # Each turn's prompt is the whole conversation before its reply: more every turn.
    assert usage["llm_prompt_tokens"] >= sum(len(t.split()) for t in THREE_THINGS) * 2
    # The greeting (session 1) and a reply on each session were spoken (ToneTTS's
    # characters, as livekit-agents counts them: a character less here and there).
    spoken = len(GREETING) + sum(len(r) for r in replies)
    assert spoken - 4 <= usage["tts_characters"] <= spoken
    assert report["duration_s"] > 0
    assert report["latency_ms"]["llm_ttft_p50"] is not None
    said = [line["text"] for line in report["transcript"] if line["role"] == "user"]
    assert said == THREE_THINGS


@pytest.mark.unit
@pytest.mark.parametrize(
    ("samples", "share", "expected"),
    [
        ([], 0.5, None),
        ([3.0], 0.95, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
        ([float(i) for i in range(1, 101)], 0.95, 95.0),
    ],
)
def test_percentile(samples: list[float], share: float, expected: float | None) -> None:
    assert percentile(samples, share) == expected


@pytest.mark.unit
def test_tallies_add_up_and_survive_junk() -> None:
    a = CallTally(started_at=10.0, turns=1, takeovers=1, workers=["w1", "w2"])
    a.add_llm("m", 10, 2)
    b = CallTally(turns=2, tts_characters=7, stt_audio_seconds=1.5)
    b.add_llm("m", 5, 1)
    b.add_llm("n", 1, 1)
    total = a.plus(b)
    assert total.turns == 3
    assert total.takeovers == 1
    assert total.workers == ["w1", "w2"]
    assert total.llm["m"].prompt_tokens == 15
    assert total.llm["n"].completion_tokens == 1
    assert CallTally.from_dict(total.to_dict()) == total
    junk = CallTally.from_dict({"turns": "x", "llm": {"m": "y"}, "llm_ttft": [1, "a", -1]})
    assert junk.turns == 0
    assert junk.llm == {}
    assert junk.llm_ttft == [1.0]
    assert CallTally.from_dict(None) == CallTally()


@pytest.mark.unit
def test_old_checkpoints_decode_without_a_tally() -> None:
    old = b'{"v":1,"agent_class":"m:A","greeted":true,"dropped":0,"history":[]}'
    saved = Checkpoint.decode(old)
    assert saved is not None
    assert saved.call is None
    new = Checkpoint(call=CallTally(turns=2).to_dict()).encode(4096)
    assert new is not None
    decoded = Checkpoint.decode(new)
    assert decoded is not None
    assert CallTally.from_dict(decoded.call).turns == 2


@pytest.mark.unit
def test_a_report_sums_models_and_reads_latency_in_ms() -> None:
    tally = CallTally(started_at=100.0, llm_ttft=[0.1, 0.2, 0.3])
    tally.add_llm("a", 3, 4)
    tally.add_llm("b", 1, 1)
    doc = CallReport("j", "dental", "r", 100.0, 160.5, "ended", tally=tally).to_dict()
    assert doc["duration_s"] == 60.5
    assert doc["usage"]["llm_prompt_tokens"] == 4
    assert doc["usage"]["llm_completion_tokens"] == 5
    assert doc["latency_ms"]["llm_ttft_p50"] == 200.0
    assert doc["latency_ms"]["end_of_turn_p95"] is None
    assert "transcript" not in doc


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a table for 4 at 19:30", "a table for 4 at 19:30"),
        ("card 4111 1111 1111 1111 please", "card ################### please"),
        ("call 555-123-4567", "call ############"),
    ],
)
def test_the_default_redaction_masks_long_numbers(text: str, expected: str) -> None:
    assert redact_numbers("user", text) == expected

"""One report per call, whatever happened to it: real LiveKit, real Redis, a texting caller.

A call runs on three workers in turn (a SIGKILL takeover, then a SIGTERM
handover); the report the last one writes holds the usage of all three
sessions, and the workers' usage counters (/metrics) add up to it: no session
counts what an earlier one did. The offline LLM counts words as tokens, so the
sums are known.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from openrtc.agents.registry import redact_numbers
from openrtc.devtools.devstack import LiveKitServer, RedisServer, free_port
from openrtc.ops.metrics import count
from openrtc.store.checkpoint import Checkpoint
from openrtc.wire.keys import Keys
from openrtc.wire.messages import RecordField
from openrtc.wire.reports import REPORT_FIELD, CallReport, CallTally, percentile
from tests.support.conversation import GREETING, THREE_THINGS, agent_listening, greeted_call
from tests.support.http import get
from tests.support.processes import LEASE, children_of, worker_process_killed_on_exit
from tests.support.stack import delete_room, eventually, unique, working

pytestmark = pytest.mark.anyio

#: The offline dental agent's instructions (examples/offline_agents/dental.py).
INSTRUCTIONS = "Offline dental receptionist."


def runs_it(process: subprocess.Popen[bytes], worker_id: bytes | None) -> bool:
    """Whether ``worker_id`` is that worker process's (worker ids hold their pid)."""
    return worker_id is not None and f"-{process.pid}-".encode() in worker_id


async def tally_of(redis: Redis, key: str) -> CallTally:
    data = await redis.get(key)
    saved = Checkpoint.decode(data) if data else None
    return CallTally.from_dict(saved.call if saved else None)


#: What a worker's /metrics say of calls, summed over labels (see :func:`counted_on`).
COUNTED = ("prompt", "completion", "tts", "stt", "ttft", "end_of_turn", "calls")


async def counted_on(*ports: int) -> dict[str, float]:
    """The usage counters, latency and call-duration observations of workers, summed."""
    names = {
        "openrtc_tts_characters_total": "tts",
        "openrtc_stt_audio_seconds_total": "stt",
        "openrtc_llm_ttft_seconds_count": "ttft",
        "openrtc_end_of_turn_delay_seconds_count": "end_of_turn",
        "openrtc_call_duration_seconds_count": "calls",
    }
    seen = dict.fromkeys(COUNTED, 0.0)
    for port in ports:
        status, page = await get(port, "/metrics")
        assert status == 200
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name == "openrtc_llm_tokens_total":
                    seen[sample.labels["kind"]] += sample.value
                elif sample.name in names:
                    seen[names[sample.name]] += sample.value
    return seen


def usage_in(tally: CallTally) -> dict[str, float]:
    """A tally's usage as :func:`counted_on` says it (its latency samples, if all are kept)."""
    return {
        "prompt": sum(m.prompt_tokens for m in tally.llm.values()),
        "completion": sum(m.completion_tokens for m in tally.llm.values()),
        "tts": tally.tts_characters,
        "stt": tally.stt_audio_seconds,
        "ttft": len(tally.llm_ttft),
        "end_of_turn": len(tally.end_of_turn),
        "calls": 0,
    }


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_a_call_taken_over_and_handed_over_leaves_one_report_with_all_its_usage(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, isolation: str
) -> None:
    """Done when (issue 20): three turns, a SIGKILL takeover, a SIGTERM handover:
    exactly one report, the usage of all sessions summed, ``takeovers == 2``."""
    ns, agent = unique("ns"), "dental"
    # No idle session processes: three workers' worth on two cores starve the join.
    args = ["--isolation", isolation, "--idle-processes", "0"]
    keys = Keys(ns)
    replies = [f"Noted: {thing}" for thing in THREE_THINGS]
    ports = [free_port(), free_port()]
    with (
        worker_process_killed_on_exit(
            livekit_server, redis_server.url, ns, *args, "--http-port", str(ports[0])
        ) as first,
        worker_process_killed_on_exit(
            livekit_server, redis_server.url, ns, *args, "--http-port", str(ports[1])
        ) as second,
    ):
        port = {first.pid: ports[0], second.pid: ports[1]}
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

            async def counted_as_saved(
                n: int, worker: subprocess.Popen[bytes], before: dict[str, float]
            ) -> bool:
                # Nothing more to come of turn n (its reply spoken): what the
                # workers counted (``before``: a dead one's) is what the
                # checkpoint says, no more.
                tally = await tally_of(redis, key)
                spoken = len(GREETING) - 1 + sum(len(r) for r in replies[:n])
                if not await turns_saved(n) or tally.tts_characters != spoken:
                    return False
                now = await counted_on(port[worker.pid])
                return {k: now[k] + before[k] for k in COUNTED} == usage_in(tally)

            await eventually(lambda: turns_saved(1), "turn 1 and its usage checkpointed")
            ran = await redis.hget(keys.job(agent, call.message.job_id), RecordField.WORKER)
            if isolation == "coroutine":
                # Whichever worker has the call dies; the other takes it over.
                serving, other = (first, second) if runs_it(first, ran) else (second, first)
                await eventually(
                    lambda: counted_as_saved(1, serving, dict.fromkeys(COUNTED, 0.0)),
                    "turn 1 counted as saved",
                    within=30,
                )
                # Its counters die with it: read them last thing before.
                counted = await counted_on(port[serving.pid])
                serving.send_signal(signal.SIGKILL)
            else:
                # The session's process dies (in process isolation the worker's
                # children would outlive a SIGKILLed worker for a while): its
                # worker starts it again, as a takeover, from the checkpoint.
                other = first if runs_it(first, ran) else second
                # The worker outlives its session process: its counters too.
                counted = dict.fromkeys(COUNTED, 0.0)
                (zygote,) = children_of(other.pid)
                (session_process,) = children_of(zygote)
                os.kill(session_process, signal.SIGKILL)
            taker = await caller.wait_agent(within=60, other_than=call.original.sid)
            await agent_listening(caller, taker.identity)
            await transcript.ask(THREE_THINGS[1], replies[1])
            await eventually(lambda: turns_saved(2), "turn 2 checkpointed on the taker")
            assert (await tally_of(redis, key)).takeovers == 1
            # The taker counted only its own session's usage, not the call's so far.
            await eventually(
                lambda: counted_as_saved(2, other, counted),
                "turn 2 counted once",
                within=30,
            )
            if isolation == "coroutine":
                # The handover's peer (in process isolation: the idle worker).
                last = await stack.enter_async_context(
                    working(
                        livekit_server,
                        redis_server.url,
                        ns,
                        agent,
                        lease=LEASE,
                        http_port=free_port(),
                    )
                )
                assert last.http is not None
                last_port = last.http.port
            else:
                last_port = port[(second if other is first else first).pid]
            handing_over = await counted_on(port[other.pid])
            other.send_signal(signal.SIGTERM)
            handed = await caller.wait_agent(within=60, other_than=taker.sid)
            await agent_listening(caller, handed.identity)
            await transcript.ask(THREE_THINGS[2], replies[2])
            assert other.wait(30) == 0
            assert await redis.xlen(keys.reports) == 0  # nobody reported a call still on

            # The caller hangs up: the room goes, the call ends on `last`.
            await delete_room(livekit_server, call.message.room)

            async def reported() -> bool:
                return await redis.xlen(keys.reports) > 0

            await eventually(reported, "the call's report", within=30)
            final = await redis.hget(keys.job(agent, call.message.job_id), RecordField.WORKER)
            entries = await redis.xrange(keys.reports)
            assert len(entries) == 1, entries
            report = json.loads(entries[0][1][REPORT_FIELD])

            async def duration_observed() -> bool:
                _, page = await get(last_port, "/metrics")
                line = (
                    'openrtc_call_duration_seconds_count{agent="dental",outcome="ended",'
                    'tenant="default"} 1.0'
                )
                return line in page

            await eventually(duration_observed, "the call's duration observed once, as ended")
            at_last = await counted_on(last_port)

    assert report["job_id"] == call.message.job_id
    assert report["agent"] == "dental"
    assert report["tenant"] == "default"
    assert report["room"] == call.message.room
    assert report["outcome"] == "ended", report
    assert report["turns"] == 3
    assert report["takeovers"] == 2
    assert len(report["workers"]) == 3
    assert report["workers"][2] == final.decode()
    # A session process's crash is taken over by its own worker.
    assert len(set(report["workers"])) == (3 if isolation == "coroutine" else 2)
    usage = report["usage"]
    assert usage["llm_completion_tokens"] == sum(len(r.split()) for r in replies)
    assert usage["llm_by_model"]["rules"]["completion_tokens"] == usage["llm_completion_tokens"]
    # Each turn's prompt is the whole conversation before its reply, the agent's
    # instructions first: the resumed sessions saw all of it again.
    context = len(INSTRUCTIONS.split()) + len(GREETING.split())
    prompts = []
    for n, thing in enumerate(THREE_THINGS):
        context += len(thing.split()) + (len(replies[n - 1].split()) if n else 0)
        prompts.append(context)
    assert usage["llm_prompt_tokens"] == sum(prompts) == 80
    # The greeting (session 1) and a reply on each session were spoken; the
    # greeting is two sentences, synthesized apart: the space between is not.
    assert usage["tts_characters"] == len(GREETING) - 1 + sum(len(r) for r in replies)
    assert report["duration_s"] > 0
    assert report["latency_ms"]["llm_ttft_p50"] is not None
    said = [line["text"] for line in report["transcript"] if line["role"] == "user"]
    assert said == THREE_THINGS
    # The workers' counters add up to the report: each token counted once.
    if isolation == "process":
        counted = handing_over  # the same worker ran the first two sessions
    else:
        counted = {k: counted[k] + handing_over[k] for k in COUNTED}
    total = {k: counted[k] + at_last[k] for k in COUNTED}
    assert total == {
        "prompt": usage["llm_prompt_tokens"],
        "completion": usage["llm_completion_tokens"],
        "tts": usage["tts_characters"],
        "stt": usage["stt_audio_seconds"],
        "ttft": 3,  # one per reply; the greeting is said, not generated
        # A texting caller's turns have no end-of-turn delay to count.
        "end_of_turn": 0,
        "calls": 1,
    }, total


async def test_an_agent_without_checkpoints_counts_its_usage_when_the_call_ends(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """No checkpoints (``--checkpoint-max-bytes 0``): nothing to count as it goes;
    the call's usage is counted from the ending session's outcome, as reported."""
    ns, agent = unique("ns"), "dental"
    keys = Keys(ns)
    reply = f"Noted: {THREE_THINGS[0]}"
    async with working(
        livekit_server, redis_server.url, ns, agent, checkpoint_max_bytes=0
    ) as worker:
        async with greeted_call(
            livekit_server, redis, ns, agent, "dental-uncheckpointed", GREETING
        ) as call:
            await call.transcript.ask(THREE_THINGS[0], reply)
            await delete_room(livekit_server, call.message.room)

            async def reported() -> bool:
                return await redis.xlen(keys.reports) > 0

            await eventually(reported, "the call's report", within=30)
        [(_, fields)] = await redis.xrange(keys.reports)
        usage = json.loads(fields[REPORT_FIELD])["usage"]
        metrics = worker.metrics
        assert count(metrics.llm_tokens, kind="prompt") == usage["llm_prompt_tokens"] > 0
        assert count(metrics.llm_tokens, kind="completion") == len(reply.split())
        assert count(metrics.llm_tokens, model="rules", tenant="default") == (
            usage["llm_prompt_tokens"] + usage["llm_completion_tokens"]
        )
        assert count(metrics.tts_characters) == usage["tts_characters"] > 0
        ttft = metrics.registry.get_sample_value("openrtc_llm_ttft_seconds_count", {"agent": agent})
        assert ttft == 1


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


def _tally(prompt: int = 0, tts: int = 0, ttft: tuple[float, ...] = ()) -> CallTally:
    tally = CallTally(tts_characters=tts)
    if prompt:
        tally.add_llm("m", prompt, 1)
    for value in ttft:
        tally.add_ttft(value)
    return tally


@pytest.mark.unit
@pytest.mark.parametrize(
    ("earlier", "later", "tokens", "tts", "ttft"),
    [
        # A session's first checkpoint: all of it is new.
        (CallTally(), _tally(10, 5, (0.5,)), {"m": (10, 1)}, 5, [0.5]),
        # A later checkpoint: only what came since.
        (_tally(10, 5, (0.5,)), _tally(25, 9, (0.5, 0.7)), {"m": (15, 0)}, 4, [0.7]),
        # Nothing new (a checkpoint for a history change only).
        (_tally(10, 5, (0.5,)), _tally(10, 5, (0.5,)), {"m": (0, 0)}, 0, []),
        # Behind what was counted (not expected): nothing, never negative.
        (_tally(10, 5, (0.5,)), CallTally(), {}, 0, []),
        # More new samples than a tally keeps: the latest it kept.
        (CallTally(), _tally(ttft=tuple(range(200))), {}, 0, [float(v) for v in range(72, 200)]),
    ],
)
def test_a_tally_since_an_earlier_one(
    earlier: CallTally,
    later: CallTally,
    tokens: dict[str, tuple[int, int]],
    tts: int,
    ttft: list[float],
) -> None:
    new = later.since(earlier)
    assert {m: (t.prompt_tokens, t.completion_tokens) for m, t in new.llm.items()} == tokens
    assert new.tts_characters == tts
    assert new.llm_ttft == ttft
    assert new.llm_ttft_count == len(ttft)


@pytest.mark.unit
def test_sample_counts_add_up_and_default_for_old_tallies() -> None:
    a, b = _tally(ttft=(0.1, 0.2)), _tally(ttft=(0.3,))
    assert a.plus(b).llm_ttft_count == 3
    # A tally written before the counts: its samples are all it ever took.
    old = CallTally.from_dict({"llm_ttft": [0.1, 0.2]})
    assert old.llm_ttft_count == 2
    assert CallTally.from_dict(a.to_dict()) == a


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


def _report(job: str, agent: str, tenant: str, outcome: str, ended_at: float) -> CallReport:
    tally = CallTally(started_at=ended_at - 60, turns=2, takeovers=1, workers=["w1", "w2"])
    tally.add_llm("gpt-4.1-mini", 1000, 500)
    tally.tts_characters = 200
    tally.stt_audio_seconds = 30.0
    return CallReport(job, agent, f"room-{job}", ended_at - 60, ended_at, outcome, tenant=tenant,
                      tally=tally)  # fmt: skip


PRICES = """
tts_per_character = 0.0001
stt_per_second = 0.001
[llm."gpt-4.1-mini"]
prompt_per_1k = 0.4
completion_per_1k = 1.6
"""
#: One call's cost under PRICES: 0.4 + 0.8 (tokens) + 0.02 (TTS) + 0.03 (STT).
ONE_CALL = 1.25


async def test_sessions_list_show_stats_read_the_reports_with_costs(
    redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    import subprocess
    import time

    import anyio
    from typer.testing import CliRunner

    from openrtc.cli.main import app
    from openrtc.settings import DEFAULT_REPORT_MAX_AGE, DEFAULT_REPORT_MAXLEN
    from openrtc.store.streams import StreamStore

    ns = unique("ns")
    store = StreamStore(redis, Keys(ns))
    now = time.time()
    add = partial(store.add_report, maxlen=DEFAULT_REPORT_MAXLEN, max_age=DEFAULT_REPORT_MAX_AGE)
    assert await add(_report("j1", "dental", "acme", "ended", now - 7200))
    assert await add(_report("j2", "dental", "globex", "failed", now - 10))
    assert await add(_report("j3", "support", "acme", "agent_ended", now - 5))
    assert await add(_report("j3", "support", "acme", "agent_ended", now)) is None  # once
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "OPENRTC_NAMESPACE": ns,
        "NO_COLOR": "1",
        "COLUMNS": "250",
    }

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        def invoke() -> Any:
            return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

        result = await anyio.to_thread.run_sync(invoke)
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    async def jobs(*args: str) -> list[str]:
        result = await cli("sessions", "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [s["job_id"] for s in json.loads(result.stdout)["sessions"]]

    assert await jobs() == ["j3", "j2", "j1"]
    assert await jobs("--agent", "dental") == ["j2", "j1"]
    assert await jobs("--tenant", "acme") == ["j3", "j1"]
    assert await jobs("--outcome", "failed") == ["j2"]
    assert await jobs("--since", "1h") == ["j3", "j2"]
    listed = json.loads((await cli("sessions", "list", "--json", "--prices", str(prices))).stdout)
    assert [s["cost"] for s in listed["sessions"]] == [ONE_CALL] * 3
    table = await cli("sessions", "list", "--prices", str(prices))
    assert table.returncode == 0
    assert "j2" in table.stdout
    assert "1.2500" in table.stdout

    shown = await cli("sessions", "show", "j2", "--prices", str(prices))
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["tenant"] == "globex"
    assert doc["takeovers"] == 1
    assert doc["cost"] == ONE_CALL
    missing = await cli("sessions", "show", "nope")
    assert missing.returncode == 1
    assert "no call report" in missing.stderr

    stats = json.loads((await cli("sessions", "stats", "--json", "--prices", str(prices))).stdout)
    assert stats["total"]["calls"] == 3
    assert stats["total"]["cost"] == pytest.approx(3 * ONE_CALL)
    assert stats["by_agent"]["dental"]["llm_prompt_tokens"] == 2000
    assert stats["by_tenant"]["acme"]["calls"] == 2
    assert stats["by_tenant"]["acme"]["outcomes"] == {"ended": 1, "agent_ended": 1}
    recent = json.loads((await cli("sessions", "stats", "--json", "--since", "1h")).stdout)
    assert recent["total"]["calls"] == 2
    assert "cost" not in recent["total"]
    text = await cli("sessions", "stats", "--prices", str(prices))
    assert text.returncode == 0
    assert "By tenant" in text.stdout
    assert "globex" in text.stdout
    # Signed like the entries: `show` with the key says whether it verifies.
    from openrtc.wire.signing import SigningKeys

    key = "k" * 40
    signed = StreamStore(redis, Keys(ns), signing=SigningKeys(key.encode()))
    assert await signed.add_report(
        _report("j4", "dental", "acme", "ended", time.time()),
        maxlen=DEFAULT_REPORT_MAXLEN,
        max_age=DEFAULT_REPORT_MAX_AGE,
    )
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    await redis.xadd(Keys(ns).reports, {REPORT_FIELD: b'{"job_id": "j5"}', b"sig": b"v1:x:y"})
    for job, expected in (("j4", "signed"), ("j3", "unsigned"), ("j5", "forged")):
        checked = await cli("sessions", "show", job, "--signing-key-file", str(key_file))
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["signature"] == expected
    bad = tmp_path / "bad.toml"
    bad.write_text("[llm\n")
    refused = await cli("sessions", "list", "--prices", str(bad))
    assert refused.returncode == 2
    assert "price table" in refused.stderr


async def test_a_call_given_up_is_reported_failed_with_its_last_checkpoint_s_totals(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    """Dead-lettered (too many deliveries): the report says failed, and why, with
    the usage its sessions had checkpointed."""
    from openrtc.store.streams import StreamStore
    from openrtc.wire.keys import WORKERS_GROUP
    from tests.support.jobs import job_message
    from tests.support.stack import new_room

    ns = unique("ns")
    keys = Keys(ns)
    room = await new_room(livekit_server, unique("dental-given-up"))
    message = job_message(livekit_server, room, "dental", unique("dispatcher"))
    store = StreamStore(redis, keys)
    await store.ensure_group("dental")
    await store.enqueue([message])
    tally = CallTally(started_at=1000.0, turns=4, takeovers=1, workers=["w-a", "w-gone"])
    tally.add_llm("rules", 40, 12)
    data = Checkpoint(call=tally.to_dict()).encode(4096)
    assert data is not None
    await redis.set(keys.checkpoint("dental", message.job_id), data)
    # Delivered to a worker that died with it.
    await redis.xreadgroup(WORKERS_GROUP, "w-gone", {keys.jobs("dental"): ">"}, count=1)
    async with working(
        livekit_server, redis_server.url, ns, "dental", max_deliveries=1, lease=1.0
    ) as worker:

        async def reported() -> bool:
            return await redis.xlen(keys.reports) > 0

        await eventually(reported, "the given-up call's report", within=30)
        registry = worker.metrics.registry

        def duration_observed() -> bool:
            labels = {"agent": "dental", "tenant": "default", "outcome": "failed"}
            return registry.get_sample_value("openrtc_call_duration_seconds_count", labels) == 1

        await eventually(duration_observed, "the given-up call's duration observed, as failed")
        # Its usage was counted by the worker that checkpointed it, not again here.
        assert count(worker.metrics.llm_tokens) == 0
    [(_, fields)] = await redis.xrange(keys.reports)
    report = json.loads(fields[REPORT_FIELD])
    assert report["job_id"] == message.job_id
    assert report["outcome"] == "failed"
    assert report["reason"].startswith("max-deliveries"), report["reason"]
    assert report["turns"] == 4
    assert report["takeovers"] == 1
    assert report["workers"] == ["w-a", "w-gone"]
    assert report["usage"]["llm_prompt_tokens"] == 40
    assert report["started_at"] == 1000.0

"""Call reports: one record per call, whatever happened to it on the way.

A call may run as several sessions (a crash takeover, a handover on a
deploy): each session adds its usage to a :class:`CallTally` that rides in
the conversation checkpoint, so the session that finally ends the call holds
the sum of all of them. That session's worker turns the tally into a
:class:`CallReport`, written once to the reports stream
(:meth:`openrtc.wire.keys.Keys.reports`).

Pure data and arithmetic: no Redis, no LiveKit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from openrtc.agents.tenants import DEFAULT_TENANT

__all__ = [
    "LATENCY_SAMPLES",
    "REPORT_FIELD",
    "TRANSCRIPT_MAX_CHARS",
    "CallOutcome",
    "CallReport",
    "CallTally",
    "ModelTokens",
    "percentile",
]

#: The one field of a report entry: the report as JSON (plus the signature, when signed).
REPORT_FIELD: Final = b"report"
#: Latency samples kept per kind across a call (the latest): enough for a
#: p95 of a long call, small in a checkpoint (a few KB).
LATENCY_SAMPLES: Final = 128
#: Most transcript text a report keeps (the latest lines); one call's
#: report must stay a small stream entry.
TRANSCRIPT_MAX_CHARS: Final = 32 * 1024


class CallOutcome:
    """How a call ended, as a report says it."""

    #: The caller hung up, or the room is gone.
    ENDED = "ended"
    #: The agent ended the call (``ctx.shutdown()``, ``session.shutdown()``).
    AGENT_ENDED = "agent_ended"
    #: Given up: dead-lettered (too many failed deliveries, poison, too old).
    FAILED = "failed"


@dataclass
class ModelTokens:
    """One LLM's tokens over a call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


def _num(value: Any, kind: type = int) -> Any:
    try:
        out = kind(value)
    except (TypeError, ValueError):
        return kind(0)
    return out if math.isfinite(out) and out >= 0 else kind(0)


def _samples(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [float(v) for v in value if isinstance(v, int | float) and math.isfinite(v) and v >= 0][
        -LATENCY_SAMPLES:
    ]


@dataclass
class CallTally:
    """A call's running totals, carried from session to session in its checkpoint."""

    #: When the call's first session started (unix s); 0: unknown.
    started_at: float = 0.0
    #: Caller turns answered (user messages committed), over all sessions.
    turns: int = 0
    #: Sessions that took the call over from another (crash takeovers and handovers).
    takeovers: int = 0
    #: The workers that ran the call's sessions, in order.
    workers: list[str] = field(default_factory=list)
    #: LLM tokens per model.
    llm: dict[str, ModelTokens] = field(default_factory=dict)
    tts_characters: int = 0
    stt_audio_seconds: float = 0.0
    #: The latest LLM time-to-first-token samples (s).
    llm_ttft: list[float] = field(default_factory=list)
    #: The latest end-of-turn delays (s): the caller stopped speaking -> the turn committed.
    end_of_turn: list[float] = field(default_factory=list)
    #: Samples ever taken of each kind (the lists keep only the latest): a
    #: worker tells the new ones of two tallies apart by them (:meth:`since`).
    llm_ttft_count: int = 0
    end_of_turn_count: int = 0

    def add_llm(self, model: str, prompt: int, completion: int) -> None:
        tokens = self.llm.setdefault(model or "unknown", ModelTokens())
        tokens.prompt_tokens += max(0, prompt)
        tokens.completion_tokens += max(0, completion)

    def add_ttft(self, value: float) -> None:
        """An LLM time-to-first-token sample (s)."""
        if _keep(self.llm_ttft, value):
            self.llm_ttft_count += 1

    def add_end_of_turn(self, value: float) -> None:
        """An end-of-turn delay sample (s)."""
        if _keep(self.end_of_turn, value):
            self.end_of_turn_count += 1

    def plus(self, other: CallTally) -> CallTally:
        """This tally with ``other``'s usage, turns and samples added (a new tally)."""
        out = CallTally.from_dict(self.to_dict())
        for model, tokens in other.llm.items():
            out.add_llm(model, tokens.prompt_tokens, tokens.completion_tokens)
        out.turns += other.turns
        out.tts_characters += other.tts_characters
        out.stt_audio_seconds += other.stt_audio_seconds
        for value in other.llm_ttft:
            _keep(out.llm_ttft, value)
        for value in other.end_of_turn:
            _keep(out.end_of_turn, value)
        out.llm_ttft_count += other.llm_ttft_count
        out.end_of_turn_count += other.end_of_turn_count
        return out

    def since(self, earlier: CallTally) -> CallTally:
        """What this tally holds that ``earlier`` (an older tally of the same call) did not.

        The usage added since, and the latency samples taken since (the
        latest :data:`LATENCY_SAMPLES` of them at most). Never negative: a
        tally behind ``earlier`` (not expected) adds nothing. Counts (turns,
        takeovers, workers, ``started_at``) are left out: only usage and
        samples are counted from it.
        """
        out = CallTally()
        for model, tokens in self.llm.items():
            before = earlier.llm.get(model, ModelTokens())
            out.add_llm(
                model,
                tokens.prompt_tokens - before.prompt_tokens,
                tokens.completion_tokens - before.completion_tokens,
            )
        out.tts_characters = max(0, self.tts_characters - earlier.tts_characters)
        out.stt_audio_seconds = max(0.0, self.stt_audio_seconds - earlier.stt_audio_seconds)
        for kind in ("llm_ttft", "end_of_turn"):
            new = getattr(self, f"{kind}_count") - getattr(earlier, f"{kind}_count")
            samples: list[float] = getattr(self, kind)[-new:] if new > 0 else []
            setattr(out, kind, samples)
            setattr(out, f"{kind}_count", len(samples))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> CallTally:
        """The tally in ``data`` (a checkpoint's or an outcome's); unknown or bad fields ignored."""
        if not isinstance(data, Mapping):
            return cls()
        llm: dict[str, ModelTokens] = {}
        raw_llm = data.get("llm")
        if isinstance(raw_llm, Mapping):
            for model, tokens in raw_llm.items():
                if isinstance(tokens, Mapping):
                    llm[str(model)] = ModelTokens(
                        _num(tokens.get("prompt_tokens")), _num(tokens.get("completion_tokens"))
                    )
        workers = data.get("workers")
        ttft, end_of_turn = _samples(data.get("llm_ttft")), _samples(data.get("end_of_turn"))
        return cls(
            started_at=_num(data.get("started_at"), float),
            turns=_num(data.get("turns")),
            takeovers=_num(data.get("takeovers")),
            workers=[str(w) for w in workers] if isinstance(workers, list) else [],
            llm=llm,
            tts_characters=_num(data.get("tts_characters")),
            stt_audio_seconds=_num(data.get("stt_audio_seconds"), float),
            llm_ttft=ttft,
            end_of_turn=end_of_turn,
            # Tallies from before the counts: their samples are all there were.
            llm_ttft_count=max(len(ttft), _num(data.get("llm_ttft_count"))),
            end_of_turn_count=max(len(end_of_turn), _num(data.get("end_of_turn_count"))),
        )


def _keep(samples: list[float], value: float) -> bool:
    """Add a latency sample to ``samples``, keeping the latest; whether it was one."""
    if not (math.isfinite(value) and value >= 0):
        return False
    # Milliseconds are precision enough, and keep the checkpoint small.
    samples.append(round(value, 3))
    del samples[:-LATENCY_SAMPLES]
    return True


def percentile(samples: list[float], share: float) -> float | None:
    """The ``share`` (0-1) percentile of ``samples`` (nearest rank); ``None`` without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


@dataclass
class CallReport:
    """What a call leaves behind: one per call, written when it ends."""

    job_id: str
    agent: str
    room: str
    started_at: float
    ended_at: float
    outcome: str
    reason: str = ""
    #: The customer the call was for (:mod:`openrtc.agents.tenants`; empty in
    #: reports written before calls had one).
    tenant: str = DEFAULT_TENANT
    tally: CallTally = field(default_factory=CallTally)
    #: ``[{"role", "text"}]`` when the agent keeps transcripts (redacted); else ``None``.
    transcript: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as stored and shown (``openrtc sessions show --json``)."""
        t = self.tally
        prompt = sum(m.prompt_tokens for m in t.llm.values())
        completion = sum(m.completion_tokens for m in t.llm.values())
        doc: dict[str, Any] = {
            "job_id": self.job_id,
            "agent": self.agent,
            "tenant": self.tenant,
            "room": self.room,
            "started_at": round(self.started_at, 3),
            "ended_at": round(self.ended_at, 3),
            "duration_s": round(max(0.0, self.ended_at - self.started_at), 3),
            "outcome": self.outcome,
            "reason": self.reason,
            "takeovers": t.takeovers,
            "workers": list(t.workers),
            "turns": t.turns,
            "usage": {
                "llm_prompt_tokens": prompt,
                "llm_completion_tokens": completion,
                "tts_characters": t.tts_characters,
                "stt_audio_seconds": round(t.stt_audio_seconds, 3),
                "llm_by_model": {m: asdict(tokens) for m, tokens in sorted(t.llm.items())},
            },
            "latency_ms": {
                "llm_ttft_p50": _ms(percentile(t.llm_ttft, 0.5)),
                "llm_ttft_p95": _ms(percentile(t.llm_ttft, 0.95)),
                "end_of_turn_p50": _ms(percentile(t.end_of_turn, 0.5)),
                "end_of_turn_p95": _ms(percentile(t.end_of_turn, 0.95)),
            },
        }
        if self.transcript is not None:
            doc["transcript"] = self.transcript
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def cap_transcript(lines: list[dict[str, str]]) -> list[dict[str, str]]:
    """The latest ``lines`` whose text fits :data:`TRANSCRIPT_MAX_CHARS`."""
    kept: list[dict[str, str]] = []
    total = 0
    for line in reversed(lines):
        total += len(line.get("text", ""))
        if total > TRANSCRIPT_MAX_CHARS:
            break
        kept.append(line)
    kept.reverse()
    return kept

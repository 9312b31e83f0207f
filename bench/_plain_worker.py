"""A plain livekit-agents worker running the offline dental agent, for ``bench/e2e.py``.

No openrtc runtime: livekit-agents' own ``AgentServer``, registered for explicit
dispatch under ``$BENCH_PLAIN_AGENT_NAME``, with its default process pool (job
processes forked from a forkserver, ``num_idle_processes`` = CPU count in
production mode; ``bench/e2e.py`` replaces only the load function, see its
``--plain-load``). The agent class and greeting come from
``examples/offline_agents/dental.py``, loaded by path; the session is the one
openrtc's worker builds for that agent (``ToneTTS``, manual turn detection, the
greeting said once the session has started).

Started by ``bench/e2e.py`` the way livekit-agents documents for production::

    python -m livekit.agents start bench/_plain_worker.py --log-level WARNING

When ``$BENCH_TRACE`` names a file, one JSON line is appended to it per event,
with ``time.time()``: ``registered`` (the worker's registration with LiveKit),
``request`` (an availability request reached the worker), ``entry`` (the
entrypoint started in a job process), ``joined`` (that process's room
connection reached CONNECTED) and ``started`` (``session.start`` returned).
Each costs one ``write(2)`` of under 200 bytes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from livekit import rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobRequest

from openrtc.agents.tone_tts import ToneTTS

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DENTAL: Final = REPO_ROOT / "examples" / "offline_agents" / "dental.py"
AGENT_NAME: Final = os.environ.get("BENCH_PLAIN_AGENT_NAME", "plain-bench")
TRACE: Final = os.environ.get("BENCH_TRACE", "")


def _load_dental() -> tuple[Callable[[], Agent], str]:
    """The agent class of ``dental.py`` and its greeting, without openrtc's registry."""
    spec = importlib.util.spec_from_file_location("bench_offline_dental", DENTAL)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {DENTAL}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    agent_cls: Callable[[], Agent] = module.OfflineDental
    marker: Any = agent_cls.__dict__["__openrtc_agent_config__"]
    return agent_cls, str(marker.greeting or "")


OfflineDental, GREETING = _load_dental()


def trace(event: str, job: str = "", room: str = "") -> None:
    if not TRACE:
        return
    line = json.dumps({"ev": event, "job": job, "room": room, "t": time.time(), "pid": os.getpid()})
    fd = os.open(TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def slot_load(slots: int) -> Any:
    """Load as the share of ``slots`` sessions running, as openrtc reports it."""

    def load(worker: AgentServer) -> float:
        return min(1.0, len(worker.active_jobs) / slots)

    return load


# The health-check HTTP server's production port is 8081; any free port will do here.
# ``$BENCH_PLAIN_IDLE`` overrides ``num_idle_processes``; ``$BENCH_PLAIN_SLOTS`` replaces
# the default load (this machine's CPU use) by running jobs / slots.
_options: dict[str, Any] = {"port": 0}
if idle := os.environ.get("BENCH_PLAIN_IDLE"):
    _options["num_idle_processes"] = int(idle)
if slots := os.environ.get("BENCH_PLAIN_SLOTS"):
    _options["load_fnc"] = slot_load(int(slots))
server = AgentServer(**_options)
server.on("worker_registered", lambda *_: trace("registered"))


async def on_request(request: JobRequest) -> None:
    """livekit-agents' default (accept with its default identity), plus a trace line."""
    trace("request", request.id, request.room.name)
    await request.accept()


@server.rtc_session(agent_name=AGENT_NAME, on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    job, room = ctx.job.id, ctx.job.room.name
    trace("entry", job, room)

    def on_state(state: rtc.ConnectionState.ValueType) -> None:
        if state == rtc.ConnectionState.CONN_CONNECTED:
            trace("joined", job, room)

    ctx.room.on("connection_state_changed", on_state)
    session: AgentSession[Any] = AgentSession(tts=ToneTTS(), turn_detection="manual")
    await session.start(agent=OfflineDental(), room=ctx.room)
    trace("started", job, room)
    if GREETING:
        session.say(GREETING)

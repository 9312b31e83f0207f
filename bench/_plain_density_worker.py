"""A plain livekit-agents worker serving the offline dental agent, for ``bench/density.py``.

Run only by ``density.py``::

    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... \\
        .venv/bin/python bench/_plain_density_worker.py start

This is what a livekit-agents user runs without openrtc: one ``AgentServer``
registered under an explicit agent name (``DENSITY_AGENT_NAME``, default
``dental-plain``), so it only takes jobs made with
``agent_dispatch.create_dispatch``; each job runs in a job process of its own
(livekit-agents' default: forked from its forkserver, which preloads
``livekit.agents``). The session is the one ``openrtc.session.session.run_session``
builds for the same agent: the agent class, ``ToneTTS`` and greeting of
``examples/offline_agents/dental.py`` (discovered as openrtc's workers discover
it), no STT, LLM or VAD, manual turn detection; connect, start, say the
greeting.

Settings that differ from livekit-agents' production defaults, to compare like
for like with ``openrtc worker --isolation process --concurrency 50``:

* ``num_idle_processes=1`` (default: the CPU count): openrtc keeps one warm
  session process too;
* admission by job count, as openrtc's ``--concurrency``: the reported load is
  0 below ``DENSITY_CAPACITY`` (default 50) running jobs and 1 at it, and
  ``load_threshold`` is infinite. The default load is the machine's CPU use,
  and livekit-server weighs and skips workers by the load they report: on two
  busy cores the CPU load neared 1 at about 20 sessions and LiveKit stopped
  offering jobs; with a load of ``jobs / 50`` it silently dropped every
  dispatch past 40 sessions (load 0.8).

``initialize_process_timeout`` is 60 s instead of 10 s: starting dozens of job
processes on two busy cores can take longer, and a timed-out start would only
fail the run, not change what is measured. ``port=0``: the health server
takes a free port, so concurrent runs do not collide on 8081.
"""

from __future__ import annotations

import math
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from livekit.agents import AgentServer, AgentSession, JobContext, cli

if TYPE_CHECKING:
    from openrtc.agents.registry import AgentConfig

OFFLINE_AGENTS: Final = Path(__file__).resolve().parents[1] / "examples" / "offline_agents"
AGENT_NAME: Final = os.environ.get("DENSITY_AGENT_NAME", "dental-plain")
CAPACITY: Final = int(os.environ.get("DENSITY_CAPACITY", "50"))


def job_load(server: AgentServer) -> float:
    """0 below ``CAPACITY`` running jobs, 1 (LiveKit sends no more) at it."""
    return 0.0 if len(server.active_jobs) < CAPACITY else 1.0


server = AgentServer(
    num_idle_processes=1,
    load_fnc=job_load,
    load_threshold=math.inf,
    initialize_process_timeout=60.0,
    port=0,
)


@cache
def _dental() -> AgentConfig:
    """The offline dental agent, discovered as openrtc's workers discover it."""
    from openrtc.agents.registry import AgentPool

    return AgentPool.from_directory(OFFLINE_AGENTS).get("dental")


@server.rtc_session(agent_name=AGENT_NAME)
async def entrypoint(ctx: JobContext) -> None:
    config = _dental()
    options = dict(config.session_kwargs)
    options.setdefault("turn_detection", "manual")  # no STT, LLM or VAD, as openrtc does
    session: AgentSession[Any] = AgentSession(
        tts=config.tts,  # type: ignore[arg-type]
        **options,
    )
    await ctx.connect()
    await session.start(agent=config.agent_cls(), room=ctx.room)  # type: ignore[call-arg]
    if config.greeting:
        session.say(config.greeting)


if __name__ == "__main__":
    cli.run_app(server)

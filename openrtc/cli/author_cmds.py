"""``openrtc console`` and ``openrtc download-files``: an agent author's commands, run offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from openrtc.cli.app import (
    AgentsDir,
    AgentsDirPositional,
    DefaultGreeting,
    DefaultLlm,
    DefaultStt,
    DefaultTts,
    _agents_dir,
    _Checked,
    _defaults,
    _fail,
    _load_pool,
    app,
)


def _device(value: str | None) -> int | str | None:
    """A sound device: its number, or a substring of its name."""
    return int(value) if value is not None and value.isdigit() else value


@app.command("console", cls=_Checked)
def console(
    agent: Annotated[
        str, typer.Argument(help="The agent to talk to (its registered name).", metavar="AGENT")
    ],
    agents_dir: AgentsDir = Path("agents"),
    text: Annotated[
        bool,
        typer.Option(
            "--text",
            help="Lines from stdin, the greeting and each reply on stdout (one line per "
            "turn), exit 0 at the end of input. Without it: microphone and speaker.",
        ),
    ] = False,
    input_device: Annotated[
        str | None,
        typer.Option("--input-device", help="Microphone: its number or part of its name."),
    ] = None,
    output_device: Annotated[
        str | None,
        typer.Option("--output-device", help="Speaker: its number or part of its name."),
    ] = None,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
) -> None:
    """Talk to one agent from this terminal: its real session, tools and providers,
    no LiveKit or Redis server. Logs go to stderr."""
    import anyio
    from livekit.protocol.agent import Job
    from livekit.protocol.models import Room

    from openrtc.agents.routing import resolve_agent
    from openrtc.session.console import ConsoleError, prepare, run_audio, run_text

    pool = _load_pool(
        agents_dir, _defaults(default_stt, default_llm, default_tts, default_greeting)
    )
    # Named as a dispatch names it (job metadata), so a bad name reads as routing says it.
    # By the chain alone (its names, not the table with the router): AGENT is
    # explicit, and a custom router must not put another agent in its place.
    job = Job(id="console", metadata=json.dumps({"agent": agent}), room=Room(name="console"))
    try:
        config = pool.get(resolve_agent(job, pool.routing_table.names).agent)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    try:
        proc = prepare(config)
        if text:
            anyio.run(run_text, config, proc, sys.stdin, sys.stdout, sys.stderr)
        else:
            run_audio(
                config,
                proc,
                input_device=_device(input_device),
                output_device=_device(output_device),
            )
    except ConsoleError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # Ctrl+C: the shell's code for it, no traceback


@app.command("download-files", cls=_Checked)
def download_files(
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
) -> None:
    """Download what the agents' livekit plugins need at run time (models, ...), so a
    container starts without downloads. One line per plugin; exit 1 if any failed."""
    from openrtc.agents.plugins import download_plugin_files

    agents_dir = _agents_dir(agents_dir_arg, agents_dir)
    _load_pool(agents_dir)  # importing the agents registers their plugins
    results = download_plugin_files()
    if not results:
        typer.echo(f"no livekit plugins registered by the agents in {agents_dir}: nothing to do")
    for result in results:
        typer.echo(result.line(), err=result.error is not None)
    if any(result.error is not None for result in results):
        raise typer.Exit(1)

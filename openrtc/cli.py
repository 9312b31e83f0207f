"""The ``openrtc`` command line.

Every read command prints a readable table by default and machine-readable
JSON with ``--json``. Errors the operator can fix print one line on stderr and
exit 1; nothing here prints a traceback for them.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from openrtc import __version__
from openrtc.agents import AgentPool
from openrtc.errors import OpenRTCError
from openrtc.routing import STEP_SOURCES, explain_route, resolve_agent

app = typer.Typer(
    name="openrtc",
    help="Route LiveKit calls to voice agents over Redis streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_out = Console(highlight=False, soft_wrap=True)

AgentsDir = Annotated[
    Path,
    typer.Option(
        "--agents-dir",
        envvar="OPENRTC_AGENTS_DIR",
        help="Directory with one module per agent.",
        show_default=True,
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _load_pool(agents_dir: Path) -> AgentPool:
    try:
        return AgentPool.from_directory(agents_dir)
    except OpenRTCError as exc:
        _fail(str(exc))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"openrtc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: Annotated[
        str,
        typer.Option("--log-level", envvar="OPENRTC_LOG_LEVEL", help="DEBUG, INFO, WARNING..."),
    ] = "WARNING",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}", 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@app.command("list")
def list_agents(
    agents_dir: AgentsDir = Path("agents"),
    json_output: JsonFlag = False,
    plain: Annotated[
        bool, typer.Option("--plain", help="One tab-separated line per agent.")
    ] = False,
) -> None:
    """Show the registered agents and their providers, in registration order."""
    pool = _load_pool(agents_dir)
    rows = [config.describe() for config in pool]
    if json_output:
        _print_json({"agents": rows})
        return
    if plain:
        for row in rows:
            typer.echo("\t".join(v if v is not None else "-" for v in row.values()))
        return
    if not rows:
        typer.echo(f"No agents in {agents_dir}.")
        return
    table = Table(title=f"Agents in {agents_dir} (registration order)", title_justify="left")
    for column in ("#", "name", "class", "stt", "llm", "tts", "greeting"):
        table.add_column(column, overflow="fold")
    for i, row in enumerate(rows, 1):
        table.add_row(str(i), *(v if v is not None else "-" for v in row.values()))
    _out.print(table)


@app.command("route")
def route(
    agents_dir: AgentsDir = Path("agents"),
    job_metadata: Annotated[
        str, typer.Option("--job-metadata", help="The job's (dispatch) metadata.")
    ] = "",
    room_metadata: Annotated[
        str, typer.Option("--room-metadata", help="The room's metadata.")
    ] = "",
    room: Annotated[str, typer.Option("--room", help="The room name.")] = "",
    json_output: JsonFlag = False,
) -> None:
    """Dry-run the routing chain for a job and say which step matched and why."""
    from livekit.protocol.agent import Job
    from livekit.protocol.models import Room

    pool = _load_pool(agents_dir)
    job = Job(id="dry-run", metadata=job_metadata, room=Room(name=room, metadata=room_metadata))
    try:
        result = resolve_agent(job, pool.routing_table)
    except (ValueError, RuntimeError) as exc:
        if json_output:
            _print_json({"error": str(exc)})
        _fail(str(exc))
    if json_output:
        _print_json({"agent": result.agent, "step": result.step, "source": result.source})
        return
    typer.echo(f"agent: {result.agent}")
    typer.echo(f"step:  {result.step} ({STEP_SOURCES[result.step]})")
    for line in explain_route(job, pool.routing_table):
        typer.echo(f"  {line}")


def main() -> None:
    """Console-script entry point."""
    app()

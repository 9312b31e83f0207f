"""``openrtc list``, ``route`` and ``tenants check``: the agents directory, read offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from openrtc.agents.routing import ROUTER_STEP, STEP_SOURCES, explain_route, resolve_agent
from openrtc.cli.app import (
    AgentsDir,
    AgentsDirPositional,
    DefaultGreeting,
    DefaultLlm,
    DefaultStt,
    DefaultTts,
    JsonFlag,
    TenantsFile,
    _agents_dir,
    _Checked,
    _defaults,
    _fail,
    _load_pool,
    _out,
    _print_json,
    app,
)


@app.command("list", cls=_Checked)
def list_agents(
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    json_output: JsonFlag = False,
    plain: Annotated[
        bool, typer.Option("--plain", help="One tab-separated line per agent.")
    ] = False,
    resources: Annotated[
        bool,
        typer.Option("--resources", help="With --json: source file sizes and this process's RSS."),
    ] = False,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
) -> None:
    """Show the registered agents and their providers, in registration order."""
    from openrtc.agents.compat import list_payload

    agents_dir = _agents_dir(agents_dir_arg, agents_dir)
    pool = _load_pool(
        agents_dir, _defaults(default_stt, default_llm, default_tts, default_greeting)
    )
    rows = [config.describe() for config in pool]
    router = pool.router.label if pool.router is not None else None
    if json_output:
        _print_json(list_payload(pool, resources=resources))
        return
    if plain:
        for row in rows:
            typer.echo("\t".join(v if v is not None else "-" for v in row.values()))
        if router is not None:
            # Not an agent row: its first column says so, and a name cannot hold a space.
            typer.echo(f"(router)\t{router}")
        for observer in (*pool.observers.start, *pool.observers.end):
            typer.echo(f"(on_session_{observer.hook})\t{observer.label}")
        return
    if not rows:
        typer.echo(f"No agents in {agents_dir}.")
    else:
        table = Table(title=f"Agents in {agents_dir} (registration order)", title_justify="left")
        for column in ("#", "name", "class", "stt", "llm", "tts", "greeting"):
            table.add_column(column, overflow="fold")
        for i, row in enumerate(rows, 1):
            table.add_row(str(i), *(v if v is not None else "-" for v in row.values()))
        _out.print(table)
    if router is not None:
        typer.echo(f"Custom router: {router} (runs before the routing chain)")
    for hook, observers in (("start", pool.observers.start), ("end", pool.observers.end)):
        if observers:
            labels = ", ".join(o.label for o in observers)
            typer.echo(f"Observers of each call's {hook}: {labels}")


@app.command("route", cls=_Checked)
def route(
    agents_dir_arg: AgentsDirPositional = None,
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
    """Dry-run routing for a job (the custom router, then the chain): which step matched and why."""
    from livekit.protocol.agent import Job
    from livekit.protocol.models import Room

    pool = _load_pool(_agents_dir(agents_dir_arg, agents_dir))
    job = Job(id="dry-run", metadata=job_metadata, room=Room(name=room, metadata=room_metadata))
    try:
        result = resolve_agent(job, pool.routing_table)
    except (ValueError, RuntimeError) as exc:
        if json_output:
            _print_json({"error": str(exc)})
        _fail(str(exc))
    router = pool.router.label if pool.router is not None else None
    if json_output:
        shown = {"agent": result.agent, "step": result.step, "source": result.source}
        if router is not None:
            shown["router"] = router
        _print_json(shown)
        return
    typer.echo(f"agent: {result.agent}")
    how = STEP_SOURCES[result.step]
    if result.step == ROUTER_STEP:
        how = f"{how} {router}"
    typer.echo(f"step:  {result.step} ({how})")
    for line in explain_route(job, pool.routing_table):
        typer.echo(f"  {line}")


tenants = typer.Typer(help="The tenants file (tenants.toml).", no_args_is_help=True)
app.add_typer(tenants, name="tenants")


@tenants.command("check", cls=_Checked)
def tenants_check(
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    tenants_file: TenantsFile = None,
    json_output: JsonFlag = False,
) -> None:
    """Check the tenants file as a worker does at start-up, and show each tenant's settings.

    Credentials are shown as their references (env:VAR, file:/path), never
    resolved. Run it where the workers run: an unset variable or unreadable
    file is an error, as it is for them. Exit 1 on any problem, one line each.
    """
    import os

    from openrtc.errors import OpenRTCError
    from openrtc.tenant_file import find_tenants_file, load_tenants, reference_problems

    directory = _agents_dir(agents_dir_arg, agents_dir)
    try:
        path = find_tenants_file(tenants_file, directory)
        if path is None:
            _fail(f"no tenants file: {directory / 'tenants.toml'} does not exist (or --tenants)")
        config = load_tenants(path)
    except OpenRTCError as exc:
        _fail(str(exc))
    if problems := reference_problems(config, os.environ):
        _fail("\n".join(problems))
    rows = [tenant.describe() for tenant in config.tenants.values()]
    if json_output:
        _print_json({"file": str(path), "tenants": rows})
        return
    typer.echo(f"{path}: {len(rows)} tenant(s), valid")
    for row in rows:
        typer.echo(f"[{row['tenant']}]")
        for key, value in row.items():
            if key == "tenant" or value is None or value == {}:
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            typer.echo(f"  {key}: {value}")

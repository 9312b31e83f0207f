"""``openrtc call``, ``openrtc connect`` and ``openrtc dev``: a test caller, an agent put into a
room by hand, and the whole stack on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from openrtc.agents.registry import AgentPool
from openrtc.cli.app import (
    AgentsDir,
    AgentsDirPositional,
    ApiKey,
    ApiSecret,
    DefaultGreeting,
    DefaultLlm,
    DefaultStt,
    DefaultTts,
    IsolationMode,
    JsonFlag,
    LiveKitUrl,
    Namespace,
    RedisUrl,
    _agents_dir,
    _Checked,
    _defaults,
    _fail,
    _load_pool,
    _print_json,
    app,
)
from openrtc.errors import OpenRTCError
from openrtc.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_NAMESPACE,
    LiveKitSettings,
    redact_url,
)
from openrtc.supervision import freeze_imports

if TYPE_CHECKING:
    from openrtc.devtools.dev import DevStack


@app.command("call", cls=_Checked)
def call(
    room: Annotated[str, typer.Option("--room", help="Room to call into.")],
    metadata: Annotated[
        str | None,
        typer.Option("--metadata", help="Create the room first, with this metadata."),
    ] = None,
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for an agent.")] = 20.0,
    listen: Annotated[float, typer.Option("--listen", help="Seconds to wait for audio.")] = 10.0,
    delete: Annotated[
        bool, typer.Option("--delete/--keep", help="Delete the room afterwards.")
    ] = True,
    json_output: JsonFlag = False,
) -> None:
    """Join a room as a caller and report which agent answered and whether it was heard."""
    import dataclasses

    import anyio

    from openrtc.devtools.caller import close_native_runtime, place_call
    from openrtc.settings import LiveKitSettings

    try:
        credentials = LiveKitSettings(livekit_url, api_key, api_secret)
    except OpenRTCError as exc:
        _fail(str(exc))
    try:
        result = anyio.run(
            lambda: place_call(
                credentials, room, metadata=metadata, wait=wait, listen=listen, delete_room=delete
            )
        )
    except Exception as exc:
        _fail(f"call failed: {type(exc).__name__}: {exc}")
    finally:
        # Before any exit path: an abort at interpreter shutdown would turn
        # this call's result into a crash.
        close_native_runtime()
    if json_output:
        _print_json({**dataclasses.asdict(result), "ok": result.ok})
    elif result.agent is None:
        typer.echo(f"{room}: {result.error}")
    else:
        heard = f"heard after {result.heard_after:.2f}s" if result.heard_after else "not heard"
        typer.echo(
            f"{room}: agent '{result.agent}' ({result.identity}) joined after "
            f"{result.joined_after:.2f}s, {heard}"
        )
    if not result.ok:
        raise typer.Exit(1)


@app.command("connect", cls=_Checked)
def connect(
    room: Annotated[str, typer.Option("--room", help="The room (it must exist).")],
    agent: Annotated[str, typer.Option("--agent", help="The agent to put into it.")],
    agents_dir: Annotated[
        Path | None,
        typer.Option(
            "--agents-dir",
            envvar="OPENRTC_AGENTS_DIR",
            help="Check the agent name against this directory before dispatching. "
            "Without it, a name the dispatchers do not know is caught by its dead letter "
            "(needs REDIS_URL).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the agent to join.")
    ] = DEFAULT_CONNECT_TIMEOUT,
    dispatcher_agent_name: Annotated[
        str,
        typer.Option(
            "--agent-name",
            envvar="OPENRTC_AGENT_NAME",
            help="The name the dispatchers register with LiveKit (their --agent-name): "
            "empty for automatic dispatch.",
        ),
    ] = "",
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: Annotated[
        str,
        typer.Option(
            "--redis-url",
            envvar="REDIS_URL",
            help="Redis URL: a dead letter of the job ends the wait at once (optional).",
        ),
    ] = "",
    namespace: Namespace = DEFAULT_NAMESPACE,
    json_output: JsonFlag = False,
) -> None:
    """Put an agent into an existing room now (an explicit dispatch through the
    dispatchers), and print its job id and identity once it joined. The people
    and agents already in the room are left alone."""
    import dataclasses

    import anyio

    from openrtc.ops.connect import connect_agent

    def fail(message: str) -> NoReturn:
        if json_output:
            _print_json({"error": message})
        _fail(message)

    if agents_dir is not None and (unknown := _unknown_agent(agents_dir, agent, room)):
        fail(unknown)

    async def go() -> Any:
        credentials = LiveKitSettings(livekit_url, api_key, api_secret)
        options: dict[str, Any] = {"dispatcher_agent_name": dispatcher_agent_name}
        if not redis_url:
            return await connect_agent(credentials, room, agent, within=timeout, **options)
        from openrtc.store.streams import connect_redis, service_keys

        client = connect_redis(redis_url)
        try:
            keys = service_keys(namespace, redis_url)
            return await connect_agent(
                credentials, room, agent, within=timeout, redis=client, keys=keys, **options
            )
        finally:
            await client.aclose()

    try:
        joined = anyio.run(go)
    except OpenRTCError as exc:  # ConnectError among them
        fail(str(exc))
    if json_output:
        _print_json(dataclasses.asdict(joined))
        return
    typer.echo(
        f"{room}: agent '{agent}' joined after {joined.joined_after:.2f}s:"
        f" job {joined.job_id}, identity {joined.identity}"
    )


def _unknown_agent(agents_dir: Path, agent: str, room: str) -> str:
    """The routing error a dispatcher with ``agents_dir`` would give ``connect``'s job, or ""."""
    from livekit.protocol.agent import Job
    from livekit.protocol.models import Room

    from openrtc.agents.routing import resolve_agent
    from openrtc.ops.connect import dispatch_metadata

    pool = _load_pool(agents_dir)
    job = Job(id="connect", metadata=dispatch_metadata(agent), room=Room(name=room))
    try:
        resolve_agent(job, pool.routing_table)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return ""


def _external_livekit(livekit_url: str, api_key: str, api_secret: str) -> LiveKitSettings | None:
    """The LiveKit ``openrtc dev`` is pointed at (``None``: it starts one); bad settings fail."""
    if not livekit_url:
        return None
    try:
        return LiveKitSettings(livekit_url, api_key, api_secret)
    except OpenRTCError as exc:
        _fail(str(exc))


def _dev_progress(line: str) -> None:
    # stderr: progress, not the stack's settings.
    typer.echo(f"[dev] {line}", err=True)


def _print_stack(stack: DevStack, pool: AgentPool, env_file: Path) -> None:
    """Where the running stack's pieces are; the API secret only in the env file."""
    typer.echo(f"LiveKit  {stack.livekit.url}  (API key {stack.livekit.api_key})")
    typer.echo(f"Redis    {redact_url(stack.redis.url)}")
    typer.echo(f"agents   {', '.join(pool.list_agents())} (one worker each)")
    for name, url in stack.http_urls.items():
        typer.echo(f"http     {url}  ({name}: /healthz /readyz /metrics)")
    typer.echo(f"settings {env_file} (includes the API secret; mode 0600)")
    typer.echo(f"try:     set -a; . {env_file}; set +a; openrtc status")
    typer.echo("Ctrl-C stops everything.")


@app.command("dev", cls=_Checked)
def dev(
    agents_dir_arg: AgentsDirPositional = None,
    agents_dir: AgentsDir = Path("agents"),
    env_file: Annotated[
        Path, typer.Option("--env-file", help="Where to write the stack's settings (mode 0600).")
    ] = Path(".openrtc/dev.env"),
    isolation: Annotated[
        IsolationMode, typer.Option("--isolation", help="coroutine or process.")
    ] = IsolationMode.COROUTINE,
    default_stt: DefaultStt = None,
    default_llm: DefaultLlm = None,
    default_tts: DefaultTts = None,
    default_greeting: DefaultGreeting = None,
    livekit_url: LiveKitUrl = "",
    api_key: ApiKey = "",
    api_secret: ApiSecret = "",
    redis_url: RedisUrl = "",
    namespace: Namespace = DEFAULT_NAMESPACE,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload/--no-reload",
            help="Hot reload: a saved agent module serves new calls, and live calls move "
            "to it at their next turn, with their conversation.",
        ),
    ] = True,
) -> None:
    """The whole stack on this machine: LiveKit, Redis, a dispatcher, a worker per agent.

    A server of a kind is started only when its URL (LIVEKIT_URL, REDIS_URL) is unset.
    """
    import anyio

    from openrtc.devtools.dev import dev_stack, write_env_file

    agents_dir = _agents_dir(agents_dir_arg, agents_dir)
    pool = _load_pool(
        agents_dir, _defaults(default_stt, default_llm, default_tts, default_greeting)
    )
    if len(pool) == 0:
        _fail("No agents are registered in the pool.")
    external_livekit = _external_livekit(livekit_url, api_key, api_secret)

    async def serve() -> None:
        from openrtc.supervision import stop_signals

        async with dev_stack(
            agents_dir,
            isolation="process" if isolation is IsolationMode.PROCESS else "coroutine",
            log_dir=env_file.parent / "logs",
            livekit=external_livekit,
            redis_url=redis_url or None,
            namespace=namespace,
            progress=_dev_progress,
            reload=reload,
        ) as stack:
            write_env_file(env_file, stack)
            _print_stack(stack, pool, env_file)
            stopped = anyio.Event()
            with stop_signals(lambda _: stopped.set(), lambda _: stopped.set()):
                await stopped.wait()

    freeze_imports()
    try:
        anyio.run(serve)
    except OpenRTCError as exc:
        _fail(str(exc))

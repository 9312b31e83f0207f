"""The ``openrtc`` application: the root group, its options, and what every command shares.

Every read command prints a readable table by default and machine-readable
JSON with ``--json``. Errors the operator can fix print one line on stderr and
exit 1; nothing here prints a traceback for them. The commands register
themselves on :data:`app` from their modules (:mod:`openrtc.cli.main` imports them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.console import Console

from openrtc import __version__
from openrtc.agents.registry import AgentPool
from openrtc.errors import OpenRTCError
from openrtc.ops.logs import LogFormat, configure_logging
from openrtc.settings import (
    DispatcherSettings,
    SettingError,
    WorkerSettings,
    check_numbers,
    default_of,
)

#: Root options also accepted after the subcommand (``openrtc status --log-level DEBUG``).
_ANYWHERE_OPTIONS = ("--log-level", "--log-format")


class _Root(typer.core.TyperGroup):
    """The root group: moves :data:`_ANYWHERE_OPTIONS` given after a subcommand to before it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # click's Context
        return super().parse_args(ctx, _hoist_root_options(args))


def _hoist_root_options(args: list[str]) -> list[str]:
    """``args`` with the root options found after the subcommand moved before it.

    Stops at ``--``; a value is the next word or follows ``=``.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            rest.extend(args[i:])
            break
        name = word.split("=", 1)[0]
        if name in _ANYWHERE_OPTIONS:
            if "=" in word or i + 1 >= len(args):
                front.append(word)
                i += 1
            else:
                front.extend(args[i : i + 2])
                i += 2
            continue
        rest.append(word)
        i += 1
    return front + rest


class _Checked(typer.core.TyperCommand):
    """A command whose numbers are checked against their bounds before it runs.

    The bounds live in :data:`openrtc.settings.NUMBERS`; a value outside
    them is one line naming its flag and variable, exit 2, and the command
    has not loaded an agent or connected to anything yet.
    """

    def invoke(self, ctx: Any) -> Any:  # click's Context
        try:
            check_numbers(ctx.params)
        except SettingError as exc:
            _fail(str(exc), 2)
        return super().invoke(ctx)


def _dispatcher_default(name: str) -> Any:
    return default_of(DispatcherSettings, name)


def _worker_default(name: str) -> Any:
    return default_of(WorkerSettings, name)


app = typer.Typer(
    name="openrtc",
    cls=_Root,
    help="Route LiveKit calls to voice agents over Redis streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# No markup: every cell is data from Redis ("[/x]" in a room name would raise).
_out = Console(highlight=False, soft_wrap=True, markup=False)

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
TenantsFile = Annotated[
    Path | None,
    typer.Option(
        "--tenants",
        envvar="OPENRTC_TENANTS",
        help="The tenants file (providers, greeting, credentials by reference, caps per "
        "tenant). Default: tenants.toml in the agents directory, if there is one.",
    ),
]
# The agents directory may also come first, as `openrtc list ./agents` (openrtc 0.20.1).
AgentsDirPositional = Annotated[
    Path | None,
    typer.Argument(
        help="Directory with one module per agent (the same as --agents-dir).",
        metavar="AGENTS_DIR",
        show_default=False,
    ),
]


class IsolationMode(StrEnum):
    """``--isolation`` values."""

    COROUTINE = "coroutine"
    PROCESS = "process"


class NoWorkerPolicyChoice(StrEnum):
    """``--when-no-worker`` values."""

    QUEUE = "queue"
    REJECT = "reject"


_ISOLATION = IsolationMode(_worker_default("isolation"))
_WHEN_NO_WORKER = NoWorkerPolicyChoice(_dispatcher_default("when_no_worker"))


# Provider defaults for agents that set none, named as in openrtc 0.20.1.
DefaultStt = Annotated[
    str | None,
    typer.Option(
        "--default-stt",
        envvar="OPENRTC_DEFAULT_STT",
        help="STT for agents whose @agent_config sets none (a LiveKit inference string).",
    ),
]
DefaultLlm = Annotated[
    str | None,
    typer.Option(
        "--default-llm",
        envvar="OPENRTC_DEFAULT_LLM",
        help="LLM for agents whose @agent_config sets none (a LiveKit inference string).",
    ),
]
DefaultTts = Annotated[
    str | None,
    typer.Option(
        "--default-tts",
        envvar="OPENRTC_DEFAULT_TTS",
        help="TTS for agents whose @agent_config sets none (a LiveKit inference string, "
        "or openrtc/tones for the offline tone TTS).",
    ),
]
DefaultGreeting = Annotated[
    str | None,
    typer.Option(
        "--default-greeting",
        envvar="OPENRTC_DEFAULT_GREETING",
        help="Greeting for agents whose @agent_config sets none.",
    ),
]


def _agents_dir(positional: Path | None, option: Path) -> Path:
    """The agents directory: the positional one, else ``--agents-dir`` (or its variable).

    Both on the command line and different is an error; the variable (and the
    default, ``agents``) give way to the positional one.
    """
    if positional is None:
        return option
    from_env = os.environ.get("OPENRTC_AGENTS_DIR")
    if option not in (positional, Path("agents")) and (
        from_env is None or option != Path(from_env)
    ):
        _fail(f"the agents directory is given twice ({positional} and --agents-dir {option})", 2)
    return positional


def _defaults(
    stt: str | None, llm: str | None, tts: str | None, greeting: str | None
) -> dict[str, str | None]:
    """Provider defaults for the pool, also exported for the processes this one starts."""
    from openrtc.agents.compat import export_provider_defaults

    defaults = {
        "default_stt": stt,
        "default_llm": llm,
        "default_tts": tts,
        "default_greeting": greeting,
    }
    export_provider_defaults(defaults)
    return defaults


def _fail(message: str, code: int = 1) -> NoReturn:
    # A message of several problems (a tenants file's) is one error line each.
    for line in message.splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _load_pool(agents_dir: Path, defaults: dict[str, str | None] | None = None) -> AgentPool:
    try:
        return AgentPool.from_directory(agents_dir, **(defaults or {}))
    except OpenRTCError as exc:
        _fail(str(exc))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"openrtc {__version__}")
        raise typer.Exit()


_SERVICES = frozenset({"dispatcher", "worker", "dev"})


@app.callback()
def _root(
    ctx: typer.Context,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            envvar="OPENRTC_LOG_LEVEL",
            help="DEBUG, INFO, WARNING... [default: INFO for services, WARNING otherwise]"
            " (also accepted after the command)",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="OPENRTC_LOG_FORMAT",
            help="text, or json: one object per line with the job's id, agent and room"
            " (also accepted after the command)",
        ),
    ] = LogFormat.TEXT,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    if log_level is None:
        log_level = "INFO" if ctx.invoked_subcommand in _SERVICES else "WARNING"
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}", 2)
    configure_logging(level, log_format)


LiveKitUrl = Annotated[
    str, typer.Option("--livekit-url", envvar="LIVEKIT_URL", help="LiveKit server URL.")
]
ApiKey = Annotated[
    str, typer.Option("--api-key", envvar="LIVEKIT_API_KEY", help="LiveKit API key.")
]
ApiSecret = Annotated[
    str,
    typer.Option(
        "--api-secret",
        envvar="LIVEKIT_API_SECRET",
        help="LiveKit API secret (prefer the variable: flags show in `ps`).",
        show_default=False,
    ),
]
RedisUrl = Annotated[str, typer.Option("--redis-url", envvar="REDIS_URL", help="Redis URL.")]
Namespace = Annotated[
    str, typer.Option("--namespace", envvar="OPENRTC_NAMESPACE", help="Redis key namespace.")
]

SigningKeyFile = Annotated[
    Path | None,
    typer.Option(
        "--signing-key-file",
        envvar="OPENRTC_SIGNING_KEY_FILE",
        help="File holding the key that signs entries and checkpoints (first line), and "
        "optionally the previous key, still accepted (second line). Or set "
        "OPENRTC_SIGNING_KEY (and OPENRTC_SIGNING_KEY_PREVIOUS).",
        show_default=False,
    ),
]
RequireSigning = Annotated[
    bool,
    typer.Option(
        "--require-signing/--no-require-signing",
        envvar="OPENRTC_REQUIRE_SIGNING",
        help="Refuse to start without a signing key (for a Redis others can write to).",
    ),
]

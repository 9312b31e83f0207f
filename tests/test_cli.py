"""The ``openrtc`` command line: ``list``, ``route``, ``--version`` and its error handling."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
from click.testing import Result
from redis import Redis as SyncRedis
from typer.testing import CliRunner

from openrtc.cli.main import app
from openrtc.devtools.devstack import RedisServer
from openrtc.settings import NUMBERS, DispatcherSettings, WorkerSettings, default_of

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_AGENTS = REPO_ROOT / "examples" / "agents"
OFFLINE_AGENTS = REPO_ROOT / "examples" / "offline_agents"

# click >= 8.2 (the installed one) always captures stderr apart from stdout:
# result.stdout / result.stderr, and result.output interleaves both.
runner = CliRunner()

_CLEAN_ENV = {"OPENRTC_AGENTS_DIR": None, "OPENRTC_LOG_LEVEL": None, "NO_COLOR": "1"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def invoke(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    result = runner.invoke(
        app, [str(a) for a in args], env={**_CLEAN_ENV, **(env or {})}, catch_exceptions=False
    )
    assert "Traceback" not in result.output
    return result


OFFLINE_ROWS = [
    {
        "name": "dental",
        "class": "dental.py:OfflineDental",
        "stt": None,
        "llm": "openrtc.OfflineLLM(rules)",
        "tts": "openrtc.ToneTTS(tones)",
        "greeting": "Bright Smile Dental, offline line. How can we help you today?",
    },
    {
        "name": "restaurant",
        "class": "restaurant.py:OfflineRestaurant",
        "stt": None,
        "llm": "openrtc.OfflineLLM(rules)",
        "tts": "openrtc.ToneTTS(tones)",
        "greeting": "Trattoria Luca, offline line. A table for how many?",
    },
    {
        "name": "support",
        "class": "support.py:OfflineSupport",
        "stt": None,
        "llm": "openrtc.OfflineLLM(rules)",
        "tts": "openrtc.ToneTTS(tones)",
        "greeting": "Support desk, offline line. Tell us what went wrong.",
    },
]

# openrtc 0.20.1's shape (class is the class's name), ours as extra keys.
OFFLINE_LIST = {
    "schema_version": 2,
    "command": "list",
    "agents": [
        {**row, "class": str(row["class"]).split(":")[1], "class_label": row["class"]}
        for row in OFFLINE_ROWS
    ],
}

# --------------------------------------------------------------------------- list


def test_list_table_names_every_agent_in_order() -> None:
    # Wide enough that the table does not wrap the greetings.
    result = invoke("list", "--agents-dir", OFFLINE_AGENTS, env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = _ANSI.sub("", result.stdout)
    assert "registration order" in out
    positions = [out.find(f" {name} ") for name in ("dental", "restaurant", "support")]
    assert all(p >= 0 for p in positions), out
    assert positions == sorted(positions), out
    assert "Bright Smile" in out


def test_list_plain() -> None:
    result = invoke("list", "--agents-dir", OFFLINE_AGENTS, "--plain")

    assert result.exit_code == 0, result.output
    tone = "openrtc.ToneTTS(tones)"
    llm = "openrtc.OfflineLLM(rules)"
    assert result.stdout.splitlines() == [
        "\t".join((str(row["name"]), str(row["class"]), "-", llm, tone, str(row["greeting"])))
        for row in OFFLINE_ROWS
    ]


def test_list_plain_shows_providers() -> None:
    result = invoke("list", "--agents-dir", EXAMPLE_AGENTS, "--plain")

    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[:5] for row in rows] == [
        [
            "dental",
            "dental.py:DentalReceptionist",
            "deepgram/nova-3",
            "openai/gpt-4.1-mini",
            "cartesia/sonic-2",
        ],
        [
            "restaurant",
            "restaurant.py:RestaurantHost",
            "deepgram/nova-3",
            "openai/gpt-4.1-mini",
            "cartesia/sonic-2",
        ],
    ]
    assert all(len(row) == 6 for row in rows)


def test_list_json() -> None:
    result = invoke("list", "--agents-dir", OFFLINE_AGENTS, "--json")

    assert result.exit_code == 0, result.output
    # openrtc 0.20.1's shape (class is the class's name), ours as extra keys.
    assert json.loads(result.stdout) == OFFLINE_LIST


def test_list_json_with_providers() -> None:
    result = invoke("list", "--agents-dir", EXAMPLE_AGENTS, "--json")

    assert result.exit_code == 0, result.output
    agents = json.loads(result.stdout)["agents"]
    assert [a["name"] for a in agents] == ["dental", "restaurant"]
    assert agents[0] == {
        "name": "dental",
        "class": "DentalReceptionist",
        "class_label": "dental.py:DentalReceptionist",
        "stt": "deepgram/nova-3",
        "llm": "openai/gpt-4.1-mini",
        "tts": "cartesia/sonic-2",
        "greeting": "Thanks for calling Bright Smile Dental. How can I help you today?",
    }


def test_agents_dir_from_environment() -> None:
    result = invoke("list", "--plain", env={"OPENRTC_AGENTS_DIR": str(OFFLINE_AGENTS)})

    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [
        "dental",
        "restaurant",
        "support",
    ]


def test_default_agents_dir_is_agents_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = invoke("list")
    assert missing.exit_code == 1
    assert missing.stderr == "error: Agents directory 'agents' does not exist.\n"

    shutil.copytree(OFFLINE_AGENTS, tmp_path / "agents")
    found = invoke("list", "--json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout) == OFFLINE_LIST


# --------------------------------------------------------------------------- route

ROUTES = [
    (["--room", "dental-call-1234"], "dental", 5, "room name prefix"),
    (["--room", "restaurant-room-42"], "restaurant", 5, "room name prefix"),
    (["--room", "general-chat"], "dental", 6, "default fallback"),
    ([], "dental", 6, "default fallback"),
    (["--job-metadata", '{"agent": "restaurant"}'], "restaurant", 1, "job metadata"),
    (["--job-metadata", '{"demo": "restaurant"}'], "restaurant", 2, "job metadata"),
    (["--room-metadata", '{"agent": "restaurant"}'], "restaurant", 3, "room metadata"),
    (["--room-metadata", '{"demo": "restaurant"}'], "restaurant", 4, "room metadata"),
    # Earlier steps win over later ones.
    (
        ["--job-metadata", '{"demo": "restaurant"}', "--room-metadata", '{"agent": "dental"}'],
        "restaurant",
        2,
        "job metadata",
    ),
    (
        ["--room-metadata", '{"agent": "restaurant"}', "--room", "dental-call-1"],
        "restaurant",
        3,
        "room metadata",
    ),
    (["--job-metadata", "not json", "--room", "restaurant-1"], "restaurant", 5, "room name prefix"),
]


@pytest.mark.parametrize(("args", "agent", "step", "source"), ROUTES)
def test_route_json(args: list[str], agent: str, step: int, source: str) -> None:
    result = invoke("route", "--agents-dir", EXAMPLE_AGENTS, *args, "--json")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert json.loads(result.stdout) == {"agent": agent, "step": step, "source": source}


@pytest.mark.parametrize(("args", "agent", "step", "source"), ROUTES)
def test_route_human_names_agent_and_step(
    args: list[str], agent: str, step: int, source: str
) -> None:
    result = invoke("route", "--agents-dir", EXAMPLE_AGENTS, *args)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"agent: {agent}"
    assert lines[1].startswith(f"step:  {step} (")
    assert len(lines) > 2
    assert all(line.startswith("  step") for line in lines[2:])


def test_route_human_explains_a_prefix_match() -> None:
    result = invoke("route", "--agents-dir", EXAMPLE_AGENTS, "--room", "dental-call-1234")

    assert result.exit_code == 0, result.output
    assert result.stdout == textwrap.dedent(
        """\
        agent: dental
        step:  5 (room name prefix)
          steps 1-2: job metadata empty
          steps 3-4: room metadata empty
          step 5: room 'dental-call-1234' starts with 'dental-'
        """
    )


def test_route_human_explains_the_default() -> None:
    result = invoke("route", "--agents-dir", EXAMPLE_AGENTS, "--room", "general-chat")

    assert result.exit_code == 0, result.output
    assert result.stdout == textwrap.dedent(
        """\
        agent: dental
        step:  6 (default (first registered agent))
          steps 1-2: job metadata empty
          steps 3-4: room metadata empty
          step 5: no registered '<agent>-' prefix on room 'general-chat'
          step 6: default to the first registered agent, 'dental'
        """
    )


def test_route_human_explains_job_metadata() -> None:
    result = invoke(
        "route", "--agents-dir", EXAMPLE_AGENTS, "--job-metadata", '{"demo": "restaurant"}'
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == textwrap.dedent(
        """\
        agent: restaurant
        step:  2 (job metadata "demo" key)
          step 1: job metadata: no "agent" key
          step 2: job metadata "demo" names 'restaurant', registered
        """
    )


# --------------------------------------------------------------------------- route errors


@pytest.mark.parametrize(
    ("option", "metadata", "where"),
    [
        ("--job-metadata", '{"agent": "ghost"}', "job metadata"),
        ("--job-metadata", '{"demo": "ghost"}', "job metadata"),
        ("--room-metadata", '{"agent": "ghost"}', "room metadata"),
        ("--room-metadata", '{"demo": "ghost"}', "room metadata"),
    ],
)
def test_route_unknown_agent(option: str, metadata: str, where: str) -> None:
    message = f"Unknown agent 'ghost' requested via {where}."

    result = invoke("route", "--agents-dir", EXAMPLE_AGENTS, option, metadata, "--room", "dental-1")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"

    as_json = invoke(
        "route", "--agents-dir", EXAMPLE_AGENTS, option, metadata, "--room", "dental-1", "--json"
    )
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {"error": message}
    assert as_json.stderr == f"error: {message}\n"


def test_route_with_an_empty_registry(tmp_path: Path) -> None:
    (tmp_path / "_shared.py").write_text("", encoding="utf-8")

    result = invoke("route", "--agents-dir", tmp_path, "--room", "dental-1")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "error: No agents are registered in the pool.\n"

    as_json = invoke("route", "--agents-dir", tmp_path, "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {"error": "No agents are registered in the pool."}


def test_list_with_an_empty_registry(tmp_path: Path) -> None:
    result = invoke("list", "--agents-dir", tmp_path)
    assert result.exit_code == 0
    assert f"No agents in {tmp_path}" in result.stdout
    assert json.loads(invoke("list", "--agents-dir", tmp_path, "--json").stdout) == {
        "schema_version": 2,
        "command": "list",
        "agents": [],
    }


@pytest.mark.parametrize("command", ["route", "list"])
def test_missing_directory(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nowhere"

    result = invoke(command, "--agents-dir", missing, "--json")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"error: Agents directory {str(missing)!r} does not exist.\n"
    assert "Traceback" not in result.output


def test_agents_dir_that_is_a_file() -> None:
    path = EXAMPLE_AGENTS / "dental.py"
    result = invoke("list", "--agents-dir", path)
    assert result.exit_code == 1
    assert result.stderr == f"error: Agents directory {str(path)!r} is not a directory.\n"


def test_broken_module_is_reported_by_file_name(tmp_path: Path) -> None:
    (tmp_path / "dental.py").write_text(
        "from livekit.agents import Agent\n\nclass Dental(Agent):\n    pass\n", encoding="utf-8"
    )
    (tmp_path / "wonky.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")

    for command in ("list", "route"):
        result = invoke(command, "--agents-dir", tmp_path)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == (
            "error: Failed to import agent module wonky.py: RuntimeError: boom\n"
        )


def test_duplicate_agent_names_are_reported(tmp_path: Path) -> None:
    for filename in ("a.py", "b.py"):
        (tmp_path / filename).write_text(
            "from livekit.agents import Agent\nfrom openrtc import agent_config\n\n"
            '@agent_config(name="dental")\nclass Dental(Agent):\n    pass\n',
            encoding="utf-8",
        )

    result = invoke("list", "--agents-dir", tmp_path)

    assert result.exit_code == 1
    assert result.stderr == (
        "error: Agent 'dental' is already registered (from a.py; again in b.py).\n"
    )


def test_unknown_log_level() -> None:
    result = invoke("--log-level", "chatty", "list", "--agents-dir", OFFLINE_AGENTS)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "error: unknown log level 'chatty'\n"


# --------------------------------------------------------------------------- version, script


def test_version() -> None:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        expected = tomllib.load(f)["project"]["version"]

    result = invoke("--version")

    assert result.exit_code == 0
    assert result.stdout == f"openrtc {expected}\n"


def test_console_script_entry_point() -> None:
    script = shutil.which("openrtc", path=os.path.dirname(sys.executable))
    assert script is not None, f"no openrtc console script next to {sys.executable}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRTC_")}

    completed = subprocess.run(
        [script, "list", "--agents-dir", str(OFFLINE_AGENTS), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == OFFLINE_LIST


def test_the_worker_takes_idle_processes_as_a_flag_and_a_variable() -> None:
    result = invoke("worker", "--help", env={"COLUMNS": "200"})

    assert result.exit_code == 0
    assert "--idle-processes" in result.stdout
    assert "OPENRTC_IDLE_PROCESSES" in result.stdout


def _commands() -> list[tuple[list[str], Any]]:
    """Every command of ``openrtc``, with the words that name it (``["dlq", "list"]``)."""
    found: list[tuple[list[str], Any]] = []

    def walk(path: list[str], command: Any) -> None:
        if hasattr(command, "commands"):  # a group
            for name, sub in command.commands.items():
                walk([*path, name], sub)
        else:
            found.append((path, command))

    walk([], typer.main.get_command(app))
    return found


def _numeric_options() -> list[tuple[list[str], Any, Any]]:
    """Every option of every command that takes a number, read from the app itself."""
    return [
        (path, command, param)
        for path, command in _commands()
        for param in command.params
        if param.param_type_name == "option"
        and not param.is_flag
        and _type_name(param) in ("int", "float")
    ]


def _type_name(param: Any) -> str:
    kind = param.bare_type()  # a class, or its name where annotations are postponed
    return str(getattr(kind, "__name__", kind))


NUMERIC_OPTIONS = _numeric_options()


def _required(command: Any) -> list[str]:
    """Stand-in values for what ``command`` cannot run without."""
    words: list[str] = []
    for param in command.params:
        if param.required and param.param_type_name == "option":
            words += [param.opts[0], "dental"]
        elif param.required:
            words.append("0-1")
    return words


def test_every_numeric_option_is_found() -> None:
    named = {(" ".join(path), param.opts[0]) for path, _, param in NUMERIC_OPTIONS}
    assert {("worker", "--max-queue-age"), ("worker", "--drain-timeout")} <= named
    assert {("dispatcher", "--max-backlog"), ("status", "--interval")} <= named
    assert len(named) >= 24


@pytest.mark.parametrize(
    ("path", "command", "param"),
    NUMERIC_OPTIONS,
    ids=[f"{' '.join(p)} {o.opts[0]}" for p, _, o in NUMERIC_OPTIONS],
)
def test_every_numeric_option_is_refused_out_of_bounds_in_one_line_before_it_runs(
    path: list[str], command: Any, param: Any
) -> None:
    """Flag and variable alike: one line naming both, exit 2, and nothing run (a
    worker would load agents from ./agents, a status would dial this Redis)."""
    assert param.name in NUMBERS, f"{' '.join(path)} {param.opts[0]}: add it to NUMBERS"
    bound = NUMBERS[param.name]
    # The table knows the option as the command line does: one home for both.
    assert bound.flag in param.opts
    assert bound.env == (param.envvar or "")
    integer = _type_name(param) == "int"
    bad = int(bound.high) + 1 if integer else bound.high * 10
    env: dict[str, str | None] = {"REDIS_URL": "redis://127.0.0.1:1/0", "LIVEKIT_URL": None}
    given = [(["--" + param.opts[0].lstrip("-"), str(bad)], {})]
    if bound.env:
        given.append(([], {bound.env: str(bad)}))
    below = bound.low if bound.above else bound.low - 1
    if below != bound.off:
        given.append(([param.opts[0], str(int(below) if integer else below)], {}))
    for words, variables in given:
        result = invoke(*path, *_required(command), *words, env={**env, **variables})
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {bound.label(param.name)} must be "), lines[0]
        if bound.env:
            assert bound.env in lines[0]


@pytest.mark.parametrize(
    ("command", "flags", "env", "named"),
    [
        (["worker"], ["--max-queue-age", "0"], {}, "--max-queue-age (OPENRTC_MAX_QUEUE_AGE)"),
        (["worker"], [], {"OPENRTC_MAX_QUEUE_AGE": "0"}, "--max-queue-age"),
        (["worker"], ["--max-queue-age", "-3"], {}, "--max-queue-age"),
        (["worker"], ["--drain-timeout", "0"], {}, "--drain-timeout (OPENRTC_DRAIN_TIMEOUT)"),
        (["worker"], ["--checkpoint-max-bytes", "600000000"], {}, "--checkpoint-max-bytes"),
        (["dispatcher"], ["--reconcile-interval", "-1"], {}, "--reconcile-interval"),
        (["dispatcher"], [], {"OPENRTC_MAX_BACKLOG": "-1"}, "--max-backlog (OPENRTC_MAX_BACKLOG)"),
    ],
)
def test_a_service_with_a_setting_that_would_lose_calls_does_not_start(
    redis_server: RedisServer,
    command: list[str],
    flags: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    """The real ``openrtc worker`` / ``dispatcher`` against a real Redis: one
    line, a non-zero exit, and Redis never hears from it."""
    watcher = SyncRedis.from_url(redis_server.url)
    try:
        before = watcher.info("stats")["total_connections_received"]
        args = ["--agent", "dental"] if command == ["worker"] else []
        completed = subprocess.run(
            [sys.executable, "-m", "openrtc", *command, *args, *flags],
            env={
                **os.environ,
                "REDIS_URL": redis_server.url,
                "LIVEKIT_URL": "ws://127.0.0.1:7880",
                "LIVEKIT_API_KEY": "key",
                "LIVEKIT_API_SECRET": "secret",
                "OPENRTC_AGENTS_DIR": str(OFFLINE_AGENTS),
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        after = watcher.info("stats")["total_connections_received"]
    finally:
        watcher.close()
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"error: {named}"), lines[0]
    assert completed.stdout == ""
    assert after == before  # not one connection


@pytest.mark.parametrize(
    ("command", "settings"), [("worker", WorkerSettings), ("dispatcher", DispatcherSettings)]
)
def test_the_service_commands_default_to_what_settings_py_says(
    command: str, settings: type
) -> None:
    """One home per default: each option named like a settings field has its default."""
    options = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    # --http-port: unset means the service's own port, with a fallback (see _http_port).
    defaults = {
        f.name for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING
    }
    shared = defaults & options.keys() - {"http_port"}
    assert len(shared) >= (15 if command == "worker" else 8)
    for name in sorted(shared):
        assert options[name].default == default_of(settings, name), name

"""Hot reload's policy and the registry's reload: files written to ``tmp_path``, imported for real.

Which agents a save touches (:mod:`openrtc.agents.reloading`), and
:meth:`AgentPool.reload`: a module that fails keeps the old code registered,
and the one line a developer reads says which file, which line, what error.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from openrtc.agents.registry import AgentPool
from openrtc.agents.reloading import affected, imported_names, reload_agents
from tests.support.paths import forget_agents_dir

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("import a", {"a"}),
        ("import a.b as c", {"a", "a.b"}),
        ("from a.b import c, d", {"a", "a.b", "a.b.c", "a.b.d"}),
        ("from . import sibling", set()),
        ("from .pkg import x", set()),
        ("def f():\n    import inner\n", {"inner"}),
        ("import a\ndef (:", set()),  # does not parse: its import says why
        ("x = 'import nothing'", set()),
    ],
)
def test_imported_names(source: str, names: set[str]) -> None:
    assert imported_names(source) == names


A, B, H, H2, LONE = (Path(f"/agents/{n}.py") for n in ("a", "b", "_h", "_h2", "lone"))
GRAPH = {A: {H}, B: {H2}, H2: {H}, H: set(), LONE: set()}


@pytest.mark.parametrize(
    ("changed", "touched"),
    [
        ({A}, {A}),
        ({H}, {H, A, H2, B}),  # B imports H through H2
        ({H2}, {H2, B}),
        ({LONE}, {LONE}),
        ({Path("/agents/new.py")}, {Path("/agents/new.py")}),
        (set(), set()),
    ],
)
def test_affected_follows_imports_back_to_the_agents(
    changed: set[Path], touched: set[Path]
) -> None:
    assert affected(GRAPH, changed) == touched


def test_affected_terminates_on_an_import_cycle() -> None:
    assert affected({A: {H}, H: {A}}, {H}) == {A, H}


AGENT = """
from livekit.agents import Agent
from openrtc import agent_config
from _words import WORD


@agent_config(name="{name}", greeting=WORD + "{greeting}")
class Echo(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="echo")
"""


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source).lstrip())
    return path


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "agents"
    directory.mkdir()
    write(directory, "_words.py", "WORD = 'hello'\n")
    write(directory, "echo.py", AGENT.format(name="echo", greeting=" one"))
    write(
        directory,
        "other.py",
        AGENT.format(name="other", greeting=" two").replace(
            "from _words import WORD", "WORD = 'hi'"
        ),
    )
    yield directory
    forget_agents_dir(directory)


def test_a_good_save_replaces_the_agent_and_a_helper_save_reloads_its_importers(
    agents: Path,
) -> None:
    pool = AgentPool.from_directory(agents)
    echo, other = pool.get("echo"), pool.get("other")
    assert echo.greeting == "hello one"

    write(agents, "echo.py", AGENT.format(name="echo", greeting=" again"))
    result = reload_agents(pool, agents, {agents / "echo.py"})
    assert [c.name for c in result.configs] == ["echo"]
    assert not result.errors
    assert pool.get("echo").greeting == "hello again"
    assert pool.get("echo").agent_cls is not echo.agent_cls
    assert pool.get("other") is other

    write(agents, "_words.py", "WORD = 'howdy'\n")
    result = reload_agents(pool, agents, {agents / "_words.py"})
    assert [c.name for c in result.configs] == ["echo"]  # other does not import it
    assert pool.get("echo").greeting == "howdy again"
    assert pool.get("other") is other


BROKEN = [
    # (file, what is written, the line the developer reads)
    ("echo.py", AGENT.format(name="echo", greeting="") + "def (:\n", "echo.py:10: SyntaxError:"),
    (
        "echo.py",
        AGENT.format(name="echo", greeting="") + "raise RuntimeError('no key')\n",
        "echo.py:10: RuntimeError: no key",
    ),
    ("_words.py", "WORD = 'x'\nraise KeyError('w')\n", "_words.py:2: KeyError: 'w'"),
    (
        "echo.py",
        AGENT.format(name="bad name", greeting=""),
        "echo.py:6: AgentRegistryError: Invalid agent name 'bad name'",
    ),
    (
        "echo.py",
        "from livekit.agents import Agent\n",
        "echo.py: Agent module echo.py defines no livekit.agents.Agent subclass.",
    ),
    (
        "echo.py",
        AGENT.format(name="renamed", greeting=""),
        "echo.py: echo.py now registers agent 'renamed', not 'echo'",
    ),
]


@pytest.mark.parametrize(("file", "source", "line"), BROKEN)
def test_a_save_that_fails_keeps_the_old_code_and_says_where(
    agents: Path, file: str, source: str, line: str
) -> None:
    pool = AgentPool.from_directory(agents)
    before = pool.get("echo")
    module = sys.modules[before.agent_cls.__module__]
    write(agents, file, source)

    result = reload_agents(pool, agents, {agents / file})

    assert result.configs == []
    (error,) = result.errors
    assert error.startswith(line), error
    assert "\n" not in error
    assert pool.get("echo") is before
    assert sys.modules[before.agent_cls.__module__] is module
    # The next good save reloads.
    write(agents, "_words.py", "WORD = 'hello'\n")
    write(agents, "echo.py", AGENT.format(name="echo", greeting=" fixed"))
    result = reload_agents(pool, agents, {agents / file})
    assert [c.greeting for c in result.configs] == ["hello fixed"], result.errors

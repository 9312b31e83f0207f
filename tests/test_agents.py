"""The agent registry: ``@agent_config``, ``AgentPool`` and directory discovery.

Agent modules are written into ``tmp_path`` and imported for real; nothing of
openrtc is mocked.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from livekit.agents import Agent

from openrtc import OpenRTCError
from openrtc.agents.registry import AgentConfig, AgentPool, agent_config, describe_provider
from openrtc.agents.routing import Route, resolve_agent
from openrtc.errors import AgentDiscoveryError, AgentRegistryError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_AGENTS = REPO_ROOT / "examples" / "agents"
OFFLINE_AGENTS = REPO_ROOT / "examples" / "offline_agents"


# --------------------------------------------------------------------------- helpers


def write_module(directory: Path, filename: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    return path


def agent_source(cls: str, decorator: str = "") -> str:
    """A one-agent module; ``decorator`` is the ``@agent_config(...)`` line, if any."""
    return (
        "from livekit.agents import Agent\n"
        "from openrtc import agent_config\n\n"
        f"{decorator}\n"
        f"class {cls}(Agent):\n"
        "    def __init__(self) -> None:\n"
        f"        super().__init__(instructions={cls!r})\n"
    )


def job(*, metadata: object = "", room: str = "", room_metadata: object = "") -> SimpleNamespace:
    return SimpleNamespace(
        metadata=metadata, room=SimpleNamespace(name=room, metadata=room_metadata)
    )


def single_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message


class HelperAgent(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="helper")


class OtherHelperAgent(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="other helper")


@pytest.fixture(autouse=True)
def _no_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    # Some tests rewrite a module in place; a stale .pyc must not mask the edit.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


# --------------------------------------------------------------------------- discovery


def test_registration_order_is_sorted_file_name_order(tmp_path: Path) -> None:
    for stem in ("b", "a", "c"):  # written out of order on purpose
        write_module(tmp_path, f"{stem}.py", agent_source(f"Agent{stem.upper()}"))

    pool = AgentPool.from_directory(tmp_path)

    assert pool.list_agents() == ["a", "b", "c"]
    assert [config.agent_cls.__name__ for config in pool] == ["AgentA", "AgentB", "AgentC"]
    assert [config.source_path for config in pool] == [
        (tmp_path / f"{stem}.py").resolve() for stem in ("a", "b", "c")
    ]


def test_discover_returns_added_configs_in_order(tmp_path: Path) -> None:
    write_module(tmp_path, "zulu.py", agent_source("Zulu"))
    write_module(tmp_path, "alpha.py", agent_source("Alpha"))
    pool = AgentPool()

    added = pool.discover(str(tmp_path))  # a str path works as well as a Path

    assert [config.name for config in added] == ["alpha", "zulu"]
    assert added == list(pool)


def test_underscore_modules_and_package_init_are_skipped(tmp_path: Path) -> None:
    # Importing either of these would fail discovery, so success proves they were skipped.
    write_module(tmp_path, "__init__.py", "raise RuntimeError('__init__.py must not be imported')")
    write_module(tmp_path, "_helpers.py", "raise RuntimeError('_helpers.py must not be imported')")
    write_module(tmp_path, "_private_agent.py", agent_source("PrivateAgent"))
    write_module(tmp_path, "dental.py", agent_source("Dental"))

    pool = AgentPool.from_directory(tmp_path)

    assert pool.list_agents() == ["dental"]


def test_name_comes_from_decorator_or_file_stem(tmp_path: Path) -> None:
    write_module(tmp_path, "a_file.py", agent_source("Named", '@agent_config(name="front_desk")'))
    write_module(tmp_path, "b_file.py", agent_source("Unnamed"))
    write_module(tmp_path, "c_file.py", agent_source("Greeter", '@agent_config(greeting="Hi!")'))

    pool = AgentPool.from_directory(tmp_path)

    assert pool.list_agents() == ["front_desk", "b_file", "c_file"]
    assert pool.get("front_desk").agent_cls.__name__ == "Named"
    assert pool.get("b_file").agent_cls.__name__ == "Unnamed"


def test_providers_and_greeting_come_from_the_decorator(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "dental.py",
        agent_source(
            "Dental",
            '@agent_config(stt="deepgram/nova-3", llm="openai/gpt-4.1-mini", '
            'tts="cartesia/sonic-2", greeting="  Bright Smile Dental.  ")',
        ),
    )

    config = AgentPool.from_directory(tmp_path).get("dental")

    assert (config.stt, config.llm, config.tts) == (
        "deepgram/nova-3",
        "openai/gpt-4.1-mini",
        "cartesia/sonic-2",
    )
    assert config.greeting == "Bright Smile Dental."  # stripped by the decorator


def test_provider_objects_pass_through_unchanged(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "plugged.py",
        """
        from types import SimpleNamespace

        from livekit.agents import Agent
        from openrtc import agent_config

        STT = SimpleNamespace(model="nova-3")
        LLM = object()

        @agent_config(stt=STT, llm=LLM, tts="cartesia/sonic-2")
        class Plugged(Agent):
            pass
        """,
    )

    config = AgentPool.from_directory(tmp_path).get("plugged")
    module = sys.modules[config.agent_cls.__module__]

    assert config.stt is module.STT
    assert config.llm is module.LLM
    assert config.tts == "cartesia/sonic-2"


def test_pool_defaults_fill_only_unset_providers(tmp_path: Path) -> None:
    default_stt = SimpleNamespace(model="default-stt")  # a plugin-like object
    write_module(
        tmp_path,
        "custom.py",
        agent_source(
            "Custom",
            '@agent_config(llm="anthropic/claude-sonnet", greeting="Custom hello")',
        ),
    )
    write_module(tmp_path, "plain.py", agent_source("Plain"))

    pool = AgentPool.from_directory(
        tmp_path,
        default_stt=default_stt,
        default_llm="openai/gpt-4.1-mini",
        default_greeting="Default hello",
    )

    custom, plain = pool.get("custom"), pool.get("plain")
    assert custom.stt is default_stt
    assert custom.llm == "anthropic/claude-sonnet"  # its own, not the default
    assert custom.tts is None  # no default for tts
    assert custom.greeting == "Custom hello"
    assert plain.stt is default_stt
    assert plain.llm == "openai/gpt-4.1-mini"
    assert plain.tts is None
    assert plain.greeting == "Default hello"


def test_pool_defaults_apply_to_add() -> None:
    default_tts = object()
    pool = AgentPool(default_stt="deepgram/nova-3", default_tts=default_tts)

    own = pool.add("own", HelperAgent, stt="assemblyai/universal", tts="cartesia/sonic-2")
    inherited = pool.add("inherited", OtherHelperAgent)

    assert (own.stt, own.tts) == ("assemblyai/universal", "cartesia/sonic-2")
    assert inherited.stt == "deepgram/nova-3"
    assert inherited.tts is default_tts
    assert inherited.llm is None


# --------------------------------------------------------------------------- AgentPool.add


def test_add_registers_in_call_order() -> None:
    pool = AgentPool()
    zeta = pool.add("zeta", HelperAgent)
    alpha = pool.add("alpha", OtherHelperAgent, llm="openai/gpt-4.1-mini")
    mid = pool.add("mid", HelperAgent)

    assert pool.list_agents() == ["zeta", "alpha", "mid"]
    assert list(pool) == [zeta, alpha, mid]
    assert len(pool) == 3
    assert "alpha" in pool
    assert "omega" not in pool
    assert pool.get("alpha") is alpha
    assert alpha.agent_cls is OtherHelperAgent
    assert alpha.llm == "openai/gpt-4.1-mini"
    assert alpha.source_path is None
    assert pool.routing_table.names == ("zeta", "alpha", "mid")


def test_empty_pool() -> None:
    pool = AgentPool()
    assert len(pool) == 0
    assert pool.list_agents() == []
    assert list(pool) == []


def test_get_unknown_agent_raises_key_error() -> None:
    pool = AgentPool()
    pool.add("dental", HelperAgent)
    with pytest.raises(KeyError, match="Unknown agent 'ghost'"):
        pool.get("ghost")


def test_add_strips_surrounding_whitespace_from_the_name() -> None:
    pool = AgentPool()
    config = pool.add("  dental\n", HelperAgent)
    assert config.name == "dental"
    assert pool.list_agents() == ["dental"]
    with pytest.raises(AgentRegistryError, match="'dental' is already registered"):
        pool.add("dental ", OtherHelperAgent)


def test_add_rejects_duplicate_names() -> None:
    pool = AgentPool()
    pool.add("dental", HelperAgent)
    with pytest.raises(AgentRegistryError) as excinfo:
        pool.add("dental", OtherHelperAgent)
    assert single_line(excinfo.value) == "Agent 'dental' is already registered."
    assert pool.get("dental").agent_cls is HelperAgent  # the first one stays
    assert len(pool) == 1


@pytest.mark.parametrize("not_an_agent", [object, int, "HelperAgent", HelperAgent()])
def test_add_rejects_non_agent_classes(not_an_agent: object) -> None:
    pool = AgentPool()
    with pytest.raises(AgentRegistryError) as excinfo:
        pool.add("dental", not_an_agent)  # type: ignore[arg-type]
    message = single_line(excinfo.value)
    assert message.startswith("Agent 'dental': ")
    assert message.endswith("is not a livekit.agents.Agent subclass.")
    assert "dental" not in pool


def test_add_rejects_a_non_string_name() -> None:
    with pytest.raises(AgentRegistryError, match=r"^Agent name must be a string, got int\.$"):
        AgentPool().add(42, HelperAgent)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- names

VALID_NAMES = ["a", "7", "dental", "support-tier2", "front_desk", "Dental2", "a" * 64]
INVALID_NAMES = [
    "",
    "   ",
    "front desk",
    "tab\there",
    "ns:dental",
    "dental{1}",
    "-dental",
    "dental-",
    "_dental",
    "dental.v2",
    "a/b",
    "a" * 65,
    "dentál",
    "café",
    "\uff44ental",  # full-width letter d
    "\u0663dental",  # Arabic-Indic digit three
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_are_accepted(name: str) -> None:
    pool = AgentPool()
    assert pool.add(name, HelperAgent).name == name
    assert pool.list_agents() == [name]
    fresh = type("Fresh", (Agent,), {})
    assert agent_config(name=name)(fresh) is fresh


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_rejected_by_add(name: str) -> None:
    pool = AgentPool()
    with pytest.raises(AgentRegistryError) as excinfo:
        pool.add(name, HelperAgent)
    assert single_line(excinfo.value).startswith(f"Invalid agent name {name!r}: ")
    assert len(pool) == 0


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_rejected_by_the_decorator(name: str) -> None:
    with pytest.raises(AgentRegistryError) as excinfo:
        agent_config(name=name)
    assert single_line(excinfo.value).startswith(f"Invalid agent name {name!r}: ")


@pytest.mark.parametrize("stem", ["front desk", "-dental", "café", "a" * 65])
def test_invalid_file_stem_is_rejected(tmp_path: Path, stem: str) -> None:
    write_module(tmp_path, f"{stem}.py", agent_source("Agentish"))

    with pytest.raises(AgentRegistryError) as excinfo:
        AgentPool.from_directory(tmp_path)

    message = single_line(excinfo.value)
    assert message.startswith(f"{stem}.py: Invalid agent name {stem!r}: ")
    assert message.endswith("Rename the file or set @agent_config(name=...).")


def test_decorator_name_rescues_an_invalid_file_stem(tmp_path: Path) -> None:
    write_module(
        tmp_path, "front desk.py", agent_source("FrontDesk", '@agent_config(name="front")')
    )
    assert AgentPool.from_directory(tmp_path).list_agents() == ["front"]


def test_invalid_decorator_name_in_a_module_names_the_file(tmp_path: Path) -> None:
    write_module(tmp_path, "desk.py", agent_source("Desk", '@agent_config(name="front desk")'))

    with pytest.raises(OpenRTCError) as excinfo:
        AgentPool.from_directory(tmp_path)

    message = single_line(excinfo.value)
    assert "desk.py" in message
    assert "Invalid agent name 'front desk'" in message


def test_error_types() -> None:
    assert issubclass(AgentDiscoveryError, OpenRTCError)
    assert issubclass(AgentRegistryError, OpenRTCError)
    assert issubclass(AgentRegistryError, ValueError)
    assert not issubclass(AgentDiscoveryError, ValueError)


def test_decorator_rejects_a_non_string_greeting() -> None:
    with pytest.raises(AgentRegistryError, match="greeting must be a string"):
        agent_config(greeting=42)  # type: ignore[arg-type]


def test_blank_decorator_greeting_falls_back_to_the_pool_default(tmp_path: Path) -> None:
    write_module(tmp_path, "quiet.py", agent_source("Quiet", '@agent_config(greeting="   ")'))
    pool = AgentPool.from_directory(tmp_path, default_greeting="Hello from the pool")
    assert pool.get("quiet").greeting == "Hello from the pool"


# --------------------------------------------------------------------------- which class


def test_helper_base_class_and_subclass_registers_the_leaf(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "tiered.py",
        """
        from livekit.agents import Agent

        class Base(Agent):
            def __init__(self) -> None:
                super().__init__(instructions="base")

        class Middle(Base):
            pass

        class Leaf(Middle):
            pass
        """,
    )
    assert AgentPool.from_directory(tmp_path).get("tiered").agent_cls.__name__ == "Leaf"


def test_two_unrelated_undecorated_agents_are_an_error_naming_both(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "twins.py",
        """
        from livekit.agents import Agent

        class Beta(Agent):
            pass

        class Alpha(Agent):
            pass
        """,
    )

    with pytest.raises(AgentDiscoveryError) as excinfo:
        AgentPool.from_directory(tmp_path)

    assert single_line(excinfo.value) == (
        "Agent module twins.py defines several agents (Alpha, Beta); "
        "mark the one to register with @agent_config."
    )


def test_two_leaves_of_one_base_are_an_error(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "forked.py",
        """
        from livekit.agents import Agent

        class Base(Agent):
            pass

        class Left(Base):
            pass

        class Right(Base):
            pass
        """,
    )
    with pytest.raises(AgentDiscoveryError, match=r"defines several agents \(Left, Right\)"):
        AgentPool.from_directory(tmp_path)


def test_the_decorated_agent_wins(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "chosen.py",
        """
        from livekit.agents import Agent
        from openrtc import agent_config

        class Unmarked(Agent):
            pass

        @agent_config(llm="openai/gpt-4.1-mini")
        class Marked(Agent):
            pass

        class AlsoUnmarked(Agent):
            pass
        """,
    )
    config = AgentPool.from_directory(tmp_path).get("chosen")
    assert config.agent_cls.__name__ == "Marked"
    assert config.llm == "openai/gpt-4.1-mini"


def test_two_decorated_agents_are_an_error(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "both.py",
        """
        from livekit.agents import Agent
        from openrtc import agent_config

        @agent_config(name="one")
        class One(Agent):
            pass

        @agent_config(name="two")
        class Two(Agent):
            pass
        """,
    )
    with pytest.raises(AgentDiscoveryError, match=r"both\.py defines several agents \(One, Two\)"):
        AgentPool.from_directory(tmp_path)


def test_an_agent_bound_to_two_names_is_one_agent(tmp_path: Path) -> None:
    # Regression: an alias used to be counted twice ("several agents (Foo, Foo)").
    write_module(
        tmp_path,
        "aliased.py",
        """
        from livekit.agents import Agent
        from openrtc import agent_config

        @agent_config(name="aliased_agent")
        class Foo(Agent):
            pass

        DefaultAgent = Foo

        class Plain(Agent):
            pass

        PlainAlias = Plain
        """,
    )
    write_module(
        tmp_path,
        "simple.py",
        """
        from livekit.agents import Agent

        class Bar(Agent):
            pass

        AGENT = Bar
        """,
    )

    pool = AgentPool.from_directory(tmp_path)

    assert pool.get("aliased_agent").agent_cls.__name__ == "Foo"
    assert pool.get("simple").agent_cls.__name__ == "Bar"


def test_module_importing_only_the_agent_base_has_no_agent(tmp_path: Path) -> None:
    write_module(tmp_path, "empty_agent.py", "from livekit.agents import Agent\n")

    with pytest.raises(AgentDiscoveryError) as excinfo:
        AgentPool.from_directory(tmp_path)

    assert single_line(excinfo.value) == (
        "Agent module empty_agent.py defines no livekit.agents.Agent subclass."
    )


@pytest.fixture
def shared_agents_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable module, outside the agents directory, that defines two agents."""
    name = f"openrtc_test_shared_{uuid.uuid4().hex}"
    write_module(
        tmp_path / "site",
        f"{name}.py",
        """
        from livekit.agents import Agent

        class SharedAgent(Agent):
            pass

        class UnrelatedSharedAgent(Agent):
            pass
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield name
    sys.modules.pop(name, None)


def test_imported_agent_subclasses_are_not_candidates(
    tmp_path: Path, shared_agents_module: str
) -> None:
    agents = tmp_path / "agents"
    # Subclass of an imported agent: only the local subclass counts.
    write_module(
        agents,
        "derived.py",
        f"""
        from {shared_agents_module} import SharedAgent, UnrelatedSharedAgent

        class Derived(SharedAgent):
            pass
        """,
    )
    # A local agent next to an imported unrelated one: no "several agents" error.
    write_module(
        agents,
        "local.py",
        f"""
        from livekit.agents import Agent
        from {shared_agents_module} import SharedAgent, UnrelatedSharedAgent

        class Local(Agent):
            pass
        """,
    )

    pool = AgentPool.from_directory(agents)

    assert pool.get("derived").agent_cls.__name__ == "Derived"
    assert pool.get("local").agent_cls.__name__ == "Local"


def test_module_with_only_imported_agents_has_no_agent(
    tmp_path: Path, shared_agents_module: str
) -> None:
    write_module(
        tmp_path / "agents",
        "reexport.py",
        f"from {shared_agents_module} import SharedAgent, UnrelatedSharedAgent\n",
    )
    with pytest.raises(
        AgentDiscoveryError, match=r"reexport\.py defines no livekit\.agents\.Agent subclass"
    ):
        AgentPool.from_directory(tmp_path / "agents")


# --------------------------------------------------------------------------- discovery errors


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(AgentDiscoveryError) as excinfo:
        AgentPool.from_directory(missing)
    assert single_line(excinfo.value) == f"Agents directory {str(missing)!r} does not exist."


def test_path_that_is_a_file(tmp_path: Path) -> None:
    path = write_module(tmp_path, "dental.py", agent_source("Dental"))
    with pytest.raises(AgentDiscoveryError) as excinfo:
        AgentPool.from_directory(path)
    assert single_line(excinfo.value) == f"Agents directory {str(path)!r} is not a directory."


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"_shared.py": "", "__init__.py": "", "notes.txt": "not python"},
    ],
    ids=["empty", "only-skipped-files"],
)
def test_directory_without_agent_modules(
    tmp_path: Path, files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    for filename, text in files.items():
        (tmp_path / filename).write_text(text, encoding="utf-8")
    pool = AgentPool.from_directory(tmp_path)
    assert pool.list_agents() == []
    assert "holds no agent modules" in caplog.text
    # Whoever needs an agent says so.
    with pytest.raises(RuntimeError, match=r"^No agents are registered in the pool\.$"):
        resolve_agent(
            SimpleNamespace(metadata="", room=SimpleNamespace(name="x", metadata="")),
            pool.routing_table,
        )


def test_module_raising_in_its_body(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "broken.py",
        """
        from livekit.agents import Agent

        class Broken(Agent):
            pass

        raise RuntimeError("database url not set")
        """,
    )
    with pytest.raises(AgentDiscoveryError) as excinfo:
        AgentPool.from_directory(tmp_path)
    assert single_line(excinfo.value) == (
        "Failed to import agent module broken.py: RuntimeError: database url not set"
    )
    assert isinstance(excinfo.value.__cause__, RuntimeError)


def test_module_with_a_syntax_error(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "typo.py",
        """
        from livekit.agents import Agent

        class Typo(Agent)
            pass
        """,
    )
    with pytest.raises(AgentDiscoveryError) as excinfo:
        AgentPool.from_directory(tmp_path)
    message = single_line(excinfo.value)
    assert message.startswith("Failed to import agent module typo.py: SyntaxError: ")
    assert message.endswith("(line 3)")


def test_module_importing_a_missing_module(tmp_path: Path) -> None:
    write_module(tmp_path, "needs_dep.py", "import openrtc_no_such_module_xyz\n")
    with pytest.raises(AgentDiscoveryError) as excinfo:
        AgentPool.from_directory(tmp_path)
    assert single_line(excinfo.value) == (
        "Failed to import agent module needs_dep.py: "
        "ModuleNotFoundError: No module named 'openrtc_no_such_module_xyz'"
    )


def test_two_files_with_the_same_agent_name(tmp_path: Path) -> None:
    write_module(tmp_path, "a.py", agent_source("First", '@agent_config(name="dental")'))
    write_module(tmp_path, "b.py", agent_source("Second", '@agent_config(name="dental")'))

    with pytest.raises(AgentRegistryError) as excinfo:
        AgentPool.from_directory(tmp_path)

    assert single_line(excinfo.value) == (
        "Agent 'dental' is already registered (from a.py; again in b.py)."
    )


def test_decorator_name_clashing_with_a_file_stem(tmp_path: Path) -> None:
    write_module(tmp_path, "a.py", agent_source("Impostor", '@agent_config(name="support")'))
    write_module(tmp_path, "support.py", agent_source("Support"))
    with pytest.raises(AgentRegistryError, match=r"^Agent 'support' is already registered"):
        AgentPool.from_directory(tmp_path)


def test_failed_import_leaves_no_module_behind(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        "flaky.py",
        """
        from livekit.agents import Agent

        class HalfImported(Agent):
            pass

        raise RuntimeError("boom")
        """,
    )
    with pytest.raises(AgentDiscoveryError, match=r"flaky\.py: RuntimeError: boom"):
        AgentPool.from_directory(tmp_path)

    resolved = str(path.resolve())
    assert [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == resolved] == []

    # Fixing the file and discovering again imports the new code, not a leftover.
    write_module(tmp_path, "flaky.py", agent_source("Fixed"))
    assert AgentPool.from_directory(tmp_path).get("flaky").agent_cls.__name__ == "Fixed"


def test_same_directory_into_two_pools(tmp_path: Path) -> None:
    write_module(
        tmp_path, "dental.py", agent_source("Dental", '@agent_config(stt="deepgram/nova-3")')
    )
    write_module(tmp_path, "support.py", agent_source("Support"))

    first = AgentPool.from_directory(tmp_path)
    second = AgentPool.from_directory(tmp_path, default_llm="openai/gpt-4.1-mini")

    assert first.list_agents() == second.list_agents() == ["dental", "support"]
    for name in ("dental", "support"):
        assert first.get(name).agent_cls is second.get(name).agent_cls
    assert first.get("support").llm is None  # each pool keeps its own defaults
    assert second.get("support").llm == "openai/gpt-4.1-mini"


def test_discover_into_a_pool_with_a_clashing_name(tmp_path: Path) -> None:
    write_module(tmp_path, "dental.py", agent_source("Dental"))
    pool = AgentPool()
    pool.add("dental", HelperAgent)
    with pytest.raises(AgentRegistryError, match=r"^Agent 'dental' is already registered\.$"):
        pool.discover(tmp_path)
    assert pool.get("dental").agent_cls is HelperAgent


# --------------------------------------------------------------------------- routing


def test_resolve_routes_against_the_registry() -> None:
    pool = AgentPool.from_directory(EXAMPLE_AGENTS)

    assert resolve_agent(job(room="dental-call-1"), pool.routing_table) == Route(
        "dental", 5, "room name prefix"
    )
    assert resolve_agent(job(room="restaurant-7"), pool.routing_table) == Route(
        "restaurant", 5, "room name prefix"
    )
    assert resolve_agent(job(room="lobby"), pool.routing_table) == Route(
        "dental", 6, "default fallback"
    )
    assert resolve_agent(
        job(metadata={"agent": "restaurant"}, room="dental-call-1"), pool.routing_table
    ) == Route("restaurant", 1, "job metadata")


def test_routing_table_is_rebuilt_after_add() -> None:
    pool = AgentPool()
    pool.add("dental", HelperAgent)
    assert resolve_agent(job(room="support-42"), pool.routing_table) == Route(
        "dental", 6, "default fallback"
    )
    with pytest.raises(ValueError, match="Unknown agent 'support' requested via job metadata"):
        resolve_agent(job(metadata='{"agent": "support"}'), pool.routing_table)

    pool.add("support", OtherHelperAgent)

    assert pool.routing_table.names == ("dental", "support")
    assert resolve_agent(job(room="support-42"), pool.routing_table) == Route(
        "support", 5, "room name prefix"
    )
    assert resolve_agent(job(metadata='{"agent": "support"}'), pool.routing_table) == Route(
        "support", 1, "job metadata"
    )


def test_resolve_on_an_empty_pool() -> None:
    with pytest.raises(RuntimeError, match="No agents are registered"):
        resolve_agent(job(room="dental-1"), AgentPool().routing_table)


# --------------------------------------------------------------------------- describe


class _FakeLLM:
    __module__ = "livekit.plugins.openai.llm"

    def __init__(self, model: object = "gpt-4.1-mini") -> None:
        self.model = model
        self.api_key = "sk-very-secret"

    def __repr__(self) -> str:
        return f"LLM(model={self.model!r}, api_key={self.api_key!r})"


_FakeLLM.__qualname__ = "LLM"


class _FakeTTS:
    __module__ = "acme_voice.tts.streaming"


_FakeTTS.__qualname__ = "TTS"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("openai/gpt-4.1-mini", "openai/gpt-4.1-mini"),
        ("", ""),
        (_FakeLLM(), "openai.LLM(gpt-4.1-mini)"),
        (_FakeLLM(model=""), "openai.LLM"),
        (_FakeLLM(model=None), "openai.LLM"),
        (_FakeLLM(model=3), "openai.LLM"),
        (_FakeTTS(), "acme_voice.TTS"),
    ],
)
def test_describe_provider(value: object, expected: str | None) -> None:
    assert describe_provider(value) == expected


def test_describe_provider_does_not_leak_secrets() -> None:
    label = describe_provider(_FakeLLM())
    assert label is not None
    assert "sk-very-secret" not in label


def test_describe_summarises_a_config() -> None:
    pool = AgentPool(default_tts=_FakeTTS())
    config = pool.add(
        "dental", HelperAgent, stt="deepgram/nova-3", llm=_FakeLLM(), greeting="Hello"
    )
    assert config.describe() == {
        "name": "dental",
        "class": f"{HelperAgent.__module__}:HelperAgent",
        "stt": "deepgram/nova-3",
        "llm": "openai.LLM(gpt-4.1-mini)",
        "tts": "acme_voice.TTS",
        "greeting": "Hello",
    }


def test_class_label_of_a_discovered_agent_uses_the_file_name() -> None:
    pool = AgentPool.from_directory(OFFLINE_AGENTS)
    assert [config.class_label for config in pool] == [
        "dental.py:OfflineDental",
        "restaurant.py:OfflineRestaurant",
        "support.py:OfflineSupport",
    ]


# --------------------------------------------------------------------------- examples


def test_example_agents_directory() -> None:
    pool = AgentPool.from_directory(EXAMPLE_AGENTS)

    assert pool.list_agents() == ["dental", "restaurant"]
    dental, restaurant = pool.get("dental"), pool.get("restaurant")
    assert dental.agent_cls.__name__ == "DentalReceptionist"
    assert restaurant.agent_cls.__name__ == "RestaurantHost"
    for config in (dental, restaurant):
        assert isinstance(config, AgentConfig)
        assert issubclass(config.agent_cls, Agent)
        assert (config.stt, config.llm, config.tts) == (
            "deepgram/nova-3",
            "openai/gpt-4.1-mini",
            "cartesia/sonic-2",
        )
    assert dental.greeting == "Thanks for calling Bright Smile Dental. How can I help you today?"
    assert restaurant.greeting == (
        "Hello, you've reached Trattoria Luca. Would you like to book a table?"
    )
    assert dental.source_path == EXAMPLE_AGENTS / "dental.py"


def test_offline_example_agents_directory() -> None:
    pool = AgentPool.from_directory(OFFLINE_AGENTS)

    assert pool.list_agents() == ["dental", "restaurant", "support"]
    assert [config.agent_cls.__name__ for config in pool] == [
        "OfflineDental",
        "OfflineRestaurant",
        "OfflineSupport",
    ]
    restaurant = pool.get("restaurant")  # decorated without a name: named by its file stem
    assert restaurant.greeting == "Trattoria Luca, offline line. A table for how many?"
    assert (
        pool.get("dental").greeting
        == "Bright Smile Dental, offline line. How can we help you today?"
    )
    assert pool.get("support").greeting == "Support desk, offline line. Tell us what went wrong."
    # Offline: no cloud STT or LLM; the rule-based LLM answers typed text, the
    # voice is the local tone TTS.
    assert all(c.stt is None and type(c.llm).__name__ == "OfflineLLM" for c in pool)
    assert pool.get("restaurant").resume_line == "Sorry, I lost you for a second."
    assert all(c.checkpoint for c in pool)
    assert all(type(c.tts).__name__ == "ToneTTS" for c in pool)
    assert all(c.source_path is not None and c.source_path.parent == OFFLINE_AGENTS for c in pool)
    assert (OFFLINE_AGENTS / "_shared.py").exists()  # present, but skipped

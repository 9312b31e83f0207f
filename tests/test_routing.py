"""The six-step pre-connect routing chain, against the table in docs/dispatcher.md."""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit.protocol.agent import Job
from livekit.protocol.models import Room

from openrtc.agents import routing
from openrtc.agents.routing import (
    Route,
    RoutingTable,
    UnknownAgentError,
    explain_route,
    resolve_agent,
    table_for,
)

pytestmark = pytest.mark.unit

AGENTS = ("dental", "restaurant", "support")
TABLE = RoutingTable(AGENTS)


def job(
    metadata: str | Mapping[str, Any] = "",
    room_metadata: str | Mapping[str, Any] = "",
    room: str = "",
) -> Any:
    """A real protocol Job for string metadata, a look-alike when a mapping is given."""
    if isinstance(metadata, str) and isinstance(room_metadata, str):
        return Job(
            id="AJ_test",
            metadata=metadata,
            room=Room(name=room, sid="RM_test", metadata=room_metadata),
        )
    return SimpleNamespace(
        id="AJ_test",
        metadata=metadata,
        room=SimpleNamespace(name=room, sid="RM_test", metadata=room_metadata),
    )


# --- the seed's own examples -------------------------------------------------


@pytest.mark.parametrize(
    ("room", "agent"),
    [
        ("dental-call-1234", "dental"),
        ("restaurant-room-42", "restaurant"),
        ("general-chat", "dental"),  # first registered
    ],
)
def test_seed_examples(room: str, agent: str) -> None:
    route = resolve_agent(job(room=room), AGENTS)
    assert route.agent == agent


# --- each step on its own ----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"metadata": '{"agent": "restaurant"}'}, Route("restaurant", 1, "job metadata")),
        ({"metadata": '{"demo": "restaurant"}'}, Route("restaurant", 2, "job metadata")),
        ({"room_metadata": '{"agent": "support"}'}, Route("support", 3, "room metadata")),
        ({"room_metadata": '{"demo": "support"}'}, Route("support", 4, "room metadata")),
        ({"room": "support-line-7"}, Route("support", 5, "room name prefix")),
        ({}, Route("dental", 6, "default fallback")),
        # Mappings work as well as JSON strings (test fixtures, in-process callers).
        ({"metadata": {"agent": "restaurant"}}, Route("restaurant", 1, "job metadata")),
        ({"room_metadata": {"demo": "support"}}, Route("support", 4, "room metadata")),
    ],
)
def test_each_step(kwargs: dict[str, Any], expected: Route) -> None:
    assert resolve_agent(job(**kwargs), TABLE) == expected


def test_plain_sequence_and_table_agree() -> None:
    j = job(room="restaurant-x")
    assert resolve_agent(j, list(AGENTS)) == resolve_agent(j, TABLE)
    assert resolve_agent(j, iter(AGENTS)) == resolve_agent(j, TABLE)


def test_a_list_of_names_is_compiled_once() -> None:
    names = ["dental", "restaurant"]
    first = table_for(names)
    assert table_for(names) is first
    assert table_for(list(names)) is first  # an equal list, not the same object
    assert table_for(tuple(names)) is first
    assert table_for(iter(names)) is first


def test_a_list_changed_between_calls_routes_by_its_new_contents() -> None:
    names = ["dental", "restaurant"]
    assert resolve_agent(job(room="support-1"), names).agent == "dental"
    names.append("support")
    assert resolve_agent(job(room="support-1"), names) == Route("support", 5, "room name prefix")
    names[:] = ["restaurant"]
    assert resolve_agent(job(), names).agent == "restaurant"


def test_the_table_cache_is_bounded() -> None:
    for i in range(routing.TABLE_CACHE_SIZE * 3):
        table_for([f"agent{i}"])
    assert routing._cached_table.cache_info().currsize <= routing.TABLE_CACHE_SIZE


def test_values_are_stripped_and_case_sensitive() -> None:
    assert resolve_agent(job('{"agent": "  restaurant\\n"}'), TABLE).agent == "restaurant"
    with pytest.raises(ValueError, match=r"^Unknown agent 'Dental' requested via job metadata\.$"):
        resolve_agent(job('{"agent": "Dental"}'), TABLE)
    # Room-name prefixes are case-sensitive too.
    assert resolve_agent(job(room="Dental-call-1"), TABLE).step == 6


def test_escaped_keys_are_still_keys() -> None:
    # "\u0061gent" is "agent": the parse-skipping shortcut must not miss it.
    assert resolve_agent(job('{"\\u0061gent": "support"}'), TABLE) == Route(
        "support", 1, "job metadata"
    )
    assert resolve_agent(job(room_metadata='{"d\\u0065mo": "support"}'), TABLE).step == 4


@pytest.mark.parametrize(
    "text",
    [
        '{"agent": "restaurant", "x": NaN}',  # Python's json accepts NaN
        '{"agent": "restaurant", "n": 123456789012345678901234567890}',
        '{"agent": "ghost", "agent": "restaurant"}',  # duplicate keys: last wins, as json
        ' \n {"agent": "restaurant"} \t',
    ],
)
def test_json_edge_cases_follow_the_standard_library(text: str) -> None:
    assert resolve_agent(job(text), TABLE) == Route("restaurant", 1, "job metadata")


# --- ignored input: the chain moves on ---------------------------------------

IGNORED_METADATA = [
    "",
    "   ",
    "not json",
    "{",
    "agent=dental",
    "{'agent': 'restaurant'}",  # Python repr, not JSON
    "1",
    "3.5",
    '"restaurant"',
    "true",
    "null",
    '["restaurant"]',
    "[]",
    "{}",
    '{"caller": "+15551234567"}',
    '{"agent": null}',
    '{"agent": 7}',
    '{"agent": true}',
    '{"agent": ["restaurant"]}',
    '{"agent": {"name": "restaurant"}}',
    '{"agent": ""}',
    '{"agent": "   "}',
    '{"demo": 1}',
    '{"demo": ""}',
    '{"agent": null, "demo": "  "}',
    '{"Agent": "restaurant"}',  # keys are case-sensitive
]


@pytest.mark.parametrize("text", IGNORED_METADATA)
def test_ignored_job_metadata_moves_on(text: str) -> None:
    route = resolve_agent(job(text, room="support-42"), TABLE)
    assert route == Route("support", 5, "room name prefix")


@pytest.mark.parametrize("text", IGNORED_METADATA)
def test_ignored_room_metadata_moves_on(text: str) -> None:
    assert resolve_agent(job(room_metadata=text), TABLE) == Route("dental", 6, "default fallback")


@pytest.mark.parametrize("value", [None, 7, True, ["x"], {"a": 1}, "", "  "])
def test_non_string_agent_value_falls_through_to_demo(value: Any) -> None:
    text = json.dumps({"agent": value, "demo": "support"})
    assert resolve_agent(job(text), TABLE) == Route("support", 2, "job metadata")


def test_non_mapping_non_string_metadata_is_ignored() -> None:
    j = SimpleNamespace(metadata=None, room=SimpleNamespace(name=None, metadata=42))
    assert resolve_agent(j, TABLE) == Route("dental", 6, "default fallback")


# --- priority between every pair of steps ------------------------------------


def _job_for_steps(assignments: Mapping[int, str]) -> Any:
    """A job in which step ``s`` alone would pick ``assignments[s]``."""
    meta: dict[str, str] = {}
    room_meta: dict[str, str] = {}
    room = "general-call"
    for step, agent in assignments.items():
        if step == 1:
            meta["agent"] = agent
        elif step == 2:
            meta["demo"] = agent
        elif step == 3:
            room_meta["agent"] = agent
        elif step == 4:
            room_meta["demo"] = agent
        elif step == 5:
            room = f"{agent}-call-9"
    return job(json.dumps(meta) if meta else "", json.dumps(room_meta) if room_meta else "", room)


@pytest.mark.parametrize(("high", "low"), list(itertools.combinations(range(1, 7), 2)))
def test_priority_between_every_pair_of_steps(high: int, low: int) -> None:
    # The higher-priority step names "restaurant", the lower one "support";
    # step 6 always means "dental", the first registered.
    assignments = {high: "restaurant"}
    if low != 6:
        assignments[low] = "support"
    route = resolve_agent(_job_for_steps(assignments), TABLE)
    assert (route.agent, route.step) == ("restaurant", high)


# --- prefix ties -------------------------------------------------------------


@pytest.mark.parametrize(
    ("agents", "room", "expected"),
    [
        (("support", "support-tier2"), "support-tier2-call-9", "support-tier2"),
        (("support-tier2", "support"), "support-tier2-call-9", "support-tier2"),
        (("support", "support-tier2"), "support-tier3-call-9", "support"),
        (("support", "support-tier2"), "support-call-1", "support"),
        (("a", "a-b", "a-b-c"), "a-b-c-d", "a-b-c"),
        (("a", "a-b", "a-b-c"), "a-b-x-d", "a-b"),
        (("a-b-c",), "a-b-c-", "a-b-c"),
    ],
)
def test_longest_prefix_wins(agents: tuple[str, ...], room: str, expected: str) -> None:
    assert resolve_agent(job(room=room), agents) == Route(expected, 5, "room name prefix")


@pytest.mark.parametrize("room", ["support", "supportline-1", "-support-1", "xsupport-1", ""])
def test_prefix_needs_the_whole_name_and_a_dash(room: str) -> None:
    assert resolve_agent(job(room=room), ("dental", "support")).step == 6


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metadata": '{"agent": "ghost"}'}, "Unknown agent 'ghost' requested via job metadata."),
        ({"metadata": '{"demo": "ghost"}'}, "Unknown agent 'ghost' requested via job metadata."),
        (
            {"room_metadata": '{"agent": " ghost "}'},
            "Unknown agent 'ghost' requested via room metadata.",
        ),
        (
            {"room_metadata": {"demo": "ghost"}},
            "Unknown agent 'ghost' requested via room metadata.",
        ),
        # Never a silent fallback, even when a lower step would have matched.
        (
            {"metadata": '{"agent": "ghost", "demo": "dental"}', "room": "support-1"},
            "Unknown agent 'ghost' requested via job metadata.",
        ),
        (
            {"room_metadata": '{"agent": "ghost"}', "room": "support-1"},
            "Unknown agent 'ghost' requested via room metadata.",
        ),
    ],
)
def test_unknown_agent_raises(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$".replace(".", r"\.")):
        resolve_agent(job(**kwargs), TABLE)


@pytest.mark.parametrize("agents", [(), [], RoutingTable([])])
def test_empty_registry_raises(agents: Any) -> None:
    with pytest.raises(RuntimeError, match=r"^No agents are registered in the pool\.$"):
        resolve_agent(job('{"agent": "dental"}', room="dental-1"), agents)


def test_success_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="openrtc.routing"):
        resolve_agent(job(room="restaurant-room-42"), TABLE)
        resolve_agent(job('{"agent": "support"}'), TABLE)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert messages == [
        "Resolved agent 'restaurant' via room name prefix.",
        "Resolved agent 'support' via job metadata.",
    ]


# --- properties --------------------------------------------------------------


def reference_resolve(metadata: str, room_metadata: str, room: str, agents: list[str]) -> Route:
    """The table in docs/dispatcher.md, written as plainly as possible."""
    if not agents:
        raise RuntimeError("No agents are registered in the pool.")
    for first_step, text, source in (
        (1, metadata, "job metadata"),
        (3, room_metadata, "room metadata"),
    ):
        try:
            parsed = json.loads(text)
        except ValueError:
            continue
        if not isinstance(parsed, dict):
            continue
        for offset, key in enumerate(("agent", "demo")):
            value = parsed.get(key)
            if isinstance(value, str) and value.strip():
                name = value.strip()
                if name not in agents:
                    raise ValueError(f"Unknown agent '{name}' requested via {source}.")
                return Route(name, first_step + offset, source)
    matches = [a for a in agents if room.startswith(f"{a}-")]
    if matches:
        return Route(max(matches, key=len), 5, "room name prefix")
    return Route(agents[0], 6, "default fallback")


UNKNOWN_AGENT = re.compile(r"Unknown agent '.+' requested via (job|room) metadata\.", re.DOTALL)


def outcome_of(j: Any, agents: Any) -> Route | Exception:
    """The route, or the documented error; any other exception propagates."""
    try:
        return resolve_agent(j, agents)
    except (ValueError, RuntimeError) as exc:
        return exc


def outcome_of_reference(*args: Any) -> Route | Exception:
    try:
        return reference_resolve(*args)
    except (ValueError, RuntimeError) as exc:
        return exc


NAMES = st.sampled_from(["dental", "restaurant", "support", "support-tier2", "a", "a-b", "x_y"])
AGENT_VALUES = st.one_of(
    NAMES,
    NAMES.map(lambda n: f"  {n}\t"),
    st.text(max_size=8),
    st.none(),
    st.integers(),
    st.booleans(),
    st.lists(NAMES, max_size=2),
)
METADATA = st.one_of(
    st.text(max_size=30),
    st.dictionaries(
        st.sampled_from(["agent", "demo", "caller", "Agent"]), AGENT_VALUES, max_size=3
    ).map(json.dumps),
    st.dictionaries(st.sampled_from(["agent", "demo"]), AGENT_VALUES, max_size=2).map(
        lambda d: json.dumps(d, ensure_ascii=True).replace("agent", "\\u0061gent")
    ),
    st.sampled_from(["null", "[]", "1", '"dental"', "NaN", "{}"]),
)
ROOMS = st.one_of(
    st.text(max_size=20),
    st.tuples(NAMES, st.text(max_size=10)).map(lambda t: f"{t[0]}-{t[1]}"),
)
REGISTRIES = st.lists(NAMES, unique=True, max_size=5)


@settings(max_examples=400, deadline=None)
@given(metadata=METADATA, room_metadata=METADATA, room=ROOMS, agents=REGISTRIES)
def test_only_routes_or_documented_errors(
    metadata: str, room_metadata: str, room: str, agents: list[str]
) -> None:
    j = job(metadata, room_metadata, room)
    outcome = outcome_of(j, agents)
    if isinstance(outcome, ValueError):
        assert UNKNOWN_AGENT.fullmatch(str(outcome))
        assert isinstance(outcome_of_reference(metadata, room_metadata, room, agents), ValueError)
        return
    if isinstance(outcome, RuntimeError):
        assert str(outcome) == "No agents are registered in the pool."
        assert agents == []
        return
    route = outcome
    assert isinstance(route, Route)
    assert route.agent in agents
    assert 1 <= route.step <= 6
    assert route == reference_resolve(metadata, room_metadata, room, agents)
    # The operator's explanation ends at the same step.
    assert explain_route(j, agents)[-1].startswith(f"step {route.step}:")


@settings(max_examples=200, deadline=None)
@given(metadata=st.text(), room_metadata=st.text(), room=st.text())
def test_arbitrary_text_never_crashes(metadata: str, room_metadata: str, room: str) -> None:
    outcome = outcome_of(job(metadata, room_metadata, room), AGENTS)
    if isinstance(outcome, Route):
        assert outcome.agent in AGENTS
    else:
        assert isinstance(outcome, ValueError)
        assert UNKNOWN_AGENT.fullmatch(str(outcome))


def test_unknown_agent_error_carries_its_facts() -> None:
    with pytest.raises(UnknownAgentError) as excinfo:
        resolve_agent(job(room_metadata='{"demo": " ghost "}'), TABLE)
    error = excinfo.value
    assert isinstance(error, ValueError)
    assert (error.agent, error.step, error.source) == ("ghost", 4, "room metadata")

"""The custom router (``@openrtc.router``, routing step 0): policy, discovery, CLI, dispatcher."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from livekit import api
from livekit.protocol.agent import Job
from livekit.protocol.models import Room
from redis.asyncio import Redis
from typer.testing import CliRunner

import openrtc
from openrtc.agents.registry import AgentPool
from openrtc.agents.routing import (
    ROUTER_FAULTS_LOGGED,
    ROUTER_STEP,
    Route,
    Router,
    RouteRequest,
    RoutingTable,
    UnknownAgentError,
    explain_route,
    resolve_agent,
)
from openrtc.cli.main import app
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.errors import AgentRegistryError
from openrtc.wire.keys import Keys
from openrtc.wire.messages import JobMessage
from tests.support.stack import OFFLINE_AGENTS, dispatcher_settings, dispatching, eventually, unique

AGENTS = ("dental", "restaurant", "support")
ROUTED = Route("support", ROUTER_STEP, "custom router")
LOGGER = "openrtc.routing"

#: A router as an agents directory holds it: SIP calls by the dialled number.
ROUTER_MODULE = """\
from openrtc import RouteRequest, router

NUMBERS = {"+15550100": "support", "+15550199": "ghost"}


@router
def by_dialled_number(request: RouteRequest) -> str | None:
    if request.room_data.get("explode"):
        raise LookupError("number table unavailable")
    dialled = request.job_data.get("dialled") or request.room_data.get("dialled")
    return NUMBERS.get(dialled) if isinstance(dialled, str) else None
"""


def job(metadata: Any = "", room_metadata: Any = "", room: str = "") -> Any:
    """A real protocol Job for string metadata, a look-alike when a mapping is given."""
    if isinstance(metadata, str) and isinstance(room_metadata, str):
        return Job(id="AJ_t", metadata=metadata, room=Room(name=room, metadata=room_metadata))
    return SimpleNamespace(
        id="AJ_t", metadata=metadata, room=SimpleNamespace(name=room, metadata=room_metadata)
    )


def table_with(function: Callable[[RouteRequest], Any], *, budget: float = 10.0) -> RoutingTable:
    return RoutingTable(AGENTS, router=Router(function, "numbers:route", budget=budget))


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def always(value: Any) -> Callable[[RouteRequest], Any]:
    return lambda request: value


def boom(request: RouteRequest) -> str:
    raise LookupError("number table unavailable")


# --- the routing function with step 0 ------------------------------------------

ROUTER_TABLE = [
    # (router, job metadata, room metadata, room, expected route)
    pytest.param(always("support"), "", "", "", ROUTED, id="router-decides"),
    pytest.param(
        always("support"), '{"agent": "dental"}', "", "", ROUTED, id="router-before-step-1"
    ),
    pytest.param(always(" support "), "", "", "", ROUTED, id="name-stripped"),
    pytest.param(
        always(None),
        '{"agent": "dental"}',
        "",
        "",
        Route("dental", 1, "job metadata"),
        id="none-falls-through",
    ),
    pytest.param(
        boom,
        "",
        '{"agent": "restaurant"}',
        "",
        Route("restaurant", 3, "room metadata"),
        id="raises",
    ),
    pytest.param(
        always("ghost"),
        "",
        "",
        "restaurant-7",
        Route("restaurant", 5, "room name prefix"),
        id="unknown-name",
    ),
    pytest.param(always(42), "", "", "", Route("dental", 6, "default fallback"), id="not-a-name"),
    pytest.param(always(""), "", "", "", Route("dental", 6, "default fallback"), id="empty-name"),
]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("function", "metadata", "room_metadata", "room", "expected"), ROUTER_TABLE
)
def test_router_step(
    function: Callable[[RouteRequest], Any],
    metadata: str,
    room_metadata: str,
    room: str,
    expected: Route,
) -> None:
    assert resolve_agent(job(metadata, room_metadata, room), table_with(function)) == expected


@pytest.mark.unit
def test_router_is_told_what_the_dispatcher_knows() -> None:
    seen: list[RouteRequest] = []

    def spy(request: RouteRequest) -> None:
        seen.append(request)

    resolve_agent(job('{"dialled": "+1555"}', '{"tier": 2}', "sip-+1555-x"), table_with(spy))
    resolve_agent(job({"dialled": "+1666"}, {"tier": 3}, "r"), table_with(spy))

    assert seen[0] == RouteRequest(
        job_metadata='{"dialled": "+1555"}',
        room_name="sip-+1555-x",
        room_metadata='{"tier": 2}',
        agents=AGENTS,
    )
    assert (seen[0].job_data, seen[0].room_data) == ({"dialled": "+1555"}, {"tier": 2})
    # A mapping (a test fixture's metadata) reaches the router as JSON text.
    assert (seen[1].job_data, seen[1].room_data) == ({"dialled": "+1666"}, {"tier": 3})
    for text in ("", "not json", "[1, 2]", "null"):
        request = RouteRequest(text, "", text, AGENTS)
        assert (request.job_data, request.room_data) == ({}, {})
    with pytest.raises(AttributeError):
        seen[0].room_name = "other"  # type: ignore[misc]


@pytest.mark.unit
def test_the_chain_still_rejects_unknown_names_after_a_router_passes() -> None:
    with pytest.raises(UnknownAgentError, match="Unknown agent 'ghost' requested via job metadata"):
        resolve_agent(job('{"agent": "ghost"}'), table_with(always(None)))
    # A router's own unknown name is no rejection: the chain decides.
    assert resolve_agent(job(), table_with(always("ghost"))).step == 6


@pytest.mark.unit
def test_faults_are_logged_once_per_distinct_cause(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    names = iter(["ghost", "ghost", "phantom", "ghost", "phantom"])
    unknown = table_with(lambda request: next(names))
    for _ in range(5):
        assert resolve_agent(job(room="support-1"), unknown).agent == "support"
    raising = table_with(boom)
    for _ in range(4):
        assert resolve_agent(job(room="support-1"), raising).agent == "support"

    assert warnings_of(caplog, "'ghost'") == [
        "custom router numbers:route returned 'ghost', which is not a registered agent; "
        "the routing chain decides (logged once)"
    ]
    assert len(warnings_of(caplog, "'phantom'")) == 1
    errors = [r for r in caplog.records if "LookupError" in r.getMessage()]
    assert len(errors) == 1
    assert errors[0].exc_info is not None  # the traceback, once
    assert unknown.router is not None
    assert raising.router is not None
    assert unknown.router.fallthroughs == {"error": 0, "unknown_agent": 5, "not_a_name": 0}
    assert raising.router.fallthroughs["error"] == 4


@pytest.mark.unit
def test_a_long_error_text_is_logged_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)

    def quoting(request: RouteRequest) -> str:
        raise ValueError(f"bad metadata {request.room_metadata}")

    huge = '{"pad": "' + "x" * 1_000_000 + '"}'
    for _ in range(2):
        assert resolve_agent(job(room_metadata=huge), table_with(quoting)).step == 6
    logged = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(logged) == 2  # a new Router per table: each logs its first
    assert all(len(m) < 1000 and "(1000043 chars)" in m for m in logged), logged[0][-80:]


@pytest.mark.unit
def test_distinct_faults_logged_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    counter = iter(range(10_000))
    table = table_with(lambda request: f"ghost{next(counter)}")
    for _ in range(ROUTER_FAULTS_LOGGED * 3):
        resolve_agent(job(), table)

    logged = [r for r in caplog.records if r.name == LOGGER]
    assert len(logged) == ROUTER_FAULTS_LOGGED + 1
    assert "further ones are only counted" in logged[-1].getMessage()
    assert table.router is not None
    assert table.router.fallthroughs["unknown_agent"] == ROUTER_FAULTS_LOGGED * 3


@pytest.mark.unit
def test_a_call_over_budget_is_counted_and_its_answer_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    # A negative budget: every call is over it, whatever the machine's speed.
    table = table_with(always("support"), budget=-1.0)
    for _ in range(3):
        assert resolve_agent(job(), table) == ROUTED
    assert table.router is not None
    assert table.router.slow_calls == 3
    slow = warnings_of(caplog, "over its")
    # Logged on a new worst only (by half again), never once per call.
    assert 1 <= len(slow) <= 3
    assert slow[0].startswith("custom router numbers:route took ")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("function", "lines"),
    [
        (always("support"), ["step 0: custom router numbers:route names 'support', registered"]),
        (
            always(None),
            [
                "step 0: custom router numbers:route returned None: the chain decides",
                "steps 1-2: job metadata empty",
                "steps 3-4: room metadata empty",
                "step 5: room 'dental-1' starts with 'dental-'",
            ],
        ),
        (
            boom,
            [
                "step 0: custom router numbers:route raised LookupError: number table "
                "unavailable; the chain decides",
                "steps 1-2: job metadata empty",
                "steps 3-4: room metadata empty",
                "step 5: room 'dental-1' starts with 'dental-'",
            ],
        ),
        (
            always("ghost"),
            [
                "step 0: custom router numbers:route names 'ghost', NOT registered: "
                "the chain decides",
                "steps 1-2: job metadata empty",
                "steps 3-4: room metadata empty",
                "step 5: room 'dental-1' starts with 'dental-'",
            ],
        ),
    ],
)
def test_explain_route_shows_the_router_first(
    function: Callable[[RouteRequest], Any], lines: list[str]
) -> None:
    assert explain_route(job(room="dental-1"), table_with(function)) == lines


# --- registration -------------------------------------------------------------


def agents_dir(tmp_path: Path, **extra: str) -> Path:
    """The offline agents, plus ``extra`` modules (file stem -> source)."""
    target = tmp_path / f"agents_{uuid.uuid4().hex[:6]}"
    shutil.copytree(OFFLINE_AGENTS, target)
    for stem, source in extra.items():
        (target / f"{stem}.py").write_text(source, encoding="utf-8")
    return target


@pytest.mark.unit
def test_router_is_importable_from_the_package() -> None:
    assert openrtc.router is openrtc.agents.registry.router
    assert openrtc.RouteRequest is RouteRequest
    assert {"router", "RouteRequest"} <= set(openrtc.__all__)


@pytest.mark.unit
def test_discovery_registers_the_router_in_the_pool(tmp_path: Path) -> None:
    pool = AgentPool.from_directory(agents_dir(tmp_path, numbers=ROUTER_MODULE))

    assert pool.list_agents() == ["dental", "restaurant", "support"]  # a router is no agent
    assert pool.router is not None
    assert pool.router.label == "numbers:by_dialled_number"
    assert pool.routing_table.router is pool.router
    assert resolve_agent(job('{"dialled": "+15550100"}'), pool.routing_table) == ROUTED


@pytest.mark.unit
def test_a_router_beside_an_agent_in_one_module(tmp_path: Path) -> None:
    source = (OFFLINE_AGENTS / "support.py").read_text() + textwrap.dedent(
        """

        from openrtc import router as _router


        @_router
        def pick(request):
            return "support" if "vip" in request.room_name else None
        """
    )
    directory = agents_dir(tmp_path)
    (directory / "support.py").write_text(source, encoding="utf-8")

    pool = AgentPool.from_directory(directory)
    assert "support" in pool
    assert pool.router is not None
    assert pool.router.label == "support:pick"
    assert resolve_agent(job(room="vip-call"), pool.routing_table) == ROUTED


@pytest.mark.unit
def test_two_routers_are_a_startup_error_naming_both(tmp_path: Path) -> None:
    second = ROUTER_MODULE.replace("by_dialled_number", "by_room")
    directory = agents_dir(tmp_path, numbers=ROUTER_MODULE, zones=second)
    pool = AgentPool()

    with pytest.raises(AgentRegistryError) as raised:
        pool.discover(directory)
    assert str(raised.value) == (
        "Two routers: numbers:by_dialled_number and zones:by_room; "
        "an agents directory has at most one."
    )
    assert (len(pool), pool.router) == (0, None)  # all or nothing


@pytest.mark.unit
def test_set_router_by_hand() -> None:
    pool = AgentPool()

    def first(request: RouteRequest) -> str | None:
        return None

    def second(request: RouteRequest) -> str | None:
        return "dental"

    pool.set_router(first)
    assert pool.router is not None
    assert pool.router.label == f"{__name__}:test_set_router_by_hand.<locals>.first"
    with pytest.raises(AgentRegistryError, match=r"^Two routers: "):
        pool.set_router(second)
    # The same module:function again (its module imported anew) replaces it.
    pool.set_router(second, label=pool.router.label)
    assert pool.router.function is second
    pool.set_router(None)
    assert pool.router is None


@pytest.mark.unit
def test_a_router_must_be_a_plain_function() -> None:
    async def slow(request: RouteRequest) -> str:
        return "dental"

    with pytest.raises(AgentRegistryError, match="is async: a router runs on the answer path"):
        openrtc.router(slow)  # type: ignore[type-var]
    with pytest.raises(AgentRegistryError, match="marks a function"):
        openrtc.router(int)  # type: ignore[type-var]


@pytest.mark.unit
def test_an_imported_router_is_registered_once_under_its_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    shared = f"shared_routing_{uuid.uuid4().hex[:6]}"
    (lib / f"{shared}.py").write_text(ROUTER_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(lib))
    importer = f"from {shared} import by_dialled_number\n"
    directory = agents_dir(tmp_path, numbers=importer, zones=importer)

    pool = AgentPool.from_directory(directory)
    assert pool.router is not None
    assert pool.router.label == f"{shared}:by_dialled_number"


# --- the command line -----------------------------------------------------------


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.unit
def test_cli_route_shows_the_router_as_step_0(tmp_path: Path) -> None:
    directory = agents_dir(tmp_path, numbers=ROUTER_MODULE)
    dialled = '{"dialled": "+15550100"}'

    human = invoke("route", directory, "--job-metadata", dialled)
    assert human.exit_code == 0, human.output
    assert human.stdout == textwrap.dedent(
        """\
        agent: support
        step:  0 (custom router numbers:by_dialled_number)
          step 0: custom router numbers:by_dialled_number names 'support', registered
        """
    )
    as_json = invoke("route", directory, "--job-metadata", dialled, "--json")
    assert json.loads(as_json.stdout) == {
        "agent": "support",
        "step": 0,
        "source": "custom router",
        "router": "numbers:by_dialled_number",
    }


@pytest.mark.unit
def test_cli_route_falls_through_the_router(tmp_path: Path) -> None:
    directory = agents_dir(tmp_path, numbers=ROUTER_MODULE)

    human = invoke(
        "route", directory, "--room", "restaurant-1", "--room-metadata", '{"explode": 1}'
    )
    assert human.exit_code == 0, human.output
    assert human.stdout == textwrap.dedent(
        """\
        agent: restaurant
        step:  5 (room name prefix)
          step 0: custom router numbers:by_dialled_number raised LookupError: number table unavailable; the chain decides
          steps 1-2: job metadata empty
          step 3: room metadata: no "agent" key
          step 4: room metadata: no "demo" key
          step 5: room 'restaurant-1' starts with 'restaurant-'
        """  # noqa: E501
    )
    unknown = invoke("route", directory, "--job-metadata", '{"dialled": "+15550199"}', "--json")
    assert unknown.exit_code == 0, unknown.output
    assert json.loads(unknown.stdout) == {
        "agent": "dental",
        "step": 6,
        "source": "default fallback",
        "router": "numbers:by_dialled_number",
    }


@pytest.mark.unit
def test_cli_list_shows_the_router(tmp_path: Path) -> None:
    directory = agents_dir(tmp_path, numbers=ROUTER_MODULE)

    table = invoke("list", directory)
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[-1] == (
        "Custom router: numbers:by_dialled_number (runs before the routing chain)"
    )
    plain = invoke("list", directory, "--plain")
    assert plain.stdout.splitlines()[-1] == "(router)\tnumbers:by_dialled_number"
    assert len(plain.stdout.splitlines()) == 4
    as_json = json.loads(invoke("list", directory, "--json").stdout)
    assert as_json["router"] == "numbers:by_dialled_number"
    assert [a["name"] for a in as_json["agents"]] == ["dental", "restaurant", "support"]
    # Without a router, nothing changes.
    assert "router" not in json.loads(invoke("list", OFFLINE_AGENTS, "--json").stdout)
    assert "Custom router" not in invoke("list", OFFLINE_AGENTS).stdout


@pytest.mark.unit
def test_cli_two_routers_fail_naming_both(tmp_path: Path) -> None:
    second = ROUTER_MODULE.replace("by_dialled_number", "by_room")
    directory = agents_dir(tmp_path, numbers=ROUTER_MODULE, zones=second)
    for command in ("list", "route"):
        result = invoke(command, directory)
        assert result.exit_code == 1
        assert result.stderr == (
            "error: Two routers: numbers:by_dialled_number and zones:by_room; "
            "an agents directory has at most one.\n"
        )


def test_console_serves_the_agent_named_whatever_the_router_says(tmp_path: Path) -> None:
    directory = agents_dir(
        tmp_path,
        numbers="from openrtc import router\n\n"
        "@router\ndef everything(request):\n    return 'support'\n",
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRTC_", "LIVEKIT_"))}
    result = subprocess.run(
        [sys.executable, "-m", "openrtc", "console", "dental", "--text", "--agents-dir", directory],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=180,
        env=clean,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("Bright Smile Dental")


# --- the dispatcher, against the real LiveKit server and Redis -------------------


async def stream(redis: Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    result: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(key)
    return result


@pytest.mark.anyio
async def test_dispatcher_routes_by_the_router(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    name = unique("openrtc-router")
    pool = AgentPool.from_directory(agents_dir(tmp_path, numbers=ROUTER_MODULE))
    settings = dispatcher_settings(livekit_server, redis_server.url, ns, agent_name=name)
    by_room, by_job = unique("lobby"), unique("sip")
    async with (
        dispatching(settings, pool),
        api.LiveKitAPI(
            livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
        ) as lkapi,
    ):
        # Room metadata: the router wins over the "agent" key step 3 would read.
        await lkapi.room.create_room(
            api.CreateRoomRequest(
                name=by_room, metadata='{"agent": "dental", "dialled": "+15550100"}'
            )
        )
        await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=name, room=by_room)
        )
        # Job metadata, as a SIP dispatch rule sets it.
        await lkapi.room.create_room(api.CreateRoomRequest(name=by_job))
        await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=name, room=by_job, metadata='{"dialled": "+15550100"}'
            )
        )

        async def both() -> list[JobMessage] | None:
            found = [JobMessage.decode(f) for _, f in await stream(redis, keys.jobs("support"))]
            return found if len(found) == 2 else None

        messages = await eventually(both)
    assert {m.room for m in messages} == {by_room, by_job}
    for message in messages:
        assert (message.agent, message.step, message.source) == ("support", 0, "custom router")
    assert not await stream(redis, keys.jobs("dental"))


@pytest.mark.anyio
async def test_dispatcher_falls_through_when_the_router_raises(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    ns = unique("ns")
    keys = Keys(ns)
    pool = AgentPool.from_directory(agents_dir(tmp_path, numbers=ROUTER_MODULE))
    rooms = [unique("lobby") for _ in range(3)]
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns), pool) as dispatcher,
        api.LiveKitAPI(
            livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
        ) as lkapi,
    ):
        for room in rooms:
            await lkapi.room.create_room(
                api.CreateRoomRequest(name=room, metadata='{"explode": 1, "agent": "restaurant"}')
            )

        async def all_routed() -> list[JobMessage] | None:
            found = [JobMessage.decode(f) for _, f in await stream(redis, keys.jobs("restaurant"))]
            return found if len(found) == len(rooms) else None

        messages = await eventually(all_routed)
        fallthroughs = dispatcher.metrics.registry.get_sample_value(
            "openrtc_router_fallthroughs_total", {"reason": "error"}
        )
    assert {m.room for m in messages} == set(rooms)
    assert {(m.step, m.source) for m in messages} == {(3, "room metadata")}
    assert fallthroughs == len(rooms)
    raised = [r for r in caplog.records if "LookupError" in r.getMessage()]
    assert len(raised) == 1, [r.getMessage() for r in raised]
    assert not await stream(redis, keys.dead_letter)


@pytest.mark.anyio
async def test_dispatcher_falls_through_an_unknown_name_logged_once(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    ns = unique("ns")
    keys = Keys(ns)
    pool = AgentPool.from_directory(agents_dir(tmp_path, numbers=ROUTER_MODULE))
    rooms = [f"restaurant-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns), pool) as dispatcher,
        api.LiveKitAPI(
            livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
        ) as lkapi,
    ):
        for room in rooms:
            # The router names "ghost" for this number: nobody registered it.
            await lkapi.room.create_room(
                api.CreateRoomRequest(name=room, metadata='{"dialled": "+15550199"}')
            )

        async def all_routed() -> list[JobMessage] | None:
            found = [JobMessage.decode(f) for _, f in await stream(redis, keys.jobs("restaurant"))]
            return found if len(found) == len(rooms) else None

        messages = await eventually(all_routed)
        fallthroughs = dispatcher.metrics.registry.get_sample_value(
            "openrtc_router_fallthroughs_total", {"reason": "unknown_agent"}
        )
        await anyio.sleep(0.3)  # nothing else trickles in (no dead letter either)
    assert {(m.room, m.step, m.source) for m in messages} == {
        (room, 5, "room name prefix") for room in rooms
    }
    assert fallthroughs == len(rooms)
    assert warnings_of(caplog, "'ghost'") == [
        "custom router numbers:by_dialled_number returned 'ghost', which is not a registered "
        "agent; the routing chain decides (logged once)"
    ]
    # Unknown names dead-letter only from the chain.
    assert not await stream(redis, keys.dead_letter)

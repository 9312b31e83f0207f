"""``openrtc connect``: an agent put into an existing room by an explicit dispatch.

Real LiveKit, real Redis, an in-process dispatcher and workers, a caller in
the room; the command runs as its own process, as an operator would run it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import anyio
import pytest
from livekit import api, rtc
from livekit.protocol.agent import Job
from livekit.protocol.models import Room

from openrtc.agents.registry import AgentPool
from openrtc.agents.routing import resolve_agent
from openrtc.devtools.caller import AgentSighting, caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops.connect import agent_in_room, dispatch_metadata, made_by_connect
from openrtc.wire.messages import AGENT_ATTRIBUTE, agent_identity
from tests.support.processes import service_env
from tests.support.stack import (
    OFFLINE_AGENTS,
    agents_in,
    creds,
    delete_room,
    dispatcher_settings,
    dispatching,
    eventually,
    live_rooms,
    new_room,
    unique,
    working,
)

OPENRTC = [sys.executable, "-m", "openrtc"]


async def _connect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``openrtc connect ARGS`` in a process of its own, off the event loop."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OPENRTC, "connect", *args],
            env={**env, "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    return await anyio.to_thread.run_sync(run)


def _no_secret(result: subprocess.CompletedProcess[str], livekit: LiveKitServer) -> None:
    assert livekit.api_secret not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def _agent(identity: str, name: str, kind: int = api.ParticipantInfo.Kind.AGENT) -> object:
    return SimpleNamespace(identity=identity, kind=kind, attributes={AGENT_ATTRIBUTE: name})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("participants", "agent", "expected"),
    [
        ([], "dental", ""),
        ([_agent("agent-AJ_1", "dental")], "dental", "agent-AJ_1"),
        ([_agent("agent-AJ_1", "dental")], "restaurant", ""),
        # A caller whose attributes happen to name the agent is not the agent.
        ([_agent("caller", "dental", api.ParticipantInfo.Kind.STANDARD)], "dental", ""),
    ],
)
def test_agent_in_room(participants: list[object], agent: str, expected: str) -> None:
    assert agent_in_room(participants, agent) == expected


@pytest.mark.anyio
async def test_connect_brings_a_second_agent_and_leaves_the_caller_and_first_agent(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    room = unique("connect")
    env = service_env(livekit_server, redis_server.url, ns)
    async with (
        dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)),
        working(livekit_server, redis_server.url, ns, "dental"),
        working(livekit_server, redis_server.url, ns, "restaurant"),
    ):
        await new_room(livekit_server, room, '{"agent": "dental"}')
        async with caller_in(creds(livekit_server), room) as caller:
            first = await caller.wait_agent(within=30)
            assert first.attributes.get(AGENT_ATTRIBUTE) == "dental"

            result = await _connect(env, "--room", room, "--agent", "restaurant", "--json")
            _no_secret(result, livekit_server)
            assert result.returncode == 0, result.stderr
            joined = json.loads(result.stdout)
            assert joined["room"] == room
            assert joined["agent"] == "restaurant"
            assert joined["identity"] == agent_identity(joined["job_id"])
            assert joined["dispatch_id"].startswith("AD_")

            async with api.LiveKitAPI(
                livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
            ) as lk:
                agents = await agents_in(lk, room)
                assert sorted(agents) == sorted([first.identity, joined["identity"]])
                people = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
                assert "caller" in {p.identity for p in people.participants}
            second = await caller.wait_agent(within=10, other_than=first.sid)
            assert second.identity == joined["identity"]
            assert second.attributes.get(AGENT_ATTRIBUTE) == "restaurant"
            assert caller.room.connection_state == rtc.ConnectionState.CONN_CONNECTED
            assert first.sid in {p.sid for p in caller.agents()}

            # The same agent twice would talk over itself: refused, nothing dispatched.
            again = await _connect(env, "--room", room, "--agent", "restaurant")
            _no_secret(again, livekit_server)
            assert again.returncode == 1
            assert again.stderr.strip() == (
                f"error: agent 'restaurant' is already in room {room!r} (as {joined['identity']})"
            )

        await delete_room(livekit_server, room)


@pytest.mark.anyio
async def test_connect_refuses_a_room_that_does_not_exist_and_does_not_create_it(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    room = unique("absent")
    env = service_env(livekit_server, redis_server.url, unique("ns"))
    result = await _connect(env, "--room", room, "--agent", "dental")
    _no_secret(result, livekit_server)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: room {room!r} does not exist (connect puts agents into existing rooms)"
    )
    assert await live_rooms(livekit_server, room) == []

    # With --json, the same error as an object on stdout too.
    as_json = await _connect(env, "--room", room, "--agent", "dental", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {
        "error": f"room {room!r} does not exist (connect puts agents into existing rooms)"
    }

    # Credentials LiveKit refuses: said so, the secret never shown.
    wrong = "not-the-secret-but-long-enough-for-hs256-000"
    refused = await _connect({**env, "LIVEKIT_API_SECRET": wrong}, "--room", room, "--agent", "x")
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"error: LiveKit at {livekit_server.http_url} refused: "), (
        refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1
    assert wrong not in refused.stdout + refused.stderr
    assert await live_rooms(livekit_server, room) == []


@pytest.mark.anyio
async def test_connect_refuses_an_unknown_agent_from_the_agents_dir_or_its_dead_letter(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    room = unique("connect")
    env = service_env(livekit_server, redis_server.url, ns)
    routing_error = "Unknown agent 'nope' requested via job metadata."
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        await new_room(livekit_server, room)
        # With the agents directory: the routing error before anything is dispatched.
        checked = await _connect(
            env, "--room", room, "--agent", "nope", "--agents-dir", str(OFFLINE_AGENTS)
        )
        _no_secret(checked, livekit_server)
        assert checked.returncode == 1
        assert checked.stderr.strip() == f"error: {routing_error}"
        async with api.LiveKitAPI(
            livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
        ) as lk:
            before = await lk.agent_dispatch.list_dispatch(room_name=room)
            assert [d for d in before if "nope" in d.metadata] == []

        # Without it: the dispatcher dead-letters the job, and the command says so.
        dead = await _connect(env, "--room", room, "--agent", "nope", "--timeout", "60")
        _no_secret(dead, livekit_server)
        assert dead.returncode == 1
        line = dead.stderr.strip()
        assert line.startswith("error: job AJ_"), line
        assert "went to the dead letters (unknown-agent)" in line
        assert routing_error in line
        assert "openrtc dlq list" in line
        assert len(dead.stderr.strip().splitlines()) == 1
    await delete_room(livekit_server, room)


@pytest.mark.anyio
async def test_connect_times_out_naming_the_job_when_no_worker_serves_the_agent(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    ns = unique("ns")
    room = unique("connect")
    env = service_env(livekit_server, redis_server.url, ns)
    async with dispatching(dispatcher_settings(livekit_server, redis_server.url, ns)):
        await new_room(livekit_server, room)
        # The job is queued for a worker of restaurant that never comes.
        result = await _connect(env, "--room", room, "--agent", "restaurant", "--timeout", "20")
        _no_secret(result, livekit_server)
        assert result.returncode == 1
        line = result.stderr.strip()
        assert line.startswith(
            f"error: agent 'restaurant' did not join room {room!r} within 20s (job AJ_"
        ), line
        job_id = line.split("(job ", 1)[1].split(",", 1)[0]
        assert f"identity {agent_identity(job_id)})" in line
        assert line.endswith("see `openrtc dlq list` and `openrtc status`")

        # No dispatcher registered under the name the dispatch is for: no job at all.
        nobody = await _connect(
            {**env, "OPENRTC_AGENT_NAME": "nobody"},
            *("--room", room, "--agent", "dental", "--timeout", "8"),
        )
        _no_secret(nobody, livekit_server)
        assert nobody.returncode == 1
        assert re.fullmatch(
            r"error: no dispatcher took dispatch AD_\w+ within 8s \(none is registered with "
            r"agent name 'nobody', or each refused it: no live worker of 'dental', or a full "
            r"backlog\): see `openrtc status`",
            nobody.stderr.strip(),
        ), nobody.stderr
    await delete_room(livekit_server, room)


@pytest.mark.anyio
async def test_connect_says_when_livekit_is_unreachable(redis_server: RedisServer) -> None:
    env = {
        **service_env(
            SimpleNamespace(
                url="http://127.0.0.1:1",
                api_key="devkey",
                api_secret="s3cr3t-x-long-enough-for-hs256-keys-000",
            ),  # type: ignore[arg-type]
            redis_server.url,
            unique("ns"),
        ),
    }
    result = await _connect(env, "--room", "r", "--agent", "dental")
    assert result.returncode == 1
    assert result.stderr.startswith("error: LiveKit at http://127.0.0.1:1 is unreachable"), (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert "s3cr3t-x" not in result.stdout + result.stderr


@pytest.mark.anyio
async def test_a_room_left_without_agents_gets_its_own_agent_back_not_the_connected_one(
    livekit_server: LiveKitServer, redis_server: RedisServer
) -> None:
    """The reconciler dispatches a room again from its own dispatch, not connect's."""
    ns = unique("ns")
    room = unique("connect")
    settings = dispatcher_settings(
        livekit_server, redis_server.url, ns, reconcile_interval=0.3, reconcile_grace=1.0
    )
    async with (
        dispatching(settings) as dispatcher,
        working(livekit_server, redis_server.url, ns, "dental") as dental,
        working(livekit_server, redis_server.url, ns, "restaurant") as restaurant,
    ):
        await new_room(livekit_server, room, '{"agent": "dental"}')
        async with caller_in(creds(livekit_server), room) as caller:
            first = await caller.wait_agent(within=30)
            # In text mode, as a person reads it.
            env = service_env(livekit_server, redis_server.url, ns)
            result = await _connect(env, "--room", room, "--agent", "restaurant")
            assert result.returncode == 0, result.stderr
            line = result.stdout.strip()
            assert re.fullmatch(
                rf"{re.escape(room)}: agent 'restaurant' joined after \d+\.\d\ds: job (AJ_\w+), "
                r"identity agent-\1",
                line,
            ), line
            joined_identity = line.rsplit("identity ", 1)[1]
            async with api.LiveKitAPI(
                livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
            ) as lk:
                for identity in (first.identity, joined_identity):
                    await lk.room.remove_participant(
                        api.RoomParticipantIdentity(room=room, identity=identity)
                    )
            await eventually(
                lambda: dental.stats.succeeded == 1 and restaurant.stats.succeeded == 1,
                "both sessions' end",
                within=30,
            )
            gone = {first.identity, joined_identity}

            def newcomers() -> list[AgentSighting]:
                here = {p.sid for p in caller.agents()}
                return [s for s in caller.sightings if s.identity not in gone and s.sid in here]

            (again,) = await eventually(newcomers, "an agent dispatched again", within=30)
            assert again.attributes.get(AGENT_ATTRIBUTE) == "dental"
            assert dispatcher.stats.reconciled == 1
            assert restaurant.stats.started == 1
        await delete_room(livekit_server, room)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (dispatch_metadata("dental"), True),
        ("", False),
        ('{"agent": "dental"}', False),
        ('{"agent": "dental", "via": "elsewhere"}', False),
        ('{"via": "openrtc connect"', False),  # not JSON
        ('["via", "openrtc connect"]', False),  # not an object
    ],
)
def test_made_by_connect(metadata: str, expected: bool) -> None:
    assert made_by_connect(metadata) is expected


@pytest.mark.unit
def test_the_dispatch_metadata_routes_to_the_agent_at_step_1(pool: AgentPool) -> None:
    job = Job(id="j", metadata=dispatch_metadata("restaurant"), room=Room(name="dental-1"))
    route = resolve_agent(job, pool.routing_table)
    assert (route.agent, route.step) == ("restaurant", 1)

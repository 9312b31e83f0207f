"""What a stream entry may decide, and where the API secret and room tokens go.

Against the real LiveKit server and Redis: a job entry cannot send the worker
(and the token it mints) to another server, cannot borrow another
participant's identity, and a ``process``-isolation child gets a room token,
never the API secret. Also the child's line protocol and the dev env file.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from anyio.abc import SocketStream
from livekit import api
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.devtools.caller import caller_in
from openrtc.devtools.dev import DevStack, write_env_file
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.session.runners import ProcessRunner, _Child, _Lines
from openrtc.session.session import mint_token
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import AcceptArguments, JobMessage, JobStatus, agent_identity
from openrtc.wire.signing import KEY_ENV, keys_from
from tests.support.jobs import job_message, write_agent
from tests.support.stack import creds, delete_room, eventually, new_room, unique, working
from tests.support.waits import TEST_BUDGET, wait_dead_letters, wait_status

pytestmark = pytest.mark.anyio

#: LiveKit's own agent token lifetime (``BuildAgentToken``).
ONE_HOUR = 3600


def claims_of(token: str) -> dict[str, Any]:
    """The JWT's claims, unverified (the test only reads them; never printed)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


# -- an entry cannot choose the server ------------------------------------------


@pytest.mark.parametrize("isolation", ["coroutine", "process"])
async def test_an_entry_cannot_send_the_worker_to_another_server(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, isolation: str
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    connections: list[bytes] = []

    async def record(stream: SocketStream) -> None:
        # Keep what arrives: a WebSocket upgrade would carry the token.
        async with stream:
            with anyio.move_on_after(2):
                connections.append(await stream.receive())

    room = await new_room(livekit_server, unique("elsewhere"))
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    forged = replace(
        job_message(livekit_server, room, "dental", dispatcher),
        livekit_url=f"ws://127.0.0.1:{port}",
    )
    with anyio.fail_after(TEST_BUDGET):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, record)
            async with (
                working(livekit_server, redis_server.url, ns, "dental", isolation=isolation),
                caller_in(creds(livekit_server), room.name) as caller,
            ):
                await StreamStore(redis, keys).enqueue([forged])
                # The agent joins the configured server, not the entry's.
                agent = await caller.wait_agent(within=30)
                assert agent.identity == agent_identity(forged.job_id)
                await wait_status(redis, keys, dispatcher, forged.job_id, JobStatus.RUNNING)
                await delete_room(livekit_server, room.name)
                # A liveness bound: the agent's SDK may be in its connect retries
                # (15 s each; seen once in a clean-clone run) when the room goes.
                await wait_status(
                    redis, keys, dispatcher, forged.job_id, JobStatus.SUCCESS, within=45
                )
            tg.cancel_scope.cancel()
        await listener.aclose()
    assert connections == []


# -- an entry cannot borrow an identity ------------------------------------------


async def test_an_entry_with_a_forged_identity_or_room_is_refused(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    stream = keys.jobs("dental")
    room = await new_room(livekit_server, unique("forged"))
    victim = unique("caller")

    def forged(**accept: Any) -> JobMessage:
        message = job_message(livekit_server, room, "dental", dispatcher)
        return replace(message, accept=replace(message.accept, **accept))

    # Another participant's identity: joining with it would throw the caller out.
    stolen = forged(identity=victim)
    # Another job's agent identity: joining would end that job's call.
    other = forged(identity=f"agent-AJ_{'x' * 12}")
    good = job_message(livekit_server, room, "dental", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(livekit_server, redis_server.url, ns, "dental") as worker,
            caller_in(creds(livekit_server), room.name, identity=victim) as caller,
        ):
            ids = {}
            for message in (stolen, other):
                entry = await redis.xadd(stream, dict[Any, Any](message.encode()))
                ids[entry.decode()] = message
            # The room field disagrees with the job's room.
            moved = job_message(livekit_server, room, "dental", dispatcher)
            moved_fields = {**moved.encode(), b"room": b"someone-elses-room"}
            ids[(await redis.xadd(stream, dict[Any, Any](moved_fields))).decode()] = moved
            await StreamStore(redis, keys).enqueue([good])

            agent = await caller.wait_agent(within=30)
            assert agent.identity == agent_identity(good.job_id)
            dead = await wait_dead_letters(redis, keys, 3)
            errors = {
                entry_id: dead[stream, entry_id][b"error"].decode()
                for entry_id in ids
                if dead[stream, entry_id][b"reason"] == b"malformed"
            }
            assert len(errors) == 3
            by_message = {ids[k].job_id: v for k, v in errors.items()}
            assert "identity" in by_message[stolen.job_id]
            assert "identity" in by_message[other.job_id]
            assert "room" in by_message[moved.job_id]
            assert worker.stats.started == 1
            # The caller was never displaced by an agent using its identity.
            assert caller.room.isconnected()
            assert caller.room.local_participant.identity == victim
            await delete_room(livekit_server, room.name)


def test_the_room_token_is_an_agent_token_for_one_hour_at_most(
    livekit_server: LiveKitServer,
) -> None:
    room = api.Room(name=unique("ttl"), sid="RM_test")
    message = job_message(livekit_server, room, "dental", "d-1")
    before = time.time()
    token = mint_token(creds(livekit_server), message)
    claims = claims_of(token)
    assert claims["exp"] - before <= ONE_HOUR + 1
    assert claims["sub"] == agent_identity(message.job_id)
    assert claims["name"] == "dental"
    assert claims["kind"] == "agent"
    assert claims["video"]["room"] == room.name
    assert claims["video"]["agent"] is True
    assert claims["attributes"]["lk.agent_name"] == message.job.agent_name
    # The name is the routed agent's, whatever the entry says.
    renamed = replace(message, accept=replace(message.accept, name="Your Bank"))
    assert claims_of(mint_token(creds(livekit_server), renamed))["name"] == "dental"
    # Forged identities are refused here too, whatever reached this far.
    forged = replace(message, accept=AcceptArguments("caller", "dental"))
    with pytest.raises(ValueError, match="identity"):
        mint_token(creds(livekit_server), forged)


# -- process isolation: a room token, never the secret ---------------------------


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


async def test_a_session_process_gets_a_room_token_and_never_the_api_secret(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    secret = livekit_server.api_secret
    # Also in the worker's own environment, as when it is set by variable.
    monkeypatch.setenv("LIVEKIT_API_SECRET", secret)
    monkeypatch.setenv("LIVEKIT_API_KEY", livekit_server.api_key)
    # The signing key too: the worker alone signs and verifies, a child never.
    signing_key = secrets.token_hex(32)
    monkeypatch.setenv(KEY_ENV, signing_key)
    signing = keys_from(os.environ)
    sent: list[tuple[int, dict[str, Any]]] = []
    original_send = _Child.send

    async def recording_send(self: _Child, value: dict[str, Any]) -> None:
        sent.append((self.pid, value))
        await original_send(self, value)

    monkeypatch.setattr(_Child, "send", recording_send)
    room = await new_room(livekit_server, unique("child"))
    message = job_message(livekit_server, room, "dental", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(
                livekit_server,
                redis_server.url,
                ns,
                "dental",
                isolation="process",
                signing=signing,
            ) as worker,
            caller_in(creds(livekit_server), room.name) as caller,
        ):
            assert isinstance(worker.runner, ProcessRunner)
            await StreamStore(redis, keys, signing=signing).enqueue([message])
            await caller.wait_agent(within=30)
            assert sent, "no job was sent to a session process"
            pid, job = sent[0]
            environ = environ_of(pid)  # the child serving the call, alive now
            assert "LIVEKIT_API_SECRET" not in environ
            assert "LIVEKIT_API_KEY" not in environ
            assert KEY_ENV not in environ
            for hidden in (secret, signing_key):
                assert all(hidden not in value for value in environ.values())
                for idle in worker.runner._idle:  # the warm ones too
                    assert hidden not in "".join(environ_of(idle.pid).values())
                zygote = worker.runner._zygote._process  # the process they are forked from
                assert zygote is not None
                assert hidden not in "".join(environ_of(zygote.pid).values())
                assert hidden not in repr(job)
            claims = claims_of(job["token"])
            assert claims["sub"] == agent_identity(message.job_id)
            assert claims["exp"] - time.time() <= ONE_HOUR
            assert job["url"] == creds(livekit_server).ws_url
            await delete_room(livekit_server, room.name)
            await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)
    assert all(secret not in repr(value) for _, value in sent)
    assert all(signing_key not in repr(value) for _, value in sent)


# -- process isolation: stray output ---------------------------------------------


async def test_lines_skip_thousands_of_stray_lines_from_a_real_child() -> None:
    script = (
        "import sys\n"
        "for i in range(5000): print('debug output', i)\n"
        "print('[1, 2]'); print('\"text\"')\n"
        "print('{\"ready\": true}')\n"
    )
    with anyio.fail_after(30):
        async with await anyio.open_process([sys.executable, "-c", script]) as process:
            assert process.stdout is not None
            lines = _Lines(process.stdout)
            assert await lines.next() == {"ready": True}
            assert await lines.next() is None


CHATTY_AGENT = """\
from __future__ import annotations

from livekit.agents import Agent

from openrtc import agent_config
from openrtc.agents.tone_tts import ToneTTS

for i in range(5000):
    print("loading prompt fragment", i)


@agent_config(name="chatty", tts=ToneTTS(), greeting="Hello from the chatty line.")
class Chatty(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Prints a lot.")
"""


async def test_a_session_process_that_prints_5000_stray_lines_still_serves_its_call(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    ns, dispatcher = unique("ns"), unique("dispatcher")
    keys = Keys(ns)
    pool = AgentPool.from_directory(write_agent(tmp_path / "agents", "chatty", CHATTY_AGENT))
    room = await new_room(livekit_server, unique("chatty"))
    message = job_message(livekit_server, room, "chatty", dispatcher)
    with anyio.fail_after(TEST_BUDGET):
        async with (
            working(
                livekit_server,
                redis_server.url,
                ns,
                "chatty",
                pool=pool,
                isolation="process",
                idle_processes=1,
            ) as worker,
            caller_in(creds(livekit_server), room.name) as caller,
        ):
            await StreamStore(redis, keys).enqueue([message])
            agent = await caller.wait_agent(within=30)
            assert agent.identity == agent_identity(message.job_id)
            with anyio.fail_after(15):
                await caller.heard.wait()
            await delete_room(livekit_server, room.name)
            await wait_status(redis, keys, dispatcher, message.job_id, JobStatus.SUCCESS)

            async def idle_again() -> bool:
                return worker.stats.succeeded == 1

            await eventually(idle_again, "the session to settle", within=20)


# -- openrtc dev's env file ------------------------------------------------------


@pytest.mark.parametrize("existing_mode", [0o644, 0o666, None])
def test_the_dev_env_file_is_private_even_when_it_existed(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    tmp_path: Path,
    existing_mode: int | None,
) -> None:
    path = tmp_path / ".openrtc" / "dev.env"
    if existing_mode is not None:
        path.parent.mkdir()
        path.write_text("LIVEKIT_API_SECRET=old\n")
        path.chmod(existing_mode)
    stack = DevStack(redis_server, livekit_server, None, [], "ns-x")  # type: ignore[arg-type]
    write_env_file(path, stack)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert f"LIVEKIT_API_SECRET={livekit_server.api_secret}\n" in text
    assert "old" not in text
    # No temporary file is left beside it.
    assert os.listdir(path.parent) == ["dev.env"]


def test_the_dev_env_file_replaces_a_symlink_instead_of_writing_through_it(
    livekit_server: LiveKitServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "shared.txt"
    elsewhere.write_text("not yours\n")
    elsewhere.chmod(0o644)
    path = tmp_path / "dev.env"
    path.symlink_to(elsewhere)
    stack = DevStack(redis_server, livekit_server, None, [], "ns-x")  # type: ignore[arg-type]
    write_env_file(path, stack)
    assert elsewhere.read_text() == "not yours\n"
    assert not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

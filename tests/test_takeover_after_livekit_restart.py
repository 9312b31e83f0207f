"""A call that outlived a LiveKit restart is still taken over when its worker dies.

After a LiveKit restart the server has forgotten the room: the caller's SDK
makes it again (a new sid) and the job's own session reconnects into it. When
no newer job came for the room (its dispatch was refused, say), that session
goes on serving the call. Found by the chaos ledger: its worker was then
SIGKILLed, and the peer that took the call over found no room with the job's
sid, said "room is gone; nothing to join" and finished the job, while the
caller waited in the room with nobody.
"""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack

import anyio
import pytest
from livekit import api
from redis.asyncio import Redis

from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import RecordField
from tests.support.jobs import job_message
from tests.support.processes import LEASE, worker_process_killed_on_exit
from tests.support.stack import creds, eventually, new_room, unique, working

pytestmark = pytest.mark.anyio


async def room_sid(livekit: LiveKitServer, name: str) -> str:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[name]))
    return rooms.rooms[0].sid if rooms.rooms else ""


@pytest.mark.parametrize(
    ("peer", "isolation"),
    [
        ("watching", "coroutine"),
        ("after-the-agent-left", "coroutine"),
        # The session's child leaves the room as its worker dies: the peer finds
        # only the caller, however fast it looks.
        ("watching", "process"),
    ],
)
async def test_a_call_whose_room_a_livekit_restart_made_anew_is_taken_over(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    peer: str,
    isolation: str,
) -> None:
    """``after-the-agent-left``: LiveKit has dropped the dead worker's participant
    before the peer looks at the room (the full suite's load made that order
    happen by chance): the room holds only the caller, under a new sid. Before
    the fix the peer took that for a caller who had hung up."""
    ns = unique("ns")
    keys = Keys(ns)
    own_livekit = LiveKitServer(log_path=livekit_server.log_path)
    own_livekit.start()
    room = await new_room(own_livekit, unique("dental-lk-restart"))
    message = job_message(own_livekit, room, "dental", unique("dispatcher"))
    try:
        with worker_process_killed_on_exit(
            own_livekit, redis_server.url, ns, "--isolation", isolation
        ) as first:
            async with AsyncExitStack() as stack:
                caller = await stack.enter_async_context(caller_in(creds(own_livekit), room.name))
                await StreamStore(redis, keys).enqueue([message])
                original = await caller.wait_agent(within=30)

                await anyio.to_thread.run_sync(own_livekit.stop)
                await anyio.to_thread.run_sync(own_livekit.start)

                async def made_anew() -> str:
                    sid = await room_sid(own_livekit, room.name)
                    return sid if sid and sid != room.sid else ""

                new_sid = await eventually(made_anew, "the caller's room made again", within=30)
                # The job's session reconnects into the new room: a new participant.
                back = await caller.wait_agent(within=30, other_than=original.sid)
                assert back.identity == original.identity

                async def room_recorded() -> bool:
                    record = keys.job("dental", message.job_id)
                    return await redis.hget(record, RecordField.ROOM_SID) == new_sid.encode()

                # Its worker says where the call is now; a kill before that is
                # left to the agent's presence in the room (the watching peer).
                await eventually(room_recorded, "the job's record names the new room", within=10)

                if peer == "after-the-agent-left":
                    first.send_signal(signal.SIGKILL)
                    await caller.wait_no_agent(within=60)
                await stack.enter_async_context(
                    working(own_livekit, redis_server.url, ns, "dental", lease=LEASE)
                )
                first.send_signal(signal.SIGKILL)
                # Before the fix: the peer found no room with the job's sid, logged
                # "room ... is gone; nothing to join", and nobody came.
                taker = await caller.wait_agent(within=30, other_than=back.sid)
                assert taker.identity == original.identity
    finally:
        own_livekit.close()

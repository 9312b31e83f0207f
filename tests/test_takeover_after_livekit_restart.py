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
from tests.support.jobs import job_message
from tests.support.processes import LEASE, worker_process_killed_on_exit
from tests.support.stack import creds, eventually, new_room, unique, working

pytestmark = pytest.mark.anyio


async def room_sid(livekit: LiveKitServer, name: str) -> str:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
        rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[name]))
    return rooms.rooms[0].sid if rooms.rooms else ""


async def test_a_call_whose_room_a_livekit_restart_made_anew_is_taken_over(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis
) -> None:
    ns = unique("ns")
    keys = Keys(ns)
    own_livekit = LiveKitServer(log_path=livekit_server.log_path)
    own_livekit.start()
    room = await new_room(own_livekit, unique("dental-lk-restart"))
    message = job_message(own_livekit, room, "dental", unique("dispatcher"))
    try:
        with worker_process_killed_on_exit(own_livekit, redis_server.url, ns) as first:
            async with AsyncExitStack() as stack:
                caller = await stack.enter_async_context(caller_in(creds(own_livekit), room.name))
                await StreamStore(redis, keys).enqueue([message])
                original = await caller.wait_agent(within=30)

                await anyio.to_thread.run_sync(own_livekit.stop)
                await anyio.to_thread.run_sync(own_livekit.start)

                async def made_anew() -> str:
                    sid = await room_sid(own_livekit, room.name)
                    return sid if sid and sid != room.sid else ""

                await eventually(made_anew, "the caller's room made again", within=30)
                # The job's session reconnects into the new room: a new participant.
                back = await caller.wait_agent(within=30, other_than=original.sid)
                assert back.identity == original.identity

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

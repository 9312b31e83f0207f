"""End-to-end demo on this machine: real LiveKit and Redis servers, the offline agents.

Run through ``bash scripts/demo.sh``. It starts both servers on loopback, creates
the seed's rooms on LiveKit, reads each room back from the server as a dispatched
job would carry it, and routes it through the six-step chain, exactly as the
dispatcher does on every ``AvailabilityRequest``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from livekit import api
from livekit.protocol.agent import Job

from openrtc import AgentPool
from openrtc.devstack import LiveKitServer, RedisServer

ROOT = Path(__file__).resolve().parents[1]
ROOMS = [
    ("dental-call-1234", ""),
    ("restaurant-room-42", ""),
    ("general-chat", ""),
    ("lobby-7", '{"agent": "support"}'),
    ("lobby-8", '{"agent": "ghost"}'),
]


async def main() -> int:
    pool = AgentPool.from_directory(ROOT / "examples" / "offline_agents")
    print(f"agents (registration order): {', '.join(pool.list_agents())}")
    with RedisServer() as redis_server, LiveKitServer() as livekit:
        print(f"livekit-server {livekit.url}   redis-server {redis_server.url}")
        async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lk:
            for name, metadata in ROOMS:
                await lk.room.create_room(api.CreateRoomRequest(name=name, metadata=metadata))
            listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[n for n, _ in ROOMS]))
            by_name = {room.name: room for room in listed.rooms}
            for name, _ in ROOMS:
                job = Job(id=f"AJ_demo_{name}", room=by_name[name])
                try:
                    route = pool.resolve(job)
                except ValueError as exc:
                    print(f"  {name:<20} -> dead letter: {exc}")
                else:
                    print(f"  {name:<20} -> {route.agent:<11} step {route.step} ({route.source})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""The main job end to end, on this machine: calls routed to the right agents.

Run through ``bash scripts/demo.sh``. It starts real LiveKit and Redis servers,
a dispatcher and one worker per offline example agent (``openrtc dev``), then
places the seed's calls: each room is created on LiveKit, a caller joins it, and
the demo reports which agent answered, how fast, and whether it was heard. A room
naming an unknown agent ends in the dead letters. Nothing needs a cloud key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import anyio

from openrtc.devtools.caller import place_call
from openrtc.devtools.dev import dev_stack
from openrtc.ops.monitor import list_dead_letters, read_status
from openrtc.store.streams import connect_redis
from openrtc.wire.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
CALLS = [  # room, room metadata, expected agent
    ("dental-call-1234", "", "dental"),
    ("restaurant-room-42", "", "restaurant"),
    ("general-chat", "", "dental"),
    ("lobby-7", '{"agent": "support"}', "support"),
]
GHOST = ("lobby-8", '{"agent": "ghost"}')


async def main() -> int:
    failures = 0
    log_dir = ROOT / ".openrtc" / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=log_dir / "demo.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    async with dev_stack(ROOT / "examples" / "offline_agents", log_dir=log_dir) as stack:
        print(f"LiveKit {stack.livekit.url}, Redis {stack.redis.url}")
        print(f"agents: {', '.join(w.settings.agent for w in stack.workers)} (one worker each)\n")
        for room, metadata, expected in CALLS:
            result = await place_call(stack.credentials, room, metadata=metadata, delete_room=True)
            ok = result.ok and result.agent == expected
            failures += not ok
            heard = f"heard after {result.heard_after:.2f}s" if result.heard_after else "NOT heard"
            print(
                f"  {'ok ' if ok else 'BAD'} {room:<20} -> {result.agent or '(nobody)':<11}"
                f" joined after {result.joined_after or 0:.2f}s, {heard}"
                + (f"  [{result.error}]" if result.error else "")
            )
        ghost = await place_call(
            stack.credentials, GHOST[0], metadata=GHOST[1], wait=3, listen=0, delete_room=True
        )
        redis = connect_redis(stack.redis.url)
        try:
            keys = Keys(stack.namespace)
            letters = await list_dead_letters(redis, keys)
            print(f"  {'ok ' if ghost.agent is None else 'BAD'} {GHOST[0]:<20} -> nobody;", end=" ")
            print(
                f"dead letter: {letters[0].reason}: {letters[0].error}"
                if letters
                else "NO dead letter"
            )
            failures += ghost.agent is not None or not letters
            status = await read_status(redis, keys)
        finally:
            await redis.aclose()
        print("\nafter the calls:")
        for agent in status.agents:
            print(
                f"  {agent.agent:<11} workers {len(agent.workers)}, running {agent.running}, "
                f"backlog {agent.backlog}, pending {agent.pending}"
            )
        print(f"  dispatcher: {stack.dispatcher.stats}")
    print("\nall calls answered by the right agent" if not failures else f"\n{failures} FAILED")
    print(f"logs: {log_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))

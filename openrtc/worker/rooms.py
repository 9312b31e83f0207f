"""Room check: is the job's room still there, and whose agent is in it (LiveKit's API)?"""

from __future__ import annotations

import contextlib
from typing import Final

import anyio
from livekit import api

from openrtc.settings import WorkerSettings
from openrtc.wire.messages import JobMessage
from openrtc.worker.context import logger

__all__ = ["OURS_IN_ROOM", "ROOM_CHECKS", "ROOM_CHECK_TIMEOUT", "RoomCheck"]

#: Room checks (LiveKit API calls) one worker runs at once.
ROOM_CHECKS: Final = 8
#: Longest wait for one room check; past it the room is assumed to be there.
ROOM_CHECK_TIMEOUT: Final = 3.0
#: A room check's answer: live, with the job's own agent in it already.
OURS_IN_ROOM: Final = "ours"


class RoomCheck:
    """Room checks, at most :data:`ROOM_CHECKS` at once, over one LiveKit API client."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._limiter = anyio.CapacityLimiter(ROOM_CHECKS)
        self._lkapi: api.LiveKitAPI | None = None

    async def aclose(self) -> None:
        if self._lkapi is not None:
            await self._lkapi.aclose()

    async def check(self, message: JobMessage, remade_sid: str = "") -> str:
        """``live``, ``gone``, :data:`OURS_IN_ROOM`, or the identity of another job's agent.

        ``remade_sid``: the sid of the room the job's session last said it is
        in (:data:`RecordField.ROOM_SID`), when LiveKit made the room anew.

        :data:`OURS_IN_ROOM`: live, and the job's own agent is there already (a
        takeover, a handover, or Redis lost the read of a worker serving it).

        ``gone``: the job's room (the same room, not a namesake) no longer
        exists; joining would create it again with only the agent in it,
        waiting for a caller who has hung up. A namesake is the same call when
        the job's session said it reconnected into it (``remade_sid``), or
        when the job's own agent is in it (that word lost with Redis): LiveKit
        made the room anew (a restart). An agent of ours with another
        identity already in the room is the previous job's, back after a
        LiveKit restart made the room (and this job) anew: a second agent
        would talk over it. On an API error the room is assumed live: a worker
        that cannot check must not drop calls.
        """
        async with self._limiter:
            return await self._check(message, remade_sid)

    def _client(self) -> api.LiveKitAPI:
        if self._lkapi is None:
            creds = self._settings.livekit
            # One client for the worker's life: a fresh one per job would pay
            # a TCP connect on every call's critical path.
            self._lkapi = api.LiveKitAPI(creds.http_url, creds.api_key, creds.api_secret)
        return self._lkapi

    async def _check(self, message: JobMessage, remade_sid: str) -> str:
        lkapi = self._client()
        people = api.ListParticipantsResponse()

        async def list_people() -> None:
            nonlocal people
            # A room that is gone has nobody to list: the room listing says so.
            with contextlib.suppress(Exception):
                people = await lkapi.room.list_participants(
                    api.ListParticipantsRequest(room=message.room)
                )

        try:
            with anyio.fail_after(ROOM_CHECK_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    # Beside the room, at once: whether the job's own agent is
                    # there already (num_participants does not count agents).
                    tg.start_soon(list_people)
                    rooms = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[message.room]))
                known = {message.job.room.sid, remade_sid}
                same = [r for r in rooms.rooms if r.sid in known or not message.job.room.sid]
                if not same:
                    # LiveKit made the room anew (a restart) and this job's own
                    # session reconnected into it: still this call, not gone.
                    mine = any(p.identity == message.accept.identity for p in people.participants)
                    if not (rooms.rooms and mine):
                        return "gone"
                    same = list(rooms.rooms)
        except Exception as exc:
            logger.warning("job %s: cannot check room %s: %s", message.job_id, message.room, exc)
            return "live"
        ours = False
        for p in people.participants:
            if p.kind != api.ParticipantInfo.Kind.AGENT:
                continue
            if same[0].num_participants >= 2 and message.is_another_job_of_my_agent(
                p.identity, p.attributes
            ):
                return p.identity
            ours = ours or p.identity == message.accept.identity
        return OURS_IN_ROOM if ours else "live"

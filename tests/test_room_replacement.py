"""Which session leaves when a LiveKit restart leaves two jobs' agents in one room.

The restarted server forgot the room and its job: the caller's room is a new
one, dispatched as a new job, while the old job's session reconnects to it.
Exactly the old job's agent must leave, as soon as it sees the new one (CI saw
the caller hear both for 3.1 s while the old session waited for the room's new
sid, which comes in a later update). A pure rule, table-tested.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from livekit.protocol.agent import Job
from livekit.protocol.models import Room

from openrtc.wire.messages import (
    AGENT_ATTRIBUTE,
    QUEUED_AT_ATTRIBUTE,
    ROOM_CREATED_ATTRIBUTE,
    JobMessage,
    accept_arguments,
    agent_identity,
    participant_attributes,
)

pytestmark = pytest.mark.unit

OLD_ROOM, NEW_ROOM = ("RM_old", 1_700_000_000_000), ("RM_new", 1_700_000_042_000)


def message(
    job_id: str, room: tuple[str, int], agent: str = "dental", queued_ms: int = 0
) -> JobMessage:
    sid, created_ms = room
    job = Job(id=job_id, room=Room(sid=sid, name="call-1", creation_time_ms=created_ms))
    return JobMessage(
        job=job,
        agent=agent,
        accept=accept_arguments(job_id, agent),
        livekit_url="ws://127.0.0.1:7880",
        step=5,
        source="room name prefix",
        dispatcher_id="d1",
        received_at=0.0,
        routed_at=0.0,
        queued_at=queued_ms / 1000,
    )


def agent(
    job_id: str, room: tuple[str, int] | None, name: str = "dental", queued_ms: int = 0
) -> tuple[str, dict[str, str]]:
    attributes = {AGENT_ATTRIBUTE: name}
    if room is not None:
        attributes[ROOM_CREATED_ATTRIBUTE] = str(room[1])
    if queued_ms:
        attributes[QUEUED_AT_ATTRIBUTE] = str(queued_ms)
    return agent_identity(job_id), attributes


OLD = message("AJ_old", OLD_ROOM)
NEW = message("AJ_new", NEW_ROOM)
#: Two jobs of one agent for one room (dispatched twice), queued 2 s apart.
FIRST = message("AJ_first", OLD_ROOM, queued_ms=1_700_000_001_000)
SECOND = message("AJ_second", OLD_ROOM, queued_ms=1_700_000_003_000)
TIE = message("AJ_tie", OLD_ROOM, queued_ms=1_700_000_001_000)


@pytest.mark.parametrize(
    ("me", "room_sid", "agents", "leave_for"),
    [
        # The defect: the new job's agent is there, the room's new sid is not
        # known yet. The old session leaves at once.
        (OLD, "RM_old", [agent("AJ_new", NEW_ROOM)], "agent-AJ_new"),
        (OLD, "", [agent("AJ_new", NEW_ROOM)], "agent-AJ_new"),
        (OLD, "RM_new", [agent("AJ_new", NEW_ROOM)], "agent-AJ_new"),
        # ... and the new session never does, whatever it sees first.
        (NEW, "RM_new", [agent("AJ_old", OLD_ROOM)], ""),
        (NEW, "", [agent("AJ_old", OLD_ROOM)], ""),
        # Two restarts: both older rooms' agents leave, the newest stays.
        (
            OLD,
            "RM_old",
            [agent("AJ_mid", ("RM_mid", 1_700_000_010_000)), agent("AJ_new", NEW_ROOM)],
            "agent-AJ_mid",
        ),
        (
            NEW,
            "RM_new",
            [agent("AJ_mid", ("RM_mid", 1_700_000_010_000)), agent("AJ_old", OLD_ROOM)],
            "",
        ),
        # Not another job of my agent: ourselves, another agent, a person.
        (OLD, "RM_new", [agent("AJ_old", OLD_ROOM)], ""),
        (OLD, "RM_new", [agent("AJ_new", NEW_ROOM, name="restaurant")], ""),
        (OLD, "RM_new", [("caller", {})], ""),
        # Another job of my agent in the same room, neither queued time known
        # (older workers): stay.
        (OLD, "RM_old", [agent("AJ_twin", OLD_ROOM)], ""),
        # Two jobs of my agent in one room (dispatched twice): the later leaves,
        # whichever sees the other first, and the earlier stays.
        (
            SECOND,
            "RM_old",
            [agent("AJ_first", OLD_ROOM, queued_ms=1_700_000_001_000)],
            "agent-AJ_first",
        ),
        (SECOND, "", [agent("AJ_first", OLD_ROOM, queued_ms=1_700_000_001_000)], "agent-AJ_first"),
        (
            SECOND,
            "RM_old",
            [agent("AJ_first", None, queued_ms=1_700_000_001_000)],
            "agent-AJ_first",
        ),
        (FIRST, "RM_old", [agent("AJ_second", OLD_ROOM, queued_ms=1_700_000_003_000)], ""),
        (FIRST, "RM_old", [agent("AJ_second", None, queued_ms=1_700_000_003_000)], ""),
        # Queued in the same ms: the job id decides, the same way on both sides.
        (
            TIE,
            "RM_old",
            [agent("AJ_first", OLD_ROOM, queued_ms=1_700_000_001_000)],
            "agent-AJ_first",
        ),
        (FIRST, "RM_old", [agent("AJ_tie", OLD_ROOM, queued_ms=1_700_000_001_000)], ""),
        # One side's time unknown (an older worker): nobody leaves on it.
        (SECOND, "RM_old", [agent("AJ_first", OLD_ROOM)], ""),
        (OLD, "RM_old", [agent("AJ_first", OLD_ROOM, queued_ms=1_700_000_001_000)], ""),
        # A newer room still beats an earlier queued time: the older room's agent leaves.
        (FIRST, "RM_old", [agent("AJ_new", NEW_ROOM, queued_ms=1_700_000_050_000)], "agent-AJ_new"),
        (
            message("AJ_new", NEW_ROOM, queued_ms=1_700_000_050_000),
            "RM_new",
            [agent("AJ_first", OLD_ROOM, queued_ms=1_700_000_001_000)],
            "",
        ),
        # An agent without the attribute (an older worker): the room's sid decides.
        (OLD, "RM_old", [agent("AJ_new", None)], ""),
        (OLD, "", [agent("AJ_new", None)], ""),
        (OLD, "RM_new", [agent("AJ_new", None)], "agent-AJ_new"),
        (NEW, "RM_new", [agent("AJ_old", None)], ""),
        # A garbage attribute is no time at all.
        (
            OLD,
            "RM_old",
            [("agent-AJ_x", {AGENT_ATTRIBUTE: "dental", ROOM_CREATED_ATTRIBUTE: "soon"})],
            "",
        ),
        (
            OLD,
            "RM_new",
            [("agent-AJ_x", {AGENT_ATTRIBUTE: "dental", ROOM_CREATED_ATTRIBUTE: "soon"})],
            "agent-AJ_x",
        ),
    ],
)
def test_only_the_older_rooms_session_leaves(
    me: JobMessage, room_sid: str, agents: list[tuple[str, Mapping[str, str]]], leave_for: str
) -> None:
    assert me.replaced_by(room_sid, agents) == leave_for


def test_a_job_without_a_creation_time_falls_back_to_the_sid() -> None:
    old = message("AJ_old", ("RM_old", 0))
    assert old.room_created_ms == 0
    assert old.replaced_by("RM_old", [agent("AJ_new", NEW_ROOM)]) == ""
    assert old.replaced_by("RM_new", [agent("AJ_new", NEW_ROOM)]) == "agent-AJ_new"


def test_seconds_only_creation_time_counts_in_ms() -> None:
    job = Job(id="AJ_s", room=Room(sid="RM_s", name="call-1", creation_time=1_700_000_000))
    assert message("AJ_s", ("RM_s", 0)).room_created_ms == 0
    msg = message("AJ_s", ("RM_s", 0))
    msg.job.CopyFrom(job)
    assert msg.room_created_ms == 1_700_000_000_000


@pytest.mark.parametrize(
    ("agent", "room_created_ms", "queued_ms", "expected"),
    [
        ("", 0, 0, {}),
        ("dental", 0, 0, {AGENT_ATTRIBUTE: "dental"}),
        ("", 1_700_000_000_000, 0, {ROOM_CREATED_ATTRIBUTE: "1700000000000"}),
        (
            "dental",
            1_700_000_000_000,
            1_700_000_001_500,
            {
                AGENT_ATTRIBUTE: "dental",
                ROOM_CREATED_ATTRIBUTE: "1700000000000",
                QUEUED_AT_ATTRIBUTE: "1700000001500",
            },
        ),
    ],
)
def test_participant_attributes_carry_only_what_is_known(
    agent: str, room_created_ms: int, queued_ms: int, expected: dict[str, str]
) -> None:
    assert (
        participant_attributes(agent, room_created_ms=room_created_ms, queued_ms=queued_ms)
        == expected
    )
    # What replaced_by reads is what participant_attributes writes.
    me = message("AJ_me", OLD_ROOM, queued_ms=1_700_000_002_000)
    if room_created_ms and queued_ms:
        theirs = participant_attributes(
            "dental", room_created_ms=OLD_ROOM[1], queued_ms=1_700_000_001_000
        )
        assert me.replaced_by("", [(agent_identity("AJ_x"), theirs)]) == agent_identity("AJ_x")

"""Job entries as the dispatcher enqueues them, and agent modules written for a test."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from livekit import api
from livekit.protocol.agent import Job, JobType
from livekit.protocol.models import Room

from openrtc.devtools.devstack import LiveKitServer
from openrtc.wire.messages import JobMessage, accept_arguments


def job_message(
    livekit: LiveKitServer,
    room: api.Room,
    agent: str,
    dispatcher_id: str,
    *,
    metadata: str = "",
    enqueued_at: float = 0.0,
) -> JobMessage:
    """A job entry as ``Dispatcher._job_message`` builds it from a LiveKit assignment."""
    job = Job(id=f"AJ_{uuid.uuid4().hex[:12]}", type=JobType.JT_ROOM, metadata=metadata)
    job.room.CopyFrom(room)
    job.room.ClearField("turn_password")
    now = time.time()
    return JobMessage(
        job=job,
        agent=agent,
        accept=accept_arguments(job.id, agent),
        livekit_url=livekit.url,
        step=3,
        source="room metadata",
        dispatcher_id=dispatcher_id,
        received_at=now,
        routed_at=now,
        enqueued_at=enqueued_at,
    )


def message(agent: str, room: str, *, turn_password: str = "") -> JobMessage:
    """A job entry needing no LiveKit server: a made-up room and URL (unlike ``job_message``)."""
    job_id = f"AJ_{uuid.uuid4().hex[:10]}"
    return JobMessage(
        job=Job(id=job_id, room=Room(name=room, sid="RM_x", turn_password=turn_password)),
        agent=agent,
        accept=accept_arguments(job_id, agent),
        livekit_url="ws://127.0.0.1:1",
        step=5,
        source="room name prefix",
        dispatcher_id="d-1",
        received_at=time.time(),
        routed_at=time.time(),
    )


def write_agent(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(source)
    return directory


AGENT_HEADER = """\
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from livekit.agents import Agent, get_job_context

from openrtc import agent_config
from openrtc.agents.tone_tts import ToneTTS
"""

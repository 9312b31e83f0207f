"""Driving a dispatcher through the stand-in LiveKit: its settings, offers, updates."""

from __future__ import annotations

from typing import Any

import anyio
from livekit.protocol import agent as proto

from openrtc.devtools.standin import StandIn, WorkerConn
from openrtc.settings import DispatcherSettings, LiveKitSettings
from tests.support.stack import dispatcher_settings

API_SECRET = "fault-test-api-secret-0123456789abcdefXYZ"


def make_settings(standin: StandIn, redis_url: str, **overrides: Any) -> DispatcherSettings:
    """Settings for a dispatcher of the stand-in (load reported every 0.2 s)."""
    livekit = LiveKitSettings(standin.url, "devkey", API_SECRET)
    return dispatcher_settings(livekit, redis_url, **{"load_interval": 0.2, **overrides})


async def offer(
    standin: StandIn, job: proto.Job, worker: WorkerConn | None = None
) -> proto.AvailabilityResponse:
    """Offer ``job`` and insist on an answer within the server's 3 s deadline."""
    with anyio.fail_after(5):
        answer = await standin.offer(job, worker)
    assert answer is not None, f"no answer for {job.id} within the 3 s deadline"
    return answer


def updates_for(worker: WorkerConn, job_id: str) -> list[proto.UpdateJobStatus]:
    return [u for u in worker.job_updates if u.job_id == job_id]

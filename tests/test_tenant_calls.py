"""The tenant of a call, end to end: real LiveKit, real Redis, dispatcher, workers.

Two calls dispatched through the dispatcher: one names its tenant in its job
metadata (as a SIP dispatch rule or ``create_dispatch`` does), the other in its
room's metadata. Each agent says what ``openrtc.current_tenant()`` tells it
(coroutine isolation for one, a session process for the other); ``top``,
``status --tenant``, the job records, the metrics and the call reports say
the same.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from redis.asyncio import Redis

from openrtc.agents.registry import AgentPool
from openrtc.agents.tenants import DEFAULT_TENANT
from openrtc.devtools.caller import caller_in
from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.ops.logs import ContextFilter
from openrtc.ops.metrics import count
from openrtc.wire.keys import Keys
from openrtc.wire.messages import QUEUED_AT_FIELD, TENANT_FIELD, RecordField, RecordState
from openrtc.wire.reports import REPORT_FIELD
from tests.support.conversation import transcribing
from tests.support.jobs import job_message, write_agent
from tests.support.stack import (
    creds,
    delete_room,
    dispatcher_settings,
    dispatching,
    eventually,
    new_room,
    unique,
    working,
)

pytestmark = pytest.mark.anyio

#: Snapshots live three intervals: generous, as a loaded host's worker may
#: publish late (seen at load 20 on 2 cores: 0.5 s let them lapse).
TOP_INTERVAL = 2.0

#: An agent that says its call's tenant as it starts: read once in its
#: constructor, once in its ``on_enter`` (a task of the session).
TENANT_AGENT = """
from livekit.agents import Agent

import openrtc
from openrtc import agent_config
from openrtc.offline import OfflineLLM, ToneTTS


@agent_config(name="{name}", llm=OfflineLLM(), tts=ToneTTS())
class TenantLine(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Says its tenant.")
        self.built_for = openrtc.current_tenant()

    async def on_enter(self) -> None:
        self.session.say(f"Tenant {{openrtc.current_tenant()}}, built for {{self.built_for}}.")
"""


def cli(redis_url: str, ns: str, *args: str) -> dict[str, Any]:
    """An ``openrtc`` command's JSON document, run as an operator would."""
    done = subprocess.run(
        [sys.executable, "-m", "openrtc", *args, "--json"],
        env={"REDIS_URL": redis_url, "OPENRTC_NAMESPACE": ns, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


async def test_each_call_s_tenant_reaches_its_agent_top_status_and_report(
    livekit_server: LiveKitServer,
    redis_server: RedisServer,
    redis: Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="openrtc")
    # As a service's handler does: each line gets the job's context.
    caplog.handler.addFilter(ContextFilter())
    for agent in ("coro_line", "proc_line"):
        write_agent(tmp_path, agent, TENANT_AGENT.format(name=agent))
    pool = AgentPool.from_directory(tmp_path)
    ns, url = unique("ns"), redis_server.url
    keys = Keys(ns)
    name = unique("openrtc-tenants")
    by_job, by_room = unique("sip"), unique("lobby")
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            dispatching(dispatcher_settings(livekit_server, url, ns, agent_name=name), pool)
        )
        coroutine = await stack.enter_async_context(
            working(livekit_server, url, ns, "coro_line", pool=pool, top_interval=TOP_INTERVAL)
        )
        process = await stack.enter_async_context(
            working(
                livekit_server,
                url,
                ns,
                "proc_line",
                pool=pool,
                isolation="process",
                idle_processes=0,
                top_interval=TOP_INTERVAL,
            )
        )
        lk = await stack.enter_async_context(
            api.LiveKitAPI(
                livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
            )
        )
        # Job metadata names agent and tenant, as a SIP dispatch rule's would.
        await lk.room.create_room(api.CreateRoomRequest(name=by_job))
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=name, room=by_job, metadata='{"agent": "coro_line", "tenant": "acme"}'
            )
        )
        # The room's metadata names them; the dispatch carries none.
        await lk.room.create_room(
            api.CreateRoomRequest(
                name=by_room, metadata='{"agent": "proc_line", "tenant": "globex"}'
            )
        )
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=name, room=by_room)
        )
        said = {}
        for room, tenant in ((by_job, "acme"), (by_room, "globex")):
            caller = await stack.enter_async_context(caller_in(creds(livekit_server), room))
            transcript = await stack.enter_async_context(transcribing(caller))
            line = f"Tenant {tenant}, built for {tenant}."
            # A liveness bound: a session process imports and warms first.
            await eventually(
                lambda t=transcript, said_line=line: t.count(said_line),
                f"{tenant}'s line",
                within=90,
            )
            said[tenant] = (await caller.wait_agent(within=5)).identity.removeprefix("agent-")

        acme_job, globex_job = said["acme"], said["globex"]
        for agent, job_id, tenant in (
            ("coro_line", acme_job, "acme"),
            ("proc_line", globex_job, "globex"),
        ):
            record = await redis.hget(keys.job(agent, job_id), RecordField.TENANT)
            assert record == tenant.encode()
        assert count(coroutine.metrics.sessions_started, tenant="acme") == 1
        assert count(process.metrics.sessions_started, tenant="globex") == 1

        def tenants_in(doc: dict[str, Any]) -> dict[str, str]:
            return {row["job_id"]: row["tenant"] for row in doc["sessions"]}

        async def on_top() -> bool:
            return tenants_in(cli(url, ns, "top", "--once")) == {
                acme_job: "acme",
                globex_job: "globex",
            }

        await eventually(on_top, "both sessions on top with their tenants", within=90)

        async def filtered() -> bool:
            # Eventually too: a loaded worker's snapshot may lapse between two reads.
            doc = cli(url, ns, "top", "--once", "--tenant", "acme")
            return tenants_in(doc) == {acme_job: "acme"}

        await eventually(filtered, "top --tenant acme: the acme call only", within=90)

        def running(doc: dict[str, Any]) -> dict[str, int]:
            assert doc["tenant"] in ("acme", "globex", "nobody")
            return {a["agent"]: a["running"] for a in doc["agents"]}

        assert running(cli(url, ns, "status", "--tenant", "acme")) == {
            "coro_line": 1,
            "proc_line": 0,
        }
        assert running(cli(url, ns, "status", "--tenant", "globex")) == {
            "coro_line": 0,
            "proc_line": 1,
        }
        assert running(cli(url, ns, "status", "--tenant", "nobody")) == {
            "coro_line": 0,
            "proc_line": 0,
        }
        for room in (by_job, by_room):
            await lk.room.delete_room(api.DeleteRoomRequest(room=room))

        async def reported() -> bool:
            return await redis.xlen(keys.reports) == 2

        await eventually(reported, "both calls' reports", within=30)

    reports = {
        doc["job_id"]: doc
        for doc in (json.loads(f[REPORT_FIELD]) for _, f in await redis.xrange(keys.reports))
    }
    assert reports[acme_job]["tenant"] == "acme"
    assert reports[globex_job]["tenant"] == "globex"
    listed = cli(url, ns, "sessions", "list", "--tenant", "acme")
    assert [doc["job_id"] for doc in listed["sessions"]] == [acme_job]

    # Every line of the coroutine call (dispatcher, worker, session: all in
    # this process) carries its tenant.
    lines = [r for r in caplog.records if getattr(r, "job_id", None) == acme_job]
    untagged = [(r.name, r.getMessage()) for r in lines if getattr(r, "tenant", None) != "acme"]
    assert not untagged
    said_lines = [r.getMessage() for r in lines]
    for expected in (
        "Resolved agent 'coro_line'",  # routing
        f"job {acme_job} (room",  # the enqueue
        "joined room",  # the worker
        f"job {acme_job} running",  # the status relay
        "terminated by LiveKit",  # the termination
    ):
        assert any(expected in line for line in said_lines), (expected, said_lines)


async def test_an_entry_written_before_tenants_is_served_as_the_default_tenant_s(
    livekit_server: LiveKitServer, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """A rolling upgrade: an older dispatcher's entry has no ``tenant`` field (and
    its record none either). A new worker serves it, as the default tenant's."""
    write_agent(tmp_path, "coro_line", TENANT_AGENT.format(name="coro_line"))
    ns, url = unique("ns"), redis_server.url
    keys = Keys(ns)
    room = await new_room(livekit_server, unique("old"))
    message = job_message(livekit_server, room, "coro_line", unique("dispatcher"))
    fields = message.encode()
    del fields[TENANT_FIELD.encode()]
    async with (
        working(livekit_server, url, ns, "coro_line", pool=AgentPool.from_directory(tmp_path)),
        caller_in(creds(livekit_server), room.name) as caller,
        transcribing(caller) as transcript,
    ):
        # As the enqueue script of a version before tenants wrote it.
        now_ms = int((await redis.time())[0]) * 1000
        entry = await redis.xadd(keys.jobs("coro_line"), {QUEUED_AT_FIELD: now_ms, **fields})
        await redis.hset(
            keys.job("coro_line", message.job_id),
            mapping={
                RecordField.ENTRY: entry,
                RecordField.STATE: RecordState.QUEUED,
                RecordField.DISPATCHER: message.dispatcher_id,
            },
        )
        line = "Tenant default, built for default."
        await eventually(lambda: transcript.count(line), "the default tenant's line", within=90)
        record = await redis.hget(keys.job("coro_line", message.job_id), RecordField.TENANT)
        assert record == DEFAULT_TENANT.encode()
        await delete_room(livekit_server, room.name)

        async def reported() -> bool:
            return await redis.xlen(keys.reports) == 1

        await eventually(reported, "the call's report", within=30)
    [(_, report)] = await redis.xrange(keys.reports)
    assert json.loads(report[REPORT_FIELD])["tenant"] == DEFAULT_TENANT

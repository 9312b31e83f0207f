"""The tenant of a call: its rule, its name, its metric label, its wire field (pure parts)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from livekit.protocol.agent import Job
from livekit.protocol.models import Room

import openrtc
from openrtc.agents.tenants import (
    DEFAULT_TENANT,
    OTHER_TENANTS,
    TENANT_LABELS_MAX,
    Tenant,
    TenantLabels,
    current_tenant,
    is_tenant,
    resolve_tenant,
    tenant_label,
    tenant_scope,
)
from openrtc.dispatcher.availability import _tenant_of
from openrtc.ops.logs import ContextFilter, _TextFormatter, log_context
from openrtc.ops.monitor import TenantCount, count_tenant
from openrtc.wire.messages import (
    TENANT_FIELD,
    JobMessage,
    JobStatus,
    MalformedEntry,
    StatusEvent,
    accept_arguments,
    peek_tenant,
)

pytestmark = pytest.mark.unit

JOB = "job metadata"
ROOM = "room metadata"
NONE = "default fallback"


def job(metadata: str | Mapping[str, Any] = "", room_metadata: str | Mapping[str, Any] = "") -> Any:
    """A real protocol Job for string metadata, a look-alike when a mapping is given."""
    if isinstance(metadata, str) and isinstance(room_metadata, str):
        return Job(
            id="AJ_t", metadata=metadata, room=Room(name="r", sid="RM_t", metadata=room_metadata)
        )
    return SimpleNamespace(
        id="AJ_t", metadata=metadata, room=SimpleNamespace(name="r", metadata=room_metadata)
    )


@pytest.mark.parametrize(
    ("metadata", "room_metadata", "expected"),
    [
        # Job metadata first, room metadata next, else the default.
        ('{"tenant": "acme"}', "", Tenant("acme", JOB)),
        ("", '{"tenant": "globex"}', Tenant("globex", ROOM)),
        ('{"tenant": "acme"}', '{"tenant": "globex"}', Tenant("acme", JOB)),
        ('{"agent": "dental", "tenant": "acme"}', "", Tenant("acme", JOB)),
        ("", "", Tenant(DEFAULT_TENANT, NONE)),
        ('{"agent": "dental"}', '{"agent": "dental"}', Tenant(DEFAULT_TENANT, NONE)),
        # The same rules as "agent": stripped; non-JSON, non-objects, non-strings
        # and blanks are ignored and the next source is read.
        ('{"tenant": "  acme\\n"}', "", Tenant("acme", JOB)),
        ("tenant=acme", '{"tenant": "globex"}', Tenant("globex", ROOM)),
        ('["tenant", "acme"]', '{"tenant": "globex"}', Tenant("globex", ROOM)),
        ('"tenant"', "", Tenant(DEFAULT_TENANT, NONE)),
        ("null", "", Tenant(DEFAULT_TENANT, NONE)),
        ('{"tenant": 42}', '{"tenant": "globex"}', Tenant("globex", ROOM)),
        ('{"tenant": null}', '{"tenant": "globex"}', Tenant("globex", ROOM)),
        ('{"tenant": "   "}', '{"tenant": "globex"}', Tenant("globex", ROOM)),
        ('{"tenant": ["acme"]}', "", Tenant(DEFAULT_TENANT, NONE)),
        # An escaped key is still the key (no literal "tenant" in the text).
        ('{"ten\\u0061nt": "acme"}', "", Tenant("acme", JOB)),
        # Case-sensitive, like agent names.
        ('{"Tenant": "acme"}', "", Tenant(DEFAULT_TENANT, NONE)),
        ('{"tenant": "ACME"}', "", Tenant("ACME", JOB)),
        # The default tenant may be named outright.
        ('{"tenant": "default"}', "", Tenant(DEFAULT_TENANT, JOB)),
        # Mappings (test look-alikes) read the same.
        ({"tenant": "acme"}, "", Tenant("acme", JOB)),
        ({}, {"tenant": "globex"}, Tenant("globex", ROOM)),
        # An invalid name: the default tenant, saying what it was; the room's
        # tenant is not read instead (the job named one).
        (
            '{"tenant": "acme corp"}',
            '{"tenant": "globex"}',
            Tenant(DEFAULT_TENANT, JOB, "acme corp"),
        ),
        ("", '{"tenant": "a:b"}', Tenant(DEFAULT_TENANT, ROOM, "a:b")),
        (
            '{"tenant": "' + "x" * 65 + '"}',
            "",
            Tenant(DEFAULT_TENANT, JOB, "x" * 64 + "…(65 chars)"),
        ),
    ],
)
def test_resolve_tenant(metadata: Any, room_metadata: Any, expected: Tenant) -> None:
    assert resolve_tenant(job(metadata, room_metadata)) == expected


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("acme", True),
        ("a", True),
        ("9", True),
        ("Acme-Corp_2.eu", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("-acme", False),
        ("acme-", False),
        (".acme", False),
        ("acme.", False),
        ("_acme", False),
        ("ac me", False),
        ("acme:1", False),
        ("{acme}", False),
        ("acme/1", False),
        ('ac"me', False),
        ("acmé", False),
        ("acme\n", False),
        ("\uff41\uff43\uff4d\uff45", False),  # fullwidth "acme": not ASCII
        ("١٢٣", False),  # Arabic-Indic digits
    ],
)
def test_is_tenant(text: str, valid: bool) -> None:
    assert is_tenant(text) is valid


@pytest.mark.parametrize(
    ("tenant", "labelled", "limit", "label"),
    [
        ("acme", set(), 3, "acme"),
        ("acme", {"default", "globex"}, 3, "acme"),
        ("acme", {"default", "globex", "initech"}, 3, OTHER_TENANTS),
        # Once labelled, always labelled; the default tenant always is.
        ("globex", {"default", "globex", "initech"}, 3, "globex"),
        (DEFAULT_TENANT, {"a", "b", "c"}, 3, DEFAULT_TENANT),
        ("acme", set(), 0, OTHER_TENANTS),
    ],
)
def test_tenant_label(tenant: str, labelled: set[str], limit: int, label: str) -> None:
    assert tenant_label(tenant, labelled, limit=limit) == label


def test_tenant_labels_are_bounded() -> None:
    labels = TenantLabels()
    shown = {labels(f"t{i}") for i in range(TENANT_LABELS_MAX * 3)}
    # The default tenant holds one of the labels from the start.
    assert len(shown) == TENANT_LABELS_MAX
    assert OTHER_TENANTS in shown
    assert labels("t0") == "t0"
    assert labels(f"t{TENANT_LABELS_MAX * 2}") == OTHER_TENANTS
    assert labels(DEFAULT_TENANT) == DEFAULT_TENANT


def test_current_tenant_is_the_default_outside_a_call() -> None:
    assert openrtc.current_tenant() == DEFAULT_TENANT == current_tenant()


def test_current_tenant_follows_its_scope_into_tasks() -> None:
    seen: list[str] = []

    async def agent_code() -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(openrtc.current_tenant())

    async def main() -> None:
        with tenant_scope("acme"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent_code)
            # Another call's scope beside it does not leak into this one.
            with tenant_scope("globex"):
                await agent_code()
            await agent_code()
        await agent_code()

    asyncio.run(main())
    assert seen == ["acme", "globex", "acme", DEFAULT_TENANT]
    assert contextvars.copy_context().run(current_tenant) == DEFAULT_TENANT


def test_log_lines_carry_the_tenant() -> None:
    record = logging.LogRecord("openrtc.test", logging.INFO, __file__, 1, "hello", None, None)
    with log_context(job_id="AJ_1", agent="dental", tenant="acme", room="r1"):
        ContextFilter().filter(record)
    assert record.tenant == "acme"  # type: ignore[attr-defined]
    line = _TextFormatter("%(message)s").format(record)
    assert line == "hello [job_id=AJ_1 agent=dental tenant=acme room=r1]"


def _entry(tenant: str | None) -> dict[bytes, bytes]:
    job = Job(id="AJ_w", room=Room(name="r", sid="RM_w"))
    message = JobMessage(
        job=job,
        agent="dental",
        accept=accept_arguments(job.id, "dental"),
        livekit_url="ws://x",
        step=1,
        source="job metadata",
        dispatcher_id="d-1",
        received_at=1.0,
        routed_at=1.0,
        enqueued_at=1.0,
    )
    fields = message.encode()
    assert fields[TENANT_FIELD.encode()] == DEFAULT_TENANT.encode()
    del fields[TENANT_FIELD.encode()]
    if tenant is not None:
        fields[TENANT_FIELD.encode()] = tenant.encode()
    return fields


@pytest.mark.parametrize(
    ("field", "tenant"),
    [
        ("acme", "acme"),
        # Written by a dispatcher older than tenants (a rolling upgrade): served, default.
        (None, DEFAULT_TENANT),
        ("", DEFAULT_TENANT),
    ],
)
def test_job_entry_tenant(field: str | None, tenant: str) -> None:
    fields = _entry(field)
    assert JobMessage.decode(fields).tenant == tenant
    assert peek_tenant(fields) == tenant


@pytest.mark.parametrize("field", ["acme corp", "x" * 65, "a:b"])
def test_job_entry_with_an_invalid_tenant_is_malformed(field: str) -> None:
    fields = _entry(field)
    with pytest.raises(MalformedEntry, match="field 'tenant' is not a tenant name"):
        JobMessage.decode(fields)
    assert peek_tenant(fields) == DEFAULT_TENANT


def test_job_entry_round_trips_its_tenant() -> None:
    message = JobMessage.decode(_entry("acme"))
    assert JobMessage.decode(message.encode()).tenant == "acme"
    assert peek_tenant({TENANT_FIELD.encode(): b"\xff\xfe"}) == DEFAULT_TENANT


def _fields(tenant: str | None) -> dict[bytes, bytes]:
    return {} if tenant is None else {TENANT_FIELD.encode(): tenant.encode()}


@pytest.mark.parametrize(
    ("entries", "last_delivered", "expected"),
    [
        ([], "", TenantCount()),
        # Split at the group's last-delivered id: read (running) vs waiting.
        (
            [("1-0", "acme"), ("2-0", "globex"), ("3-0", "acme"), ("4-0", "acme")],
            "2-0",
            TenantCount(waiting=2, delivered=1, oldest_waiting_ms=3),
        ),
        ([("1-0", "acme"), ("1-1", "acme")], "1-0", TenantCount(1, 1, 1)),
        # No group yet: everything waits.
        ([("5-0", "acme")], "", TenantCount(waiting=1, oldest_waiting_ms=5)),
        # Another tenant's entries only.
        ([("1-0", "globex")], "0-0", TenantCount()),
        # An entry of an older dispatcher (no field) is the default tenant's.
        ([("1-0", None), ("2-0", "acme")], "9-0", TenantCount(delivered=1)),
    ],
)
def test_count_tenant(
    entries: list[tuple[str, str | None]], last_delivered: str, expected: TenantCount
) -> None:
    raw = [(entry_id, _fields(tenant)) for entry_id, tenant in entries]
    assert count_tenant(raw, "acme", last_delivered) == expected


def test_count_tenant_counts_the_default_tenant_s_untagged_entries() -> None:
    raw = [("1-0", _fields(None)), ("2-0", _fields("acme")), ("3-0", _fields(DEFAULT_TENANT))]
    assert count_tenant(raw, DEFAULT_TENANT, "1-0") == TenantCount(1, 1, 3)


def test_an_invalid_tenant_is_the_default_s_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="openrtc")
    assert _tenant_of(job('{"agent": "dental", "tenant": "acme corp"}')) == DEFAULT_TENANT
    [record] = caplog.records
    assert record.getMessage() == (
        "job AJ_t (room r): tenant 'acme corp' in its job metadata is not a tenant name "
        "(1-64 letters, digits, '.', '_', '-'); the call is the default tenant's"
    )
    caplog.clear()
    assert _tenant_of(job("", '{"tenant": "globex"}')) == "globex"
    assert not caplog.records


@pytest.mark.parametrize(
    ("tenant", "decoded"), [("acme", "acme"), ("", ""), ("a b", ""), ("x" * 200, "")]
)
def test_status_events_carry_the_tenant_as_a_hint(tenant: str, decoded: str) -> None:
    fields = StatusEvent("AJ_1", JobStatus.SUCCESS, worker_id="w-1").encode()
    if tenant:
        fields[TENANT_FIELD.encode()] = tenant.encode()
    assert StatusEvent.decode(fields).tenant == decoded
    sent = StatusEvent("AJ_1", JobStatus.FAILED, tenant="acme", at=1.5)
    assert StatusEvent.decode(sent.encode()) == sent

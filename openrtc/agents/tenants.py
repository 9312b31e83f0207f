"""The tenant of a call: which customer it is for, and how agent code reads it.

Platforms run the same agents for many customers; each call belongs to one
*tenant*. The dispatcher decides it once, when it routes the job, and every
other part reads it from the job's stream entry (``JobMessage.tenant``):

====  ===========================  =========================================
step  source                       rule
====  ===========================  =========================================
1     ``job.metadata["tenant"]``   JSON object string or mapping
2     ``job.room.metadata["tenant"]``
3     default                      :data:`DEFAULT_TENANT`
====  ===========================  =========================================

Metadata is read exactly as routing reads ``agent``
(:func:`openrtc.agents.routing.metadata_object`): non-JSON, JSON that is not
an object, a non-string or blank value are ignored and the next source is
read; values are stripped; names are case-sensitive.

A tenant is a name (:data:`TENANT_PATTERN`: 1-64 letters, digits, ``.``,
``_``, ``-``, starting and ending with a letter or digit): it names the call
in logs, metrics, reports and (later) Redis keys. A value that is not one is
*folded into the default tenant*, with a warning (:attr:`Tenant.invalid`
says what it was): a call is never refused over how it is labelled.

Agent code reads its call's tenant with :func:`current_tenant`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Set
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final, NamedTuple

from openrtc.agents.routing import (
    SOURCE_DEFAULT,
    SOURCE_JOB_METADATA,
    SOURCE_ROOM_METADATA,
    MetadataKeys,
    clean_value,
    metadata_object,
    shown_name,
)

__all__ = [
    "DEFAULT_TENANT",
    "OTHER_TENANTS",
    "TENANT_LABELS_MAX",
    "TENANT_MAX",
    "TENANT_PATTERN",
    "Tenant",
    "TenantLabels",
    "current_tenant",
    "is_tenant",
    "resolve_tenant",
    "tenant_label",
    "tenant_scope",
]

#: The tenant of a call whose metadata names none (or names an invalid one).
DEFAULT_TENANT: Final = "default"
#: The longest tenant name.
TENANT_MAX: Final = 64
#: What a tenant name is: short, and safe in a log line, a metric label and a
#: Redis key (no ``:``, braces, spaces or quotes).
TENANT_PATTERN: Final = re.compile(
    rf"[A-Za-z0-9](?:[A-Za-z0-9._-]{{0,{TENANT_MAX - 2}}}[A-Za-z0-9])?"
)
#: The metric label of the tenants past :data:`TENANT_LABELS_MAX` in one process.
OTHER_TENANTS: Final = "other"
#: Distinct tenant labels one process gives its metrics (the default tenant
#: included); later tenants share :data:`OTHER_TENANTS`. Each label
#: multiplies a per-call metric's series (by agent, outcome, model): 50
#: keeps a worker's ``/metrics`` in the low thousands of series.
TENANT_LABELS_MAX: Final = 50

_TENANT_KEYS: Final = MetadataKeys.of("tenant")


class Tenant(NamedTuple):
    """A job's tenant and where it came from.

    Attributes:
        name: the tenant (always a valid name: :data:`DEFAULT_TENANT` at worst).
        source: ``"job metadata"``, ``"room metadata"`` or ``"default fallback"``.
        invalid: the value the metadata held when it was not a tenant name
            (bounded for logs by :func:`~openrtc.agents.routing.shown_name`);
            ``""`` when it was one, or there was none.
    """

    name: str
    source: str
    invalid: str = ""


_DEFAULT: Final = Tenant(DEFAULT_TENANT, SOURCE_DEFAULT)


def is_tenant(text: str) -> bool:
    """Whether ``text`` is a tenant name (:data:`TENANT_PATTERN`)."""
    return TENANT_PATTERN.fullmatch(text) is not None


def resolve_tenant(job: Any) -> Tenant:
    """The tenant of ``job`` (a protocol ``Job``, or anything shaped like one; see the module).

    The first source holding a non-blank string decides: a valid name is the
    tenant, anything else is the default tenant with :attr:`Tenant.invalid` set.
    """
    for metadata, source in (
        (job.metadata, SOURCE_JOB_METADATA),
        (job.room.metadata, SOURCE_ROOM_METADATA),
    ):
        source_data = metadata_object(metadata, _TENANT_KEYS)
        if source_data is None:
            continue
        name = clean_value(source_data.get("tenant"))
        if name is None:
            continue
        if is_tenant(name):
            return Tenant(name, source)
        return Tenant(DEFAULT_TENANT, source, shown_name(name))
    return _DEFAULT


def tenant_label(tenant: str, labelled: Set[str], *, limit: int = TENANT_LABELS_MAX) -> str:
    """The metric label of ``tenant``, given the tenants ``labelled`` so far.

    A tenant already labelled keeps its label; a new one gets its own while
    fewer than ``limit`` are labelled, else :data:`OTHER_TENANTS`. The default
    tenant always has its own. Pure: :class:`TenantLabels` keeps the set.
    """
    if tenant in labelled or tenant == DEFAULT_TENANT or len(labelled) < limit:
        return tenant
    return OTHER_TENANTS


class TenantLabels:
    """One process's tenant metric labels, bounded (:func:`tenant_label`)."""

    __slots__ = ("_labelled", "limit")

    def __init__(self, limit: int = TENANT_LABELS_MAX) -> None:
        self.limit = limit
        # The default tenant counts towards the limit from the start.
        self._labelled: set[str] = {DEFAULT_TENANT}

    def __call__(self, tenant: str) -> str:
        label = tenant_label(tenant, self._labelled, limit=self.limit)
        if label == tenant:
            self._labelled.add(tenant)
        return label


_current: ContextVar[str] = ContextVar("openrtc_tenant", default=DEFAULT_TENANT)


def current_tenant() -> str:
    """The tenant of the call this code runs for.

    Call it from agent code (the agent's constructor, its tools, its hooks,
    the session observers): the session sets it for everything it runs, in
    ``coroutine`` and ``process`` isolation alike. Outside a call (an
    ``openrtc console`` run, a test) it is :data:`DEFAULT_TENANT`
    (``"default"``), as it is for a call whose metadata names no tenant.

    A call's tenant is the ``tenant`` key of its job metadata, else of its
    room metadata (docs/tenants.md).
    """
    return _current.get()


@contextmanager
def tenant_scope(tenant: str) -> Iterator[None]:
    """:func:`current_tenant` is ``tenant`` in this block and in the tasks started in it."""
    token = _current.set(tenant)
    try:
        yield
    finally:
        _current.reset(token)

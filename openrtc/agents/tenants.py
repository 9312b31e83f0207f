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

Agent code reads its call's tenant with :func:`current_tenant`, and the
tenant's settings (``tenants.toml``: provider overrides, greeting,
credentials, caps, breaker thresholds) with :func:`tenant_settings`. The
typed settings live here (:class:`TenantConfig`, :class:`TenantSettings`);
the file is read and checked by :mod:`openrtc.tenant_file`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Set
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

from openrtc.agents.routing import (
    SOURCE_DEFAULT,
    SOURCE_JOB_METADATA,
    SOURCE_ROOM_METADATA,
    MetadataKeys,
    clean_value,
    metadata_object,
    shown_name,
)
from openrtc.errors import ConfigError

__all__ = [
    "DEFAULT_TENANT",
    "OTHER_TENANTS",
    "OVER_CAP",
    "TENANT_LABELS_MAX",
    "TENANT_MAX",
    "TENANT_PATTERN",
    "Breaker",
    "CredentialError",
    "Reference",
    "Tenant",
    "TenantConfig",
    "TenantLabels",
    "TenantSettings",
    "TenantsConfig",
    "current_tenant",
    "is_tenant",
    "resolve_tenant",
    "tenant_label",
    "tenant_scope",
    "tenant_settings",
    "tenant_settings_scope",
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


# -- the tenant's settings (tenants.toml) ------------------------------------

#: What happens to a tenant's call over its cap: it ``wait``s in the queue (up
#: to the queue age) or is ``reject``ed to a ``tenant-cap`` dead letter.
OverCap = Literal["wait", "reject"]
OVER_CAP: Final[tuple[OverCap, ...]] = ("wait", "reject")


class CredentialError(ConfigError):
    """A credential reference cannot be resolved; the message names the reference, never a value."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A credential by reference: ``env:VAR`` or ``file:/path``. It holds no secret."""

    scheme: Literal["env", "file"]
    target: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"

    def resolve(self, environ: Mapping[str, str] = os.environ) -> str:
        """The secret: the variable's value, or the file's text without its final newline.

        :raises CredentialError: unset, empty or unreadable (the reference named, not a value).
        """
        if self.scheme == "env":
            value = environ.get(self.target)
            if value is None:
                raise CredentialError(f"{self} is not set")
        else:
            try:
                value = Path(self.target).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise CredentialError(f"{self} cannot be read: {type(exc).__name__}") from None
        if not value:
            raise CredentialError(f"{self} is empty")
        return value


@dataclass(frozen=True, slots=True)
class Breaker:
    """A tenant's circuit-breaker thresholds (openrtc 0.20.1's defaults).

    Validated and carried; enforced by the circuit-breaker work (issue 21
    item 5), not yet: it opens at ``failure_ratio`` of failed sessions over
    at least ``min_sessions`` within ``window`` seconds, and half-opens after
    ``cooldown`` seconds.
    """

    failure_ratio: float = 0.5
    min_sessions: int = 5
    window: float = 60.0
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """One tenant's entry of ``tenants.toml``, checked; credentials as references only.

    ``None`` leaves the agent's own value. ``greeting = ""`` silences the
    agent's greeting for this tenant. ``max_sessions``,
    ``max_sessions_per_agent``, ``over_cap`` and ``breaker`` are carried for
    the fleet-wide caps and breakers (issue 21 items 3 and 5): not enforced yet.
    """

    name: str
    stt: str | None = None
    llm: str | None = None
    tts: str | None = None
    greeting: str | None = None
    credentials: Mapping[str, Reference] = field(default_factory=dict)
    #: Fleet-wide concurrent calls of this tenant (``None``: no cap).
    max_sessions: int | None = None
    #: Fleet-wide concurrent calls of this tenant per agent (``None``: no cap).
    max_sessions_per_agent: int | None = None
    over_cap: OverCap = "wait"
    breaker: Breaker = field(default_factory=Breaker)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary; credentials shown as their references, never resolved."""
        return {
            "tenant": self.name,
            "stt": self.stt,
            "llm": self.llm,
            "tts": self.tts,
            "greeting": self.greeting,
            "credentials": {name: str(ref) for name, ref in self.credentials.items()},
            "max_sessions": self.max_sessions,
            "max_sessions_per_agent": self.max_sessions_per_agent,
            "over_cap": self.over_cap,
            "breaker": {
                "failure_ratio": self.breaker.failure_ratio,
                "min_sessions": self.breaker.min_sessions,
                "window": self.breaker.window,
                "cooldown": self.breaker.cooldown,
            },
        }

    def resolve(self, environ: Mapping[str, str] = os.environ) -> TenantSettings:
        """This tenant's settings with its credentials' values (for one call's session).

        :raises CredentialError: the first reference that cannot be resolved.
        """
        values = {}
        for name, ref in self.credentials.items():
            try:
                values[name] = ref.resolve(environ)
            except CredentialError as exc:
                raise CredentialError(f"tenant '{self.name}': credentials.{name}: {exc}") from None
        return TenantSettings(self, values)


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """What a call's agent code reads of its tenant (:func:`tenant_settings`).

    ``config`` is the tenant's checked entry (references only); the
    credentials' values are read with :meth:`credential` and kept out of
    every ``repr``.
    """

    config: TenantConfig
    _credentials: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The call's tenant (:func:`current_tenant`)."""
        return self.config.name

    @property
    def credential_names(self) -> tuple[str, ...]:
        """The names of the tenant's credentials (``[tenants.<t>.credentials]``)."""
        return tuple(self._credentials)

    def credential(self, name: str) -> str:
        """The value of the tenant's credential ``name`` (resolved when the call started).

        :raises KeyError: the tenant has no credential of that name.
        """
        try:
            return self._credentials[name]
        except KeyError:
            raise KeyError(f"tenant '{self.name}' has no credential {name!r}") from None

    def to_wire(self) -> dict[str, Any]:
        """For the call's own session process only (its private socket): values included."""
        return {"config": self.config.describe(), "credentials": dict(self._credentials)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TenantSettings:
        """The inverse of :meth:`to_wire`."""
        c = data["config"]
        b = c["breaker"]
        config = TenantConfig(
            name=c["tenant"],
            stt=c["stt"],
            llm=c["llm"],
            tts=c["tts"],
            greeting=c["greeting"],
            credentials=MappingProxyType({k: _reference(v) for k, v in c["credentials"].items()}),
            max_sessions=c["max_sessions"],
            max_sessions_per_agent=c["max_sessions_per_agent"],
            over_cap=c["over_cap"],
            breaker=Breaker(b["failure_ratio"], b["min_sessions"], b["window"], b["cooldown"]),
        )
        return cls(config, MappingProxyType(dict(data["credentials"])))


def _reference(text: str) -> Reference:
    scheme, _, target = text.partition(":")
    if scheme not in ("env", "file"):
        raise ValueError(f"not a reference: {scheme!r}")
    return Reference(scheme, target)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TenantsConfig:
    """Every tenant's entry of one ``tenants.toml`` (:func:`openrtc.tenant_file.load_tenants`)."""

    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    #: The file it was read from (for logs); ``""``: none.
    source: str = ""

    def for_tenant(self, tenant: str) -> TenantConfig:
        """``tenant``'s entry; a tenant the file does not list gets the default tenant's
        entry under its own name (no entry at all: no overrides)."""
        found = self.tenants.get(tenant)
        if found is not None:
            return found
        default = self.tenants.get(DEFAULT_TENANT)
        if default is None:
            return TenantConfig(tenant)
        return replace(default, name=tenant)

    def env_names(self) -> frozenset[str]:
        """Every variable an ``env:`` credential reference names, of any tenant."""
        return frozenset(
            ref.target
            for config in self.tenants.values()
            for ref in config.credentials.values()
            if ref.scheme == "env"
        )


_settings: ContextVar[TenantSettings | None] = ContextVar("openrtc_tenant_settings", default=None)


def tenant_settings() -> TenantSettings:
    """The settings of the call this code runs for: its tenant's ``tenants.toml`` entry.

    Call it from agent code, as :func:`current_tenant`: the session sets it for
    everything it runs, in ``coroutine`` and ``process`` isolation alike. A
    tenant the file does not list gets the ``default`` tenant's entry; with no
    file, or outside a call, it is an entry with no overrides and no credentials.
    Read a credential with ``tenant_settings().credential("OPENAI_API_KEY")``:
    its value was resolved from its ``env:``/``file:`` reference when the call
    started, in the process that serves it. What the settings were when the call
    started stays for the whole call (a reload of the file applies to new calls).

        class Receptionist(Agent):
            def __init__(self) -> None:
                key = openrtc.tenant_settings().credential("OPENAI_API_KEY")
                super().__init__(instructions="...", llm=openai.LLM(api_key=key))
    """
    found = _settings.get()
    if found is not None:
        return found
    return TenantSettings(TenantConfig(current_tenant()))


@contextmanager
def tenant_settings_scope(settings: TenantSettings) -> Iterator[None]:
    """:func:`tenant_settings` is ``settings`` in this block and in the tasks started in it."""
    token = _settings.set(settings)
    try:
        yield
    finally:
        _settings.reset(token)

"""``tenants.toml``: where it is, how it is read, and every check of it.

The file lives in the agents directory (found like the agents: the worker's
agent module's directory), or where ``--tenants PATH`` / ``OPENRTC_TENANTS``
says. One table per tenant::

    [tenants.acme]
    greeting = "Welcome to Acme."
    llm = "openai/gpt-4.1-mini"
    max_sessions = 20

    [tenants.acme.credentials]
    OPENAI_API_KEY = "env:ACME_OPENAI_KEY"

:func:`parse_tenants` checks all of it and reports every problem, one line
each, naming the file, the tenant and the key (:class:`TenantsError`); a
credential written as a literal (not ``env:VAR`` or ``file:/path``) is one of
them, and its value is never repeated. Numbers are checked against their
bounds in :data:`openrtc.settings.NUMBERS` (``tenant.*``). The typed result is
:class:`~openrtc.agents.tenants.TenantsConfig`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from openrtc.agents.tenants import (
    OVER_CAP,
    Breaker,
    Reference,
    TenantConfig,
    TenantsConfig,
    is_tenant,
)
from openrtc.errors import ConfigError
from openrtc.settings import number_problem
from openrtc.wire import signing

__all__ = [
    "TENANTS_ENV",
    "TENANTS_FILE",
    "TenantsError",
    "find_tenants_file",
    "load_tenants",
    "parse_tenants",
    "reference_problems",
]

#: The tenants file's name in the agents directory.
TENANTS_FILE: Final = "tenants.toml"
#: The variable behind ``--tenants``.
TENANTS_ENV: Final = "OPENRTC_TENANTS"

_PROVIDERS: Final = ("stt", "llm", "tts")
_CAPS: Final = ("max_sessions", "max_sessions_per_agent")
_TENANT_KEYS: Final = (
    *_PROVIDERS,
    "greeting",
    "credentials",
    *_CAPS,
    "over_cap",
    "breaker",
)
#: Breaker keys, and whether each is a whole number.
_BREAKER_KEYS: Final = {
    "failure_ratio": False,
    "min_sessions": True,
    "window": False,
    "cooldown": False,
}
_CREDENTIAL_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The services' own secrets: a tenant's credential never names one (in
#: process isolation it would hand the fleet's key to a session process).
_SERVICE_SECRETS: Final = frozenset(
    {
        "LIVEKIT_API_KEY",
        "LIVEKIT_API_SECRET",
        "REDIS_URL",
        signing.KEY_ENV,
        signing.PREVIOUS_KEY_ENV,
        signing.KEY_FILE_ENV,
    }
)


class TenantsError(ConfigError):
    """The tenants file is invalid: :attr:`lines` holds one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def find_tenants_file(given: str | Path | None, agents_dir: Path | None) -> Path | None:
    """The tenants file: ``given`` (it must exist), else the agents directory's
    ``tenants.toml`` if there is one, else ``None`` (no tenants configured).

    :raises TenantsError: ``given`` is not a file.
    """
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise TenantsError([f"{path}: the tenants file {what} (--tenants, {TENANTS_ENV})"])
        return path
    if agents_dir is not None and (agents_dir / TENANTS_FILE).is_file():
        return agents_dir / TENANTS_FILE
    return None


def load_tenants(path: Path) -> TenantsConfig:
    """The tenants file at ``path``, checked.

    :raises TenantsError: every problem, one line each.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TenantsError([f"{path}: cannot be read: {type(exc).__name__}: {exc}"]) from None
    return parse_tenants(text, str(path))


def parse_tenants(text: str, where: str) -> TenantsConfig:
    """``text`` (a tenants file's) checked; ``where`` names it in each error line.

    :raises TenantsError: every problem, one line each.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TenantsError([f"{where}: not valid TOML: {exc}"]) from None
    errors: list[str] = []
    for key in document:
        if key != "tenants":
            errors.append(f"{where}: unknown key {key!r} (each tenant is a [tenants.<name>] table)")
    tables = document.get("tenants", {})
    if not isinstance(tables, dict):
        errors.append(f"{where}: tenants: must be a table of [tenants.<name>] tables")
        tables = {}
    tenants: dict[str, TenantConfig] = {}
    for name, table in tables.items():
        config = _tenant(name, table, f"{where}: tenant {name!r}", errors)
        if config is not None:
            tenants[name] = config
    if errors:
        raise TenantsError(errors)
    return TenantsConfig(MappingProxyType(tenants), where)


def _tenant(name: str, table: Any, where: str, errors: list[str]) -> TenantConfig | None:
    before = len(errors)
    if not is_tenant(name):
        errors.append(
            f"{where}: not a tenant name (1-64 letters, digits, '.', '_', '-', "
            "starting and ending with a letter or digit)"
        )
    if not isinstance(table, dict):
        errors.append(f"{where}: must be a table ([tenants.{name}])")
        return None
    for key in table:
        if key not in _TENANT_KEYS:
            errors.append(f"{where}: unknown key {key!r} (known: {', '.join(_TENANT_KEYS)})")
    values: dict[str, Any] = {}
    for key in _PROVIDERS:
        if key in table:
            values[key] = _provider(table[key], f"{where}: {key}", errors)
    if "greeting" in table:
        greeting = table["greeting"]
        if isinstance(greeting, str):
            values["greeting"] = greeting.strip()
        else:
            errors.append(f"{where}: greeting: must be a string, not {_kind(greeting)}")
    for key in _CAPS:
        if key in table:
            values[key] = _number(table[key], f"tenant.{key}", f"{where}: {key}", True, errors)
    if "over_cap" in table:
        over_cap = table["over_cap"]
        if over_cap in OVER_CAP:
            values["over_cap"] = over_cap
        else:
            shown = repr(over_cap) if isinstance(over_cap, str) else _kind(over_cap)
            errors.append(f"{where}: over_cap: must be 'wait' or 'reject', not {shown}")
    if "breaker" in table:
        values["breaker"] = _breaker(table["breaker"], f"{where}: breaker", errors)
    if "credentials" in table:
        values["credentials"] = _credentials(table["credentials"], where, errors)
    if len(errors) > before:
        return None
    return TenantConfig(name=name, **values)


def _provider(value: Any, where: str, errors: list[str]) -> str | None:
    if not isinstance(value, str):
        errors.append(
            f'{where}: must be a provider string ("openai/gpt-4.1-mini"), not {_kind(value)}'
        )
        return None
    if not value.strip():
        errors.append(f"{where}: must not be blank (leave the key out to keep the agent's)")
        return None
    return value.strip()


def _number(value: Any, bound: str, where: str, whole: bool, errors: list[str]) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.append(f"{where}: must be a number, not {_kind(value)}")
        return None
    if whole and not isinstance(value, int):
        errors.append(f"{where}: must be a whole number, not {value}")
        return None
    if (problem := number_problem(bound, value)) is not None:
        errors.append(f"{where}: {problem}")
        return None
    return value if whole else float(value)


def _breaker(table: Any, where: str, errors: list[str]) -> Breaker:
    if not isinstance(table, dict):
        errors.append(f"{where}: must be a table ([tenants.<name>.breaker])")
        return Breaker()
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _BREAKER_KEYS:
            errors.append(f"{where}: unknown key {key!r} (known: {', '.join(_BREAKER_KEYS)})")
            continue
        number = _number(
            value, f"tenant.breaker.{key}", f"{where}.{key}", _BREAKER_KEYS[key], errors
        )
        if number is not None:
            values[key] = number
    return Breaker(**values)


def _credentials(table: Any, where: str, errors: list[str]) -> Mapping[str, Reference]:
    if not isinstance(table, dict):
        errors.append(f"{where}: credentials: must be a table ([tenants.<name>.credentials])")
        return {}
    found: dict[str, Reference] = {}
    for name, value in table.items():
        at = f"{where}: credentials.{name}"
        if not _CREDENTIAL_NAME.fullmatch(name):
            errors.append(
                f"{at}: not a credential name (a letter or '_', then letters, digits, '_')"
            )
            continue
        ref = _reference(value, at, errors)
        if ref is not None:
            found[name] = ref
    return MappingProxyType(found)


def _reference(value: Any, where: str, errors: list[str]) -> Reference | None:
    # Never repeat the value: when it is not a reference it may be the secret itself.
    if not isinstance(value, str):
        errors.append(
            f'{where}: must be a reference ("env:VAR" or "file:/path"), not {_kind(value)}'
        )
        return None
    scheme, colon, target = value.partition(":")
    if not colon or scheme not in ("env", "file"):
        errors.append(
            f"{where}: a literal secret is not allowed in the tenants file; "
            'write a reference: "env:VAR" or "file:/path"'
        )
        return None
    if scheme == "env":
        if not _ENV_NAME.fullmatch(target):
            errors.append(f"{where}: env: must name an environment variable, not {target!r}")
            return None
        if target in _SERVICE_SECRETS:
            errors.append(f"{where}: env:{target} is the service's own secret, not a tenant's")
            return None
        return Reference("env", target)
    if not target.startswith("/"):
        errors.append(f"{where}: file: must be an absolute path, not {target!r}")
        return None
    return Reference("file", target)


def reference_problems(config: TenantsConfig, environ: Mapping[str, str]) -> list[str]:
    """One line per credential reference that could not be resolved here now: an
    unset variable, a file that is not there or not readable. Nothing is read
    or kept: a start-up check, in the process that will resolve them."""
    problems = []
    for tenant in config.tenants.values():
        for name, ref in tenant.credentials.items():
            where = f"{config.source}: tenant {tenant.name!r}: credentials.{name}"
            if ref.scheme == "env" and ref.target not in environ:
                problems.append(f"{where}: {ref} is not set")
            elif ref.scheme == "file" and not os.access(ref.target, os.R_OK):
                problems.append(f"{where}: {ref} is not a readable file")
    return problems


def _kind(value: Any) -> str:
    """A TOML value's kind, for an error line (not the value: it may be a secret)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date or time"

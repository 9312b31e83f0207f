"""What keeps an ``openrtc`` 0.20.1 user's agents directory and scripts working.

The ``openrtc`` 0.20.1 package on PyPI ran every agent in one livekit-agents
worker; this project routes them through Redis. Its users keep an agents
directory, run ``openrtc list ./agents`` and ``openrtc start``, give default
providers with ``--default-stt/--default-llm/--default-tts/--default-greeting``
and read ``openrtc list --json`` from scripts. This module holds the pieces
of that path that are not command-line parsing: the provider defaults (flags,
and ``OPENRTC_DEFAULT_*`` variables that also reach process-isolation
children), provider strings this package serves itself, and the ``list``
JSON in 0.20.1's shape.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from openrtc.agents.registry import AgentPool, ProviderValue

__all__ = [
    "DEFAULT_ENV",
    "LIST_SCHEMA_VERSION",
    "OFFLINE_LLM",
    "OFFLINE_TTS",
    "export_provider_defaults",
    "list_payload",
    "provider_defaults_from_env",
    "resolve_provider",
]

#: ``openrtc list --json``'s ``schema_version``: 0.20.1's (2), whose keys are
#: kept as they were; keys added here are extra and never renamed.
LIST_SCHEMA_VERSION: Final = 2

#: The variables behind ``--default-stt`` and friends, by pool keyword.
DEFAULT_ENV: Final = {
    "default_stt": "OPENRTC_DEFAULT_STT",
    "default_llm": "OPENRTC_DEFAULT_LLM",
    "default_tts": "OPENRTC_DEFAULT_TTS",
    "default_greeting": "OPENRTC_DEFAULT_GREETING",
}

#: A provider string in LiveKit's ``provider/model`` style for the offline
#: tone TTS (:mod:`openrtc.agents.tone_tts`): an agent runs with no cloud key, and a
#: provider default given as a string can select it.
OFFLINE_TTS: Final = "openrtc/tones"
#: The same for the offline rule-based LLM (:class:`openrtc.agents.offline.OfflineLLM`).
OFFLINE_LLM: Final = "openrtc/rules"


def provider_defaults_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, str | None]:
    """The pool's provider defaults from ``OPENRTC_DEFAULT_*`` (blank is unset)."""
    return {key: (environ.get(var) or "").strip() or None for key, var in DEFAULT_ENV.items()}


def export_provider_defaults(
    defaults: Mapping[str, str | None], environ: MutableMapping[str, str] = os.environ
) -> None:
    """Put the defaults in the environment, for processes this one starts.

    A process-isolation session child discovers the agents directory again;
    the defaults given as flags reach it this way.
    """
    for key, var in DEFAULT_ENV.items():
        value = defaults.get(key)
        if value:
            environ[var] = value


def resolve_provider(value: ProviderValue | None) -> ProviderValue | None:
    """``value``, with the provider strings this package serves made into providers.

    Every other string is a LiveKit inference string and is left to
    livekit-agents, as 0.20.1 did.
    """
    if isinstance(value, str) and value.strip() == OFFLINE_TTS:
        from openrtc.agents.tone_tts import ToneTTS

        return ToneTTS()
    if isinstance(value, str) and value.strip() == OFFLINE_LLM:
        from openrtc.agents.offline import OfflineLLM

        return OfflineLLM()
    return value


def _resident_set() -> dict[str, Any]:
    # 0.20.1's shape and metric names: current VmRSS on Linux, peak ru_maxrss on macOS.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return {
                    "bytes": int(line.split()[1]) * 1024,
                    "metric": "linux_vm_rss",
                    "description": "Current resident set size (VmRSS) of this process",
                }
    except OSError:
        pass
    if sys.platform == "darwin":
        return {
            "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "metric": "darwin_ru_max_rss",
            "description": "Peak resident set size of this process (not the current one)",
        }
    return {"bytes": None, "metric": "unavailable", "description": "Not measured here"}


def list_payload(pool: AgentPool, *, resources: bool = False) -> dict[str, Any]:
    """``openrtc list --json``: 0.20.1's keys and values, plus ours as extra keys.

    Per agent 0.20.1 has ``name``, ``class`` (the class's name), ``stt``,
    ``llm``, ``tts``, ``greeting`` and, with ``resources``, ``source_path``
    and ``source_file_bytes``; here ``class_label`` (``file.py:Class``) is
    added. Providers are labelled by :func:`openrtc.agents.registry.describe_provider`
    (a string as given; an object as ``module.Class(model)``, where 0.20.1
    printed its ``repr``).
    """
    agents = []
    sizes = []
    for config in pool:
        row: dict[str, Any] = {
            "name": config.name,
            "class": config.agent_cls.__name__,
            **{k: v for k, v in config.describe().items() if k not in ("name", "class")},
            "class_label": config.class_label,
        }
        if resources:
            path = config.source_path
            size = path.stat().st_size if path is not None and path.exists() else None
            row["source_path"] = str(path) if path is not None else None
            row["source_file_bytes"] = size
            if size is not None:
                sizes.append(size)
        agents.append(row)
    payload: dict[str, Any] = {
        "schema_version": LIST_SCHEMA_VERSION,
        "command": "list",
        "agents": agents,
    }
    if pool.router is not None:
        payload["router"] = pool.router.label  # ours: its ``module:function``
    observers = pool.observers
    if observers.start or observers.end:
        # Ours: each hook's ``module:function``s, in the order they start.
        payload["observers"] = {
            "start": [o.label for o in observers.start],
            "end": [o.label for o in observers.end],
        }
    if resources:
        payload["resource_summary"] = {
            "agent_count": len(agents),
            "total_source_bytes": sum(sizes),
            "agents_with_known_path": len(sizes),
            "resident_set": _resident_set(),
        }
    return payload

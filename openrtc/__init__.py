"""OpenRTC dispatch: route every LiveKit call to the right voice agent over Redis streams.

The data path is LiveKit -> :mod:`openrtc.dispatcher.dispatcher` -> Redis stream ->
:mod:`openrtc.worker.worker` -> room. Agents are plain ``livekit.agents.Agent``
subclasses registered in an :class:`AgentPool`; :func:`resolve_agent` picks
one per job: the agents directory's ``@router`` function if it names one, else
the six-step chain in :mod:`openrtc.agents.routing`. Functions marked
``@on_session_start`` / ``@on_session_end`` observe each call's start and end
(:mod:`openrtc.agents.observers`). Agent code reads its call's tenant with
:func:`current_tenant`, and its tenant's ``tenants.toml`` entry (provider
overrides, credentials) with :func:`tenant_settings` (:mod:`openrtc.agents.tenants`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from openrtc.agents.observers import on_session_end, on_session_start
from openrtc.agents.registry import AgentConfig, AgentPool, ProviderValue, agent_config, router
from openrtc.agents.reloading import pin_reload
from openrtc.agents.routing import Route, RouteRequest, RoutingTable, resolve_agent
from openrtc.agents.tenants import TenantSettings, current_tenant, tenant_settings
from openrtc.errors import OpenRTCError
from openrtc.store.checkpoint import idempotency_key

try:
    __version__ = version("openrtc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AgentConfig",
    "AgentPool",
    "OpenRTCError",
    "ProviderValue",
    "Route",
    "RouteRequest",
    "RoutingTable",
    "TenantSettings",
    "__version__",
    "agent_config",
    "current_tenant",
    "idempotency_key",
    "on_session_end",
    "on_session_start",
    "pin_reload",
    "resolve_agent",
    "router",
    "tenant_settings",
]

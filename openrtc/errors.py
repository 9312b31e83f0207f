"""Exceptions the command line turns into one-line messages.

Everything the user can fix (a bad agents directory, a bad name, a missing
server) raises a subclass of :class:`OpenRTCError`; the CLI prints its message
and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class OpenRTCError(Exception):
    """Base class for errors whose message is meant for the operator."""


class AgentRegistryError(OpenRTCError, ValueError):
    """An agent cannot be registered: bad name, duplicate, not an Agent subclass."""


class AgentDiscoveryError(OpenRTCError):
    """An agents directory cannot be loaded: missing, unimportable, or without agents."""


class ConfigError(OpenRTCError):
    """A setting is missing or malformed."""


class AgentBuildError(OpenRTCError):
    """An agent's class cannot be built: its constructor raised."""

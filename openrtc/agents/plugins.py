"""The livekit plugins the agents registered, and the files they download before a first call.

A livekit plugin (``livekit.plugins.silero``, ``...turn_detector``) registers
itself with ``livekit.agents.Plugin`` when its module is imported, so
importing the agents directory registers every plugin an agent uses. Its
``download_files()`` fetches what it needs at run time (models); running it
when the image is built means a container never downloads at its first call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from livekit.agents import Plugin

__all__ = ["PluginDownload", "download_plugin_files"]


@dataclass(frozen=True, slots=True)
class PluginDownload:
    """What one plugin's ``download_files()`` did."""

    package: str
    version: str
    #: The plugin has a ``download_files()`` of its own (the base one does nothing).
    downloads: bool
    seconds: float
    #: ``Type: message`` when it raised; ``None`` when it succeeded.
    error: str | None = None

    def line(self) -> str:
        """One line for the command's output."""
        name = f"{self.package} {self.version}"
        if self.error is not None:
            return f"error: {name}: download failed: {self.error}"
        if not self.downloads:
            return f"{name}: nothing to download"
        return f"{name}: files downloaded ({self.seconds:.1f} s)"


def download_plugin_files() -> list[PluginDownload]:
    """Run ``download_files()`` of every registered plugin, in registration order.

    A plugin that raises is reported and the rest still run.
    """
    results: list[PluginDownload] = []
    for plugin in list(Plugin.registered_plugins):
        downloads = type(plugin).download_files is not Plugin.download_files
        started = time.monotonic()
        error: str | None = None
        try:
            plugin.download_files()
        except Exception as exc:  # reported in the result; the others still run
            error = f"{type(exc).__name__}: {exc}"
        results.append(
            PluginDownload(
                plugin.package, plugin.version, downloads, time.monotonic() - started, error
            )
        )
    return results

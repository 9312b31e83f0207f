"""The ``openrtc`` command line: :data:`app` with every command registered.

Importing a command module registers its commands on :data:`~openrtc.cli.app.app`.
"""

from __future__ import annotations

# The order of these imports is the order `openrtc --help` lists the commands in.
# isort: off
from openrtc.cli import agent_cmds  # list, route
from openrtc.cli import service_cmds  # dispatcher, worker, start
from openrtc.cli import ops_cmds  # status, dlq
from openrtc.cli import dev_cmds  # call, dev

# isort: on
from openrtc.cli.app import app

__all__ = ["agent_cmds", "app", "dev_cmds", "main", "ops_cmds", "service_cmds"]


def main() -> None:
    """Console-script entry point."""
    app()

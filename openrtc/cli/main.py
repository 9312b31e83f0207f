"""The ``openrtc`` command line: :data:`app` with every command registered.

Importing a command module registers its commands on :data:`~openrtc.cli.app.app`.
"""

from __future__ import annotations

import logging
import os
import sys

# The order of these imports is the order `openrtc --help` lists the commands in.
# isort: off
from openrtc.cli import agent_cmds  # list, route
from openrtc.cli import service_cmds  # dispatcher, worker, start
from openrtc.cli import ops_cmds  # status, dlq
from openrtc.cli import dev_cmds  # call, connect, dev
from openrtc.cli import author_cmds  # console, download-files

# isort: on
from openrtc.cli.app import app

__all__ = ["agent_cmds", "app", "author_cmds", "dev_cmds", "main", "ops_cmds", "service_cmds"]


def main() -> None:
    """Console-script entry point.

    The process ends with ``os._exit`` once the command is done and its output
    flushed, skipping interpreter finalization: a livekit native runtime thread
    that calls into Python while the interpreter finalizes is ended with
    ``pthread_exit``, which unwinds through Rust's ``extern "C"`` frames and
    aborts the process (SIGABRT, "panic in a function that cannot unwind"), so a
    worker stopped cleanly right after its room closed could exit -6. Services
    have closed their clients and flushed their traces by then; the session
    child process ends the same way.
    """
    code: int = 0
    try:
        app()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1  # output lost (a closed pipe): say so in the exit code
    os._exit(code)

"""Child process of ``process`` isolation: one session, then exit.

``python -m openrtc.session_child AGENTS_DIR AGENT``; see
:mod:`openrtc.runners` for the line protocol. The job line carries the
room URL and token the worker minted: a child never holds the API secret.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
from typing import Any

import anyio
from anyio.streams.text import TextReceiveStream


def _emit(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def _serve(agents_dir: str, agent: str) -> int:
    from openrtc.agents import AgentPool
    from openrtc.messages import JobMessage
    from openrtc.session import RoomAccess, SessionControl, new_job_process, run_session

    try:
        config = AgentPool.from_directory(agents_dir).get(agent)
        proc = new_job_process("process")
        if config.prewarm is not None:
            config.prewarm(proc)
    except Exception as exc:
        _emit({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit({"ready": True})

    stdin = TextReceiveStream(_StdinStream())
    buffer = ""

    async def next_line() -> str | None:
        nonlocal buffer
        while "\n" not in buffer:
            try:
                buffer += await stdin.receive()
            except anyio.EndOfStream:
                return None
        line, buffer = buffer.split("\n", 1)
        return line

    first = await next_line()
    if first is None:
        return 0  # the worker went away before giving us a job
    job = json.loads(first)
    message = JobMessage.decode({k.encode(): base64.b64decode(v) for k, v in job["fields"].items()})
    access = RoomAccess(job["url"], job["token"])
    control = SessionControl()

    async with anyio.create_task_group() as tg:

        async def watch_stdin() -> None:
            while True:
                line = await next_line()
                if line is None:  # our worker died: leave the room now
                    control.stop("worker process gone", takeover=True)
                    return
                command = json.loads(line)
                if "stop" in command:
                    control.stop(command["stop"], takeover=bool(command.get("takeover")))

        async def report_joined() -> None:
            await control.joined.wait()
            _emit({"joined": True})

        tg.start_soon(watch_stdin)
        tg.start_soon(report_joined)
        outcome = await run_session(
            message, config, access, proc, control, worker_id=job["worker_id"]
        )
        _emit(
            {
                "outcome": {
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "error": outcome.error,
                }
            }
        )
        tg.cancel_scope.cancel()
    return 0


class _StdinStream(anyio.abc.ByteReceiveStream):
    """stdin as an anyio byte stream (reads in a worker thread)."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        stdin: Any = sys.stdin.buffer  # a BufferedReader: read1 returns what is there
        data: bytes = await anyio.to_thread.run_sync(stdin.read1, max_bytes, abandon_on_cancel=True)
        if not data:
            raise anyio.EndOfStream
        return data

    async def aclose(self) -> None:
        return None


def main() -> None:
    from openrtc.logs import configure_logging

    agents_dir, agent = sys.argv[1], sys.argv[2]
    # As the worker logs (runners.ProcessRunner passes its level and format).
    configure_logging(
        os.environ.get("OPENRTC_LOG_LEVEL", "INFO"), os.environ.get("OPENRTC_LOG_FORMAT", "text")
    )
    try:
        code = anyio.run(_serve, agents_dir, agent)
    except BrokenPipeError:
        # The worker closed our stdout (it stopped while we were starting):
        # nobody is left to tell. Quietly, and without a second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception:
        # In the log's format (JSON lines stay JSON), not a bare traceback.
        logging.getLogger("openrtc.session").exception("session process failed")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()

"""``openrtc worker`` in processes of their own (to be killed, drained, restarted).

Three variants, kept apart because they differ in behaviour: ``worker_process``
(any agent, output piped), ``worker_process_logged`` (dental, output to a log
file) and ``worker_process_killed_on_exit`` (a context manager; a short lease,
an ephemeral HTTP port, SIGKILLed on exit).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from openrtc.devtools.devstack import LiveKitServer
from tests.support.stack import OFFLINE_AGENTS


def service_env(livekit: LiveKitServer, redis_url: str, ns: str, **extra: str) -> dict[str, str]:
    """This process's environment, plus what an ``openrtc`` service process needs to
    reach ``livekit`` and ``redis_url`` in namespace ``ns`` (and ``extra``)."""
    return dict(
        os.environ,
        **extra,
        LIVEKIT_URL=livekit.url,
        LIVEKIT_API_KEY=livekit.api_key,
        LIVEKIT_API_SECRET=livekit.api_secret,
        REDIS_URL=redis_url,
        OPENRTC_NAMESPACE=ns,
    )


def worker_process(
    livekit: LiveKitServer, redis_url: str, ns: str, agent: str, *args: str
) -> subprocess.Popen[str]:
    env = service_env(livekit, redis_url, ns)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openrtc",
            "worker",
            "--agent",
            agent,
            "--agents-dir",
            str(OFFLINE_AGENTS),
            *args,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def worker_process_logged(
    livekit: LiveKitServer, redis_url: str, ns: str, log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """``openrtc worker --agent dental``, its output to ``log``."""
    env = service_env(livekit, redis_url, ns)
    command = [sys.executable, "-m", "openrtc", "worker", "--agent", "dental"]
    command += ["--agents-dir", str(OFFLINE_AGENTS), *args]
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


#: The lease of `worker_process_killed_on_exit` workers (s): a takeover within seconds.
LEASE = 2.0


@contextmanager
def worker_process_killed_on_exit(
    livekit: LiveKitServer,
    redis_url: str,
    ns: str,
    *args: str,
    agent: str = "dental",
    agents_dir: Path = OFFLINE_AGENTS,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``openrtc worker`` in a process of its own (to be killed); SIGKILLed on exit.

    ``log``: where its output (its log lines) goes; else its log goes to ours.
    """
    env = service_env(livekit, redis_url, ns)
    command = [sys.executable, "-m", "openrtc", "worker", "--agent", agent]
    command += ["--agents-dir", str(agents_dir), "--lease", str(LEASE), "--http-port", "0"]
    with contextlib.ExitStack() as files:
        out = files.enter_context(log.open("wb")) if log is not None else None
        process = subprocess.Popen(
            [*command, *args],
            env=env,
            stdout=out or subprocess.DEVNULL,
            stderr=out if out is not None else None,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found

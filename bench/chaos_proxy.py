"""The chaos ledger's slow Redis: a :class:`~openrtc.devtools.devstack.DelayProxy` in a
process of its own, in front of Redis for every service.

Run by ``bench/chaos.py``: ``python bench/chaos_proxy.py <redis port>`` prints
the port it listens on, then reads lines from stdin: a number is the delay
(seconds) each Redis reply is held from now on (``0``: none). Its own process,
not the harness's event loop: every service's Redis traffic passes through it,
and a harness busy with its callers would slow Redis down outside the window.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio

from openrtc.devtools.devstack import delay_proxy


async def _serve(target: int) -> None:
    async with delay_proxy(target) as proxy:
        print(proxy.port, flush=True)
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            proxy.reply_delay = float(line.strip() or 0)
        # The harness closed our stdin: it is gone.


class RedisProxy:
    """The proxy process, started and told from the harness."""

    def __init__(self, target: int, log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(target)],
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def delay(self, seconds: float) -> None:
        """Hold each Redis reply ``seconds`` from now on."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


if __name__ == "__main__":
    anyio.run(_serve, int(sys.argv[1]))

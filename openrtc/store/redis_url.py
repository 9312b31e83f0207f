"""One Redis URL to one client: a single server, a Redis Cluster, or a Sentinel-managed primary.

``REDIS_URL`` (and ``--redis-url``) picks the topology by its scheme, so every
service and command takes the same one setting:

- ``redis://host:port/db`` (``rediss://`` for TLS): one server (redis-py's own URL).
- ``redis+cluster://host:port,host:port`` (``rediss+cluster://``): a Redis
  Cluster; the hosts are seed nodes (any few; the client discovers the rest).
  Keys are then hash-tagged per agent (:class:`~openrtc.wire.keys.Keys` with
  ``cluster=True``), so each agent's multi-key operations stay in one slot.
- ``redis+sentinel://host:port,host:port/service_name[/db]``
  (``rediss+sentinel://``): the primary that the Sentinels name for
  ``service_name``, found again after every failover.

User name, password and query options (``?ssl_cert_reqs=none`` ...) are
passed to every data connection as ``redis://`` passes them; keyword options
given by the caller (timeouts, retries, TLS) are applied on top, to the
single, cluster and sentinel clients alike. Sentinels themselves are
contacted with the same TLS and timeout options and, for their own password,
``sentinel_password`` / ``sentinel_username`` in the query.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError

from openrtc.errors import ConfigError

__all__ = ["CLUSTER_SCHEMES", "SENTINEL_SCHEMES", "client_from_url", "is_cluster_url"]

CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
_DEFAULT_SENTINEL_PORT: Final = 26379
# redis-py typed Sentinel's constructor in 8.2 and not before; a typed alias
# keeps mypy --strict quiet on both without an ignore that one of them calls unused.
_new_sentinel: Final[Callable[..., Sentinel]] = Sentinel
_DEFAULT_PORT: Final = 6379
#: Query options for the Sentinels themselves, not for the data connections.
_SENTINEL_OPTIONS: Final = ("sentinel_password", "sentinel_username")
# Options that make sense per connection but not for the cluster client's
# constructor (it has no database but 0, and no pool of its own to pass).
_NOT_FOR_CLUSTER: Final = ("db", "health_check_interval", "connection_class")


class _Connection(Connection):
    """redis-py's connection, but one closed under a command fails as a lost connection.

    redis-py's own error paths close connections other tasks are using: the
    cluster client closes every node's connections on CLUSTERDOWN, on repeated
    MOVED and on a failed topology refresh, all common during a failover. A
    task that passed the connection's is-connected check just before then
    writes to ``None`` and gets an ``AttributeError`` that no retry and no
    ``except REDIS_DOWN`` expects (a worker died of it in a cluster failover).
    Here it is the ``ConnectionError`` every caller already rides out.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except AttributeError as exc:
            if self._writer is not None:
                raise
            raise RedisConnectionError(
                "Redis connection closed by another task while a command was sent"
            ) from exc


class _SSLConnection(_Connection, SSLConnection):
    pass


class _SentinelConnection(_Connection, SentinelManagedConnection):
    pass


class _SentinelSSLConnection(_Connection, SentinelManagedSSLConnection):
    pass


#: redis-py's connection classes and ours; any other (a Unix socket) is kept.
_SAFE_CONNECTIONS: Final[dict[type[AbstractConnection], type[AbstractConnection]]] = {
    Connection: _Connection,
    SSLConnection: _SSLConnection,
    SentinelManagedConnection: _SentinelConnection,
    SentinelManagedSSLConnection: _SentinelSSLConnection,
}


def _safe(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    return _SAFE_CONNECTIONS.get(connection_class, connection_class)


#: Commands whose keys follow the STREAMS keyword, and where its search starts
#: (Redis's key specs: after XREADGROUP's group and consumer names).
_STREAMS_FROM: Final = {"XREAD": 1, "XREADGROUP": 4}


def stream_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of an XREAD or XREADGROUP command (``args`` with its name first),
    or ``None`` if it is neither or is malformed (the server then says why).

    ``STREAMS k1 k2 ... id1 id2 ...``: the first half after the keyword.
    """
    name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    start = _STREAMS_FROM.get(name.upper())
    if start is None:
        return None
    for i in range(start, len(args)):
        word = args[i].decode() if isinstance(args[i], bytes) else args[i]
        if isinstance(word, str) and word.upper() == "STREAMS":
            rest = args[i + 1 :]
            if not rest or len(rest) % 2:
                return None
            return list(rest[: len(rest) // 2])
    return None


class _CommandsParser(AsyncCommandsParser):
    """redis-py's key finder, reading the keys of stream reads itself.

    redis-py asks one node (COMMAND GETKEYS) for the keys of commands that name
    them after a keyword, before every such command, and keeps asking that node
    once it is dead: a cluster client whose node was the killed master read no
    stream again, slot map refreshed or not (redis-py 8.2). Reading them here
    also saves that round trip on every XREADGROUP.
    """

    async def get_keys(self, *args: Any) -> tuple[Any, ...] | None:
        keys = stream_keys(args)
        if keys is not None:
            return tuple(keys)
        return await super().get_keys(*args)


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (keys must then be hash-tagged)."""
    return _scheme(url) in CLUSTER_SCHEMES


def _hosts(netloc: str, default_port: int, url: str) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.strip().rpartition(":")
        if not host:
            host, port = port, ""
        try:
            hosts.append((host.strip("[]"), int(port) if port else default_port))
        except ValueError:
            raise ConfigError(f"bad host:port {part!r} in the Redis URL") from None
    if not hosts or not all(h for h, _ in hosts):
        raise ConfigError(f"the Redis URL names no host: {_scheme(url)}://...")
    return hosts


def _auth_and_query(url: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(user name / password, raw query) of a multi-host URL, via redis-py's parser."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo = netloc.rpartition("@")[0]
    # redis-py's parser wants one host: hand it the first, keep its options.
    first = netloc.rpartition("@")[2].split(",")[0]
    plain = "rediss" if _scheme(url).startswith("rediss") else "redis"
    rebuilt = f"{plain}://{userinfo + '@' if userinfo else ''}{first}"
    # The query as written, still percent-encoded (``password=p%26q``): it is
    # decoded once, by redis-py's parser, as for a ``redis://`` URL.
    data_options = [
        pair
        for pair in parts.query.split("&")
        if pair and unquote_plus(pair.partition("=")[0]) not in _SENTINEL_OPTIONS
    ]
    if data_options:
        rebuilt += "?" + "&".join(data_options)
    options: dict[str, Any] = parse_url(rebuilt)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "path"):
        options.pop(name, None)
    return options, dict(parse_qsl(parts.query))


def client_from_url(url: str, **options: Any) -> Redis:
    """A redis-py asyncio client for ``url`` (any of the three schemes), with ``options``.

    The cluster client is returned typed as :class:`~redis.asyncio.Redis`: it
    speaks every command openrtc sends (single-slot scripts, pipelines,
    single-slot transactions) with the same signatures.
    """
    scheme = _scheme(url)
    if scheme in CLUSTER_SCHEMES:
        return cast(Redis, _cluster(url, options))
    if scheme in SENTINEL_SCHEMES:
        client = _sentinel(url, options)
    elif scheme in ("redis", "rediss", "unix"):
        client = Redis.from_pool(ConnectionPool.from_url(url, **options))
    else:
        raise ConfigError(
            f"REDIS_URL scheme {scheme!r} is not one of redis://, rediss://, unix://, "
            "redis+cluster://, rediss+cluster://, redis+sentinel://, rediss+sentinel://"
        )
    pool = client.connection_pool
    pool.connection_class = _safe(pool.connection_class)
    return client


def _cluster(url: str, options: dict[str, Any]) -> RedisCluster:
    url_options, _ = _auth_and_query(url)
    kwargs = {**url_options, **options}
    if kwargs.pop("connection_class", None) is not None or scheme_is_tls(url):
        kwargs["ssl"] = True
    for name in _NOT_FOR_CLUSTER:
        kwargs.pop(name, None)
    hosts = _hosts(urlsplit(url).netloc, _DEFAULT_PORT, url)
    nodes = [ClusterNode(host, port) for host, port in hosts]
    client = RedisCluster(startup_nodes=nodes, **kwargs)
    client.commands_parser = _CommandsParser()
    # Nodes are made from these keyword arguments as the client discovers
    # them; the seed nodes exist already.
    manager = client.nodes_manager
    safe = cast(type[Connection], _safe(manager.connection_kwargs["connection_class"]))
    manager.connection_kwargs["connection_class"] = safe
    for node in [*manager.startup_nodes.values(), *manager.nodes_cache.values()]:
        node.connection_class = safe
    return client


def slot_master_client(cluster: RedisCluster, key: str) -> Redis:
    """A plain client for the master now serving ``key``'s slot, with the cluster's
    connection settings (credentials, TLS, timeouts, client name).

    For what redis-py's cluster client cannot do on a connection of its own:
    hold a shard-channel subscription (crash detection's liveness). Raises
    :class:`~redis.exceptions.SlotNotCoveredError` while no master serves the slot.
    """
    node = cluster.get_node_from_key(key)
    if node is None:
        raise SlotNotCoveredError(f"no master serves the slot of {key!r}")
    pool = ConnectionPool(connection_class=node.connection_class, **dict(node.connection_kwargs))
    return Redis.from_pool(pool)


async def refresh_slots(cluster: RedisCluster) -> None:
    """Reread which master serves which slot (after a failover or a slot move)."""
    await cluster.nodes_manager.initialize()


def scheme_is_tls(url: str) -> bool:
    """Whether ``url`` asks for TLS (``rediss``, ``rediss+cluster``, ``rediss+sentinel``)."""
    return _scheme(url).startswith("rediss")


def _sentinel(url: str, options: dict[str, Any]) -> Redis:
    parts = urlsplit(url)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not segments:
        raise ConfigError(
            "a Sentinel URL names the service: redis+sentinel://host:port,host:port/service_name"
        )
    service = segments[0]
    url_options, query = _auth_and_query(url)
    kwargs = {**url_options, **options}
    if len(segments) > 1:
        try:
            kwargs["db"] = int(segments[1])
        except ValueError:
            raise ConfigError(f"bad database {segments[1]!r} in the Sentinel URL") from None
    connection_class = kwargs.pop("connection_class", None)
    tls = scheme_is_tls(url) or connection_class is not None
    # Sentinels get the transport options (TLS, timeouts) but not the data
    # nodes' credentials: they have their own, if any.
    sentinel_kwargs: dict[str, Any] = {
        k: v
        for k, v in kwargs.items()
        if k.startswith(("socket_", "ssl_")) or k in ("retry", "retry_on_error")
    }
    if tls:
        sentinel_kwargs["ssl"] = True
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"]
    if "sentinel_username" in query:
        sentinel_kwargs["username"] = query["sentinel_username"]
    if tls:
        kwargs["ssl"] = True
    sentinel = _new_sentinel(
        _hosts(parts.netloc, _DEFAULT_SENTINEL_PORT, url),
        sentinel_kwargs=sentinel_kwargs,
        **kwargs,
    )
    client: Redis = sentinel.master_for(service)
    return client

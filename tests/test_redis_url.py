"""``REDIS_URL`` to client options, for every scheme: pure, no server (no client connects).

The real-server side (passwords with such characters, against a real
cluster and real Sentinels) is in ``test_redis_topologies.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from openrtc.store.redis_url import client_from_url, stream_keys

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

HOSTS = {
    "redis": "h1:7001/0",
    "rediss": "h1:7001/0",
    "redis+cluster": "h1:7001,h2:7002",
    "rediss+cluster": "h1:7001,h2:7002",
    "redis+sentinel": "h1:26379,h2:26380/svc",
    "rediss+sentinel": "h1:26379,h2:26380/svc",
}
#: (query, userinfo) as written in the URL -> what the data connections get.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("password=p%26q%3Dr", "", {"password": "p&q=r"}),
    ("password=a%2Bb%20c%25d", "", {"password": "a+b c%d"}),
    ("username=u%3Dv&password=p%23x", "", {"username": "u=v", "password": "p#x"}),
    ("password=plain&socket_timeout=2.5", "", {"password": "plain", "socket_timeout": 2.5}),
    ("", "us%40r:p%3Aw%2Fz%26@", {"username": "us@r", "password": "p:w/z&"}),
]


def data_options(client: Any) -> dict[str, Any]:
    """The keyword arguments every data connection of ``client`` is made with."""
    if hasattr(client, "nodes_manager"):  # a cluster client
        return dict(client.nodes_manager.connection_kwargs)
    return dict(client.connection_pool.connection_kwargs)


@pytest.mark.parametrize("scheme", list(HOSTS))
@pytest.mark.parametrize(("query", "userinfo", "expected"), CASES)
async def test_encoded_url_values_reach_the_connections_decoded_once(
    scheme: str, query: str, userinfo: str, expected: dict[str, Any]
) -> None:
    url = f"{scheme}://{userinfo}{HOSTS[scheme]}" + (f"?{query}" if query else "")
    client = client_from_url(url)
    try:
        options = data_options(client)
    finally:
        await client.aclose()
    assert {k: options.get(k) for k in expected} == expected


@pytest.mark.parametrize("scheme", ["redis+sentinel", "rediss+sentinel"])
async def test_the_sentinels_own_credentials_are_decoded_once_and_kept_apart(
    scheme: str,
) -> None:
    url = (
        f"{scheme}://{HOSTS[scheme]}?password=p%26q%3Dr"
        "&sentinel_username=s%40n&sentinel_password=s%26t%3Du"
    )
    client = client_from_url(url)
    try:
        sentinel = dict(client.connection_pool.sentinel_manager.sentinel_kwargs)
        options = data_options(client)
    finally:
        await client.aclose()
    assert (sentinel["username"], sentinel["password"]) == ("s@n", "s&t=u")
    assert options["password"] == "p&q=r"
    assert "sentinel_password" not in options
    assert "sentinel_username" not in options


@pytest.mark.parametrize(
    ("args", "keys"),
    [
        (("XREAD", "STREAMS", "a", "0"), ["a"]),
        (("XREAD", "COUNT", 100, "BLOCK", 5000, "STREAMS", "a", "b", "0", "$"), ["a", "b"]),
        ((b"xreadgroup", b"GROUP", b"g", b"c", b"STREAMS", b"k", b">"), [b"k"]),
        # A group or consumer named like the keyword is not it.
        (("XREADGROUP", "GROUP", "STREAMS", "streams", "NOACK", "STREAMS", "k", ">"), ["k"]),
        (("XREAD", "STREAMS", "a", "b", "0"), None),  # odd: the server rejects it
        (("XREAD", "COUNT", 1), None),
        (("GET", "k"), None),  # not a stream read: redis-py's own rules
    ],
)
def test_stream_reads_name_their_keys_without_asking_a_node(
    args: tuple[Any, ...], keys: list[Any] | None
) -> None:
    assert stream_keys(args) == keys

"""Redis access: the ACL a deployment grants openrtc, and errors that mean "wrong settings".

The ACL below is the one the README quotes and the tests run against: keys
and shard channels of the namespace only, and exactly the commands openrtc
sends (its own, those inside its Lua scripts, which Redis checks too, and
what redis-py sends on connecting). ``CONFIG GET`` and ``INFO`` are left out
on purpose: the start-up durability check (:mod:`openrtc.store.redis_health`)
reads them when allowed and goes on without them otherwise.

A wrong password, a user the server refuses, or a TLS certificate that does
not verify is a configuration error, not an outage: services stop at
start-up with one line saying so instead of waiting for a Redis that will
never let them in.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

import anyio
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from openrtc.errors import ConfigError
from openrtc.settings import redact_url
from openrtc.store.streams import REDIS_DOWN

__all__ = ["ACL_COMMANDS", "acl_rules", "check_redis_access", "misconfiguration"]

#: Every command openrtc needs, as ACL rules. Connecting: PING (health
#: checks) and CLIENT SETNAME (services name their connections; no CLIENT
#: SETINFO is sent, see :func:`openrtc.store.streams.connect_redis`). Scripts:
#: EVALSHA and SCRIPT LOAD (a script is loaded once and again after Redis
#: lost its cache). The rest are the stream, hash, set and sorted-set
#: commands of the queue, the membership registry and the dead letters,
#: MULTI/EXEC for the acknowledge-and-delete transaction, TIME for the Redis
#: clock, WAIT for ``--wait-replicas``. Crash detection: each worker holds
#: a shard-channel subscription of the namespace (SSUBSCRIBE, the only
#: channels granted; nothing is ever published) and peers count its
#: subscribers (PUBSUB SHARDNUMSUB, O(1), sees no other channel): not CLIENT
#: LIST, an admin command that lists every client of the server.
ACL_COMMANDS: Final = (
    "-@all +ping +client|setname +evalsha +script|load "
    "+multi +exec +time +wait "
    "+xadd +xreadgroup +xread +xack +xdel +xrange +xrevrange +xlen +xtrim "
    "+xgroup|create +xgroup|delconsumer +xgroup|setid +xinfo|groups +xinfo|consumers "
    "+xpending +xclaim "
    "+hset +hget +hmget +hgetall +hdel +get +set +del +exists +expire +pexpire "
    "+sadd +smembers +zadd +zrange +zrem +zremrangebyscore "
    "+ssubscribe +sunsubscribe +pubsub|shardnumsub"
)


def acl_rules(namespace: str) -> str:
    """The ACL rules for a user that runs openrtc in ``namespace`` and nothing else.

    Use them after ``ACL SETUSER <user> on ><password>`` (or in an ACL file
    after ``user <user> on ><password>``).
    """
    return f"resetkeys ~{namespace}:* resetchannels &{namespace}:* {ACL_COMMANDS}"


def misconfiguration(exc: BaseException) -> str | None:
    """What is wrong with the settings if ``exc`` says so, else ``None`` (an outage).

    Never includes a password: the messages are redis-py's and the TLS
    library's, which name the host and the reason only.
    """
    if isinstance(exc, AuthenticationError):
        return f"authentication failed ({exc}); check the user and password in the Redis URL"
    if isinstance(exc, NoPermissionError):
        return f"the Redis user lacks a permission ({exc}); see the ACL in the README"
    seen: BaseException | None = exc
    for _ in range(5):  # redis-py raises its ConnectionError while handling the TLS error
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verification failed ({seen.verify_message}); "
                "set the CA with ssl_ca_certs=<file> in the Redis URL"
            )
        if isinstance(seen, ssl.SSLError):
            return (
                f"TLS failed ({seen.reason or seen}); check the rediss:// URL and its ssl_* options"
            )
        seen = seen.__cause__ or seen.__context__
    return None


async def check_redis_access(redis: Redis, url: str, log: logging.Logger) -> None:
    """PING once at start-up: raise :class:`ConfigError` if the settings cannot work.

    An unreachable or slow Redis is not an error here (services ride an
    outage out and keep trying); a refused password or certificate is.
    """
    try:
        with anyio.fail_after(5):  # a host that drops packets: go on, as in an outage
            await redis.ping()
    except REDIS_DOWN as exc:
        problem = misconfiguration(exc)
        if problem is not None:
            raise ConfigError(f"Redis at {redact_url(url)}: {problem}") from None
        log.debug("Redis not reachable at start-up (%s); will keep trying", exc)

"""Redis with a password, the README's ACL user, and TLS: everything works, nothing leaks.

One real Redis here has ``requirepass`` (the admin's, on a plain port the
test alone uses) and a TLS port that asks for client certificates; the
services and commands connect over TLS as an ACL user made from exactly the
rules the README quotes (:func:`openrtc.store.redis_access.acl_rules`). A call runs
end to end through ``openrtc dispatcher`` and ``openrtc worker`` processes at
DEBUG, every command runs against the same Redis, and then every log line,
every command's output and every Redis key and value is searched for the
LiveKit API secret, the Redis passwords and any JWT.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import pytest
from redis.asyncio import Redis

from openrtc.devtools.devstack import LiveKitServer, RedisServer
from openrtc.store.redis_access import acl_rules
from openrtc.store.streams import StreamStore
from openrtc.wire.keys import Keys
from openrtc.wire.messages import DeadReason
from openrtc.wire.signing import KEY_ENV, SigningKeys, verify_job
from tests.support.jobs import message
from tests.support.stack import OFFLINE_AGENTS, ROOT, eventually, unique

pytestmark = pytest.mark.anyio

JWT = re.compile(rb"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) in ``directory``."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", f"/CN={name}", "-keyout", key, "-out", cert,
    )  # fmt: skip
    return cert, key


def make_cert(directory: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    """A certificate for ``san`` signed by ``ca``: (certificate, key)."""
    cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", key, "-out", csr,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "1", "-out", cert, "-extfile", ext,
    )  # fmt: skip
    return cert, key


@dataclass
class SecuredRedis:
    server: RedisServer
    tls_port: int
    admin_password: str
    user: str
    password: str
    namespace: str
    ca: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path

    @property
    def admin_url(self) -> str:
        """The default user (``requirepass``), plain TCP: the test's own view."""
        return f"redis://:{self.admin_password}@127.0.0.1:{self.server.port}/0"

    def url(self, *, password: str | None = None, ca: Path | None = None) -> str:
        """The ACL user over TLS with a client certificate, as a deployment would write it."""
        query = urlencode(
            {
                "ssl_ca_certs": ca or self.ca,
                "ssl_certfile": self.client_cert,
                "ssl_keyfile": self.client_key,
            },
            safe="/",
        )
        secret = self.password if password is None else password
        return f"rediss://{self.user}:{secret}@127.0.0.1:{self.tls_port}/0?{query}"

    @property
    def secrets(self) -> list[bytes]:
        return [self.admin_password.encode(), self.password.encode()]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredRedis]:
    tls = tmp_path_factory.mktemp("tls")
    ca = make_ca(tls, "test-ca")
    wrong_ca, _ = make_ca(tls, "other-ca")
    server_cert, server_key = make_cert(tls, "server", ca, "IP:127.0.0.1,DNS:localhost")
    client_cert, client_key = make_cert(tls, "client", ca, "DNS:openrtc-client")
    admin_password = secrets.token_urlsafe(24)
    tls_port = _free_port()
    args = (
        "--requirepass", admin_password,
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(server_cert),
        "--tls-key-file", str(server_key),
        "--tls-ca-cert-file", str(ca[0]),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    with RedisServer(args=args) as server:
        state = SecuredRedis(
            server=server,
            tls_port=tls_port,
            admin_password=admin_password,
            user="openrtc-app",
            password=secrets.token_urlsafe(24),
            namespace=unique("sec"),
            ca=ca[0],
            client_cert=client_cert,
            client_key=client_key,
            wrong_ca=wrong_ca,
        )

        async def make_user() -> None:
            admin = Redis.from_url(state.admin_url)
            try:
                rules = acl_rules(state.namespace).split()
                await admin.execute_command(
                    "ACL", "SETUSER", state.user, "on", f">{state.password}", *rules
                )
            finally:
                await admin.aclose()

        anyio.run(make_user)
        yield state


# -- running openrtc --------------------------------------------------------------


def env_for(livekit: LiveKitServer, redis_url: str, ns: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(
        os.environ,
        PYTHONPATH=path,
        LIVEKIT_URL=livekit.url,
        LIVEKIT_API_KEY=livekit.api_key,
        LIVEKIT_API_SECRET=livekit.api_secret,
        REDIS_URL=redis_url,
        OPENRTC_NAMESPACE=ns,
        OPENRTC_LOG_FORMAT="json",
        OPENRTC_LOG_LEVEL="DEBUG",
    )


@dataclass
class Run:
    argv: Sequence[str]
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> bytes:
        return (self.stdout + self.stderr).encode()


async def openrtc(env: dict[str, str], *args: str, stdin: str = "") -> Run:
    """``openrtc <args>`` as a process, like an operator's shell runs it."""
    argv = [sys.executable, "-m", "openrtc", *args]
    with anyio.fail_after(60):
        done = await anyio.run_process(argv, env=env, input=stdin.encode(), check=False)
    return Run(args, done.returncode, done.stdout.decode(), done.stderr.decode())


def service(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "openrtc", "--log-level", "DEBUG", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def stop(proc: subprocess.Popen[bytes], within: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(within):
        while proc.poll() is None:
            await anyio.sleep(0.1)
    return proc.returncode


def leaks(blob: bytes, secret_values: Sequence[bytes]) -> list[str]:
    """What in ``blob`` is a secret (named, never the value) or a JWT."""
    found = [f"secret #{i}" for i, s in enumerate(secret_values) if s and s in blob]
    found += [f"a JWT at {m.start()}" for m in JWT.finditer(blob)]
    return found


async def redis_dump(admin: Redis) -> dict[bytes, bytes]:
    """Every key and its whole value, whatever its type, as bytes to search."""
    dump: dict[bytes, bytes] = {}
    async for key in admin.scan_iter(count=500):
        kind = (await admin.type(key)).decode()
        value: Any
        if kind == "string":
            value = await admin.get(key)
        elif kind == "hash":
            value = await admin.hgetall(key)
        elif kind == "set":
            value = await admin.smembers(key)
        elif kind == "zset":
            value = await admin.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await admin.lrange(key, 0, -1)
        elif kind == "stream":
            value = [
                await admin.xrange(key),
                await admin.xinfo_groups(key),
                await admin.xinfo_stream(key, full=True),
            ]
        else:
            raise AssertionError(f"unexpected type {kind} for {key!r}")
        dump[key] = repr(value).encode()
    return dump


async def namespace_dump(admin: Redis, ns: str) -> dict[bytes, bytes]:
    return {k: v for k, v in (await redis_dump(admin)).items() if k.startswith(f"{ns}:".encode())}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def acl_denials(admin: Redis, user: str) -> list[str]:
    """The commands Redis refused the ACL user (``ACL LOG``), as ``reason:object``."""
    raw: Any = await admin.execute_command("ACL", "LOG", "1000")
    denials = []
    for entry in raw:
        fields = {_text(k): _text(v) for k, v in entry.items()}  # redis-py parses it
        if fields.get("username") == user:
            denials.append(f"{fields['reason']}:{fields['object']}")
    return denials


# -- the tests --------------------------------------------------------------------


def test_the_readme_quotes_the_acl_the_tests_use() -> None:
    readme = (ROOT / "README.md").read_text()
    assert acl_rules("openrtc") in readme


def test_the_acl_allows_every_command_the_lua_scripts_send() -> None:
    # Redis checks a script's commands against the caller's ACL; a call path
    # the end-to-end test does not reach (a write-back, a reclaim) would
    # otherwise fail only in production, under the documented user.
    import openrtc

    # Every module: scripts live in openrtc/store/scripts.py, and beside the code
    # that owns them (the reconciler's leader lease).
    package = Path(openrtc.__file__).parent
    source = "\n".join(p.read_text() for p in sorted(package.rglob("*.py")))
    sent = {
        (name + (f"|{sub}" if sub else "")).lower()
        for name, sub in re.findall(r"redis\.p?call\('(\w+)'(?:, '(\w+)')?", source)
    }
    sent = {
        c if c.split("|")[0] in {"xgroup", "xinfo", "pubsub"} else c.split("|")[0] for c in sent
    }
    allowed = {rule[1:] for rule in acl_rules("openrtc").split() if rule.startswith("+")}
    assert sent, "no redis.call found: the pattern no longer matches the scripts"
    assert sent <= allowed, f"scripts send commands the ACL denies: {sorted(sent - allowed)}"


async def test_a_call_over_tls_as_the_acl_user_works_and_leaks_no_secret(
    livekit_server: LiveKitServer, secured: SecuredRedis, tmp_path: Path
) -> None:
    ns = secured.namespace
    keys = Keys(ns)
    # Entries and checkpoints signed too: the key must show nowhere either.
    signing_key = secrets.token_hex(32)
    env = {**env_for(livekit_server, secured.url(), ns), KEY_ENV: signing_key}
    secret_values = [livekit_server.api_secret.encode(), *secured.secrets, signing_key.encode()]
    outputs: list[Run] = []
    admin = Redis.from_url(secured.admin_url)
    await admin.execute_command("ACL", "LOG", "RESET")
    logs = {name: tmp_path / f"{name}.log" for name in ("dispatcher", "worker")}
    dispatcher = service(env, logs["dispatcher"], "dispatcher", "--agents-dir", str(OFFLINE_AGENTS))
    worker = service(
        env, logs["worker"], "worker", "--agent", "dental", "--agents-dir", str(OFFLINE_AGENTS)
    )
    try:

        async def both_live() -> bool:
            return bool(
                await admin.zrange(keys.workers("dental"), 0, -1)
                and await admin.zrange(keys.dispatchers, 0, -1)
            )

        await eventually(both_live, "the dispatcher and the worker to register", within=60)

        # A call end to end: routed, enqueued, served, heard.
        room = unique("dental-call")
        call = await openrtc(
            env, "call", "--room", room, "--metadata", '{"agent": "dental"}', "--json"
        )
        outputs.append(call)
        assert call.code == 0, call
        result = json.loads(call.stdout)
        assert result["ok"], result
        assert result["agent"] == "dental", result
        # openrtc top reads every live worker's snapshot with the ACL's commands.
        top = await openrtc(env, "top", "--once", "--json")
        outputs.append(top)
        assert top.code == 0, top
        assert [w["agent"] for w in json.loads(top.stdout)["workers"]] == ["dental"], top

        # A call for an agent nobody serves: a dead letter for the dlq commands.
        lost = await openrtc(
            env, "call", "--room", unique("lost"), "--metadata", '{"agent": "nobody"}',
            "--wait", "3", "--listen", "0", "--json",
        )  # fmt: skip
        outputs.append(lost)

        async def one_dead_letter() -> bool:
            return bool(await admin.xlen(keys.dead_letter) == 1)

        await eventually(one_dead_letter, "the unknown agent's dead letter", within=20)
        # The worker leaves before the replay, so the replayed job waits in its stream.
        assert await stop(worker) == 0

        # The read commands, at once (each is a process start-up).
        reads: dict[tuple[str, ...], Run] = {}

        async def read(*args: str) -> None:
            reads[args] = await openrtc(env, *args)

        async with anyio.create_task_group() as tg:
            for args in (("status", "--json"), ("status",), ("dlq", "list", "--json")):
                tg.start_soon(read, *args)
            tg.start_soon(read, "dlq", "list")
        outputs.extend(reads.values())
        status, table = reads["status", "--json"], reads["status",]
        assert status.code == 0, status
        assert "dental" in [a["agent"] for a in json.loads(status.stdout)["agents"]]
        assert table.code == 0, table
        assert "dead letters: 1" in table.stdout, table
        listed = reads["dlq", "list", "--json"]
        assert listed.code == 0, listed
        assert reads["dlq", "list"].code == 0, reads["dlq", "list"]
        (letter,) = json.loads(listed.stdout)["dead_letters"]
        assert letter["reason"] == "unknown-agent"
        outputs.append(shown := await openrtc(env, "dlq", "show", letter["id"]))
        assert shown.code == 0, shown
        assert "nobody" in shown.stdout, shown
        replayed = await openrtc(env, "dlq", "replay", letter["id"], "--agent", "dental")
        outputs.append(replayed)
        assert replayed.code == 0, replayed
        assert await admin.xlen(keys.jobs("dental")) == 1
        assert await admin.xlen(keys.dead_letter) == 0
        # Re-signed by the replay, with the operator's key (from the environment).
        ((_, replayed_fields),) = await admin.xrange(keys.jobs("dental"))
        verify_job(SigningKeys(signing_key.encode()), replayed_fields)
        # Something to purge: a dead letter written as a worker would.
        store = StreamStore(admin, keys)
        await store.dead_letter(DeadReason.MALFORMED, "test", original={b"x": b"y"})
        purged = await openrtc(env, "dlq", "purge", "--all", "--yes")
        outputs.append(purged)
        assert purged.code == 0, purged
        assert await admin.xlen(keys.dead_letter) == 0
        routed = await openrtc(
            env, "route", "--agents-dir", str(OFFLINE_AGENTS), "--room", "dental-x", "--json"
        )
        outputs.append(routed)
        assert routed.code == 0, routed
        assert json.loads(routed.stdout)["agent"] == "dental", routed
        assert all(run.code == 0 for run in outputs if run is not lost), outputs
        assert await stop(dispatcher) == 0
    finally:
        for proc in (dispatcher, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    try:
        text = {name: path.read_bytes() for name, path in logs.items()}
        # The logs are real DEBUG logs of a real call, and they name Redis redacted.
        assert b"Resolved agent 'dental'" in text["dispatcher"]
        assert f"{secured.user}:***@".encode() in text["worker"]
        assert all(b"signing with key" in blob for blob in text.values())
        for name, blob in text.items():
            assert leaks(blob, secret_values) == [], f"{name}'s log"
            # Only the commands the ACL grants are sent on connect (redis-py
            # logs this one at DEBUG when Redis refuses it).
            assert b"maintenance notifications" not in blob, name
        for run in outputs:
            assert leaks(run.output, secret_values) == [], run.argv
        dump = await redis_dump(admin)
        assert any(ns.encode() in key for key in dump)
        for key, value in dump.items():
            assert leaks(key + value, secret_values) == [], key
        # The ACL was enough: Redis refused nothing but what the durability
        # check asks for and does without (CONFIG GET, INFO).
        denied = set(await acl_denials(admin, secured.user))
        assert denied <= {"command:config|get", "command:info"}, denied
        assert "command:config|get" in denied  # asked, refused, and served calls anyway
    finally:
        await admin.aclose()


async def test_a_password_alone_works_too(
    livekit_server: LiveKitServer, secured: SecuredRedis
) -> None:
    ns = unique("pw")
    env = env_for(livekit_server, secured.admin_url, ns)
    admin = Redis.from_url(secured.admin_url)
    try:
        await StreamStore(admin, Keys(ns)).dead_letter(
            DeadReason.MALFORMED, "x", original={b"a": b"b"}
        )
    finally:
        await admin.aclose()
    status, listed = await openrtc(env, "status", "--json"), await openrtc(env, "dlq", "list")
    assert status.code == 0, status
    assert json.loads(status.stdout)["dead_letters"] == 1, status
    assert listed.code == 0, listed
    assert "malformed" in listed.stdout, listed
    for run in (status, listed):
        assert leaks(run.output, secured.secrets) == []


def one_error_line(run: Run, *expected: str) -> str:
    """The command failed with exit 1 and one ``error:`` line naming ``expected``."""
    assert run.code == 1, run
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


async def test_a_wrong_password_or_ca_is_one_clear_line_and_loses_nothing(
    livekit_server: LiveKitServer, secured: SecuredRedis, tmp_path: Path
) -> None:
    ns = unique("bad")
    keys = Keys(ns)
    admin = Redis.from_url(secured.admin_url)
    try:
        letter = await StreamStore(admin, keys).dead_letter(
            DeadReason.MALFORMED, "x", original={b"a": b"b"}
        )
        assert letter is not None
        await StreamStore(admin, keys).enqueue([message("dental", "job-kept")])
        before = await namespace_dump(admin, ns)
        wrong_password = secrets.token_urlsafe(12)
        cases = {
            "wrong password": (secured.url(password=wrong_password), "authentication failed"),
            "wrong CA": (secured.url(ca=secured.wrong_ca), "certificate verification failed"),
            "missing CA": (secured.url(ca=tmp_path / "nope.crt"), "ssl_ca_certs"),
        }
        secret_values = [*secured.secrets, wrong_password.encode()]
        for what, (url, expected) in cases.items():
            env = env_for(livekit_server, url, ns)
            runs: list[Run] = []

            async def record(*args: str, env: dict[str, str] = env, runs: list[Run] = runs) -> None:
                runs.append(await openrtc(env, *args))

            async with anyio.create_task_group() as tg:
                tg.start_soon(record, "status")
                tg.start_soon(record, "dlq", "replay", letter, "--agent", "dental")
                tg.start_soon(record, "dispatcher", "--agents-dir", str(OFFLINE_AGENTS))
                tg.start_soon(
                    record, "worker", "--agent", "dental", "--agents-dir", str(OFFLINE_AGENTS)
                )
            for run in runs:
                line = one_error_line(run, expected)
                assert "Redis at rediss://openrtc-app:***@127.0.0.1" in line, (what, line)
                assert leaks(run.output, secret_values) == [], (what, run.argv)
        # Nothing was taken, moved or added by the failed attempts.
        assert await namespace_dump(admin, ns) == before
    finally:
        await admin.aclose()

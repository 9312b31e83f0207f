"""Settings validation and redaction: pure, table tests, no server."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

import pytest

from openrtc.errors import ConfigError
from openrtc.settings import (
    DEFAULT_DEDUP_TTL,
    DEFAULT_REDIS_URL,
    MAX_CHECKPOINT_BYTES,
    NUMBERS,
    Bound,
    DispatcherSettings,
    LiveKitSettings,
    SettingError,
    WorkerSettings,
    check_numbers,
    redact_url,
)
from openrtc.wire.keys import DEFAULT_NAMESPACE, Keys

pytestmark = pytest.mark.unit

LK = LiveKitSettings("ws://127.0.0.1:7880", "key", "secret")


@pytest.mark.parametrize(
    ("url", "key", "secret", "error"),
    [
        ("", "key", "secret", "missing LIVEKIT_URL"),
        ("ws://h", "", "", "missing LIVEKIT_API_KEY, LIVEKIT_API_SECRET"),
        ("h:7880", "key", "secret", "LIVEKIT_URL must start with"),
    ],
)
def test_livekit_settings_refuse(url: str, key: str, secret: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        LiveKitSettings(url, key, secret)


@pytest.mark.parametrize(
    ("url", "ws", "http"),
    [
        ("ws://h:1", "ws://h:1", "http://h:1"),
        ("wss://h", "wss://h", "https://h"),
        ("http://h:1", "ws://h:1", "http://h:1"),
        ("https://h", "wss://h", "https://h"),
    ],
)
def test_livekit_url_schemes(url: str, ws: str, http: str) -> None:
    settings = LiveKitSettings(url, "key", "secret")
    assert (settings.ws_url, settings.http_url) == (ws, http)


def test_secrets_stay_out_of_repr() -> None:
    livekit = LiveKitSettings("ws://h", "key", "s3cr3t")
    assert "s3cr3t" not in repr(livekit)
    assert "s3cr3t" not in repr(WorkerSettings(livekit=livekit, agent="dental"))


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"wait_replicas": -1}, "--wait-replicas"),
        ({"wait_timeout": 0}, "wait_timeout"),
        ({"wait_timeout": 2.0}, "wait_timeout"),  # not under enqueue_timeout
        ({"when_no_worker": "drop"}, "when_no_worker"),
        ({"max_backlog": -1}, "--max-backlog"),
        ({"enqueue_timeout": 11, "wait_timeout": 0.5}, "enqueue_timeout"),
    ],
)
def test_dispatcher_settings_refuse(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        DispatcherSettings(livekit=LK, **overrides)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"isolation": "thread"}, "isolation"),
        ({"lease": 0.3}, "lease"),
        ({"max_deliveries": 0}, "--max-deliveries"),
        ({"idle_processes": -1}, "--idle-processes"),
    ],
)
def test_worker_settings_refuse(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        WorkerSettings(livekit=LK, agent="dental", **overrides)


def test_defaults_are_one_fact_each() -> None:
    dispatcher = DispatcherSettings(livekit=LK)
    worker = WorkerSettings(livekit=LK, agent="dental")
    for settings in (dispatcher, worker):
        assert settings.redis_url == DEFAULT_REDIS_URL
        assert settings.namespace == DEFAULT_NAMESPACE == Keys().namespace
        assert settings.dedup_ttl == DEFAULT_DEDUP_TTL


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h/1", "redis://user:***@h/1"),
        ("rediss://u:p%40ss@h:6380", "rediss://u:***@h:6380"),
        ("redis://user@h", "redis://user@h"),  # no password: nothing to hide
        # redis-py also reads a password from the query string.
        ("redis://h:6379/0?password=pw&db=2", "redis://h:6379/0?password=***&db=2"),
        ("rediss://u:pw@h/0?ssl_password=kp", "rediss://u:***@h/0?ssl_password=***"),
        ("rediss://h/0?ssl_ca_certs=/etc/ca.pem", "rediss://h/0?ssl_ca_certs=/etc/ca.pem"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


SERVICES: dict[type, dict[str, Any]] = {
    DispatcherSettings: {"livekit": LK},
    WorkerSettings: {"livekit": LK, "agent": "dental"},
}


def numeric_fields(settings: type) -> list[str]:
    """The fields of ``settings`` that hold a number (``int``, ``float``, or one or ``None``).

    Read from the class itself, so a setting added tomorrow is in the tables below.
    """
    hints = typing.get_type_hints(settings)
    found = []
    for f in dataclasses.fields(settings):
        kinds = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
        if kinds and kinds <= {int, float}:
            found.append(f.name)
    return found


SERVICE_NUMBERS = [(cls, name) for cls in SERVICES for name in numeric_fields(cls)]


def outside(bound: Bound, integer: bool) -> list[float]:
    """Values just outside ``bound`` (and the ones that never make sense)."""
    step = 1 if integer else 0.5
    below = [bound.low] if bound.above else [bound.low - step]
    below += [bound.low - 2 * step, -1]
    values = [*below, bound.high + step, bound.high * 2]
    if not integer:
        values += [math.nan, math.inf, -math.inf]
    return [int(v) if integer else v for v in values if not bound.admits(v)]


#: Settings that are also bounded by another one (checked apart).
RELATED = {"wait_timeout", "enqueue_timeout", "membership_ttl", "heartbeat_interval"}
RELATED |= {"reconnect_initial", "reconnect_max"}
# Below the limit; process isolation only.
RELATED |= {"memory_warn_mb", "memory_limit_mb", "session_memory_limit_mb"}


def test_the_service_settings_are_found() -> None:
    # The derivation above sees the settings the issue names.
    names = {name for _, name in SERVICE_NUMBERS}
    assert {"max_queue_age", "drain_timeout", "checkpoint_max_bytes", "load_threshold"} <= names
    assert len(SERVICE_NUMBERS) >= 30


@pytest.mark.parametrize(("settings", "name"), SERVICE_NUMBERS)
def test_every_numeric_setting_has_bounds_and_its_default_is_within(
    settings: type, name: str
) -> None:
    assert name in NUMBERS, f"{settings.__name__}.{name}: add its bounds to settings.NUMBERS"
    default = next(f.default for f in dataclasses.fields(settings) if f.name == name)
    assert default is None or NUMBERS[name].admits(default)


@pytest.mark.parametrize(("settings", "name"), SERVICE_NUMBERS)
def test_every_numeric_setting_refuses_what_is_outside_its_bounds_in_one_line(
    settings: type, name: str
) -> None:
    bound = NUMBERS[name]
    integer = typing.get_type_hints(settings)[name] is int
    for value in outside(bound, integer):
        with pytest.raises(SettingError) as refused:
            settings(**SERVICES[settings], **{name: value})
        message = str(refused.value)
        assert "\n" not in message
        # Named as the operator sets it: the flag and the variable, if it has them.
        assert message.startswith(bound.label(name) + " must be "), message
        for known_as in (bound.flag, bound.env):
            assert known_as in message
        assert message.endswith(f", not {value}")
    if name not in RELATED:
        edges = [bound.high] + ([] if bound.above else [bound.low])
        edges += [] if bound.off is None else [bound.off]
        for value in edges:
            settings(**SERVICES[settings], **{name: int(value) if integer else value})


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        # The settings that lost calls without a word.
        ({"max_queue_age": 0}, "--max-queue-age (OPENRTC_MAX_QUEUE_AGE) must be at least 1 "),
        ({"max_queue_age": -5.0}, "--max-queue-age (OPENRTC_MAX_QUEUE_AGE)"),
        ({"drain_timeout": 0}, "--drain-timeout (OPENRTC_DRAIN_TIMEOUT) must be more than 0 "),
        ({"drain_timeout": -1}, "--drain-timeout"),
        ({"checkpoint_max_bytes": MAX_CHECKPOINT_BYTES + 1}, "--checkpoint-max-bytes"),
        ({"checkpoint_max_bytes": 100}, "0 (off) or at least 4096 and at most 16777216 bytes"),
        ({"heartbeat_interval": 5.0, "membership_ttl": 5.0}, "membership_ttl must be more"),
    ],
)
def test_settings_that_would_lose_calls_are_refused(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(SettingError, match=re.escape(error)):
        WorkerSettings(livekit=LK, agent="dental", **overrides)


def test_the_checkpoint_cap_is_far_below_what_redis_can_hold() -> None:
    assert NUMBERS["checkpoint_max_bytes"].high == MAX_CHECKPOINT_BYTES <= 512 * 1024**2 // 32
    assert WorkerSettings(livekit=LK, agent="d", checkpoint_max_bytes=0).checkpoint_max_bytes == 0


def test_a_number_without_bounds_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        check_numbers({"new_setting_without_bounds": 1})
    check_numbers({"anything": "text", "flag": True, "unset": None})  # not numbers: not checked

"""Settings validation and redaction: pure, table tests, no server."""

from __future__ import annotations

from typing import Any

import pytest

from openrtc.errors import ConfigError
from openrtc.keys import DEFAULT_NAMESPACE, Keys
from openrtc.settings import (
    DEFAULT_DEDUP_TTL,
    DEFAULT_REDIS_URL,
    DispatcherSettings,
    LiveKitSettings,
    WorkerSettings,
    redact_url,
)

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
        ({"wait_replicas": -1}, "wait_replicas"),
        ({"wait_timeout": 0}, "wait_timeout"),
        ({"wait_timeout": 2.0}, "wait_timeout"),  # not under enqueue_timeout
        ({"when_no_worker": "drop"}, "when_no_worker"),
        ({"max_backlog": -1}, "max_backlog"),
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
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"idle_processes": -1}, "idle_processes"),
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

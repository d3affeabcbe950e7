"""Shared fixtures for worker tests: isolated Redis namespaces and a network-free Hub."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

REDIS_URL = os.environ.get("SLIMGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the real Hub; tests that talk to a local fake turn this off."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # Telemetry pings huggingface.co whenever offline mode is off (as in the fake-Hub tests).
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)


_real_getaddrinfo = socket.getaddrinfo
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything in this process resolves a host other than this machine."""

    def guarded(host: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in _LOCAL_HOSTS:
            raise OSError(f"test tried to reach the network: {name}")
        return _real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@dataclass(frozen=True)
class RedisNamespace:
    url: str
    prefix: str
    queue: str


@pytest.fixture
def redis_ns() -> Iterator[RedisNamespace]:
    """A unique key prefix and queue on the test Redis, deleted afterwards.

    Other engineers run their tests against the same Redis database concurrently, so every
    key this test creates lives under its own prefix.
    """
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:  # pragma: no cover - CI always has Redis
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    tag = uuid.uuid4().hex[:12]
    ns = RedisNamespace(url=REDIS_URL, prefix=f"slimgpt-test-{tag}:", queue=f"gpu-test-{tag}")
    try:
        yield ns
    finally:
        for key in client.scan_iter(match=f"{ns.prefix}*", count=500):
            client.delete(key)
        client.close()

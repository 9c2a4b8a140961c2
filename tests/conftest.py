"""Fixtures: one private redis-server for the session (started here, never a shared
one), and a fresh key prefix per test so tests never see each other's keys."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest
from redis import Redis

from dailyq.redis_server import PrivateRedis
from dailyq.settings import Settings
from tests.helpers import ProcessGroup


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    with PrivateRedis(appendonly=False) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(redis_server: PrivateRedis, prefix: str) -> Settings:
    return Settings(redis_url=redis_server.url, prefix=prefix, node_name="test-node",
                    tasks_module="tests.sample_tasks", lease_ttl_s=2, claim_ttl_s=6)


@pytest.fixture
def connection(settings: Settings) -> Iterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def processes() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    yield group
    group.stop_all()


@pytest.fixture
def table(settings: Settings):
    from dailyq.table import load_table

    return load_table(settings.tasks_module)


@pytest.fixture
def node_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for this test's nodes (also set here, for in-process workers)."""
    from tests.helpers import base_env

    env = base_env(settings.redis_url, settings.prefix)
    for name in ("REDIS_URL", "DAILYQ_PREFIX", "DAILYQ_TASKS"):
        monkeypatch.setenv(name, env[name])
    return env

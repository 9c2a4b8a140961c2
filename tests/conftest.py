"""Fixtures: one private redis-server for the session (started here, never a shared
one), and a fresh key prefix per test so tests never see each other's keys.

The suite runs in parallel (pytest-xdist, ``-n`` in pyproject.toml's addopts): each
xdist worker is a session of its own, so each has its own redis-server on its own free
port. Also two hooks for the whole suite: tests marked ``slow`` start first, and under
CI a skip is a failure."""

from __future__ import annotations

import os
import uuid
from typing import Generator, Iterator

import pytest
from redis import Redis

from dailyq.keys import Keys
from dailyq.redis_server import PrivateRedis
from dailyq.scripts import Scripts, scripts_for
from dailyq.settings import Settings
from tests.support.helpers import ProcessGroup


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (tens of seconds of waiting on real processes) first, the rest
    in file order. xdist hands out tests one at a time (``--maxschedchunk 1``), so the slow
    ones start at once, spread over every worker, instead of one of them ending the run
    minutes after the others."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI (``CI`` set, as .ci/run runs) a skipped test fails: a check that CI never
    runs is one nobody runs. What a skip needs (Chromium, faketime, a TLS redis-server)
    .ci/run installs."""
    report = yield
    _fail_a_skip_under_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport,
                                                                           pytest.CollectReport]:
    """The same for a whole module skipped while it is collected (``pytest.importorskip``)."""
    report = yield
    _fail_a_skip_under_ci(report)
    return report


def _fail_a_skip_under_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which must run every test: {reason}"


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
                    tasks_module="tests.tables.sample_tasks", lease_ttl_s=2, claim_ttl_s=6)


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def scripts(connection: Redis) -> Scripts:
    return scripts_for(connection)


@pytest.fixture
def connection(settings: Settings) -> Iterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def rq_workers_exit_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain RQ workers a test runs in-process subscribe as dailyq's do (rq_seam.PUBSUB_WAIT_S):
    with RQ's own 60 s wait, a burst often took a minute to exit
    (tests/test_rq_seam.py::test_a_worker_exits_at_once_when_its_pubsub_thread_saw_...)."""
    from rq.worker import BaseWorker

    from dailyq.rq_seam import GuardedWorker

    monkeypatch.setattr(BaseWorker, "subscribe", GuardedWorker.subscribe)


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
    from tests.support.helpers import base_env

    env = base_env(settings.redis_url, settings.prefix)
    for name in ("REDIS_URL", "DAILYQ_PREFIX", "DAILYQ_TASKS"):
        monkeypatch.setenv(name, env[name])
    return env

"""Redis outages against a redis-server of the test's own (AOF on), and start-up
warnings about servers that may lose our keys."""

import json
import subprocess
import sys
import time

import pytest
from redis import Redis

from dailyq.redis_server import PrivateRedis
from dailyq.server_checks import server_warnings
from tests.support.helpers import (
    ROOT,
    base_env,
    executions,
    max_concurrent_copies,
    quiet_sample_at,
    run_cli,
    starts_per_param,
    wait_for,
)
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def own_redis():
    with PrivateRedis(appendonly=True) as server:
        yield server


@pytest.mark.slow
def test_redis_killed_mid_batch_and_restarted_loses_nothing(own_redis, processes):
    prefix = "outage"
    # Default claim and lease TTLs: the guarantee is stated for the defaults.
    env = base_env(own_redis.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="12", SAMPLE_SLEEP_S="1.5",
                   SAMPLE_AT=quiet_sample_at(), DAILYQ_CLAIM_TTL_S="30", DAILYQ_LEASE_TTL_S="5")
    started = []
    for node in ("n1", "n2", "n3"):
        started.append(processes.start("scheduler.py", dict(env, NODE_NAME=node)))
        started.append(processes.start("worker_entry.py", dict(env, NODE_NAME=node)))
    connection = Redis.from_url(own_redis.url)
    wait_for(lambda: connection.exists(f"{prefix}:leader"), timeout=15, what="a leader")
    assert run_cli(["trigger", "--date", "2026-11-26"], env).returncode == 0
    wait_for(lambda: len(executions(connection, prefix)) >= 3, timeout=15, what="the batch to start")

    own_redis.kill()
    time.sleep(12)
    own_redis.start()

    def done() -> bool:
        result = run_cli(["status", "--date", "2026-11-26", "--json"], env)
        return result.returncode == 0 and {r["state"] for r in json.loads(result.stdout)["runs"]} == {"finished"}

    wait_for(done, timeout=90, what="the batch to complete after the outage", every=1)
    events = executions(connection, prefix)
    assert sorted(starts_per_param(events).values()) == [1] * 12
    assert max_concurrent_copies(events) == 1
    assert all(p.poll() is None for p in started), "a scheduler or worker died in the outage"
    for process in started:
        log = processes.log_of(process)
        outage_lines = [line for line in log.splitlines() if "Redis unavailable" in line
                        or "could not connect to Redis" in line]
        assert outage_lines, log  # every process noticed ...
    for scheduler in started[::2]:  # ... and a scheduler logs it once per change of state
        log = processes.log_of(scheduler)
        assert log.count("Redis unavailable") == 1 and log.count("Redis reachable again") == 1, log


def test_start_up_warns_when_redis_may_evict_or_forget_our_keys():
    with PrivateRedis(appendonly=False, extra_args=["--maxmemory-policy", "allkeys-lru"]) as server:
        warnings = server_warnings(Redis.from_url(server.url))
    assert any("maxmemory-policy is allkeys-lru" in w for w in warnings)
    assert any("persists nothing" in w for w in warnings)


def test_a_safe_server_gets_no_warning(own_redis):
    assert server_warnings(Redis.from_url(own_redis.url)) == []


@pytest.mark.slow
def test_a_retry_whose_backoff_ends_during_an_outage_is_back_in_the_queue_promptly(own_redis, processes):
    prefix = "retry-outage"
    backoff_s = 6
    env = base_env(own_redis.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_FUNC="fail_first",
                   SAMPLE_RETRIES="1", SAMPLE_BACKOFF_S=str(backoff_s), SAMPLE_AT=quiet_sample_at(),
                   NODE_NAME="node-a")
    processes.start("scheduler.py", env)
    processes.start("worker_entry.py", env)
    connection = Redis.from_url(own_redis.url)
    assert run_cli(["trigger", "--date", "2026-11-26"], env).returncode == 0
    scheduled = f"rq:scheduled:{prefix}"  # RQ's ScheduledJobRegistry of our queue

    wait_for(lambda: connection.zcard(scheduled) == 1, timeout=20, what="the first attempt to fail")
    (job_id,) = connection.zrange(scheduled, 0, -1)
    own_redis.kill()
    time.sleep(backoff_s + 4)  # the backoff ends while Redis is away
    own_redis.start()
    back_at = time.monotonic()
    connection = Redis.from_url(own_redis.url)
    wait_for(lambda: connection.zscore(scheduled, job_id) is None, timeout=30, what="the retry to be moved back")
    moved_after_s = time.monotonic() - back_at
    assert moved_after_s < 5, f"the retry waited {moved_after_s:.1f}s after Redis came back"

    def finished() -> bool:
        result = run_cli(["status", "--date", "2026-11-26", "--json"], env)
        return result.returncode == 0 and json.loads(result.stdout)["runs"][0]["state"] == "finished"

    wait_for(finished, timeout=30, what="the retry to run", every=0.5)
    assert [e["context"]["attempt"] for e in executions(connection, prefix) if e["event"] == "start"] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("worker_args", [(), ("--simple",)], ids=["forking", "non-forking"])
def test_redis_failing_between_a_jobs_dequeue_and_its_start_puts_the_job_back(own_redis, worker_args):
    # The fault at one chosen moment: RQ has moved the job to its intermediate queue (the
    # dequeue) and the worker writes RQ's execution record, before any fork. That request
    # is dropped and Redis refuses connections for longer than redis-py's retries, so the
    # error reaches the worker. A burst worker used to go on, find the queue empty and
    # exit 0 with the run queued behind RQ's intermediate queue.
    prefix = "stranded"
    env = base_env(own_redis.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_AT=quiet_sample_at(),
                   NODE_NAME="n1")
    assert run_cli(["trigger", "--date", "2026-11-20"], env).returncode == 0
    (run,) = json.loads(run_cli(["status", "--date", "2026-11-20", "--json"], env).stdout)["runs"]
    assert run["state"] == "queued" and run["job_id"]
    with TcpProxy("127.0.0.1", own_redis.port) as proxy:
        proxy.refuse_on(f"rq:execution:{run['job_id']}".encode(), for_s=12.0)
        worker = subprocess.run([sys.executable, "worker_entry.py", "--burst", *worker_args], cwd=ROOT,
                                env=dict(env, REDIS_URL=proxy.url()), capture_output=True, text=True, timeout=120)
    assert proxy.refused_at is not None, "the fault never happened: " + worker.stderr[-3000:]
    assert worker.returncode == 0, worker.stderr[-3000:]
    (after,) = json.loads(run_cli(["status", "--date", "2026-11-20", "--json"], env).stdout)["runs"]
    assert after["state"] == "finished" and after["attempts"] == 1, (after, worker.stderr[-3000:])
    assert f"Redis failed before its job {run['job_id']} started on this worker; put back" in worker.stderr
    connection = Redis.from_url(own_redis.url)
    assert connection.llen(f"rq:queue:{prefix}:intermediate") == 0

"""Redis Sentinel: ``REDIS_URL=redis+sentinel://host:port/service/db`` against a master,
a replica (both AOF) and a Sentinel started here; a ``SENTINEL FAILOVER`` in the
middle of a batch run by a scheduler and two workers (separate OS processes) loses
nothing and runs nothing twice; so does a master SIGKILLed mid-batch, with two replicas
and DAILYQ_WAIT_REPLICAS=1."""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

import pytest
from redis import Redis
from redis.exceptions import RedisError

from dailyq.connection import connect
from dailyq.redis_server import PrivateRedis, free_port
from dailyq.settings import Settings
from tests.support.helpers import (
    ProcessGroup,
    base_env,
    executions,
    max_concurrent_copies,
    quiet_sample_at,
    run_cli,
    starts_per_param,
    wait_for,
)
from tests.support.redis_servers import (
    DAY,
    SERVICE,
    SentinelSet,
    Servers,
    batch_env,
    burst_worker,
    one_line_error,
    run_whole_batch,
    start_sentinel_set,
)


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    with Servers() as servers:
        yield start_sentinel_set(servers)


@pytest.mark.parametrize("url, complaint", [
    ("redis+sentinel://127.0.0.1:26379", "no service name"),
    ("redis+sentinel://127.0.0.1:port/mymaster", "port 'port' is not a number"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/zero", "only a db number"),
])
def test_a_malformed_sentinel_url_is_one_line_exit_2(url: str, complaint: str) -> None:
    result = run_cli(["status", "--date", DAY], batch_env(url))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "bad REDIS_URL" in lines[0] and complaint in lines[0] and "redis+sentinel://" in lines[0], lines[0]


def test_no_sentinel_answering_is_one_line_exit_3() -> None:
    line = one_line_error(run_cli(["status", "--date", DAY], batch_env(f"redis+sentinel://127.0.0.1:{free_port()}/x")))
    assert "cannot reach Redis" in line and "No master found for 'x'" in line, line


def test_trigger_worker_and_status_through_sentinel(sentinel_set: SentinelSet) -> None:
    env = batch_env(sentinel_set.url)
    with Redis(port=sentinel_set.master.port) as client:
        run_whole_batch(env, client)
    # The service name is checked against what the Sentinel monitors.
    line = one_line_error(burst_worker(batch_env(sentinel_set.url.replace(SERVICE, "nosuchservice"))))
    assert "No master found for 'nosuchservice'" in line, line


def test_a_failover_mid_batch_loses_nothing_and_runs_nothing_twice(sentinel_set: SentinelSet,
                                                                    processes: ProcessGroup) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    # Default claim TTL: the guarantee is stated for the defaults.
    env = base_env(sentinel_set.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="12", SAMPLE_SLEEP_S="1.0",
                   SAMPLE_AT=quiet_sample_at(), DAILYQ_CLAIM_TTL_S="30")
    started = [processes.start("scheduler.py", dict(env, NODE_NAME="n1"))]
    started += [processes.start("worker_entry.py", dict(env, NODE_NAME=node)) for node in ("n1", "n2")]

    def events() -> list[dict]:
        # A fresh client each time: one left connected to the old master would read its
        # stale data until Sentinel demotes it (reads are not refused, only writes).
        with connect(Settings(redis_url=sentinel_set.url)) as client:
            return executions(client, prefix)

    with connect(Settings(redis_url=sentinel_set.url)) as client:
        wait_for(lambda: client.exists(f"{prefix}:leader"), timeout=15, what="a leader")
    triggered = run_cli(["trigger", "--date", DAY], env)
    assert triggered.returncode == 0, triggered.stderr
    wait_for(lambda: sum(e["event"] == "start" for e in events()) >= 3, timeout=15, what="the batch to start")

    with sentinel_set.sentinel_client() as sentinel:
        assert sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
    failover_at = time.time()
    wait_for(lambda: sentinel_set.master_port() == sentinel_set.replica.port, timeout=15,
             what="Sentinel to promote the replica")

    last_status: dict = {}

    def done() -> bool:
        result = run_cli(["status", "--date", DAY, "--json"], env)
        if result.returncode != 0:
            return False
        last_status.update(json.loads(result.stdout))
        return {r["state"] for r in last_status["runs"]} == {"finished"}

    wait_for(done, timeout=60, what="the batch to complete after the failover", every=0.5)
    # The scheduler holds the leader lease on the new master.
    wait_for(lambda: done() and (last_status["leader"] or {}).get("node") == "n1", timeout=15,
             what="the scheduler to lead again after the failover")
    recorded = events()
    assert sorted(starts_per_param(recorded).values()) == [1] * 12, recorded
    assert max_concurrent_copies(recorded) == 1
    assert any(e["event"] == "start" and e["t"] > failover_at for e in recorded), "the failover was not mid-batch"
    for process in started:
        assert process.poll() is None, f"a process died in the failover:\n{processes.log_of(process)}"
    # The scheduler's next write to the old master was refused, and it moved on to the new one.
    # Its "Redis reachable again" line ends its first pass on the new master, after that
    # pass's lease write (which the wait may have seen): wait for it rather than race it.
    wait_for(lambda: "Redis reachable again" in processes.log_of(started[0]), timeout=10,
             what="the scheduler's reconnection log line")
    scheduler_log = processes.log_of(started[0])
    assert "NOREPLICAS" in scheduler_log and "Redis reachable again" in scheduler_log, scheduler_log
    # The old master is demoted to a replica of the new one (so it cannot take writes).
    with Redis(port=sentinel_set.master.port, decode_responses=True) as old_master:
        wait_for(lambda: old_master.info("replication")["role"] == "slave", timeout=30,
                 what="Sentinel to demote the old master")


def test_a_sigkilled_master_fails_over_with_every_run_once_and_none_concurrent(redis_server: PrivateRedis,
                                                                              processes: ProcessGroup) -> None:
    """A real failover: the master SIGKILLed mid-batch, Sentinel notices (1 s) and promotes
    the replica with the most data; the other replica follows the new master. With
    DAILYQ_WAIT_REPLICAS=1 every claim and finish is on a replica before it counts, so the
    promoted one has them all: each run executes once, never two copies at a time. (Without
    it a SIGKILL may lose the last writes replication had not carried yet, and a run whose
    finish was among them executes again: tests/test_failover.py.) The runs log their
    executions to a Redis of their own, which does not fail over."""
    with Servers() as servers:
        found = start_sentinel_set(servers, replicas=2)
        prefix = f"t{uuid.uuid4().hex[:10]}"
        env = base_env(found.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="12", SAMPLE_SLEEP_S="1.0",
                       SAMPLE_FUNC="progress", SAMPLE_AT=quiet_sample_at(), SAMPLE_LOG_URL=redis_server.url,
                       DAILYQ_CLAIM_TTL_S="30", DAILYQ_WAIT_REPLICAS="1")
        try:
            started = [processes.start("scheduler.py", dict(env, NODE_NAME="n1"))]
            started += [processes.start("worker_entry.py", dict(env, NODE_NAME=node)) for node in ("n1", "n2")]
            with Redis(port=found.master.port) as master:
                wait_for(lambda: master.exists(f"{prefix}:leader"), timeout=15, what="a leader")
            triggered = run_cli(["trigger", "--date", DAY], env)
            assert triggered.returncode == 0, triggered.stderr
            with Redis.from_url(redis_server.url) as log_client:
                wait_for(lambda: sum(e["event"] == "start" for e in executions(log_client, prefix)) >= 3,
                         timeout=15, what="the batch to start")
                found.master.process.kill()  # SIGKILL: no goodbye to the replicas
                killed_at = time.time()
                replica_ports = {server.port for server in found.replicas}
                wait_for(lambda: _master_port_or_none(found) in replica_ports, timeout=30,
                         what="Sentinel to promote a replica")

                last: dict = {}

                def done() -> bool:
                    result = run_cli(["status", "--date", DAY, "--json"], env)
                    if result.returncode != 0:
                        return False
                    last.update(json.loads(result.stdout))
                    return {r["state"] for r in last["runs"]} == {"finished"}

                wait_for(done, timeout=90, what="the batch to complete after the failover", every=0.5)
                print(f"the batch finished {time.time() - killed_at:.1f}s after the master's SIGKILL")
                recorded = executions(log_client, prefix)
            assert sorted(starts_per_param(recorded).values()) == [1] * 12, recorded
            assert max_concurrent_copies(recorded) == 1
            assert any(e["event"] == "start" and e["t"] > killed_at for e in recorded), "the kill was not mid-batch"
            for process in started:
                assert process.poll() is None, f"a process died in the failover:\n{processes.log_of(process)}"
        finally:
            processes.stop_all()  # before the servers stop


def _master_port_or_none(found: SentinelSet) -> int | None:
    try:
        return found.master_port()
    except RedisError:
        return None

"""Failovers that lose writes (issue 19, item 2), with real processes: three nodes
(scheduler + worker each) reach Redis through one address, a TCP proxy, which a
failover moves from the primary to its replica. The replica stopped replicating 2 s
before the primary was SIGKILLed (tests.support.redis_servers.LaggingReplica), so the new
primary lacks the last 2 s of writes: claims and fencing tokens, finishes, RQ's own
dequeues and results. A dozen runs of 2 s each, which tick into a Redis that does not
fail over, so overlaps are measured. The first runs end during those 2 s (their
finishes are lost), and one node's worker, held still (SIGSTOP) until the replica stops
replicating, claims its first run during them (its claim is lost).

* With ``DAILYQ_WAIT_REPLICAS=1``: every run finishes, none fails or is stuck, no two
  copies of one run execute at the same moment, and each execution of a run carries a
  greater fence than the one before.
* Without it: fences still never go backwards; what ran twice is printed (run with -s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from typing import Any, Iterator

import pytest
from redis import Redis

from dailyq.keys import Keys
from dailyq.redis_server import PrivateRedis
from dailyq.settings import Settings
from dailyq.worker.guard import Guard
from tests.support.helpers import (
    ROOT,
    ProcessGroup,
    base_env,
    executions,
    max_concurrent_copies,
    overlaps,
    param_key,
    quiet_sample_at,
    run_cli,
    starts_per_param,
    wait_for,
)
from tests.support.redis_servers import DAY, LaggingReplica, Servers, start_lagging_replica
from tests.support.tcp_proxy import TcpProxy
from tests.worker.test_guard import DAY as GUARD_DAY
from tests.worker.test_guard import identity, rid

NODES = ("n1", "n2", "n3")
RUNS = 12


@dataclass
class Outcome:
    events: list[dict[str, Any]]
    runs: list[dict[str, Any]]  # status --json's runs, once every one had ended
    logs: str  # every node's log
    failed_over_at: float
    alive: bool  # every node process still running at the end

    def fences(self) -> dict[str, list[int]]:
        """Per run (param), the fences of its executions in the order they started."""
        starts: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for event in self.events:
            if event["event"] == "start":
                starts[param_key(event["param"])].append((event["t"], event["context"]["fence"]))
        return {param: [fence for _, fence in sorted(seen)] for param, seen in starts.items()}

    def ran_twice(self) -> dict[str, int]:
        return {param: n for param, n in starts_per_param(self.events).items() if n > 1}


def lagging_failover(wait_replicas: int, processes: ProcessGroup, log_server: PrivateRedis) -> Outcome:
    with Servers() as servers:
        redis = start_lagging_replica(servers)
        front = TcpProxy("127.0.0.1", redis.primary.port)  # the one address every node uses
        try:
            prefix = f"t{uuid.uuid4().hex[:10]}"
            # A claim TTL that outlasts the failover (10 s; the copies that executed across
            # it keep their claims), retries as a task's default (2).
            env = base_env(front.url(), prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS=str(RUNS), SAMPLE_FUNC="progress",
                           SAMPLE_SLEEP_S="2", SAMPLE_RETRIES="2", SAMPLE_AT=quiet_sample_at(),
                           SAMPLE_LOG_URL=log_server.url, DAILYQ_CLAIM_TTL_S="10",
                           DAILYQ_WAIT_REPLICAS=str(wait_replicas))
            started = [processes.start(script, dict(env, NODE_NAME=node))
                       for node in NODES for script in ("scheduler.py", "worker_entry.py")]
            late_worker = started[-1]  # n3's
            keys = Keys(prefix)
            with Redis(port=redis.primary.port) as primary:
                wait_for(lambda: primary.exists(keys.leader), timeout=20, what="a leader")
                wait_for(lambda: all(primary.exists(keys.heartbeat("worker", node)) for node in NODES), timeout=20,
                         what="every worker")
            os.kill(late_worker.pid, signal.SIGSTOP)  # its first claim falls within the lag
            triggered = run_cli(["trigger", "--date", DAY], env)
            assert triggered.returncode == 0, triggered.stderr
            with Redis.from_url(log_server.url) as log_client:
                wait_for(lambda: sum(e["event"] == "start" for e in executions(log_client, prefix)) >= 2,
                         timeout=30, what="the first runs to start")
                time.sleep(0.5)  # mid-run: the first runs end during the lag
                redis.stop_replicating()
                os.kill(late_worker.pid, signal.SIGCONT)
                time.sleep(2.0)
                redis.fail_over()
                front.switch(redis.replica.port)
                failed_over_at = time.time()

                last: dict[str, Any] = {}

                def all_ended() -> bool:
                    result = run_cli(["status", "--date", DAY, "--json"], env)
                    if result.returncode != 0:
                        return False
                    last.update(json.loads(result.stdout))
                    return {r["state"] for r in last["runs"]} <= {"finished", "failed"}

                wait_for(all_ended, timeout=120, what="every run to end after the failover", every=0.5)
                time.sleep(1.0)  # a copy stopped at the end still logs its last tick
                events = executions(log_client, prefix)
            alive = all(process.poll() is None for process in started)
            logs = "\n".join(processes.log_of(process) for process in started)
            return Outcome(events, last["runs"], logs, failed_over_at, alive)
        finally:
            processes.stop_all()  # before the servers stop: no node sees Redis vanish at teardown
            front.close()
            redis.close()


def describe(outcome: Outcome) -> str:
    unfinished = [(r["run_id"], r["state"], r.get("attempts"), r.get("error"))
                  for r in outcome.runs if r["state"] != "finished"]
    return (f"ran twice: {outcome.ran_twice()}; overlaps: {overlaps(outcome.events)}; "
            f"fences: {outcome.fences()}; states: {[r['state'] for r in outcome.runs]}; not finished: {unfinished}")


@pytest.mark.slow
def test_with_wait_replicas_a_lagging_failover_runs_each_run_alone_with_growing_fences(
        processes: ProcessGroup, redis_server: PrivateRedis) -> None:
    outcome = lagging_failover(1, processes, redis_server)
    print(describe(outcome))
    assert [r["state"] for r in outcome.runs] == ["finished"] * RUNS, describe(outcome)
    assert set(starts_per_param(outcome.events).values()) >= {1} and len(starts_per_param(outcome.events)) == RUNS
    # Never two copies of one run at the same moment: neither two starts without an end
    # between them, nor two copies seen ticking at once.
    assert max_concurrent_copies(outcome.events) == 1, describe(outcome)
    assert overlaps(outcome.events) == [], describe(outcome)
    for param, fences in outcome.fences().items():
        assert all(a < b for a, b in zip(fences, fences[1:])), (param, fences)
    all_fences = [fence for fences in outcome.fences().values() for fence in fences]
    assert len(all_fences) == len(set(all_fences)), f"a fence was handed out twice: {outcome.fences()}"
    # The failover met a claim and finishes the replica had not acknowledged (else this
    # proves nothing): the claim's copy waited, the finishes were confirmed again.
    assert "the claim was not acknowledged" in outcome.logs, outcome.logs[-3000:]
    assert "finish" in outcome.logs and "recorded finished" in outcome.logs, outcome.logs[-3000:]
    assert outcome.alive, outcome.logs[-3000:]


@pytest.mark.slow
def test_without_wait_replicas_fences_still_never_go_backwards(processes: ProcessGroup,
                                                               redis_server: PrivateRedis) -> None:
    outcome = lagging_failover(0, processes, redis_server)
    print(describe(outcome))
    for param, fences in outcome.fences().items():
        assert all(a < b for a, b in zip(fences, fences[1:])), (param, fences)
    all_fences = [fence for fences in outcome.fences().values() for fence in fences]
    assert len(all_fences) == len(set(all_fences)), f"a fence was handed out twice: {outcome.fences()}"
    # What the lost writes cost without WAIT (docs/failure-semantics.md): runs executed
    # again, some while the first copy still ran; every run still ends finished.
    assert outcome.ran_twice(), f"the failover lost no run's writes: {describe(outcome)}"
    assert [r["state"] for r in outcome.runs] == ["finished"] * RUNS, describe(outcome)
    assert outcome.alive, outcome.logs[-3000:]


# -- the mechanism, in-process: a replica that does not acknowledge ---------------------------


@pytest.fixture
def lagging() -> Iterator[LaggingReplica]:
    with Servers() as servers:
        found = start_lagging_replica(servers)
        try:
            yield found
        finally:
            found.close()


def on_replica(lagging: LaggingReplica) -> Redis:
    return Redis(port=lagging.replica.port)


def test_a_claim_not_acknowledged_does_not_start_its_task_until_it_is(lagging: LaggingReplica) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    primary = Redis(port=lagging.primary.port)
    guard = Guard(primary, keys, "node-x", claim_ttl_s=6, retention_s=600, wait_replicas=1)
    started = threading.Event()
    lagging.stop_replicating()
    thread = threading.Thread(target=lambda: guard.execute(identity("r1"), started.set, lambda: False), daemon=True)
    thread.start()
    wait_for(lambda: primary.exists(keys.claim(rid("r1"))), timeout=10, what="the claim on the primary")
    # Claimed on the primary, with its fence, but not on the replica: the task waits.
    assert not started.wait(2.5)
    assert not on_replica(lagging).exists(keys.claim(rid("r1")))
    lagging.link.heal()  # the replica catches up and acknowledges
    assert started.wait(10)
    thread.join(10)
    assert on_replica(lagging).sismember(keys.day_finished(GUARD_DAY), rid("r1"))


def test_a_finish_not_acknowledged_is_confirmed_again_before_the_run_counts_as_done(
        lagging: LaggingReplica) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    primary = Redis(port=lagging.primary.port)
    guard = Guard(primary, keys, "node-x", claim_ttl_s=6, retention_s=600, wait_replicas=1)
    ended: list[str] = []
    guard.on_ended = lambda run: ended.append(run.run_id)  # what counts the run done (dependencies)
    running, go = threading.Event(), threading.Event()

    def task() -> None:
        running.set()
        go.wait(10)

    thread = threading.Thread(target=lambda: guard.execute(identity("r1"), task, lambda: False), daemon=True)
    thread.start()
    assert running.wait(10)  # the claim was acknowledged: the replica works
    lagging.stop_replicating()
    go.set()
    wait_for(lambda: primary.sismember(keys.day_finished(GUARD_DAY), rid("r1")), timeout=10,
             what="FINISH on the primary")
    time.sleep(2.0)
    # Finished on the primary alone: the guard is still confirming it, and nothing counts it done.
    assert thread.is_alive() and ended == []
    assert not on_replica(lagging).sismember(keys.day_finished(GUARD_DAY), rid("r1"))
    lagging.link.heal()
    thread.join(10)
    assert not thread.is_alive() and ended == [rid("r1")]
    assert on_replica(lagging).sismember(keys.day_finished(GUARD_DAY), rid("r1"))


def test_a_copy_whose_renewals_are_not_acknowledged_stops_before_the_replicas_claim_can_lapse(
        lagging: LaggingReplica) -> None:
    from dailyq.worker.guard import RunStopped

    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    primary = Redis(port=lagging.primary.port)
    # TTL 3 s, margin 1.5 s: a copy stops 1.5 s after its last acknowledged renewal.
    guard = Guard(primary, keys, "node-x", claim_ttl_s=3, retention_s=600, wait_replicas=1)
    outcome: dict[str, object] = {}
    running = threading.Event()

    def task() -> None:
        running.set()
        try:
            for _ in range(400):  # short sleeps: the interruption reaches a thread between calls
                time.sleep(0.05)
        except RunStopped:
            outcome["stopped_after_s"] = time.monotonic() - outcome["cut_at"]  # type: ignore[operator]
            raise

    def execute() -> None:
        outcome["result"] = guard.execute(identity("r1"), task, lambda: False)

    thread = threading.Thread(target=execute)  # not a daemon: the interrupt targets its thread
    thread.start()
    assert running.wait(10)
    time.sleep(1.5)  # a few acknowledged renewals
    outcome["cut_at"] = time.monotonic()
    lagging.stop_replicating()
    thread.join(15)
    # Renewals still succeed on the primary, but unacknowledged they confirm nothing: the
    # copy stopped (TTL - margin after its last acknowledged renewal), recording nothing.
    assert outcome.get("result") == {"skipped": "claim lost"}, outcome
    assert float(outcome["stopped_after_s"]) < 3.0, outcome  # type: ignore[arg-type]
    assert not primary.sismember(keys.day_finished(GUARD_DAY), rid("r1"))


def test_a_fan_out_chunk_not_acknowledged_raises_and_counts_once_it_is(lagging: LaggingReplica) -> None:
    from dailyq.fanout import FanOutOptions, fan_out
    from dailyq.replicas import ReplicasBehind
    from dailyq.runs import runs_on
    from dailyq.table import load_table
    from dailyq.worker.workers import make_queue

    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    primary = Redis(port=lagging.primary.port)
    table = load_table("tests.tables.sample_tasks")
    runs = runs_on(table, GUARD_DAY)
    lagging.stop_replicating()
    with pytest.raises(ReplicasBehind, match="0 of 1 replicas acknowledged the fan-out"):
        fan_out(primary, keys, make_queue(primary, keys), runs, FanOutOptions(600, wait_replicas=1))
    lagging.link.heal()
    # The same fan-out again: nothing new to write, and now acknowledged.
    again = fan_out(primary, keys, make_queue(primary, keys), runs, FanOutOptions(600, wait_replicas=1))
    assert again.enqueued == [] and len(again.already) == len(runs)
    wait_for(lambda: on_replica(lagging).scard(keys.day_enqueued(GUARD_DAY)) == len(runs), timeout=5,
             what="the replica to hold the runs")


def test_a_trigger_no_replica_acknowledges_is_one_line_and_exit_3(redis_server: PrivateRedis) -> None:
    # The tests' own server has no replica: WAIT 1 times out (1 s), and trigger says so.
    env = base_env(redis_server.url, f"t{uuid.uuid4().hex[:10]}", SAMPLE_ONLY="1", DAILYQ_WAIT_REPLICAS="1")
    result = run_cli(["trigger", "--date", DAY], env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "0 of 1 replicas acknowledged the fan-out" in lines[0] and "DAILYQ_WAIT_REPLICAS=1" in lines[0], lines


@pytest.mark.parametrize("raw, complaint", [("x", "not a whole number"), ("-1", "must be at least 0")])
def test_a_bad_wait_replicas_is_one_line_and_exit_2(raw: str, complaint: str) -> None:
    result = run_cli(["status"], base_env("redis://127.0.0.1:1/0", "t", DAILYQ_WAIT_REPLICAS=raw))
    assert result.returncode == 2 and complaint in result.stderr and "DAILYQ_WAIT_REPLICAS" in result.stderr, \
        result.stderr
    assert Settings.from_env({}).wait_replicas == 0


# -- a copy stopped because Redis lost its claim and its start ------------------------------


@pytest.mark.parametrize("flags", [[], ["--simple"]], ids=["forking", "non-forking"])
def test_a_copy_whose_claim_redis_lost_with_the_runs_start_puts_the_run_back(flags, node_env, connection, settings):
    """What a lossy failover leaves of a run that had just started: no claim, no running
    entry, the record back at queued. Nothing backs the run then, and the leader's recovery
    does not know it. The copy stops at its next renewal and records nothing, as a copy
    whose claim another took; its worker sees that nobody holds the run and puts the job
    back on the queue, so the run executes again and ends finished, not failed (the leader
    would have settled RQ's failed job as a failure) or lost (a non-forking worker's RQ
    had recorded its job finished)."""

    final, output = run_losing_the_start(node_env, connection, settings, "progress", flags)
    assert final["state"] == "finished", (final, output[-3000:])
    starts = [e for e in executions(connection, settings.prefix) if e["event"] == "start"]
    assert len(starts) == 2, starts
    assert "is back in the queue" in output, output[-3000:]


def test_a_work_horse_that_dies_after_redis_lost_its_claim_and_start_puts_the_run_back(
        node_env, connection, settings):
    """As above, but the work-horse dies (exit code 1, as one whose Redis vanished under
    RQ does) instead of stopping at its renewal: its worker's FAIL finds no claim, so the
    death is not this copy's to record, and RQ fails the job. Nothing backs the run, so
    the worker puts the job back rather than leaving the leader to settle RQ's failure as
    the run's (seen in a lossy failover under load: the run ended failed)."""

    # The run's start lost, then the horse dies.
    final, output = run_losing_the_start(node_env, connection, settings, "die_when_told", [],
                                         also=lambda pipe: pipe.set(f"{settings.prefix}:test:die", 1))
    assert final["state"] == "finished", (final, output[-3000:])
    assert final["attempts"] == 1, final  # the lost start was no attempt of the record's
    starts = [e for e in executions(connection, settings.prefix) if e["event"] == "start"]
    assert len(starts) == 2, starts
    assert "not recorded (its claim had passed on)" in output and "is back in the queue" in output, output[-3000:]


def run_losing_the_start(node_env: dict[str, str], connection: Any, settings: Any, func: str, flags: list[str],
                         also: Any = None) -> tuple[dict[str, Any], str]:
    """One run of ``func`` on a burst worker, whose start Redis loses while it executes, as
    a replica that lagged never had it: no claim, no running entry, the record back at
    queued (``also`` adds to that step). Returns the final record and the worker's output."""
    from dailyq.commands import trigger
    from dailyq.table import Task, TaskTable
    from dailyq.worker.workers import make_queue

    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_FUNC=func, SAMPLE_SLEEP_S="3")
    # The nodes' table with these settings (tests.tables.sample_tasks reads them at import).
    table = TaskTable([Task(name="sample", func=f"tests.tables.sample_tasks.{func}", params=["任务参数0"], at="03:00",
                            timeout_s=60)])
    keys = settings.keys
    day = date.fromisoformat(DAY)
    trigger(connection, keys, make_queue(connection, keys), table, day, None, settings.retention_s)
    (run_id,) = [raw.decode() for raw in connection.hkeys(keys.day_runs(day))]
    worker = subprocess_worker(env, flags)
    try:
        wait_for(lambda: json.loads(connection.hget(keys.day_runs(day), run_id))["state"] == "running", timeout=30,
                 what="the run running")
        record = json.loads(connection.hget(keys.day_runs(day), run_id))
        lost = dict(record, state="queued", attempts=0, node=None, owner=None, started_at=None, fence=None)
        with connection.pipeline() as pipe:
            pipe.delete(keys.claim(run_id))
            pipe.hdel(keys.running, run_id)
            pipe.hset(keys.day_runs(day), run_id, json.dumps(lost))
            if also is not None:
                also(pipe)
            pipe.execute()
        output, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    return json.loads(connection.hget(keys.day_runs(day), run_id)), output


def subprocess_worker(env: dict[str, str], flags: list[str]) -> Any:
    return subprocess.Popen([sys.executable, "worker_entry.py", "--burst", *flags], cwd=ROOT,
                            env=dict(env, NODE_NAME="node-lossy"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

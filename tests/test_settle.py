"""The leader settles runs whose job RQ failed outside the guard (settle.py): against the
real Redis with RQ's own failure path, and with real node processes (a work-horse killed
while it waited for a busy claim)."""

from __future__ import annotations

import json
import os
import signal
from datetime import date, datetime, timedelta
from typing import Any

from redis import Redis
from rq.job_lifecycle import record_job_failure

from dailyq import settle
from dailyq.clock import utc_now
from dailyq.fanout import FanOutOptions, fan_out
from dailyq.rq_seam import make_queue
from dailyq.runs import Run, runs_on
from dailyq.settle import FailedJobs
from dailyq.table import Task, TaskTable
from dailyq.worker.guard import Guard
from tests.support.helpers import children_of, executions, quiet_sample_at, run_cli, wait_for
from tests.test_scheduler import status_of

DAY = date(2026, 11, 26)
TABLE = TaskTable([Task(name="t", func="tests.tables.sample_tasks.noop", params=list("abcde"), at="09:00", retries=0)])
TRACEBACK = ("Traceback (most recent call last):\n  File \"rq/job.py\", line 1, in _execute\n"
             "dailyq.runs.StaleJob: job x: its run is not one of the task table's (unknown task 't')\n")


class Clock:
    """Redis's clock as the leader reads it, moved by the test (RQ scores by the real time)."""

    def __init__(self, ahead_s: float = 0.0) -> None:
        self.now = utc_now() + timedelta(seconds=ahead_s)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Counting(Redis):
    """A client that counts the commands it sends."""

    sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


def queued(connection, settings, n: int = 1) -> list[Run]:
    runs = runs_on(TABLE, DAY)[:n]
    fan_out(connection, settings.keys, make_queue(connection, settings.keys), runs, FanOutOptions(settings.retention_s))
    return runs


def rq_fails(connection, settings, job_id: str, why: str = TRACEBACK) -> None:
    """A worker took the job off the queue and RQ failed it, outside the guard (RQ's own
    failure path: status failed, the failed job registry, a failure result)."""
    queue = make_queue(connection, settings.keys)
    job = queue.fetch_job(job_id)
    queue.remove(job_id)
    with connection.pipeline() as pipe:
        record_job_failure(job, why, pipe)
        pipe.execute()


def record(connection, settings, run_id: str) -> dict:
    return json.loads(connection.hget(settings.keys.day_runs(DAY), run_id))


def failed_jobs(connection, settings, clock: Clock) -> FailedJobs:
    return FailedJobs(connection, settings.keys, make_queue(connection, settings.keys), settings.retention_s, clock)


def test_a_queued_run_whose_job_rq_failed_is_failed_with_rqs_reason(connection, settings):
    (run,) = queued(connection, settings)
    rq_fails(connection, settings, run.job_id())
    clock = Clock()
    looks = failed_jobs(connection, settings, clock)
    (settled,) = looks.settle()
    assert settled.run_id == run.run_id
    stored = record(connection, settings, run.run_id)
    assert stored["state"] == "failed"
    assert stored["error"] == ("RQ failed the job: dailyq.runs.StaleJob: job x: its run is not one of the task "
                               "table's (unknown task 't')")
    clock.advance(settle.LATE_LOOK_S + 1)
    assert looks.settle() == []  # read again by the late look: already handled
    assert float(connection.get(settings.keys.rq_failed_seen)) > 0  # the next leader goes on from there


def test_a_job_rq_failed_because_redis_refused_its_start_for_memory_goes_back_to_the_queue(connection, settings):
    # Seen in the memory-full test: a work-horse's start transaction (BEGIN in it) refused
    # on a full Redis, and RQ failed the job. Nothing ran: the run is not failed but queued
    # again, at the queue's front, and runs once Redis takes writes.
    refused, other = queued(connection, settings, 2)
    oom = ("Traceback (most recent call last):\n  File \"rq/worker/base.py\", line 1, in perform_job\n"
           "redis.exceptions.OutOfMemoryError: Command # 1 (HSET rq:worker:n1.1 last_heartbeat x) of pipeline "
           "caused error: command not allowed when used memory > 'maxmemory'.\n")
    rq_fails(connection, settings, refused.job_id(), oom)
    rq_fails(connection, settings, other.job_id())  # any other reason: failed, as before
    settled = failed_jobs(connection, settings, Clock()).settle()
    assert [s.run_id for s in settled] == [other.run_id]
    assert record(connection, settings, refused.run_id)["state"] == "queued"
    assert record(connection, settings, other.run_id)["state"] == "failed"
    queue = make_queue(connection, settings.keys)
    assert queue.job_ids == [refused.job_id()]
    assert queue.fetch_job(refused.job_id()).get_status() == "queued"
    assert connection.zscore(f"rq:failed:{settings.keys.queue_name}", refused.job_id()) is None


def test_records_that_something_else_backs_are_left_as_they_are(connection, settings):
    alive, dead, superseded, left = queued(connection, settings, 4)
    guard = Guard(connection, settings.keys, "node-x", settings.claim_ttl_s, settings.retention_s)
    for run in (alive, dead):  # began: running, with a claim (alive) or listed for recovery (dead)
        attempt = guard.attempt(run.job(run.job_id()))
        with connection.pipeline() as pipe:
            guard.claim_in(attempt, pipe)
            attempt.keep_begin_reply(pipe.execute()[-1])
    connection.delete(settings.keys.claim(dead.run_id))  # recovery takes that one over
    stale = dict(record(connection, settings, superseded.run_id), job_id=f"{superseded.run_id}-r1")
    connection.hset(settings.keys.day_runs(DAY), superseded.run_id, json.dumps(stale))  # a later job is the run's
    connection.zadd(settings.keys.left, {left.job_id(): 0})  # left for a node whose table has it
    for run in (alive, dead, superseded, left):
        rq_fails(connection, settings, run.job_id())
    before = {run.run_id: record(connection, settings, run.run_id) for run in (alive, dead, superseded, left)}
    assert failed_jobs(connection, settings, Clock()).settle() == []
    assert {run_id: record(connection, settings, run_id) for run_id in before} == before


def test_a_failure_scored_behind_the_reading_by_a_slow_worker_clock_is_found_by_the_late_look(connection, settings):
    (run,) = queued(connection, settings)
    clock = Clock(ahead_s=100)  # the worker's clock is 100 s behind Redis's
    looks = failed_jobs(connection, settings, clock)
    assert looks.settle() == []  # nothing failed yet: the reading moves to now
    rq_fails(connection, settings, run.job_id())  # scored 100 s behind where the leader reads on
    clock.advance(settle.SETTLE_EVERY_S)
    assert looks.settle() == [] and record(connection, settings, run.run_id)["state"] == "queued"
    clock.advance(settle.LATE_LOOK_S)
    assert [s.run_id for s in looks.settle()] == [run.run_id]
    assert record(connection, settings, run.run_id)["state"] == "failed"


def test_a_look_when_nothing_failed_is_one_command_every_few_seconds(settings):
    client = Counting.from_url(settings.redis_url)
    client.sent = []
    clock = Clock()
    looks = failed_jobs(client, settings, clock)
    looks.settle()  # the first look reads the cursor (and writes it)
    client.sent.clear()
    for _ in range(10):  # 10 ticks of 1 s
        clock.advance(1)
        looks.settle()
    assert client.sent.count("ZRANGEBYSCORE") == 2 and len(client.sent) <= 3  # a look per 5 s, a cursor write
    client.close()


def test_more_failures_than_a_batch_at_one_score_are_all_settled(connection, settings, monkeypatch):
    monkeypatch.setattr(settle, "BATCH", 2)
    runs = queued(connection, settings, 5)
    for run in runs:
        rq_fails(connection, settings, run.job_id())
    clock = Clock()
    looks = failed_jobs(connection, settings, clock)
    settled = []
    for _ in range(5):  # a full batch looks again at the next tick
        clock.advance(1)
        settled += [s.run_id for s in looks.settle()]
    assert sorted(settled) == sorted(run.run_id for run in runs)


# -- with real processes ------------------------------------------------------------------

def test_a_work_horse_killed_while_waiting_for_the_previous_days_run_ends_failed(node_env, processes, connection,
                                                                                 prefix):
    # One param, two days: the same series (task and param), overlap 'wait'. Node a runs
    # day 1; node b's work-horse takes day 2's job and waits for the series claim; it is
    # killed there. Its worker parent records nothing (the claim was never its own) and RQ
    # fails the job, outside the guard; the leader settles day 2's run from RQ's failed jobs.
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_SLEEP_S="20", SAMPLE_AT=quiet_sample_at())
    processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    a = processes.start("worker_entry.py", dict(env, NODE_NAME="node-a"))
    try:
        assert run_cli(["trigger", "--date", "2026-11-20"], env).returncode == 0
        wait_for(lambda: any(e["event"] == "start" for e in executions(connection, prefix)), timeout=30,
                 what="day 1's run to start on node a")
        b = processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))
        assert run_cli(["trigger", "--date", "2026-11-21"], env).returncode == 0
        wait_for(lambda: "is executing; waiting" in processes.log_of(b), timeout=30,
                 what="node b's copy of day 2's run to wait for day 1's")
        (horse,) = children_of(b.pid)
        os.kill(horse, signal.SIGKILL)
        wait_for(lambda: status_of(env, "2026-11-21")["runs"][0]["state"] == "failed", timeout=30,
                 what="day 2's run to be settled", every=0.5)
        (run,) = status_of(env, "2026-11-21")["runs"]
        assert run["error"].startswith("RQ failed the job: Work-horse terminated unexpectedly")
        assert run["attempts"] == 0
        # Day 1 goes on, untouched: still its first copy on node a (on a loaded machine its
        # 20 s can be over by now, so finished by that same copy is fine too).
        (day_one,) = status_of(env, "2026-11-20")["runs"]
        assert day_one["state"] in ("running", "finished") and day_one["attempts"] == 1, day_one
        assert day_one["node"] == "node-a" and not day_one.get("error"), day_one
    finally:
        os.killpg(a.pid, signal.SIGKILL)  # not a warm stop in the middle of day 1's 20 s run


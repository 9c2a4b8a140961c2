"""Crashes of real processes: a node dying mid-run, an orphaned work-horse; and the
leader's recovery of a dead run driven in-process against the real Redis, where the
path needs a leader killed at an exact point or a table that lacks the run's task."""

import json
import os
import signal
import time
from datetime import date, datetime, timezone

import pytest
from redis import Redis
from rq import Queue

from dailyq.fanout import FanOutOptions, fan_out
from dailyq.keys import Keys
from dailyq.recovery import AbandonedRuns
from dailyq.rq_seam import make_queue
from dailyq.runs import Run, runs_on
from dailyq.table import Task, TaskTable
from dailyq.worker.guard import Guard
from dailyq.worker.workers import DailySimpleWorker
from tests.support.helpers import executions, quiet_sample_at, run_cli, starts_per_param, wait_for
from tests.test_scheduler import all_finished, live_env, slot_in, status_of


def first_start(connection, prefix):
    events = [e for e in executions(connection, prefix) if e["event"] == "start"]
    return events[0] if events else None


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_node_death_mid_run_restarts_the_run_on_another_node_within_60s_by_default(node_env, processes, connection,
                                                                                      prefix):
    slot = slot_in(4)
    # The default claim and lease TTLs: the 60 s promise is for the defaults.
    env = dict(live_env(node_env, slot, params=1, sleep_s=6), DAILYQ_CLAIM_TTL_S="30", DAILYQ_LEASE_TTL_S="3",
               SAMPLE_RETRIES="1")
    processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    doomed = processes.start("worker_entry.py", dict(env, NODE_NAME="node-a"))
    wait_for(lambda: first_start(connection, prefix) is not None, timeout=30, what="the run to start on node-a")
    started = first_start(connection, prefix)
    assert started["node"] == "node-a"
    processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))

    # The whole node dies: worker parent and its work-horse (which RQ puts in its own group).
    kill(doomed.pid)
    kill(started["pid"])
    died_at = time.time()
    day = slot.date().isoformat()
    wait_for(lambda: all_finished(env, day), timeout=60, what="the run to finish elsewhere")
    recovered_in = time.time() - died_at
    print(f"node death -> run finished elsewhere: {recovered_in:.1f}s")

    (run,) = status_of(env, day)["runs"]
    assert run["state"] == "finished" and run["node"] == "node-b"
    assert run["attempts"] == 2
    starts = [e for e in executions(connection, prefix) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["t"] > died_at  # re-executed only after the first copy died
    # The recovered copy is the same run: same run id, the next attempt, a greater fencing token.
    first, recovered = starts[0]["context"], starts[1]["context"]
    assert recovered["run_id"] == first["run_id"] == run["run_id"]
    assert (first["attempt"], recovered["attempt"]) == (1, 2) and recovered["fence"] > first["fence"]
    assert recovered_in < 60


def test_an_orphaned_work_horse_keeps_its_claim_and_no_second_copy_runs(node_env, processes, connection, prefix):
    slot = slot_in(4)
    env = live_env(node_env, slot, params=1, sleep_s=7)
    keys = Keys(prefix)
    processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    parent = processes.start("worker_entry.py", dict(env, NODE_NAME="node-a"))
    wait_for(lambda: first_start(connection, prefix) is not None, timeout=30, what="the run to start")
    horse_pid = first_start(connection, prefix)["pid"]
    try:
        kill(parent.pid)  # only the parent: the work-horse goes on, orphaned
        # RQ's abandoned-job cleanup would push the job back onto the queue; do just that.
        (run_id,) = connection.hkeys(keys.day_runs(slot.date()))
        connection.rpush(f"rq:queue:{keys.queue_name}", run_id)
        processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))
        day = slot.date().isoformat()
        wait_for(lambda: all_finished(env, day), timeout=40, what="the orphan to finish")
        time.sleep(2)  # let node-b's copy look at the run after the orphan finished
    finally:
        kill(horse_pid)
    events = executions(connection, prefix)
    assert [e["event"] for e in events] == ["start", "end"]
    assert {e["pid"] for e in events} == {horse_pid}
    (run,) = status_of(env, day)["runs"]
    assert run["state"] == "finished" and run["attempts"] == 1 and run["node"] == "node-a"


@pytest.mark.slow
def test_a_task_that_kills_its_own_process_ends_failed_after_its_attempts(node_env, processes, connection, prefix):
    # retries=1: two executions in all, each ending its work-horse with os._exit(3).
    # Each worker's RQ maintenance (which settles jobs whose work-horse vanished) every 3 s,
    # not the default 60 s: the wait below spans four passes of it.
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_FUNC="die", SAMPLE_RETRIES="1",
               SAMPLE_BACKOFF_S="1", SAMPLE_AT=quiet_sample_at(), DAILYQ_WORKER_MAINTENANCE_S="3")
    for node in ("node-a", "node-b"):
        processes.start("scheduler.py", dict(env, NODE_NAME=node))
        processes.start("worker_entry.py", dict(env, NODE_NAME=node))
    assert run_cli(["trigger", "--date", "2026-11-20"], env).returncode == 0

    def state() -> str:
        return status_of(env, "2026-11-20")["runs"][0]["state"]

    wait_for(lambda: state() == "failed", timeout=40, what="the run to end failed", every=0.5)
    (run,) = status_of(env, "2026-11-20")["runs"]
    assert run["attempts"] == 2 and run["error"] == "work-horse died (exit code 3)"
    starts = [e for e in executions(connection, prefix) if e["event"] == "start"]
    assert len(starts) == 2
    assert [s["context"]["attempt"] for s in starts] == [1, 2]
    # Neither recovery (the leader looks every claim TTL / 2 = 3 s) nor RQ's maintenance
    # (3 s here) nor RQ's retry scheduler runs it again: four passes of each.
    time.sleep(12)
    assert len([e for e in executions(connection, prefix) if e["event"] == "start"]) == 2
    assert status_of(env, "2026-11-20")["runs"][0]["state"] == "failed"


def test_a_killed_work_horse_is_recorded_at_once_and_retried(node_env, processes, connection, prefix):
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_SLEEP_S="5", SAMPLE_RETRIES="1",
               SAMPLE_BACKOFF_S="30", SAMPLE_AT=quiet_sample_at(), NODE_NAME="node-a")
    processes.start("worker_entry.py", env)
    assert run_cli(["trigger", "--date", "2026-11-20"], env).returncode == 0
    wait_for(lambda: first_start(connection, prefix) is not None, timeout=30, what="the run to start")
    kill(first_start(connection, prefix)["pid"])  # the work-horse only: its worker parent sees it die
    wait_for(lambda: status_of(env, "2026-11-20")["runs"][0]["state"] == "queued", timeout=10,
             what="the death to be recorded")
    (run,) = status_of(env, "2026-11-20")["runs"]
    assert run["error"] == "work-horse died (killed by SIGKILL)" and run["attempts"] == 1


def test_a_job_whose_worker_died_between_dequeue_and_start_is_put_back(node_env, processes, connection, prefix):
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_PARAMS="2", SAMPLE_AT=quiet_sample_at())
    processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    assert run_cli(["trigger", "--date", "2026-11-20"], env).returncode == 0
    queue_key = f"rq:queue:{Keys(prefix).queue_name}"
    # What a worker SIGKILLed right after RQ's dequeue leaves behind: the job moved to
    # RQ's intermediate queue, never started, no claim taken.
    stranded = connection.lmove(queue_key, f"{queue_key}:intermediate", "LEFT", "RIGHT")
    assert stranded is not None
    processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))
    wait_for(lambda: all_finished(env, "2026-11-20"), timeout=40, what="the stranded run to be put back and run")
    assert sorted(starts_per_param(executions(connection, prefix)).values()) == [1, 1]


# -- the leader's recovery, in-process ------------------------------------------------------

DAY = date(2026, 11, 26)
HB = Task(name="hb", func="tests.tables.sample_tasks.noop", params=["p1"], at="09:00", retries=2)
NT = Task(name="nt", func="tests.tables.sample_tasks.noop", params=["n1"], at="09:00", retries=2, timeout_s=77,
          retry_backoff_s=3)
V1 = TaskTable([HB])  # an old table: no task nt
V2 = TaskTable([HB, NT])


def recovery(connection, settings, table: TaskTable) -> AbandonedRuns:
    return AbandonedRuns(connection, settings.keys, make_queue(connection, settings.keys), table,
                         settings.retention_s, clock=lambda: datetime(2026, 11, 26, 9, 5, tzinfo=timezone.utc))


def stored_record(connection, settings, run_id: str) -> dict:
    return json.loads(connection.hget(settings.keys.day_runs(DAY), run_id))


def died_mid_run(connection, settings, table: TaskTable, task: str) -> Run:
    """A run fanned out by ``table``'s leader, begun by a worker whose node then died: its
    record says running, it is listed as running, and its claim has lapsed."""
    (run,) = [r for r in runs_on(table, DAY) if r.task.name == task]
    queue = make_queue(connection, settings.keys)
    fan_out(connection, settings.keys, queue, [run], FanOutOptions(settings.retention_s))
    assert connection.lpop(queue.key) == run.job_id().encode()  # a worker took the job...
    guard = Guard(connection, settings.keys, "node-dead", settings.claim_ttl_s, settings.retention_s)
    attempt = guard.attempt(run.job(run.job_id()))
    with connection.pipeline() as pipe:  # ...and began the run, as in RQ's preparation transaction
        guard.claim_in(attempt, pipe)
        attempt.keep_begin_reply(pipe.execute()[-1])
    assert attempt.begin_reply == "claimed"
    connection.delete(settings.keys.claim(run.run_id))  # then its node died: the claim lapsed
    return run


def test_a_leader_killed_between_taking_a_dead_run_and_requeueing_it_leaves_it_for_the_next(connection, settings):
    run = died_mid_run(connection, settings, V1, "hb")
    pid = os.fork()
    if pid == 0:  # the leader, SIGKILLed in the middle of its requeue (before its transaction is sent)
        try:
            Queue.enqueue_many = lambda *args, **kwargs: os._exit(9)
            recovery(Redis.from_url(settings.redis_url), settings, V1).requeue(fence=None)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9  # it did die there
    # Still listed as running with no claim: the next look takes it over.
    assert connection.hget(settings.keys.running, run.run_id) == DAY.isoformat().encode()
    assert recovery(connection, settings, V1).requeue(fence=None) == [run.run_id]
    record = stored_record(connection, settings, run.run_id)
    assert record["state"] == "queued" and record["job_id"] == f"{run.run_id}-r2" and record["attempts"] == 1
    assert not connection.hexists(settings.keys.running, run.run_id)
    assert make_queue(connection, settings.keys).get_job_ids() == [f"{run.run_id}-r2"]


def test_an_old_leader_requeues_a_dead_run_of_a_task_its_table_lacks_from_the_dead_job(connection, settings):
    run = died_mid_run(connection, settings, V2, "nt")
    queue = make_queue(connection, settings.keys)
    dead = queue.fetch_job(run.job_id())
    assert recovery(connection, settings, V1).requeue(fence=None) == [run.run_id]
    record = stored_record(connection, settings, run.run_id)
    assert record["state"] == "queued" and record["job_id"] == f"{run.run_id}-r1" and record["attempts"] == 1
    assert not connection.hexists(settings.keys.running, run.run_id)
    (new,) = [queue.fetch_job(job_id) for job_id in queue.get_job_ids()]
    assert new.id == f"{run.run_id}-r1"
    assert (new.func_name, new.args, new.timeout, new.meta, new.description, new.failure_ttl) == (
        dead.func_name, dead.args, 77, dead.meta, dead.description, dead.failure_ttl)
    # 3 attempts in all, 1 used: one RQ retry after its next execution, with the backoffs ahead.
    assert new.retries_left == 1 and new.retry_intervals == dead.retry_intervals == [3, 6]
    # The worker whose table has the task runs it.
    DailySimpleWorker(connection=connection, settings=settings, table=V2).work(burst=True)
    record = stored_record(connection, settings, run.run_id)
    assert record["state"] == "finished" and record["attempts"] == 2


def test_a_dead_run_whose_job_is_gone_is_requeued_from_the_table_or_failed_with_the_reason(connection, settings):
    queue = make_queue(connection, settings.keys)
    hb = died_mid_run(connection, settings, V2, "hb")
    nt = died_mid_run(connection, settings, V2, "nt")
    for run in (hb, nt):
        connection.delete(queue.fetch_job(run.job_id()).key)  # its job expired, or was deleted
    assert recovery(connection, settings, V1).requeue(fence=None) == [hb.run_id]
    assert stored_record(connection, settings, hb.run_id)["state"] == "queued"
    assert queue.fetch_job(f"{hb.run_id}-r1").meta == hb.job(f"{hb.run_id}-r1").meta()  # rebuilt from the table
    record = stored_record(connection, settings, nt.run_id)
    assert record["state"] == "failed"
    assert record["error"] == (
        "executing process lost on node node-dead (node died, killed, or cut off from Redis); not requeued: "
        f'its job {nt.job_id()} is gone from Redis and this leader\'s task table has no run nt("n1") at slot '
        f"{nt.slot.isoformat()}")
    assert not connection.hexists(settings.keys.running, nt.run_id)

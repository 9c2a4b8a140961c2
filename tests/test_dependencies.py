"""Task dependencies (``Task(after=[...])``, dependencies.py): parked runs, their release
against the tests' redis-server (no mocks), and chains across real node processes."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from redis import Redis

from dailyq.commands import rerun, trigger
from dailyq.dependencies import WaitingRuns, release_ready
from dailyq.fanout import FanOutOptions, fan_out
from dailyq.keys import Keys
from dailyq.rq_seam import make_queue
from dailyq.runs import Run, decode_record, runs_on
from dailyq.table import Task, TaskTable
from tests.helpers import executions, quiet_sample_at, run_cli, starts_per_param, wait_for

DAY = date(2026, 11, 20)
RETENTION_S = 3600
RECORD = "tests.sample_tasks.record"


def chain_table() -> TaskTable:
    """up (3 params) -> mid (1) -> down (2); 'other' depends on nothing."""
    return TaskTable([
        Task(name="up", func=RECORD, params=["a", "b", "c"], at="03:00", retries=0),
        Task(name="mid", func=RECORD, params=["m"], at="03:00", after=["up"]),
        Task(name="down", func=RECORD, params=["x", "y"], at="04:00", after=["mid", "up"]),
        Task(name="other", func=RECORD, params=["o"], at="03:00"),
    ])


def ids(table: TaskTable, task: str, day: date = DAY) -> list[str]:
    return [run.run_id for run in runs_on(table, day, [task])]


def records(connection: Redis, keys: Keys, day: date = DAY) -> dict[str, dict]:
    return {k.decode(): decode_record(v) for k, v in connection.hgetall(keys.day_runs(day)).items()}


def queued_job_ids(connection: Redis, keys: Keys) -> Counter:
    return Counter(j.decode() for j in connection.lrange(f"rq:queue:{keys.queue_name}", 0, -1))


def finish(connection: Redis, keys: Keys, run_ids: list[str], day: date = DAY) -> None:
    """What FINISH leaves behind (the finished set is what release looks at)."""
    for run_id in run_ids:
        record = json.loads(connection.hget(keys.day_runs(day), run_id))
        connection.hset(keys.day_runs(day), run_id, json.dumps(dict(record, state="finished")))
    connection.sadd(keys.day_finished(day), *run_ids)


def fail(connection: Redis, keys: Keys, run_id: str, day: date = DAY) -> None:
    record = json.loads(connection.hget(keys.day_runs(day), run_id))
    connection.hset(keys.day_runs(day), run_id, json.dumps(dict(record, state="failed", error="RuntimeError: boom")))


def release(connection: Redis, keys: Keys, table: TaskTable, day: date = DAY, **kwargs):
    return release_ready(connection, keys, make_queue(connection, keys), table, day, retention_s=RETENTION_S,
                         **kwargs)


# -- release against the real Redis --------------------------------------------------------------

def test_held_runs_take_no_queue_entry_and_are_released_once_when_every_upstream_run_finished(connection, keys):
    table = chain_table()
    queue = make_queue(connection, keys)
    result = fan_out(connection, keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
    held = ids(table, "mid") + ids(table, "down")
    assert sorted(result.waiting) == sorted(held)
    assert set(queued_job_ids(connection, keys)) == set(ids(table, "up") + ids(table, "other"))
    assert {records(connection, keys)[run_id]["state"] for run_id in held} == {"waiting"}
    assert connection.smembers(keys.waiting_days) == {DAY.isoformat().encode()}

    finish(connection, keys, ids(table, "up")[:2] + ids(table, "other"))
    assert release(connection, keys, table).released == []  # one upstream run still unfinished
    finish(connection, keys, ids(table, "up")[2:])
    first = release(connection, keys, table)
    assert first.released == ids(table, "mid")  # down also waits for mid, held itself
    assert sorted(first.still_waiting) == sorted(ids(table, "down"))
    assert records(connection, keys)[ids(table, "mid")[0]]["state"] == "queued"
    assert release(connection, keys, table).released == []  # released once

    finish(connection, keys, ids(table, "mid"))
    assert sorted(WaitingRuns(connection, keys, queue, table, RETENTION_S).release_all()) == sorted(ids(table, "down"))
    assert Counter(queued_job_ids(connection, keys)) == Counter(ids(table, "up") + ids(table, "other") + held)
    assert not connection.exists(keys.day_waiting(DAY))
    assert not connection.smembers(keys.waiting_days)  # the leader stops looking at the day
    job = queue.fetch_job(ids(table, "down")[0])
    assert job is not None and job.func_name == RECORD and job.meta["dailyq"]["run_id"] == ids(table, "down")[0]
    assert {records(connection, keys)[run_id]["state"] for run_id in ids(table, "down")} == {"queued"}


def test_a_failed_upstream_run_blocks_its_downstream_runs_until_a_rerun_of_it_finishes(connection, keys):
    table = TaskTable([Task(name="up", func=RECORD, params=["a", "b"], at="03:00", retries=0),
                       Task(name="down", func=RECORD, params=["x"], at="03:00", after=["up"])])
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
    good, bad = ids(table, "up")
    (down,) = ids(table, "down")
    finish(connection, keys, [good])
    fail(connection, keys, bad)
    result = release(connection, keys, table)
    assert result.released == [] and result.blocked == {down: bad}
    record = records(connection, keys)[down]
    assert record["state"] == "blocked" and record["error"] == f'upstream run up("b") failed: {bad}'

    report = rerun(connection, keys, queue, table, "up", ["b"], DAY, force=False, retention_s=RETENTION_S)
    assert [run.run_id for run in report.enqueued] == [bad]
    assert release(connection, keys, table).still_waiting == [down]
    assert records(connection, keys)[down]["state"] == "waiting" and records(connection, keys)[down]["error"] is None
    finish(connection, keys, [bad])
    assert release(connection, keys, table, tasks=["down"]).released == [down]


def test_held_runs_of_a_task_the_leaders_table_lacks_stay_held_for_a_table_that_has_it(connection, keys, caplog):
    old = TaskTable([Task(name="up", func=RECORD, params=["a"], at="03:00", retries=0),
                     Task(name="down", func=RECORD, params=["x"], at="03:00", after=["up"])])
    new = TaskTable([*old.tasks, Task(name="nd", func=RECORD, params=["n"], at="03:00", after=["up"])])
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(new, DAY), FanOutOptions(RETENTION_S))  # the new leader fanned out
    finish(connection, keys, ids(new, "up"))
    (held,) = ids(new, "nd")
    old_leader = WaitingRuns(connection, keys, queue, old, RETENTION_S)
    with caplog.at_level("WARNING", logger="dailyq.dependencies"):
        assert old_leader.release_all() == ids(old, "down")
        assert old_leader.release_all() == []  # looked at every tick ...
    assert sum(held in r.getMessage() for r in caplog.records) == 1  # ... and said once
    # Still held, waiting, its day still looked at: a node whose table has nd releases it.
    assert connection.hkeys(keys.day_waiting(DAY)) == [held.encode()]
    assert records(connection, keys)[held]["state"] == "waiting"
    assert connection.smembers(keys.waiting_days) == {DAY.isoformat().encode()}
    assert release(connection, keys, new).released == [held]
    assert records(connection, keys)[held]["state"] == "queued" and held in queued_job_ids(connection, keys)
    assert not connection.exists(keys.day_waiting(DAY)) and not connection.smembers(keys.waiting_days)


def test_concurrent_callers_enqueue_each_held_run_exactly_once(connection, keys, settings):
    table = chain_table()
    rounds = 12
    days = [DAY + timedelta(days=i) for i in range(rounds)]
    for day in days:
        fan_out(connection, keys, make_queue(connection, keys), runs_on(table, day, ["up", "mid"]),
                FanOutOptions(RETENTION_S))
        finish(connection, keys, ids(table, "up", day), day)
    clients = [Redis.from_url(settings.redis_url) for _ in range(2)]
    released: list[list[str]] = [[], []]
    barrier = threading.Barrier(2)

    def caller(n: int) -> None:
        for day in days:
            barrier.wait(timeout=10)
            released[n] += release(clients[n], keys, table, day).released

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for client in clients:
        client.close()
    mid_ids = [run_id for day in days for run_id in ids(table, "mid", day)]
    assert sorted(released[0] + released[1]) == sorted(mid_ids)  # each by one caller only
    queued = queued_job_ids(connection, keys)
    assert all(queued[run_id] == 1 for run_id in mid_ids)


def test_trigger_of_a_past_day_whose_upstream_runs_finished_releases_at_once(connection, keys):
    table = chain_table()
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY, ["up"]), FanOutOptions(RETENTION_S))
    finish(connection, keys, ids(table, "up"))
    trigger(connection, keys, queue, table, DAY, ["mid"], RETENTION_S)
    assert records(connection, keys)[ids(table, "mid")[0]]["state"] == "queued"
    assert queued_job_ids(connection, keys)[ids(table, "mid")[0]] == 1


def test_a_recovered_downstream_run_is_enqueued_directly(connection, keys):
    # Recovery requeues a run that was executing, so released already (recovery.py).
    table = chain_table()
    (run,) = runs_on(table, DAY, ["mid"])
    result = fan_out(connection, keys, make_queue(connection, keys), [run],
                     FanOutOptions(RETENTION_S, hold_dependent=False))
    assert result.waiting == [] and queued_job_ids(connection, keys)[run.run_id] == 1


def computed_regions(day: date) -> list[str]:
    return ["eu", "us"]


def test_a_computed_upstream_slot_without_its_list_holds_downstream_runs_until_its_runs_finish(connection, keys):
    from dailyq.params_book import settle

    table = TaskTable([Task(name="up", func=RECORD, params="tests.test_dependencies.computed_regions", at="03:00"),
                       Task(name="down", func=RECORD, params=["x"], at="03:00", after=["up"])])
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY, ["down"]), FanOutOptions(RETENTION_S))
    # No list stored for up's slot: its runs are unknown, so nothing is released (not "no runs").
    assert release(connection, keys, table).released == []
    (slot,) = table.get("up").schedule.permits_on(DAY)
    now = datetime(2026, 11, 20, 3, 0, tzinfo=slot.fires_at.tzinfo)
    assert settle(connection, keys, table.get("up"), slot, now, RETENTION_S, when="failed").params == ["eu", "us"]
    up_ids = [Run(table.get("up"), region, slot).run_id for region in ("eu", "us")]
    fan_out(connection, keys, queue, [Run(table.get("up"), region, slot) for region in ("eu", "us")],
            FanOutOptions(RETENTION_S))
    finish(connection, keys, up_ids[:1])
    assert release(connection, keys, table).released == []
    finish(connection, keys, up_ids[1:])
    assert release(connection, keys, table).released == ids(table, "down")


def failing_regions(day: date) -> list[str]:
    raise RuntimeError("no regions today")


def test_downstream_runs_of_a_computed_slot_whose_callable_failed_for_good_are_blocked(connection, keys):
    from dailyq.params_book import settle

    table = TaskTable([Task(name="up", func=RECORD, params="tests.test_dependencies.failing_regions", at="03:00",
                            retries=0),
                       Task(name="down", func=RECORD, params=["x"], at="03:00", after=["up"])])
    fan_out(connection, keys, make_queue(connection, keys), runs_on(table, DAY, ["down"]), FanOutOptions(RETENTION_S))
    (slot,) = table.get("up").schedule.permits_on(DAY)
    now = datetime(2026, 11, 20, 3, 0, tzinfo=slot.fires_at.tzinfo)
    assert settle(connection, keys, table.get("up"), slot, now, RETENTION_S, when="failed").next_try_at is None
    assert release(connection, keys, table).released == []
    (down,) = ids(table, "down")
    record = records(connection, keys)[down]
    assert record["state"] == "blocked"  # not 'waiting' for a list that will never come
    assert "its params callable failed after 1 attempts" in record["error"] and "no regions today" in record["error"]


# -- real node processes ---------------------------------------------------------------------------

NODE_DAY = "2026-11-20"
UPSTREAM = [f"任务参数{i}" for i in range(3)]
DOWNSTREAM = [f"下游{i}" for i in range(2)]
# The promise is release within 2 s of the last upstream run finishing. What the
# bound below adds to it: between the release (in the finishing work-horse, right after
# FINISH) and the downstream run's started_at lie an idle worker's BLMOVE wake-up, RQ's
# preparation and its fork of a work-horse, on a 2-core machine other tests share.
# And records keep whole seconds (timestamps.iso): a difference of two of them is off
# by less than one second.
RELEASE_PROMISE_S = 2.0
START_SLACK_S = 1.5
RECORD_PRECISION_S = 1.0


def chain_env(node_env: dict, **extra: str) -> dict:
    return dict(node_env, SAMPLE_ONLY="1", SAMPLE_DOWNSTREAM=str(len(DOWNSTREAM)), SAMPLE_AT=quiet_sample_at(),
                **extra)


def status_runs(env: dict, day: str = NODE_DAY) -> list[dict]:
    result = run_cli(["status", "--date", day, "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["runs"]


def states(env: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for run in status_runs(env):
        found.setdefault(run["task"], set()).add(run["state"])
    return found


def at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


@pytest.mark.slow
def test_a_chain_across_three_nodes_runs_downstream_only_after_upstream_with_the_leader_killed(
        node_env, processes, connection, prefix):
    # Runs of 8 s: the checks made while the upstream runs execute (a status command
    # takes seconds on a loaded machine) are done before they end.
    env = chain_env(node_env, SAMPLE_PARAMS=str(len(UPSTREAM)), SAMPLE_SLEEP_S="8")
    keys = Keys(prefix)
    schedulers = {}
    for node in ("node-1", "node-2", "node-3"):
        schedulers[node] = processes.start("scheduler.py", dict(env, NODE_NAME=node))
        processes.start("worker_entry.py", dict(env, NODE_NAME=node))
    for node in schedulers:
        wait_for(lambda node=node: connection.exists(keys.heartbeat("worker", node)), 30, f"the worker of {node}")
    wait_for(lambda: connection.exists(keys.leader), 30, "a leader")
    assert run_cli(["trigger", "--date", NODE_DAY], env).returncode == 0

    def upstream_started() -> int:
        return sum(1 for e in executions(connection, prefix) if e["event"] == "start" and e["param"] in UPSTREAM)

    wait_for(lambda: upstream_started() == len(UPSTREAM), 30, "every upstream run to start")
    assert states(env)["downstream"] == {"waiting"}  # and in no queue: only a release pushes them
    assert not any(j.decode().startswith("downstream-")
                   for j in connection.lrange(f"rq:queue:{keys.queue_name}", 0, -1))
    leader = json.loads(connection.get(keys.leader))["node"]
    os.kill(schedulers[leader].pid, signal.SIGKILL)  # mid-batch: its lease lapses, another node takes over

    wait_for(lambda: states(env) == {"sample": {"finished"}, "downstream": {"finished"}}, 60,
             "every run to finish", every=0.3)
    events = executions(connection, prefix)
    assert sorted(starts_per_param(events).values()) == [1] * (len(UPSTREAM) + len(DOWNSTREAM))  # each once
    upstream_ends = [e["t"] for e in events if e["event"] == "end" and e["param"] in UPSTREAM]
    downstream_starts = [e["t"] for e in events if e["event"] == "start" and e["param"] in DOWNSTREAM]
    assert min(downstream_starts) >= max(upstream_ends)
    # As the tasks logged it (to Redis, to the hundredth of a second): from the last
    # upstream task's return, through its FINISH and the release, to a downstream task's start.
    assert max(downstream_starts) - max(upstream_ends) <= RELEASE_PROMISE_S + START_SLACK_S
    # The same from the records Redis holds (the guard's BEGIN and FINISH times).
    runs = status_runs(env)
    last_upstream_end = max(at(r["ended_at"]) for r in runs if r["task"] == "sample")
    for run in (r for r in runs if r["task"] == "downstream"):
        waited_s = at(run["started_at"]) - last_upstream_end
        assert 0 <= waited_s <= RELEASE_PROMISE_S + START_SLACK_S + RECORD_PRECISION_S, (run, waited_s)
        assert run["attempts"] == 1


def test_a_failed_upstream_run_blocks_downstream_until_a_rerun_of_it_finishes(node_env, processes, connection,
                                                                               prefix, tmp_path: Path):
    marker = tmp_path / "fixed"
    env = chain_env(node_env, SAMPLE_PARAMS="2", SAMPLE_FUNC="fail_until_marker", SAMPLE_FAIL="任务参数1",
                    SAMPLE_MARKER=str(marker), SAMPLE_RETRIES="0", SAMPLE_SLEEP_S="0.2")
    for node in ("node-1", "node-2"):
        processes.start("scheduler.py", dict(env, NODE_NAME=node))
        processes.start("worker_entry.py", dict(env, NODE_NAME=node))
    assert run_cli(["trigger", "--date", NODE_DAY], env).returncode == 0
    wait_for(lambda: states(env).get("downstream") == {"blocked"}, 30, "the downstream runs to be blocked", every=0.3)
    runs = status_runs(env)
    (failed,) = [r for r in runs if r["state"] == "failed"]
    assert failed["task"] == "sample" and failed["param"] == "任务参数1"
    for run in (r for r in runs if r["task"] == "downstream"):
        assert run["error"] == f'upstream run sample("任务参数1") failed: {failed["run_id"]}'
    assert not [e for e in executions(connection, prefix) if e["param"] in DOWNSTREAM]

    marker.touch()
    result = run_cli(["rerun", "sample", "--param", "任务参数1", "--date", NODE_DAY], env)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: states(env) == {"sample": {"finished"}, "downstream": {"finished"}}, 30,
             "the rerun and then the downstream runs to finish", every=0.3)
    events = executions(connection, prefix)
    rerun_end = max(e["t"] for e in events if e["event"] == "end" and e["param"] == "任务参数1")
    downstream_starts = [e["t"] for e in events if e["event"] == "start" and e["param"] in DOWNSTREAM]
    assert len(downstream_starts) == len(DOWNSTREAM) and min(downstream_starts) >= rerun_end
    assert all(r["error"] is None for r in status_runs(env) if r["task"] == "downstream")

"""Fan-out: one job per run, idempotent across callers, fenced by the leader lease."""

import json
import subprocess
import time
import sys
import zlib
from datetime import date

import pytest

from dailyq.errors import LeaseLost
from dailyq.fanout import fan_out, trigger
from dailyq.lease import Lease
from dailyq.runs import runs_on
from dailyq.table import Task, TaskTable
from dailyq.worker import make_queue
from tests.sample_tasks import record
from tests.helpers import ROOT

DAY = date(2026, 11, 26)


def test_trigger_enqueues_each_run_once_however_often_it_is_called(connection, settings, table):
    queue = make_queue(connection, settings.keys)
    first = trigger(connection, settings.keys, queue, table, DAY, None, settings.retention_s)
    second = trigger(connection, settings.keys, queue, table, DAY, None, settings.retention_s)
    expected = len(runs_on(table, DAY))
    assert len(first.enqueued) == expected and first.already == []
    assert second.enqueued == [] and len(second.already) == expected
    assert queue.count == expected


def test_jobs_are_json_and_name_the_table_function(connection, settings, table):
    queue = make_queue(connection, settings.keys)
    trigger(connection, settings.keys, queue, table, DAY, ["sample"], settings.retention_s)
    job = queue.jobs[0]
    assert job.func_name == "tests.sample_tasks.record"
    # RQ zlib-compresses the payload; inside it is JSON, not a pickle.
    payload = json.loads(zlib.decompress(connection.hget(job.key, "data")))
    assert "任务参数0" in json.dumps(payload, ensure_ascii=False)
    assert job.meta["dailyq"]["day"] == "2026-11-26"


def test_a_leader_that_lost_its_lease_enqueues_nothing(connection, settings, table):
    queue = make_queue(connection, settings.keys)
    stale = Lease(connection, settings.keys.leader, "old-leader", 60_000)
    assert stale.acquire_or_renew()
    connection.set(settings.keys.leader, "new-leader")  # the lease passed on while the old one slept
    with pytest.raises(LeaseLost):
        fan_out(connection, settings.keys, queue, runs_on(table, DAY), retention_s=60, fence=stale)
    assert queue.count == 0
    assert not connection.exists(settings.keys.day_enqueued(DAY))


def test_large_fan_out_is_chunked_and_complete(connection, settings, table, monkeypatch):
    import dailyq.fanout

    monkeypatch.setattr(dailyq.fanout, "CHUNK_SIZE", 3)  # force several transactions
    queue = make_queue(connection, settings.keys)
    result = trigger(connection, settings.keys, queue, table, DAY, None, settings.retention_s)
    assert len(result.enqueued) == len(runs_on(table, DAY)) == queue.count


def test_racing_triggers_in_separate_processes_enqueue_each_run_once(node_env, connection, settings, table):
    args = [sys.executable, "scheduler.py", "trigger", "--date", DAY.isoformat()]
    racers = [subprocess.Popen(args, cwd=ROOT, env=node_env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=60)[0] for p in racers]
    assert all(p.returncode == 0 for p in racers), outputs
    enqueued = sum(int(out.split("enqueued ")[1].split()[0]) for out in outputs)
    expected = len(runs_on(table, DAY))
    assert enqueued == expected
    assert make_queue(connection, settings.keys).count == expected


def test_runs_are_enqueued_longest_expected_first_and_unknown_first_of_all(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["short", "new", "long", "mid"], at="09:00")])
    runs = runs_on(table, DAY)
    learned = {"short": 1.0, "long": 30.0, "mid": 5.0}  # what the guard records after a day
    connection.hset(settings.keys.durations, mapping={r.series_id: learned[r.param] for r in runs if r.param in learned})
    queue = make_queue(connection, settings.keys)
    fan_out(connection, settings.keys, queue, runs, retention_s=60)
    assert [job.args[0] for job in queue.jobs] == ["new", "long", "mid", "short"]


def test_a_fan_out_longer_than_the_lease_keeps_renewing_it(connection, settings, table, monkeypatch):
    import dailyq.fanout

    monkeypatch.setattr(dailyq.fanout, "CHUNK_SIZE", 2)
    lease = Lease(connection, settings.keys.leader, "leader", 300)
    assert lease.acquire_or_renew()
    slow_queue = make_queue(connection, settings.keys)
    original = slow_queue.enqueue_many

    def slow_enqueue_many(*args, **kwargs):  # each chunk takes longer than the lease TTL
        time.sleep(0.2)
        return original(*args, **kwargs)

    monkeypatch.setattr(slow_queue, "enqueue_many", slow_enqueue_many)
    result = fan_out(connection, settings.keys, slow_queue, runs_on(table, DAY), retention_s=60, fence=lease)
    assert len(result.enqueued) == len(runs_on(table, DAY))
    assert lease.holder() == "leader"

"""Fan-out: one job per run, idempotent across callers, fenced by the leader lease."""

import json
import subprocess
import sys
import threading
import time
import zlib
from datetime import date, timedelta
from typing import Callable

import pytest
from redis import Redis, WatchError
from redis.client import Pipeline

from dailyq.commands import trigger
from dailyq.errors import LeaseLost
from dailyq.fanout import FanOutOptions, fan_out, trim_durations
from dailyq.lease import Lease
from dailyq.rq_seam import RQKeys
from dailyq.runs import runs_on
from dailyq.table import Task, TaskTable
from dailyq.worker.workers import make_queue
from tests.support.helpers import ROOT
from tests.tables.sample_tasks import record

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
    assert job.func_name == "tests.tables.sample_tasks.record"
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
        fan_out(connection, settings.keys, queue, runs_on(table, DAY), FanOutOptions(60, fence=stale))
    assert queue.count == 0
    assert not connection.exists(settings.keys.day_enqueued(DAY))


def exec_calls(connection: Redis) -> int:
    """How many MULTI/EXEC transactions this test's redis-server has run so far."""
    return int(connection.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


def test_large_fan_out_is_chunked_and_complete(connection, settings, monkeypatch):
    import dailyq.fanout

    monkeypatch.setattr(dailyq.fanout, "CHUNK_SIZE", 3)  # force several transactions
    runs = runs_on(TaskTable([Task(name="t", func=record, params=list(range(10)), at="09:00")]), DAY)
    queue = make_queue(connection, settings.keys)
    before = exec_calls(connection)
    result = fan_out(connection, settings.keys, queue, runs, FanOutOptions(60))
    # One transaction per chunk of 3 (the fan-out makes no other): 10 runs are 4 chunks.
    assert exec_calls(connection) - before == 4
    assert sorted(result.enqueued) == sorted(run.job_id() for run in runs)
    assert queue.count == 10 and connection.scard(settings.keys.day_enqueued(DAY)) == 10


def test_a_job_hash_left_under_the_same_id_does_not_outlive_or_taint_the_new_job(connection, settings):
    # RQ keeps a finished job's hash for its result TTL; RQ's save is an HSET. A job id used
    # again meanwhile (another deployment's job of the same id, or a test of the same day
    # before this one on a shared server) kept the leftover's expiry and its fields: the
    # queued job's hash expired, and RQ dropped the job unseen (the run stayed queued).
    runs = runs_on(TaskTable([Task(name="t", func=record, params=[1, 2], at="09:00")]), DAY)
    leftover = RQKeys.job(runs[0].job_id())
    connection.hset(leftover, mapping={"status": "finished", "exc_info": "old", "ended_at": "2026-11-26T09:00:01Z"})
    connection.expire(leftover, 60)
    fan_out(connection, settings.keys, make_queue(connection, settings.keys), runs, FanOutOptions(60))
    assert connection.ttl(leftover) == -1  # no expiry: the job lives until it is run
    assert connection.hget(leftover, "status") == b"queued"
    assert not connection.hexists(leftover, "exc_info")
    assert connection.hget(leftover, "ended_at") != b"2026-11-26T09:00:01Z"


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
    connection.hset(settings.keys.durations,
                    mapping={r.series_id: learned[r.param] for r in runs if r.param in learned})
    queue = make_queue(connection, settings.keys)
    fan_out(connection, settings.keys, queue, runs, FanOutOptions(60))
    assert [job.args[0] for job in queue.jobs] == ["new", "long", "mid", "short"]


def test_a_fan_out_longer_than_the_lease_keeps_renewing_it(connection, settings, table, monkeypatch):
    import dailyq.fanout

    # One run per chunk, each chunk 0.5 s: the whole fan-out (9 runs, about 4.5 s) outlasts
    # the 2 s lease by 2.5 s, so without renewal between chunks it would lose the lease
    # seconds before its end; with renewal each chunk has 1.5 s to spare.
    runs = runs_on(table, DAY)
    assert len(runs) == 9
    monkeypatch.setattr(dailyq.fanout, "CHUNK_SIZE", 1)
    lease = Lease(connection, settings.keys.leader, "leader", 2000)
    assert lease.acquire_or_renew()
    slow_queue = make_queue(connection, settings.keys)
    original = slow_queue.enqueue_many

    def slow_enqueue_many(*args, **kwargs):
        time.sleep(0.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(slow_queue, "enqueue_many", slow_enqueue_many)
    started = time.monotonic()
    result = fan_out(connection, settings.keys, slow_queue, runs, FanOutOptions(60, fence=lease))
    assert time.monotonic() - started >= 4.0  # it did outlast the lease
    assert len(result.enqueued) == len(runs)
    assert lease.holder() == "leader"


# -- races inside the transaction window ------------------------------------------------------


def hook_transactions(client: Redis, before_exec: Callable[[Pipeline], None],
                      on_abort: Callable[[], None] = lambda: None) -> None:
    """Make ``client.pipeline()`` hand out pipelines that call ``before_exec`` right before
    sending a transaction (MULTI ... EXEC): after fan_out's WATCH and reads, at the last
    moment another writer could slip in; and ``on_abort`` when Redis refuses the EXEC
    because a watched key changed (WatchError)."""
    original = client.pipeline

    def pipeline(*args, **kwargs) -> Pipeline:
        pipe = original(*args, **kwargs)
        execute = pipe.execute

        def hooked_execute(raise_on_error: bool = True):
            if pipe.explicit_transaction:  # MULTI was called: this execute sends EXEC
                before_exec(pipe)
            try:
                return execute(raise_on_error)
            except WatchError:
                on_abort()
                raise

        pipe.execute = hooked_execute  # type: ignore[method-assign]
        return pipe

    client.pipeline = pipeline  # type: ignore[method-assign]


def test_fan_outs_whose_transactions_overlap_enqueue_each_run_once(connection, settings, table):
    """Four callers (a leader holding the lease, three triggers), each with its own
    connection, all past their WATCH and their read of the enqueued set when the first
    EXEC goes out: a barrier holds each one right before its first EXEC. Only the WATCH
    of the enqueued set keeps the other three from pushing every run again."""
    callers = 4
    runs = runs_on(table, DAY)
    barrier = threading.Barrier(callers, timeout=30)
    lease = Lease(connection, settings.keys.leader, "leader", 60_000)
    assert lease.acquire_or_renew()
    results: list[object] = [None] * callers
    aborted = [0] * callers  # EXECs refused because a watched key changed
    clients = [Redis.from_url(settings.redis_url) for _ in range(callers)]

    def caller(i: int) -> None:
        client = clients[i]
        first = [True]

        def meet_the_others(pipe: Pipeline) -> None:
            if first[0]:  # only the first EXEC: a retry after an abort goes alone
                first[0] = False
                barrier.wait()

        def count_abort() -> None:
            aborted[i] += 1

        hook_transactions(client, meet_the_others, count_abort)
        fence = Lease(client, settings.keys.leader, "leader", 60_000) if i == 0 else None
        try:
            results[i] = fan_out(client, settings.keys, make_queue(client, settings.keys), runs,
                                 FanOutOptions(60, fence=fence))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for client in clients:
        client.close()
    assert not barrier.broken and all(not t.is_alive() for t in threads), results
    assert all(not isinstance(r, Exception) for r in results), results
    # The transactions did overlap: every caller but the first to EXEC was aborted once.
    assert sum(aborted) == callers - 1, aborted

    expected = sorted(run.job_id() for run in runs)
    enqueued_by = [r.enqueued for r in results]  # type: ignore[union-attr]
    assert sorted(j for ids in enqueued_by for j in ids) == expected  # each run by exactly one caller
    assert sorted(len(ids) for ids in enqueued_by) == [0] * (callers - 1) + [len(runs)]
    queued = [raw.decode() for raw in connection.lrange(f"rq:queue:{settings.keys.queue_name}", 0, -1)]
    assert sorted(queued) == expected  # in the queue once each
    assert sorted(m.decode() for m in connection.smembers(settings.keys.day_enqueued(DAY))) == expected


def test_a_lease_taken_between_the_check_and_exec_aborts_the_fan_out(connection, settings, table):
    """The leader checked that it holds the lease (after WATCHing it) and queued the whole
    transaction; just before EXEC another node takes the lease. EXEC must be refused and
    the fan-out end in LeaseLost with nothing enqueued, not push the runs as a leader
    it no longer is."""
    client = Redis.from_url(settings.redis_url)
    lease = Lease(client, settings.keys.leader, "old-leader", 60_000)
    assert lease.acquire_or_renew()
    taken = []

    def take_the_lease(pipe: Pipeline) -> None:
        if not taken:
            # Another connection, as another node: a new leader after this one's lease lapsed.
            connection.set(settings.keys.leader, "new-leader", px=60_000)
            taken.append(True)

    hook_transactions(client, take_the_lease)
    queue = make_queue(client, settings.keys)
    try:
        with pytest.raises(LeaseLost):
            fan_out(client, settings.keys, queue, runs_on(table, DAY), FanOutOptions(60, fence=lease))
    finally:
        client.close()
    assert taken == [True]  # the lease changed hands inside the transaction window
    assert make_queue(connection, settings.keys).count == 0
    assert not connection.exists(settings.keys.day_enqueued(DAY))
    assert not connection.exists(settings.keys.day_runs(DAY))
    assert connection.get(settings.keys.leader) == b"new-leader"


def test_learned_durations_of_series_no_day_fanned_out_for_the_retention_period_are_forgotten(connection, settings):
    """The durations hash is kept across days; computed params that change daily would
    grow it forever. A series goes once no fan-out had it for the retention period."""
    keys = settings.keys
    queue = make_queue(connection, keys)
    old_day, new_day = date(2026, 11, 1), date(2026, 11, 20)
    table_of = lambda params: TaskTable(  # noqa: E731
        [Task(name="t", func="tests.tables.sample_tasks.noop", params=params, at="03:00")])
    fan_out(connection, keys, queue, runs_on(table_of(["gone", "kept"]), old_day), FanOutOptions(60))
    fan_out(connection, keys, queue, runs_on(table_of(["kept", "new"]), new_day), FanOutOptions(60))
    series = {run.param: run.series_id for run in runs_on(table_of(["gone", "kept", "new"]), new_day)}
    connection.hset(keys.durations, mapping={s: "1.000" for s in series.values()})  # as FINISH learns them
    assert trim_durations(connection, keys, new_day, retention_days=7) == 1
    assert set(connection.hkeys(keys.durations)) == {series["kept"].encode(), series["new"].encode()}
    assert trim_durations(connection, keys, new_day, retention_days=7) == 0


def test_durations_learned_before_series_were_noted_count_as_seen_at_the_first_trim(connection, settings):
    """An upgrade: a durations hash and no note of days yet. Nothing is dropped at once;
    each series counts from the first trim."""
    keys = settings.keys
    connection.hset(keys.durations, mapping={f"s{i}": "2.0" for i in range(2500)})
    assert trim_durations(connection, keys, DAY, retention_days=7) == 0
    assert connection.zcard(keys.durations_seen) == 2500
    assert trim_durations(connection, keys, DAY + timedelta(days=8), retention_days=7) == 2500
    assert not connection.exists(keys.durations, keys.durations_seen)

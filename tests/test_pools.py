"""Pools across tasks (``POOLS`` and ``Task(pool=...)``, limits.py): the table's checks
and descriptions (pure), the scripts' pool branches against the tests' own
redis-server, and real node processes sharing one pool. Concurrency is read from what
tests.sample_tasks.record logged (start and end of each execution, with its node)."""

from __future__ import annotations

import importlib
import os
import signal
import time
from datetime import date

import pytest
from redis import Redis

from dailyq import api
from dailyq.commands import trigger
from dailyq.errors import ConfigError
from dailyq.fingerprint import describe, diff, fingerprint
from dailyq.keys import Keys
from dailyq.ops.metrics import Collector
from dailyq.ops.render import render_pools
from dailyq.scripts import LimitedTask, Scripts
from dailyq.table import Task, TaskTable, load_table
from dailyq.worker.workers import make_queue
from tests.helpers import ProcessGroup, base_env, children_of, executions, quiet_sample_at, wait_for
from tests.sample_tasks import record
from tests.test_limits import all_done, most_at_once, spans, start_workers

DAY = date(2026, 11, 26)
FUNC = "tests.sample_tasks.record"
TTL_MS = 5000
HELD_TTL_S = 3600


# -- the table (pure) -------------------------------------------------------------------

def task(name: str = "t", **fields) -> Task:
    return Task(name=name, func=record, params=["a"], at="09:00", **fields)


def test_a_table_loads_its_pools_and_lists_each_pools_tasks():
    table = TaskTable([task("a", pool="w"), task("b"), task("c", pool="w", max_running=1)], {"w": 3, "unused": 1})
    assert table.pools == {"w": 3, "unused": 1}
    assert [t.name for t in table.pool_tasks("w")] == ["a", "c"]
    assert table.pool_tasks("unused") == []
    assert all(t.has_limits for t in table.pool_tasks("w"))  # a pool alone makes a run take a slot
    assert load_table("tests.pool_tasks").pools == {"warehouse": 2}
    assert load_table("tests.sample_tasks").pools == {}  # no POOLS: none


@pytest.mark.parametrize("tasks, pools, message", [
    ([task(pool="warehouse")], None, r"task 't': pool 'warehouse' is not in POOLS \(known: none\); define it"),
    ([task(pool="warehuose")], {"warehouse": 3}, r"pool 'warehuose' is not in POOLS \(known: warehouse\)"),
    ([task(pool=3)], {"3": 1}, "task 't': pool must be a name from POOLS or None, got 3"),
    ([task()], {"warehouse": 0}, r"POOLS\['warehouse'\] must be a positive integer"),
    ([task()], {"warehouse": "3"}, r"POOLS\['warehouse'\] must be a positive integer .* got '3'"),
    ([task()], {"warehouse": True}, r"POOLS\['warehouse'\] must be a positive integer"),
    ([task()], {"warehouse": 2.5}, r"POOLS\['warehouse'\] must be a positive integer"),
    ([task()], {"a warehouse": 1}, r"POOLS: pool name 'a warehouse' must match"),
    ([task()], [("warehouse", 3)], "POOLS must be a dict of pool name -> size"),
])
def test_a_bad_pool_is_one_error_naming_it(tasks, pools, message):
    with pytest.raises(ConfigError, match=message):
        TaskTable(tasks, pools)


def test_the_fingerprint_names_pool_membership_and_size():
    plain = TaskTable([task("a"), task("b")])
    pooled = TaskTable([task("a", pool="w"), task("b")], {"w": 2})
    resized = TaskTable([task("a", pool="w"), task("b")], {"w": 3})
    both = TaskTable([task("a", pool="w"), task("b", pool="w")], {"w": 2})
    prints = {fingerprint(describe(t)) for t in (plain, pooled, resized, both)}
    assert len(prints) == 4
    # A table without pools is described as before pools (no pool fields): its fingerprint
    # does not change with this version, and neither does an unused pool.
    assert "pool" not in describe(plain)["a"]
    assert fingerprint(describe(TaskTable([task("a"), task("b")], {"w": 2}))) == fingerprint(describe(plain))
    assert describe(pooled)["a"]["pool"] == "w" and describe(pooled)["a"]["pool_size"] == 2
    assert diff(describe(plain), describe(pooled))["other"] == {"a": ["pool", "pool_size"]}
    assert diff(describe(pooled), describe(resized))["other"] == {"a": ["pool_size"]}


def test_status_text_shows_each_pools_use():
    assert render_pools({"pools": {}}) == []
    assert render_pools({"pools": {"warehouse": {"size": 3, "running": 2, "set_aside": 5},
                                   "api": {"size": 1, "running": 0, "set_aside": 0}}}) == [
        "pools: api 0/1 running, 0 set aside; warehouse 2/3 running, 5 set aside"]


# -- the scripts (the tests' redis-server) ------------------------------------------------

def member(keys: Keys, name: str, size: int, max_running: int | None = None, pool: str | None = "w") -> LimitedTask:
    return LimitedTask(name, max_running, None, keys.limit_permits(name), keys.limit_permit_nodes(name), keys.set_aside(name),
                       keys.set_aside_index(name), pool, size if pool else 0)


def admit(scripts: Scripts, keys: Keys, task: LimitedTask, pool: list[LimitedTask], owner: str,
          ttl_ms: int = TTL_MS) -> str:
    return scripts.admit(paused_key=keys.paused, permits_key=task.permits_key, permit_nodes_key=task.permit_nodes_key,
                         set_aside_key=task.set_aside_key, set_aside_index_key=task.set_aside_index_key,
                         intermediate_queue_key=f"{keys.prefix}:q:intermediate", task=task.name, owner=owner,
                         node="n1", job_id=f"job-{owner}", ttl_ms=ttl_ms, max_running=task.max_running,
                         max_per_node=None, set_aside_ttl_s=HELD_TTL_S, pool_size=task.pool_size, pool=pool).run()


def release(scripts: Scripts, keys: Keys, task: LimitedTask, pool: list[LimitedTask], owner: str) -> list[str]:
    return scripts.release_permit(paused_key=keys.paused, permits_key=task.permits_key, permit_nodes_key=task.permit_nodes_key,
                                set_aside_key=task.set_aside_key, set_aside_index_key=task.set_aside_index_key,
                                queue_key=f"{keys.prefix}:q", task=task.name, owner=owner,
                                node="n1", max_running=task.max_running, max_per_node=None,
                                pool_size=task.pool_size, pool=pool).run()


def slots(connection: Redis, task: LimitedTask) -> set[str]:
    return {m.decode() for m in connection.zrange(task.permits_key, 0, -1)}


def held(connection: Redis, task: LimitedTask) -> list[str]:
    return [j.decode() for j in connection.lrange(task.set_aside_key, 0, -1)]


def indexed(connection: Redis, task: LimitedTask) -> set[str]:
    return {j.decode() for j in connection.smembers(task.set_aside_index_key)}


def test_a_run_needs_room_in_its_task_and_its_pool_and_a_refused_one_takes_nothing(scripts, connection, keys):
    a, b = member(keys, "a", 2, max_running=1), member(keys, "b", 2)
    pool = [a, b]
    assert admit(scripts, keys, a, pool, "a1") == "admitted"
    assert admit(scripts, keys, a, pool, "a2") == "set_aside"  # a's own limit; the pool had room
    assert admit(scripts, keys, b, pool, "b1") == "admitted"
    assert admit(scripts, keys, b, pool, "b2") == "set_aside"  # b has no limit; the pool is full
    assert slots(connection, a) == {"a1"} and slots(connection, b) == {"b1"}  # no permit taken by a refusal
    assert held(connection, a) == ["job-a2"] and held(connection, b) == ["job-b2"]
    outside = member(keys, "c", 0, max_running=5, pool=None)
    assert admit(scripts, keys, outside, [], "c1") == "admitted"  # a task outside the pool: not held up


def test_a_freed_slot_wakes_held_runs_of_the_pools_tasks_in_turn(scripts, connection, keys):
    a, b = member(keys, "a", 2), member(keys, "b", 2)
    pool = [a, b]
    for owner in ("a1", "a2"):
        assert admit(scripts, keys, a, pool, owner) == "admitted"
    for task, owner in ((a, "a3"), (b, "b1"), (b, "b2")):
        assert admit(scripts, keys, task, pool, owner) == "set_aside"
    assert release(scripts, keys, a, pool, "a1") == ["job-b1"]  # the task after a's comes first
    assert indexed(connection, b) == {"job-b2"}  # moved off b's list and its index, by a's release
    assert admit(scripts, keys, b, pool, "b1") == "admitted"
    assert release(scripts, keys, b, pool, "b1") == ["job-a3"]  # then a's again: no task waits behind another
    assert admit(scripts, keys, a, pool, "a3") == "admitted"
    connection.hset(keys.paused, "b", "{}")
    assert release(scripts, keys, a, pool, "a2") == []  # b paused, a has nothing held
    assert held(connection, b) == ["job-b2"]
    connection.hdel(keys.paused, "b")
    release(scripts, keys, a, pool, "a3")  # two free now, one set-aside run
    assert [j.decode() for j in connection.lrange(f"{keys.prefix}:q", 0, -1)] == ["job-b2", "job-a3", "job-b1"]
    assert slots(connection, a) == set() and slots(connection, b) == set()
    # Every set-aside list drained: nothing of them, list or index, stays behind.
    assert connection.exists(a.set_aside_key, a.set_aside_index_key, b.set_aside_key, b.set_aside_index_key) == 0


def test_a_dead_holders_slot_frees_the_pool_at_the_leaders_sweep(scripts, connection, keys):
    a, b = member(keys, "a", 1), member(keys, "b", 1)
    outside = member(keys, "c", 0, max_running=1, pool=None)
    pool = [a, b]
    # A TTL of 1 s, not less: the first sweep must come before it ends, on a loaded machine too
    # (with 50 ms it once came after, in a parallel run).
    assert admit(scripts, keys, a, pool, "dead", ttl_ms=1000) == "admitted"
    assert admit(scripts, keys, b, pool, "b1") == "set_aside"

    def sweep() -> list[str]:
        return scripts.sweep_permits(paused_key=keys.paused, queue_key=f"{keys.prefix}:q", nodes_key=keys.nodes,
                                   live_s=600, tasks=[a, outside, b]).run()

    assert sweep() == []
    time.sleep(1.1)  # a's holder died: its slot, and so its pool permit, lapses
    assert sweep() == ["job-b1"]
    assert slots(connection, a) == set()
    assert connection.exists(b.set_aside_key, b.set_aside_index_key) == 0  # the sweep's promote drained both


# -- real node processes ------------------------------------------------------------------

def pools_env(settings, **extra: str) -> dict[str, str]:
    return base_env(settings.redis_url, settings.prefix, DAILYQ_TASKS="tests.pool_tasks", POOL_AT=quiet_sample_at(),
                    **extra)


def enqueue(connection: Redis, settings, env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
            tasks: list[str]) -> TaskTable:
    # The table as the nodes load it (same environment), so run ids and pools agree.
    for name in ("POOL_SIZE", "POOL_PARAMS", "POOL_AT", "LOAD_MAX_RUNNING", "OTHER_PARAMS"):
        if name in env:
            monkeypatch.setenv(name, env[name])
        else:
            monkeypatch.delenv(name, raising=False)
    import tests.pool_tasks

    importlib.reload(tests.pool_tasks)
    table = load_table("tests.pool_tasks")
    trigger(connection, settings.keys, make_queue(connection, settings.keys), table, DAY, tasks, settings.retention_s)
    return table


def test_a_pool_of_two_shared_by_two_tasks_on_three_nodes(settings, processes: ProcessGroup, connection,
                                                          monkeypatch):
    # load also has max_running=1: its runs need both permits.
    env = pools_env(settings, POOL_SIZE="2", LOAD_MAX_RUNNING="1", SAMPLE_SLEEP_S="1.5")
    keys = settings.keys
    # No scheduler: set-aside runs must be woken by the releases alone (the leader's sweep is
    # for dead holders).
    start_workers(processes, env, ["n1", "n2", "n3"], 2, connection, keys)
    table = enqueue(connection, settings, env, monkeypatch, ["load", "export", "other"])

    def use() -> dict:
        return api.day_status(connection, DAY, settings=settings, table=table)["pools"]["warehouse"]

    wait_for(lambda: use()["running"] == 2 and use()["set_aside"] > 0, timeout=30,
             what="status to show the pool full with runs set aside")
    assert use()["size"] == 2
    metrics = Collector(connection, keys, table, lambda: False, cache_s=0)

    def gauge(name: str) -> float:
        (family,) = [f for f in metrics.collect() if f.name == name]
        return {s.labels["pool"]: s.value for s in family.samples}["warehouse"]

    wait_for(lambda: gauge("dailyq_pool_running") == 2.0, timeout=10, what="dailyq_pool_running to say 2")
    assert gauge("dailyq_pool_size") == 2.0
    prefix = settings.prefix
    wait_for(lambda: all(all_done(connection, prefix, 6, p) for p in ("W", "X", "O")), timeout=60,
             what="all 18 runs to finish")
    events = executions(connection, prefix)
    load, export, other = spans(events, "W"), spans(events, "X"), spans(events, "O")
    pooled = list(load.values()) + list(export.values())
    assert most_at_once([(s, e) for s, e, _ in pooled]) == 2
    assert most_at_once([(s, e) for s, e, _ in load.values()]) == 1  # load's own max_running too
    assert len({n for _, _, n in pooled}) > 1  # the pool spans the nodes, it does not pin them
    # The task outside the pool went on beside the pool's backlog, not behind it.
    assert max(s for s, _, _ in other.values()) < max(s for s, _, _ in pooled)
    # Neither task of the pool waited behind the other's backlog.
    assert min(s for s, _, _ in export.values()) < max(s for s, _, _ in load.values())
    assert min(s for s, _, _ in load.values()) < max(s for s, _, _ in export.values())
    # Each set-aside run started within 2 s of a pool's run ending (a permit freeing).
    ends = sorted(e for _, e, _ in pooled)
    for start in sorted(s for s, _, _ in pooled)[2:]:
        assert any(0 <= start - end <= 2.0 for end in ends), f"a set-aside run waited too long ({start}, {ends})"
    for name in ("load", "export"):
        assert connection.exists(keys.set_aside(name), keys.set_aside_index(name)) == 0  # drained: list and index gone
        assert connection.zcard(keys.limit_permits(name)) == 0  # every permit released
    assert use() == {"size": 2, "running": 0, "set_aside": 0}


def test_a_sigkilled_holders_permit_lapses_and_a_run_of_the_other_task_starts(settings, processes, connection,
                                                                             monkeypatch):
    env = pools_env(settings, POOL_SIZE="1", POOL_PARAMS="1", SAMPLE_SLEEP_S="30")
    keys = settings.keys
    processes.start("scheduler.py", dict(env, NODE_NAME="n1"))  # the leader's sweep frees lapsed slots
    workers = start_workers(processes, env, ["n1"], 2, connection, keys)
    enqueue(connection, settings, env, monkeypatch, ["load", "export"])

    def starts() -> list[dict]:
        return [e for e in executions(connection, settings.prefix) if e["event"] == "start"]

    def held_runs() -> int:
        return connection.llen(keys.set_aside("load")) + connection.llen(keys.set_aside("export"))

    wait_for(lambda: len(starts()) == 1 and held_runs() == 1, timeout=30,
             what="one run of the pool executing and the other held")
    first = starts()[0]
    horse = first["pid"]
    (holder,) = [w for w in workers if horse in children_of(w.pid)]
    # The worker and its work-horse (RQ puts the horse in a group of its own): nobody is
    # left to release the slot or renew it.
    os.killpg(holder.pid, signal.SIGKILL)
    os.kill(horse, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: len(starts()) == 2, timeout=25, what="the set-aside run to start")
    second = starts()[1]
    assert second["param"][0] != first["param"][0]  # the other task's run: the pool, not a task limit
    waited_s = second["t"] - killed_at
    # Claim TTL 6 s (base_env), renewed every second: the slot lapses 5 to 6 s after the
    # kill, and the leader's next tick (1 s) moves the set-aside run; slack for a loaded machine.
    assert 4.0 <= waited_s <= 12.0, waited_s
    # End the second run's work-horse now, so the teardown's warm stop does not wait 30 s.
    os.kill(second["pid"], signal.SIGKILL)

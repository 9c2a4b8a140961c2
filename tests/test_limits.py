"""Per-task limits (limits.py) with real node processes: ``max_running`` across nodes,
``max_per_node`` on each node, and a SIGKILLed holder whose slot frees when its claim
lapses. Concurrency is read from what tests.sample_tasks.record logged (start and end
of each execution, with its node)."""

from __future__ import annotations

import os
import signal
import time
from datetime import date

from redis import Redis

from dailyq.commands import trigger
from dailyq.keys import Keys
from dailyq.table import load_table
from dailyq.worker.workers import make_queue
from tests.helpers import ProcessGroup, base_env, children_of, executions, quiet_sample_at, wait_for

DAY = date(2026, 11, 26)


def limits_env(settings, **extra: str) -> dict[str, str]:
    # One quiet slot for every process of the test (the scheduler fires nothing by itself).
    quiet = quiet_sample_at()
    return base_env(settings.redis_url, settings.prefix, DAILYQ_TASKS="tests.limit_tasks", LIMIT_AT=quiet,
                    OTHER_AT=quiet, **extra)


def start_workers(processes: ProcessGroup, env: dict[str, str], nodes: list[str], per_node: int,
                  connection: Redis, keys: Keys) -> list:
    workers = [processes.start("worker_entry.py", dict(env, NODE_NAME=node)) for node in nodes
               for _ in range(per_node)]
    for node in nodes:
        wait_for(lambda node=node: connection.exists(keys.heartbeat("worker", node)), timeout=30,
                 what=f"{node}'s worker")
    return workers


def enqueue(connection: Redis, settings, env: dict[str, str], tasks: list[str]) -> None:
    # The table as the nodes load it (same environment), so run ids and limits agree.
    saved = {k: os.environ.get(k) for k in env if k.startswith(("LIMIT_", "OTHER_"))}
    os.environ.update({k: v for k, v in env.items() if k.startswith(("LIMIT_", "OTHER_"))})
    try:
        import importlib

        import tests.limit_tasks

        importlib.reload(tests.limit_tasks)
        table = load_table("tests.limit_tasks")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    trigger(connection, settings.keys, make_queue(connection, settings.keys), table, DAY, tasks, settings.retention_s)


def spans(events: list[dict], prefix: str) -> dict[str, tuple[float, float, str]]:
    """param -> (start, end, node) of each finished execution of params starting with ``prefix``."""
    starts = {e["param"]: (e["t"], e["node"]) for e in events
              if e["event"] == "start" and e["param"].startswith(prefix)}
    ends = {e["param"]: e["t"] for e in events if e["event"] == "end" and e["param"].startswith(prefix)}
    return {p: (t, ends[p], node) for p, (t, node) in starts.items() if p in ends}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    moments = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    live = worst = 0
    for _, step in moments:  # at equal times an end (-1) sorts first: touching is not overlapping
        live += step
        worst = max(worst, live)
    return worst


def all_done(connection: Redis, prefix: str, count: int, param_prefix: str) -> bool:
    return len(spans(executions(connection, prefix), param_prefix)) >= count


def test_max_running_holds_across_nodes_and_other_tasks_are_not_held_up(settings, processes, connection):
    env = limits_env(settings, LIMIT_MAX_RUNNING="2", SAMPLE_SLEEP_S="2")
    keys = settings.keys
    # No scheduler: the set-aside runs must be woken by the releases alone (the leader's sweep
    # is for dead holders).
    start_workers(processes, env, ["n1", "n2", "n3"], 2, connection, keys)
    enqueue(connection, settings, env, ["limited", "other"])
    wait_for(lambda: all_done(connection, settings.prefix, 6, "L") and all_done(connection, settings.prefix, 6, "O"),
             timeout=35, what="all 12 runs to finish")
    events = executions(connection, settings.prefix)
    limited, other = spans(events, "L"), spans(events, "O")
    assert most_at_once([(s, e) for s, e, _ in limited.values()]) == 2
    # The other task's runs went on beside the limited task's backlog, not behind it.
    assert max(s for s, _, _ in other.values()) < max(s for s, _, _ in limited.values())
    # Each set-aside run started within 2 s of a limited run ending (a slot freeing).
    ends = sorted(e for _, e, _ in limited.values())
    for start in sorted(s for s, _, _ in limited.values())[2:]:
        assert any(0 <= start - end <= 2.0 for end in ends), f"a set-aside run waited too long ({start}, {ends})"
    assert connection.exists(keys.set_aside("limited"), keys.set_aside_index("limited")) == 0  # drained: list and index gone
    assert connection.zcard(keys.limit_permits("limited")) == 0  # every slot released


def test_max_per_node_never_runs_two_on_one_node(settings, processes, connection):
    env = limits_env(settings, LIMIT_MAX_PER_NODE="1", LIMIT_PARAMS="4", SAMPLE_SLEEP_S="1.5")
    keys = settings.keys
    processes.start("scheduler.py", dict(env, NODE_NAME="n1"))  # its sweep counts room per live node
    start_workers(processes, env, ["n1", "n2"], 2, connection, keys)
    enqueue(connection, settings, env, ["limited"])
    wait_for(lambda: all_done(connection, settings.prefix, 4, "L"), timeout=35, what="the 4 limited runs to finish")
    limited = spans(executions(connection, settings.prefix), "L")
    for node in ("n1", "n2"):
        assert most_at_once([(s, e) for s, e, n in limited.values() if n == node]) <= 1, node
    assert {n for _, _, n in limited.values()} == {"n1", "n2"}  # the limit spread them, it did not serialize them


def test_a_sigkilled_holders_slot_frees_when_its_claim_lapses(settings, processes, connection):
    env = limits_env(settings, LIMIT_MAX_RUNNING="1", LIMIT_PARAMS="2", SAMPLE_SLEEP_S="30")
    keys = settings.keys
    processes.start("scheduler.py", dict(env, NODE_NAME="n1"))  # the leader's sweep frees lapsed slots
    workers = start_workers(processes, env, ["n1"], 2, connection, keys)
    enqueue(connection, settings, env, ["limited"])

    def starts() -> list[dict]:
        return [e for e in executions(connection, settings.prefix) if e["event"] == "start"]

    wait_for(lambda: len(starts()) == 1 and connection.llen(keys.set_aside("limited")) == 1, timeout=30,
             what="one run executing and the other held")
    horse = starts()[0]["pid"]
    (holder,) = [w for w in workers if horse in children_of(w.pid)]
    # The worker and its work-horse (RQ puts the horse in a group of its own): nobody is
    # left to release the slot or renew it.
    os.killpg(holder.pid, signal.SIGKILL)
    os.kill(horse, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: len(starts()) == 2, timeout=25, what="the set-aside run to start")
    waited_s = starts()[1]["t"] - killed_at
    # Claim TTL 6 s (base_env), renewed every second: the slot lapses 5 to 6 s after the
    # kill, and the leader's next tick (1 s) moves the set-aside run; slack for a loaded machine.
    assert 4.0 <= waited_s <= 12.0, waited_s
    # The second run sleeps 30 s: end its work-horse now, so that the teardown's warm stop
    # of its worker does not wait for it (15 s of suite time).
    os.kill(starts()[1]["pid"], signal.SIGKILL)

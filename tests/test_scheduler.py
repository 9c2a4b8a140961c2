"""Schedulers and workers as separate OS processes, one NODE_NAME each, against a
real redis-server: a slot fires once, work spreads over nodes, one leader at a time."""

import json
import signal
import time
from datetime import datetime, timedelta

import pytest

from dailyq.clock import utc_now
from dailyq.keys import Keys
from dailyq.scheduler import TICK_S
from tests.support.helpers import executions, max_concurrent_copies, run_cli, starts_per_param, wait_for

# How far ahead of a test's start its slot lies. What must happen before the slot
# (processes started, a leader elected, killed or paused) takes one to four seconds on an
# idle machine; the slot leaves ten seconds more for a loaded one, not a few hundred ms.
SETUP_S = 15


def slot_in(seconds: float) -> datetime:
    return (utc_now() + timedelta(seconds=seconds)).replace(microsecond=0)


def seconds_until(slot: datetime) -> float:
    return max(0.0, (slot - utc_now()).total_seconds())


def assert_before(slot: datetime, what: str) -> None:
    """The setup a test needs before its slot is done, and said so if it is not."""
    left = seconds_until(slot)
    assert left > 0, f"{what} took until after the slot ({slot.isoformat()}): this machine was too slow for the test"


def live_env(node_env: dict, slot: datetime, params: int, sleep_s: float) -> dict:
    return dict(node_env, SAMPLE_ONLY="1", SAMPLE_AT=slot.strftime("%H:%M:%S"), SAMPLE_TZ="UTC",
                SAMPLE_PARAMS=str(params), SAMPLE_SLEEP_S=str(sleep_s))


def status_of(env: dict, day: str) -> dict:
    result = run_cli(["status", "--date", day, "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def all_finished(env: dict, day: str) -> bool:
    runs = status_of(env, day)["runs"]
    return bool(runs) and all(r["state"] == "finished" for r in runs)


@pytest.mark.slow
def test_three_nodes_started_a_second_apart_run_every_run_once_over_several_nodes(node_env, processes, connection,
                                                                                    prefix):
    slot = slot_in(SETUP_S)
    env = live_env(node_env, slot, params=12, sleep_s=1.0)
    keys = Keys(prefix)
    for node in ("node-1", "node-2", "node-3"):
        processes.start("scheduler.py", dict(env, NODE_NAME=node))
        processes.start("worker_entry.py", dict(env, NODE_NAME=node))
        time.sleep(1)
    for node in ("node-1", "node-2", "node-3"):  # every node's worker is up before the slot
        wait_for(lambda node=node: connection.exists(keys.heartbeat("worker", node)), timeout=seconds_until(slot) + 30,
                 what=f"the worker of {node}")
    assert_before(slot, "starting three nodes")
    day = slot.date().isoformat()
    wait_for(lambda: all_finished(env, day), timeout=seconds_until(slot) + 60, what="all 12 runs finished")

    events = executions(connection, prefix)
    assert sorted(starts_per_param(events).values()) == [1] * 12
    assert max_concurrent_copies(events) == 1
    assert len({e["node"] for e in events}) >= 2
    assert min(e["t"] for e in events) >= slot.timestamp()  # nothing ran before its slot

    status = status_of(env, day)
    assert status["leader"] is not None and status["leader"]["node"] in {"node-1", "node-2", "node-3"}
    assert len(status["runs"]) == 12 and {r["state"] for r in status["runs"]} == {"finished"}
    assert len({r["node"] for r in status["runs"]}) >= 2


def test_two_schedulers_racing_for_one_slot_enqueue_it_once(node_env, processes, connection, prefix):
    slot = slot_in(SETUP_S / 2)
    env = live_env(node_env, slot, params=12, sleep_s=0.1)
    schedulers = [processes.start("scheduler.py", dict(env, NODE_NAME=f"racer-{i}")) for i in (1, 2)]
    day = slot.date()
    keys = Keys(prefix)
    for racer in ("racer-1", "racer-2"):  # both tick before the slot: they really race for it
        wait_for(lambda racer=racer: connection.exists(keys.heartbeat("scheduler", racer)),
                 timeout=seconds_until(slot) + 30, what=f"scheduler {racer}")
    assert_before(slot, "starting two schedulers")
    wait_for(lambda: connection.scard(keys.day_enqueued(day)) == 12, timeout=seconds_until(slot) + 30,
             what="the slot's fan-out")
    # Its log line follows the fan-out's transaction: wait for it, then for a second one's chance.
    wait_for(lambda: any("fanned out sample" in processes.log_of(p) for p in schedulers), timeout=10,
             what="the fan-out's log line")
    time.sleep(2)  # give a second fan-out every chance to happen
    assert connection.scard(keys.day_enqueued(day)) == 12
    assert connection.llen(f"rq:queue:{keys.queue_name}") == 12
    fanned = [line for p in schedulers for line in processes.log_of(p).splitlines() if "fanned out sample" in line]
    assert len(fanned) == 1 and "12 enqueued" in fanned[0], fanned

    processes.start("worker_entry.py", dict(env, NODE_NAME="worker"))
    wait_for(lambda: all_finished(env, day.isoformat()), timeout=30, what="runs finished")
    assert sorted(starts_per_param(executions(connection, prefix)).values()) == [1] * 12


def test_one_leader_at_a_time_and_sigterm_hands_over_at_once(node_env, processes, connection, prefix):
    env = live_env(node_env, slot_in(3600), params=1, sleep_s=0)
    keys = Keys(prefix)
    first = processes.start("scheduler.py", dict(env, NODE_NAME="first"))
    wait_for(lambda: connection.exists(keys.leader), timeout=15, what="a leader")
    second = processes.start("scheduler.py", dict(env, NODE_NAME="second"))
    time.sleep(2)
    assert json.loads(connection.get(keys.leader))["node"] == "first"

    first.send_signal(signal.SIGTERM)
    first.wait(timeout=15)
    assert "released the leader lease" in processes.log_of(first)
    started = time.monotonic()
    wait_for(lambda: (connection.get(keys.leader) or b"").find(b'"second"') >= 0, timeout=10, what="handover")
    # Released, not expired: the handover takes about one tick, well inside the 2 s TTL.
    assert time.monotonic() - started < 2
    # The "now the leader" line follows the lease's write, which the wait saw: wait for it rather than race it.
    wait_for(lambda: "now the leader" in processes.log_of(second), timeout=10,
             what="the new leader's log line")
    assert "now the leader" in processes.log_of(second)


def leader_node(connection, keys: Keys):
    raw = connection.get(keys.leader)
    return json.loads(raw)["node"] if raw else None


def leader_and_standby(processes, env, connection, keys: Keys, leader: str, standby: str):
    """Two schedulers, returned once the first leads and the second has ticked beside it
    (its first tick writes its heartbeat)."""
    first = processes.start("scheduler.py", dict(env, NODE_NAME=leader))
    wait_for(lambda: leader_node(connection, keys) == leader, timeout=15, what=f"{leader} to lead")
    second = processes.start("scheduler.py", dict(env, NODE_NAME=standby))
    wait_for(lambda: connection.exists(keys.heartbeat("scheduler", standby)), timeout=15, what=f"{standby} to tick")
    assert leader_node(connection, keys) == leader
    return first, second


@pytest.mark.slow
def test_a_killed_leader_is_replaced_and_the_next_slot_fires_once(node_env, processes, connection, prefix):
    keys = Keys(prefix)
    slot = slot_in(SETUP_S)
    env = live_env(node_env, slot, params=6, sleep_s=0.1)
    first, second = leader_and_standby(processes, env, connection, keys, "first", "second")
    first.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert_before(slot, "electing a leader, starting a standby and killing the leader")
    wait_for(lambda: leader_node(connection, keys) == "second", timeout=10, what="a new leader")
    # The documented bound (docs/failure-semantics.md, "The leader is SIGKILLed"): its lease
    # expires within the lease TTL of its last renewal, and the standby takes it on its next
    # tick; plus 0.5 s for the wait's poll and a tick that starts late on a loaded machine.
    assert time.monotonic() - killed_at <= int(env["DAILYQ_LEASE_TTL_S"]) + TICK_S + 0.5
    wait_for(lambda: connection.scard(keys.day_enqueued(slot.date())) == 6, timeout=seconds_until(slot) + 20,
             what="the slot to fire")
    wait_for(lambda: "fanned out sample" in processes.log_of(second), timeout=10,
             what="the fan-out's log line (it follows the transaction)")
    time.sleep(2)  # a second fan-out, if any, would come within a tick or two
    assert connection.llen(f"rq:queue:{keys.queue_name}") == 6
    assert sum("fanned out sample" in line for line in processes.log_of(second).splitlines()) == 1


@pytest.mark.slow
def test_a_paused_leader_enqueues_nothing_when_it_wakes(node_env, processes, connection, prefix):
    keys = Keys(prefix)
    slot = slot_in(SETUP_S)
    env = live_env(node_env, slot, params=6, sleep_s=0.1)
    old, new = leader_and_standby(processes, env, connection, keys, "old", "new")
    old.send_signal(signal.SIGSTOP)  # paused past its 2 s lease, across the slot
    try:
        assert_before(slot, "electing a leader, starting a standby and pausing the leader")
        wait_for(lambda: connection.scard(keys.day_enqueued(slot.date())) == 6, timeout=seconds_until(slot) + 30,
                 what="the new leader to fire the slot")
    finally:
        old.send_signal(signal.SIGCONT)
    # The old leader runs again: it finds the lease gone (and says so) instead of fanning out.
    wait_for(lambda: "lost the leader lease" in processes.log_of(old), timeout=30,
             what="the old leader to notice it lost the lease")
    time.sleep(2)  # and a tick or two more, in which it must not fan out either
    old_log = processes.log_of(old)
    assert "fanned out" not in old_log
    wait_for(lambda: "fanned out sample" in processes.log_of(new), timeout=10,
             what="the new leader's fan-out log line (it follows the transaction)")
    assert connection.llen(f"rq:queue:{keys.queue_name}") == 6
    assert leader_node(connection, keys) == "new"

"""Ownership from Redis to the task, with real processes: a node cut off from Redis and a
frozen worker stop their copy before another copy takes the run over, and the task
sees its run (day, slot, run id, attempt, fence) across backfills, retries and reruns.

Each copy of the ``progress`` sample task logs a tick every 0.1 s to a Redis the
proxy does not cut, so "two copies at the same moment" is measured, not inferred."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.support.helpers import (
    base_env,
    children_of,
    executions,
    longest_overlap,
    quiet_sample_at,
    run_cli,
    wait_for,
    wall_time_in,
)
from tests.support.tcp_proxy import TcpProxy

DAY = "2026-11-20"


def node_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    # Claim TTL 6 s (base_env): a copy that cannot confirm its claim stops after 4 s.
    return base_env(redis_url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_FUNC="progress",
                    SAMPLE_RETRIES="3", SAMPLE_AT=quiet_sample_at(), SAMPLE_LOG_URL=redis_url, **extra)


def events_of(connection, prefix: str, node: str | None = None) -> list[dict]:
    return [e for e in executions(connection, prefix) if node is None or e["node"] == node]


def first_event(connection, prefix: str, node: str, event: str = "start") -> dict | None:
    return next((e for e in events_of(connection, prefix, node) if e["event"] == event), None)


def run_record(env: dict, day: str = DAY) -> dict:
    result = run_cli(["status", "--date", day, "--json"], env)
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    return run


@pytest.mark.slow
def test_a_node_cut_off_from_redis_stops_its_copy_before_another_node_takes_the_run_over(
        redis_server, prefix, connection, processes):
    direct = node_env(redis_server.url, prefix, SAMPLE_SLEEP_S="11")
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        cut_off = dict(direct, REDIS_URL=proxy.url(), NODE_NAME="node-a")
        a_scheduler = processes.start("scheduler.py", cut_off)
        a_worker = processes.start("worker_entry.py", cut_off)
        processes.start("scheduler.py", dict(direct, NODE_NAME="node-b"))
        assert run_cli(["trigger", "--date", DAY], direct).returncode == 0
        wait_for(lambda: first_event(connection, prefix, "node-a") is not None, 30, "the run to start on node-a")
        b_worker = processes.start("worker_entry.py", dict(direct, NODE_NAME="node-b"))
        time.sleep(1.5)

        proxy.cut()
        cut_at = time.time()
        wait_for(lambda: first_event(connection, prefix, "node-b") is not None, 40, "node-b to take the run over")
        # Keep node-a cut off well past the claim TTL, while node-b runs the task.
        time.sleep(max(0.0, cut_at + 10 - time.time()))
        proxy.heal()
        wait_for(lambda: run_record(direct)["state"] == "finished", 60, "the run to finish", every=0.5)

        events = events_of(connection, prefix)
        a_events = [e for e in events if e["node"] == "node-a"]
        b_start = first_event(connection, prefix, "node-b")
        assert max(e["t"] for e in a_events) < b_start["t"], "node-a's copy worked after node-b's started"
        assert longest_overlap(events) == 0.0
        assert not [e for e in a_events if e["event"] == "end"]  # stopped, not finished
        run = run_record(direct)
        assert run["node"] == "node-b" and run["attempts"] == 2
        worker_log = processes.log_of(a_worker)
        assert "stopping this work-horse: could not confirm its claim" in worker_log, worker_log

        # Healed, node-a's processes are alive and work: its worker alone runs the next day.
        assert a_scheduler.poll() is None and a_worker.poll() is None
        b_worker.send_signal(signal.SIGTERM)  # warm shutdown
        b_worker.wait(timeout=40)
        assert run_cli(["trigger", "--date", "2026-11-21"], direct).returncode == 0
        wait_for(lambda: run_record(direct, "2026-11-21")["state"] == "finished", 60,
                 "node-a to run the next day after the cut healed", every=0.5)
        assert run_record(direct, "2026-11-21")["node"] == "node-a"


@pytest.mark.slow
def test_a_frozen_worker_stops_its_copy_on_resuming_and_records_nothing(redis_server, prefix, connection,
                                                                        processes):
    env = node_env(redis_server.url, prefix, SAMPLE_SLEEP_S="11")
    processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    frozen_worker = processes.start("worker_entry.py", dict(env, NODE_NAME="node-a"))
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0
    wait_for(lambda: first_event(connection, prefix, "node-a") is not None, 30, "the run to start on node-a")
    processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))
    processes.start("scheduler.py", dict(env, NODE_NAME="node-b"))
    horse = first_event(connection, prefix, "node-a")["pid"]
    time.sleep(1.0)

    for pid in (frozen_worker.pid, horse):  # a VM pause: the worker and its work-horse
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: first_event(connection, prefix, "node-b") is not None, 40, "node-b to take the run over")
        time.sleep(2)
    finally:
        for pid in (horse, frozen_worker.pid):
            os.kill(pid, signal.SIGCONT)
    resumed_at = time.time()
    wait_for(lambda: run_record(env)["state"] == "finished", 60, "the run to finish", every=0.5)

    events = events_of(connection, prefix)
    a_events = [e for e in events if e["node"] == "node-a"]
    assert max(e["t"] for e in a_events) < resumed_at + 2, "the resumed copy went on for more than 2 s"
    assert not [e for e in a_events if e["event"] == "end"]
    assert longest_overlap(events) <= 2.0
    run = run_record(env)
    assert run["state"] == "finished" and run["node"] == "node-b" and run["attempts"] == 2
    time.sleep(1)
    assert run_record(env) == run  # nothing recorded by the resumed copy afterwards
    assert frozen_worker.poll() is None
    assert "stopping this work-horse" in processes.log_of(frozen_worker)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_task_holding_the_gil_is_killed_by_its_worker_before_another_copy_starts(redis_server, prefix,
                                                                                   connection, processes):
    # The first attempt holds the GIL in one regular-expression call for 20 s or more (60 s
    # on a busy machine), far past the claim TTL (6 s): its work-horse can neither renew its claim nor stop itself.
    # Later attempts tick for 1 s, so that the run can finish.
    env = dict(node_env(redis_server.url, prefix, SAMPLE_SLEEP_S="1"), SAMPLE_FUNC="hold_gil", SAMPLE_GIL_N="42")
    a_worker = processes.start("worker_entry.py", dict(env, NODE_NAME="node-a"))
    processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0
    wait_for(lambda: first_event(connection, prefix, "node-a") is not None, 30, "the run to start on node-a")
    horse = first_event(connection, prefix, "node-a")["pid"]
    try:
        assert horse in children_of(a_worker.pid)  # the work-horse, in the GIL-holding call now
        processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))
        processes.start("scheduler.py", dict(env, NODE_NAME="node-b"))
        # When the first copy's process ended, read from /proc (every 20 ms: an upper bound).
        gone_at = None
        watch_until = time.monotonic() + 90
        while gone_at is None and time.monotonic() < watch_until:
            if not alive(horse):
                gone_at = time.time()
            time.sleep(0.02)
        wait_for(lambda: run_record(env)["state"] == "finished", 60, "the run to finish", every=0.5)
    finally:
        try:
            os.kill(horse, signal.SIGKILL)  # in its own process group: teardown would miss it
        except ProcessLookupError:
            pass

    events = events_of(connection, prefix)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2, events
    first, second = starts
    if gone_at is not None:
        print(f"GIL-holding copy: process gone {gone_at - first['t']:.1f}s after its start; "
              f"second copy started {second['t'] - gone_at:.1f}s after that")
    assert first["pid"] == horse and second["pid"] != horse
    assert gone_at is not None and gone_at < second["t"], (
        f"the second copy started {(gone_at or time.time()) - second['t']:.1f}s before the first one's "
        "process ended")
    # Killed inside its C call: it never got past it, and recorded nothing.
    assert [e["event"] for e in events if e["pid"] == horse] == ["start"]
    assert second["context"]["attempt"] == 2 and second["context"]["fence"] > first["context"]["fence"]
    run = run_record(env)
    assert run["state"] == "finished" and run["attempts"] == 2
    assert f"killing its work-horse (pid {horse})" in processes.log_of(a_worker)
    assert a_worker.poll() is None  # the worker itself goes on
    time.sleep(1)
    assert run_record(env) == run


def contexts(connection, prefix: str) -> list[dict]:
    return [e["context"] for e in executions(connection, prefix) if e["event"] == "start"]


@pytest.mark.parametrize("worker_args", [(), ("--simple",)], ids=["forking", "non-forking"])
def test_the_run_context_across_a_backfill_a_retry_and_a_forced_rerun(redis_server, prefix, connection, processes,
                                                                      worker_args):
    # The slot 12 h from now in Shanghai: the live leader fires no run of today by itself
    # (a fixed 07:30 did, from 23:30 UTC, in its misfire grace), so every context is the backfill's.
    at = wall_time_in("Asia/Shanghai", 12 * 3600)[:5]
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_FUNC="fail_first",
                   SAMPLE_RETRIES="1", SAMPLE_BACKOFF_S="1", SAMPLE_AT=at, SAMPLE_TZ="Asia/Shanghai",
                   NODE_NAME="node-a")
    processes.start("scheduler.py", env)  # the leader moves the retry back when its backoff passed
    processes.start("worker_entry.py", env, *worker_args)
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0
    wait_for(lambda: run_record(env)["state"] == "finished", 40, "the backfill to finish after its retry")
    run_id = run_record(env)["run_id"]

    first, retry = contexts(connection, prefix)
    for context in (first, retry):  # a backfill: the day asked for, not today
        assert context["day"] == DAY and context["task"] == "sample" and context["param"] == "任务参数0"
        assert context["slot"] == f"{DAY}T{at}:00+08:00" and context["slot_tz"] == "Asia/Shanghai"
        assert context["run_id"] == run_id and context["node"] == "node-a"
    assert (first["attempt"], retry["attempt"]) == (1, 2)
    assert retry["fence"] > first["fence"] >= 1

    forced = run_cli(["rerun", "sample", "--date", DAY, "--force"], env)
    assert forced.returncode == 0, forced.stderr
    wait_for(lambda: len(contexts(connection, prefix)) == 4, 40, "the forced rerun to run and retry")
    wait_for(lambda: run_record(env)["state"] == "finished", 40, "the forced rerun to finish")
    rerun_first, rerun_retry = contexts(connection, prefix)[2:]
    # A forced rerun is a new run: its own run id, attempts from 1, fences still growing.
    assert rerun_first["run_id"] == rerun_retry["run_id"] == f"{run_id}-r1"
    assert (rerun_first["attempt"], rerun_retry["attempt"]) == (1, 2)
    assert rerun_retry["fence"] > rerun_first["fence"] > retry["fence"]
    assert rerun_first["day"] == DAY
    assert run_record(env)["attempts"] == 4  # status counts every execution of the day's run

"""eta.py, pure: the day's expected end from fixed runs, durations, workers and ``now``."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from dailyq.alerts.events import (
    PAYLOAD_KEYS,
    PREDICTED_LATE_MARGIN_S,
    encode_payload,
    predicted_day_late_alert,
    predicted_late,
)
from dailyq.keys import Keys
from dailyq.ops.eta import (
    EtaRun,
    EtaTask,
    _expected_durations,
    _Simulation,
    estimate,
    eta_runs,
    nothing_pending,
    pending_series,
    series_id,
    waits_for_a_worker,
)
from dailyq.ops.render import render_eta
from dailyq.ops.report import render_report
from dailyq.ops.watch import progress, render_line
from dailyq.redis_server import free_port
from dailyq.table import Task, TaskTable
from tests.ops.test_metrics import scrape
from tests.support.helpers import executions, noon_zone, quiet_sample_at, run_cli, today_in, wait_for, wall_time_in
from tests.support.webhook_receiver import WebhookReceiver

NOW = datetime(2026, 12, 2, 6, 0, 0, tzinfo=timezone.utc)


def queued(task: str, name: str, **extra) -> EtaRun:
    return EtaRun(task, name, extra.pop("state", "queued"), **extra)


def after_s(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_queued_runs_are_taken_longest_first_by_each_free_worker():
    runs = [queued("a", f"a{i}") for i in range(4)]
    durations = {"a0": 10.0, "a1": 20.0, "a2": 30.0, "a3": 40.0}
    # Two workers, longest first: 40 | 30, then 20 at 30 s, then 10 at 40 s: both end at 50 s.
    assert estimate(runs, durations, 2, NOW).at == after_s(50)
    assert estimate(runs, durations, 1, NOW).at == after_s(100)
    # More workers than runs: the longest run is the day.
    assert estimate(runs, durations, 8, NOW).at == after_s(40)


def test_running_runs_hold_their_worker_until_start_plus_expected_duration():
    runs = [EtaRun("a", "long", "running", started_at=NOW - timedelta(seconds=30)), queued("a", "short")]
    estimate_ = estimate(runs, {"long": 100.0, "short": 10.0}, 2, NOW)
    assert estimate_.at == after_s(70) and estimate_.task_ends == {"a": after_s(70)}
    # One worker: the short run waits for the long one to end.
    assert estimate(runs, {"long": 100.0, "short": 10.0}, 1, NOW).at == after_s(80)
    # Overdue (past its expected end): it may end any moment.
    overdue = EtaRun("a", "long", "running", started_at=NOW - timedelta(seconds=500))
    assert estimate([overdue], {"long": 100.0}, 1, NOW).at == NOW


def test_a_run_never_timed_counts_as_its_tasks_mean_then_the_days():
    runs = [queued("a", "known"), queued("a", "new"), queued("b", "new-b"),
            EtaRun("a", "done", "finished", duration_s=30.0)]
    est = estimate(runs, {"known": 10.0}, 1, NOW)
    # a: known 10, done 30 -> new counts 20; b knows nothing -> the day's mean, 20.
    assert est.at == after_s(10 + 20 + 20)


def test_scheduled_runs_start_no_sooner_than_their_slot():
    later = EtaRun("a", "x", "scheduled", slot=after_s(3600))
    assert estimate([later, queued("a", "y")], {"x": 60.0, "y": 10.0}, 5, NOW).at == after_s(3660)


def test_earlier_slots_queue_first_whatever_their_length():
    # A slot's runs are queued before a later slot's: on one worker the short early run
    # goes before the long later one, which then ends last.
    early = queued("a", "short", slot=NOW - timedelta(hours=2))
    late = queued("b", "long", slot=NOW - timedelta(hours=1))
    est = estimate([late, early], {"short": 10.0, "long": 100.0}, 1, NOW)
    assert est.task_ends == {"b": after_s(110), "a": after_s(10)}


def test_waiting_runs_join_the_queue_when_their_upstream_tasks_have_ended():
    tasks = {"down": EtaTask(after=("up",))}
    runs = [queued("up", "u1"), queued("up", "u2"), EtaRun("down", "d", "waiting")]
    est = estimate(runs, {"u1": 30.0, "u2": 10.0, "d": 5.0}, 4, NOW, tasks)
    # Plenty of workers, but down starts only when the last up run ends (30 s).
    assert est.task_ends == {"up": after_s(30), "down": after_s(35)}
    # Without the dependency it would start at once.
    assert estimate(runs, {"u1": 30.0, "u2": 10.0, "d": 5.0}, 4, NOW).task_ends["down"] == after_s(5)


def test_max_running_sets_runs_aside_until_a_run_of_the_task_ends():
    tasks = {"limited": EtaTask(max_running=1)}
    runs = [queued("limited", f"l{i}") for i in range(3)] + [queued("free", "f")]
    est = estimate(runs, {"l0": 10.0, "l1": 10.0, "l2": 10.0, "f": 5.0}, 4, NOW, tasks)
    assert est.task_ends == {"limited": after_s(30), "free": after_s(5)}


def test_the_in_order_shortcut_gives_the_event_loops_ends_on_random_days():
    # _Simulation._in_order replaces the event loop when no limit applies and nothing
    # waits: on random days of running, queued and scheduled runs (ties in durations and
    # slots included, learned and not) both give every run the same end.
    rng = random.Random(20261203)
    for _ in range(300):
        runs, durations = [], {}
        for i in range(rng.randint(1, 40)):
            task = rng.choice(("a", "b", "c"))
            state = rng.choice(("queued", "queued", "scheduled", "running"))
            extra = {}
            if state == "scheduled":
                extra["slot"] = after_s(rng.choice((-30, 0, 5, 5, 60, 600)))
            if state == "running":
                extra["started_at"] = after_s(-rng.choice((0, 3, 40, 900)))
            if rng.random() < 0.8:
                durations[f"s{i}"] = float(rng.choice((1, 1, 2.5, 7, 30, 120)))
            runs.append(queued(task, f"s{i}", state=state, **extra))
        if not durations:
            durations["s0"] = 1.0
        workers = rng.randint(1, 6)
        expected = _expected_durations(runs, runs, durations)
        assert expected is not None
        both = []
        for shortcut in (True, False):
            simulation = _Simulation(NOW, max(workers, sum(r.state == "running" for r in runs)), {}, expected,
                                     set(durations), {})
            both.append(sorted((run.series, end) for run, end in simulation.run(runs, shortcut=shortcut)))
        assert both[0] == both[1]


def test_a_limit_or_a_waiting_run_keeps_the_event_loop():
    # What the shortcut cannot do: a run set aside by max_running, one released by its upstream.
    limited = estimate([queued("a", "x"), queued("a", "y")], {"x": 10.0, "y": 10.0}, 2, NOW,
                       {"a": EtaTask(max_running=1)})
    assert limited.at == after_s(20)
    after = estimate([queued("up", "u"), EtaRun("down", "d", "waiting")], {"u": 10.0, "d": 5.0}, 2, NOW,
                     {"down": EtaTask(after=("up",))})
    assert after.at == after_s(15)


def test_unknown_when_nothing_is_learned_no_worker_lives_or_a_task_is_paused():
    assert estimate([queued("a", "x")], {}, 2, NOW).at is None
    assert "no duration learned" in (estimate([queued("a", "x")], {}, 2, NOW).why or "")
    no_worker = estimate([queued("a", "x")], {"x": 1.0}, 0, NOW)
    assert no_worker.at is None and no_worker.why == "no live worker"
    tasks = {"down": EtaTask(after=("a",))}
    paused = estimate([queued("a", "x", state="paused"), EtaRun("down", "d", "waiting"), queued("c", "c")],
                      {"x": 1.0, "d": 1.0, "c": 1.0}, 2, NOW, tasks)
    assert paused.at is None and paused.task_ends == {"a": None, "down": None, "c": after_s(1)}


def test_a_run_waiting_for_a_worker_with_none_live_is_unknown_whatever_the_durations():
    # status skips the estimate when waits_for_a_worker says so: it must be unknown then.
    entries = [[{"task": "a", "state": state, "run_id": "a-x", "slot": "2026-12-02T03:00:00+00:00",
                 "started_at": "2026-12-02T05:59:00+00:00", "duration_s": 2.0}
                for state in states]
               for states in (["queued"], ["scheduled", "finished"], ["running"], ["running", "waiting"],
                              ["paused"], ["finished", "failed"], [], [None])]
    for runs in entries:
        for durations in ({}, {"a-x": 1.0}):
            est = estimate(eta_runs(runs), durations, 0, NOW)
            if waits_for_a_worker(runs):
                assert est.at is None and not est.done, runs
            else:
                assert all(run["state"] not in ("queued", "scheduled", "waiting", "paused") for run in runs)
    assert [waits_for_a_worker(runs) for runs in entries] == [True, True, False, True, True, False, False, False]


def test_done_when_nothing_is_pending():
    est = estimate([EtaRun("a", "x", "finished", duration_s=3.0), EtaRun("a", "y", "failed"),
                    EtaRun("a", "z", "blocked"), EtaRun("a", "w", "missed")], {"x": 3.0}, 2, NOW)
    assert est.done and est.at is None
    # status skips the estimate when nothing_pending says so: it must be done then.
    for states in (["finished", "failed", "blocked", "missed", "skipped", "cancelled"], [], ["finished", "queued"],
                   ["running"], ["waiting"], ["paused"], ["scheduled"]):
        entries = [{"task": "a", "state": state, "run_id": f"a-{i}", "slot": "2026-12-02T03:00:00+00:00",
                    "started_at": "2026-12-02T05:59:00+00:00", "duration_s": 2.0} for i, state in enumerate(states)]
        assert nothing_pending(entries) == estimate(eta_runs(entries), {"a-0": 1.0}, 2, NOW).done, states
    assert nothing_pending([{"state": "finished"}]) and not nothing_pending([{"state": "queued"}])


def test_status_entries_become_runs_under_the_guards_series_ids():
    entries = [{"task": "t", "param": {"k": 1}, "state": "running", "started_at": "2026-12-02T05:59:00+00:00",
                "slot": "2026-12-02T03:00:00+00:00", "duration_s": None},
               {"task": "t", "param": 2, "state": "finished", "started_at": None, "slot": "2026-12-02T03:00:00+00:00",
                "duration_s": 4.5}]
    running, finished = eta_runs(entries)
    assert running.series == series_id("t", {"k": 1})
    assert running.started_at == NOW - timedelta(seconds=59.5)  # in the middle of the stored second
    assert finished.duration_s == 4.5 and finished.started_at is None
    assert pending_series([running, finished]) == [running.series]


def test_status_text_and_the_watch_line_show_it():
    run = {"task": "t", "param": 1, "state": "queued", "node": None, "started_at": None, "ended_at": None,
           "attempts": 0, "error": None, "run_id": "t-1", "slot": "2026-12-02T03:00:00+00:00", "job_id": None,
           "duration_s": None}
    status = {"date": "2026-12-02", "leader": None, "runs": [run], "generated_at": NOW.isoformat(),
              "eta": after_s(192).isoformat()}
    assert render_eta(status) == [f"eta: {after_s(192).isoformat()} (in 3m12s)"]
    assert "ETA 3m12s (at 06:03:12) on 1 node" in render_line(progress(status, {}, NOW))
    unknown = dict(status, eta=None)
    assert render_eta(unknown)[0].startswith("eta: unknown")
    assert "ETA ? on 1 node" in render_line(progress(unknown, {}, NOW))
    assert render_eta(dict(status, runs=[dict(run, state="finished")])) == []  # all done: no line


def test_the_timeline_page_shows_it():
    run = {"task": "t", "param": 1, "state": "running", "node": "n1", "started_at": NOW.isoformat(), "ended_at": None,
           "attempts": 1, "error": None, "run_id": "t-1", "slot": "2026-12-02T03:00:00+00:00", "job_id": None,
           "duration_s": None}
    status = {"date": "2026-12-02", "leader": None, "runs": [run], "generated_at": NOW.isoformat(),
              "eta": after_s(60).isoformat()}
    page = render_report(status, live=True)
    assert f'<p class="eta">eta: {after_s(60).isoformat()} (in 1m00s)</p>' in page
    assert '<p class="eta">' not in render_report(dict(status, runs=[dict(run, state="finished")]), live=True)


# --- with real processes ------------------------------------------------------------------

DAY_ONE, DAY_TWO = "2024-06-03", "2024-06-04"  # long past: only what the test triggers runs


def uneven_sleeps(n: int) -> list[float]:
    """2-4 s, uneven, the same every time (a fixed seed). Not shorter: what a worker
    spends per run around the task (dequeue, fork, BEGIN, FINISH) is not in the learned
    durations, and a loaded machine multiplies it; runs this long keep it a few per cent
    of the day, so the 20 % judges the estimate, not the machine."""
    rng = random.Random(22)
    return [round(rng.uniform(2.0, 4.0), 2) for _ in range(n)]


def worker_cost_per_run_s(events: list[dict], workers: int) -> float:
    """The workers' time not spent in the task, per run (from the task's own log)."""
    starts = [e["t"] for e in events if e["event"] == "start"]
    ends = [e["t"] for e in events if e["event"] == "end"]
    return (workers * (max(ends) - min(starts)) - (sum(ends) - sum(starts))) / max(1, len(starts))


@pytest.mark.slow
def test_eta_is_within_20_percent_of_the_actual_end_on_a_learned_day(node_env, processes, connection, prefix):
    """Day one teaches the durations; on day two, once its first run ended, the ETA of
    ``status --json`` must be within 20 % of the time that was left of when the last run
    really ended, early or late. 2 workers, 8 runs whose own sleeps (2-4 s) make the day."""
    sleeps = uneven_sleeps(8)
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="uneven", SAMPLE_PARAMS=str(len(sleeps)),
               SAMPLE_SLEEPS=",".join(map(str, sleeps)), SAMPLE_AT=quiet_sample_at(), NODE_NAME="node-1")
    processes.start("worker_entry.py", env, "--concurrency", "2")
    for day in (DAY_ONE, DAY_TWO):
        assert run_cli(["trigger", "--date", day], env).returncode == 0
        if day == DAY_ONE:
            wait_for(lambda: len(finished(connection, prefix, DAY_ONE)) == len(sleeps), timeout=90,
                     what="day one to finish")
            connection.delete(f"{prefix}:test:executions")
    wait_for(lambda: len(finished(connection, prefix, DAY_TWO)) >= 1, timeout=60, what="day two's first run")
    before = time.time()
    status = json.loads(run_cli(["status", "--date", DAY_TWO, "--json"], env).stdout)
    after = time.time()
    assert status["eta"] is not None, status
    generated = datetime.fromisoformat(status["generated_at"]).timestamp()  # to the second
    measured = (max(before, generated) + min(after, generated + 1)) / 2
    eta = datetime.fromisoformat(status["eta"]).timestamp()
    wait_for(lambda: len(finished(connection, prefix, DAY_TWO)) == len(sleeps), timeout=90,
             what="day two to finish")
    actual_end = max(e["t"] for e in executions(connection, prefix) if e["event"] == "end")
    left_s = actual_end - measured
    assert left_s > 2.0, "too little of the day was left to judge the estimate"
    error_s = eta - actual_end
    assert abs(error_s) <= 0.2 * left_s, (
        f"ETA {eta - measured:+.2f}s from the reading, the day ended {left_s:.2f}s after it "
        f"(error {100 * error_s / left_s:+.0f}%; the workers' own cost per run, not in the learned "
        f"durations, was {worker_cost_per_run_s(executions(connection, prefix), 2):.3f}s here)")
    # Done: nothing pending, no estimate.
    assert json.loads(run_cli(["status", "--date", DAY_TWO, "--json"], env).stdout)["eta"] is None


def finished(connection, prefix: str, day: str) -> list[str]:
    raw = connection.hvals(Keys(prefix).day_runs(date.fromisoformat(day)))
    return [r for r in raw if json.loads(r)["state"] == "finished"]


def test_a_day_expected_to_end_past_its_deadline_is_alerted_once_before_it(node_env, processes, connection,
                                                                           prefix):
    """The run is known to take 15 min (its learned duration); its deadline is 60 s after
    it starts: the ETA passes the deadline by more than 5 min, so two schedulers raise
    one ``day_late`` with ``predicted: true``, before the deadline. ``status --json`` and
    ``/metrics`` show that ETA."""
    receiver = WebhookReceiver().start()
    try:
        zone = noon_zone()
        deadline_ts = int(time.time()) + 60
        deadline = wall_time_in(zone, deadline_ts - time.time())
        env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="record", SAMPLE_SLEEP_S="60", SAMPLE_PARAMS="1",
                   SAMPLE_TZ=zone, SAMPLE_AT=wall_time_in(zone, 3), SAMPLE_DEADLINE=deadline,
                   DAILYQ_ALERT_URL=receiver.url, DAILYQ_ALERT_RETRY_S="1", DAILYQ_ALERT_RETRY_MAX_S="2")
        day = today_in(zone)
        connection.hset(Keys(prefix).durations, series_id("sample", "任务参数0"), "900.000")  # what a day taught
        port = free_port()
        processes.start("scheduler.py", dict(env, NODE_NAME="node-1", DAILYQ_METRICS_PORT=str(port)))
        processes.start("scheduler.py", dict(env, NODE_NAME="node-2"))
        worker = processes.start("worker_entry.py", dict(env, NODE_NAME="node-1"))
        wait_for(lambda: receiver.events("day_late"), timeout=45, what="the predicted day_late")
        time.sleep(5)  # a duplicate from the other scheduler, or from the next pass, would come by now
        assert [a["event"] for a in receiver.received] == ["day_late"], receiver.received
        alert = receiver.received[0]
        assert receiver.times[0] < deadline_ts  # before the deadline
        assert list(alert) == list(PAYLOAD_KEYS) and alert["predicted"] is True
        assert alert["task"] == "sample" and alert["day"] == day and alert["run_id"] is None
        assert f"sample is expected to be late for {day}" in alert["text"]
        assert f"after its deadline {deadline}" in alert["text"]
        assert receiver.headers[0]["X-Dailyq-Alert-Id"] == f"day_late:sample:{day}:predicted"
        status = json.loads(run_cli(["status", "--date", day, "--json"], env).stdout)
        eta = datetime.fromisoformat(status["eta"]).timestamp()
        (run,) = status["runs"]
        started = datetime.fromisoformat(run["started_at"]).timestamp()
        assert started + 900 <= eta <= started + 901  # its start (mid-second) plus what it takes
        # /metrics: the same estimate (cached for up to 5 s, so the run's own read of it).
        assert abs(scrape(port)["dailyq_day_eta_timestamp_seconds"][()] - eta) < 0.01
        os.killpg(worker.pid, signal.SIGKILL)  # rather than waiting out the 60 s run at teardown
    finally:
        receiver.stop()


def test_a_day_late_is_predicted_only_past_the_margin_and_before_the_deadline():
    deadline = after_s(600)
    assert predicted_late(deadline, deadline + timedelta(seconds=PREDICTED_LATE_MARGIN_S + 1), NOW)
    assert not predicted_late(deadline, deadline + timedelta(seconds=PREDICTED_LATE_MARGIN_S), NOW)
    assert not predicted_late(deadline, None, NOW)  # unknown: nothing to say
    assert not predicted_late(NOW, NOW + timedelta(hours=1), NOW)  # the deadline came: the real day_late's turn
    task = Task(name="t", func="tests.tables.sample_tasks.record", params=[1], at="05:00", tz="UTC", deadline="06:10")
    TaskTable([task])  # validates, and parses the schedule
    alert = predicted_day_late_alert(task, NOW.date(), deadline, deadline + timedelta(minutes=12), NOW)
    assert alert.alert_id == "day_late:t:2026-12-02:predicted" and alert.payload["predicted"] is True
    assert alert.payload["text"] == ("dailyq: t is expected to be late for 2026-12-02: its runs are expected to end "
                                     "at 06:22:00 UTC, 12m00s after its deadline 06:10 (ETA from the learned "
                                     "durations and the live workers)")
    assert list(encode_payload_keys(alert)) == list(PAYLOAD_KEYS)


def encode_payload_keys(alert) -> list[str]:
    return list(json.loads(encode_payload(alert.payload)))


def test_a_pool_sets_aside_runs_of_all_its_tasks():
    tasks = {"a": EtaTask(pool="warehouse"), "b": EtaTask(pool="warehouse"), "c": EtaTask()}
    runs = [queued("a", "a1"), queued("a", "a2"), queued("b", "b1"), queued("c", "c1")]
    durations = {"a1": 10.0, "a2": 10.0, "b1": 10.0, "c1": 10.0}
    est = estimate(runs, durations, 4, NOW, tasks, pools={"warehouse": 2})
    # Two of the three pool runs at once (a's, first in the queue); b's once they end; c is not held up.
    assert est.task_ends == {"a": after_s(10), "b": after_s(20), "c": after_s(10)}
    assert estimate(runs, durations, 4, NOW, tasks).at == after_s(10)  # without POOLS: no limit

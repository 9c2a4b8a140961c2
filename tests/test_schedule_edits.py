"""Schedule edits and tables that change under a leader: a once-a-day task's runs of a day
use the slot first fanned out for it (runs.DaySlots, keys.day_slots), and a leader whose
table differs from the last firing leader's adds, within the grace, what its table has
and the day lacks (keys.fired). Pure mapping tests, the leader with an injected clock,
then live processes."""

from __future__ import annotations

import json
import logging
import signal
import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from dailyq.alerts.alerter import AlertService
from dailyq.alerts.events import missed_slot_alerts, overdue_slots
from dailyq.commands import rerun, trigger
from dailyq.dependencies import release_ready
from dailyq.fanout import FanOutOptions, fan_out
from dailyq.fingerprint import task_digest
from dailyq.keys import Keys
from dailyq.ops import consistency
from dailyq.ops.status import day_status
from dailyq.runs import DaySlots, Run, day_slot_json, runs_on
from dailyq.scheduler import DailyScheduler
from dailyq.table import Task, TaskTable
from dailyq.worker.workers import make_queue
from tests.helpers import executions, noon_zone, run_cli, starts_per_param, today_in, utc_now, wait_for, wall_time_in
from tests.sample_tasks import record

UTC = timezone.utc
DAY = date(2026, 11, 26)


def at(hour: int, minute: int = 0, second: int = 0, day: date = DAY) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def leader(connection, settings, table: TaskTable, now: datetime) -> tuple[DailyScheduler, FakeClock]:
    """A scheduler that becomes the leader at ``now`` (the one before it is gone: a deploy)."""
    connection.delete(settings.keys.leader)
    clock = FakeClock(now)
    return DailyScheduler(connection, settings, table, clock=clock), clock


def task(name: str = "t", params=("a", "b"), **kwargs) -> Task:
    return Task(name=name, func=record, params=list(params), **kwargs)


def queued_job_ids(connection, settings) -> list[str]:
    return make_queue(connection, settings.keys).job_ids


def enqueued(connection, settings, day: date = DAY) -> set[str]:
    return {m.decode() for m in connection.smembers(settings.keys.day_enqueued(day))}


# -- the mapping, pure ------------------------------------------------------------------

def slot_at(at_text: str, tz: str = "UTC", day: date = DAY):
    (slot,) = TaskTable([task(at=at_text, tz=tz)]).get("t").schedule.permits_on(day)
    return slot


def test_a_once_a_day_task_maps_onto_the_stored_slot_and_a_cron_task_never_does():
    moved = TaskTable([task(at="05:00"), task("c", cron="0 3,5 * * *")])
    t, c = moved.get("t"), moved.get("c")
    three = slot_at("03:00")
    slots = DaySlots.decode(DAY, {b"t": day_slot_json(three).encode(), b"c": day_slot_json(three).encode()})
    (five,) = t.schedule.permits_on(DAY)
    assert slots.slot_of(t, five) == three and slots.permits_on(t) == [three]
    assert slots.permits_on(c) == c.schedule.permits_on(DAY)  # several slots a day: one run per slot
    # Another day, or a day with nothing stored, keeps the table's slot.
    (next_five,) = t.schedule.permits_on(DAY + timedelta(days=1))
    assert slots.slot_of(t, next_five) == next_five
    assert DaySlots(DAY).permits_on(t) == [five]
    # The day's runs are those of the stored slot: the ids the records have.
    assert [r.run_id for r in runs_on(moved, DAY, ["t"], slots=slots)] == [Run(t, p, three).run_id for p in ("a", "b")]
    assert {r.slot for r in runs_on(moved, DAY, ["t"])} == {five}


def test_a_tz_change_keeps_the_stored_zone_and_bad_entries_are_ignored():
    tokyo = TaskTable([task(at="03:00", tz="Asia/Tokyo")]).get("t")
    utc_slot = slot_at("03:00")
    slots = DaySlots.decode(DAY, {"t": day_slot_json(utc_slot)})
    (mapped,) = slots.permits_on(tokyo)
    assert mapped.zone == "UTC" and mapped.fires_at == at(3) and mapped.isoformat() == "2026-11-26T03:00:00+00:00"
    other_day = slot_at("03:00", day=DAY - timedelta(days=1))
    bad = {"t": day_slot_json(other_day), "u": "not json", "v": json.dumps({"slot": "2026-11-26T03:00:00+00:00",
                                                                           "tz": "Mars/Olympus"})}
    assert DaySlots.decode(DAY, bad).stored == {}


def test_a_slot_moved_after_it_ran_is_not_reported_missed():
    old = TaskTable([task(at="03:00", misfire_grace_s=60)]).get("t")
    new = TaskTable([task(at="05:00", misfire_grace_s=60, tz="America/New_York")]).get("t")
    (ran,) = old.schedule.permits_on(DAY)
    fired = {("t", ran.isoformat())}
    slots = DaySlots(DAY, {"t": ran})
    now = at(12)
    assert [a.alert_id for a in missed_slot_alerts(new, overdue_slots(new, DAY, now), fired, at(0))] == [
        "slot_missed:t:20261126T050000"]  # what the table alone says
    assert missed_slot_alerts(new, overdue_slots(new, DAY, now, slots), fired, at(0)) == []


# -- the leader, with an injected clock ------------------------------------------------

def test_at_moved_later_after_the_slot_ran_does_not_run_the_day_again(connection, settings, caplog):
    keys = settings.keys
    v1, v2 = TaskTable([task(at="03:00")]), TaskTable([task(at="05:00")])
    first, _ = leader(connection, settings, v1, at(3, 0, 1))
    first.run_once()
    ran = enqueued(connection, settings)
    assert len(ran) == 2 and json.loads(connection.hget(keys.day_slots(DAY), "t")) == {
        "slot": "2026-11-26T03:00:00+00:00", "tz": "UTC"}
    second, clock = leader(connection, settings, v2, at(4))  # deployed at 04:00
    second.run_once()
    clock.now = at(5, 0, 1)
    with caplog.at_level(logging.INFO, logger="dailyq.scheduler"):
        second.run_once()
    assert enqueued(connection, settings) == ran and sorted(queued_job_ids(connection, settings)) == sorted(ran)
    assert any("already ran today" in m and "2026-11-26T03:00:00+00:00" in m for m in caplog.messages)
    clock.now = at(5, 0, 5)
    second.run_once()  # its cursor moved past 05:00: not due again
    assert len(queued_job_ids(connection, settings)) == 2
    # status shows the runs of 03:00, not 05:00 scheduled (or missed) beside leftovers.
    runs = day_status(connection, keys, v2, DAY, at(9))["runs"]
    assert sorted((r["run_id"], r["state"]) for r in runs) == [(job_id, "queued") for job_id in sorted(ran)]
    # trigger and rerun with the new table name the same runs.
    queue = make_queue(connection, keys)
    triggered = trigger(connection, keys, queue, v2, DAY, None, settings.retention_s)
    assert triggered.enqueued == [] and sorted(triggered.already) == sorted(ran)
    report = rerun(connection, keys, queue, v2, "t", [], DAY, False, settings.retention_s)
    assert report.enqueued == [] and sorted(r.run_id for r in report.in_progress) == sorted(ran)


def test_a_param_added_with_the_move_is_scheduled_until_the_new_time_then_joins_the_days_slot(connection, settings):
    keys = settings.keys
    v1, v2 = TaskTable([task(at="03:00")]), TaskTable([task(at="05:00", params=["a", "b", "c"])])
    first, _ = leader(connection, settings, v1, at(3, 0, 1))
    first.run_once()
    states = {r["param"]: r["state"] for r in day_status(connection, keys, v2, DAY, at(4, 30))["runs"]}
    assert states == {"a": "queued", "b": "queued", "c": "scheduled"}  # not missed: it fans out at 05:00
    second, _ = leader(connection, settings, v2, at(5, 0, 1))
    second.run_once()
    (three,) = v1.get("t").schedule.permits_on(DAY)
    assert sorted(enqueued(connection, settings)) == sorted(Run(v2.get("t"), p, three).run_id for p in "abc")
    late = {r["param"]: r["state"] for r in day_status(connection, keys, v2, DAY, at(6, 0, 2))["runs"]}
    assert late == {"a": "queued", "b": "queued", "c": "queued"}


def test_at_moved_later_before_the_slot_fired_fires_once_at_the_new_time(connection, settings):
    v1, v2 = TaskTable([task(at="03:00")]), TaskTable([task(at="05:00")])
    first, _ = leader(connection, settings, v1, at(2))
    first.run_once()
    second, clock = leader(connection, settings, v2, at(2, 30))
    for clock.now in (at(2, 30), at(3, 0, 1), at(4, 59, 59)):
        second.run_once()
    assert enqueued(connection, settings) == set()
    clock.now = at(5, 0, 1)
    second.run_once()
    clock.now = at(5, 0, 3)
    second.run_once()
    assert len(queued_job_ids(connection, settings)) == 2
    assert all("-20261126T050000-" in job_id for job_id in queued_job_ids(connection, settings))


def test_a_tz_and_at_change_after_the_slot_ran_does_not_run_the_day_again(connection, settings):
    v1 = TaskTable([task(at="03:00")])
    v2 = TaskTable([task(at="04:30", tz="America/New_York")])  # 09:30 UTC, the same day in New York
    first, _ = leader(connection, settings, v1, at(3, 0, 1))
    first.run_once()
    ran = enqueued(connection, settings)
    second, clock = leader(connection, settings, v2, at(9))
    second.run_once()
    clock.now = at(9, 30, 1)
    second.run_once()
    assert enqueued(connection, settings) == ran and len(queued_job_ids(connection, settings)) == 2
    runs = day_status(connection, settings.keys, v2, DAY, at(12))["runs"]
    assert {(r["state"], r["slot"]) for r in runs} == {("queued", "2026-11-26T03:00:00+00:00")} and len(runs) == 2


def test_a_new_leader_adds_new_params_and_new_tasks_within_the_grace(connection, settings, caplog):
    v1 = TaskTable([task("hb", params=["p1", "p2", "p3"], at="03:00")])
    v2 = TaskTable([task("hb", params=["p1", "p2", "p3", "p4", "p5"], at="03:00"),
                    task("nt", params=["x"], at="03:00")])
    old, _ = leader(connection, settings, v1, at(3, 0, 1))
    old.run_once()
    assert len(enqueued(connection, settings)) == 3
    assert connection.hget(settings.keys.fired, "hb").decode() == task_digest(v1.get("hb"))
    new, clock = leader(connection, settings, v2, at(3, 20))
    with caplog.at_level(logging.INFO, logger="dailyq.scheduler"):
        new.run_once()
    params = sorted(json.loads(r["param_json"]) for r in
                    (json.loads(v) for v in connection.hvals(settings.keys.day_runs(DAY))))
    assert params == ["p1", "p2", "p3", "p4", "p5", "x"]
    jobs = queued_job_ids(connection, settings)
    assert len(jobs) == 6 == len(set(jobs))  # p1..p3 not enqueued again
    assert [m for m in caplog.messages if "another definition" in m] == [
        "node test-node leads with another definition of task hb than the leader that fired its slots: "
        "2 runs of its slots within the misfire grace added, 3 there already"]
    assert connection.hget(settings.keys.fired, "hb").decode() == task_digest(v2.get("hb"))
    # Once per term: later ticks, and the next leader with the same table, add nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dailyq.scheduler"):
        clock.now = at(3, 21)
        new.run_once()
        again, _ = leader(connection, settings, v2, at(3, 22))
        again.run_once()
    assert not [m for m in caplog.messages if "another definition" in m or "fanned out" in m]
    assert len(queued_job_ids(connection, settings)) == 6


def test_a_leader_with_no_digest_stored_fans_nothing_out_again(connection, settings):
    """No ``fired`` digest (Redis lost its data and a node wrote its cursors back, or a
    first term of this version): nothing tells that another table fired the slots, and
    fanning them out again would run the day again once the enqueued set is gone too."""
    table = TaskTable([task("hb", params=["p1", "p2"], at="03:00")])
    first, _ = leader(connection, settings, table, at(3, 0, 1))
    first.run_once()
    assert len(queued_job_ids(connection, settings)) == 2
    connection.delete(settings.keys.fired, settings.keys.day_enqueued(DAY), settings.keys.day_runs(DAY))
    second, _ = leader(connection, settings, table, at(3, 10))
    second.run_once()
    assert len(queued_job_ids(connection, settings)) == 2 and not enqueued(connection, settings)


def test_past_the_grace_a_new_leader_adds_nothing(connection, settings):
    v1 = TaskTable([task("hb", params=["p1", "p2", "p3"], at="03:00")])
    v2 = TaskTable([task("hb", params=["p1", "p2", "p3", "p4", "p5"], at="03:00"),
                    task("nt", params=["x"], at="03:00")])
    old, _ = leader(connection, settings, v1, at(3, 0, 1))
    old.run_once()
    new, _ = leader(connection, settings, v2, at(4, 0, 2))  # the grace (3600 s) ended at 04:00
    new.run_once()
    assert len(enqueued(connection, settings)) == 3 and len(queued_job_ids(connection, settings)) == 3
    runs = day_status(connection, settings.keys, v2, DAY, at(4, 0, 2))["runs"]
    assert sorted((r["param"], r["state"]) for r in runs) == [  # p4, p5 and nt: only trigger runs them now
        ("p1", "queued"), ("p2", "queued"), ("p3", "queued"), ("p4", "missed"), ("p5", "missed"), ("x", "missed")]


def test_a_cron_task_keeps_one_run_per_slot_and_gets_its_new_params_in_each(connection, settings):
    v1 = TaskTable([task("c", params=["p1"], cron="0 3,4 * * *", misfire_grace_s=7200)])
    v2 = TaskTable([task("c", params=["p1", "p2"], cron="0 3,4 * * *", misfire_grace_s=7200)])
    old, clock = leader(connection, settings, v1, at(3, 0, 1))
    old.run_once()
    clock.now = at(4, 0, 1)
    old.run_once()
    assert len(enqueued(connection, settings)) == 2
    new, _ = leader(connection, settings, v2, at(4, 30))
    new.run_once()
    runs = day_status(connection, settings.keys, v2, DAY, at(4, 30))["runs"]
    assert sorted((r["slot"][11:16], r["param"], r["state"]) for r in runs) == [
        ("03:00", "p1", "queued"), ("03:00", "p2", "queued"), ("04:00", "p1", "queued"), ("04:00", "p2", "queued")]
    assert connection.hlen(settings.keys.day_slots(DAY)) == 0  # nothing to map for a cron task


def test_downstream_runs_of_a_moved_upstream_are_released_by_the_runs_it_ran(connection, settings):
    keys = settings.keys
    v1 = TaskTable([task("up", at="03:00"), task("down", params=["d"], at="03:00", after=["up"])])
    v2 = TaskTable([task("up", at="05:00"), task("down", params=["d"], at="05:00", after=["up"])])
    first, _ = leader(connection, settings, v1, at(3, 0, 1))
    first.run_once()
    up_runs = [r for r in runs_on(v1, DAY, ["up"])]
    connection.sadd(keys.day_finished(DAY), *[r.run_id for r in up_runs])  # as FINISH records them
    result = release_ready(connection, keys, make_queue(connection, keys), v2, DAY, retention_s=settings.retention_s)
    assert result.released == [Run(v1.get("down"), "d", up_runs[0].slot).run_id]


def test_doctor_parks_a_held_run_of_a_moved_task_again_instead_of_failing_it(connection, settings):
    keys = settings.keys
    v1 = TaskTable([task("up", at="03:00"), task("down", params=["d"], at="03:00", after=["up"])])
    v2 = TaskTable([task("up", at="05:00"), task("down", params=["d"], at="05:00", after=["up"])])
    first, _ = leader(connection, settings, v1, at(3, 0, 1))
    first.run_once()
    (held,) = [r.run_id for r in runs_on(v1, DAY, ["down"])]
    connection.hdel(keys.day_waiting(DAY), held)  # planted: a held run nothing would release
    report = consistency.examine(connection, keys, make_queue(connection, keys), v2, DAY, fix=True,
                                 retention_s=settings.retention_s, now_iso="2026-11-26T06:00:00+00:00")
    (problem,) = report["problems"]
    assert problem["run_id"] == held and problem["repair"].startswith("park it again"), problem
    assert connection.hexists(keys.day_waiting(DAY), held)


def test_alerts_do_not_report_the_moved_slot_of_a_task_that_ran(connection, settings):
    zone = noon_zone()  # it is about noon there: three and two hours ago are today
    keys = settings.keys
    now = utc_now()
    local = now.astimezone(ZoneInfo(zone))
    v1 = TaskTable([task(at=(local - timedelta(hours=3)).strftime("%H:%M"), tz=zone, misfire_grace_s=60)])
    v2 = TaskTable([task(at=(local - timedelta(hours=2)).strftime("%H:%M"), tz=zone, misfire_grace_s=60)])
    day = local.date()
    trigger(connection, keys, make_queue(connection, keys), v1, day, None, settings.retention_s)
    connection.hset(keys.leadership, "first_ms", int((now - timedelta(hours=5)).timestamp() * 1000))
    raised = AlertService(connection, settings, v2).detect()
    assert not [a for a in raised if a.startswith("slot_missed")], raised


def test_a_fan_out_of_another_slot_of_a_once_a_day_task_follows_the_stored_one(connection, settings, caplog):
    """The net under callers: one that did not map (or raced the day's first fan-out)."""
    keys = settings.keys
    queue = make_queue(connection, keys)
    v1, v2 = TaskTable([task(at="03:00")]), TaskTable([task(at="05:00", params=["a", "b", "c"])])
    fan_out(connection, keys, queue, runs_on(v1, DAY), FanOutOptions(settings.retention_s))
    with caplog.at_level(logging.WARNING, logger="dailyq.fanout"):
        result = fan_out(connection, keys, queue, runs_on(v2, DAY), FanOutOptions(settings.retention_s))
    (three,) = v1.get("t").schedule.permits_on(DAY)
    assert result.enqueued == [Run(v2.get("t"), "c", three).run_id] and len(result.already) == 2
    assert sorted(queue.job_ids) == sorted(Run(v2.get("t"), p, three).run_id for p in ("a", "b", "c"))
    assert any("were mapped onto it" in m for m in caplog.messages)


PARAMS_CALLS: list[date] = []


def no_params_today(day: date) -> list[str]:
    PARAMS_CALLS.append(day)
    return []


def test_a_computed_task_that_fired_without_runs_is_not_called_again_at_its_moved_time(connection, settings):
    PARAMS_CALLS.clear()
    v1 = TaskTable([Task(name="t", func=record, params=no_params_today, at="03:00")])
    v2 = TaskTable([Task(name="t", func=record, params=no_params_today, at="05:00")])
    first, _ = leader(connection, settings, v1, at(3, 0, 1))
    first.run_once()
    second, _ = leader(connection, settings, v2, at(5, 0, 1))
    second.run_once()
    assert PARAMS_CALLS == [DAY]  # its list for the day (empty) was made once, at 03:00
    assert day_status(connection, settings.keys, v2, DAY, at(6))["runs"] == []


# -- live processes (test b) -----------------------------------------------------------

def live_env(node_env: dict, zone: str, at_text: str) -> dict:
    return dict(node_env, SAMPLE_ONLY="1", SAMPLE_AT=at_text, SAMPLE_TZ=zone, SAMPLE_PARAMS="3", SAMPLE_SLEEP_S="0.1",
                NODE_NAME="node-1")


def status_runs(env: dict, day: str) -> list[dict]:
    result = run_cli(["status", "--date", day, "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["runs"]


def stop(process) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=15)


def wait_past(zone: str, at_text: str, day: str, extra_s: float) -> None:
    """Sleep until ``extra_s`` after ``at_text`` on ``day`` in ``zone``."""
    moment = datetime.fromisoformat(f"{day}T{at_text}").replace(tzinfo=ZoneInfo(zone))
    time.sleep(max(0.0, (moment - utc_now()).total_seconds() + extra_s))


@pytest.mark.slow
def test_live_an_at_or_tz_moved_after_the_slot_ran_does_not_run_the_day_again(node_env, processes, connection,
                                                                              prefix):
    zone = noon_zone()
    day = today_in(zone)
    first_at = wall_time_in(zone, 6)
    env = live_env(node_env, zone, first_at)
    scheduler = processes.start("scheduler.py", env)
    processes.start("worker_entry.py", env)
    wait_for(lambda: len(starts_per_param(executions(connection, prefix))) == 3 and
             {r["state"] for r in status_runs(env, day)} == {"finished"}, timeout=60, what="the first slot's runs")
    stop(scheduler)

    # Deployed again with ``at`` a few seconds later (still today there): the slot comes, nothing runs.
    moved_at = wall_time_in(zone, 5)
    moved = dict(env, SAMPLE_AT=moved_at)
    scheduler = processes.start("scheduler.py", moved)
    wait_past(zone, moved_at, day, 0)
    wait_for(lambda: "0 enqueued, 3 already enqueued" in processes.log_of(scheduler), timeout=20,
             what="the moved slot")
    assert "already ran today" in processes.log_of(scheduler)
    stop(scheduler)
    # And with another zone (an hour west: its 11 o'clock, the same day) and a time soon there.
    west_h = (datetime.now(ZoneInfo(zone)).utcoffset() or timedelta(0)) // timedelta(hours=1) - 1
    west = "UTC" if west_h == 0 else f"Etc/GMT{-west_h:+d}"
    assert today_in(west) == day
    west_at = wall_time_in(west, 5)
    rezoned = dict(env, SAMPLE_TZ=west, SAMPLE_AT=west_at)
    scheduler = processes.start("scheduler.py", rezoned)
    wait_past(west, west_at, day, 0)
    wait_for(lambda: "0 enqueued, 3 already enqueued" in processes.log_of(scheduler), timeout=20,
             what="the rezoned slot")
    time.sleep(1)  # a run enqueued again would start within this

    assert sorted(starts_per_param(executions(connection, prefix)).values()) == [1, 1, 1]
    for shown_env in (env, moved, rezoned):
        runs = status_runs(shown_env, day)
        assert len(runs) == 3 and {r["state"] for r in runs} == {"finished"}, runs
        assert {r["slot"][11:19] for r in runs} == {first_at}


@pytest.mark.slow
def test_live_an_at_moved_later_before_the_slot_fired_fires_once_at_the_new_time(node_env, processes, connection,
                                                                                 prefix):
    zone = noon_zone()
    day = today_in(zone)
    first_at = wall_time_in(zone, 10)
    env = live_env(node_env, zone, first_at)
    keys = Keys(prefix)
    scheduler = processes.start("scheduler.py", env)
    wait_for(lambda: connection.exists(keys.leader), timeout=15, what="a leader")
    stop(scheduler)
    assert wall_time_in(zone, 0) < first_at, "starting and stopping a scheduler took until its slot: too slow"
    moved_at = (datetime.fromisoformat(f"{day}T{first_at}") + timedelta(seconds=5)).strftime("%H:%M:%S")
    moved = dict(env, SAMPLE_AT=moved_at)
    processes.start("scheduler.py", moved)
    processes.start("worker_entry.py", moved)
    wait_past(zone, moved_at, day, 0)
    wait_for(lambda: {r["state"] for r in status_runs(moved, day)} == {"finished"}, timeout=60, what="the runs")
    events = executions(connection, prefix)
    assert sorted(starts_per_param(events).values()) == [1, 1, 1]
    moment = datetime.fromisoformat(f"{day}T{moved_at}").replace(tzinfo=ZoneInfo(zone))
    assert min(e["t"] for e in events) >= moment.timestamp()
    assert {r["slot"][11:19] for r in status_runs(moved, day)} == {moved_at}

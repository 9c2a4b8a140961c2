"""Pause and resume (pausing.py): the leader's decisions with an injected clock, then real
node processes around a slot a few seconds ahead."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from dailyq import api
from dailyq.commands import pause, resume, trigger
from dailyq.errors import ConfigError
from dailyq.ops.render import render_table
from dailyq.ops.status import day_status
from dailyq.scheduler import DailyScheduler
from dailyq.table import Task, TaskTable
from dailyq.worker.workers import make_queue
from tests.helpers import base_env, executions, noon_zone, quiet_sample_at, run_cli, today_in, wait_for, wall_time_in
from tests.sample_tasks import record

UTC = timezone.utc
DAY = date(2026, 11, 26)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def at(hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2026, 11, 26, hour, minute, second, tzinfo=UTC)


def leader(connection, settings, table, clock: FakeClock) -> DailyScheduler:
    scheduler = DailyScheduler(connection, settings, table, clock=clock)
    assert scheduler.take_lease()
    return scheduler


def test_a_slot_due_while_paused_fires_on_resume_within_grace(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a", "b"], at="09:00", misfire_grace_s=600),
                       Task(name="u", func=record, params=["c"], at="09:00", misfire_grace_s=600)])
    clock = FakeClock(at(8, 59))
    scheduler = leader(connection, settings, table, clock)
    pause(connection, settings.keys, table, ["t"], "node-x")
    clock.now = at(9, 0, 30)
    assert scheduler.fire_due_slots(clock()) == 1  # only u's run
    assert connection.hget(settings.keys.cursor, "t") is None  # t's cursor did not move
    status = day_status(connection, settings.keys, table, DAY, clock())
    assert {r["state"] for r in status["runs"] if r["task"] == "t"} == {"scheduled"}
    assert set(status["paused"]) == {"t"} and status["paused"]["t"]["by"] == "node-x"
    resume(connection, settings.keys, make_queue(connection, settings.keys), table, ["t"])
    clock.now = at(9, 8)  # 8 minutes late, within the 10 minutes of grace
    assert scheduler.fire_due_slots(clock()) == 2
    assert scheduler.fire_due_slots(clock()) == 0  # once


def test_a_slot_older_than_grace_when_resumed_is_missed(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a"], at="09:00", misfire_grace_s=600)])
    clock = FakeClock(at(8, 59))
    scheduler = leader(connection, settings, table, clock)
    pause(connection, settings.keys, table, None, "node-x")  # --all
    clock.now = at(9, 5)
    assert scheduler.fire_due_slots(clock()) == 0
    resume(connection, settings.keys, make_queue(connection, settings.keys), table, None)
    clock.now = at(9, 11)  # past the grace
    assert scheduler.fire_due_slots(clock()) == 0
    (run,) = day_status(connection, settings.keys, table, DAY, clock())["runs"]
    assert run["state"] == "missed"


def test_pause_keeps_the_first_pause_and_names_unknown_tasks(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a"], at="09:00")])
    (first,) = api.pause(connection, "t", settings=settings, table=table)["paused"]
    (again,) = api.pause(connection, ["t"], settings=settings, table=table)["paused"]
    assert not first["already"] and again["already"]
    assert (again["since"], again["by"]) == (first["since"], settings.node_name)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        api.pause(connection, "nope", settings=settings, table=table)
    with pytest.raises(ConfigError, match="--all"):
        api.resume(connection, settings=settings, table=table)
    assert api.resume(connection, all_tasks=True, settings=settings, table=table)["resumed"] == [
        {"task": "t", "was_paused": True, "requeued": 0}]
    assert api.resume(connection, all_tasks=True, settings=settings, table=table)["resumed"] == []


def test_the_status_table_says_which_tasks_are_paused(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a"], at="09:00")])
    pause(connection, settings.keys, table, ["t"], "node-x")
    trigger(connection, settings.keys, make_queue(connection, settings.keys), table, DAY, None, settings.retention_s)
    status = day_status(connection, settings.keys, table, DAY, at(9, 1))
    assert [r["state"] for r in status["runs"]] == ["paused"]
    text = render_table(status)
    assert "1 paused" in text
    assert f"paused: t (since {status['paused']['t']['since']} by node-x)" in text


@pytest.mark.slow
def test_pause_before_a_slot_then_resume(settings, processes, connection):
    zone = noon_zone()
    keys = settings.keys
    env = base_env(settings.redis_url, settings.prefix, DAILYQ_TASKS="tests.limit_tasks", NODE_NAME="n1",
                   LIMIT_AT=wall_time_in(zone, 12), LIMIT_TZ=zone, LIMIT_PARAMS="2", OTHER_PARAMS="2",
                   OTHER_AT=quiet_sample_at(),
                   SAMPLE_SLEEP_S="0.3")
    # Queued before the pause: the other task's runs of a fixed day.
    trigger_run = run_cli(["trigger", "--date", DAY.isoformat(), "--task", "other"], env)
    assert trigger_run.returncode == 0, trigger_run.stderr
    paused = run_cli(["pause", "--all"], env)
    assert paused.returncode == 0, paused.stderr
    assert "limited: paused since" in paused.stdout and "by n1" in paused.stdout
    processes.start("scheduler.py", env)
    processes.start("worker_entry.py", env)
    slot_at = datetime.strptime(f"{today_in(zone)} {env['LIMIT_AT']}", "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=ZoneInfo(zone))

    def redis_now() -> datetime:
        seconds, micros = connection.time()
        return datetime.fromtimestamp(seconds + micros / 1e6, UTC)

    # The worker took the queued runs off the queue and held them; the slot passed with a
    # leader ticking, and fanned out nothing.
    wait_for(lambda: connection.llen(keys.set_aside("other")) == 2, timeout=30, what="the queued runs to be held")
    # Bounded: the set-aside list and its index expire a retention after the last hold.
    for key in (keys.set_aside("other"), keys.set_aside_index("other")):
        assert 0 < connection.ttl(key) <= settings.retention_s, key
    wait_for(lambda: connection.exists(keys.leader) and redis_now() > slot_at + timedelta(seconds=2),
             timeout=40, what="the slot to pass under a leader")
    today = date.fromisoformat(today_in(zone))
    assert connection.hlen(keys.day_runs(today)) == 0
    assert executions(connection, settings.prefix) == []
    status = json.loads(run_cli(["status", "--date", DAY.isoformat(), "--json"], env).stdout)
    assert {r["state"] for r in status["runs"] if r["task"] == "other"} == {"paused"}
    assert set(status["paused"]) == {"limited", "other"} and status["paused"]["other"]["by"] == "n1"

    resumed = run_cli(["resume", "--all"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "other: resumed, 2 set-aside runs back in the queue" in resumed.stdout
    assert connection.exists(keys.set_aside("other"), keys.set_aside_index("other")) == 0  # drained: both gone

    def states(day: date, task: str) -> set[str]:
        runs = json.loads(run_cli(["status", "--date", day.isoformat(), "--json"], env).stdout)["runs"]
        return {r["state"] for r in runs if r["task"] == task}

    wait_for(lambda: states(today, "limited") == {"finished"} and states(DAY, "other") == {"finished"},
             timeout=30, what="the slot's runs (within grace) and the set-aside runs to finish", every=0.5)

"""Missed slots, with an injected clock: the scheduler's decisions, no sleeping."""

from datetime import date, datetime, timedelta, timezone

from dailyq.commands import trigger
from dailyq.ops.status import day_status
from dailyq.scheduler import DailyScheduler
from dailyq.table import Task, TaskTable
from dailyq.worker.workers import make_queue
from tests.tables.sample_tasks import record

UTC = timezone.utc


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def scheduler_at(connection, settings, table, now: datetime) -> tuple[DailyScheduler, FakeClock]:
    clock = FakeClock(now)
    return DailyScheduler(connection, settings, table, clock=clock), clock


def enqueued(connection, settings, day: date) -> int:
    return connection.scard(settings.keys.day_enqueued(day))


def test_a_slot_within_grace_fires_once_on_start_up(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a", "b"], at="09:00", misfire_grace_s=3600)])
    scheduler, clock = scheduler_at(connection, settings, table, datetime(2026, 11, 26, 9, 30, tzinfo=UTC))
    scheduler.run_once()
    assert enqueued(connection, settings, date(2026, 11, 26)) == 2
    clock.now += timedelta(seconds=5)
    scheduler.run_once()
    assert make_queue(connection, settings.keys).count == 2


def test_an_older_slot_is_missed_and_runs_only_via_trigger(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a"], at="09:00", misfire_grace_s=3600)])
    now = datetime(2026, 11, 26, 11, 0, tzinfo=UTC)
    scheduler, _ = scheduler_at(connection, settings, table, now)
    scheduler.run_once()
    day = date(2026, 11, 26)
    assert enqueued(connection, settings, day) == 0
    (run,) = day_status(connection, settings.keys, table, day, now)["runs"]
    assert run["state"] == "missed"
    trigger(connection, settings.keys, make_queue(connection, settings.keys), table, day, None, settings.retention_s)
    (run,) = day_status(connection, settings.keys, table, day, now)["runs"]
    assert run["state"] == "queued"


def test_a_future_slot_is_scheduled(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a"], at="09:00")])
    now = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    (run,) = day_status(connection, settings.keys, table, date(2026, 11, 26), now)["runs"]
    assert run["state"] == "scheduled" and run["attempts"] == 0


def test_catch_up_after_three_days_down_fires_each_slot_in_grace_once(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a"], at="09:00", misfire_grace_s=2 * 86400)])
    first, clock = scheduler_at(connection, settings, table, datetime(2026, 11, 20, 9, 0, 1, tzinfo=UTC))
    first.run_once()  # first start: fires the 19th (within grace) and the 20th; then down for three days
    connection.delete(settings.keys.leader)  # its lease expired while it was down
    clock.now = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)
    restarted, _ = scheduler_at(connection, settings, table, clock.now)
    restarted.run_once()
    restarted.run_once()
    fired = {d: enqueued(connection, settings, date(2026, 11, d)) for d in range(18, 24)}
    # The 21st (2 days 30 min old) is past the 2-day grace: missed; the 22nd and 23rd catch up once each.
    assert fired == {18: 0, 19: 1, 20: 1, 21: 0, 22: 1, 23: 1}
    assert make_queue(connection, settings.keys).count == 4


def test_a_leader_whose_lease_was_taken_fires_nothing(connection, settings):
    table = TaskTable([Task(name="t", func=record, params=["a"], at="09:00")])
    scheduler, clock = scheduler_at(connection, settings, table, datetime(2026, 11, 26, 8, 59, 59, tzinfo=UTC))
    scheduler.run_once()
    assert scheduler.is_leader
    connection.set(settings.keys.leader, "someone-else")
    clock.now = datetime(2026, 11, 26, 9, 0, 1, tzinfo=UTC)
    scheduler.run_once()
    assert not scheduler.is_leader
    assert enqueued(connection, settings, date(2026, 11, 26)) == 0

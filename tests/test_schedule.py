"""Schedule maths with fixed datetimes: zones, DST gaps and repeats, cron fields."""

from datetime import date, datetime, time, timedelta, timezone

import pytest

from dailyq.schedule import CronSpec, Schedule, parse_at

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("text, expected", [("09:00", time(9)), ("23:59:30", time(23, 59, 30)), ("00:00", time(0))])
def test_parse_at_accepts_24_hour_times(text, expected):
    assert parse_at(text) == expected


@pytest.mark.parametrize("text", ["9:00", "24:00", "12:60", "12:00:61", "noon", "", "12:00:00:00"])
def test_parse_at_rejects_malformed_times(text):
    with pytest.raises(ValueError):
        parse_at(text)


def test_daily_at_fires_once_per_local_day_in_its_zone():
    schedule = Schedule.parse("09:00", None, "Asia/Shanghai")
    slots = schedule.slots_between(utc(2026, 11, 25, 0, 0), utc(2026, 11, 27, 0, 0))
    assert [s.fires_at for s in slots] == [utc(2026, 11, 25, 1, 0), utc(2026, 11, 26, 1, 0)]
    assert [s.day for s in slots] == [date(2026, 11, 25), date(2026, 11, 26)]


def test_run_date_is_the_slot_date_in_the_task_zone_not_utc():
    # Kiritimati is UTC+14: its 01:00 on the 26th is 11:00 UTC on the 25th.
    schedule = Schedule.parse("01:00", None, "Pacific/Kiritimati")
    (slot,) = schedule.permits_on(date(2026, 11, 26))
    assert slot.fires_at == utc(2026, 11, 25, 11, 0)
    assert slot.day == date(2026, 11, 26)


def test_window_is_half_open():
    schedule = Schedule.parse("09:00", None, "UTC")
    assert schedule.slots_between(utc(2026, 1, 1, 9), utc(2026, 1, 1, 10)) == []
    assert len(schedule.slots_between(utc(2026, 1, 1, 8, 59, 59), utc(2026, 1, 1, 9))) == 1


# (zone, wall time, local day, expected UTC firing): one run on each DST day, at a documented moment.
DST_CASES = [
    # Spring forward: 02:30 does not exist; fires as 03:30 local (the gap's length later).
    ("America/New_York", "02:30", date(2026, 3, 8), utc(2026, 3, 8, 7, 30)),
    ("Europe/Berlin", "02:30", date(2026, 3, 29), utc(2026, 3, 29, 1, 30)),
    # Fall back: 01:30 happens twice; fires at the first one (still summer time).
    ("America/New_York", "01:30", date(2026, 11, 1), utc(2026, 11, 1, 5, 30)),
    ("Europe/Berlin", "02:30", date(2026, 10, 25), utc(2026, 10, 25, 0, 30)),
]


@pytest.mark.parametrize("zone, at, day, fires_at", DST_CASES)
def test_dst_days_have_exactly_one_run_at_the_documented_moment(zone, at, day, fires_at):
    schedule = Schedule.parse(at, None, zone)
    midnight = datetime.combine(day, time(0), UTC)
    around = schedule.slots_between(midnight - timedelta(days=2), midnight + timedelta(days=2))
    on_day = [s for s in around if s.day == day]
    assert [s.fires_at for s in on_day] == [fires_at]


def test_next_slot_steps_over_dst_without_repeating():
    schedule = Schedule.parse("01:30", None, "America/New_York")
    first = schedule.next_slot(utc(2026, 11, 1, 0, 0))
    second = schedule.next_slot(first.fires_at)
    assert first.fires_at == utc(2026, 11, 1, 5, 30)
    assert second.fires_at == utc(2026, 11, 2, 6, 30)  # next day, standard time


def test_cron_steps_ranges_lists_and_names():
    spec = CronSpec.parse("*/15 9-10 * jan,jul mon-fri")
    assert spec.minutes == {0, 15, 30, 45}
    assert spec.hours == {9, 10}
    assert spec.months == {1, 7}
    assert spec.days_of_week == {1, 2, 3, 4, 5}


def test_cron_day_of_month_or_day_of_week_when_both_restricted():
    spec = CronSpec.parse("0 0 1 * 1")
    assert spec.matches_day(date(2026, 6, 1))  # the 1st (a Monday too)
    assert spec.matches_day(date(2026, 6, 8))  # a Monday
    assert spec.matches_day(date(2026, 7, 1))  # the 1st, a Wednesday
    assert not spec.matches_day(date(2026, 7, 2))


def test_cron_sunday_is_0_and_7():
    assert CronSpec.parse("0 0 * * 7").days_of_week == {0}
    assert CronSpec.parse("0 0 * * sun").matches_day(date(2026, 11, 29))


def test_cron_in_a_zone_far_from_the_host():
    schedule = Schedule.parse(None, "0 6 * * *", "Pacific/Auckland")
    (slot,) = schedule.permits_on(date(2026, 11, 26))
    assert slot.fires_at == utc(2026, 11, 25, 17, 0)  # NZDT is UTC+13


def test_cron_macros():
    assert CronSpec.parse("@daily") == CronSpec.parse("0 0 * * *")


@pytest.mark.parametrize("text", ["* * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "*/0 * * * *",
                                  "5-1 * * * *", "a * * * *", "* * * foo *", "1,,2 * * * *"])
def test_cron_rejects_bad_expressions(text):
    with pytest.raises(ValueError, match="bad cron"):
        CronSpec.parse(text)


def test_schedule_needs_exactly_one_of_at_and_cron_and_a_real_zone():
    with pytest.raises(ValueError):
        Schedule.parse(None, None, "UTC")
    with pytest.raises(ValueError):
        Schedule.parse("09:00", "0 9 * * *", "UTC")
    with pytest.raises(ValueError, match="unknown time zone"):
        Schedule.parse("09:00", None, "Mars/Olympus")


def test_next_slot_of_a_rare_cron_is_found_years_ahead():
    schedule = Schedule.parse(None, "0 0 29 2 *", "UTC")
    assert schedule.next_slot(utc(2026, 3, 1)).fires_at == utc(2028, 2, 29)

"""DST days against a brute-force oracle: every UTC minute of each DST day of 2026-2027.

The oracle knows nothing of PEP 495 folds or of schedule.py's code: it walks the UTC
minutes around each change, turns each into the wall clock a person there reads, and
applies cron's rule (docs/tasks.md, "DST days"):

* an hourly cron (hour field ``*`` or a step) fires at every UTC minute whose wall clock
  matches it: a wall time in the gap never shows, a repeated one shows twice;
* ``at`` and a fixed-hour cron fire each wall time once: at the first minute that
  shows it, or, for a time in the gap, at that time read with the offset in force
  just before the gap; unless another slot of the day already fires at that instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import cache
from zoneinfo import ZoneInfo

import pytest

from dailyq.schedule import Schedule, Slot

UTC = timezone.utc
MINUTE = timedelta(minutes=1)
ZONES = ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Pacific/Chatham", "America/Santiago"]
HOURLY_CRONS = ["0 * * * *", "*/15 * * * *", "* * * * *", "30 */2 * * *", "0 0-23/3 * * *", "45 1,*/5 * * *"]
FIXED_CRONS = ["30 2 * * *", "30 1 * * *", "0,30 1,2,3 * * *", "*/15 1-3 * * *", "15 2,3 * * *", "0 0 * * *",
               "30 23 * * *", "0 0-23 * * *"]
# In a gap or a repeat somewhere: New York/Berlin 02:xx and 01:xx, Lord Howe 02:00-02:29 and
# 01:30-01:59, Chatham 02:45-03:44, Santiago 00:xx and 23:xx.
ATS = ["02:30", "01:30", "02:15", "01:45", "03:15", "02:45", "00:00", "23:30", "00:30:30"]


@cache
def transitions(zone: str) -> tuple[datetime, ...]:
    """UTC minutes at which the zone's offset changes in 2026-2027, found by walking."""
    tz = ZoneInfo(zone)
    found = []
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    step = timedelta(minutes=15)
    before = moment.astimezone(tz).utcoffset()
    while moment < datetime(2028, 1, 1, tzinfo=UTC):
        moment += step
        offset = moment.astimezone(tz).utcoffset()
        if offset != before:
            found.append(moment)
            before = offset
    assert len(found) == 4, (zone, found)  # two changes a year: the walk itself is checked
    return tuple(found)


@cache
def dst_days(zone: str) -> tuple[date, ...]:
    """Each local day holding a change, with the day before and after."""
    tz = ZoneInfo(zone)
    days: set[date] = set()
    for change in transitions(zone):
        for side in (change - MINUTE, change):
            day = side.astimezone(tz).date()
            days.update({day - timedelta(days=1), day, day + timedelta(days=1)})
    return tuple(sorted(days))


@cache
def minutes_of(zone: str, day: date) -> tuple[tuple[datetime, datetime, timedelta], ...]:
    """(UTC minute, naive local wall clock, UTC offset) for every UTC minute of the local
    day and some hours either side."""
    tz = ZoneInfo(zone)
    start = datetime.combine(day, time(0), UTC) - timedelta(hours=16)  # every zone here is within 14 h
    out = []
    for i in range(int(timedelta(hours=56) / MINUTE)):
        moment = start + i * MINUTE
        local = moment.astimezone(tz)
        offset = local.utcoffset()
        assert offset is not None
        out.append((moment, local.replace(tzinfo=None), offset))
    return tuple(out)


@dataclass(frozen=True)
class Expected:
    label: str
    fires_at: datetime
    day: date


def label_of(local: datetime, occurrence: int) -> str:
    return local.strftime("%Y%m%dT%H%M%S") + ("_2" if occurrence == 2 else "")


def oracle(schedule: Schedule, zone: str, day: date, *, hourly: bool) -> list[Expected]:
    walked = minutes_of(zone, day)
    # The oracle reads the table's wall times, not how permits_on turns them into instants.
    walls = [datetime.combine(day, t) for t in schedule.wall_times(day)]
    wanted = set(walls)
    out: list[Expected] = []
    if hourly:
        seen: dict[datetime, int] = {}
        for moment, local, _ in walked:
            if local in wanted:
                seen[local] = seen.get(local, 0) + 1
                out.append(Expected(label_of(local, seen[local]), moment, day))
        return out
    real: dict[datetime, Expected] = {}
    shifted: list[Expected] = []
    for target in walls:
        whole = target.replace(second=0)
        shows = [moment for moment, local, _ in walked if local == whole]
        if shows:
            fires_at = shows[0] + timedelta(seconds=target.second)
            real[fires_at] = Expected(label_of(target, 1), fires_at, day)
        else:  # in the gap: the offset just before it
            offset = [offset for _, local, offset in walked if local < whole][-1]
            fires_at = (target - offset).replace(tzinfo=UTC)
            shifted.append(Expected(label_of(target, 1), fires_at, day))
    out = [*real.values(), *(e for e in shifted if e.fires_at not in real)]
    return sorted(out, key=lambda e: e.fires_at)


def got(slots: list[Slot]) -> list[Expected]:
    return [Expected(s.label, s.fires_at, s.day) for s in slots]


CASES = ([(zone, None, cron, True) for zone in ZONES for cron in HOURLY_CRONS]
         + [(zone, None, cron, False) for zone in ZONES for cron in FIXED_CRONS]
         + [(zone, at, None, False) for zone in ZONES for at in ATS])


@pytest.mark.parametrize("zone, at, cron, hourly", CASES)
def test_every_dst_day_matches_the_minute_by_minute_oracle(zone, at, cron, hourly):
    schedule = Schedule.parse(at, cron, zone)
    assert schedule.cron is None or schedule.cron.hourly == hourly
    for day in dst_days(zone):
        expected = oracle(schedule, zone, day, hourly=hourly)
        slots = schedule.permits_on(day)
        assert got(slots) == expected, (zone, day)
        assert len({s.fires_at for s in slots}) == len(slots), "two slots at one instant"
        assert len({s.label for s in slots}) == len(slots), "two slots with one identity"
        # A slot's ISO form (records, job meta) names it again, fold included.
        assert [Slot.from_iso(s.isoformat(), zone) for s in slots] == slots
        assert [Slot.from_iso(s.isoformat(), zone).label for s in slots] == [s.label for s in slots]


@pytest.mark.parametrize("zone, at, cron, hourly", [case for case in CASES if case[2] != "* * * * *"])
def test_next_slot_and_windows_walk_the_dst_days_slot_by_slot(zone, at, cron, hourly):
    schedule = Schedule.parse(at, cron, zone)
    for change in transitions(zone):
        after, until = change - timedelta(hours=20), change + timedelta(hours=20)
        days = {d for d in dst_days(zone) if abs((d - change.date()).days) <= 3}
        expected = sorted((e for d in days for e in oracle(schedule, zone, d, hourly=hourly)
                           if after < e.fires_at <= until), key=lambda e: e.fires_at)
        assert got(schedule.slots_between(after, until)) == expected
        walked, moment = [], after
        while (slot := schedule.next_slot(moment)) is not None and slot.fires_at <= until:
            walked.append(slot)
            moment = slot.fires_at
        assert got(walked) == expected


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_hourly_cron_in_new_york_has_23_slots_in_spring_and_25_in_autumn():
    schedule = Schedule.parse(None, "0 * * * *", "America/New_York")
    spring = schedule.permits_on(date(2026, 3, 8))
    assert len(spring) == len({s.fires_at for s in spring}) == 23
    assert "20260308T020000" not in [s.label for s in spring]
    autumn = schedule.permits_on(date(2026, 11, 1))
    assert len(autumn) == len({s.fires_at for s in autumn}) == 25
    one_am = [s for s in autumn if s.local.hour == 1]
    assert [(s.label, s.isoformat(), s.fires_at) for s in one_am] == [
        ("20261101T010000", "2026-11-01T01:00:00-04:00", utc(2026, 11, 1, 5)),
        ("20261101T010000_2", "2026-11-01T01:00:00-05:00", utc(2026, 11, 1, 6))]
    assert [s.in_zone.utcoffset() for s in one_am] == [timedelta(hours=-4), timedelta(hours=-5)]


@pytest.mark.parametrize("at, cron", [("01:30", None), (None, "30 1 * * *")])
def test_fixed_hours_and_at_fire_at_the_first_of_a_repeated_time(at, cron):
    schedule = Schedule.parse(at, cron, "America/New_York")
    assert [(s.label, s.fires_at) for s in schedule.permits_on(date(2026, 11, 1))] == [
        ("20261101T013000", utc(2026, 11, 1, 5, 30))]


@pytest.mark.parametrize("at, cron", [("02:30", None), (None, "30 2 * * *")])
def test_fixed_hours_and_at_fire_a_gap_time_the_gap_later(at, cron):
    schedule = Schedule.parse(at, cron, "America/New_York")
    (slot,) = schedule.permits_on(date(2026, 3, 8))
    assert (slot.label, slot.fires_at, slot.isoformat()) == (
        "20260308T023000", utc(2026, 3, 8, 7, 30), "2026-03-08T02:30:00-05:00")  # 03:30 EDT


def test_a_gap_time_landing_on_another_slot_is_that_slot():
    schedule = Schedule.parse(None, "0 2,3 * * *", "America/New_York")
    assert [(s.label, s.fires_at) for s in schedule.permits_on(date(2026, 3, 8))] == [
        ("20260308T030000", utc(2026, 3, 8, 7))]


def test_labels_of_ordinary_days_keep_their_format():
    # Stored keys and run ids name slots by these labels: a day without a change keeps them.
    for zone in ZONES:
        for cron in HOURLY_CRONS[:2]:
            slots = Schedule.parse(None, cron, zone).permits_on(date(2026, 12, 2))
            assert [s.label for s in slots] == [s.local.strftime("%Y%m%dT%H%M%S") for s in slots]
            assert all(s.fold == 0 for s in slots)


def test_a_gap_slot_and_a_record_of_another_offset_are_not_second_occurrences():
    # 02:30 in the gap resolves with fold=0; a stored slot whose offset tzdata no longer
    # gives (here +01:00 on an ordinary New York day) keeps the plain label too.
    gap = Slot.from_iso("2026-03-08T02:30:00-05:00", "America/New_York")
    odd = Slot.from_iso("2026-12-02T09:00:00+01:00", "America/New_York")
    assert (gap.fold, gap.label, odd.fold, odd.label) == (0, "20260308T023000", 0, "20261202T090000")

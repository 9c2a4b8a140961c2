"""Schedule maths: when a task's slots fall, as pure functions of time passed in.

A *slot* is a scheduled wall-clock time in the task's IANA zone, and the instant it
fires. Its local date is the run's date, whatever moment it actually fires. On DST
days cron's rule (Vixie/ISC cron) decides, by the kind of schedule:

* ``at``, and a cron with fixed hours (``0 2 * * *``, ``*/15 1-3 * * *``): a wall time
  is a time of day, so it fires once a day. In a spring-forward gap (New York skips
  02:00-03:00) it resolves with the offset from before the change (PEP 495
  ``fold=0``), i.e. the gap's length later on the wall clock (02:30 -> 03:30 EDT);
  at a fall-back repeat (01:30 twice) it fires at the first occurrence. A gap time
  that so lands on the instant of another slot of the day is that slot (``0 2,3``
  fires once at 03:00 EDT): never two slots at one instant.
* a cron whose hour field is ``*`` or has a step (``0 * * * *``, ``*/15 */2 * * *``):
  it means "every hour", so it follows real time. A wall time in the gap does not
  happen and has no slot (23 hourly slots on a spring-forward day); a repeated one
  fires at both instants (25: 01:00 EDT and 01:00 EST).

A slot's identity (``label``, in run ids and keys; ``isoformat()``, in records) is its
wall time; the second occurrence of a repeated wall time has ``fold == 1``, its label
ends in ``_2`` and its ISO form carries the later offset. Every other slot is named as
it always was.

No clock is read here: callers pass ``after``/``until`` instants (see clock.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import cached_property
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_AT_PATTERN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")

_MONTH_NAMES = {name: i + 1 for i, name in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}
_DAY_NAMES = {name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
# How far ahead next_slot looks: a cron such as "0 0 29 2 1" (Feb 29 or Mondays...) can
# skip years; eight years covers every leap-day combination.
_SEARCH_HORIZON_DAYS = 8 * 366


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as 'Europe/Berlin')") from exc


def parse_at(text: str) -> time:
    match = _AT_PATTERN.match(text or "")
    if not match:
        raise ValueError(f"bad at={text!r} (use 'HH:MM' or 'HH:MM:SS', 24-hour)")
    hour, minute, second = match.groups()
    return time(int(hour), int(minute), int(second or 0))


def _parse_field(text: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        if not part:
            raise ValueError("empty list item")
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step_text and (not step_text.isdigit() or step < 1):
            raise ValueError(f"bad step {step_text!r}")
        if base == "*":
            start, end = low, high
        else:
            first, _, last = base.partition("-")
            start = names[first] if first in names else _number(first)
            end = (names[last] if last in names else _number(last)) if last else (high if step_text else start)
        if not (low <= start <= high and low <= end <= high and start <= end):
            raise ValueError(f"{part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _number(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number")
    return int(text)


@dataclass(frozen=True)
class CronSpec:
    """Standard five-field cron: minute hour day-of-month month day-of-week."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]  # 0 = Sunday
    dom_restricted: bool
    dow_restricted: bool
    # The hour field is "*" or has a step: the cron means "every hour" and follows real
    # time on DST days (module docstring). Vixie cron's HR_STAR, widened to any step.
    hourly: bool = False

    @classmethod
    def parse(cls, text: str) -> "CronSpec":
        expression = _MACROS.get(text.strip().lower(), text)
        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(f"bad cron={text!r}: need 5 fields 'minute hour day month weekday'")
        try:
            minutes = _parse_field(fields[0], 0, 59, {})
            hours = _parse_field(fields[1], 0, 23, {})
            days_of_month = _parse_field(fields[2], 1, 31, {})
            months = _parse_field(fields[3], 1, 12, _MONTH_NAMES)
            # 7 is Sunday too, as in Vixie cron.
            days_of_week = frozenset(d % 7 for d in _parse_field(fields[4], 0, 7, _DAY_NAMES))
        except ValueError as exc:
            raise ValueError(f"bad cron={text!r}: {exc}") from None
        return cls(minutes, hours, days_of_month, months, days_of_week,
                   dom_restricted=not fields[2].startswith("*"),
                   dow_restricted=not fields[4].startswith("*"),
                   hourly=any(part == "*" or "/" in part for part in fields[1].split(",")))

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom_ok = day.day in self.days_of_month
        dow_ok = (day.isoweekday() % 7) in self.days_of_week
        # Vixie cron: when both day fields are restricted, either one matching is enough.
        if self.dom_restricted and self.dow_restricted:
            return dom_ok or dow_ok
        return dom_ok and dow_ok

    def times(self) -> list[time]:
        return [time(h, m) for h in sorted(self.hours) for m in sorted(self.minutes)]


@dataclass(frozen=True)
class Slot:
    """One scheduled firing: wall time in ``zone`` and the instant it resolves to."""

    local: datetime  # naive wall-clock time in ``zone``
    zone: str
    fires_at: datetime  # aware UTC

    @property
    def day(self) -> date:
        return self.local.date()

    @cached_property
    def fold(self) -> int:
        """1 for the second occurrence of a wall time repeated at fall-back, else 0
        (PEP 495). Read from ``fires_at``, so a slot rebuilt from its ISO form keeps it;
        an instant matching neither fold (a record from before a tzdata change) stays 0."""
        tz = ZoneInfo(self.zone)
        first, second = (self.local.replace(tzinfo=tz, fold=fold).astimezone(timezone.utc) for fold in (0, 1))
        return 1 if self.fires_at != first and self.fires_at == second else 0

    @cached_property
    def label(self) -> str:
        """Compact, job-id-safe name of the slot: 20261126T093000; the second 01:00 of a
        fall-back day is 20261101T010000_2 (the first keeps the plain name)."""
        return self.local.strftime("%Y%m%dT%H%M%S") + ("_2" if self.fold else "")

    @cached_property
    def iso(self) -> str:
        """The slot as ISO 8601 with its zone's offset (the later one for ``fold == 1``)."""
        return self.in_zone.isoformat()

    def isoformat(self) -> str:
        return self.iso

    @property
    def in_zone(self) -> datetime:
        """The slot as an aware datetime in its zone (what a task sees)."""
        return self.local.replace(tzinfo=ZoneInfo(self.zone), fold=self.fold)

    @classmethod
    def from_iso(cls, iso: str, zone: str) -> "Slot":
        """The slot an ``isoformat()`` string names (as carried in a job's meta)."""
        moment = datetime.fromisoformat(iso)
        if moment.tzinfo is None:
            raise ValueError(f"slot {iso!r} has no UTC offset")
        return cls(local=moment.replace(tzinfo=None), zone=zone, fires_at=moment.astimezone(timezone.utc))


@dataclass(frozen=True)
class Schedule:
    """When a task fires: a daily ``at`` or a ``cron`` expression, in ``zone``."""

    zone: str
    at: time | None = None
    cron: CronSpec | None = None

    @classmethod
    def parse(cls, at: str | None, cron: str | None, zone: str) -> "Schedule":
        if (at is None) == (cron is None):
            raise ValueError("give exactly one of at='HH:MM' or cron='m h dom mon dow'")
        parse_zone(zone)
        if at is not None:
            return cls(zone=zone, at=parse_at(at))
        return cls(zone=zone, cron=CronSpec.parse(cron or ""))

    def wall_times(self, day: date) -> list[time]:
        if self.at is not None:
            return [self.at]
        assert self.cron is not None
        return self.cron.times() if self.cron.matches_day(day) else []

    def permits_on(self, day: date) -> list[Slot]:
        """Every slot whose local date is ``day``, in firing order (DST rule: module docstring)."""
        tz = ZoneInfo(self.zone)
        hourly = self.cron is not None and self.cron.hourly
        real: dict[datetime, Slot] = {}
        shifted: list[Slot] = []
        for wall in self.wall_times(day):
            local = datetime.combine(day, wall)
            first = local.replace(tzinfo=tz, fold=0)
            second = local.replace(tzinfo=tz, fold=1)
            # PEP 495: both folds have one offset except at a change, where fold=0 has the
            # offset from before it. The wall clock jumps forward (a gap: the time does not
            # exist) when the offset grows, and back (a repeat) when it shrinks.
            before, after = first.utcoffset(), second.utcoffset()
            assert before is not None and after is not None
            if before < after:
                # In the gap: an hourly cron has no such hour; anything else fires the
                # gap's length later (fold=0 keeps the offset from before it).
                if not hourly:
                    shifted.append(Slot(local=local, zone=self.zone, fires_at=first.astimezone(timezone.utc)))
                continue
            for moment in [first, second] if hourly and before != after else [first]:
                fires_at = moment.astimezone(timezone.utc)
                real[fires_at] = Slot(local=local, zone=self.zone, fires_at=fires_at)
        # A shifted gap time landing on a real slot's instant is that slot: one run, not two.
        slots = [*real.values(), *(slot for slot in shifted if slot.fires_at not in real)]
        return sorted(slots, key=lambda s: s.fires_at)

    def slots_between(self, after: datetime, until: datetime) -> list[Slot]:
        """Slots firing in the half-open window (after, until]."""
        tz = ZoneInfo(self.zone)
        # One day of slack either side: a gap-shifted slot can fire on the next local day.
        day = after.astimezone(tz).date() - timedelta(days=1)
        last_day = until.astimezone(tz).date() + timedelta(days=1)
        found: list[Slot] = []
        while day <= last_day:
            found.extend(s for s in self.permits_on(day) if after < s.fires_at <= until)
            day += timedelta(days=1)
        return sorted(found, key=lambda s: s.fires_at)

    def next_slot(self, after: datetime) -> Slot | None:
        """The first slot firing strictly after ``after``; None if none within eight years."""
        tz = ZoneInfo(self.zone)
        day = after.astimezone(tz).date() - timedelta(days=1)
        for _ in range(_SEARCH_HORIZON_DAYS):
            for slot in self.permits_on(day):
                if slot.fires_at > after:
                    return slot
            day += timedelta(days=1)
        return None

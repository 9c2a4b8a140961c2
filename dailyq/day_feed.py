"""A day's counts and change feed: what readers on a timer read instead of the whole day.

Every record write (the Lua helpers of scripts.shared.RECORD_LUA) keeps, in the same step,

* ``keys.day_counts(day)``: runs per (task, state), records per (task, slot), and the
  day's sequence number ``_seq``, bumped by every write;
* ``keys.day_changes(day)``: run id -> the ``_seq`` of its record's last write; it
  names every record of the day until it expires, a day after the last run it took in
  (scripts.shared.CHANGES_KEPT_S), and a reader that finds it short reads the day whole.

``read_counts`` is one HGETALL of a hash of a few fields per task and slot, whatever the
day's size (the outside heartbeat, metrics). ``DayView`` keeps a day's records in this
process and, once it has read them, fetches only the runs changed since its last look:
a refresh when nothing changed is one MULTI of three O(1) reads (the dashboard's
timeline, ``status --watch``, metrics).

A day an older version began (no ``_counted`` in its counts, during a rolling deploy or
after an upgrade) is counted once, in one script (RECOUNT_DAY), then kept; so is a day
whose counts do not add up to its number of records (HLEN), e.g. records an older
version added meanwhile. Changes an older version makes to existing records bump no
``_seq``: a DayView sees them at its next full read.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from datetime import date
from typing import Any

from redis import Redis

from .keys import Keys
from .redis_values import as_text
from .runs import RunRecord, decode_record
from .scripts import scripts_for

# Run ids per HMGET when fetching changed records.
FETCH_CHUNK = 1000


@dataclass(frozen=True)
class DayCounts:
    states: Counter  # (task, state) -> runs recorded in that state
    slots: Counter  # (task, slot ISO) -> runs recorded for that slot
    seq: int  # the day's last change (0: none by a version that keeps counts)

    def per_state(self) -> Counter:
        """state -> runs, over every task."""
        totals: Counter = Counter()
        for (_, state), number in self.states.items():
            totals[state] += number
        return totals


def parse_counts(raw: dict[Any, Any]) -> tuple[DayCounts, bool]:
    """The counts hash as read (HGETALL), and whether it covers every record (``_counted``)."""
    states: Counter = Counter()
    slots: Counter = Counter()
    fields = {as_text(field): int(value) for field, value in raw.items()}
    for field, number in fields.items():
        kind, _, rest = field.partition("|")
        if kind == "s":
            state, _, task = rest.partition("|")
            if number:
                states[(task, state)] += number
        elif kind == "r":
            # the slot is an ISO time (no "|"), the task name what follows it
            slot, _, task = rest.partition("|")
            if number:
                slots[(task, slot)] += number
    return DayCounts(states, slots, fields.get("_seq", 0)), "_counted" in fields


def read_counts(connection: Redis, keys: Keys, day: date) -> DayCounts:
    """The day's counts; counted afresh first (one RECOUNT_DAY) when they are missing or
    do not add up to the day's records."""
    with connection.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.day_counts(day))
        pipe.hlen(keys.day_runs(day))
        raw, records = pipe.execute()
    counts, counted = parse_counts(raw)
    if records == 0 or (counted and sum(counts.states.values()) == records):
        return counts
    scripts_for(connection).recount_day(runs_key=keys.day_runs(day), counts_key=keys.day_counts(day)).run()
    counts, _ = parse_counts(connection.hgetall(keys.day_counts(day)))
    return counts


class DayView:
    """One day's records, kept in this process and brought up to date from the change feed.

    ``refresh`` reads the whole day once (and again only when the feed cannot say what
    changed: Redis lost or expired the day, or an older version added records), then
    only the records written since. Thread-safe: one refresh at a time."""

    def __init__(self, connection: Redis, keys: Keys, day: date) -> None:
        self.connection = connection
        self.keys = keys
        self.day = day
        self.records: dict[str, RunRecord] = {}
        self.seq: int | None = None  # None: not read yet
        self.full_reads = 0
        self._lock = threading.Lock()

    def refresh(self) -> dict[str, RunRecord]:
        """The day's records now (a copy of the dict: callers may pop and add; the records
        themselves are shared and must not be changed)."""
        with self._lock:
            if self.seq is None or not self._follow():
                self._read_all()
            return dict(self.records)

    def _read_all(self) -> None:
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.day_counts(self.day), "_seq")
            pipe.hgetall(self.keys.day_runs(self.day))
            seq, raw = pipe.execute()
        self.records = {as_text(run_id): decode_record(value) for run_id, value in raw.items()}
        self.seq = int(seq or 0)
        self.full_reads += 1

    def _follow(self) -> bool:
        """Fetches the records changed since ``seq``; False when the feed cannot tell."""
        assert self.seq is not None
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.day_counts(self.day), "_seq")
            pipe.hlen(self.keys.day_runs(self.day))
            pipe.zrangebyscore(self.keys.day_changes(self.day), f"({self.seq}", "+inf")
            pipe.zcard(self.keys.day_changes(self.day))
            seq, stored, changed, in_feed = pipe.execute()
        now_seq = int(seq or 0)
        if now_seq < self.seq:
            return False  # the day's counts were lost or expired: its sequence started again
        if in_feed != stored:
            # The feed expired (CHANGES_KEPT_S after its last new run) and names only the
            # runs written since, or an older version wrote records without it.
            return False
        run_ids = [as_text(run_id) for run_id in changed]
        for at in range(0, len(run_ids), FETCH_CHUNK):
            chunk = run_ids[at:at + FETCH_CHUNK]
            for run_id, raw in zip(chunk, self.connection.hmget(self.keys.day_runs(self.day), chunk)):
                if raw is None:
                    self.records.pop(run_id, None)
                else:
                    self.records[run_id] = decode_record(raw)
        self.seq = now_seq
        # Every record came through the feed or the full read: a difference is records
        # written without the feed (an older version), read whole again.
        return len(self.records) == stored


class DayViews:
    """The DayView of each day asked for lately, for a process that serves several days
    (the dashboard): at most ``keep`` days are kept, the least recently asked go first."""

    def __init__(self, connection: Redis, keys: Keys, keep: int = 3) -> None:
        self.connection = connection
        self.keys = keys
        self.keep = keep
        self._views: dict[date, DayView] = {}
        self._lock = threading.Lock()

    def of(self, day: date) -> DayView:
        with self._lock:
            view = self._views.pop(day, None) or DayView(self.connection, self.keys, day)
            self._views[day] = view  # the most recent last
            while len(self._views) > self.keep:
                del self._views[next(iter(self._views))]
            return view

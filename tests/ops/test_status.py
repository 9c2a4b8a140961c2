"""ops/status.py's pieces that the end-to-end status tests (test_cli, test_runs, ...) do not
single out: the learned durations' read and the cycle collector's pause."""

from __future__ import annotations

import gc
from datetime import date, datetime, timezone

import pytest

from dailyq.fanout import DURATION_LOOKUP_CHUNK
from dailyq.ops import status
from dailyq.table import Task, TaskTable


def test_learned_durations_keep_sound_values_in_every_chunk_whether_or_not_it_has_a_bad_one(connection, keys):
    # One chunk all sound, one with a missing, a negative, a NaN and a non-number among
    # sound ones: the same rule for both.
    sound = {f"t-{i:012x}": str(i / 10) for i in range(DURATION_LOOKUP_CHUNK)}
    mixed = {"t-bad-negative": "-1", "t-bad-nan": "nan", "t-bad-text": "abc", "t-inf": "inf", "t-zero": "0"}
    connection.hset(keys.durations, mapping={**sound, **mixed})
    series = [*sound, *mixed, "t-missing"]
    assert len(series) > DURATION_LOOKUP_CHUNK  # two chunks

    learned = status.learned_durations(connection, keys, series)

    assert learned == {**{name: float(value) for name, value in sound.items()}, "t-inf": float("inf"), "t-zero": 0.0}


def test_learned_durations_of_a_chunk_with_a_nan_leave_the_nan_out_wherever_it_is(connection, keys):
    names = [f"t-{i}" for i in range(5)]
    for nan_at in range(5):
        connection.delete(keys.durations)
        connection.hset(keys.durations, mapping={name: "nan" if i == nan_at else "2.5" for i, name in enumerate(names)})
        assert status.learned_durations(connection, keys, names) == {
            name: 2.5 for i, name in enumerate(names) if i != nan_at}


def test_day_status_pauses_the_cycle_collector_only_while_it_builds_the_status(connection, keys, monkeypatch):
    table = TaskTable([Task(name="t", func="tests.tables.sample_tasks.progress", params=[1, 2], at="03:00")])
    seen: list[bool] = []
    real_day_runs = status.day_runs

    def day_runs(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_day_runs(*args, **kwargs)

    monkeypatch.setattr(status, "day_runs", day_runs)
    now = datetime(2026, 1, 5, 12, tzinfo=timezone.utc)
    assert gc.isenabled()
    shown = status.day_status(connection, keys, table, date(2026, 1, 5), now)
    assert [run["state"] for run in shown["runs"]] == ["missed", "missed"]
    assert seen == [False] and gc.isenabled()

    # Re-enabled when building the status fails, and left off when the caller had it off.
    monkeypatch.setattr(status, "day_runs", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        status.day_status(connection, keys, table, date(2026, 1, 5), now)
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(ZeroDivisionError):
            status.day_status(connection, keys, table, date(2026, 1, 5), now)
        assert not gc.isenabled()
    finally:
        gc.enable()

"""Grouping failures into run_failed and runs_failed digests (alert_digest.py): the rule as
a pure function of times, and the compare-and-set that applies a batch, on a real
redis-server."""

from __future__ import annotations

import json
from datetime import date

from dailyq.alerts.digest import Failure as F
from dailyq.alerts.digest import FailureAlerts, Window, digest_id, plan

DAY = date(2026, 11, 26)
G = 60_000  # the window, ms


def failure(n: int, task: str = "t", day: date = DAY) -> F:
    raw = json.dumps({"run_id": f"r{n}", "day": day.isoformat(), "task": task, "param_json": json.dumps(n),
                      "node": "node-1", "error": f"RuntimeError: boom {n}", "ended_at": "2026-11-26T10:00:00+00:00",
                      "attempts": 1})
    return F.decode(raw)


def test_a_first_failure_is_run_failed_and_the_next_ones_in_its_window_one_digest():
    first = plan([failure(1), failure(2), failure(3)], {}, now_ms=1_000, group_ms=G)
    assert [f.run_id for f in first.firsts] == ["r1"]
    assert {key: [f.run_id for f in members] for key, members in first.digests.items()} == {("t", 1_000): ["r2", "r3"]}
    assert first.windows == {"t": Window(1_000, 61_000, 2)}
    # Later in the same window: the same digest grows.
    later = plan([failure(4)], first.windows, now_ms=30_000, group_ms=G)
    assert not later.firsts and list(later.digests) == [("t", 1_000)] and later.windows["t"].count == 3


def test_a_storm_goes_on_in_chained_windows_and_a_quiet_window_ends_it():
    storm = {"t": Window(1_000, 61_000, 5)}
    chained = plan([failure(6)], storm, now_ms=70_000, group_ms=G)
    assert not chained.firsts and chained.windows["t"] == Window(61_000, 121_000, 1)
    quiet = {"t": Window(1_000, 61_000, 0)}  # its window had no failure after the run_failed
    again = plan([failure(7)], quiet, now_ms=70_000, group_ms=G)
    assert [f.run_id for f in again.firsts] == ["r7"] and again.windows["t"] == Window(70_000, 130_000, 0)
    long_after = plan([failure(8)], storm, now_ms=200_000, group_ms=G)  # a whole window without failures
    assert [f.run_id for f in long_after.firsts] == ["r8"]


def test_tasks_are_grouped_apart_and_a_window_of_zero_groups_nothing():
    mixed = plan([failure(1, "a"), failure(2, "b"), failure(3, "a")], {}, now_ms=0, group_ms=G)
    assert [f.run_id for f in mixed.firsts] == ["r1", "r2"] and list(mixed.digests) == [("a", 0)]
    off = plan([failure(1), failure(2)], {}, now_ms=0, group_ms=0)
    assert [f.run_id for f in off.firsts] == ["r1", "r2"] and not off.digests and off.windows == {"t": None}


def push(connection, keys, *failures: F) -> None:
    connection.rpush(keys.alert_failures, *[f.raw for f in failures])


def entries(connection, keys) -> dict[str, dict]:
    return {k.decode(): json.loads(json.loads(v)["payload"]) for k, v in connection.hgetall(keys.alert_entries).items()}


def test_a_batch_enters_the_outbox_once_and_a_digest_grows_in_place_until_its_window_ends(connection, settings):
    keys = settings.keys
    alerts = FailureAlerts(connection, keys, group_s=60, remember_s=86400)
    push(connection, keys, failure(1), failure(2, day=date(2026, 11, 20)))  # a backfilled day among them
    first = alerts.take()
    assert [a.event for a in first] == ["run_failed", "runs_failed"] and connection.llen(keys.alert_failures) == 0
    push(connection, keys, failure(3))
    (grown,) = alerts.take()
    stored = entries(connection, keys)
    assert sorted(stored) == sorted(["run_failed:r1:1", grown.alert_id])
    digest = stored[grown.alert_id]
    assert digest["count"] == 2 and [r["run_id"] for r in digest["runs"]] == ["r2", "r3"]
    assert digest["day"] is None and {r["day"] for r in digest["runs"]} == {"2026-11-20", "2026-11-26"}
    assert digest["runs"][0] == {"run_id": "r2", "param": 2, "node": "node-1", "error": "RuntimeError: boom 2",
                                 "day": "2026-11-20", "at": "2026-11-26T10:00:00+00:00", "attempts": 1}
    # Due when its window ends, not now: only run_failed can be claimed at once.
    window = Window.decode(connection.hget(keys.alert_groups, "t"))
    assert window is not None and connection.zscore(keys.alert_outbox, grown.alert_id) == window.until_ms
    assert grown.alert_id == digest_id("t", window.start_ms)


def test_a_batch_taken_meanwhile_or_a_digest_already_sent_writes_nothing(connection, settings):
    keys = settings.keys
    one = FailureAlerts(connection, keys, group_s=60, remember_s=86400)
    other = FailureAlerts(connection, keys, group_s=60, remember_s=86400)
    push(connection, keys, failure(1), failure(2))
    batch = [F.decode(raw) for raw in connection.lrange(keys.alert_failures, 0, -1)]
    assert len(other.take()) == 2  # another leader took it first
    assert one._apply(batch) is None  # stale: nothing written twice
    assert len(entries(connection, keys)) == 2 and connection.llen(keys.alert_failures) == 0
    # The digest went out (claimed as if its window had ended): a failure now must not
    # rewrite it, and goes into the chained window's digest instead.
    (digest_key,) = [k for k in entries(connection, keys) if k.startswith("runs_failed:")]
    connection.zrem(keys.alert_outbox, digest_key)
    connection.zadd(keys.alert_in_flight, {digest_key: 1})
    push(connection, keys, failure(3))
    batch = [F.decode(raw) for raw in connection.lrange(keys.alert_failures, 0, -1)]
    assert one._apply(batch) is None
    assert entries(connection, keys)[digest_key]["count"] == 1

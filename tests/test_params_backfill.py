"""Issue 13, items 2 and 4: params computed at the slot, and backfilling a range of days.

The leader runs in this process with an injected clock (fixed datetimes, no sleeping:
its decisions do not depend on the time of day); the workers and the commands are
separate OS processes against the session's redis-server, with the table of
tests/computed_tasks.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

from dailyq.backfill import MAX_RANGE_DAYS, day_summary, render_days
from dailyq.params_book import ParamsBook
from dailyq.scheduler import DailyScheduler
from dailyq.table import TaskTable, load_table
from dailyq.worker.workers import make_queue
from tests.helpers import executions, run_cli
from tests.test_cli import assert_clean_error, burst_worker

UTC = timezone.utc
DAY = date(2026, 11, 26)
SLOT = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)  # tests/computed_tasks.py: both tasks at 03:00 UTC


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def env(node_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("DAILYQ_TASKS", "tests.computed_tasks")
    return dict(node_env, DAILYQ_TASKS="tests.computed_tasks")


def leader_at(connection, settings, now: datetime, **computed: int) -> tuple[DailyScheduler, FakeClock]:
    """A leader of tests/computed_tasks.py's table, ``computed``'s fields changed by ``computed``."""
    tasks = [replace(t, **computed) if t.name == "computed" else t for t in load_table("tests.computed_tasks").tasks]
    clock = FakeClock(now)
    return DailyScheduler(connection, settings, TaskTable(tasks), clock=clock), clock


def calls(connection, prefix: str) -> int:
    return int(connection.get(f"{prefix}:test:params_calls") or 0)


def status_runs(env: dict[str, str], day: date = DAY) -> list[dict]:
    result = run_cli(["status", "--date", day.isoformat(), "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["runs"]


def of_task(runs: list[dict], task: str) -> list[dict]:
    return [run for run in runs if run["task"] == task]


def test_a_params_callable_returning_a_list_is_called_once_at_the_slot(env, connection, settings, prefix, tmp_path):
    before, _ = leader_at(connection, settings, SLOT - timedelta(seconds=1))
    before.run_once()
    assert calls(connection, prefix) == 0  # not before the slot
    waiting = of_task(status_runs(env), "computed")
    assert [(r["state"], r["param"], r["run_id"]) for r in waiting] == [
        ("missed", None, "computed-20261126T030000-params")]  # 2026 long past by Redis's clock

    before.clock.now = SLOT + timedelta(seconds=1)  # type: ignore[attr-defined]
    before.run_once()
    assert calls(connection, prefix) == 1
    computed = before.table.get("computed")
    stored = ParamsBook.read(connection, settings.keys, DAY).params_of(computed, computed.schedule.permits_on(DAY)[0])
    assert stored == ["2026-11-26-a-v1", "2026-11-26-b-v1"]
    # A new leader firing the same slot again (its cursor lost) reuses the stored list.
    connection.delete(settings.keys.leader, settings.keys.cursor)
    connection.set(f"{prefix}:test:params_version", 2)
    other, _ = leader_at(connection, settings, SLOT + timedelta(seconds=2))
    other.run_once()
    assert calls(connection, prefix) == 1
    assert make_queue(connection, settings.keys).count == 4  # two computed runs, two fixed ones

    burst_worker(env)
    runs = status_runs(env)
    assert sorted(r["param"] for r in of_task(runs, "computed")) == ["2026-11-26-a-v1", "2026-11-26-b-v1"]
    assert {r["state"] for r in runs} == {"finished"}
    seen = {e["param"]: e["context"]["day"] for e in executions(connection, prefix) if e["event"] == "start"}
    assert seen["2026-11-26-a-v1"] == "2026-11-26"
    report = run_cli(["report", "--date", DAY.isoformat(), "--out", str(tmp_path / "report.html")], env)
    assert report.returncode == 0 and "(4 runs)" in report.stdout, report.stdout + report.stderr


def test_a_raising_params_callable_shows_one_failed_entry_is_retried_and_others_go_on(env, connection, settings,
                                                                                      prefix):
    connection.set(f"{prefix}:test:params_mode", "raise")
    leader, clock = leader_at(connection, settings, SLOT + timedelta(seconds=1))
    leader.run_once()
    assert calls(connection, prefix) == 1
    runs = status_runs(env)
    (failed,) = of_task(runs, "computed")
    assert failed["state"] == "failed" and failed["run_id"] == "computed-20261126T030000-params"
    assert failed["param"] is None and failed["attempts"] == 1
    assert "RuntimeError: inventory for 2026-11-26 is not ready" in failed["error"]
    assert [r["state"] for r in of_task(runs, "fixed")] == ["queued", "queued"]  # the other task goes on
    text = run_cli(["status", "--date", DAY.isoformat()], env)
    assert "computed" in text.stdout and "params callable tests.computed_tasks.day_params raised" in text.stdout

    clock.now = SLOT + timedelta(seconds=9)  # the backoff is 10 s: not yet
    leader.run_once()
    assert calls(connection, prefix) == 1
    clock.now = SLOT + timedelta(seconds=12)  # second attempt, fails again; the next waits 20 s, till +32 s
    leader.run_once()
    assert calls(connection, prefix) == 2
    assert of_task(status_runs(env), "computed")[0]["attempts"] == 2

    connection.set(f"{prefix}:test:params_mode", "list")  # the inventory is there now
    clock.now = SLOT + timedelta(seconds=33)  # 12 + 20
    leader.run_once()
    assert calls(connection, prefix) == 3
    computed = of_task(status_runs(env), "computed")
    assert [(r["param"], r["state"]) for r in computed] == [("2026-11-26-a-v1", "queued"),
                                                           ("2026-11-26-b-v1", "queued")]
    clock.now = SLOT + timedelta(seconds=120)
    leader.run_once()
    assert calls(connection, prefix) == 3  # settled: never called again


def test_a_params_callable_failing_every_retry_stays_failed(env, connection, settings, prefix):
    connection.set(f"{prefix}:test:params_mode", "raise")
    leader, clock = leader_at(connection, settings, SLOT + timedelta(seconds=1), retries=1, retry_backoff_s=5)
    leader.run_once()
    for seconds in (7, 60, 600):
        clock.now = SLOT + timedelta(seconds=seconds)
        leader.run_once()
    assert calls(connection, prefix) == 2  # retries=1: two attempts, then it is left failed
    (failed,) = of_task(status_runs(env), "computed")
    assert failed["state"] == "failed" and failed["attempts"] == 2
    assert connection.zcard(settings.keys.params_retries) == 0


def test_a_params_callable_slower_than_the_leader_lease_still_gets_its_slot_fanned_out(env, connection, settings,
                                                                                    prefix):
    # The lease (2 s here) is renewed once per tick; the callable takes 3 s, inside the tick.
    connection.set(f"{prefix}:test:params_sleep_s", "3")
    leader, _ = leader_at(connection, replace(settings, lease_ttl_s=2), SLOT + timedelta(seconds=1))
    leader.run_once()
    assert calls(connection, prefix) == 1 and leader.is_leader
    assert [r["state"] for r in status_runs(env)] == ["queued"] * 4  # both tasks' runs, none lost


def test_a_retry_whose_fan_out_never_happened_is_fanned_out_by_the_next_look(env, connection, settings, prefix):
    # The list is stored by the retry, then the leader dies before its fan-out: the retry
    # entry stays due, and the next look fans out the stored list without calling again.
    from dailyq.params_book import retried, retry_due

    connection.set(f"{prefix}:test:params_mode", "raise")
    leader, clock = leader_at(connection, settings, SLOT + timedelta(seconds=1))
    leader.run_once()
    connection.set(f"{prefix}:test:params_mode", "list")
    later = SLOT + timedelta(seconds=600)
    table = leader.table
    first = retry_due(connection, settings.keys, table, later, settings.retention_s)  # ...and no fan-out
    assert len(first) == 2 and calls(connection, prefix) == 2
    assert connection.zcard(settings.keys.params_retries) == 1  # still due
    again = retry_due(connection, settings.keys, table, later, settings.retention_s)
    assert [r.run_id for r in again] == [r.run_id for r in first] and calls(connection, prefix) == 2
    clock.now = later
    leader.run_once()  # the leader's look: fans them out, then forgets the retry
    assert calls(connection, prefix) == 2
    assert connection.zcard(settings.keys.params_retries) == 0
    assert {r["state"] for r in status_runs(env) if r["task"] == "computed"} == {"queued"}
    retried(connection, settings.keys, first)  # idempotent


@pytest.mark.slow
def test_rerun_keeps_the_stored_list_unless_refresh_params(env, connection, prefix):
    first = run_cli(["trigger", "--date", DAY.isoformat(), "--task", "computed"], env)
    assert "enqueued 2 runs, 0 were already enqueued" in first.stdout, first.stdout + first.stderr
    burst_worker(env)
    connection.set(f"{prefix}:test:params_version", 2)  # the callable would answer differently now

    again = run_cli(["rerun", "computed", "--date", DAY.isoformat(), "--force"], env)
    assert again.returncode == 0 and "2 enqueued" in again.stdout, again.stdout + again.stderr
    assert calls(connection, prefix) == 1  # the stored list, not a new call
    trig = run_cli(["trigger", "--date", DAY.isoformat(), "--task", "computed"], env)
    assert "enqueued 0 runs, 2 were already enqueued" in trig.stdout and calls(connection, prefix) == 1
    burst_worker(env)
    starts = [e["param"] for e in executions(connection, prefix) if e["event"] == "start"]
    assert sorted(starts) == ["2026-11-26-a-v1"] * 2 + ["2026-11-26-b-v1"] * 2

    one = run_cli(["rerun", "computed", "--date", DAY.isoformat(), "--param", "2026-11-26-a-v1", "--force"], env)
    assert "1 enqueued" in one.stdout, one.stdout + one.stderr
    unknown = run_cli(["rerun", "computed", "--date", DAY.isoformat(), "--param", "2026-11-26-a-v2"], env)
    assert_clean_error(unknown, 2, "no param '2026-11-26-a-v2'", "2026-11-26-a-v1")

    refreshed = run_cli(["rerun", "computed", "--date", DAY.isoformat(), "--refresh-params"], env)
    assert refreshed.returncode == 0 and "2 enqueued" in refreshed.stdout, refreshed.stdout + refreshed.stderr
    assert calls(connection, prefix) == 2
    burst_worker(env)
    runs = of_task(status_runs(env), "computed")
    assert {r["param"]: r["state"] for r in runs if r["param"].endswith("v2")} == {
        "2026-11-26-a-v2": "finished", "2026-11-26-b-v2": "finished"}

    connection.set(f"{prefix}:test:params_mode", "raise")  # a refresh that fails keeps the list
    failed = run_cli(["rerun", "computed", "--date", DAY.isoformat(), "--refresh-params"], env)
    assert_clean_error(failed, 1, "inventory for 2026-11-26 is not ready", "keeps its stored list of 2")


@pytest.mark.slow
def test_backfill_over_three_days_runs_see_their_own_days(env, connection, prefix):
    days = ["2026-11-24", "2026-11-25", "2026-11-26"]
    result = run_cli(["trigger", "--from", days[0], "--to", days[-1]], env)
    assert result.returncode == 0, result.stderr
    for day in days:
        assert f"{day}: enqueued 4 runs, 0 were already enqueued" in result.stdout, result.stdout
    assert "3 days: enqueued 12 runs" in result.stdout
    again = run_cli(["trigger", "--from", days[0], "--to", days[-1], "--task", "fixed"], env)
    assert "3 days: enqueued 0 runs, 6 were already enqueued" in again.stdout, again.stdout

    burst_worker(env)
    starts = [e for e in executions(connection, prefix) if e["event"] == "start"]
    assert len(starts) == 12
    for event in starts:
        context = event["context"]
        assert context["slot"].startswith(context["day"])
        if context["task"] == "computed":  # computed for its own day, and run with it
            assert event["param"].startswith(context["day"])
    assert sorted({e["context"]["day"] for e in starts}) == days

    summary = run_cli(["status", "--from", days[0], "--to", days[-1], "--json"], env)
    assert summary.returncode == 0, summary.stderr
    objects = json.loads(summary.stdout)
    assert [d["date"] for d in objects] == days
    assert all(d["total"] == 4 and d["done"] == 4 and d["failed"] == 0 and d["states"]["finished"] == 4
               for d in objects)
    text = run_cli(["status", "--from", days[0], "--to", days[-1]], env)
    assert text.stdout.splitlines() == [f"{day}  4/4 done  0 failed" for day in days]


@pytest.mark.parametrize("args, fragment", [
    (["trigger", "--from", "2026-11-26", "--to", "2026-11-24"], "is after --to"),
    (["trigger", "--from", "2026-01-01", "--to", "2026-12-31"], f"more than the maximum of {MAX_RANGE_DAYS}"),
    (["status", "--from", "2026-01-01", "--to", "2026-03-01", "--json"], "spans 60 days"),
    (["trigger", "--date", "2026-11-26", "--from", "2026-11-24", "--to", "2026-11-26"], "cannot go together"),
    (["status", "--from", "2026-11-24"], "needs both --from"),
    (["status", "--from", "2026-11-24", "--to", "2026-11-25", "--watch"], "cannot be watched"),
    (["trigger", "--from", "24.11.2026", "--to", "2026-11-25"], "bad date"),
])
def test_bad_ranges_are_one_clean_line(env, args, fragment):
    assert_clean_error(run_cli(args, env), 2, fragment)


def test_day_summary_and_its_line():
    runs = [{"state": s} for s in ("finished", "finished", "failed", "running")]
    summary = day_summary(DAY, runs)
    assert summary["total"] == 4 and summary["done"] == 2 and summary["failed"] == 1
    assert summary["states"]["running"] == 1 and summary["states"]["missed"] == 0
    assert render_days([summary]) == "2026-11-26  2/4 done  1 failed  1 running"


def test_alerts_and_metrics_count_a_computed_slot_by_its_stored_list():
    from dailyq.alerts.events import lateness
    from dailyq.ops.metrics import runs_by_state
    from dailyq.params_book import ParamsBook, SlotParams, field_of

    task = load_table("tests.computed_tasks").get("computed")
    slot = task.schedule.permits_on(DAY)[0]
    after = SLOT + timedelta(minutes=5)  # within the misfire grace
    nothing = ParamsBook(DAY, {})
    failed = ParamsBook(DAY, {field_of(task, slot): SlotParams("computed", slot.isoformat(), error="boom",
                                                               attempts=1)})
    listed = ParamsBook(DAY, {field_of(task, slot): SlotParams("computed", slot.isoformat(), params=["p", "q"])})
    assert runs_by_state([task], {}, after, nothing) == {("computed", "scheduled"): 1}
    assert runs_by_state([task], {}, after, failed) == {("computed", "failed"): 1}
    assert runs_by_state([task], {}, after, listed) == {("computed", "scheduled"): 2}
    assert lateness(task, DAY, {}, after, failed).late == {"without params": 1}
    assert lateness(task, DAY, {}, after, listed).due == 2
    assert listed.fired_slots() == failed.fired_slots() == {("computed", slot.isoformat())}


def test_params_store_script_keeps_a_list_and_takes_only_later_failures(connection, settings):
    from dailyq.scripts import scripts_for

    keys = settings.keys
    connection.set(keys.leader, "me")

    def put(entry: dict, replace: bool = False, next_try_ms: int | None = None, owner: str | None = None):
        return scripts_for(connection).params_store(
            params_key=keys.day_params(DAY), retries_key=keys.params_retries, lease_key=keys.leader,
            field="t|20261126T030000", entry_json=json.dumps(entry), retention_s=60, replace=replace,
            retry_member="2026-11-26|t|20261126T030000", next_try_ms=next_try_ms, fence_owner=owner).run()

    assert put({"error": "e1", "attempts": 1}, next_try_ms=5000, owner="me")[0]
    assert connection.zscore(keys.params_retries, "2026-11-26|t|20261126T030000") == 5000
    assert put({"error": "late", "attempts": 1}) == (False, json.dumps({"error": "e1", "attempts": 1}))
    assert put({"error": "e2", "attempts": 2}, next_try_ms=9000)[0]
    assert put({"params": []})[0]  # a list, even an empty one, ends the retries
    assert connection.zcard(keys.params_retries) == 0
    assert put({"params": ["other"]}) == (False, json.dumps({"params": []}))
    assert put({"error": "e3", "attempts": 3}) == (False, json.dumps({"params": []}))
    assert put({"params": ["new"]}, replace=True)[0]
    assert put({"params": ["x"]}, replace=True, owner="not me") == (False, "lease")
    assert json.loads(connection.hget(keys.day_params(DAY), "t|20261126T030000")) == {"params": ["new"]}

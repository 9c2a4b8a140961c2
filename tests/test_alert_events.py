"""What is worth an alert and what it says (alert_events.py), and how a webhook URL is
shown (webhook_url.py): pure functions, fixed times."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from dailyq.alerts.events import (
    PAYLOAD_KEYS,
    day_late_alert,
    deadline_at,
    encode_payload,
    fired_slots,
    lateness,
    missed_slot_alerts,
    no_leader_alert,
    overdue_slots,
    run_failed_alert,
    runs_failed_alert,
    span_text,
    watched_days,
)
from dailyq.alerts.webhook_url import check_alert_url, redact_webhook_url
from dailyq.errors import ConfigError
from dailyq.runs import runs_of_slot
from dailyq.table import Task, TaskTable
from tests.sample_tasks import record

DAY = date(2026, 11, 27)


def task(**fields) -> Task:
    values = dict(name="report", func=record, params=["a", "b"], at="09:00", tz="Asia/Shanghai", deadline="12:00")
    values.update(fields)
    return TaskTable([Task(**values)]).tasks[0]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(timezone.utc)


def test_the_deadline_is_on_the_runs_day_or_the_next_when_not_after_its_first_slot():
    assert deadline_at(task(), DAY) == utc("2026-11-27T12:00:00+08:00")
    assert deadline_at(task(at="23:00", deadline="01:30"), DAY) == utc("2026-11-28T01:30:00+08:00")
    assert deadline_at(task(deadline="09:00"), DAY) == utc("2026-11-28T09:00:00+08:00")
    assert deadline_at(task(deadline=None), DAY) is None
    assert deadline_at(task(at=None, cron="0 9 * * mon"), DAY) is None  # a Friday: no run that day
    # A wall time in the spring-forward gap comes the gap's length later, as slots do.
    spring = task(at="01:00", deadline="02:30", tz="America/New_York")
    assert deadline_at(spring, date(2026, 3, 8)) == utc("2026-03-08T03:30:00-04:00")


def record_of(run, state: str, ended_at: str | None = None) -> dict:
    return {"task": run.task.name, "slot": run.slot.isoformat(), "state": state, "ended_at": ended_at,
            "param": run.param, "attempts": 1}


def test_lateness_counts_runs_not_finished_by_the_deadline_whenever_it_is_judged():
    report = task(params=["a", "b", "c", "d"])
    deadline = deadline_at(report, DAY)
    a, b, c, d = runs_of_slot(report, report.schedule.permits_on(DAY)[0])
    records = {a.run_id: record_of(a, "finished", "2026-11-27T03:59:59+00:00"),
               b.run_id: record_of(b, "finished", "2026-11-27T04:00:01+00:00"),
               c.run_id: record_of(c, "running")}
    found = lateness(report, DAY, records, deadline)
    assert found.due == 4 and dict(found.late) == {"finished late": 1, "running": 1, "not started": 1}
    alert = day_late_alert(report, DAY, found)
    assert alert.alert_id == "day_late:report:2026-11-27" and alert.day == DAY
    assert alert.payload["text"] == ("dailyq: report is late for 2026-11-27: 3 of 4 runs not finished by its deadline "
                                     "12:00 Asia/Shanghai (1 finished late, 1 not started, 1 running)")
    assert alert.payload["at"] == "2026-11-27T04:00:00+00:00"
    on_time = {r.run_id: record_of(r, "finished", "2026-11-27T03:00:00+00:00") for r in (a, b, c, d)}
    assert not lateness(report, DAY, on_time, deadline).late


def test_slots_after_the_deadline_are_not_due_by_it():
    hourly = task(at=None, cron="0 * * * *", params=["a"], deadline="02:30", tz="UTC")
    found = lateness(hourly, DAY, {}, deadline_at(hourly, DAY))
    assert found.due == 3  # 00:00, 01:00, 02:00


def test_a_failed_run_alert_has_exactly_the_payload_keys_and_one_line_of_text():
    report = task()
    run = runs_of_slot(report, report.schedule.permits_on(DAY)[0])[0]
    failed = dict(record_of(run, "failed", "2026-11-27T01:00:05+00:00"), node="node-2", attempts=3,
                  error="Traceback (most recent call last):\n  File x\nValueError: " + "x" * 5000)
    alert = run_failed_alert(DAY, run.run_id, failed, utc("2026-11-27T02:00:00+00:00"))
    assert alert.alert_id == f"run_failed:{run.run_id}:3"
    assert list(alert.payload) == list(PAYLOAD_KEYS)
    payload = alert.payload
    assert (payload["event"], payload["task"], payload["param"], payload["day"], payload["run_id"], payload["node"]) \
        == ("run_failed", "report", "a", "2026-11-27", run.run_id, "node-2")
    assert payload["at"] == "2026-11-27T01:00:05+00:00"
    assert len(payload["error"]) == 4000 and payload["error"].startswith("Traceback (most recent call last):\n")
    text = payload["text"]
    assert "\n" not in text and len(text) < 450
    assert text.startswith('dailyq: run failed: report("a") of 2026-11-27 on node-2 after 3 attempts: '
                           "Traceback (most recent call last): File x ValueError: xxx")
    assert list(__import__("json").loads(encode_payload(payload))) == list(PAYLOAD_KEYS)


def test_a_digest_names_every_run_and_its_text_the_first_three():
    runs = [{"run_id": f"r{n}", "param": n, "node": "node-1", "error": "E" * 900 + "\nmore", "day": "2026-11-27",
             "at": "2026-11-27T01:00:05+00:00", "attempts": 1, "extra": "dropped"} for n in range(5)]
    start_ms = int(utc("2026-11-27T01:00:00+00:00").timestamp() * 1000)
    alert = runs_failed_alert("report", start_ms, start_ms + 60_000, runs)
    payload = alert.payload
    assert alert.alert_id == f"runs_failed:report:{start_ms}" and list(payload) == list(PAYLOAD_KEYS)
    assert payload["count"] == 5 and [r["run_id"] for r in payload["runs"]] == ["r0", "r1", "r2", "r3", "r4"]
    assert all(list(r) == ["run_id", "param", "node", "error", "day", "at", "attempts"] for r in payload["runs"])
    assert all(len(r["error"]) == 500 for r in payload["runs"])
    assert payload["day"] == "2026-11-27" and payload["at"] == "2026-11-27T01:01:00+00:00"
    assert payload["run_id"] is None and payload["param"] is None and payload["tables"] is None
    text = payload["text"]
    assert text.startswith("dailyq: 5 more runs of report failed within 1m00s (from 2026-11-27T01:00:00+00:00 to ")
    assert "report(0) of 2026-11-27 on node-1: EEE" in text and "report(2)" in text and "report(3)" not in text
    assert text.endswith("; and 2 more (see runs)") and "\n" not in text and len(text) < 700
    other_day = runs_failed_alert("report", start_ms, start_ms + 60_000, [runs[0], dict(runs[1], day="2026-11-20")])
    assert other_day.payload["day"] is None  # runs of several days: no one day


def test_missed_slots_are_those_past_their_grace_with_no_run_recorded():
    report = task(at=None, cron="0 8,10 * * *", misfire_grace_s=600)
    eight, ten = report.schedule.permits_on(DAY)
    watched = utc("2026-11-26T00:00:00+00:00")
    now = utc("2026-11-27T10:05:00+08:00")
    assert overdue_slots(report, DAY, now) == [eight]
    alerts = missed_slot_alerts(report, [eight], set(), watched)
    assert [a.alert_id for a in alerts] == [f"slot_missed:report:{eight.label}"]
    assert alerts[0].payload["text"] == (f"dailyq: report slot {eight.isoformat()} never fired (no leader within its "
                                         "misfire grace of 10m00s); run it with: scheduler.py trigger --date "
                                         "2026-11-27 --task report")
    assert alerts[0].payload["at"] == "2026-11-27T00:10:00+00:00"
    later = utc("2026-11-27T11:00:00+08:00")
    assert overdue_slots(report, DAY, later) == [eight, ten]
    fired = fired_slots([{"task": "report", "slot": ten.isoformat()}])
    assert [a.alert_id for a in missed_slot_alerts(report, [eight, ten], fired, watched)] == [
        f"slot_missed:report:{eight.label}"]
    # A slot before any dailyq leader ever ran here was not missed by dailyq.
    alerts = missed_slot_alerts(report, [eight, ten], set(), utc("2026-11-27T09:00:00+08:00"))
    assert [a.alert_id for a in alerts] == [f"slot_missed:report:{ten.label}"]
    assert missed_slot_alerts(report, [eight, ten], set(), None) == []


def test_no_leader_names_the_gap_and_the_node_back():
    alert = no_leader_alert(1_795_000_000_000, 1_795_000_125_500, "node-2")
    assert alert.alert_id == "no_leader:1795000000000"
    assert alert.payload["text"] == ("dailyq: no scheduler held the leader lease for 2m05s (from "
                                     "2026-11-18T11:06:40+00:00 to 2026-11-18T11:08:45+00:00); node-2 leads again")
    assert (alert.payload["node"], alert.payload["day"], alert.payload["task"]) == ("node-2", None, None)
    assert [span_text(s) for s in (0, 59, 60, 3599, 3600, 7322)] == ["0s", "59s", "1m00s", "59m59s", "1h00m", "2h02m"]


def test_the_watched_days_are_today_and_yesterday_in_each_tasks_zone():
    table = TaskTable([task(), task(name="utc", tz="UTC")])
    days = watched_days(table, utc("2026-11-27T20:00:00+00:00"))  # 04:00 on the 28th in Shanghai
    assert {d.isoformat(): [t.name for t in tasks] for d, tasks in days.items()} == {
        "2026-11-26": ["utc"], "2026-11-27": ["report", "utc"], "2026-11-28": ["report"]}


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T0/B0/SECRET", "https://hooks.slack.com/…"),
    ("https://user:SECRET@example.com:8443/hook?token=SECRET#x", "https://example.com:8443/…"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),
    ("http://[::1]:9/SECRET", "http://[::1]:9/…"),
    ("https:///SECRET", "https://…"),
    ("hooks.slack.com/services/SECRET", "…"),
    ("https://host:SECRET/x", "https://host:?/…"),
])
def test_a_webhook_url_is_shown_without_its_path_query_or_credentials(url, shown):
    assert redact_webhook_url(url) == shown


def test_only_http_and_https_urls_with_a_host_are_accepted():
    assert check_alert_url(" https://hooks.slack.com/services/T/B/X ") == "https://hooks.slack.com/services/T/B/X"
    for bad in ("ftp://h/SECRET", "https:///SECRET", "mailto:SECRET@example.com", "https://h/a SECRET"):
        with pytest.raises(ConfigError) as error:
            check_alert_url(bad)
        assert "SECRET" not in str(error.value) and "\n" not in str(error.value)

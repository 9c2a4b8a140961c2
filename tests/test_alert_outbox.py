"""The alert outbox's scripts against a real redis-server, and one sender's delivery
against a real HTTP endpoint (http.server on 127.0.0.1): each alert enters once, one
sender holds it at a time, and it leaves when delivered, refused or given up."""

from __future__ import annotations

import json
import logging
import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from dailyq.alerts.alerter import AlertService
from dailyq.alerts.events import Alert, no_leader_alert
from dailyq.alerts.outbox import Claimed, Idle, Outbox
from dailyq.lease import Lease
from dailyq.runs import FAILED, new_record, runs_of_slot
from dailyq.settings import Settings
from dailyq.table import Task, TaskTable
from tests.helpers import noon_zone
from tests.sample_tasks import record
from tests.webhook_receiver import WebhookReceiver

DAY = date(2026, 11, 27)


def alert(n: int = 0, day: date = DAY) -> Alert:
    """A no_leader alert named ``no_leader:<n>``, remembered in ``day``'s set."""
    return Alert(f"no_leader:{n}", day, no_leader_alert(1_795_000_000_000, 1_795_000_100_000, "node-1").payload)


@pytest.fixture
def outbox(connection, settings) -> Outbox:
    return Outbox(connection, settings.keys, settings.retention_s)


def test_an_alert_enters_the_outbox_once_however_often_it_is_raised(outbox, connection, settings):
    assert outbox.enqueue([alert(1), alert(2, DAY - timedelta(days=1))]) == ["no_leader:1", "no_leader:2"]
    assert outbox.enqueue([alert(1), alert(2, DAY - timedelta(days=1)), alert(3)]) == ["no_leader:3"]
    assert outbox.counts() == (3, 0)
    assert connection.smembers(settings.keys.day_alerts(DAY)) == {b"no_leader:1", b"no_leader:3"}
    assert 0 < connection.ttl(settings.keys.day_alerts(DAY)) <= settings.retention_s + 2 * 86400


def test_one_sender_holds_an_alert_at_a_time_and_a_delivered_one_is_gone(outbox):
    outbox.enqueue([alert(1)])
    first = outbox.claim("sender-a", 30_000)
    assert isinstance(first, Claimed) and first.alert_id == "no_leader:1" and first.attempts == 0
    assert first.payload["event"] == "no_leader"
    later = outbox.claim("sender-b", 30_000)
    assert isinstance(later, Idle) and later.next_ms is not None and later.next_ms - later.now_ms > 29_000
    assert outbox.ack("no_leader:1", "sender-a") == "ours"
    assert outbox.counts() == (0, 0)
    idle = outbox.claim("sender-b", 30_000)
    assert isinstance(idle, Idle) and idle.next_ms is None
    assert outbox.enqueue([alert(1)]) == []  # delivered, and never again


def test_an_alert_whose_sender_went_quiet_goes_to_the_next_sender(outbox):
    outbox.enqueue([alert(1)])
    assert isinstance(outbox.claim("dead-sender", 50), Claimed)
    time.sleep(0.1)  # its claim runs out
    taken = outbox.claim("next-sender", 30_000)
    assert isinstance(taken, Claimed) and taken.alert_id == "no_leader:1"
    # The quiet one can no longer reschedule or drop it...
    assert not outbox.retry("no_leader:1", "dead-sender", 1000)
    assert not outbox.drop("no_leader:1", "dead-sender")
    # ...but a late 2xx of its POST still removes it: delivered is delivered.
    assert outbox.ack("no_leader:1", "dead-sender") == "taken"
    assert outbox.counts() == (0, 0)


def test_a_failed_delivery_waits_its_backoff_with_one_more_attempt(outbox):
    outbox.enqueue([alert(1)])
    claimed = outbox.claim("sender", 30_000)
    assert outbox.retry(claimed.alert_id, "sender", 60_000)
    idle = outbox.claim("sender", 30_000)
    assert isinstance(idle, Idle) and 59_000 <= idle.next_ms - idle.now_ms <= 60_000
    assert outbox.counts() == (1, 0)
    outbox.retry(claimed.alert_id, "sender", 0)  # not ours any more: nothing changes
    assert isinstance(outbox.claim("sender", 30_000), Idle)


def test_the_leadership_record_reports_a_gap_once_and_only_under_the_lease(outbox, connection, settings):
    keys = settings.keys
    lease = Lease(connection, keys.leader, "me", 5000)
    assert outbox.mark_leadership(keys.leader, "me", 60_000) == ("not-leader", None, None)
    assert lease.acquire_or_renew()
    outcome, _, now_ms = outbox.mark_leadership(keys.leader, "me", 60_000)
    assert outcome == "ok" and outbox.first_held_ms() == now_ms
    connection.hset(keys.leadership, "last_ms", now_ms - 61_000)  # as if nobody led for 61 s
    outcome, last_ms, later_ms = outbox.mark_leadership(keys.leader, "me", 60_000)
    assert (outcome, last_ms) == ("gap", now_ms - 61_000) and later_ms >= now_ms
    assert outbox.mark_leadership(keys.leader, "me", 60_000)[0] == "gap"  # until the caller has raised it
    assert outbox.mark_leadership(keys.leader, "me", 0)[0] == "ok"
    assert outbox.mark_leadership(keys.leader, "me", 60_000)[0] == "ok"
    assert outbox.first_held_ms() == now_ms


def service(connection, settings: Settings, url: str, table: TaskTable | None = None, **kwargs) -> AlertService:
    settings = Settings(**{**settings.__dict__, "alert_url": url, "alert_retry_s": 1, "alert_retry_max_s": 2})
    alerts = AlertService(connection, settings, table or TaskTable([]), **kwargs)
    alerts._leader_until = time.monotonic() + 3600  # as if its scheduler led
    return alerts


def test_a_delivered_alert_is_acked_before_its_answer_is_read(connection, settings, caplog):
    receiver = WebhookReceiver().start()
    try:
        alerts = service(connection, settings, receiver.url)
        alerts.outbox.enqueue([alert(1)])
        with caplog.at_level(logging.INFO, logger="dailyq.alerts"):
            alerts.deliver_due()
        assert [r["event"] for r in receiver.received] == ["no_leader"]
        assert receiver.headers[0]["X-Dailyq-Alert-Id"] == "no_leader:1"
        assert receiver.headers[0]["Content-Type"] == "application/json; charset=utf-8"
        assert alerts.outbox.counts() == (0, 0)
        assert f"delivered to http://127.0.0.1:{receiver.port}/… (HTTP 200)" in caplog.text
        assert "SECRETTOKEN" not in caplog.text
    finally:
        receiver.stop()


@pytest.mark.parametrize("status, retry_after, outcome", [
    (503, None, "retry"), (429, "7", "retry"), (404, None, "dropped"), (400, None, "dropped"),
])
def test_an_endpoint_that_fails_gets_the_alert_again_unless_it_refused_it(connection, settings, caplog, status,
                                                                           retry_after, outcome):
    receiver = WebhookReceiver().start()
    receiver.status, receiver.retry_after = status, retry_after
    try:
        alerts = service(connection, settings, receiver.url)
        alerts.outbox.enqueue([alert(1)])
        with caplog.at_level(logging.INFO, logger="dailyq.alerts"):
            rest_s = alerts.deliver_due()
        entries = connection.hvals(settings.keys.alert_entries)
        if outcome == "retry":
            assert [json.loads(e)["attempts"] for e in entries] == [1]
            assert rest_s == pytest.approx(float(retry_after or 1), abs=0.2)
            assert f"(HTTP {status}), attempt 1; next in" in caplog.text
        else:
            assert entries == [] and alerts.outbox.counts() == (0, 0)
            assert f"refused it with HTTP {status}" in caplog.text
        assert len(receiver.received) == 1
    finally:
        receiver.stop()


def test_an_alert_not_delivered_for_its_whole_life_is_dropped_and_logged(connection, settings, caplog):
    closed = WebhookReceiver()  # never started: connection refused
    alerts = service(connection, settings, closed.url, give_up_s=0.0)
    alerts.outbox.enqueue([alert(1)])
    with caplog.at_level(logging.INFO, logger="dailyq.alerts"):
        alerts.deliver_due()
    assert alerts.outbox.counts() == (0, 0)
    assert "dropped: not delivered to" in caplog.text and "(last: connection refused)" in caplog.text
    assert "SECRETTOKEN" not in caplog.text


def test_detection_raises_each_alert_once_whichever_leader_looks(connection, settings):
    keys = settings.keys
    zone = noon_zone()  # where the slot and the deadline are half a day past, whenever this runs
    late = Task(name="late", func=record, params=["a"], at="00:00:01", tz=zone, deadline="00:00:02")
    table = TaskTable([late])
    now = datetime.fromtimestamp(connection.time()[0], timezone.utc)
    today = now.astimezone(ZoneInfo(zone)).date()
    connection.hset(keys.leadership, "first_ms", int((now - timedelta(days=3)).timestamp() * 1000))
    (slot,) = late.schedule.permits_on(today)
    run_id = runs_of_slot(late, slot)[0].run_id
    failed = dict(new_record("late", '"a"', slot.isoformat(), run_id, FAILED), attempts=1, node="n1",
                  error="RuntimeError: boom", ended_at=slot.fires_at.isoformat())
    connection.hset(keys.day_runs(today), run_id, json.dumps(failed))
    # As FAIL records it: the failure event beside the record (scripts.NOTE_FAILED_LUA).
    connection.rpush(keys.alert_failures, json.dumps(dict(run_id=run_id, day=today.isoformat(), task="late",
                                                          param_json='"a"', node="n1", error="RuntimeError: boom",
                                                          ended_at=failed["ended_at"], attempts=1)))
    first = service(connection, settings, "http://127.0.0.1:9/x", table)
    raised = first.detect()
    # Today: the failed run, so the day is late too. Yesterday: the slot never fired,
    # so the day is late as well.
    yesterday = today - timedelta(days=1)
    (old_slot,) = late.schedule.permits_on(yesterday)
    assert sorted(raised) == sorted([f"run_failed:{run_id}:1", f"day_late:late:{today}", f"day_late:late:{yesterday}",
                                     f"slot_missed:late:{old_slot.label}"])
    assert first.detect() == []
    assert service(connection, settings, "http://127.0.0.1:9/x", table).detect() == []  # a new leader

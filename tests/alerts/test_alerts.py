"""Alerts end to end: schedulers and workers as separate processes (one NODE_NAME
each), a real redis-server, and a real HTTP endpoint (http.server on 127.0.0.1, in
the test) receiving the webhooks. Each alert must arrive exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from dailyq.alerts.events import PAYLOAD_KEYS
from dailyq.keys import Keys
from tests.support.helpers import ROOT, noon_zone, quiet_sample_at, run_cli, today_in, wait_for, wall_time_in
from tests.support.webhook_receiver import WebhookReceiver

# Retries of a failed delivery after 1 s, then at most 2 s apart (defaults: 5 s, 300 s).
FAST_RETRIES = dict(DAILYQ_ALERT_RETRY_S="1", DAILYQ_ALERT_RETRY_MAX_S="2")
SECRET = "SECRETTOKEN"  # in the receiver's path: must show in no log and no output


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


def failing_env(node_env: dict, url: str, slot_in_s: float = 4, **extra: str) -> tuple[dict, str]:
    """One run of ``sample`` that raises (retries=0), its slot a few seconds ahead in a
    zone where it is about noon (no midnight in the test, whenever it runs)."""
    zone = noon_zone()
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="explode", SAMPLE_PARAMS="1", SAMPLE_TZ=zone,
               SAMPLE_AT=wall_time_in(zone, slot_in_s), DAILYQ_ALERT_URL=url, **FAST_RETRIES)
    env.update(extra)
    return env, today_in(zone)


def records(connection, prefix: str, day: str) -> dict[str, dict]:
    from datetime import date

    raw = connection.hgetall(Keys(prefix).day_runs(date.fromisoformat(day)))
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def states(connection, prefix: str, day: str) -> list[str]:
    return [r["state"] for r in records(connection, prefix, day).values()]


def outbox_attempts(connection, prefix: str) -> list[int]:
    return [json.loads(v)["attempts"] for v in connection.hvals(Keys(prefix).alert_entries)]


def all_logs(processes) -> str:
    return "".join(processes.log_of(p) for p in processes.processes)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def test_a_failed_run_is_alerted_once_by_three_nodes(node_env, processes, webhook, connection, prefix):
    webhook.start()
    env, day = failing_env(node_env, webhook.url)
    for node in ("node-1", "node-2", "node-3"):
        processes.start("scheduler.py", dict(env, NODE_NAME=node))
        processes.start("worker_entry.py", dict(env, NODE_NAME=node))
    wait_for(lambda: states(connection, prefix, day) == ["failed"], timeout=40, what="the run to fail")
    wait_for(lambda: webhook.events("run_failed"), timeout=15, what="the run_failed alert within 15 s")
    time.sleep(5)  # a duplicate from any node would come by now
    assert len(webhook.received) == 1, webhook.received
    alert = webhook.received[0]
    assert list(alert) == list(PAYLOAD_KEYS)
    (run_id, record), = records(connection, prefix, day).items()
    assert alert["event"] == "run_failed" and alert["task"] == "sample" and alert["param"] == "任务参数0"
    assert alert["day"] == day and alert["run_id"] == run_id and alert["node"] == record["node"]
    assert "RuntimeError: boom for 任务参数0" in alert["error"] and alert["at"] == record["ended_at"]
    assert "\n" not in alert["text"] and "sample" in alert["text"] and "boom" in alert["text"]
    assert webhook.headers[0]["X-Dailyq-Alert-Id"] == f"run_failed:{run_id}:1"
    assert webhook.paths == [webhook.path]
    assert SECRET not in all_logs(processes)

    status = run_cli(["status", "--date", day], env)
    assert f"alerts: to http://127.0.0.1:{webhook.port}/…, 0 pending, 0 in flight" in status.stdout
    shown = json.loads(run_cli(["status", "--date", day, "--json"], env).stdout)["alerts"]
    assert shown == {"url": f"http://127.0.0.1:{webhook.port}/…", "pending": 0, "in_flight": 0}
    assert SECRET not in status.stdout + status.stderr


@pytest.mark.slow
def test_a_run_unfinished_at_the_deadline_is_alerted_once_as_day_late(node_env, processes, webhook, connection,
                                                                       prefix):
    webhook.start()
    zone = noon_zone()
    deadline_ts = int(time.time()) + 20  # HH:MM:SS cuts the fraction: the deadline is this second
    deadline = wall_time_in(zone, deadline_ts - time.time())
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="record", SAMPLE_SLEEP_S="60", SAMPLE_PARAMS="1",
               SAMPLE_TZ=zone, SAMPLE_AT=wall_time_in(zone, 3), SAMPLE_DEADLINE=deadline,
               DAILYQ_ALERT_URL=webhook.url, **FAST_RETRIES)
    day = today_in(zone)
    for node in ("node-1", "node-2"):
        processes.start("scheduler.py", dict(env, NODE_NAME=node))
    worker = processes.start("worker_entry.py", dict(env, NODE_NAME="node-1"))
    wait_for(lambda: states(connection, prefix, day) == ["running"], timeout=20, what="the 60 s run to start")
    wait_for(lambda: webhook.events("day_late"), timeout=30, what="the day_late alert")
    time.sleep(5)
    assert [a["event"] for a in webhook.received] == ["day_late"], webhook.received
    assert webhook.times[0] >= deadline_ts  # not before the deadline
    alert = webhook.received[0]
    assert list(alert) == list(PAYLOAD_KEYS)
    assert alert["task"] == "sample" and alert["day"] == day
    assert alert["param"] is None and alert["run_id"] is None and alert["node"] is None and alert["error"] is None
    assert alert["at"] == datetime.fromtimestamp(deadline_ts, timezone.utc).isoformat()
    shown = deadline.removesuffix(":00") if deadline.count(":") == 2 else deadline  # 12:12:00 reads 12:12
    assert f"sample is late for {day}: 1 of 1 run not finished by its deadline {shown} {zone} (1 running)" \
        in alert["text"]
    kill_group(worker)  # rather than waiting out the 60 s run at teardown


@pytest.mark.slow
def test_an_alert_raised_while_the_endpoint_is_down_arrives_once_when_it_is_up(node_env, processes, webhook,
                                                                               connection, prefix):
    env, day = failing_env(node_env, webhook.url)  # the receiver's port is closed: connection refused
    scheduler = processes.start("scheduler.py", dict(env, NODE_NAME="node-1"))
    processes.start("worker_entry.py", dict(env, NODE_NAME="node-1"))
    wait_for(lambda: states(connection, prefix, day) == ["failed"], timeout=40, what="the run to fail")
    failed_at = time.monotonic()
    wait_for(lambda: any(n >= 1 for n in outbox_attempts(connection, prefix)), timeout=15,
             what="a first delivery to fail")
    time.sleep(max(0.0, failed_at + 20 - time.monotonic()))
    webhook.start()
    wait_for(lambda: webhook.events("run_failed"), timeout=15, what="the alert once the endpoint is up")
    time.sleep(4)
    assert [a["event"] for a in webhook.received] == ["run_failed"]
    assert connection.zcard(Keys(prefix).alert_outbox) == connection.zcard(Keys(prefix).alert_in_flight) == 0
    log = processes.log_of(scheduler)
    assert f"not delivered to http://127.0.0.1:{webhook.port}/… (connection refused)" in log
    assert SECRET not in all_logs(processes)


def test_a_pending_alert_survives_the_leader_being_killed(node_env, processes, webhook, connection, prefix):
    env, day = failing_env(node_env, webhook.url)
    keys = Keys(prefix)
    first = processes.start("scheduler.py", dict(env, NODE_NAME="first"))
    wait_for(lambda: b'"first"' in (connection.get(keys.leader) or b""), timeout=15, what="first to lead")
    second = processes.start("scheduler.py", dict(env, NODE_NAME="second"))
    processes.start("worker_entry.py", dict(env, NODE_NAME="worker"))
    wait_for(lambda: states(connection, prefix, day) == ["failed"], timeout=40, what="the run to fail")
    wait_for(lambda: any(n >= 1 for n in outbox_attempts(connection, prefix)), timeout=15,
             what="the leader to try the endpoint")
    kill_group(first)
    wait_for(lambda: b'"second"' in (connection.get(keys.leader) or b""), timeout=15, what="second to lead")
    webhook.start()
    wait_for(lambda: webhook.events("run_failed"), timeout=20, what="the alert from the new leader")
    time.sleep(5)
    assert [a["event"] for a in webhook.received] == ["run_failed"], webhook.received
    assert "delivered to" in processes.log_of(second)


def test_a_stretch_without_a_leader_is_reported_once_when_one_is_back(node_env, processes, webhook, connection,
                                                                      prefix):
    webhook.start()
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_TZ=noon_zone(), SAMPLE_AT=wall_time_in(noon_zone(), 6 * 3600),
               DAILYQ_ALERT_URL=webhook.url, DAILYQ_ALERT_NO_LEADER_S="4", **FAST_RETRIES)
    keys = Keys(prefix)
    first = processes.start("scheduler.py", dict(env, NODE_NAME="first"))
    wait_for(lambda: connection.hget(keys.leadership, "last_ms"), timeout=15, what="first to lead")
    kill_group(first)
    time.sleep(7)  # the 2 s lease runs out; then 4 s and more without a leader
    processes.start("scheduler.py", dict(env, NODE_NAME="second"))
    processes.start("scheduler.py", dict(env, NODE_NAME="third"))
    wait_for(lambda: webhook.events("no_leader"), timeout=15, what="the no_leader alert")
    time.sleep(4)
    assert [a["event"] for a in webhook.received] == ["no_leader"], webhook.received
    alert = webhook.received[0]
    assert alert["node"] in ("second", "third") and alert["task"] is None and alert["day"] is None
    assert "no scheduler held the leader lease for" in alert["text"] and f"{alert['node']} leads again" in alert["text"]


def test_a_failed_run_of_a_backfilled_older_day_is_alerted(node_env, processes, webhook, connection, prefix):
    # Detection used to watch today and yesterday only: a failure of a day five days
    # back raised nothing. Now FAIL pushes its event in the same step, whatever the day.
    webhook.start()
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="explode", SAMPLE_PARAMS="1", SAMPLE_AT=quiet_sample_at(),
               DAILYQ_ALERT_URL=webhook.url, **FAST_RETRIES)
    processes.start("scheduler.py", dict(env, NODE_NAME="node-1"))
    processes.start("worker_entry.py", dict(env, NODE_NAME="node-1"))
    day = (datetime.now(timezone.utc).date() - timedelta(days=5)).isoformat()
    triggered = run_cli(["trigger", "--date", day, "--task", "sample"], env)
    assert triggered.returncode == 0, triggered.stderr
    wait_for(lambda: states(connection, prefix, day) == ["failed"], timeout=40, what="the backfilled run to fail")
    wait_for(lambda: webhook.events("run_failed"), timeout=15, what="the run_failed alert of the older day")
    time.sleep(3)
    (alert,) = webhook.received
    (run_id, record), = records(connection, prefix, day).items()
    assert alert["event"] == "run_failed" and alert["day"] == day and alert["run_id"] == run_id
    assert alert["node"] == "node-1" and "RuntimeError: boom" in alert["error"] and alert["at"] == record["ended_at"]
    assert alert["runs"] is None and alert["count"] is None and list(alert) == list(PAYLOAD_KEYS)
    assert connection.llen(Keys(prefix).alert_failures) == 0  # taken, not left to pile up


@pytest.mark.slow
def test_thirty_failures_of_one_task_are_at_most_three_posts_naming_all_thirty(node_env, processes, webhook,
                                                                             connection, prefix):
    webhook.start()
    # A 15 s window instead of the default 60 s: the test is of the grouping, not the default.
    # (A storm of up to 30 s is then 1 + 2 POSTs, however slowly a busy machine fails them.)
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="explode", SAMPLE_PARAMS="30", SAMPLE_AT=quiet_sample_at(),
               DAILYQ_ALERT_URL=webhook.url, DAILYQ_ALERT_GROUP_S="15", **FAST_RETRIES)
    for node in ("node-1", "node-2", "node-3"):
        processes.start("scheduler.py", dict(env, NODE_NAME=node))
        processes.start("worker_entry.py", dict(env, NODE_NAME=node))
    day = datetime.now(timezone.utc).date().isoformat()
    triggered = run_cli(["trigger", "--date", day, "--task", "sample"], env)
    assert triggered.returncode == 0, triggered.stderr
    wait_for(lambda: states(connection, prefix, day) == ["failed"] * 30, timeout=60, what="30 runs to fail")
    failed = records(connection, prefix, day)

    def named() -> set[str]:
        return {a["run_id"] for a in webhook.events("run_failed")} | {
            run["run_id"] for a in webhook.events("runs_failed") for run in a["runs"]}

    wait_for(lambda: named() == set(failed), timeout=50, what="alerts naming all 30 runs")
    time.sleep(5)  # a duplicate or a stray digest would come by now
    assert len(webhook.received) <= 3, [a["event"] for a in webhook.received]
    assert [a["event"] for a in webhook.received][0] == "run_failed"
    digests = webhook.events("runs_failed")
    assert digests and all(a["count"] == len(a["runs"]) for a in digests)
    assert sum(a["count"] for a in digests) + 1 == 30  # each run named once
    for alert in digests:
        assert list(alert) == list(PAYLOAD_KEYS) and alert["task"] == "sample" and alert["day"] == day
        assert "more runs of sample failed within 15s" in alert["text"] and "\n" not in alert["text"]
        for run in alert["runs"]:
            record = failed[run["run_id"]]
            assert run["param"] == json.loads(record["param_json"]) and run["node"] == record["node"]
            assert run["error"].startswith("RuntimeError: boom for") and run["day"] == day
    ids = [h["X-Dailyq-Alert-Id"] for h in webhook.headers]
    assert len(ids) == len(set(ids))  # each alert once, across three leaders-to-be


@pytest.mark.slow
def test_a_digest_waiting_for_its_window_survives_the_leader_being_killed(node_env, processes, webhook, connection,
                                                                         prefix):
    webhook.start()
    keys = Keys(prefix)
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="explode", SAMPLE_PARAMS="12", SAMPLE_AT=quiet_sample_at(),
               DAILYQ_ALERT_URL=webhook.url, DAILYQ_ALERT_GROUP_S="15", **FAST_RETRIES)
    first = processes.start("scheduler.py", dict(env, NODE_NAME="first"))
    wait_for(lambda: b'"first"' in (connection.get(keys.leader) or b""), timeout=15, what="first to lead")
    second = processes.start("scheduler.py", dict(env, NODE_NAME="second"))
    processes.start("worker_entry.py", dict(env, NODE_NAME="worker"))
    day = datetime.now(timezone.utc).date().isoformat()
    assert run_cli(["trigger", "--date", day, "--task", "sample"], env).returncode == 0
    wait_for(lambda: states(connection, prefix, day) == ["failed"] * 12, timeout=60, what="12 runs to fail")
    wait_for(lambda: any(k.startswith(b"runs_failed:") for k in connection.zrange(keys.alert_outbox, 0, -1)),
             timeout=15, what="the digest to wait in the outbox")
    kill_group(first)  # its digest is not due yet: the next leader must send it, once
    wait_for(lambda: webhook.events("runs_failed"), timeout=40, what="the digest from the new leader")
    time.sleep(3)
    events = [a["event"] for a in webhook.received]
    assert events == ["run_failed", "runs_failed"], events
    (digest,) = webhook.events("runs_failed")
    named = {webhook.events("run_failed")[0]["run_id"]} | {run["run_id"] for run in digest["runs"]}
    assert named == set(records(connection, prefix, day)) and digest["count"] == 11
    # Logged once the webhook has answered, after it has the digest: waited for, not raced.
    wait_for(lambda: "delivered to" in processes.log_of(second), timeout=10, what="the delivery's log line")


@pytest.mark.parametrize("url, problem", [
    (f"ftp://hooks.example.com/services/{SECRET}", "scheme 'ftp', not http or https"),
    (f"https:///services/{SECRET}", "no host"),
    (f"hooks.slack.com/services/{SECRET}", "no scheme"),
    (f"https://hooks.example.com:port/{SECRET}", "unreadable host or port"),
])
def test_a_bad_alert_url_stops_every_entry_point_with_one_line_and_the_url_hidden(node_env, url, problem):
    env = dict(node_env, DAILYQ_ALERT_URL=url)
    results = [run_cli([], env), run_cli(["status"], env), run_cli(["health"], env),
               subprocess.run([sys.executable, "worker_entry.py", "--burst"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)]
    for result in results:
        assert result.returncode == 2, (result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "bad DAILYQ_ALERT_URL" in lines[0] and problem in lines[0], lines[0]
        assert SECRET not in result.stderr + result.stdout and "/services" not in lines[0].split("e.g.")[0]


@pytest.mark.parametrize("name, value", [
    ("DAILYQ_METRICS_PORT", "nine"), ("DAILYQ_METRICS_PORT", "70000"), ("DAILYQ_ALERT_NO_LEADER_S", "0"),
    ("DAILYQ_ALERT_RETRY_S", "soon"),
])
def test_a_bad_alert_or_metrics_setting_is_one_line(node_env, name, value):
    result = run_cli([], dict(node_env, **{name: value}))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert name in result.stderr and "Traceback" not in result.stderr

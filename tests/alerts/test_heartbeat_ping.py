"""The outside heartbeat (heartbeat_ping.py): scheduler processes (one NODE_NAME each)
POSTing to a real HTTP endpoint in the test, a real redis-server, reached through a TCP
proxy the test cuts. Pings come from the leader alone, stop while no node leads or Redis
is cut off, and come back once things are. The body is checked without Redis."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import Counter
from datetime import date, datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dailyq.alerts.heartbeat_ping import heartbeat_body, runs_per_state
from dailyq.keys import Keys
from dailyq.redis_server import PrivateRedis, free_port
from dailyq.runs import BLOCKED, FAILED, FINISHED, MISSED, QUEUED, RUNNING, SCHEDULED, SKIPPED
from dailyq.timestamps import parse_iso
from tests.support.helpers import noon_zone, run_cli, today_in, wait_for, wall_time_in
from tests.support.tcp_proxy import TcpProxy
from tests.support.webhook_receiver import WebhookReceiver

SECRET = "SECRET-CHECK-UUID"  # in the receiver's path: must show in no log


@pytest.fixture
def receiver():
    found = WebhookReceiver(path=f"/ping/{SECRET}").start()
    yield found
    found.stop()


def quiet_env(env: dict, **extra: str) -> dict:
    """One task of 3 runs whose slot is hours away: a live scheduler fires nothing."""
    zone = noon_zone()
    return dict(env, SAMPLE_ONLY="1", SAMPLE_PARAMS="3", SAMPLE_TZ=zone, SAMPLE_AT=wall_time_in(zone, 6 * 3600),
                **extra)


def pings(receiver: WebhookReceiver, after: float = 0.0, before: float = float("inf")) -> list[tuple[float, dict]]:
    """(arrival time, body) of each POST that arrived between ``after`` and ``before``."""
    with receiver._lock:
        return [(at, dict(body)) for at, body in zip(receiver.times, receiver.received) if after < at < before]


def kill_group(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


# -- the body (pure) ------------------------------------------------------------------------


def test_the_body_counts_done_as_the_progress_line_does_and_every_state_in_total():
    at = datetime(2026, 12, 2, 7, 0, 5, tzinfo=timezone.utc)
    runs = {FINISHED: 5, FAILED: 2, SKIPPED: 1, BLOCKED: 1, RUNNING: 3, QUEUED: 4, SCHEDULED: 6, MISSED: 1}
    body = heartbeat_body("node-2", "2026-12-02T06:00:00+00:00", at, runs)
    assert body == {"event": "heartbeat", "node": "node-2", "leader_since": "2026-12-02T06:00:00+00:00",
                    "at": "2026-12-02T07:00:05+00:00", "today": {"done": 9, "total": 23, "failed": 2}}


def test_the_body_of_a_day_with_no_runs_says_zero():
    body = heartbeat_body("n", None, datetime(2026, 12, 2, tzinfo=timezone.utc), {})
    assert body["today"] == {"done": 0, "total": 0, "failed": 0} and body["leader_since"] is None


def test_the_body_of_runs_that_could_not_be_counted_says_null():
    body = heartbeat_body("n", "2026-12-02T06:00:00+00:00", datetime(2026, 12, 2, tzinfo=timezone.utc), None)
    assert body["today"] is None and body["node"] == "n"


def test_runs_per_state_sums_the_tasks():
    counts = Counter({("a", FINISHED): 2, ("b", FINISHED): 3, ("b", FAILED): 1})
    assert runs_per_state(counts) == {FINISHED: 5, FAILED: 1}


# -- real processes -------------------------------------------------------------------------


def test_only_the_leader_pings_none_while_no_node_leads_and_the_next_leader_resumes_at_once(
        node_env, processes, receiver):
    zone = noon_zone()
    # Three runs, one failing, a few seconds ahead: the pings then count a day that happened.
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="fail_some", SAMPLE_FAIL="任务参数0", SAMPLE_PARAMS="3",
               SAMPLE_TZ=zone, SAMPLE_AT=wall_time_in(zone, 3), DAILYQ_HEARTBEAT_URL=receiver.url,
               DAILYQ_HEARTBEAT_S="1")
    nodes = {name: processes.start("scheduler.py", dict(env, NODE_NAME=name)) for name in ("node-a", "node-b")}
    processes.start("worker_entry.py", dict(env, NODE_NAME="node-w"))
    wait_for(lambda: any(body["today"] == {"done": 3, "total": 3, "failed": 1} for _, body in pings(receiver)),
             timeout=40, what="a ping counting the day's 3 runs, 1 failed")
    time.sleep(3)
    seen = pings(receiver)
    leader = seen[-1][1]["node"]
    assert {body["node"] for _, body in seen} == {leader}, "a follower pinged"
    # One a period (1 s, by ticks of 1 s): none skipped, none doubled, over the last 3 s.
    steady = pings(receiver, after=seen[-1][0] - 3.0)
    assert 2 <= len(steady) <= 5, [at for at, _ in steady]

    kill_group(nodes[leader])
    killed_at = time.time()
    other = next(name for name in nodes if name != leader)
    wait_for(lambda: any(body["node"] == other for _, body in pings(receiver)), timeout=20,
             what=f"{other} to ping as the new leader")
    first_at, first = next((at, body) for at, body in pings(receiver) if body["node"] == other)
    since = parse_iso(first["leader_since"])
    assert since is not None
    # No node led between the kill and the new term (the 2 s lease ran out): no ping then.
    assert pings(receiver, after=killed_at + 0.5, before=since.timestamp()) == []
    assert since.timestamp() - killed_at > 1.0, "the new term began before the old lease could lapse"
    # The new leader pings in its first tick: within one period (1 s) of its term's start,
    # plus up to 1 s because the "since" it names is cut to the second.
    assert first_at - since.timestamp() <= 2.0, (first_at, first["leader_since"])
    assert first["today"] == {"done": 3, "total": 3, "failed": 1}
    logs = "".join(processes.log_of(p) for p in processes.processes)
    assert "outside heartbeat to http://127.0.0.1:" in logs and SECRET not in logs


class CutOff:
    """Redis made unreachable for a scheduler and back: ``cut``, through a TCP proxy that
    holds every byte (reads hang, as on a partition), or ``killed``, a redis-server of the
    test's own SIGKILLed and started again on its port, AOF on (reads fail at once)."""

    def __init__(self, how: str, session_server: PrivateRedis) -> None:
        self.how = how
        self.own = PrivateRedis(appendonly=True).start() if how == "killed" else None
        self.proxy = TcpProxy("127.0.0.1", session_server.port) if how == "cut" else None

    @property
    def url(self) -> str:
        return self.proxy.url() if self.proxy is not None else self.own.url  # type: ignore[union-attr]

    def lose(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()
        else:
            self.own.kill()  # type: ignore[union-attr]

    def restore(self) -> None:
        if self.proxy is not None:
            self.proxy.heal()
        else:
            self.own.start()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        if self.own is not None:
            self.own.cleanup()


@pytest.fixture(params=["cut", "killed"])
def outage(request, redis_server):
    found = CutOff(request.param, redis_server)
    yield found
    found.close()


def test_pings_stop_while_redis_is_unreachable_and_resume_within_a_period_once_it_is_back(
        outage, node_env, processes, receiver):
    # 3 s: a scheduler that met Redis down tries again every 2 s at most (scheduler.MAX_BACKOFF_S),
    # so a period of 3 s or more is resumed within one period (the default is 60 s).
    period_s = 3
    env = quiet_env(node_env, REDIS_URL=outage.url, DAILYQ_HEARTBEAT_URL=receiver.url,
                    DAILYQ_HEARTBEAT_S=str(period_s))
    scheduler = processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    wait_for(lambda: len(pings(receiver)) >= 2, timeout=30, what="two pings")
    outage.lose()
    lost_at = time.time()
    time.sleep(3 * period_s)  # three periods without Redis
    outage.restore()
    back_at = time.time()
    wait_for(lambda: pings(receiver, after=back_at), timeout=15, what="a ping once Redis is back")
    resumed_at = pings(receiver, after=back_at)[0][0]
    log_text = processes.log_of(scheduler)
    # A beat due just before Redis went may still be under way; none after that.
    assert pings(receiver, after=lost_at + 0.5, before=back_at) == [], log_text
    assert resumed_at - back_at <= period_s, (resumed_at - back_at, log_text)
    assert SECRET not in log_text


def test_a_failing_endpoint_is_logged_once_with_the_url_hidden_and_pings_go_on(node_env, processes, receiver):
    receiver.status = 503
    env = quiet_env(node_env, DAILYQ_HEARTBEAT_URL=receiver.url, DAILYQ_HEARTBEAT_S="1")
    scheduler = processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    wait_for(lambda: len(pings(receiver)) >= 3, timeout=30, what="three refused pings")
    receiver.status = 200
    answered = time.time()
    wait_for(lambda: "delivered again" in processes.log_of(scheduler), timeout=10, what="the recovery line")
    log_text = processes.log_of(scheduler)
    assert log_text.count("not delivered (HTTP 503)") == 1, log_text
    assert pings(receiver, after=answered) and SECRET not in log_text


def test_an_endpoint_slower_than_the_lease_never_holds_the_leaders_tick(node_env, processes, receiver):
    receiver.delay_s = 8.0  # past the sender's 5 s timeouts, and four times the 2 s lease
    env = quiet_env(node_env, DAILYQ_HEARTBEAT_URL=receiver.url, DAILYQ_HEARTBEAT_S="1")
    first = processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    wait_for(lambda: "node node-a is now the leader" in processes.log_of(first), timeout=20, what="node-a to lead")
    second = processes.start("scheduler.py", dict(env, NODE_NAME="node-b"))
    wait_for(lambda: len(pings(receiver)) >= 3, timeout=30, what="three slow pings")
    logs = processes.log_of(first) + processes.log_of(second)
    # A tick held by a POST would let the 2 s lease lapse: node-b would lead.
    assert "lost the leader lease" not in logs and "node node-b is now the leader" not in logs, logs
    assert {body["node"] for _, body in pings(receiver)} == {"node-a"}
    # One POST at a time, each given up after its 5 s timeout: no pile-up of beats.
    times = [at for at, _ in pings(receiver)]
    assert all(later - earlier >= 4.0 for earlier, later in zip(times, times[1:])), times
    assert "not delivered (no answer within 5s)" in logs


def test_a_record_that_cannot_be_read_still_pings_with_today_null(node_env, processes, receiver, connection, prefix):
    env = quiet_env(node_env, DAILYQ_HEARTBEAT_URL=receiver.url, DAILYQ_HEARTBEAT_S="1")
    day = date.fromisoformat(today_in(env["SAMPLE_TZ"]))
    connection.hset(Keys(prefix).day_runs(day), "sample-garbage", b"{not json")
    scheduler = processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    wait_for(lambda: len(pings(receiver)) >= 2, timeout=30, what="two pings")
    assert all(body["today"] is None for _, body in pings(receiver))
    assert processes.log_of(scheduler).count("could not count today's runs") == 1


def scrape_heartbeat(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:  # not listening yet
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dailyq_leader_heartbeat_timestamp_seconds":
                return float(sample.value)
    return None


def test_the_gauge_is_the_time_of_the_last_answered_ping(node_env, processes, receiver):
    receiver.status = 503
    port = free_port()
    env = quiet_env(node_env, DAILYQ_HEARTBEAT_URL=receiver.url, DAILYQ_HEARTBEAT_S="1",
                    DAILYQ_METRICS_PORT=str(port))
    processes.start("scheduler.py", dict(env, NODE_NAME="node-a"))
    wait_for(lambda: len(pings(receiver)) >= 2, timeout=30, what="refused pings")
    assert scrape_heartbeat(port) is None  # refused pings are no heartbeat
    receiver.status = 200
    wait_for(lambda: scrape_heartbeat(port) is not None, timeout=10, what="the gauge")
    value = scrape_heartbeat(port)
    assert value is not None
    answered = [at for at, _ in pings(receiver)][-3:]
    assert any(abs(value - at) < 0.5 for at in answered), (value, answered)


def test_without_a_url_the_gauge_follows_the_leaders_beats(node_env, processes):
    port = free_port()
    processes.start("scheduler.py", dict(quiet_env(node_env, DAILYQ_HEARTBEAT_S="1", DAILYQ_METRICS_PORT=str(port)),
                                         NODE_NAME="node-a"))
    wait_for(lambda: scrape_heartbeat(port) is not None, timeout=30, what="the gauge")
    first = scrape_heartbeat(port)
    wait_for(lambda: (scrape_heartbeat(port) or 0) > (first or 0), timeout=10, what="the gauge to move")


@pytest.mark.parametrize("name, value, problem", [
    ("DAILYQ_HEARTBEAT_S", "0", "must be at least 1"),
    ("DAILYQ_HEARTBEAT_S", "soon", "is not a whole number"),
    ("DAILYQ_HEARTBEAT_URL", f"hc-ping.com/{SECRET}", "no scheme"),
    ("DAILYQ_HEARTBEAT_URL", f"ftp://hc-ping.com/{SECRET}", "scheme 'ftp', not http or https"),
    ("DAILYQ_HEARTBEAT_URL", f"https://hc-ping.com:port/{SECRET}", "unreadable host or port"),
])
def test_a_bad_heartbeat_setting_stops_the_scheduler_with_one_line(node_env, name, value, problem):
    result = run_cli([], dict(node_env, **{name: value}))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert name in lines[0] and problem in lines[0] and SECRET not in result.stderr + result.stdout, lines[0]

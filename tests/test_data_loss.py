"""Redis that loses its data (issue 19, item 3): the generation mark, what the schedulers
remember and write back, the redis_data_lost alert. First the leader's decisions with an
injected clock against a private redis-server that the test empties (FLUSHALL), then
real node processes around a Redis restarted empty (test (d))."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import date, datetime, timezone
from typing import Iterator

import pytest
from redis import Redis

from dailyq.alerts.data_lost import DataLostAlerts
from dailyq.alerts.events import PAYLOAD_KEYS
from dailyq.commands import pause
from dailyq.generation import GenerationWatch, NodeMemory, parse_generation, read_data_loss
from dailyq.ops.render import render_table
from dailyq.ops.status import day_status
from dailyq.redis_server import PrivateRedis
from dailyq.scheduler import HEARTBEAT_EVERY_S, MAX_BACKOFF_S, TICK_S, DailyScheduler
from dailyq.settings import Settings
from dailyq.table import Task, TaskTable
from tests.support.helpers import base_env, executions, noon_zone, run_cli, today_in, wait_for, wall_time_in
from tests.support.webhook_receiver import WebhookReceiver
from tests.tables.sample_tasks import record

UTC = timezone.utc
DAY = date(2026, 11, 26)
LOSS_LINE = "Redis lost dailyq's data"
# Test (d)'s bounds, from Redis answering again after its restart (docs/failure-semantics.md).
# A pass's own round trips on a loaded machine: the one allowance that is not a setting.
PASS_S = 1.0
# Every scheduler reads the mark in its heartbeat, due HEARTBEAT_EVERY_S after its last try
# (made before Redis was back) and run by the first pass at or after that, which comes at
# most MAX_BACKOFF_S late when the loop is waiting out its outage backoff.
SCHEDULER_NOTICES_S = HEARTBEAT_EVERY_S + MAX_BACKOFF_S + PASS_S
# The first pass after Redis is back (within MAX_BACKOFF_S) takes the lease, which went with
# the data. With a slot within its grace due (after a loss the new term's cursors are empty,
# and the paused task's slot stays due), each leader tick reads the mark with the paused
# tasks, so the leader alerts in that pass, or at the next tick when the pass's heartbeat
# saw the loss before it took the lease. The alert is POSTed at once (alerts/direct.py).
ALERT_S = MAX_BACKOFF_S + TICK_S + PASS_S


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def at(hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2026, 11, 26, hour, minute, second, tzinfo=UTC)


@pytest.fixture
def own_redis() -> Iterator[PrivateRedis]:
    """A server of the test's own, without persistence: the test empties or restarts it."""
    with PrivateRedis(appendonly=False) as server:
        yield server


@pytest.fixture
def own(own_redis: PrivateRedis, prefix: str) -> tuple[Settings, Redis]:
    settings = Settings(redis_url=own_redis.url, prefix=prefix, node_name="node-a",
                        tasks_module="tests.tables.sample_tasks", lease_ttl_s=2, claim_ttl_s=6)
    client = Redis.from_url(own_redis.url)
    return settings, client


def two_tasks() -> TaskTable:
    return TaskTable([Task(name="t", func=record, params=["a", "b"], at="09:00", misfire_grace_s=600),
                      Task(name="u", func=record, params=["c"], at="09:00", misfire_grace_s=600)])


def test_the_first_process_marks_redis_and_the_others_adopt_the_mark(own):
    settings, connection = own
    first = GenerationWatch(connection, settings.keys, "node-a", "scheduler")
    second = GenerationWatch(connection, settings.keys, "node-b", "worker")
    assert first.check() is None and second.check() is None  # no loss at start: nothing to compare
    assert first.seen is not None and second.seen == first.seen
    assert first.check() is None  # the same mark: nothing to tell
    assert read_data_loss(connection, settings.keys) is None


def test_a_lost_mark_is_told_once_per_process_and_recorded_in_the_new_mark(own, caplog):
    settings, connection = own
    keys = settings.keys
    first = GenerationWatch(connection, keys, "node-a", "scheduler")
    second = GenerationWatch(connection, keys, "node-b", "worker")
    first.check(at(9, 0))
    second.check(at(9, 0))
    old = first.seen
    assert old is not None
    connection.flushall()
    lost = first.check(at(9, 1))
    assert lost is not None and lost.previous == old.token and lost.noticed_by == "node-a"
    assert lost.last_seen_ms == int(at(9, 0).timestamp() * 1000)
    assert second.check() == lost  # the second process adopts the mark the first wrote ...
    assert first.check() is None and second.check() is None  # ... and each tells it once
    assert caplog.text.count(LOSS_LINE) == 2
    shown = read_data_loss(connection, keys)
    assert shown is not None and shown["generation"] == lost.token and shown["previous"] == old.token
    assert shown["node"] == "node-a" and shown["last_seen"] == "2026-11-26T09:00:00+00:00" and shown["since"]


def test_a_mark_written_by_a_process_started_after_the_loss_is_completed_by_one_that_remembers(own):
    settings, connection = own
    keys = settings.keys
    running = GenerationWatch(connection, keys, "node-a", "scheduler")
    running.check()
    connection.flushall()
    fresh = GenerationWatch(connection, keys, "node-new", "worker")
    assert fresh.check() is None  # it cannot know: a mark without a loss
    assert parse_generation(connection.get(keys.generation)).lost_since_ms is None  # type: ignore[union-attr]
    lost = running.check()
    assert lost is not None and lost.token == fresh.seen.token  # type: ignore[union-attr]
    assert read_data_loss(connection, keys)["node"] == "node-a"  # type: ignore[index]


def test_written_back_cursors_are_only_raised_and_pauses_only_added(own):
    settings, connection = own
    keys = settings.keys
    connection.hset(keys.cursor, mapping={"t": "2026-11-26T09:00:00+00:00", "u": "2026-11-26T08:00:00+00:00"})
    connection.hset(keys.paused, "t", json.dumps({"since": "2026-11-26T09:30:00+00:00", "by": "node-now"}))
    memory = NodeMemory(connection, keys)
    memory.paused = {"t": json.dumps({"since": "old", "by": "node-old"}),
                     "v": json.dumps({"since": "2026-11-26T07:00:00+00:00", "by": "node-old"})}
    memory.cursors = {"t": "2026-11-26T08:30:00+00:00", "u": "2026-11-26T08:00:00.500000+00:00"}
    cursors, restored = memory.restore({"w": at(6, 0)})
    assert cursors == {"t": at(9, 0), "u": datetime(2026, 11, 26, 8, 0, 0, 500000, tzinfo=UTC), "w": at(6, 0)}
    assert restored == ["v"]  # t's pause in force since the loss stays as it is
    assert json.loads(connection.hget(keys.paused, "t"))["by"] == "node-now"  # type: ignore[arg-type]


def test_a_leader_fires_nothing_again_after_a_flush_and_keeps_the_pause(own):
    settings, connection = own
    keys = settings.keys
    table = two_tasks()
    clock = FakeClock(at(8, 59))
    scheduler = DailyScheduler(connection, settings, table, clock=clock)
    pause(connection, keys, table, ["u"], "node-x")
    assert scheduler.take_lease()
    scheduler.heartbeat()  # reads the mark and the paused tasks
    clock.now = at(9, 0, 30)
    assert scheduler.fire_due_slots(clock()) == 2  # t's two runs; u is paused
    connection.flushall()
    clock.now = at(9, 0, 40)
    assert scheduler.take_lease()  # the lease was gone: taken again, still the same term
    assert scheduler.fire_due_slots(clock()) == 0  # u was due: the mark was read, the pause written back
    assert connection.hget(keys.cursor, "t") is not None
    assert json.loads(connection.hget(keys.paused, "u"))["by"] == "node-x"  # type: ignore[arg-type]
    status = day_status(connection, keys, table, DAY, clock())
    assert status["redis_data_lost"]["node"] == "node-a" and set(status["paused"]) == {"u"}
    assert f"warning: {LOSS_LINE}: noticed at {status['redis_data_lost']['since']} by node-a" in render_table(status)


def test_a_new_term_after_a_restart_goes_on_from_the_cursors_the_leader_had(own, own_redis):
    settings, connection = own
    table = two_tasks()
    clock = FakeClock(at(8, 59))
    scheduler = DailyScheduler(connection, settings, table, clock=clock)
    assert scheduler.take_lease()
    scheduler.heartbeat()
    clock.now = at(9, 0, 30)
    assert scheduler.fire_due_slots(clock()) == 3
    own_redis.restart()  # empty: no persistence
    scheduler.is_leader = False  # as the scheduler's loop does on the connection error
    clock.now = at(9, 1)
    assert scheduler.take_lease()  # a new term loads the (empty) cursors ...
    assert scheduler.fire_due_slots(clock()) == 0  # ... but notices the loss before it fires
    assert {k.decode() for k in connection.hkeys(settings.keys.cursor)} == {"t", "u"}


def test_a_scheduler_that_never_led_remembers_the_cursors_it_read(own):
    settings, connection = own
    table = two_tasks()
    clock = FakeClock(at(8, 59))
    leader = DailyScheduler(connection, settings, table, clock=clock)
    standby = DailyScheduler(connection, replace(settings, node_name="node-b"), table,
                             clock=clock)
    assert leader.take_lease()
    assert not standby.take_lease()
    standby.heartbeat()
    clock.now = at(9, 0, 30)
    assert leader.fire_due_slots(clock()) == 3
    clock.now = at(9, 0, 40)
    standby.heartbeat()  # a standby's beat reads the cursors too
    connection.flushall()  # and the leader is gone with the lease
    clock.now = at(9, 1)
    assert standby.take_lease()
    assert standby.fire_due_slots(clock()) == 0


def test_the_alert_is_posted_directly_once_whichever_leaders_raise_it(own):
    settings, connection = own
    receiver = WebhookReceiver().start()
    try:
        alerting = replace(settings, alert_url=receiver.url)
        watch = GenerationWatch(connection, settings.keys, "node-a", "scheduler")
        watch.check()
        connection.flushall()
        lost = watch.check()
        assert lost is not None
        view = read_data_loss(connection, settings.keys)
        assert view is not None
        senders = [DataLostAlerts(connection, alerting), DataLostAlerts(connection, alerting)]
        for sender in senders * 2:
            sender.raise_for(view)
        wait_for(lambda: receiver.events("redis_data_lost"), timeout=10, what="the alert")
        for sender in senders:
            sender.stop()
        (alert,) = receiver.received
        assert list(alert) == list(PAYLOAD_KEYS)
        assert alert["node"] == "node-a" and alert["at"] == view["since"] and alert["day"] == view["since"][:10]
        assert LOSS_LINE in alert["text"] and lost.token in alert["text"]
        assert receiver.headers[0]["X-Dailyq-Alert-Id"] == f"redis_data_lost:{lost.token}"
    finally:
        receiver.stop()


# -- test (d): real processes, a Redis restarted empty mid-day ---------------------------

def told_at(log: str) -> float:
    """When a process logged the loss (its log line's time, this host's clock)."""
    line = next(line for line in log.splitlines() if LOSS_LINE in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # logging's asctime: local time


@pytest.mark.slow
def test_d_a_redis_restarted_empty_mid_day_is_told_and_fires_nothing_again(own_redis, redis_server, prefix,
                                                                             processes):
    """Two nodes (scheduler + worker each) on a Redis without persistence; a slot of
    ``limited`` fires and its runs finish; ``other`` (same slot) is paused. Redis is
    restarted empty. Executions are logged in the session's Redis, which keeps them."""
    webhook = WebhookReceiver().start()
    zone = noon_zone()
    slot = wall_time_in(zone, 10)
    env = base_env(own_redis.url, prefix, DAILYQ_TASKS="tests.tables.limit_tasks", LIMIT_AT=slot, LIMIT_TZ=zone,
                   OTHER_AT=slot, OTHER_TZ=zone, LIMIT_PARAMS="2", OTHER_PARAMS="2", SAMPLE_SLEEP_S="0.2",
                   SAMPLE_LOG_URL=redis_server.url, DAILYQ_ALERT_URL=webhook.url,
                   DAILYQ_ALERT_RETRY_S="1", DAILYQ_ALERT_RETRY_MAX_S="2")
    day = today_in(zone)
    logs = Redis.from_url(redis_server.url)
    data = Redis.from_url(own_redis.url)
    try:
        assert run_cli(["pause", "other"], dict(env, NODE_NAME="n1")).returncode == 0
        started = []
        for node in ("n1", "n2"):
            started.append(processes.start("scheduler.py", dict(env, NODE_NAME=node)))
            started.append(processes.start("worker_entry.py", dict(env, NODE_NAME=node)))

        def finished() -> int:
            return sum(json.loads(v)["state"] == "finished" for v in data.hvals(f"{prefix}:day:{day}:runs"))

        wait_for(lambda: finished() == 2, timeout=40, what="the slot's two runs to finish")
        time.sleep(7)  # every scheduler's beat (every 5 s) has read the cursors and the pause since
        assert [e["param"] for e in executions(logs, prefix) if e["event"] == "start"].count("L0") == 1

        own_redis.restart()  # the same port, empty: every client reconnects
        back_at = time.time()  # restart() returns once the new server answers PING
        data = Redis.from_url(own_redis.url)
        wait_for(lambda: all(LOSS_LINE in processes.log_of(p) for p in started), timeout=40,
                 what="every process to tell of the loss")
        wait_for(lambda: webhook.events("redis_data_lost"), timeout=20, what="the redis_data_lost alert")
        told_s = [told_at(processes.log_of(p)) - back_at for p in started]  # scheduler, worker, per node
        alerted_s = next(t for body, t in zip(webhook.received, webhook.times)
                         if body["event"] == "redis_data_lost") - back_at
        print(f"after the restart: loss told by the schedulers in {told_s[0]:.2f}s and {told_s[2]:.2f}s, "
              f"the workers in {told_s[1]:.2f}s and {told_s[3]:.2f}s; alert delivered in {alerted_s:.2f}s")
        assert max(told_s[0::2]) <= SCHEDULER_NOTICES_S, told_s
        assert alerted_s <= ALERT_S, alerted_s
        wait_for(lambda: data.exists(f"{prefix}:leader"), timeout=10, what="a leader after the restart")
        time.sleep(4)  # a re-fired slot, or the paused task's, would have run by now

        starts = [e["param"] for e in executions(logs, prefix) if e["event"] == "start"]
        assert sorted(starts) == ["L0", "L1"], starts  # nothing ran again, and nothing of the paused task
        status = json.loads(run_cli(["status", "--date", day, "--json"], env).stdout)
        assert set(status["paused"]) == {"other"} and status["paused"]["other"]["by"] == "n1"
        lost = status["redis_data_lost"]
        assert lost is not None and lost["since"] and lost["previous"] and lost["node"] in ("n1", "n2")
        text = run_cli(["status", "--date", day], env).stdout
        assert f"{LOSS_LINE}: noticed at {lost['since']}" in text
        (alert,) = webhook.events("redis_data_lost")
        assert alert["at"] == lost["since"] and lost["generation"] in alert["text"]
        assert all(p.poll() is None for p in started), "a process died"
        for process, (role, node) in zip(started, [(r, n) for n in ("n1", "n2") for r in ("scheduler", "worker")]):
            told = processes.log_of(process).count(f"{role} on node {node}: {LOSS_LINE}")
            assert told == 1, processes.log_of(process)
    finally:
        webhook.stop()

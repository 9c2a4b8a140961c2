"""The one direct path (alert_direct.py): ``redis_full`` and ``redis_data_lost`` reach the
webhook while Redis cannot take the outbox's writes -- here, a Redis that does not
answer at all (a closed port), and a real HTTP endpoint."""

from __future__ import annotations

from dataclasses import replace

from redis import Redis

from dailyq.alerts.alerter import AlertService
from dailyq.alerts.data_lost import DataLostAlerts
from dailyq.alerts.events import PAYLOAD_KEYS, redis_full_alert
from dailyq.redis_server import free_port
from dailyq.settings import Settings
from dailyq.table import TaskTable
from tests.support.helpers import wait_for
from tests.support.webhook_receiver import WebhookReceiver

VIEW = {"since": "2026-11-27T01:00:04+00:00", "generation": "g2", "previous": "g1", "node": "n1", "last_seen": None}


def no_redis(settings: Settings, url: str) -> tuple[Settings, Redis]:
    """Settings whose Redis is a closed port: every write, the outbox's too, fails."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = replace(settings, redis_url=dead, alert_url=url, alert_retry_s=1, alert_retry_max_s=2)
    return settings, Redis.from_url(dead, socket_connect_timeout=0.5)


def test_redis_full_and_redis_data_lost_go_out_once_each_with_no_redis_to_write_to(settings):
    receiver = WebhookReceiver().start()
    try:
        dead, connection = no_redis(settings, receiver.url)
        alerts = AlertService(connection, dead, TaskTable([]))
        delivered: list[bool] = []
        full = redis_full_alert(1796160191258, "n1", "used 3.9 MiB of maxmemory 3.6 MiB")
        assert alerts.send_direct(full, on_delivered=lambda: delivered.append(True))
        assert not alerts.send_direct(full)  # each id once
        lost = DataLostAlerts(connection, dead)
        lost.raise_for(VIEW)
        lost.raise_for(VIEW)
        wait_for(lambda: len(receiver.received) == 2, timeout=15, what="both direct alerts")
        wait_for(lambda: delivered == [True], timeout=5, what="redis_full's delivery noted")
        alerts.stop()
        lost.stop()
        assert sorted(a["event"] for a in receiver.received) == ["redis_data_lost", "redis_full"]
        assert all(list(a) == list(PAYLOAD_KEYS) for a in receiver.received)
        assert sorted(h["X-Dailyq-Alert-Id"] for h in receiver.headers) == ["redis_data_lost:g2",
                                                                          "redis_full:1796160191258"]
    finally:
        receiver.stop()


def test_a_direct_alert_is_retried_until_the_endpoint_answers(settings):
    receiver = WebhookReceiver()
    dead, connection = no_redis(settings, receiver.url)
    alerts = AlertService(connection, dead, TaskTable([]))
    try:
        alerts.send_direct(redis_full_alert(1, "n1", "memory"))
        wait_for(lambda: alerts.direct._waiting and alerts.direct._waiting[0].attempts >= 1, timeout=10,
                 what="a first failed attempt")
        receiver.start()
        wait_for(lambda: receiver.events("redis_full"), timeout=10, what="the retry")
    finally:
        alerts.stop()
        receiver.stop()
    assert len(receiver.received) == 1

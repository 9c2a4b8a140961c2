"""The Redis clock with fixed values: a TIME reply, host wall and monotonic times in,
Redis's time and the host's offset out. No sleeping; the last test asks a real server."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from redis.exceptions import ConnectionError as RedisConnectionError

from dailyq.clock import RedisClock, from_time_reply, read_server_time, server_now, utc_now

UTC = timezone.utc
REDIS_NOW = datetime(2026, 11, 27, 9, 0, 0, 250000, tzinfo=UTC)
TIME_REPLY = (int(REDIS_NOW.timestamp()), 250000)


class Host:
    """A host's two clocks, moved by hand: the wall clock (possibly wrong) and the
    monotonic one. Each read of either advances both by ``tick_s`` (time passing
    while we read them, e.g. across a round trip)."""

    def __init__(self, wall: datetime, monotonic_s: float = 1000.0, tick_s: float = 0.0) -> None:
        self.wall_now = wall
        self.mono_now = monotonic_s
        self.tick_s = tick_s

    def advance(self, seconds: float) -> None:
        self.wall_now += timedelta(seconds=seconds)
        self.mono_now += seconds

    def wall(self) -> datetime:
        now = self.wall_now
        self.advance(self.tick_s)
        return now

    def monotonic(self) -> float:
        now = self.mono_now
        self.advance(self.tick_s)
        return now


class FixedTime:
    """Stands in for a connection's TIME only (the rest of dailyq talks to a real server):
    a fixed reply, or an error, and a count of the calls."""

    def __init__(self, reply: tuple[int, int] | None = TIME_REPLY) -> None:
        self.reply = reply
        self.calls = 0

    def time(self) -> tuple[int, int]:
        self.calls += 1
        if self.reply is None:
            raise RedisConnectionError("Connection refused")
        return self.reply


def test_a_time_reply_is_an_aware_utc_datetime():
    assert from_time_reply(TIME_REPLY) == REDIS_NOW
    assert from_time_reply((b"1795770000", b"5")) == datetime.fromtimestamp(1795770000, UTC) + timedelta(microseconds=5)


def test_a_reading_takes_the_round_trips_midpoint():
    # Host wall clock 90 s fast; 0.1 s between each of the four clock reads around TIME.
    host = Host(REDIS_NOW + timedelta(seconds=90) - timedelta(seconds=0.15), tick_s=0.1)
    reading = read_server_time(FixedTime(), host.wall, host.monotonic)
    assert reading.server == REDIS_NOW
    # Wall reads at -0.15 and +0.15 around REDIS_NOW + 90: midpoint exactly 90 s ahead.
    assert abs(reading.offset_s - 90.0) < 1e-6
    # Monotonic reads were the 2nd and 3rd of the four: 1000.1 and 1000.2.
    assert abs(reading.monotonic_s - 1000.15) < 1e-6


def test_the_clock_says_redis_time_whatever_the_host_wall_clock_says():
    for wrong_by_s in (90.0, -90.0, -3600.0, 0.0):
        host = Host(REDIS_NOW + timedelta(seconds=wrong_by_s))
        clock = RedisClock(FixedTime(), wall=host.wall, monotonic=host.monotonic)
        assert clock() == REDIS_NOW
        assert clock.offset_s == wrong_by_s
        host.advance(2.5)
        assert clock() == REDIS_NOW + timedelta(seconds=2.5)


def test_between_readings_the_clock_follows_the_monotonic_clock_not_the_wall_clock():
    host = Host(REDIS_NOW)
    server = FixedTime()
    clock = RedisClock(server, refresh_every_s=5.0, wall=host.wall, monotonic=host.monotonic)
    clock()
    host.advance(1.0)
    host.wall_now += timedelta(hours=1)  # the wall clock is stepped (a bad NTP sync, a person)
    assert clock() == REDIS_NOW + timedelta(seconds=1)
    assert server.calls == 1  # no TIME per call: only every refresh_every_s


def test_time_is_asked_again_every_refresh_interval_and_the_offset_follows():
    host = Host(REDIS_NOW)
    server = FixedTime()
    clock = RedisClock(server, refresh_every_s=5.0, wall=host.wall, monotonic=host.monotonic)
    clock()
    host.advance(4.9)
    clock()
    assert server.calls == 1
    host.advance(0.2)
    server.reply = (TIME_REPLY[0] + 5, TIME_REPLY[1] + 100000)  # Redis at +5.1 s; the host's wall clock too
    host.wall_now += timedelta(seconds=3)  # ... then the host's wall clock jumped 3 s ahead
    assert clock() == REDIS_NOW + timedelta(seconds=5.1)
    assert server.calls == 2
    assert abs(clock.offset_s - 3.0) < 1e-6


def test_a_failed_time_keeps_the_last_reading_logs_once_and_retries(caplog):
    host = Host(REDIS_NOW + timedelta(seconds=90))
    server = FixedTime()
    clock = RedisClock(server, refresh_every_s=5.0, retry_after_s=1.0, wall=host.wall, monotonic=host.monotonic)
    clock()
    server.reply = None  # Redis goes away
    with caplog.at_level(logging.WARNING, logger="dailyq.clock"):
        for _ in range(8):  # 1 s to 8 s: due at 5 s, TIME fails at 5, 6, 7 and 8 s
            host.advance(1.0)
            assert clock() == REDIS_NOW + timedelta(seconds=host.mono_now - 1000.0)
    assert clock.offset_s == 90.0
    assert server.calls == 1 + 4
    assert [r.getMessage() for r in caplog.records] == [
        "cannot read Redis's TIME (Connection refused); using the last measured offset until it answers"]
    server.reply = (TIME_REPLY[0] + 9, TIME_REPLY[1])  # back: the next call reads it again
    host.advance(1.0)
    assert clock() == REDIS_NOW + timedelta(seconds=9)
    assert server.calls == 6


def test_before_any_reading_the_host_clock_is_all_there_is():
    host = Host(REDIS_NOW + timedelta(seconds=90))
    clock = RedisClock(FixedTime(reply=None), wall=host.wall, monotonic=host.monotonic)
    assert clock() == REDIS_NOW + timedelta(seconds=90)
    assert clock.offset_s is None


def test_against_a_real_server_the_offset_is_the_hosts_error(connection):
    # This process and redis-server share a machine: a host clock 90 s fast shows as +90 s.
    fast = RedisClock(connection, wall=lambda: utc_now() + timedelta(seconds=90))
    now = fast()
    assert abs(fast.offset_s - 90.0) < 0.5
    assert abs((now - server_now(connection)).total_seconds()) < 0.5


def test_a_scheduler_logs_once_when_its_clock_goes_off_and_once_when_it_is_back(connection, settings, table, caplog):
    from dailyq.scheduler import DailyScheduler

    scheduler = DailyScheduler(connection, settings, table)
    with caplog.at_level(logging.INFO, logger="dailyq.scheduler"):
        for offset_s in (0.2, 1.9, 90.0, 90.1, 2.5, 1.8, -1.0, -2.1, -90.0):
            scheduler._note_offset(offset_s)
    assert [r.getMessage() for r in caplog.records] == [
        "the clock of node test-node is 90.0s ahead of Redis's (more than 2s); slots still fire by Redis's clock, "
        "but fix this node's time sync (NTP)",
        "the clock of node test-node is back within 1.5s of Redis's (-1.0s)",
        "the clock of node test-node is 2.1s behind Redis's (more than 2s); slots still fire by Redis's clock, "
        "but fix this node's time sync (NTP)",
    ]

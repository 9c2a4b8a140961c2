"""The one place dailyq reads the wall clock, and Redis's clock, which every node shares.

Everything that needs "now" takes a ``Clock`` argument, so tests pass fixed datetimes
instead of sleeping or patching the world. ``utc_now`` is this host's clock;
``RedisClock`` is the Redis server's, the one the leader fires slots by: node clocks
drift and get set wrong (a node 90 s fast once fired a slot 39 s early), while every
node reads the same Redis.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Protocol

from redis.exceptions import RedisError

from .timestamps import iso, parse_iso  # noqa: F401 - kept importable from here, where callers look

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# How often a RedisClock asks Redis for TIME again: a round trip every few seconds, not
# one per tick. In between it counts on the host's monotonic clock, which a wrong or
# stepped wall clock does not move.
OFFSET_REFRESH_S = 5.0
# After a failed TIME, ask again this soon (meanwhile the last reading stands).
OFFSET_RETRY_S = 1.0


def utc_now() -> datetime:
    """Aware UTC now, by this host's clock."""
    return datetime.now(timezone.utc)


class ServerTime(Protocol):
    """What a RedisClock needs of a connection: Redis's TIME (a redis.Redis has it)."""

    def time(self) -> Any: ...


@dataclass(frozen=True)
class Reading:
    """One TIME round trip, referred to its midpoint: Redis answered at some moment
    between sending and receiving, and the midpoint is the best guess of when."""

    server: datetime       # what Redis's TIME said
    monotonic_s: float     # this host's monotonic clock at the midpoint
    offset_s: float        # this host's wall clock minus Redis's, at the midpoint (+ = host ahead)


def from_time_reply(reply: Any) -> datetime:
    """Redis's TIME reply ``(seconds, microseconds)`` as an aware UTC datetime."""
    seconds, micros = reply
    return datetime.fromtimestamp(int(seconds), timezone.utc) + timedelta(microseconds=int(micros))


def read_server_time(connection: ServerTime, wall: Clock = utc_now,
                     monotonic: Callable[[], float] = time.monotonic) -> Reading:
    """Ask Redis for TIME once; raises RedisError when it cannot answer."""
    wall_before, mono_before = wall(), monotonic()
    reply = connection.time()
    mono_after, wall_after = monotonic(), wall()
    server = from_time_reply(reply)
    wall_mid = wall_before + (wall_after - wall_before) / 2
    return Reading(server=server, monotonic_s=(mono_before + mono_after) / 2,
                   offset_s=(wall_mid - server).total_seconds())


def server_now(connection: ServerTime) -> datetime:
    """Redis's clock now, one round trip: for one-shot commands (status, health)."""
    return from_time_reply(connection.time())


class RedisClock:
    """A ``Clock`` that reads the Redis server's time, and this host's offset from it.

    Each reading (one TIME, at most every ``refresh_every_s``) anchors Redis's time to
    the host's monotonic clock; between readings "now" is that anchor plus the
    monotonic time elapsed. So a wall clock minutes off, or stepped by NTP between two
    readings, moves nothing. If TIME fails, the last reading stands (a monotonic clock
    drifts by milliseconds a day) and TIME is asked again after ``retry_after_s``;
    before any reading at all, the host's clock is the best there is.
    """

    def __init__(self, connection: ServerTime, refresh_every_s: float = OFFSET_REFRESH_S,
                 retry_after_s: float = OFFSET_RETRY_S, wall: Clock = utc_now,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.refresh_every_s = refresh_every_s
        self.retry_after_s = retry_after_s
        self._wall = wall
        self._monotonic = monotonic
        self.reading: Reading | None = None
        self._next_refresh_s = float("-inf")
        self._failing = False

    def __call__(self) -> datetime:
        self.refresh_if_due()
        return self.estimate()

    @property
    def offset_s(self) -> float | None:
        """This host's wall clock minus Redis's at the last reading; None before any."""
        return self.reading.offset_s if self.reading else None

    def refresh_if_due(self) -> None:
        if self._monotonic() < self._next_refresh_s:
            return
        try:
            self.reading = read_server_time(self.connection, self._wall, self._monotonic)
        except RedisError as exc:
            # A clock must not take its process down with Redis: the loops around it
            # have their own outage handling, so say it once and go on.
            if not self._failing:
                log.warning("cannot read Redis's TIME (%s); using %s until it answers", exc,
                            "the last measured offset" if self.reading else "this host's clock")
                self._failing = True
            self._next_refresh_s = self._monotonic() + self.retry_after_s
            return
        self._failing = False
        self._next_refresh_s = self.reading.monotonic_s + self.refresh_every_s

    def estimate(self) -> datetime:
        """Redis's time now from the last reading, without asking Redis."""
        if self.reading is None:
            return self._wall()
        return self.reading.server + timedelta(seconds=self._monotonic() - self.reading.monotonic_s)

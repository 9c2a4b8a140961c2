"""Riding out Redis outages: retry with backoff, log once per change of state.

A worker that has done a run's work must still record it, so the guard's writes
wait for Redis to come back (up to a bound) instead of failing the run.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

T = TypeVar("T")

# Errors that mean "Redis is not there right now"; anything else is a real failure.
TRANSIENT = (ConnectionError, TimeoutError, BusyLoadingError)
MAX_BACKOFF_S = 5.0


class OutageLog:
    """Logs the first failure of an outage and the recovery, nothing in between."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.down_since: float | None = None

    def failed(self, error: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.logger.error("Redis unavailable during %s (%s); retrying with backoff", self.what, error)

    def recovered(self) -> None:
        if self.down_since is not None:
            self.logger.info("Redis reachable again after %.1fs; %s resumes", time.monotonic() - self.down_since,
                             self.what)
            self.down_since = None


def through_outage(call: Callable[[], T], outage: OutageLog, give_up_after_s: float) -> T:
    """``call()``, retried across transient Redis errors for up to ``give_up_after_s``."""
    deadline = time.monotonic() + give_up_after_s
    backoff_s = 0.2
    while True:
        try:
            result = call()
        except TRANSIENT as error:
            outage.failed(error)
            if time.monotonic() + backoff_s > deadline:
                raise
            time.sleep(backoff_s)
            backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
            continue
        outage.recovered()
        return result


def wait_for_redis(ping: Callable[[], object], outage: OutageLog) -> None:
    """Block until ``ping()`` succeeds; a process that must stay up calls this."""
    through_outage(ping, outage, give_up_after_s=float("inf"))

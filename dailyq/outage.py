"""Riding out Redis outages: retry with backoff, log once per change of state.

A worker that has done a run's work must still record it, so the guard's writes
wait for Redis to come back (up to a bound) instead of failing the run.

A Redis out of memory (``maxmemory`` reached with ``noeviction``) is an outage too: it
answers, but refuses every write that may add data ("OOM command not allowed when used
memory > 'maxmemory'"). Such a refusal is transient here, never a crash; and since every
loop and thread of a process meets it at once, it is logged once per process and
episode, naming Redis's memory (``MEMORY``), not once per place that met it. The
episode ends when the process's main loop finds writes accepted again
(redis_memory.writes_accepted), which logs one line more.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
    TimeoutError,
)

T = TypeVar("T")

# Errors that mean "Redis is not there right now"; anything else is a real failure.
TRANSIENT = (ConnectionError, TimeoutError, BusyLoadingError)
MAX_BACKOFF_S = 5.0
# What Redis says when it refuses a write for memory; redis-py makes it an
# OutOfMemoryError, except when a script (on Redis 6) met it: a plain ResponseError then.
OOM_TEXT = "command not allowed when used memory > 'maxmemory'"

log = logging.getLogger(__name__)


def refused_for_memory(error: BaseException) -> bool:
    """Whether Redis refused this command (or the transaction or script it was in)
    because it is out of memory."""
    return isinstance(error, OutOfMemoryError) or (isinstance(error, ResponseError) and OOM_TEXT in str(error))


def transient(error: BaseException) -> bool:
    """Redis is away, loading, or out of memory: worth waiting for, not a failure."""
    return isinstance(error, TRANSIENT) or refused_for_memory(error)


class MemoryNotice:
    """This process's view of Redis refusing writes for memory: one ERROR line when an
    episode starts (naming used_memory and maxmemory, from INFO memory), one INFO line
    when it ends, whichever thread or loop met it. One per process (``MEMORY``); a forked
    work-horse inherits its worker's and stays quiet (its worker logs for it)."""

    def __init__(self) -> None:
        self.since: float | None = None  # monotonic
        self.process = "this process"
        self.quiet = False
        self._describe: Callable[[], str] = lambda: "memory figures unknown"

    def name(self, process: str, describe: Callable[[], str]) -> None:
        """Who this process is, in its lines, and how to put its Redis's memory in words
        (redis_memory.describer: INFO memory, read when a line is written)."""
        self.process = process
        self._describe = describe

    @property
    def full(self) -> bool:
        return self.since is not None

    def refused(self, what: str | None = None) -> bool:
        """Redis refused a write; True when this starts an episode (and logged it)."""
        if self.since is not None:
            return False
        self.since = time.monotonic()
        (log.debug if self.quiet else log.error)(
            "Redis is out of memory (%s) and refuses writes; %s goes on, retrying with backoff%s; "
            "raise maxmemory or free memory (docs/deploy.md)", self.describe(), self.process,
            f" (first refused: {what})" if what and what != self.process else "")
        return True

    def accepted(self) -> None:
        """Writes work again: the episode ends."""
        if self.since is None:
            return
        (log.debug if self.quiet else log.info)("Redis accepts writes again after %.1fs (%s); %s resumes",
                                                 time.monotonic() - self.since, self.describe(), self.process)
        self.since = None

    def describe(self) -> str:
        """``used 20.1 MiB of maxmemory 20.0 MiB, maxmemory-policy noeviction``, as far as
        INFO can be read."""
        try:
            return self._describe()
        except RedisError as exc:
            return f"INFO memory unreadable: {exc}"


# The one per process (see MemoryNotice).
MEMORY = MemoryNotice()


class OutageLog:
    """Logs the first failure of an outage and the recovery, nothing in between."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.down_since: float | None = None
        self.memory = False  # the failure was Redis refusing a write for memory

    def failed(self, error: Exception) -> None:
        if refused_for_memory(error):
            # Logged once per process (MEMORY), not once per place that met it.
            self.memory = True
            MEMORY.refused(self.what)
            return
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.logger.error("Redis unavailable during %s (%s); retrying with backoff", self.what, error)

    def recovered(self) -> None:
        # After a refusal for memory this call worked, which says nothing about writes in
        # general (a FINISH is allowed on a full Redis): MEMORY.accepted says when they work.
        self.memory = False
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
        except RedisError as error:
            if not transient(error):
                raise
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

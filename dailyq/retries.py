"""Retries whose backoff has passed, moved back to the queue by the leader.

RQ schedules a retry with backoff in its ScheduledJobRegistry; RQ's own scheduler (a
process each worker may start) moves it back to the queue when due. That process
dies with a Redis outage and its lock outlives it, so another one takes over only
after a minute or more. The leader therefore moves due retries of our queue itself,
every tick, whatever kind of worker runs the jobs; the two movers may both run.

Due is judged by the Redis server's clock (one clock for every node). The move is a
WATCH/MULTI on the registry: two movers racing over one job push it once, or, against
RQ's own unwatched scheduler, at worst twice -- and the guard never lets two copies
of a run execute (the second waits for the claim, then sees the run finished).
"""

from __future__ import annotations

import logging
from datetime import datetime

from redis import Redis, WatchError
from rq import Queue

from .redis_values import as_text
from .rq_seam import ScheduledRetries

log = logging.getLogger(__name__)

CHUNK_SIZE = 500


class DueRetries:
    def __init__(self, connection: Redis, queue: Queue) -> None:
        self.connection = connection
        self.queue = queue
        self.registry = ScheduledRetries(connection, queue)  # RQ's registry and move: the seam's

    def move_due(self, now: datetime) -> int:
        """Enqueue every scheduled job of our queue due at ``now`` (the scheduler's clock,
        Redis's); returns how many. One cheap look when nothing is due: it runs every tick."""
        now_s = now.timestamp()
        if not self.connection.zrangebyscore(self.registry.key, 0, now_s, start=0, num=1):
            return 0
        moved = 0
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.registry.key)
                    due = [as_text(j) for j in pipe.zrangebyscore(self.registry.key, 0, now_s, start=0, num=CHUNK_SIZE)]
                    if not due:
                        return moved
                    self.registry.enqueue_in(due, pipe)
                    pipe.execute()
                except WatchError:
                    continue  # RQ's scheduler (or a previous leader) moved some meanwhile: look again
                moved += len(due)
                log.info("moved %d retr%s whose backoff has passed back to the queue", len(due),
                         "y" if len(due) == 1 else "ies")

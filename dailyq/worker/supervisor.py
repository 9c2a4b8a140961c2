"""This node's worker process: RQ workers run one after another, for as long as the
node is up.

RQ's work loop quits on an unexpected error (typically Redis going away between
jobs); a node's worker must stay up, so a fresh RQ worker (a new generation, so a
new name) starts once Redis answers again. It stops for good only when RQ was asked
to stop (SIGTERM/SIGINT) or, in burst mode, once a dequeue found the queue empty.
cli.py's ``worker_main`` parses the arguments and sets the process up; workers.py is the
RQ worker itself.
"""

from __future__ import annotations

import logging
import os

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import StopRequested

from ..beats import forget_worker, worker_member
from ..generation import GenerationWatch
from ..outage import MEMORY, OutageLog, refused_for_memory, transient, wait_for_redis
from ..redis_memory import wait_for_writes
from ..settings import Settings
from ..table import TaskTable
from .workers import DailySimpleWorker, DailyWorker, worker_name

# The logger these lines had when the loop lived in cli.py: log filters (and the JSON
# logs' "logger" field) may match on it.
log = logging.getLogger("dailyq.cli")


# A burst worker whose RQ loop stops before the queue is empty starts again this many
# times; a loop that keeps stopping (a bug, not an outage) then exits non-zero.
BURST_RESTARTS_MAX = 5


def supervise_worker(connection: Redis, settings: Settings, table: TaskTable, *, simple: bool, burst: bool) -> int:
    """Run RQ workers until one is asked to stop (or, with ``burst``, until the queue is
    empty); return the process's exit code."""
    worker_class = DailySimpleWorker if simple else DailyWorker
    generation = 0
    burst_restarts = 0
    # One for the process: a loss of Redis's data is noticed (and logged once) across the
    # RQ workers started after an outage (generation.py).
    watch = GenerationWatch(connection, settings.keys, settings.node_name, "worker")
    while True:
        worker = worker_class(settings=settings, table=table, connection=connection,
                              name=worker_name(settings.node_name, generation), generation=watch)
        stopped_by: Exception = RuntimeError("the RQ work loop stopped")
        try:
            # with_scheduler: RQ's own scheduler moves retries-with-backoff back to the queue.
            if worker.work(burst=burst, with_scheduler=True, logging_level="INFO"):
                burst_restarts = 0  # it got on with the queue: count stops in a row only
        except RedisError as exc:  # away, or out of memory: this process waits, it does not exit
            if not transient(exc):
                raise
            stopped_by = exc
        except StopRequested:
            # SIGTERM while a fresh worker still waited to register (its handler is RQ's,
            # raising when the worker is not busy): a stop like any other.
            worker.shutdown_requested = True
        # SIGTERM/SIGINT asked it to stop (rq_seam.GuardedWorker.handle_warm_shutdown_request),
        # or a burst found the queue empty. A burst whose RQ loop ended otherwise (RQ ends it
        # on a Redis timeout, or on any error, after logging it) is not done: its jobs would
        # stay queued behind an exit code 0. It goes on as a long-running worker does.
        if worker.shutdown_requested or (burst and worker.drained):
            _forget_self(connection, settings)
            return 0
        if burst:
            burst_restarts += 1
            if burst_restarts > BURST_RESTARTS_MAX:
                log.error("worker on node %s: its RQ work loop stopped %d times in a row before the queue was empty "
                          "(see the errors above); giving up with exit code 1", settings.node_name, burst_restarts)
                _forget_self(connection, settings)
                return 1
        if refused_for_memory(stopped_by) or MEMORY.full:
            # Redis answers pings while it refuses writes: wait for writes, not for a ping
            # (and no "reachable again" line: the memory notice has the episode's lines).
            MEMORY.refused(f"worker on node {settings.node_name}")
            wait_for_writes(connection, settings.keys)
            MEMORY.accepted()
        else:
            outage = OutageLog(log, f"worker on node {settings.node_name}")
            outage.failed(stopped_by)
            wait_for_redis(connection.ping, outage)
        generation += 1


def _forget_self(connection: Redis, settings: Settings) -> None:
    """A clean stop leaves the node's worker count at once, not when its beat expires.
    Best effort: if Redis cannot be told, the beat expires anyway."""
    try:
        forget_worker(connection, settings.keys, settings.node_name, worker_member(os.getpid()))
    except RedisError as exc:
        log.warning("could not remove this worker from node %s's live workers: %s", settings.node_name, exc)

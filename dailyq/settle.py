"""The leader settles runs whose job RQ failed outside the guard.

A record says ``queued``, ``running`` or ``waiting`` only while something backs it (a
queue entry, a retry, a set-aside list, a waiting entry, a claim). RQ can take that away
without the guard seeing it: a job whose worker could not run it (its table lacked the
task), a work-horse killed while it waited for a busy claim, a job RQ's own clean-up of
abandoned jobs failed. Such a job lands in RQ's failed job registry of our queue, and
from there the leader records its run ``failed`` with RQ's reason ("RQ failed the job:
..."), within a look or two (``SETTLE_EVERY_S``), through SETTLE_FAILED (Lua), which
checks that nothing else backs the record any more.

One reason is not the run's: RQ fails a job whose start Redis refused for memory (a
work-horse's start transaction, BEGIN in it, refused on a full Redis). Nothing ran, so
that job goes back to the queue's front instead (REQUEUE_ORPHANED: only while nothing
else backs the record), and the run is run once Redis accepts writes again.

It learns of them from what changed, not by re-reading days: RQ scores a failed entry
by its expiry, the worker host's clock + the job's ``failure_ttl``, and every job of a
run is enqueued with ``failure_ttl`` = retention (fanout.job_data, rq/registry.py
``FailedJobRegistry.add``), so the score order is the order of failure. The leader
reads on from where it stopped (``_after``), one ZRANGEBYSCORE when nothing failed.
Scores come from the workers' clocks, in whole seconds: an entry of a worker whose
clock is behind can land below where the leader already read. So the cursor kept in
Redis (``keys.rq_failed_seen``, for the next leader) trails the reading by
``SKEW_S``, and every ``LATE_LOOK_S`` the leader reads again from it; entries it
already handled (same job, same score) are skipped. Entries scored beyond now +
retention + ``SKEW_S`` (an ad-hoc job with a longer ``failure_ttl``) are not read
until then, and are not runs of ours anyway.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import date
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job

from .clock import Clock, iso
from .keys import Keys
from .outage import OOM_TEXT
from .recovery import requeue_orphaned_job
from .redis_values import as_text
from .rq_seam import RQKeys
from .runs import META_KEY
from .scripts import scripts_for

log = logging.getLogger(__name__)

# How far a worker host's clock may be off Redis's for its failed jobs to be found
# within a late look (the clock warning is at 2 s; tests run nodes 90 s off).
SKEW_S = 300
# How often the leader looks (each look is one ZRANGEBYSCORE when nothing failed).
SETTLE_EVERY_S = 5.0
# How often it reads again from the trailing cursor, for entries scored behind its reading.
LATE_LOOK_S = 30.0
# A leader that finds no cursor (the first one to run this code) looks this far back.
LOOKBACK_S = 86_400
# Entries read per look; a full batch goes on at the next tick.
BATCH = 1000
# How often, at most, the cursor is written to Redis (only the next leader reads it).
PERSIST_EVERY_S = 10.0


@dataclass(frozen=True)
class Settled:
    run_id: str
    job_id: str
    error: str
    day: date | None = None  # the run's day (its downstream runs are marked blocked from it)


class FailedJobs:
    """The leader's look at RQ's failed job registry of our queue (see the module docstring)."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, retention_s: int, clock: Clock) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.retention_s = retention_s
        self.clock = clock  # Redis's time (the scheduler's RedisClock): what RQ's scores are near
        self.registry_key = RQKeys(queue).failed
        self._scripts = scripts_for(connection)
        self.forget()

    def forget(self) -> None:
        """Start again from the cursor in Redis (a new term of leadership: another leader
        may have read on meanwhile)."""
        self._cursor: float | None = None  # trails the reading by SKEW_S; kept in Redis
        self._after = -math.inf  # where the next read starts (inclusive)
        self._skip = 0  # entries at exactly ``_after`` already read (scores are whole seconds)
        self._handled: dict[str, float] = {}  # job id -> the score it was handled at
        self._next_look_s = -math.inf
        self._next_late_look_s = -math.inf
        self._persisted: float | None = None
        self._persisted_at_s = -math.inf

    def settle(self) -> list[Settled]:
        """Settle the runs of jobs RQ failed since the last look; returns what it settled."""
        now = self.clock()
        now_s = now.timestamp()
        if now_s < self._next_look_s:
            return []
        expected = now_s + self.retention_s  # the score of one of our jobs failing now
        if self._cursor is None:
            stored = self.connection.get(self.keys.rq_failed_seen)
            self._cursor = float(as_text(stored)) if stored is not None else expected - LOOKBACK_S
        if now_s >= self._next_late_look_s:
            self._after, self._skip = self._cursor, 0
            self._next_late_look_s = now_s + LATE_LOOK_S
        self._after = max(self._after, self._cursor)
        read: list[Any] = self.connection.zrangebyscore(
            self.registry_key, self._after, expected + SKEW_S, start=self._skip, num=BATCH, withscores=True)
        entries = [(as_text(job_id), float(score)) for job_id, score in read]
        fresh = [(job_id, score) for job_id, score in entries if self._handled.get(job_id) != score]
        settled = self._settle_jobs([job_id for job_id, _ in fresh], iso(now)) if fresh else []
        self._handled.update(fresh)
        self._move_on(entries, expected, now_s)
        # Work found: look again at the next tick (a full batch goes on); else in a while.
        self._next_look_s = now_s if len(entries) == BATCH else now_s + SETTLE_EVERY_S
        return settled

    def _move_on(self, entries: list[tuple[str, float]], expected: float, now_s: float) -> None:
        assert self._cursor is not None
        if len(entries) == BATCH:
            last = entries[-1][1]
            at_last = sum(1 for _, score in entries if score == last)
            self._skip = self._skip + at_last if last == self._after else at_last
            self._after = last
        else:
            # Everything up to now + retention + SKEW_S is read: the next read starts at
            # what a worker whose clock is right can score next.
            self._after, self._skip = max(self._after, expected), 0
        # Whatever is below the reading was read, except what a slow clock scores late.
        self._cursor = max(self._cursor, min(self._after, expected - SKEW_S))
        self._handled = {job_id: score for job_id, score in self._handled.items() if score >= self._cursor}
        if self._cursor != self._persisted and now_s - self._persisted_at_s >= PERSIST_EVERY_S:
            self.connection.set(self.keys.rq_failed_seen, repr(self._cursor))
            self._persisted, self._persisted_at_s = self._cursor, now_s

    def _settle_jobs(self, job_ids: list[str], now_iso: str) -> list[Settled]:
        settled = []
        jobs = self.queue.job_class.fetch_many(job_ids, connection=self.connection, serializer=self.queue.serializer)
        for job_id, job in zip(job_ids, jobs):
            try:
                done = self._settle_one(job_id, job, now_iso) if job is not None else None
            except Exception:  # noqa: BLE001 - one unreadable job must not stop the look
                log.exception("could not look at job %s in RQ's failed jobs; going on", job_id)
                continue
            if done is not None:
                settled.append(done)
        return settled

    def _settle_one(self, job_id: str, job: Job, now_iso: str) -> Settled | None:
        meta = (job.meta or {}).get(META_KEY)
        if not meta:
            return None  # an ad-hoc job: no run of ours
        run_id, day = str(meta["run_id"]), date.fromisoformat(meta["day"])
        reason = failure_text(job)
        if OOM_TEXT in reason and self._requeue_refused(run_id, job_id, day):
            return None
        error = f"RQ failed the job: {last_line(reason)}"
        if not self._scripts.settle_failed(
                runs_key=self.keys.day_runs(day), claim_key=self.keys.claim(run_id), running_key=self.keys.running,
                waiting_key=self.keys.day_waiting(day), job_key=RQKeys.job(job_id), left_key=self.keys.left,
                failures_key=self.keys.alert_failures, run_id=run_id, job_id=job_id, error=error, now_iso=now_iso,
                retention_s=self.retention_s, day=day.isoformat()).run():
            return None
        log.error("run %s: %s (job %s); failed", run_id, error, job_id, extra={"run_id": run_id})
        return Settled(run_id, job_id, error, day)

    def _requeue_refused(self, run_id: str, job_id: str, day: date) -> bool:
        """RQ failed the job because Redis refused its start for memory: back at the
        queue's front if nothing else backs the run (True), else left to SETTLE_FAILED."""
        outcome = requeue_orphaned_job(self.connection, self.keys, self.queue, run_id, job_id, day,
                                       self.retention_s).run()
        if outcome not in ("requeued", "in-queue"):
            return False
        log.warning("run %s: RQ failed its job %s because Redis refused its start for memory; nothing ran, so the "
                    "job is back at the front of the queue", run_id, job_id, extra={"run_id": run_id})
        return True


def failure_text(job: Job) -> str:
    """RQ's reason for failing the job: the traceback or message of its latest result."""
    result: Any = job.latest_result()
    text = getattr(result, "exc_string", None) if result is not None else None
    return str(text or getattr(job, "_exc_info", None) or "no reason recorded")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text

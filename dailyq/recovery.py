"""Recovery of runs whose executing process is gone.

A copy that starts executing records itself in the ``running`` hash, atomically with
taking its claim (guard.py), and leaves it atomically with releasing the claim. Its
claim is renewed from inside the executing process, and a copy that cannot confirm
its claim stops *before* the claim can lapse on the server. So a run listed as
running whose claim has expired has no live copy any more: its node died (SIGKILL,
OOM, power), or it was cut off from Redis or frozen and has stopped itself. The
leader then takes the run over at once.

Every such execution counts as an attempt (BEGIN counted it). A run with attempts
left (``retries + 1`` executions in all) is enqueued again, at the front of the
queue, as a new job of the same run; one that used them all is recorded ``failed``
and never requeued by recovery again (``rerun`` still runs it on request).

We do not wait for RQ's own abandoned-job handling, which by default takes the job's
heartbeat TTL plus a maintenance interval, and then only fails or retries the job;
a job of it that RQ retries later is skipped by the guard as superseded.
"""

from __future__ import annotations

import json
import logging
from datetime import date
from typing import Any

from redis import Redis
from rq import Queue

from .clock import Clock, iso, utc_now
from .fanout import Again, fan_out
from .keys import Keys
from .lease import Lease
from .redis_values import as_text
from .runs import META_KEY, Run
from .scripts import scripts_for
from .table import TaskTable

log = logging.getLogger(__name__)

class StrandedJobs:
    """Jobs a worker took off the queue but never started: it died (or froze) between
    RQ's dequeue, which moves the job to RQ's intermediate queue, and the transaction
    that marks it started and claims the run. No claim was taken, so recovery of
    abandoned runs cannot see them, and RQ's own clean-up takes minutes and may just
    fail the job. A job seen there for longer than a claim TTL (first sightings kept
    in Redis, on its clock) goes back to the front of the queue. Should its worker
    resume after all, the guard lets only one copy run (the other waits for the
    claim, then sees the run finished)."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, stuck_after_s: float) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.stuck_after_s = stuck_after_s
        self._scripts = scripts_for(connection)

    def requeue(self) -> list[str]:
        waiting = [as_text(j) for j in self.connection.lrange(self.queue.intermediate_queue_key, 0, -1)]
        seen = {as_text(k): float(v) for k, v in self.connection.hgetall(self.keys.stranded).items()}
        gone = [job_id for job_id in seen if job_id not in waiting]
        if gone:
            self.connection.hdel(self.keys.stranded, *gone)
        if not waiting:
            return []
        seconds, micros = self.connection.time()
        now_s = seconds + micros / 1e6
        requeued = []
        for job_id in waiting:
            if job_id not in seen:
                self.connection.hsetnx(self.keys.stranded, job_id, now_s)
                continue
            if now_s - seen[job_id] < self.stuck_after_s:
                continue
            job = self.queue.fetch_job(job_id)
            meta = ((job.meta or {}).get(META_KEY) or {}) if job is not None else {}
            if not meta:
                continue  # not a run of ours (an ad-hoc job): RQ's own clean-up handles it
            day = date.fromisoformat(meta["day"])
            if self._scripts.requeue_stranded(intermediate_queue_key=self.queue.intermediate_queue_key,
                                              queue_key=self.queue.key, runs_key=self.keys.day_runs(day),
                                              job_id=job_id, run_id=meta["run_id"]).run():
                self.connection.hdel(self.keys.stranded, job_id)
                log.warning("run %s: its job %s was taken off the queue by a worker that never started it; "
                            "put back at the front of the queue", meta["run_id"], job_id,
                            extra={"run_id": meta["run_id"]})
                requeued.append(job_id)
        return requeued


class AbandonedRuns:
    """The leader's watch for runs that lost their executing process."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, table: TaskTable, retention_s: int,
                 clock: Clock = utc_now) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.table = table
        self.retention_s = retention_s
        self.clock = clock
        self._scripts = scripts_for(connection)

    def requeue(self, fence: Lease | None) -> list[str]:
        """Take over every run whose executing process is gone: enqueue it again, or
        record it failed when it has no attempts left. Returns the run ids requeued."""
        listed = {as_text(k): as_text(v) for k, v in self.connection.hgetall(self.keys.running).items()}
        run_ids = list(listed)
        with self.connection.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.exists(self.keys.claim(run_id))
            claimed = pipe.execute()
        requeued = []
        for run_id in sorted(run_id for run_id, alive in zip(run_ids, claimed) if not alive):
            day = date.fromisoformat(listed[run_id])
            record = self._record(run_id, day)
            task = self.table.by_name.get(record.get("task", "")) if record else None
            max_attempts = task.retries + 1 if task else 0
            outcome = self._scripts.take_if_abandoned(
                running_key=self.keys.running, claim_key=self.keys.claim(run_id), runs_key=self.keys.day_runs(day),
                run_id=run_id, max_attempts=max_attempts, now_iso=iso(self.clock()),
                retention_s=self.retention_s).run()
            if outcome == "failed":
                log.error("run %s: its executing process was lost and it has no attempts left; failed",
                          run_id, extra={"run_id": run_id})
            elif outcome == "requeue" and self._requeue_one(run_id, day, record, fence):
                requeued.append(run_id)
        return requeued

    def _record(self, run_id: str, day: date) -> dict[str, Any] | None:
        raw = self.connection.hget(self.keys.day_runs(day), run_id)
        return json.loads(raw) if raw is not None else None

    def _requeue_one(self, run_id: str, day: date, record: dict[str, Any] | None, fence: Lease | None) -> bool:
        run = self._rebuild(run_id, day, record) if record is not None else None
        if run is None or record is None:
            log.error("run %s died mid-run but its task or slot is no longer in the table; not requeued", run_id,
                      extra={"run_id": run_id})
            return False
        try:
            rerun_number = int(self.connection.hincrby(self.keys.day_reruns(day), run_id, 1))
            self.connection.expire(self.keys.day_reruns(day), self.retention_s)
            # The same run (its run id and attempt count go on); RQ may retry the new job
            # as often as the attempt budget still allows after its next execution.
            attempts = int(record.get("attempts") or 0) - int(record.get("attempts_before") or 0)
            again = Again(rerun_number, rerun_id=record.get("rerun_id"), new_run=False,
                          retries=max(0, run.task.retries - attempts))
            fan_out(self.connection, self.keys, self.queue, [run], retention_s=self.retention_s, fence=fence,
                    again={run_id: again}, at_front=True, hold_dependent=False)
        except BaseException:
            # Not requeued (lease lost, Redis gone): list it again for the next leader.
            self.connection.hset(self.keys.running, run_id, day.isoformat())
            raise
        log.warning("run %s: its executing process died mid-run; enqueued again (job %s)", run_id,
                    run.job_id(rerun_number), extra={"run_id": run_id})
        return True

    def _rebuild(self, run_id: str, day: date, record: dict[str, Any]) -> Run | None:
        task = self.table.by_name.get(record["task"])
        if task is None:
            return None
        param = json.loads(record["param_json"])
        for slot in task.schedule.slots_on(day):
            run = Run(task, param, slot)
            if run.run_id == run_id:
                return run
        return None

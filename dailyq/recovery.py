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
queue, as a new job of the same run, made from the dead job's own RQ data (so a
leader whose table lacks the run's task requeues it too); one that used them all is
recorded ``failed`` and never requeued by recovery again (``rerun`` still runs it on
request). Taking the run off the running hash and enqueueing its new job are one
MULTI/EXEC: a leader killed in between leaves the run listed for the next look.

We do not wait for RQ's own abandoned-job handling, which by default takes the job's
heartbeat TTL plus a maintenance interval, and then only fails or retries the job;
a job of it that RQ retries later is skipped by the guard as superseded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

from redis import Redis, WatchError
from rq import Queue, Retry
from rq.exceptions import DeserializationError
from rq.job import Job

from .clock import Clock, iso, utc_now
from .errors import LeaseLost
from .fanout import Requeued, job_data
from .keys import Keys
from .lease import Lease
from .redis_values import as_text
from .rq_seam import RQKeys, enqueue_fresh, job_entry
from .runs import META_KEY, Run, new_record
from .scripts import ScriptCall, scripts_for
from .table import TaskTable

log = logging.getLogger(__name__)

def requeue_stranded_job(connection: Redis, keys: Keys, queue: Queue, run_id: str, job_id: str,
                         day: date) -> ScriptCall[bool]:
    """REQUEUE_STRANDED for one job of ``run_id`` (of ``day``), every key built here: the
    leader's sweep below and a worker that lost Redis before the job started (worker.py)."""
    rq_keys = RQKeys(queue)
    return scripts_for(connection).requeue_stranded(intermediate_queue_key=rq_keys.intermediate,
                                                    queue_key=rq_keys.queue, runs_key=keys.day_runs(day),
                                                    job_id=job_id, run_id=run_id)


def requeue_orphaned_job(connection: Redis, keys: Keys, queue: Queue, run_id: str, job_id: str, day: date,
                         retention_s: int) -> ScriptCall[str]:
    """REQUEUE_ORPHANED for one job of ``run_id`` (of ``day``), its ten keys built here: a
    worker whose copy stopped for its claim (worker.py) and the leader's settle of a job RQ
    failed when Redis refused its start for memory (settle.py)."""
    rq_keys = RQKeys(queue)
    return scripts_for(connection).requeue_orphaned(
        runs_key=keys.day_runs(day), claim_key=keys.claim(run_id), running_key=keys.running,
        finished_key=keys.day_finished(day), waiting_key=keys.day_waiting(day), left_key=keys.left,
        queue_key=rq_keys.queue, intermediate_queue_key=rq_keys.intermediate, job_key=rq_keys.job(job_id),
        failed_registry_key=rq_keys.failed, run_id=run_id, job_id=job_id, retention_s=retention_s)


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
        waiting = [as_text(j) for j in self.connection.lrange(RQKeys(self.queue).intermediate, 0, -1)]
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
            if requeue_stranded_job(self.connection, self.keys, self.queue, meta["run_id"], job_id, day).run():
                self.connection.hdel(self.keys.stranded, job_id)
                log.warning("run %s: its job %s was taken off the queue by a worker that never started it; "
                            "put back at the front of the queue", meta["run_id"], job_id,
                            extra={"run_id": meta["run_id"]})
                requeued.append(job_id)
        return requeued


class AbandonedRuns:
    """The leader's watch for runs that lost their executing process.

    The new job of a run is built from the dead job's own RQ data (its function, param,
    timeout, meta), not from this leader's task table: any leader requeues any run, also
    one of a task its table does not have (an old leader during a rolling deploy). The
    table serves only when that job's data is gone; when neither has the run, it is
    recorded ``failed`` with the reason. TAKE_IF_ABANDONED (Lua) decides, and the
    requeue -- new job, record, and the run's removal from the running hash -- is one
    MULTI/EXEC: a leader that dies or loses Redis in between leaves the run listed as
    running, for the next look."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, table: TaskTable, retention_s: int,
                 clock: Clock = utc_now) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.table = table
        self.retention_s = retention_s
        self.clock = clock
        self._scripts = scripts_for(connection)
        # (day, run id) of the runs the last look recorded failed: the leader marks the
        # runs held for them blocked (dependencies.WaitingRuns.ended).
        self.failed: list[tuple[date, str]] = []

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
        self.failed = []
        for run_id in sorted(run_id for run_id, alive in zip(run_ids, claimed) if not alive):
            day = date.fromisoformat(listed[run_id])
            record = self._record(run_id, day)
            again = self._replacement(run_id, day, record) if record is not None else None
            outcome = self._scripts.take_if_abandoned(
                running_key=self.keys.running, claim_key=self.keys.claim(run_id), runs_key=self.keys.day_runs(day),
                failures_key=self.keys.alert_failures, run_id=run_id,
                max_attempts=again.max_attempts if isinstance(again, Replacement) else 0,
                now_iso=iso(self.clock()), retention_s=self.retention_s, day=day.isoformat(),
                cannot_requeue=again if isinstance(again, str) else "").run()
            if outcome == "failed":
                self.failed.append((day, run_id))
                log.error("run %s: its executing process was lost and it %s; failed", run_id,
                          f"cannot be requeued ({again})" if isinstance(again, str) else "has no attempts left",
                          extra={"run_id": run_id})
            elif outcome == "requeue" and isinstance(again, Replacement) and record is not None:
                if self._requeue_one(run_id, day, record, again, fence):
                    requeued.append(run_id)
        return requeued

    def _record(self, run_id: str, day: date) -> dict[str, Any] | None:
        raw = self.connection.hget(self.keys.day_runs(day), run_id)
        return json.loads(raw) if raw is not None else None

    def _replacement(self, run_id: str, day: date, record: dict[str, Any]) -> "Replacement | str":
        """How to enqueue the run again: from its dead job's RQ data, else from the table;
        or why it cannot be (a text for its record)."""
        attempts = int(record.get("attempts") or 0) - int(record.get("attempts_before") or 0)
        job_id = record.get("job_id")
        dead = self._job(job_id) if isinstance(job_id, str) else None
        if dead is not None:
            return Replacement.of_job(dead, attempts)
        run = self._rebuild(run_id, day, record)
        if run is not None:
            return Replacement.of_run(run, attempts, rerun_id=record.get("rerun_id"))
        return (f"its job {job_id} is gone from Redis and this leader's task table has no run "
                f"{record.get('task')}({record.get('param_json')}) at slot {record.get('slot')}")

    def _job(self, job_id: str) -> Job | None:
        """The dead job, when its data is still in Redis and carries its run (dailyq meta)."""
        try:
            job = self.queue.fetch_job(job_id)
            usable = job is not None and bool((job.meta or {}).get(META_KEY)) and bool(job.func_name)
        except (DeserializationError, ValueError, TypeError, KeyError):
            return None  # unreadable: the table is the next best source
        return job if usable else None

    def _requeue_one(self, run_id: str, day: date, record: dict[str, Any], again: "Replacement",
                     fence: Lease | None) -> bool:
        """Enqueue the run's new job at the front of the queue, its record queued under
        that job, and the run off the running hash: all in one MULTI/EXEC, fenced by the
        lease, and only while no copy has claimed the run meanwhile (WATCH of its claim)."""
        rerun_number = int(self.connection.hincrby(self.keys.day_reruns(day), run_id, 1))
        self.connection.expire(self.keys.day_reruns(day), self.retention_s)
        job_id = f"{run_id}-r{rerun_number}"  # Run.job_id's form: the same run, a fresh job
        base_json = json.dumps(new_record(str(record.get("task")), str(record.get("param_json")),
                                          str(record.get("slot")), job_id), ensure_ascii=False)
        claim_key = self.keys.claim(run_id)
        enqueued_key = self.keys.day_enqueued(day)
        with self.connection.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(claim_key, *([fence.key] if fence else []))
                    if fence is not None and pipe.get(fence.key) != fence.owner.encode():
                        raise LeaseLost(f"leader lease {fence.key} is no longer ours")
                    if pipe.exists(claim_key) or not pipe.hexists(self.keys.running, run_id):
                        pipe.unwatch()  # a copy claimed it meanwhile, or it was settled: not ours to requeue
                        return False
                    pipe.multi()
                    pipe.sadd(enqueued_key, job_id)
                    pipe.expire(enqueued_key, self.retention_s)
                    # The same run: its record and attempts go on (QUEUE_RECORDS' "again" entry).
                    self._scripts.queue_records(
                        runs_key=self.keys.day_runs(day), retention_s=self.retention_s, fresh=[],
                        again=[(run_id, base_json, job_id, Requeued(0))]).queue_in(pipe)
                    enqueue_fresh(self.queue, [again.job_data(self.queue, job_id, self.retention_s)], pipe)
                    pipe.hdel(self.keys.running, run_id)
                    pipe.execute()
                except WatchError:
                    continue  # the claim or the lease changed: look again
                break
        log.warning("run %s: its executing process died mid-run; enqueued again (job %s)", run_id, job_id,
                    extra={"run_id": run_id})
        return True

    def _rebuild(self, run_id: str, day: date, record: dict[str, Any]) -> Run | None:
        task = self.table.by_name.get(record["task"])
        if task is None:
            return None
        param = json.loads(record["param_json"])
        for slot in task.schedule.permits_on(day):
            run = Run(task, param, slot)
            if run.run_id == run_id:
                return run
        return None


@dataclass(frozen=True)
class Replacement:
    """What the new job of a recovered run is made of: the dead job's own RQ data (any
    leader can requeue any run), or, when that is gone, the leader's table."""

    max_attempts: int  # the run's attempt budget (0: no limit), as its job carried it
    job: Job | None = None
    run: Run | None = None
    retries: int = 0  # RQ retries the new job gets: what the attempt budget still allows
    rerun_id: str | None = None

    @classmethod
    def of_job(cls, job: Job, attempts: int) -> "Replacement":
        max_attempts = int((job.meta or {}).get(META_KEY, {}).get("max_attempts") or 0)
        # After the next execution, as many retries as the budget still allows; a job
        # without a budget (0) keeps what RQ had left of its retries.
        retries = max(0, max_attempts - attempts - 1) if max_attempts else int(job.retries_left or 0)
        return cls(max_attempts, job=job, retries=retries)

    @classmethod
    def of_run(cls, run: Run, attempts: int, rerun_id: str | None) -> "Replacement":
        return cls(run.task.retries + 1, run=run, retries=max(0, run.task.retries - attempts), rerun_id=rerun_id)

    def job_data(self, queue: Queue, job_id: str, retention_s: int) -> Any:
        """``Queue.enqueue_many``'s entry for the new job, at the front of the queue."""
        if self.run is not None:
            return job_data(queue, self.run, job_id, retention_s, force=False, at_front=True,
                            again=Requeued(0, rerun_id=self.rerun_id, new_run=False, retries=self.retries))
        job = self.job
        assert job is not None
        intervals = list(job.retry_intervals or [0])
        # The dead job's intervals in full: RQ picks the interval by the retries left, so
        # the new job's retries go on with the backoffs the dead job had still ahead.
        retry = Retry(max=self.retries, interval=intervals) if self.retries > 0 else None
        timeout = int(job.timeout) if job.timeout is not None else None
        return job_entry(queue, str(job.func_name), args=job.args, kwargs=job.kwargs, timeout=timeout,
                         result_ttl=job.result_ttl, failure_ttl=job.failure_ttl,
                         description=job.description, job_id=job_id, at_front=True,
                         meta=dict(job.meta or {}), retry=retry)

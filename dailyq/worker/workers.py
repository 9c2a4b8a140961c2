"""What every node runs: an RQ worker that executes only table tasks, under the guard.

``DailyWorker`` is a plain ``rq.Worker`` with three changes, made in its constructor
so that ``rq worker -w dailyq.worker.DailyWorker`` gets them too:

* jobs are JSON (``DailyJob``), never unpickled;
* a job whose function is not in the task table fails with a clear reason, unrun
  (the check happens before the function's module is even imported);
* a job that carries a run identity executes under the dedup guard (guard.py),
  whose claim and finish ride in RQ's own transactions: a run costs the same number
  of Redis round trips as a plain RQ job (tests/worker/test_worker.py counts them); with
  DAILYQ_WAIT_REPLICAS two more, each a WAIT for the replicas (replicas.py).

How RQ is extended (which hooks, which internals) is all in rq_seam.py; this module is
the dailyq side of it: ``WorkerContext`` implements the seam's ``WorkerHooks``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Callable, Sequence

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, Worker
from rq.exceptions import DeserializationError

from ..beats import beat_value, register_node, register_worker, worker_member
from ..clock import RedisClock
from ..connection import connect
from ..dependencies import downstream_of, release_after
from ..deploys import Leaver
from ..errors import DailyqError
from ..fingerprint import table_fingerprint
from ..generation import GenerationWatch
from ..limits import Admissions
from ..outage import MEMORY, OutageLog, through_outage
from ..pausing import PausedCache
from ..recovery import requeue_orphaned_job, requeue_stranded_job
from ..redis_memory import describer, wait_for_writes
from ..rq_seam import DailyJob, GuardedWorker, RQKeys, RunExecution, make_queue, queue_keeping_reply
from ..runs import META_KEY, RunJob, StaleJob
from ..settings import Settings
from ..table import TaskTable, encode_param, load_table
from ..table_store import keep_published
from ..table_store import publish as publish_table
from .claim_watch import ClaimDeadline
from .guard import CANCELLED_EXIT_CODE, CLAIM_LOST_EXIT_CODE, Guard

# Re-exported: ``dailyq.worker.DailyJob`` and ``make_queue`` are where users found them.
__all__ = ["DailyJob", "DailySimpleWorker", "DailyWorker", "RefusedJob", "WorkerContext", "describe_exit",
           "make_queue", "queue_keeping_reply", "worker_name"]

log = logging.getLogger(__name__)

# Our heartbeat key outlives RQ's promise of the next heartbeat by this much, so that a
# beat arriving a little late (a slow Redis round trip, a busy machine) does not make
# a healthy worker look dead to ``scheduler.py health``.
HEARTBEAT_MARGIN_S = 30
HEARTBEAT_REFRESH_S = 5.0


class RefusedJob(DailyqError):
    """A job names a function that is not in the task table."""


@dataclass
class WorkerContext:
    """One worker's table, settings and guard: the dailyq side of the seam's
    ``WorkerHooks`` (rq_seam.py), bound to the worker's job class."""

    settings: Settings
    table: TaskTable
    connection: Redis
    # A forking worker's runs execute in work-horses, which stop a run that lost its
    # claim by ending themselves; a non-forking worker interrupts the task instead.
    stop_by_exit: bool = False
    # The mark of Redis's data this process saw (generation.py). Given by the worker's
    # supervisor, so that it outlives each RQ worker it starts after an outage.
    generation: GenerationWatch | None = None
    # One Guard per worker, built with the worker, before its first fork, so that every
    # work-horse inherits it instead of building its own per run. Its ClaimKeeper
    # starts its threads in whichever process holds claims (see ClaimKeeper).
    guard: Guard = field(init=False)
    # This host's offset from Redis's clock, for the heartbeat value (see beat).
    clock: RedisClock = field(init=False)
    # Whether a run may start now: limits and pause (limits.py, pausing.py). In the worker
    # process, before it forks, so its view of the paused tasks lasts across runs.
    admissions: Admissions = field(init=False)
    # (monotonic time, key expiry) of the last heartbeat key written.
    beat_written: tuple[float, float] = (float("-inf"), float("-inf"))
    # Task name -> the tasks that name it in ``after`` (dependencies.py).
    downstream: dict[str, list[str]] = field(init=False)
    table_fingerprint: str = field(init=False)
    fixed_params: dict[str, frozenset[str]] = field(init=False)
    leaver: Leaver = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.guard = Guard(self.connection, s.keys, s.node_name, s.claim_ttl_s, s.retention_s,
                           claim_margin_s=s.claim_margin_s, stop_by_exit=self.stop_by_exit,
                           wait_replicas=s.wait_replicas)
        self.guard.on_ended = self.upstream_ended
        self.clock = RedisClock(self.connection)
        self.admissions = Admissions(self.connection, s.keys, s.node_name, s.claim_ttl_s,
                                     PausedCache(self.connection, s.keys), self.table, set_aside_ttl_s=s.retention_s)
        self.downstream = downstream_of(self.table)
        # Named by every beat; published once here, kept alive by the beats (fingerprint.py).
        self.table_fingerprint = table_fingerprint(self.table)
        # Task -> the canonical JSON of its fixed params: a job of a param not in it is left
        # for a node whose table has it (deploys.py).
        self.fixed_params = {task.name: frozenset(encode_param(p) for p in task.params)  # type: ignore[union-attr]
                             for task in self.table.tasks if not task.params_computed}
        self.leaver = Leaver(self.connection, s.keys, s.node_name, self.table_fingerprint, s.retention_s)
        try:
            publish_table(self.connection, s.keys, self.table)
        except RedisError as exc:  # the scheduler on this node publishes it too, at its beats
            log.warning("could not publish this worker's task table description (%s)", exc)
        if self.generation is None:
            self.generation = GenerationWatch(self.connection, s.keys, s.node_name, "worker")
        self._saw_generation(None, read=True)
        try:
            # Before any fork: the work-horses inherit the answer (scripts.Scripts.flags_supported).
            self.guard.scripts.flags_supported()
        except RedisError:
            pass  # asked again at the first script that needs it
        self.guard.scripts.register_execution_scripts()  # inherited by the work-horses too

    def _saw_generation(self, raw: bytes | None, read: bool = False) -> None:
        """One read of the mark (``read``: make it now): a loss is logged once by the watch.
        Never raises: it runs inside RQ's heartbeat, and a worker only tells of a loss."""
        assert self.generation is not None
        try:
            if read:
                self.generation.check(self.clock.estimate())
            else:
                self.generation.observe(raw, self.clock.estimate())
        except RedisError as exc:
            log.warning("could not read dailyq's mark in Redis (%s); looking again at the next beat", exc)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("reading dailyq's mark in Redis failed; looking again at the next beat")

    def wait_for_writes(self, what: str, stopping: Callable[[], bool]) -> bool:
        MEMORY.refused(what)
        if not wait_for_writes(self.connection, self.settings.keys, stopping):
            return False
        MEMORY.accepted()
        return True

    def upstream_ended(self, run: RunJob) -> None:
        """A run was recorded finished or failed: release (or block) the runs of its
        downstream tasks now, not at the leader's next tick. A few round trips more, only for
        a task that some task names in ``after``."""
        downstream = self.downstream.get(run.task.name)
        if downstream:
            s = self.settings
            release_after(self.connection, s.keys, make_queue(self.connection, s.keys), self.table, run.day,
                          retention_s=s.retention_s, tasks=downstream, ended=run.run_id)

    def _allowed(self, job: DailyJob) -> bool:
        return job.instance is None and job.func_name in self.table.allowed_functions

    def check_allowed(self, job: DailyJob) -> None:
        if not self._allowed(job):
            raise RefusedJob(
                f"refused to run {job.func_name!r}: not a function of the task table "
                f"{self.settings.tasks_module}.TASKS (dailyq workers run only table tasks)")
        if job.run_execution is None:
            RunJob.from_job(job, self.table)  # raises StaleJob, naming the job, if the table moved on

    def take(self, job: DailyJob) -> RunExecution | None:
        try:
            if not self._allowed(job):
                if job.instance is None and _run_meta(job):
                    job.foreign_reason = f"no task with function {job.func_name}"
                return None
        except DeserializationError:
            return None  # not JSON (a pickle): RQ fails it when it tries to run it, unloaded
        meta = _run_meta(job)
        if meta and meta.get("task") not in self.table.by_name:
            job.foreign_reason = f"no task {meta.get('task')!r}"
            return None
        try:
            run = RunJob.from_job(job, self.table)
        except StaleJob as exc:
            job.foreign_reason = str(exc)
            return None
        if run is None:
            return None
        why = self._lacks(run, job.func_name)
        if why is not None:
            job.foreign_reason = why
            return None
        attempt = self.guard.attempt(run)
        if self.stop_by_exit:
            # Mapped now, before RQ forks the horse, so that both see it (claim_watch.py).
            attempt.shared_deadline = ClaimDeadline(self.guard.keeper.margin_s)
        return RunExecution(self.guard, attempt)

    def _lacks(self, run: RunJob, func_name: str | None) -> str | None:
        """Why this worker's table cannot run ``run`` (its job names ``func_name``), or None.
        A set lookup: the common case costs no round trip and no JSON."""
        task = run.task
        if func_name != task.func_path:
            return f"task {task.name!r} runs {task.func_path}, not {func_name}"
        fixed = self.fixed_params.get(task.name)
        if fixed is not None and run.param_json not in fixed:
            return f"task {task.name!r} has no param {run.param_json}"
        return None

    def stopped(self, execution: RunExecution, queue: Queue) -> None:
        """Usually another copy holds the run, or the leader's recovery takes it over (its
        running-hash entry). After a failover to a replica that lagged, Redis may have lost
        the claim and the run's start with it: nothing would run it again, and RQ has just
        failed (forking) or finished (non-forking) its job. Then the job goes back to the
        queue's front (REQUEUE_ORPHANED)."""
        run = execution.attempt.run
        call = requeue_orphaned_job(self.connection, self.settings.keys, queue, run.run_id, run.job_id, run.day,
                                    self.settings.retention_s)
        try:
            outcome = through_outage(call.run, OutageLog(log, f"checking that run {run.run_id} is not lost"),
                                     RECORD_DEATH_OUTAGE_LIMIT_S)
        except RedisError as exc:
            log.error("run %s: could not check that its stopped copy left it to another (%s); the leader's "
                      "clean-up (doctor) finds it if not", run.run_id, exc, extra={"run_id": run.run_id})
            return
        if outcome in ("requeued", "in-queue"):
            log.warning("run %s: Redis had lost its claim and its start (a failover?); its job %s is back in "
                        "the queue", run.run_id, run.job_id, extra={"run_id": run.run_id})

    def put_back(self, job: DailyJob, queue: Queue) -> None:
        """Redis failed while this worker held ``job`` between RQ's dequeue, which moved it
        to RQ's intermediate queue, and its start (RQ's execution record, before any fork):
        the job goes back to the queue's front if its run still waits for it, queued
        (REQUEUE_STRANDED, a check-and-set: a job that started, ended, or was set aside
        meanwhile stays where it is). Otherwise only the leader's stranded-job sweep would
        put it back, a claim TTL later, and a burst worker would end with the run queued."""
        meta = _run_meta(job)
        if not meta.get("run_id") or not meta.get("day"):
            return  # not a run of ours (an ad-hoc job): RQ's own clean-up of that queue handles it
        run_id = str(meta["run_id"])
        call = requeue_stranded_job(self.connection, self.settings.keys, queue, run_id, job.id,
                                    date.fromisoformat(str(meta["day"])))
        try:
            put = through_outage(call.run, OutageLog(log, f"putting job {job.id} back"), RECORD_DEATH_OUTAGE_LIMIT_S)
        except RedisError as exc:
            log.error("run %s: could not put its job %s back after Redis failed before it started (%s); the "
                      "leader's stranded-job sweep does", run_id, job.id, exc, extra={"run_id": run_id})
            return
        if put:
            log.warning("run %s: Redis failed before its job %s started on this worker; put back at the front of "
                        "the queue", run_id, job.id, extra={"run_id": run_id})

    def leave(self, job: DailyJob, queue: Queue) -> None:
        self.leaver.leave(job, RQKeys(queue).intermediate, job.foreign_reason or "cannot run it")

    def admit(self, execution: RunExecution, queue: Queue) -> bool:
        attempt = execution.attempt
        run = attempt.run
        rq_keys = RQKeys(queue)
        outcome, permit = self.admissions.admit(run, attempt.owner, rq_keys.intermediate, rq_keys.queue)
        if outcome != "admitted":
            why = ("its task is paused" if outcome == "paused"
                   else "its task is at its max_running/max_per_node limit or its pool is full")
            log.info("run %s set aside, not started: %s (job %s stays queued)", run.run_id, why, run.job_id,
                     extra={"run_id": run.run_id})
            return False
        if permit is not None:
            execution.permit = permit
            attempt.permits_key = permit.permits_key
            attempt.while_waiting = permit.touch
        return True

    def record_death(self, execution: RunExecution, wait_status: int, rq_can_retry: bool) -> bool:
        """A dying task (os._exit, a segfault, the OOM killer) counts as an attempt:
        record it now, as queued for its retry or failed, instead of leaving the run
        'running' until its claim expires. A horse that stopped because it lost its
        claim records nothing: the run is another copy's, or the leader's to take over.
        One stopped by a cancel releases the claim the cancel took (its record says
        cancelled already)."""
        attempt = execution.attempt
        run_id = attempt.run.run_id
        if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == CANCELLED_EXIT_CODE:
            # Stopped by ``cancel``: the record says cancelled already; the horse is gone, so
            # its claim is free for a rerun (cancelling.py).
            self.guard.release_cancelled(attempt.run, attempt.owner)
            return False
        if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == CLAIM_LOST_EXIT_CODE:
            log.warning("run %s: work-horse stopped after losing its claim; recorded nothing", run_id,
                        extra={"run_id": run_id})
            execution.stopped_for_claim = True
            return False
        if execution.killed_because is not None:
            # Killed by this process for its claim (rq_seam.GuardedWorker.wait_for_horse): as
            # for CLAIM_LOST_EXIT_CODE, the run is the leader's to take over once the claim lapses.
            log.warning("run %s: work-horse killed: %s; recorded nothing", run_id, execution.killed_because,
                        extra={"run_id": run_id})
            execution.stopped_for_claim = True
            return False
        error = f"work-horse died ({describe_exit(wait_status)})"
        call = self.guard.fail_call(attempt.run, attempt.owner, error, rq_can_retry=rq_can_retry)
        # FAIL's wrapper parses the reply: 'retry', 'failed' or 'not-ours'.
        outcome = through_outage(call.run, OutageLog(log, f"recording the death of run {run_id}"),
                                 RECORD_DEATH_OUTAGE_LIMIT_S)
        if outcome == "failed":
            self.guard.run_ended(attempt.run)
        elif outcome == "not-ours" and attempt.shared_deadline is not None and attempt.shared_deadline.get() > 0:
            # The horse held the claim when it died (its deadline is set from BEGIN until the
            # claim is released), yet FAIL finds it not ours: another copy holds the run,
            # recovery took it over, or Redis lost the claim with the run's start (a failover
            # to a replica that lagged). In the last case nothing backs the run and the
            # leader would settle RQ's failed job as a failure: the same check as for a copy
            # stopped for its claim, once RQ has failed the job (``stopped``). A horse that
            # never held the claim (killed while waiting for the previous slot's run) is
            # RQ's failure, settled by the leader as before.
            execution.stopped_for_claim = True
        log.warning("run %s: %s on node %s; %s", run_id, error, self.guard.node,
                    {"retry": "will retry", "failed": "failed (no attempts left)"}.get(
                        outcome, "not recorded (its claim had passed on)"),
                    extra={"run_id": run_id})
        return outcome == "retry"

    def beat(self, worker_pid: int, promise_s: float, pipeline: Pipeline | None) -> None:
        """This node's worker heartbeat key for ``scheduler.py health``, beside RQ's.

        RQ passes its promise, "the next heartbeat comes before this". With RQ 3's
        defaults (worker_ttl 420 s, job_monitoring_interval 30 s):

        * idle, the worker blocks in BLMOVE (its dequeue) for worker_ttl - 15 = 405 s between beats and
          promises worker_ttl + 60 = 480 s;
        * while a forked work-horse runs, the parent beats every 30 s and promises 90 s;
        * a non-forking worker beats once before a run and promises the run's timeout
          + 60 s (a task's ``timeout_s`` defaults to 3600 s), as it cannot beat during it.

        So a key kept for the promise + HEARTBEAT_MARGIN_S (510 s when idle) stays
        present for as long as the worker is healthy, and is gone at most that long
        after the worker died. The value carries the time, so ``health --max-age-s``
        can be stricter. Appended after RQ's commands: RQ reads ``results[0]`` of
        the pipeline it hands in.

        The value's time is Redis's, and it carries this host's clock offset from Redis
        (beats.py), measured by one TIME when a beat is written and the last reading is
        over 5 s old. Never in a forked work-horse: it inherits the parent's reading, so
        a run costs no extra round trip.
        """
        # RQ beats several times per job; one write per HEARTBEAT_REFRESH_S is enough
        # unless this beat promises a later deadline than the key already has (a
        # non-forking worker about to start a long run).
        now_s = time.monotonic()
        expires_s = now_s + promise_s + HEARTBEAT_MARGIN_S
        written_s, key_expires_s = self.beat_written
        if now_s - written_s < HEARTBEAT_REFRESH_S and expires_s <= key_expires_s + HEARTBEAT_REFRESH_S:
            return
        self.beat_written = (now_s, expires_s)
        settings = self.settings
        # A forked work-horse (its pid is not the worker's) keeps the parent's reading.
        if worker_pid == os.getpid():
            self.clock.refresh_if_due()
        now = self.clock.estimate()
        # Without RQ's pipeline, a pipeline of our own: still one round trip per beat.
        target = pipeline if pipeline is not None else self.connection.pipeline(transaction=False)
        target.set(settings.keys.heartbeat("worker", settings.node_name),
                   beat_value(now, worker_pid, self.clock.offset_s, table=self.table_fingerprint),
                   ex=int(promise_s) + HEARTBEAT_MARGIN_S)
        keep_published(target, settings.keys, self.table_fingerprint)
        register_node(target, settings.keys, settings.node_name, now)
        # The node's key is shared by all its workers; this counts each one (beats.py).
        register_worker(target, settings.keys, settings.node_name, worker_member(worker_pid), now,
                        int(promise_s) + HEARTBEAT_MARGIN_S)
        if pipeline is None:
            # The mark read in this beat's round trip (generation.py): in the beats on our own
            # pipeline, which include every beat of an idle worker and the first after an
            # outage (RQ's dequeue loop beats without one); never in a work-horse.
            watch = self.generation if worker_pid == os.getpid() else None
            if watch is not None:
                watch.queue_read(target)
            replies = target.execute()
            if watch is not None:
                self._saw_generation(replies[-1])


class _DailyWorkerMixin(GuardedWorker):
    """The constructor of both workers: settings, table and connection to hooks."""

    # True on the forking worker: its work-horses end themselves to stop a run that lost
    # its claim (guard.ClaimKeeper); a non-forking worker interrupts the task instead.
    stops_by_exit = False

    def __init__(self, queues: Sequence[str | Queue] | str | Queue | None = None, *,
                 settings: Settings | None = None, table: TaskTable | None = None,
                 generation: GenerationWatch | None = None, **kwargs: Any) -> None:
        settings = settings or Settings.from_env()
        table = table or load_table(settings.tasks_module)
        connection = kwargs.pop("connection", None) or _connection_of(queues) or connect(settings)
        # The guard is built now, before any fork (see WorkerContext).
        context = WorkerContext(settings, table, connection, stop_by_exit=self.stops_by_exit, generation=generation)
        MEMORY.name(f"worker on node {settings.node_name} (pid {os.getpid()})", describer(connection))
        # Ours replaces the rq CLI's --results-ttl (RQ's 500 s): see Settings.job_ttl_s.
        kwargs["default_result_ttl"] = settings.job_ttl_s
        kwargs.setdefault("maintenance_interval", settings.worker_maintenance_s)
        super().__init__(queues, hooks=context, default_queue=settings.keys.queue_name,
                         connection=connection, **kwargs)


def _run_meta(job: DailyJob) -> dict[str, Any]:
    return (job.meta or {}).get(META_KEY) or {}


def _connection_of(queues: Any) -> Redis | None:
    if isinstance(queues, Queue):
        return queues.connection
    if isinstance(queues, (list, tuple)):
        for q in queues:
            if isinstance(q, Queue):
                return q.connection
    return None


class DailyWorker(_DailyWorkerMixin, Worker):
    """Forking worker: each run in its own work-horse process (the default)."""

    stops_by_exit = True


class DailySimpleWorker(_DailyWorkerMixin, SimpleWorker):
    """Non-forking worker: runs jobs in the worker process itself. Less overhead per
    run (no fork), but a task that crashes or leaks takes the worker with it."""


# How long a worker parent waits for Redis to record that its work-horse died.
RECORD_DEATH_OUTAGE_LIMIT_S = 300.0


def describe_exit(status: int) -> str:
    """A wait status as people say it: 'exit code 3' or 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


def worker_name(node: str, generation: int = 0) -> str:
    """RQ needs unique worker names; ours start with the node so dashboards group them.
    ``generation`` counts restarts inside one process (after a Redis outage)."""
    return f"{node}.{os.getpid()}" + (f".{generation}" if generation else "")

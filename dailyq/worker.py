"""What every node runs: an RQ worker that executes only table tasks, under the guard.

``DailyWorker`` is a plain ``rq.Worker`` with three changes, made in its constructor
so that ``rq worker -w dailyq.worker.DailyWorker`` gets them too:

* jobs are JSON (``DailyJob``), never unpickled;
* a job whose function is not in the task table fails with a clear reason, unrun
  (the check happens before the function's module is even imported);
* a job that carries a run identity executes under the dedup guard (guard.py),
  whose claim and finish ride in RQ's own transactions: a run costs the same number
  of Redis round trips as a plain RQ job (tests/test_worker.py counts them).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from redis import Redis
from redis.client import Pipeline
from rq import Queue, SimpleWorker, Worker
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.serializers import JSONSerializer

from .beats import beat_value, register_node
from .clock import RedisClock
from .errors import DailyqError
from .guard import CLAIM_LOST_EXIT_CODE, Attempt, Guard, PendingFinish, RunIdentity
from .keys import Keys
from .logs import current_run_id
from .outage import TRANSIENT, OutageLog, through_outage, wait_for_redis
from .connection import connect
from .settings import Settings
from .runs import META_KEY
from .table import TaskTable, load_table

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 60
# Our heartbeat key outlives RQ's promise of the next heartbeat by this much, so that a
# beat arriving a little late (a slow Redis round trip, a busy machine) does not make
# a healthy worker look dead to ``scheduler.py health``.
HEARTBEAT_MARGIN_S = 30
HEARTBEAT_REFRESH_S = 5.0


class RefusedJob(DailyqError):
    """A job names a function that is not in the task table."""


@dataclass
class WorkerContext:
    settings: Settings
    table: TaskTable
    # A forking worker's runs execute in work-horses, which stop a run that lost its
    # claim by ending themselves; a non-forking worker interrupts the task instead.
    stop_by_exit: bool = False
    # One Guard per worker, built by the worker before its first fork, so that every
    # work-horse inherits it instead of building its own per run. Its ClaimKeeper
    # starts its threads in whichever process holds claims (see ClaimKeeper).
    _guard: Guard | None = None

    def guard(self, connection: Redis) -> Guard:
        if self._guard is None:
            self._guard = Guard(connection, self.settings.keys, self.settings.node_name, self.settings.claim_ttl_s,
                                self.settings.retention_s, claim_margin_s=self.settings.claim_margin_s,
                                stop_by_exit=self.stop_by_exit)
        return self._guard


class DailyJob(Job):
    """An RQ job that is always JSON-serialized and, on a worker, checked before it runs."""

    context: ClassVar[WorkerContext | None] = None  # set on the subclass a worker binds

    def __init__(self, id: str | None = None, connection: Redis | None = None, serializer: Any = None) -> None:
        # Ignore any serializer handed in: pickle would let anyone who can write to
        # Redis run code on every node.
        super().__init__(id=id, connection=connection, serializer=JSONSerializer)

    # The attempt at executing this job, when it is a run this worker may execute: made
    # by the worker before it forks (new_attempt), so that the parent knows the owner
    # token of its work-horse's claim and can record the horse's death.
    attempt: Attempt | None = None

    def new_attempt(self) -> Attempt | None:
        context = type(self).context
        try:
            if context is None or not self._allowed(context):
                return None
        except DeserializationError:
            return None  # not JSON (a pickle): RQ fails it when it tries to run it, unloaded
        run = RunIdentity.from_job(self)
        self.attempt = context.guard(self.connection).attempt(run) if run is not None else None
        return self.attempt

    def prepare_for_execution(self, worker_name: str, pipeline: Pipeline) -> None:
        """RQ's, plus the run's first claim (guard BEGIN) in the same transaction: RQ
        calls this inside the MULTI/EXEC that marks the job started, so claiming costs
        no round trip of its own. Called in the process that executes the job (the
        work-horse of a forking worker)."""
        super().prepare_for_execution(worker_name, pipeline)
        attempt = self.attempt or self.new_attempt()
        context = type(self).context
        if attempt is None or context is None:
            return
        guard = context.guard(self.connection)
        queue_keeping_reply(pipeline, lambda p: guard.claim_in(attempt, p), attempt.keep_begin_reply)

    def _allowed(self, context: WorkerContext) -> bool:
        return self.instance is None and self.func_name in context.table.allowed_functions

    def _execute(self) -> Any:
        context = type(self).context
        if context is None:
            return super()._execute()
        if not self._allowed(context):
            raise RefusedJob(
                f"refused to run {self.func_name!r}: not a function of the task table "
                f"{context.settings.tasks_module}.TASKS (dailyq workers run only table tasks)")
        run = self.attempt.run if self.attempt is not None else RunIdentity.from_job(self)
        if run is None:  # an ad-hoc enqueue of a table function: run it as plain RQ would
            return super()._execute()
        return context.guard(self.connection).execute(run, super()._execute,
                                                      will_retry=lambda: bool(self.retries_left),
                                                      defer_finish=self._defer_finish, attempt=self.attempt,
                                                      cancel_retry=self._cancel_retry)

    def _cancel_retry(self) -> None:
        # RQ reads the job's in-memory count when it handles the failure: no retry then.
        self.retries_left = 0

    # Set while a run's FINISH waits for RQ's success transaction (see _DailyWorkerMixin).
    pending_finish: PendingFinish | None = None
    pending_finish_queued: bool = False

    def _defer_finish(self, pending: PendingFinish) -> None:
        self.pending_finish = pending


def queue_keeping_reply(pipeline: Pipeline, queue: Callable[[Pipeline], None], keep: Callable[[Any], None]) -> None:
    """``queue(pipeline)`` adds one command to a pipeline someone else executes; ``keep``
    gets that command's reply once they do. RQ executes its preparation transaction
    itself and drops the replies, so this wraps that one pipeline's ``execute``."""
    index = len(pipeline.command_stack)
    queue(pipeline)
    if len(pipeline.command_stack) != index + 1:
        return  # not exactly one command: no reply to pick out (the guard then asks again)
    execute = pipeline.execute

    def execute_and_keep(*args: Any, **kwargs: Any) -> Any:
        del pipeline.execute  # once only: a later execute of a reused pipeline is not ours
        replies = execute(*args, **kwargs)
        keep(replies[index])
        return replies

    pipeline.execute = execute_and_keep  # type: ignore[method-assign]


def bind_job_class(context: WorkerContext) -> type[DailyJob]:
    """A DailyJob subclass that knows this worker's table and settings (no globals)."""
    return type("BoundDailyJob", (DailyJob,), {"context": context})


def make_queue(connection: Redis, keys: Keys, job_class: type[Job] = DailyJob) -> Queue:
    return Queue(keys.queue_name, connection=connection, job_class=job_class, serializer=JSONSerializer)


def _queue_names(queues: Any, default: str) -> list[str]:
    if not queues:
        return [default]
    if isinstance(queues, (str, Queue)):
        queues = [queues]
    return [q.name if isinstance(q, Queue) else str(q) for q in queues]


class _DailyWorkerMixin:
    """Shared constructor for the forking and non-forking workers."""

    # RQ's "job ... result is kept for N seconds" line, once per run, says nothing about
    # a daily run (nothing reads results), and each line costs the worker ~40 us.
    log_result_lifespan = False
    # True on the forking worker: its work-horses end themselves to stop a run that lost
    # its claim (guard.ClaimKeeper); a non-forking worker interrupts the task instead.
    stops_by_exit = False

    def __init__(self, queues: Sequence[str | Queue] | str | None = None, *args: Any,
                 settings: Settings | None = None, table: TaskTable | None = None, **kwargs: Any) -> None:
        settings = settings or Settings.from_env()
        table = table or load_table(settings.tasks_module)
        context = WorkerContext(settings, table, stop_by_exit=self.stops_by_exit)
        job_class = bind_job_class(context)
        kwargs["job_class"] = job_class
        kwargs["serializer"] = JSONSerializer
        # RQ restarts its retry scheduler (killed by a Redis outage) only during
        # maintenance, every 600 s by default: too long for retries with backoff.
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL_S)
        connection = kwargs.get("connection") or _connection_of(queues) or connect(settings)
        kwargs["connection"] = connection
        context.guard(connection)  # now, before any fork (see WorkerContext)
        # Rebuild queues ourselves: the rq CLI builds them with its own (pickling) job class.
        names = _queue_names(queues, settings.keys.queue_name)
        rebuilt = [Queue(n, connection=connection, job_class=job_class, serializer=JSONSerializer) for n in names]
        self.dailyq_settings = settings
        super().__init__(rebuilt, *args, **kwargs)  # type: ignore[call-arg]

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat, plus this node's worker heartbeat key for ``scheduler.py health``.

        RQ passes ``timeout`` as its own promise: "the next heartbeat comes before this".
        With RQ 3's defaults (worker_ttl 420 s, job_monitoring_interval 30 s):

        * idle, the worker blocks in BLPOP for worker_ttl - 15 = 405 s between beats and
          promises worker_ttl + 60 = 480 s (``timeout`` is None then: same default here);
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
        super().heartbeat(timeout, pipeline)  # type: ignore[misc]
        promise_s = timeout or self.worker_ttl + 60  # type: ignore[attr-defined]
        # RQ beats several times per job; one write per HEARTBEAT_REFRESH_S is enough
        # unless this beat promises a later deadline than the key already has (a
        # non-forking worker about to start a long run).
        now_s = time.monotonic()
        expires_s = now_s + promise_s + HEARTBEAT_MARGIN_S
        written_s, key_expires_s = getattr(self, "_beat_written", (float("-inf"), float("-inf")))
        if now_s - written_s < HEARTBEAT_REFRESH_S and expires_s <= key_expires_s + HEARTBEAT_REFRESH_S:
            return
        self._beat_written = (now_s, expires_s)
        settings = self.dailyq_settings
        # self.pid is the worker's pid, also inside a work-horse (which beats once per run).
        worker_pid = getattr(self, "pid", None) or os.getpid()
        clock = self.__dict__.get("_dailyq_clock")
        if clock is None:
            clock = self._dailyq_clock = RedisClock(self.connection)  # type: ignore[attr-defined]
        # A forked work-horse (its pid is not the worker's) keeps the parent's reading.
        if worker_pid == os.getpid():
            clock.refresh_if_due()
        now = clock.estimate()
        # Without RQ's pipeline, a pipeline of our own: still one round trip per beat.
        connection: Redis = self.connection  # type: ignore[attr-defined]
        target = pipeline if pipeline is not None else connection.pipeline(transaction=False)
        target.set(settings.keys.heartbeat("worker", settings.node_name),
                   beat_value(now, worker_pid, clock.offset_s), ex=int(promise_s) + HEARTBEAT_MARGIN_S)
        register_node(target, settings.keys, settings.node_name, now)
        if pipeline is None:
            target.execute()

    # -- recording a finished run in RQ's own success transaction -----------------------
    # The guard hands the run's FINISH to the job (DailyJob._defer_finish). RQ's success
    # handling increments the worker's counter inside its MULTI/EXEC; we add FINISH to
    # that same transaction, so a run is marked finished together with RQ's own record
    # of the job's success, in one round trip. Whatever happens to that transaction
    # (another RQ version, an error), perform_job's epilogue applies a FINISH that was
    # not committed with it; FINISH is idempotent.

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        # RQ's lines about this job (its result, its duration) carry the run id in JSON logs.
        tagged = current_run_id.set(((job.meta or {}).get(META_KEY) or {}).get("run_id"))
        try:
            return super().perform_job(job, queue, execution)  # type: ignore[misc]
        finally:
            current_run_id.reset(tagged)
            pending = getattr(job, "pending_finish", None)
            if pending is not None:
                job.pending_finish = None  # type: ignore[attr-defined]
                pending.apply()

    def handle_job_success(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        self._job_succeeding = job
        try:
            super().handle_job_success(job, queue, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._job_succeeding = None
        if getattr(job, "pending_finish_queued", False):
            job.pending_finish = None  # type: ignore[attr-defined]  # committed with RQ's transaction

    def increment_successful_job_count(self, pipeline: Pipeline | None = None) -> None:
        super().increment_successful_job_count(pipeline)  # type: ignore[misc]
        job = getattr(self, "_job_succeeding", None)
        pending = getattr(job, "pending_finish", None)
        if pending is not None and pipeline is not None:
            queue_keeping_reply(pipeline, pending.queue_in, pending.replied)
            job.pending_finish_queued = True  # type: ignore[union-attr]

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        """RQ's hook for a work-horse that ended without finishing its job. A dying task
        (os._exit, a segfault, the OOM killer) counts as an attempt: record it now, as
        queued for its retry or failed, instead of leaving the run 'running' until its
        claim expires. A horse that stopped because it lost its claim records nothing:
        the run is another copy's, or the leader's to take over."""
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)  # type: ignore[misc]
        attempt = getattr(job, "attempt", None)
        context = getattr(type(job), "context", None)
        if attempt is None or context is None:
            return
        if os.WIFEXITED(ret_val) and os.WEXITSTATUS(ret_val) == CLAIM_LOST_EXIT_CODE:
            job.retries_left = 0  # not RQ's to retry: the leader takes the run over
            log.warning("run %s: work-horse stopped after losing its claim; recorded nothing", attempt.run.run_id,
                        extra={"run_id": attempt.run.run_id})
            return
        error = f"work-horse died ({describe_exit(ret_val)})"
        guard = context.guard(self.connection)  # type: ignore[attr-defined]
        call = guard.fail_call(attempt.run, attempt.owner, error, rq_can_retry=bool(job.retries_left))
        reply = through_outage(call.run, OutageLog(log, f"recording the death of run {attempt.run.run_id}"),
                               RECORD_DEATH_OUTAGE_LIMIT_S)
        outcome = reply.decode() if isinstance(reply, bytes) else str(reply)
        if outcome != "retry":
            job.retries_left = 0
        log.warning("run %s: %s on node %s; %s", attempt.run.run_id, error, guard.node,
                    {"retry": "will retry", "failed": "failed (no attempts left)"}.get(
                        outcome, "not recorded (its claim had passed on)"),
                    extra={"run_id": attempt.run.run_id})

    def execute_job(self, job: Job, queue: Queue) -> None:
        """RQ's, except that losing Redis while a run executes does not stop the worker:
        it waits for Redis, lets the work-horse finish (the horse records the run
        itself, see guard.py), then goes back to pulling jobs. The run's attempt (its
        claim's owner token) is made here, before RQ forks the work-horse."""
        if isinstance(job, DailyJob):
            job.new_attempt()
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        except TRANSIENT as error:
            outage = OutageLog(log, f"worker {self.name}")  # type: ignore[attr-defined]
            outage.failed(error)
            wait_for_redis(self.connection.ping, outage)  # type: ignore[attr-defined]
            horse = getattr(self, "horse_pid", 0)
            if horse:
                try:
                    os.waitpid(horse, 0)
                except ChildProcessError:
                    pass


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

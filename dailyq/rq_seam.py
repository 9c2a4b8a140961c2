"""The one seam between dailyq and RQ / rq-scheduler: everything dailyq overrides in
them, and every use of RQ's data layout (its keys, its job data), lives here or is
named here (tests/test_boundaries.py checks the imports, key names and scripts). Two
modules subclass RQ's classes besides: ``dailyq.worker`` combines ``GuardedWorker``
with RQ's ``Worker``/``SimpleWorker`` (its constructor builds the hooks and sets RQ's
``default_result_ttl``, nothing more), and dashboard.py's JSON-only job, queue and
worker classes (and its refusal to unpickle) are the seam to rq-dashboard, for the
dashboard's process alone (explained there).

What is here
------------
* ``DailyJob`` -- an RQ job that is always JSON. On a worker, a subclass bound to the
  worker's ``WorkerHooks`` (``bind_job_class``) refuses functions outside the task
  table and runs guarded runs under the guard.
* ``RunExecution`` -- the per-run state of one job on one worker, in one object: made
  when the worker takes the job (``GuardedWorker.execute_job``, before RQ forks, so
  the worker and its work-horse share it; lazily by the job if RQ skipped that step),
  held by the job (``DailyJob.run_execution``), carrying the guard attempt (its claim's
  owner token and BEGIN's reply) and the FINISH that waits for RQ's success
  transaction.
* ``GuardedWorker`` -- the worker overrides, typed against ``rq.worker.BaseWorker``;
  ``dailyq.worker`` combines it with RQ's ``Worker``/``SimpleWorker`` and supplies the
  dailyq side (``WorkerHooks``: table check, guard, death records, heartbeat key).
* ``DelayedJobs`` -- rq-scheduler, by composition. The leader loop
  (scheduler.DailyScheduler) is ours: rq-scheduler's lock (no owner token, failover
  after interval + 10 s), heartbeat and loop would all be replaced, so it is not
  subclassed; from rq-scheduler we use its scheduler registration and the moving of
  jobs stored through its API (``enqueue_at``/``enqueue_in``), under our prefix.
* ``make_queue``; ``RQKeys``, ``ScheduledRetries`` and ``job_entry``: RQ's data layout
  (below).

Run-time imports are RQ, rq-scheduler, redis-py and leaf modules of dailyq only (the
guard is named for type checking alone): the leader process imports ``DailyJob`` and
``make_queue`` from here without loading the worker stack (a test checks it).

RQ and rq-scheduler behaviour relied on (tests/test_rq_seam.py pins each)
-------------------------------------------------------------------------
Public hooks, and when RQ calls them -- the when is what we depend on:

1. ``Job.prepare_for_execution(worker_name, pipeline)``: called by
   ``Worker.prepare_job_execution`` in the executing process, inside the MULTI/EXEC
   that marks the job started. The run's BEGIN (claim) rides in it: no round trip.
2. ``Worker.cleanup_execution(job, pipeline, execution)``: called by
   ``handle_job_success`` with its transaction's pipeline, after MULTI and before EXEC
   (again on each WatchError retry). The run's FINISH rides in it. The job is handed
   in, so no per-run state has to sit on the worker. (RQ also calls it in its failure
   transactions; a FINISH is pending there only if RQ failed the job after the
   function returned, and FINISH is idempotent: the run is finished either way.)
3. ``Worker.handle_work_horse_killed(job, retpid, ret_val, rusage)``: called in the
   worker process when its work-horse ended without finishing the job; ``ret_val`` is
   the horse's wait status.
4. ``Worker.execute_job(job, queue)``: called in the worker process, before any fork;
   returning without calling RQ's lets the work loop go on to the next job (a run held
   back by ADMIT, limits.py, is not executed and leaves no Execution behind).
5. ``Worker.perform_job(job, queue, execution)``: wraps one job in the executing process.
6. ``Worker.heartbeat(timeout, pipeline)``: RQ reads ``results[0]`` of a pipeline it
   passes, so our commands go after its own.
7. ``Worker.handle_warm_shutdown_request()``: called when SIGTERM/SIGINT asks for a
   warm stop (``GuardedWorker.shutdown_requested``).
8. ``Worker.wait_for_horse()``: called by ``Worker.monitor_work_horse`` in the worker
   process while the horse runs, again after each ``job_monitoring_interval`` (30 s,
   its alarm interrupting the wait); it returns ``os.wait4``'s (pid, status, rusage),
   which RQ acts on as for any horse that ended (3 above). Ours waits in a polling loop
   that also kills a horse whose claim deadline passed (claim_watch.py): the horse
   cannot stop itself while its task holds the GIL. ``Worker.kill_horse(sig)`` kills
   the horse's process group.
9. ``Worker.horse_pid``, ``Job.retries_left``, ``Worker.log_result_lifespan``, the
   ``maintenance_interval``/``job_class``/``serializer`` constructor arguments.
9. Redis out of memory refuses RQ's own writes (its heartbeats, its state, the dequeue,
   its transactions) with ``OutOfMemoryError``, and RQ's work loop ends on any error but
   a connection timeout. So the places its loop meets them are wrapped, each a public
   method: ``register_birth`` and ``check_for_suspension`` (wait for writes),
   ``dequeue_job_and_maintain_ttl`` (waits, then dequeues), ``heartbeat``, ``maintain_heartbeats`` and
   ``run_maintenance_tasks`` (skipped this once), ``register_death`` (skipped: the key
   expires), ``perform_job`` (in the work-horse: the run's own end is recorded, see
   ``GuardedWorker.perform_job``). The waiting is the hooks' (``WorkerHooks.wait_for_writes``).

Internals still relied on, and why:

a. ``Job._execute()``: the call of the function, inside RQ's death penalty. The guard
   must wrap exactly this call (a timeout must reach the guard as an exception, to be
   recorded), and a non-table function must be refused before its module is imported
   (``Job.func`` imports it). RQ offers no public hook there: callbacks run after.
b. redis-py ``Pipeline.execute`` of RQ's preparation and success transactions, wrapped
   once per pipeline (``queue_keeping_reply``): RQ executes them and drops the replies,
   and we need BEGIN's and FINISH's.
c. ``Queue.intermediate_queue_key``: RQ 3 dequeues (BLMOVE, one queue, Redis >= 6.2) by
   moving the job id from the queue into this list, and the work-horse removes it in
   its preparation transaction. A set-aside run never gets there, so ADMIT removes it, or
   RQ's clean-up and ours (recovery.StrandedJobs) would take it for stranded.
d. rq-scheduler's ``redis_scheduler_namespace_prefix`` and ``scheduled_jobs_key``:
   class attributes, not constructor arguments; set on our instance to move its keys
   under our prefix.

RQ's data layout relied on
--------------------------
Outside RQ's API, dailyq reads and writes RQ's keys itself, mostly in Lua scripts that
must change our records and RQ's lists in one step. Every key name comes from
``RQKeys`` (no module spells ``rq:...``), and what the scripts do with them is:

* the queue's list (``RQKeys.queue``): a job id LPUSHed is next to be dequeued (RQ's
  ``at_front``), which is how a run goes back to the queue's front without RQ's
  ``enqueue_job`` -- RELEASE_PERMIT, SWEEP_PERMITS and RESUME (through the ``promote`` and
  ``promote_pool`` helpers, PERMITS_LUA), RETURN_LEFT, REQUEUE_STRANDED, REQUEUE_ORPHANED,
  DOCTOR_REQUEUE; REQUEUE_ORPHANED and DOCTOR_REQUEUE also LPOS it (never push twice);
* the intermediate queue (``RQKeys.intermediate``, where a dequeued job waits until it
  starts): ADMIT and LEAVE LREM a job they take over, REQUEUE_STRANDED moves a stranded
  one back to the queue,
  REQUEUE_ORPHANED and DOCTOR_REQUEUE LPOS it; recovery.StrandedJobs reads it;
* the job hash (``RQKeys.job``): SETTLE_FAILED reads its ``status`` field ('failed');
  REQUEUE_ORPHANED checks that it exists, sets ``status`` to 'queued' and PERSISTs it;
  DOCTOR_REQUEUE checks that it exists;
* the failed registry (``RQKeys.failed``, a sorted set of job ids scored by expiry):
  REQUEUE_ORPHANED and DOCTOR_REQUEUE ZREM a job they put back; settle.FailedJobs reads
  it; doctor (ops/consistency.py) reads every registry and both lists in one MULTI;
* the scheduled registry: RQ's retries waiting for their backoff, moved by
  ``ScheduledRetries`` (retries.py's leader-side mover) as RQ's own scheduler does;
* ``Queue.prepare_data``: the entry ``Queue.enqueue_many`` takes, built by ``job_entry``
  (fanout.job_data, which dependencies.py uses too, and recovery's replacement jobs);
  ``enqueue_fresh`` enqueues them, each job hash (``RQKeys.job``) deleted first, as RQ's
  save is an HSET that would keep a leftover hash's expiry.

(dailyq/scripts/ holds the Lua; each script's header lists the KEYS it takes.)
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Protocol, Sequence

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError, ResponseError
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker
from rq_scheduler import Scheduler
from rq_scheduler.utils import to_unix

from .keys import Keys
from .logs import current_run_id
from .outage import MEMORY, OutageLog, refused_for_memory, transient, wait_for_redis
from .runs import CLAIM_LOST_RESULT, META_KEY

if TYPE_CHECKING:  # the leader imports this module: no guard at run time
    from .limits import PermitHold
    from .worker.guard import Attempt, Guard, PendingFinish

log = logging.getLogger(__name__)

# RQ restarts its retry scheduler (killed by a Redis outage) only during maintenance,
# every 600 s by default: too long for retries with backoff.
MAINTENANCE_INTERVAL_S = 60

# How long RQ's pubsub thread (a worker's command channel: stop-job, shutdown) waits for a
# message at a time; RQ's own is 60 s. At the worker's exit RQ unsubscribes, then stops the
# thread, and redis-py 8's stop() waits for it: a thread that saw the unsubscribe before the
# stop waits out its whole wait first, so a burst worker, or one told to stop by SIGTERM,
# took up to 60 s more to exit (seen under load in CI, a burst of 3 runs exiting a minute late).
PUBSUB_WAIT_S = 1


# -- the job ---------------------------------------------------------------------------

@dataclass
class RunExecution:
    """One execution of one guarded run on this worker (see the module docstring)."""

    guard: Guard
    attempt: Attempt
    # Set by the guard when the function returned; FINISH then waits for RQ's success
    # transaction, and is applied on its own should that transaction not carry it.
    pending_finish: PendingFinish | None = None
    finish_committed: bool = False
    # The permit ADMIT gave a run of a task with limits (limits.py); released when the
    # execution ends, whichever way.
    permit: PermitHold | None = None
    # Set in the worker process when it killed the work-horse because the horse's claim
    # deadline passed (GuardedWorker.wait_for_horse): that copy records nothing.
    killed_because: str | None = None
    # Set when this copy stopped because its claim was gone, and so recorded nothing (its
    # work-horse exited for it, was killed for it, or the guard returned "claim lost"):
    # the worker then checks that something still backs the run (WorkerHooks.stopped).
    stopped_for_claim: bool = False

    def claim_in(self, pipeline: Pipeline) -> None:
        """BEGIN in RQ's preparation transaction, its reply handed to the attempt."""
        queue_keeping_reply(pipeline, lambda p: self.guard.claim_in(self.attempt, p), self.attempt.keep_begin_reply)

    def defer_finish(self, pending: PendingFinish) -> None:
        self.pending_finish = pending

    def finish_in(self, pipeline: Pipeline) -> None:
        """FINISH in RQ's success transaction (queued again if RQ retries it)."""
        pending = self.pending_finish
        if pending is None or self.finish_committed:
            return

        permit = self.permit if self.permit is not None and not self.permit.released else None

        def committed(reply: Any) -> None:
            self.finish_committed = True
            if permit is not None:
                permit.released = True  # RELEASE_PERMIT rode in the same transaction
            pending.replied(reply)

        # By SHA unless a permit rides along: its release must never commit without FINISH
        # (after a NOSCRIPT, FINISH would follow on its own, a few round trips later, and a
        # run the freed permit let in meanwhile, often this run's next slot, would find the
        # series claim still held: skipped with overlap='skip').
        queue_keeping_reply(pipeline, lambda p: pending.queue_in(p, by_sha=permit is None), committed)
        if permit is not None:
            # The permit frees with FINISH, in RQ's transaction: no round trip of its own.
            permit.release_call().queue_in(pipeline)

    def finish_if_not_committed(self) -> None:
        """After the job: a FINISH that no RQ transaction carried is applied now."""
        pending, self.pending_finish = self.pending_finish, None
        if pending is not None and not self.finish_committed:
            pending.apply()

    def end(self) -> None:
        """After the job, in the executing process: FINISH if still due, then the permit
        frees (after FAIL, or a BEGIN that did not claim, it is still held)."""
        try:
            self.finish_if_not_committed()
        finally:
            self.release_permit()

    def release_permit(self) -> None:
        if self.permit is not None:
            self.permit.release()


class WorkerHooks(Protocol):
    """What the seam asks of dailyq for a worker's jobs (``worker.WorkerContext``)."""

    def check_allowed(self, job: DailyJob) -> None:
        """Raise if this worker must not run the job's function (never imports it)."""

    def take(self, job: DailyJob) -> RunExecution | None:
        """The job's run execution, or None when it is not a guarded run of ours."""

    def leave(self, job: DailyJob, queue: Queue) -> None:
        """Leave a job whose run this worker's table lacks (``job.foreign_reason`` says why)
        for a node whose table has it (deploys.py): off the queue, not executed, not failed."""

    def admit(self, execution: RunExecution, queue: Queue) -> bool:
        """Before the run starts (before any fork): False when it is set aside, over a
        limit of its task or the task paused (limits.py); the job is then off the queue,
        held, and the worker goes on without executing it."""

    def put_back(self, job: DailyJob, queue: Queue) -> None:
        """Redis failed during ``execute_job``: put the job back on the queue if it never
        started and its run still waits for it (it would sit in RQ's intermediate queue)."""

    def record_death(self, execution: RunExecution, wait_status: int, rq_can_retry: bool) -> bool:
        """Record that the work-horse executing ``execution`` died; True if RQ may retry it."""

    def stopped(self, execution: RunExecution, queue: Queue) -> None:
        """After RQ handled the end of an execution that stopped for its claim: put its job
        back on the queue if nothing backs the run any more (Redis lost the claim)."""

    def beat(self, worker_pid: int, promise_s: float, pipeline: Pipeline | None) -> None:
        """Write this node's worker heartbeat, in ``pipeline`` when given."""

    def wait_for_writes(self, what: str, stopping: Callable[[], bool]) -> bool:
        """Redis refused a write for memory: note it (one line per process and episode) and
        wait, with backoff, until Redis accepts writes again (True), or ``stopping()``
        (False)."""


class DailyJob(Job):
    """An RQ job that is always JSON-serialized and, on a worker, checked before it runs."""

    hooks: ClassVar[WorkerHooks | None] = None  # set on the subclass a worker binds

    def __init__(self, id: str | None = None, connection: Redis | None = None, serializer: Any = None) -> None:
        # Ignore any serializer handed in: pickle would let anyone who can write to
        # Redis run code on every node.
        super().__init__(id=id, connection=connection, serializer=JSONSerializer)
        self.run_execution: RunExecution | None = None
        self._taken = False
        # Set by ``take`` when this worker's table lacks the job's task, param or function:
        # the worker leaves the job for another node (deploys.py) instead of running it.
        self.foreign_reason: str | None = None

    def take(self) -> RunExecution | None:
        """Make this job's run execution, once (the worker does it before it forks)."""
        hooks = type(self).hooks
        if not self._taken and hooks is not None:
            self.run_execution = hooks.take(self)
            self._taken = True
        return self.run_execution

    def prepare_for_execution(self, worker_name: str, pipeline: Pipeline) -> None:
        """RQ's, plus the run's first claim (BEGIN) in the same transaction."""
        super().prepare_for_execution(worker_name, pipeline)
        execution = self.take()
        if execution is not None:
            execution.claim_in(pipeline)

    def _execute(self) -> Any:
        hooks = type(self).hooks
        if hooks is None:
            return super()._execute()
        hooks.check_allowed(self)
        execution = self.take()
        if execution is None:  # an ad-hoc enqueue of a table function: run it as plain RQ would
            return super()._execute()
        result = execution.guard.execute(execution.attempt.run, super()._execute,
                                         will_retry=lambda: bool(self.retries_left),
                                         defer_finish=execution.defer_finish, attempt=execution.attempt,
                                         cancel_retry=self._cancel_retry)
        if result is CLAIM_LOST_RESULT:  # the guard's own object: a task returning an equal dict is not a stop
            execution.stopped_for_claim = True  # seen by this process's worker when it does not fork
        return result

    def _cancel_retry(self) -> None:
        # RQ reads the job's in-memory count when it handles the failure: no retry then.
        self.retries_left = 0


def bind_job_class(hooks: WorkerHooks) -> type[DailyJob]:
    """A DailyJob subclass that knows this worker's hooks (no globals)."""
    return type("BoundDailyJob", (DailyJob,), {"hooks": hooks})


def make_queue(connection: Redis, keys: Keys, job_class: type[Job] = DailyJob) -> Queue:
    return Queue(keys.queue_name, connection=connection, job_class=job_class, serializer=JSONSerializer)


class RQKeys:
    """RQ's Redis keys of one queue, as our Lua scripts and doctor's reads name them (the
    layout listed in the module docstring). The one place dailyq takes them from RQ: no
    other module spells ``rq:...`` or asks a queue for them. Read when asked (a worker
    asks for two per job), so nothing is built that the caller does not use."""

    __slots__ = ("_queue",)

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    @property
    def queue(self) -> str:
        """The queue's list of job ids; RQ pops its left end, so LPUSH is "at the front"."""
        return str(self._queue.key)

    @property
    def intermediate(self) -> str:
        """RQ 3's list of job ids dequeued but not started yet (BLMOVE moves them here)."""
        return str(self._queue.intermediate_queue_key)

    # RQ's registries: sorted sets of job ids (the started one's members are
    # "{job id}:{execution id}").
    @property
    def started(self) -> str:
        return str(self._queue.started_job_registry.key)

    @property
    def scheduled(self) -> str:
        return str(self._queue.scheduled_job_registry.key)

    @property
    def failed(self) -> str:
        return str(self._queue.failed_job_registry.key)

    @property
    def finished(self) -> str:
        return str(self._queue.finished_job_registry.key)

    @staticmethod
    def job(job_id: str) -> str:
        """RQ's hash of one job (its ``status`` field, its existence)."""
        return str(Job.key_for(job_id))


class ScheduledRetries:
    """RQ's ScheduledJobRegistry of one queue: where RQ keeps a retry until its backoff
    has passed, and the move RQ's own scheduler makes out of it (retries.py's mover)."""

    def __init__(self, connection: Redis, queue: Queue) -> None:
        self.connection = connection
        self.queue = queue
        self._registry = ScheduledJobRegistry(queue=queue)

    @property
    def key(self) -> str:
        """The registry's sorted set: job ids scored by when they are due (s)."""
        return str(self._registry.key)

    def enqueue_in(self, job_ids: Sequence[str], pipeline: Pipeline) -> None:
        """Read the jobs now (``pipeline`` may be watching), then ``pipeline.multi()`` and
        queue, per job, its removal from the registry and its enqueue, front or back as
        the job asks (RQ's scheduler does the same); a job whose hash is gone is only removed."""
        jobs = self.queue.job_class.fetch_many(list(job_ids), connection=self.connection,
                                               serializer=self.queue.serializer)
        pipeline.multi()
        for job_id, job in zip(job_ids, jobs):
            self._registry.remove(job_id, pipeline=pipeline)
            if job is not None:
                self.queue.enqueue_job(job, pipeline=pipeline, at_front=job.should_enqueue_at_front())


def job_entry(queue: Queue, func: str, **options: Any) -> Any:
    """``Queue.prepare_data``: one entry of what ``Queue.enqueue_many`` takes (options as
    ``prepare_data``'s keyword arguments)."""
    return queue.prepare_data(func, **options)


def enqueue_fresh(queue: Queue, entries: Sequence[Any], pipeline: Pipeline) -> None:
    """``Queue.enqueue_many`` of ``job_entry``s in ``pipeline`` (a transaction), each job's
    hash deleted first, so that it is written whole. RQ's save is an HSET: a hash left under
    the same job id (an earlier job of that id, kept for RQ's result TTL) would keep its
    expiry and its old fields, and once it expired RQ would drop the queued job unseen.
    Every caller enqueues a job id that nothing else uses (a run's first job, or a fresh
    ``-rN``), so what is deleted can only be such a leftover."""
    if entries:  # one DEL for the lot: a command per job cost 16 us per run in redis-py
        pipeline.delete(*(RQKeys.job(str(entry.job_id)) for entry in entries))
    queue.enqueue_many(list(entries), pipeline=pipeline)


def queue_keeping_reply(pipeline: Pipeline, queue: Callable[[Pipeline], None], keep: Callable[[Any], None]) -> None:
    """``queue(pipeline)`` adds one command to a pipeline someone else executes; ``keep``
    gets that command's reply once they do. RQ executes its transactions itself and
    drops the replies, so this wraps that one pipeline's ``execute`` (internal b).

    The command may be an EVALSHA (ScriptCall.queue_in's ``by_sha``): a NOSCRIPT reply to it
    (Redis lost its script cache: a restart, a failover) is then neither kept nor raised, so
    the owner's transaction goes on as if the command had not been queued, and the caller,
    which got no reply, sends it on its own (the guard's BEGIN and FINISH do). Any other
    error is raised, as redis-py would, before ``keep`` sees a reply."""
    index = len(pipeline.command_stack)
    queue(pipeline)
    if len(pipeline.command_stack) != index + 1:
        return  # not exactly one command: no reply to pick out (the guard then asks again)
    execute = pipeline.execute

    def execute_and_keep(raise_on_error: bool = True) -> list[Any]:
        del pipeline.__dict__["execute"]  # once only: a later execute of a reused pipeline is not ours
        commands = [args for args, _options in pipeline.command_stack]
        replies = execute(False)
        ours = replies[index]
        not_sent = isinstance(ours, NoScriptError)
        if raise_on_error:
            for number, reply in enumerate(replies):
                if isinstance(reply, ResponseError) and not (number == index and not_sent):
                    pipeline.annotate_exception(reply, number + 1, commands[number])
                    raise reply
        if not not_sent:
            keep(ours)
        return replies

    # An instance attribute shadows the method for this one pipeline object.
    pipeline.__dict__["execute"] = execute_and_keep


# -- the worker --------------------------------------------------------------------------

def queue_names(queues: Sequence[str | Queue] | str | Queue | None, default: str) -> list[str]:
    if not queues:
        return [default]
    if isinstance(queues, (str, Queue)):
        queues = [queues]
    return [q.name if isinstance(q, Queue) else str(q) for q in queues]


class GuardedWorker(BaseWorker):
    """RQ's worker with dailyq's hooks; combined with ``rq.Worker`` or ``rq.SimpleWorker``.

    Everything it changes is made in its constructor or in a public hook, so that
    ``rq worker -w dailyq.worker.DailyWorker`` gets it too.
    """

    # RQ's "job ... result is kept for N seconds" line, once per run, says nothing about
    # a daily run (nothing reads results), and each line costs the worker ~40 us.
    log_result_lifespan = False

    def __init__(self, queues: Sequence[str | Queue] | str | Queue | None, *, hooks: WorkerHooks,
                 default_queue: str, connection: Redis, **kwargs: Any) -> None:
        job_class = bind_job_class(hooks)
        # Ours replace whatever the caller (the rq CLI) passes: a pickling job class or serializer.
        kwargs.pop("job_class", None)
        kwargs.pop("serializer", None)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL_S)
        # Rebuild queues ourselves: the rq CLI builds them with its own (pickling) job class.
        rebuilt = [Queue(name, connection=connection, job_class=job_class, serializer=JSONSerializer)
                   for name in queue_names(queues, default_queue)]
        self.hooks = hooks
        self.shutdown_requested = False
        # The last dequeue found every queue empty: RQ's loop ends on that in burst mode,
        # but also, saying nothing to its caller, on a Redis timeout or any error it logs.
        self.drained = False
        # The execution whose work-horse runs now, if its claim is watched (wait_for_horse).
        self._watched: RunExecution | None = None
        super().__init__(rebuilt, connection=connection, job_class=job_class, serializer=JSONSerializer, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """RQ's, except that losing Redis while a run executes does not stop the worker:
        it waits for Redis, lets the work-horse finish (the horse records the run
        itself, see guard.py), then goes back to pulling jobs. The run's execution (its
        claim's owner token) is made here, before RQ forks the work-horse, so that this
        process can record the horse's death."""
        try:
            if isinstance(job, DailyJob):
                execution = self._watched = job.take()
                if execution is None and job.foreign_reason is not None:
                    self.hooks.leave(job, queue)
                    return  # left for a node whose table has its run: the work loop goes on
                if execution is not None and not self.hooks.admit(execution, queue):
                    return  # set aside: RQ's work loop goes on to the next job
            super().execute_job(job, queue)
            if isinstance(job, DailyJob) and job.run_execution is not None and job.run_execution.stopped_for_claim:
                self.hooks.stopped(job.run_execution, queue)
        except RedisError as error:
            # Away, or out of memory (RQ's heartbeats and records are refused; the horse
            # renews its claim and records its run with scripts that a full Redis runs).
            if not transient(error):
                raise
            outage = OutageLog(log, f"worker {self.name}")
            outage.failed(error)
            wait_for_redis(self.connection.ping, outage)
            if self.horse_pid:
                self.wait_for_horse()  # still watching its claim
            if isinstance(job, DailyJob):
                self.hooks.put_back(job, queue)  # if it never started: else a no-op
        finally:
            watched, self._watched = self._watched, None
            if watched is not None and watched.attempt.shared_deadline is not None:
                watched.attempt.shared_deadline.close()  # this process's mapping only (the horse's is its own)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """RQ's, in the executing process, and then the run's end (FINISH if still due).

        When Redis is out of memory RQ cannot record the job's end (its transactions are
        refused, and it raises out of its own failure handling), but the run's end is
        ours and is recorded (FINISH and FAIL run on a full Redis). That is not a crash of
        the work-horse: it returns, so its worker does not take it for a death. RQ's job
        stays ``started`` until RQ's own clean-up of abandoned jobs retries it (then BEGIN
        skips it: finished) or fails it."""
        if self.is_horse:
            MEMORY.quiet = True  # its worker logs the memory episode for it (outage.MemoryNotice)
        # RQ's lines about this job (its result, its duration) carry the run id in JSON logs.
        tagged = current_run_id.set(((job.meta or {}).get(META_KEY) or {}).get("run_id"))
        ours = isinstance(job, DailyJob) and job.run_execution is not None
        try:
            return super().perform_job(job, queue, execution)
        except RedisError as error:
            if not (ours and refused_for_memory(error)):
                raise
            MEMORY.refused(f"recording job {job.id} in RQ")
        finally:
            current_run_id.reset(tagged)
            if isinstance(job, DailyJob) and job.run_execution is not None:
                job.run_execution.end()
        return False

    def register_birth(self) -> None:
        """RQ's; while Redis refuses it for memory, wait for writes and try again."""
        while True:
            try:
                return super().register_birth()
            except RedisError as error:
                if not refused_for_memory(error):
                    raise
                self.hooks.wait_for_writes(f"worker {self.name} starting", lambda: False)

    def register_death(self) -> None:
        """RQ's; refused for memory, it is left out (the worker's key expires by itself)."""
        try:
            super().register_death()
        except RedisError as error:
            if not refused_for_memory(error):
                raise
            MEMORY.refused(f"worker {self.name} stopping")

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's; a refusal for memory (of its state, its heartbeat, the dequeue itself)
        waits until Redis accepts writes again, then dequeues. None when asked to stop
        meanwhile (RQ's loop then ends as for an empty burst). Notes whether the queues were
        empty (``drained``)."""
        while True:
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                self.drained = result is None
                return result
            except RedisError as error:
                if not refused_for_memory(error):
                    raise
                if not self.hooks.wait_for_writes(f"worker {self.name}", lambda: self.shutdown_requested):
                    return None

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's (its check beats in a transaction); refused for memory, it waits for writes."""
        try:
            super().check_for_suspension(burst)
        except RedisError as error:
            if not refused_for_memory(error):
                raise
            self.hooks.wait_for_writes(f"worker {self.name}", lambda: self.shutdown_requested)

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except RedisError as error:  # refused for memory: done at the next maintenance
            if not refused_for_memory(error):
                raise
            MEMORY.refused(f"worker {self.name} maintenance")

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        """RQ's beat while a work-horse runs; refused for memory, skipped this once (the
        horse renews its own claim)."""
        try:
            super().maintain_heartbeats(job, execution)
        except RedisError as error:
            if not refused_for_memory(error):
                raise
            MEMORY.refused(f"worker {self.name} heartbeat")

    def cleanup_execution(self, job: Job, pipeline: Pipeline, execution: Execution | None = None) -> None:
        """RQ's, plus the run's FINISH: on success RQ calls this inside the transaction
        that records the job's success, so the run is marked finished together with it,
        in the same round trip (behaviour 2 in the module docstring)."""
        super().cleanup_execution(job, pipeline, execution)
        if isinstance(job, DailyJob) and job.run_execution is not None:
            job.run_execution.finish_in(pipeline)

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        """RQ's hook for a work-horse that ended without finishing its job: a dying task
        counts as an attempt, recorded now (``WorkerHooks.record_death``)."""
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        if not isinstance(job, DailyJob) or job.run_execution is None:
            return
        try:
            if not self.hooks.record_death(job.run_execution, ret_val, rq_can_retry=bool(job.retries_left)):
                job.retries_left = 0  # not RQ's to retry: failed, or the leader's to take over
        finally:
            job.run_execution.release_permit()  # the horse is gone: its permit with it

    def wait_for_horse(self) -> tuple[Any, Any, Any]:
        """RQ's wait for the work-horse (behaviour 8), watching the horse's claim: a horse
        whose claim deadline passed (its task holds the GIL, so neither its renewer nor
        its watchdog runs) is killed with SIGKILL before the claim can lapse, and its
        copy records nothing (``killed_because``; WorkerHooks.record_death)."""
        execution = self._watched
        deadline = execution.attempt.shared_deadline if execution is not None else None
        if execution is None or deadline is None or not self.horse_pid:
            return super().wait_for_horse()
        horse_pid = self.horse_pid
        run_id = execution.attempt.run.run_id

        def kill(overdue_s: float) -> None:
            execution.killed_because = f"its claim was not confirmed in time ({overdue_s:.1f}s past its deadline)"
            log.error("run %s: killing its work-horse (pid %d): %s; its task holds the interpreter (a C call "
                      "holding the GIL?), so the horse could not stop itself; this copy records nothing",
                      run_id, horse_pid, execution.killed_because, extra={"run_id": run_id})
            self.kill_horse(signal.SIGKILL)

        # Here, not at the top: the leader imports this module and loads no worker code.
        from .worker.claim_watch import wait_watching  # noqa: PLC0415

        return wait_watching(horse_pid, deadline, kill)

    def subscribe(self) -> None:
        """RQ's, with its pubsub thread waiting PUBSUB_WAIT_S at a time (no Redis command
        when nothing comes): the worker's exit waits for that thread at most that long."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        # (RQ declares the attribute with a bare None, hence the ignore.)
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=PUBSUB_WAIT_S, daemon=True, exception_handler=self._pubsub_exception_handler)

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat, plus this node's worker heartbeat key (``WorkerHooks.beat``).

        ``timeout`` is RQ's promise: "the next heartbeat comes before this"; None when
        idle, meaning worker_ttl + 60 (RQ's own default for it)."""
        try:
            super().heartbeat(timeout, pipeline)
            # self.pid is the worker's pid, also inside a work-horse (which beats once per run).
            self.hooks.beat(self.pid or os.getpid(), timeout or self.worker_ttl + 60, pipeline)
        except RedisError as error:
            # Refused for memory: skipped this once (a pipeline of RQ's raises later, in RQ).
            if pipeline is not None or not refused_for_memory(error):
                raise
            MEMORY.refused(f"worker {self.name} heartbeat")

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        self.shutdown_requested = True  # SIGTERM/SIGINT asked this worker to stop


# -- the leader ----------------------------------------------------------------------------

class DelayedJobs:
    """rq-scheduler's registration of a scheduler process and its store of delayed jobs
    (``enqueue_at``/``enqueue_in``), under our prefix and with JSON jobs. The leader
    loop, its lock (our ``Lease``) and its clock are the caller's; this never touches
    rq-scheduler's lock."""

    def __init__(self, connection: Redis, keys: Keys, name: str, interval_s: float) -> None:
        self.interval_s = interval_s
        self._scheduler = Scheduler(queue_name=keys.queue_name, connection=connection, interval=interval_s,
                                    job_class=DailyJob, name=name)
        # Class attributes in rq-scheduler (internal d): set on this instance only.
        self._scheduler.redis_scheduler_namespace_prefix = keys.scheduler_instance_prefix
        self._scheduler.scheduled_jobs_key = keys.scheduled_jobs

    @property
    def key(self) -> str:
        """This process's registration hash."""
        return str(self._scheduler.key)

    def register_birth(self) -> None:
        self._scheduler.register_birth()

    def register_death(self) -> None:
        self._scheduler.register_death()

    def keep_registered(self, pipeline: Pipeline, ttl_s: int) -> None:
        pipeline.expire(self.key, ttl_s)

    def move_due(self, now: datetime) -> list[Job]:
        """Move the jobs due by ``now`` (our clock, Redis's) into their queues."""
        due: Iterable[Job] = self._scheduler.get_jobs(to_unix(now))
        moved = []
        for job in due:
            self._scheduler.enqueue_job(job)
            moved.append(job)
        return moved

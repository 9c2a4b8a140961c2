"""Pins the RQ and rq-scheduler behaviours that dailyq/rq_seam.py relies on (its module
docstring lists them): an upgrade that changes one of them fails here, by name,
instead of somewhere in the guard. Plain RQ classes with recording subclasses, a real
redis-server (conftest), no mocks."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from redis.client import Pipeline
from rq import Queue, SimpleWorker, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker
from rq_scheduler import Scheduler

from dailyq.retries import DueRetries
from dailyq.rq_seam import DailyJob, DelayedJobs, GuardedWorker, RQKeys, ScheduledRetries
from tests.support.helpers import ROOT

# The plain RQ workers these tests probe exit without RQ's 60 s pubsub wait (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("rq_workers_exit_at_once")


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """RQ's work loop installs SIGINT/SIGTERM handlers in the test process: restore them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def queue_of(connection, settings, job_class: type[Job] = Job) -> Queue:
    return Queue(f"{settings.prefix}-pin", connection=connection, job_class=job_class, serializer=JSONSerializer)


def status_in_redis(connection, job_id: str) -> bytes | None:
    return connection.hget(f"rq:job:{job_id}", "status")


# -- 1. BEGIN rides in the transaction that marks the job started ----------------------

def test_prepare_for_execution_is_called_inside_the_transaction_that_marks_the_job_started(connection, settings):
    seen: list[dict[str, Any]] = []

    class Probe(Job):
        def prepare_for_execution(self, worker_name: str, pipeline: Pipeline) -> None:
            super().prepare_for_execution(worker_name, pipeline)
            seen.append({"transaction": pipeline.transaction, "queued": len(pipeline.command_stack),
                         "status_now": status_in_redis(connection, self.id), "pid": os.getpid()})
            pipeline.set(f"{settings.prefix}:rode-along", self.id)

    queue = queue_of(connection, settings, Probe)
    job = queue.enqueue("tests.tables.sample_tasks.noop", 1)
    SimpleWorker([queue], connection=connection, job_class=Probe, serializer=JSONSerializer).work(burst=True)
    (call,) = seen
    assert call["transaction"] and call["queued"] > 0  # a MULTI/EXEC pipeline RQ fills and executes
    assert call["status_now"] != b"started"  # not yet: RQ marks it started in that same transaction
    assert call["pid"] == os.getpid()  # in the process that executes the job
    assert connection.get(f"{settings.prefix}:rode-along") == job.id.encode()  # our command was executed
    assert status_in_redis(connection, job.id) == b"finished"


# -- 2. FINISH rides in the transaction that records the job's success -----------------

def test_cleanup_execution_gets_the_success_transaction_before_it_is_executed(connection, settings):
    seen: list[dict[str, Any]] = []

    class Probe(SimpleWorker):
        def cleanup_execution(self, job: Job, pipeline: Pipeline, execution: Any = None) -> None:
            super().cleanup_execution(job, pipeline, execution)
            seen.append({"job": job.id, "in_multi": pipeline.explicit_transaction,
                         "status_now": status_in_redis(connection, job.id)})
            pipeline.set(f"{settings.prefix}:finish-rode-along", job.id)

    queue = queue_of(connection, settings)
    job = queue.enqueue("tests.tables.sample_tasks.noop", 1)
    Probe([queue], connection=connection, serializer=JSONSerializer).work(burst=True)
    (call,) = seen
    assert call["job"] == job.id and call["in_multi"]
    assert call["status_now"] == b"started"  # the success is not recorded yet ...
    assert status_in_redis(connection, job.id) == b"finished"  # ... and is, with our command
    assert connection.get(f"{settings.prefix}:finish-rode-along") == job.id.encode()


# -- 3. a work-horse that dies ----------------------------------------------------------

def test_handle_work_horse_killed_gets_the_job_and_the_horses_wait_status(connection, settings):
    seen: list[tuple[Any, ...]] = []

    class Probe(Worker):
        def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
            super().handle_work_horse_killed(job, retpid, ret_val, rusage)
            seen.append((job.id, retpid, ret_val, os.getpid(), self.horse_pid))

    queue = queue_of(connection, settings)
    job = queue.enqueue("os._exit", 3)
    worker = Probe([queue], connection=connection, serializer=JSONSerializer)
    assert worker.horse_pid == 0  # public, and 0 without a horse
    worker.work(burst=True)
    (call,) = seen
    job_id, retpid, ret_val, pid, horse_pid = call
    assert job_id == job.id and retpid > 0 and retpid != os.getpid()
    assert os.WIFEXITED(ret_val) and os.WEXITSTATUS(ret_val) == 3  # a wait status
    assert pid == os.getpid()  # called in the worker process, not the horse
    assert horse_pid == 0  # reset before the hook: the hook must take the horse from retpid


# -- execute_job before the fork; a held run (limits.py) -----------------------------------

def test_a_dequeued_job_waits_in_the_intermediate_queue_and_an_execute_job_that_returns_is_skipped(connection,
                                                                                                    settings):
    """RQ 3 moves a dequeued job id into ``queue.intermediate_queue_key`` (internal c),
    where ADMIT takes a held run from; ``execute_job`` runs in the worker before any
    fork, and returning from it without RQ's lets the loop go on to the next job with
    the skipped job still ``queued`` (behaviour 4)."""
    seen: list[tuple[str, list[bytes], int]] = []

    class Probe(Worker):
        def execute_job(self, job: Job, queue: Queue) -> None:
            seen.append((job.id, connection.lrange(queue.intermediate_queue_key, 0, -1), os.getpid()))
            if job.args == ["hold"]:
                connection.lrem(queue.intermediate_queue_key, 1, job.id)  # what ADMIT does
                return
            super().execute_job(job, queue)

    queue = queue_of(connection, settings)
    held = queue.enqueue("builtins.print", "hold")
    ran = queue.enqueue("builtins.print", "run")
    Probe([queue], connection=connection, serializer=JSONSerializer).work(burst=True)
    assert [(job_id, waiting) for job_id, waiting, _ in seen] == [(held.id, [held.id.encode()]),
                                                                 (ran.id, [ran.id.encode()])]
    assert {pid for *_, pid in seen} == {os.getpid()}
    assert status_in_redis(connection, held.id) == b"queued" and status_in_redis(connection, ran.id) == b"finished"
    assert connection.llen(queue.intermediate_queue_key) == 0 and queue.count == 0


# -- 4. the function call: Job._execute -----------------------------------------------------

def test_job_execute_is_the_call_inside_the_timeout_and_before_the_function_is_imported(connection, settings):
    assert list(inspect.signature(Job._execute).parameters) == ["self"]
    seen: list[str] = []

    class Probe(Job):
        def _execute(self) -> Any:
            if self.func_name.startswith("no_such_module"):
                raise LookupError("refused before import")
            try:
                return super()._execute()
            except BaseException as exc:
                seen.append(type(exc).__name__)
                raise

    queue = queue_of(connection, settings, Probe)
    refused = queue.enqueue("no_such_module.f", 1)
    slow = queue.enqueue("time.sleep", 5, job_timeout=1)
    ok = queue.enqueue("tests.tables.sample_tasks.noop", 7)
    SimpleWorker([queue], connection=connection, job_class=Probe, serializer=JSONSerializer).work(burst=True)
    refused_result = Job.fetch(refused.id, connection=connection, serializer=JSONSerializer).latest_result()
    assert refused_result is not None and "LookupError: refused before import" in refused_result.exc_string
    assert "ModuleNotFoundError" not in refused_result.exc_string  # Job.func was never resolved
    assert seen == ["JobTimeoutException"]  # RQ's timeout reaches whatever wraps the call
    assert status_in_redis(connection, slow.id) == b"failed"
    assert Job.fetch(ok.id, connection=connection, serializer=JSONSerializer).return_value() == 7


# -- 5. heartbeat and warm shutdown ---------------------------------------------------------

def test_heartbeat_takes_a_promise_and_a_pipeline_rq_executes(connection, settings):
    seen: list[tuple[int | None, bool]] = []

    class Probe(SimpleWorker):
        def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
            super().heartbeat(timeout, pipeline)
            seen.append((timeout, pipeline is not None))
            if pipeline is not None:
                pipeline.incr(f"{settings.prefix}:beats-in-rq-pipelines")

    queue = queue_of(connection, settings)
    queue.enqueue("tests.tables.sample_tasks.noop", 1, job_timeout=100)
    worker = Probe([queue], connection=connection, serializer=JSONSerializer)
    worker.work(burst=True)
    # Before a run, RQ beats in its preparation transaction, promising the job's timeout + 60.
    assert (160, True) in seen
    assert int(connection.get(f"{settings.prefix}:beats-in-rq-pipelines") or 0) >= 1
    # Without a timeout RQ's own promise is worker_ttl + 60 (WorkerContext.beat assumes it).
    worker.heartbeat()
    assert worker.worker_ttl + 50 < connection.ttl(worker.key) <= worker.worker_ttl + 60


def test_a_warm_stop_request_calls_handle_warm_shutdown_request(connection, settings):
    called: list[int] = []

    class Probe(SimpleWorker):
        def handle_warm_shutdown_request(self) -> None:
            super().handle_warm_shutdown_request()
            called.append(os.getpid())

    worker = Probe([queue_of(connection, settings)], connection=connection, serializer=JSONSerializer)
    from rq.worker.base import StopRequested

    with pytest.raises(StopRequested):  # idle: RQ stops at once
        worker.request_stop(signal.SIGTERM, None)
    assert called == [os.getpid()]


# -- 8. the parent's wait for its work-horse ------------------------------------------------

def test_wait_for_horse_is_the_parents_wait_called_again_after_each_monitoring_interval(connection, settings):
    """``monitor_work_horse`` calls ``wait_for_horse`` in the worker process while the
    horse runs; its alarm (``job_monitoring_interval``) interrupts a wait that has not
    returned, and RQ calls it again; what it returns is what RQ acts on (a horse it
    killed with ``kill_horse(SIGKILL)`` reaches ``handle_work_horse_killed``)."""
    calls: list[tuple[int, int, float]] = []
    killed: list[tuple[int, int]] = []

    class Probe(Worker):
        def wait_for_horse(self) -> Any:
            calls.append((os.getpid(), self.horse_pid, time.monotonic()))
            if len(calls) < 3:
                while True:  # a polling wait: RQ's alarm ends it
                    time.sleep(0.05)
            self.kill_horse(signal.SIGKILL)
            return super().wait_for_horse()

        def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
            super().handle_work_horse_killed(job, retpid, ret_val, rusage)
            killed.append((retpid, ret_val))

    queue = queue_of(connection, settings)
    queue.enqueue("time.sleep", 60)
    Probe([queue], connection=connection, serializer=JSONSerializer, job_monitoring_interval=1).work(burst=True)
    assert len(calls) == 3
    assert {pid for pid, *_ in calls} == {os.getpid()}  # the worker process, not the horse
    horse = calls[0][1]
    assert horse and horse != os.getpid() and {h for _, h, _ in calls} == {horse}
    assert calls[2][2] - calls[0][2] >= 1.5  # called again once per interval (1 s)
    ((retpid, ret_val),) = killed
    assert retpid == horse and os.WIFSIGNALED(ret_val) and os.WTERMSIG(ret_val) == signal.SIGKILL


# -- 6. what GuardedWorker overrides still exists, with the signatures it assumes ----------

def test_the_overridden_rq_methods_exist_with_the_signatures_the_seam_uses():
    expected = {
        "execute_job": ["self", "job", "queue"],
        "perform_job": ["self", "job", "queue", "execution"],
        "cleanup_execution": ["self", "job", "pipeline", "execution"],
        "handle_work_horse_killed": ["self", "job", "retpid", "ret_val", "rusage"],
        "heartbeat": ["self", "timeout", "pipeline"],
        "handle_warm_shutdown_request": ["self"],
        "wait_for_horse": ["self"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(BaseWorker, name)).parameters) == parameters, name
        assert name in GuardedWorker.__dict__, name  # and the seam overrides each
    assert list(inspect.signature(Job.prepare_for_execution).parameters) == ["self", "worker_name", "pipeline"]
    assert isinstance(BaseWorker.__dict__["horse_pid"], property)
    assert list(inspect.signature(Worker.kill_horse).parameters) == ["self", "sig"]
    assert {"maintenance_interval", "job_class", "serializer", "connection"} <= set(
        inspect.signature(BaseWorker.__init__).parameters)
    assert "log_result_lifespan" in vars(BaseWorker)


# -- 7. rq-scheduler, by composition ----------------------------------------------------------

def test_rq_scheduler_stores_and_moves_delayed_jobs_under_our_keys(connection, settings):
    keys = settings.keys
    delayed = DelayedJobs(connection, keys, name="pin", interval_s=1.0)
    delayed.register_birth()
    assert delayed.key.startswith(keys.scheduler_instance_prefix)
    assert 0 < connection.ttl(delayed.key) <= 11  # rq-scheduler: interval + 10
    # Someone stores a job through rq-scheduler's stock API, with our keys and job class.
    stock = Scheduler(queue_name=keys.queue_name, connection=connection, job_class=DailyJob)
    stock.redis_scheduler_namespace_prefix = keys.scheduler_instance_prefix
    stock.scheduled_jobs_key = keys.scheduled_jobs
    now = datetime.now(timezone.utc)
    due = stock.enqueue_at(now - timedelta(seconds=5), "tests.tables.sample_tasks.noop", 1)
    later = stock.enqueue_at(now + timedelta(hours=1), "tests.tables.sample_tasks.noop", 2)
    assert connection.zcard(keys.scheduled_jobs) == 2
    assert [j.id for j in delayed.move_due(now)] == [due.id]
    assert connection.lrange(f"rq:queue:{keys.queue_name}", 0, -1) == [due.id.encode()]
    assert connection.zrange(keys.scheduled_jobs, 0, -1) == [later.id.encode()]
    assert DailyJob.fetch(due.id, connection=connection).func_name == "tests.tables.sample_tasks.noop"  # JSON
    delayed.register_death()
    assert connection.hexists(delayed.key, "death")


# -- 7b. RQ's data layout (RQKeys, ScheduledRetries) -----------------------------------------

def test_rq_keys_are_the_keys_rq_uses_for_the_queue_its_registries_and_a_job(connection, settings):
    queue = queue_of(connection, settings, DailyJob)
    rq_keys = RQKeys(queue)
    job = queue.enqueue("tests.tables.sample_tasks.noop", 1)
    assert connection.lrange(rq_keys.queue, 0, -1) == [job.id.encode()]
    assert connection.hget(rq_keys.job(job.id), "status") == b"queued"
    assert (rq_keys.started, rq_keys.scheduled, rq_keys.failed, rq_keys.finished) == (
        queue.started_job_registry.key, queue.scheduled_job_registry.key, queue.failed_job_registry.key,
        queue.finished_job_registry.key)
    assert rq_keys.intermediate == queue.intermediate_queue_key


def test_a_retry_waiting_in_rqs_scheduled_registry_is_moved_back_to_the_queue_when_due(connection, settings):
    queue = queue_of(connection, settings, DailyJob)
    now = datetime.now(timezone.utc)
    due = queue.create_job("tests.tables.sample_tasks.noop", args=(1,))
    later = queue.create_job("tests.tables.sample_tasks.noop", args=(2,))
    queue.schedule_job(due, now - timedelta(seconds=5))
    queue.schedule_job(later, now + timedelta(hours=1))
    retries = ScheduledRetries(connection, queue)
    assert connection.zcard(retries.key) == 2  # where RQ keeps them (behaviour relied on)
    assert DueRetries(connection, queue).move_due(now) == 1
    assert queue.job_ids == [due.id]
    assert connection.zrange(retries.key, 0, -1) == [later.id.encode()]
    assert DueRetries(connection, queue).move_due(now) == 0


# -- 8. the leader does not load the worker stack ------------------------------------------

def test_the_leader_imports_no_worker_code():
    probe = ("import sys, dailyq.scheduler, dailyq.ops.metrics\n"
             "print(sorted(m for m in ('dailyq.worker', 'dailyq.worker.guard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_worker_exits_at_once_when_its_pubsub_thread_saw_the_unsubscribe_before_the_stop(connection, settings):
    """RQ's exit unsubscribes the worker's command channel, then stops the pubsub thread,
    and redis-py 8's stop() waits for that thread. A thread that handled the unsubscribe
    first waits for a new subscription for its whole wait: 60 s with RQ's own subscribe
    (a burst worker seen exiting a minute late in CI). Here that order is forced."""
    from dailyq.rq_seam import PUBSUB_WAIT_S
    from dailyq.table import Task, TaskTable
    from dailyq.worker.workers import DailySimpleWorker

    table = TaskTable([Task(name="t", func="tests.tables.sample_tasks.noop", params=[1], at="03:00")])
    worker = DailySimpleWorker(connection=connection, settings=settings, table=table)
    worker.subscribe()
    assert worker.pubsub is not None
    worker.pubsub.unsubscribe()  # what RQ's unsubscribe() sends first ...
    deadline = time.monotonic() + 5
    while worker.pubsub.subscribed and time.monotonic() < deadline:  # ... handled by the thread
        time.sleep(0.01)
    assert not worker.pubsub.subscribed
    time.sleep(0.2)  # the thread loops into its wait for a subscription
    started = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - started < PUBSUB_WAIT_S + 2


def test_finish_rides_by_sha_unless_a_permit_is_released_in_the_same_transaction(connection, keys):
    """After a NOSCRIPT, a FINISH queued by SHA is sent again on its own, a few round trips
    after RQ's success transaction committed: a permit released in that transaction would
    let the task's next run in while this run still holds its series claim (overlap='skip'
    would skip it). So with a permit riding along, FINISH goes with its body."""
    from types import SimpleNamespace

    from dailyq.rq_seam import RunExecution
    from dailyq.runs import Run
    from dailyq.schedule import Slot
    from dailyq.scripts.shared import ScriptCall
    from dailyq.table import Task
    from dailyq.worker.guard import Guard, PendingFinish

    guard = Guard(connection, keys, "n1", claim_ttl_s=30, retention_s=3600)
    guard.scripts.register_execution_scripts()  # BEGIN and FINISH loaded: they may go by SHA
    task = Task(name="t", func="tests.tables.sample_tasks.noop", params=[1], at="03:00", max_running=1)
    run = Run(task, 1, Slot.from_iso("2026-01-05T03:00:00+00:00", "UTC")).job("job-1")
    attempt = guard.attempt(run)
    finish = guard._finish_call(attempt, 0.01)
    assert finish.loaded_sha is not None
    release = SimpleNamespace(released=False, release_call=lambda: ScriptCall(guard.scripts.script("return 1"), [], [],
                                                                               int))
    sent = {}
    for label, permit in (("alone", None), ("with a permit", release)):
        execution = RunExecution(guard, attempt, pending_finish=PendingFinish(finish, run.run_id, done=lambda: None),
                                 permit=permit)  # type: ignore[arg-type]
        with connection.pipeline() as pipe:
            execution.finish_in(pipe)
            sent[label] = [args[0] for args, _options in pipe.command_stack]
            pipe.reset()
    assert sent == {"alone": ["EVALSHA"], "with a permit": ["EVAL", "EVAL"]}

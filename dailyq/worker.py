"""What every node runs: an RQ worker that executes only table tasks, under the guard.

``DailyWorker`` is a plain ``rq.Worker`` with three changes, made in its constructor
so that ``rq worker -w dailyq.worker.DailyWorker`` gets them too:

* jobs are JSON (``DailyJob``), never unpickled;
* a job whose function is not in the task table fails with a clear reason, unrun
  (the check happens before the function's module is even imported);
* a job that carries a run identity executes under the dedup guard (guard.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from redis import Redis
from rq import Queue, SimpleWorker, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from .errors import DailyqError
from .guard import Guard, RunIdentity
from .keys import Keys
from .outage import TRANSIENT, OutageLog, wait_for_redis
from .settings import Settings, connect
from .table import TaskTable, load_table

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 60


class RefusedJob(DailyqError):
    """A job names a function that is not in the task table."""


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    table: TaskTable


class DailyJob(Job):
    """An RQ job that is always JSON-serialized and, on a worker, checked before it runs."""

    context: ClassVar[WorkerContext | None] = None  # set on the subclass a worker binds

    def __init__(self, id: str | None = None, connection: Redis | None = None, serializer: Any = None) -> None:
        # Ignore any serializer handed in: pickle would let anyone who can write to
        # Redis run code on every node.
        super().__init__(id=id, connection=connection, serializer=JSONSerializer)

    def _execute(self) -> Any:
        context = type(self).context
        if context is None:
            return super()._execute()
        name = self.func_name
        if self.instance is not None or name not in context.table.allowed_functions:
            raise RefusedJob(
                f"refused to run {name!r}: not a function of the task table {context.settings.tasks_module}.TASKS "
                "(dailyq workers run only table tasks)")
        run = RunIdentity.from_job(self)
        if run is None:  # an ad-hoc enqueue of a table function: run it as plain RQ would
            return super()._execute()
        guard = Guard(self.connection, context.settings.keys, context.settings.node_name,
                      context.settings.claim_ttl_s, context.settings.retention_s)
        return guard.execute(run, super()._execute, will_retry=lambda: bool(self.retries_left))


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

    def __init__(self, queues: Sequence[str | Queue] | str | None = None, *args: Any,
                 settings: Settings | None = None, table: TaskTable | None = None, **kwargs: Any) -> None:
        settings = settings or Settings.from_env()
        table = table or load_table(settings.tasks_module)
        job_class = bind_job_class(WorkerContext(settings, table))
        kwargs["job_class"] = job_class
        kwargs["serializer"] = JSONSerializer
        # RQ restarts its retry scheduler (killed by a Redis outage) only during
        # maintenance, every 600 s by default: too long for retries with backoff.
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL_S)
        connection = kwargs.get("connection") or _connection_of(queues) or connect(settings)
        kwargs["connection"] = connection
        # Rebuild queues ourselves: the rq CLI builds them with its own (pickling) job class.
        names = _queue_names(queues, settings.keys.queue_name)
        rebuilt = [make_queue(connection, settings.keys, job_class) if n == settings.keys.queue_name
                   else Queue(n, connection=connection, job_class=job_class, serializer=JSONSerializer)
                   for n in names]
        self.dailyq_settings = settings
        super().__init__(rebuilt, *args, **kwargs)  # type: ignore[call-arg]

    def execute_job(self, job: Job, queue: Queue) -> None:
        """RQ's, except that losing Redis while a run executes does not stop the worker:
        it waits for Redis, lets the work-horse finish (the horse records the run
        itself, see guard.py), then goes back to pulling jobs."""
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        except TRANSIENT as error:
            outage = OutageLog(log, f"worker {self.name}")  # type: ignore[attr-defined]
            outage.failed(error)
            wait_for_redis(self.connection.ping, outage)  # type: ignore[attr-defined]
            horse = getattr(self, "_horse_pid", 0)
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


class DailySimpleWorker(_DailyWorkerMixin, SimpleWorker):
    """Non-forking worker: runs jobs in the worker process itself. Less overhead per
    run (no fork), but a task that crashes or leaks takes the worker with it."""


def worker_name(node: str, generation: int = 0) -> str:
    """RQ needs unique worker names; ours start with the node so dashboards group them.
    ``generation`` counts restarts inside one process (after a Redis outage)."""
    return f"{node}.{os.getpid()}" + (f".{generation}" if generation else "")

"""The ``trigger`` and ``rerun`` commands: which runs of a day to enqueue, and why; and
``pause``/``resume``, which choose the tasks pause.py acts on.

They choose runs and report on them; enqueueing itself, once per run under WATCH
(and the leader's fencing), is fanout.py's ``fan_out``, which every path shares.
api.py wraps these for scripts (a URL or a client in, plain data out) and cli.py
prints what api.py returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any, Iterable, Sequence

from redis import Redis
from rq import Queue

from .errors import ConfigError
from .fanout import Again, FanOutResult, fan_out
from .keys import Keys
from .pause import PauseResult, ResumeResult
from .pause import pause as _pause
from .pause import paused_names
from .pause import resume as _resume
from .runs import FINISHED, QUEUED, RUNNING, Run, decode_record, runs_on
from .table import Task, TaskTable, encode_param


def pause(connection: Redis, keys: Keys, table: TaskTable, task_names: Sequence[str] | None,
          node: str) -> list[PauseResult]:
    """Pause the named tasks (None: every task of the table); an unknown name is a
    ConfigError before anything is paused."""
    names = [table.get(name).name for name in task_names] if task_names is not None else \
        [task.name for task in table.tasks]
    return _pause(connection, keys, names, node)


def resume(connection: Redis, keys: Keys, queue: Queue, table: TaskTable,
           task_names: Sequence[str] | None) -> list[ResumeResult]:
    """Resume the named tasks (None: every task of the table, and any paused task the
    table no longer has, so that its held runs are not stranded)."""
    if task_names is not None:
        names = [table.get(name).name for name in task_names]
    else:
        names = [task.name for task in table.tasks]
        names += sorted(paused_names(connection, keys) - set(names))
    return _resume(connection, keys, queue.key, names)


def trigger(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, day: date,
            task_names: Iterable[str] | None, retention_s: int) -> FanOutResult:
    """Fan out every run of ``day`` now (ad-hoc or backfill). Idempotent."""
    return fan_out(connection, keys, queue, runs_on(table, day, task_names), retention_s=retention_s)


@dataclass
class RerunReport:
    enqueued: list[Run] = field(default_factory=list)
    finished: list[Run] = field(default_factory=list)  # skipped: finished and no --force
    in_progress: list[Run] = field(default_factory=list)  # skipped: queued or running now


def select_params(task: Task, wanted: Sequence[str]) -> list[Any]:
    """Table params matching the command-line strings: by value, or by JSON text for non-strings."""
    if not wanted:
        return list(task.params)
    chosen = []
    for text in wanted:
        matches = [p for p in task.params if p == text or encode_param(p) == text]
        if not matches:
            shown = ", ".join(encode_param(p) for p in task.params)
            raise ConfigError(f"task {task.name!r} has no param {text!r} (its params: {shown})")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def rerun(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, task_name: str, params: Sequence[str],
          day: date, force: bool, retention_s: int) -> RerunReport:
    """Run again. Without ``force``, finished runs and runs queued or running now are
    skipped and reported; with it, each selected run is enqueued again (the guard still
    keeps two copies of one run from executing at once)."""
    task = table.get(task_name)
    chosen = select_params(task, params)
    slots = task.schedule.slots_on(day)
    if not slots:
        raise ConfigError(f"task {task.name!r} has no slot on {day.isoformat()}")
    runs = [Run(task, param, slot) for slot in slots for param in chosen]
    raw_records = connection.hmget(keys.day_runs(day), [run.run_id for run in runs])
    seen_before = connection.smismember(keys.day_enqueued(day), [run.job_id() for run in runs])
    report = RerunReport()
    numbers: dict[str, Again] = {}
    for run, raw, seen in zip(runs, raw_records, seen_before):
        record = decode_record(raw) if raw else {}
        state = record.get("state")
        if not force and state == FINISHED:
            report.finished.append(run)
        elif not force and state in (QUEUED, RUNNING):
            report.in_progress.append(run)
        else:
            # A run never enqueued keeps its own job id, so the leader's fan-out stays a no-op.
            # One enqueued before is run again as a new run, with a run id of its own.
            if seen:
                number = int(connection.hincrby(keys.day_reruns(day), run.run_id, 1))
                numbers[run.run_id] = Again(number, rerun_id=run.job_id(number), new_run=True,
                                            attempts_before=int(record.get("attempts") or 0))
            report.enqueued.append(run)
    if report.enqueued:
        connection.expire(keys.day_reruns(day), retention_s)
        fan_out(connection, keys, queue, report.enqueued, retention_s=retention_s, again=numbers, force=force)
    return report

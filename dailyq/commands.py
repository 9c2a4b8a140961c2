"""The ``trigger`` and ``rerun`` commands: which runs of a day to enqueue, and why; and
``pause``/``resume``, which choose the tasks pausing.py acts on.

They choose runs and report on them; enqueueing itself, once per run under WATCH
(and the leader's fencing), is fanout.py's ``fan_out``, which every path shares.
api.py wraps these for scripts (a URL or a client in, plain data out) and cli.py
prints what api.py returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Iterable, Sequence

from redis import Redis
from rq import Queue

from .clock import server_now
from .dependencies import downstream_of, release_ready
from .errors import ConfigError
from .fanout import FanOutOptions, FanOutResult, Requeued, fan_out
from .keys import Keys
from .params_book import ParamsFailed, SlotParams, settle
from .pausing import PauseResult, ResumeResult, paused_names
from .pausing import pause as _pause
from .pausing import resume as _resume
from .rq_seam import RQKeys
from .runs import FINISHED, QUEUED, RUNNING, WAITING, DaySlots, Run, decode_record, runs_of_slot
from .table import Task, TaskTable, encode_param


@dataclass
class TriggerResult(FanOutResult):
    runs: list[Run] = field(default_factory=list)  # every run of the day chosen (enqueued now or before)
    params_failed: list[SlotParams] = field(default_factory=list)  # computed slots with no list: no runs


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
    table no longer has, so that its parked runs are not stranded)."""
    if task_names is not None:
        names = [table.get(name).name for name in task_names]
    else:
        names = [task.name for task in table.tasks]
        names += sorted(paused_names(connection, keys) - set(names))
    return _resume(connection, keys, RQKeys(queue).queue, names)


def trigger(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, day: date,
            task_names: Iterable[str] | None, retention_s: int, now: datetime | None = None,
            wait_replicas: int = 0) -> TriggerResult:
    """Fan out every run of ``day`` now (ad-hoc or backfill). Idempotent. ``wait_replicas``:
    DAILYQ_WAIT_REPLICAS (fanout.py; ReplicasBehind when fewer acknowledged the runs).

    A computed task's runs are those of its stored list for each slot; with nothing (or
    only a failure) stored, its callable is called for that day now and the outcome
    stored, as the leader would at the slot (params_book.py). ``now``: the time the
    outcome is stored with and a failure's retry counted from (default: Redis's)."""
    now = now or server_now(connection)
    tasks = [table.get(name) for name in task_names] if task_names else table.tasks
    runs: list[Run] = []
    failed: list[SlotParams] = []
    # A once-a-day task's runs of the day use the slot it was first fanned out under (runs.DaySlots).
    day_slots = DaySlots.read(connection, keys, day)
    for task in tasks:
        for slot in day_slots.permits_on(task):
            if not task.params_computed:
                runs += runs_of_slot(task, slot)
                continue
            entry = settle(connection, keys, task, slot, now, retention_s, when="failed")
            runs += [Run(task, param, slot) for param in entry.params or ()]
            if not entry.ok:
                failed.append(entry)
    runs.sort(key=lambda run: run.slot.fires_at)
    result = fan_out(connection, keys, queue, runs, FanOutOptions(retention_s, wait_replicas=wait_replicas))
    if result.waiting:  # their upstream runs may have finished already (a past day)
        release_ready(connection, keys, queue, table, day, retention_s=retention_s)
    return TriggerResult(enqueued=result.enqueued, already=result.already, waiting=result.waiting, runs=runs,
                         params_failed=failed)


@dataclass
class RerunReport:
    enqueued: list[Run] = field(default_factory=list)
    finished: list[Run] = field(default_factory=list)  # skipped: finished and no --force
    in_progress: list[Run] = field(default_factory=list)  # skipped: queued or running now


def select_params(task: Task, wanted: Sequence[str], available: Sequence[Any] | None = None) -> list[Any]:
    """Params matching the command-line strings, by value, or by JSON text for
    non-strings: among ``available`` (a computed task's stored list), else the table's."""
    params = list(task.params if available is None else available)  # type: ignore[arg-type]
    if not wanted:
        return params
    chosen: list[Any] = []
    for text in wanted:
        matches = [p for p in params if p == text or encode_param(p) == text]
        if not matches:
            shown = ", ".join(encode_param(p) for p in params)
            raise ConfigError(f"task {task.name!r} has no param {text!r} (its params: {shown})")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def rerun_candidates(connection: Redis, keys: Keys, task: Task, wanted: Sequence[str], day: date, retention_s: int,
                     refresh_params: bool = False, now: datetime | None = None) -> list[Run]:
    """The runs a rerun of ``task`` on ``day`` is about. A computed task's come from the
    list stored for each slot (its callable is not called again); ``refresh_params``
    calls it again and stores the new list first. Nothing or a failure stored: called
    now (the same once-only rule as ``trigger``); still failing raises ParamsFailed."""
    # A once-a-day task's runs of the day use the slot it was first fanned out under (runs.DaySlots).
    slots = DaySlots.read(connection, keys, day).permits_on(task)
    if not slots:
        raise ConfigError(f"task {task.name!r} has no slot on {day.isoformat()}")
    if not task.params_computed:
        chosen = select_params(task, wanted)
        return [Run(task, param, slot) for slot in slots for param in chosen]
    now = now or server_now(connection)
    lists = []
    for slot in slots:
        entry = settle(connection, keys, task, slot, now, retention_s, when="always" if refresh_params else "failed")
        if not entry.ok:
            raise ParamsFailed(f"{entry.error} (task {task.name!r}, slot {slot.isoformat()}, attempt "
                               f"{entry.attempts}); the slot has no runs to rerun")
        lists.append((slot, entry.params or []))
    union = list({encode_param(p): p for _, params in lists for p in params}.values())
    chosen_json = {encode_param(p) for p in select_params(task, wanted, union)}
    return [Run(task, param, slot) for slot, params in lists for param in params if encode_param(param) in chosen_json]


def rerun(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, task_name: str, params: Sequence[str],
          day: date, force: bool, retention_s: int, refresh_params: bool = False,
          now: datetime | None = None, wait_replicas: int = 0) -> RerunReport:
    """Run again. Without ``force``, finished runs and runs queued or running now are
    skipped and reported; with it, each selected run is enqueued again (the guard still
    keeps two copies of one run from executing at once). ``refresh_params``: a computed
    task's list is made anew first (rerun_candidates)."""
    task = table.get(task_name)
    runs = rerun_candidates(connection, keys, task, params, day, retention_s, refresh_params, now)
    if not runs:
        return RerunReport()
    raw_records = connection.hmget(keys.day_runs(day), [run.run_id for run in runs])
    seen_before = connection.smismember(keys.day_enqueued(day), [run.job_id() for run in runs])
    report = RerunReport()
    numbers: dict[str, Requeued] = {}
    unfinished: list[str] = []
    for run, raw, seen in zip(runs, raw_records, seen_before):
        record = decode_record(raw) if raw else {}
        state = record.get("state")
        if not force and state == FINISHED:
            report.finished.append(run)
        elif not force and state in (QUEUED, RUNNING, WAITING):
            report.in_progress.append(run)
        else:
            # A run never enqueued keeps its own job id, so the leader's fan-out stays a no-op.
            # One enqueued before is run again as a new run, with a run id of its own.
            if seen:
                number = int(connection.hincrby(keys.day_reruns(day), run.run_id, 1))
                numbers[run.run_id] = Requeued(number, rerun_id=run.job_id(number), new_run=True,
                                            attempts_before=int(record.get("attempts") or 0))
            report.enqueued.append(run)
            if state != FINISHED:
                unfinished.append(run.run_id)
    if unfinished and not force:
        # A run rerun because it is not finished may still be in the day's finished set: a
        # removed run (deploys.py), or one that failed after a forced rerun of a finished
        # run. Out of it, or BEGIN would skip the unforced rerun as finished and the
        # record would stay queued.
        connection.srem(keys.day_finished(day), *unfinished)
    if report.enqueued:
        connection.expire(keys.day_reruns(day), retention_s)
        result = fan_out(connection, keys, queue, report.enqueued,
                         FanOutOptions(retention_s, again=numbers, force=force, wait_replicas=wait_replicas))
        # Parked runs may be ready at once; runs blocked by this task's failed runs are 'waiting' again.
        if result.waiting or task.name in downstream_of(table):
            release_ready(connection, keys, queue, table, day, retention_s=retention_s)
    return report

"""``cancel``: stop a run that executes, and keep runs that have not started from starting.

``scheduler.py cancel --date D [--task T] [--param P | --run RUN_ID]`` picks runs of day D
from their records and hands each to CANCEL (Lua, scripts/lifecycle.py), which ends a run queued,
running, waiting or blocked as ``cancelled``, its error naming who asked ("cancelled by
alice on node-1"), in one step:

* **executing**: its claim is renamed (``scripts.lifecycle.CANCEL_MARK``), keeping its TTL. The
  copy's claim renewer (guard.ClaimKeeper, every second already) gets 'cancelled' instead
  of 'ok' and the copy stops its task as it stops a copy that lost its claim: a forked
  work-horse ends itself (``guard.CANCELLED_EXIT_CODE``), a non-forking worker interrupts
  the task (``RunStopped``). Then the copy -- the worker parent for a work-horse, once the
  horse is gone -- releases the renamed claim (RELEASE_CANCELLED), so that a rerun starts
  at once; until then a rerun's copy waits, so the two never execute together. Nothing
  the stopped copy sends records anything (FINISH and FAIL need the claim as it was), so
  the record stays cancelled and no retry runs it. A run never cancelled pays nothing:
  the renewal looks at the renamed claim only when the claim is not its own any more.
  A copy on a node cut off from Redis learns nothing; it stops when it cannot confirm its
  claim (as always), and the claim lapses. A task holding the GIL stops neither thread:
  the forking worker's parent kills its horse at the claim's deadline (claim_watch.py).
* **queued** (in the queue, due for an RQ retry, held by a limit or a pause, left for
  another node): BEGIN refuses a job of a cancelled run, so whichever worker takes it
  next skips it.
* **waiting/blocked** (after): out of the day's waiting hash, so no release pushes it.

It leaves the running hash too, so the leader's recovery never requeues it. A cancelled
run is final like a failed one: its downstream runs are blocked (dependencies.py) until
a ``rerun``, which runs it again as a new run.
"""

from __future__ import annotations

import getpass
import logging
import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Mapping, Sequence

from redis import Redis
from rq import Queue

from .dependencies import downstream_of, release_after
from .errors import ConfigError
from .keys import Keys
from .redis_values import as_text
from .runs import RunRecord, decode_record
from .scripts import scripts_for
from .table import TaskTable, encode_param

log = logging.getLogger(__name__)

# A rerun's job id is its run id and "-rN" (runs.Run.job_id): either names the run.
_RERUN_SUFFIX = re.compile(r"-r\d+$")


@dataclass(frozen=True)
class CancelledRun:
    run_id: str
    task: str
    param: Any
    slot: str
    state: str  # before the cancel; for a run not cancelled, the state it had ended in
    node: str | None  # the node of its last execution
    executing: bool = False  # a copy executed it: it stops and releases its claim


@dataclass
class CancelReport:
    day: date
    by: str  # "alice on node-1"
    cancelled: list[CancelledRun] = field(default_factory=list)
    ended: list[CancelledRun] = field(default_factory=list)  # nothing to cancel: finished, failed, ...


def asking_user() -> str:
    """The login name of whoever runs the command, for the record and the log."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        return "an unknown user"


def cancel(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, day: date, *,
           task_name: str | None = None, params: Sequence[str] = (), run_ids: Sequence[str] = (), node: str,
           user: str, retention_s: int, now_iso: str) -> CancelReport:
    """Cancel the chosen runs of ``day``: ``run_ids`` (a run id or a rerun's job id), or the
    runs of ``task_name`` (only ``params``, matched by value or JSON text, when given), or
    every run of the day. An unknown task, param or run id is a ConfigError before
    anything is cancelled. The parked runs downstream of a cancelled run are marked
    ``blocked`` at once (``queue``: where a release would push runs found ready)."""
    chosen = _choose(connection, keys, table, day, task_name, params, run_ids)
    report = CancelReport(day, f"{user} on {node}")
    why = f"cancelled by {report.by}"
    scripts = scripts_for(connection)
    for run_id, record in chosen:
        reply = scripts.cancel(runs_key=keys.day_runs(day), claim_key=keys.claim(run_id),
                               running_key=keys.running, waiting_key=keys.day_waiting(day), run_id=run_id,
                               why=why, now_iso=now_iso, retention_s=retention_s).run()
        entry = CancelledRun(run_id, str(record.get("task")), record.get("param"), str(record.get("slot")),
                             reply.state or "none", record.get("node"), reply.executing)
        if reply.outcome == "cancelled":
            report.cancelled.append(entry)
            log.warning("run %s %s (it was %s%s)", run_id, why, reply.state,
                        f" on node {entry.node}: its copy stops" if reply.executing else "",
                        extra={"run_id": run_id})
        elif reply.outcome == "ended":
            report.ended.append(entry)
    _block_downstream_of(connection, keys, queue, table, day, retention_s, report.cancelled)
    return report


def _block_downstream_of(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, day: date,
                         retention_s: int, cancelled: Sequence[CancelledRun]) -> None:
    """As a worker does after its FAIL: a cancelled run blocks the parked runs of its
    downstream tasks now. Nothing else would mark them while no upstream run ends: the
    leader's tick looks at counts only, once it gave the day its full look (a cancelled
    run that never started is skipped by its worker without recording an end)."""
    downstream = downstream_of(table)
    # One look per upstream task: its first cancelled run blocks the parked runs below it,
    # and a later look would find them blocked already.
    first_of_task = {run.task: run.run_id for run in reversed(cancelled)}
    for task, run_id in first_of_task.items():
        if downstream.get(task):
            release_after(connection, keys, queue, table, day, retention_s=retention_s,
                          tasks=downstream[task], ended=run_id)


def _choose(connection: Redis, keys: Keys, table: TaskTable, day: date, task_name: str | None,
            params: Sequence[str], run_ids: Sequence[str]) -> list[tuple[str, RunRecord]]:
    if params and not task_name:
        raise ConfigError("--param needs --task: name the task whose params to cancel")
    if run_ids:
        if task_name or params:
            raise ConfigError("give either --run or --task/--param, not both")
        return _by_run_id(connection, keys, day, run_ids)
    records = {as_text(run_id): decode_record(raw) for run_id, raw in connection.hgetall(keys.day_runs(day)).items()}
    if task_name is not None:
        task = table.get(task_name)  # an unknown task: a clear error
        records = {run_id: r for run_id, r in records.items() if r.get("task") == task.name}
        if params:
            records = _with_params(records, task.name, params)
    return sorted(records.items(), key=lambda item: (str(item[1].get("slot")), item[0]))


def _by_run_id(connection: Redis, keys: Keys, day: date, run_ids: Sequence[str]) -> list[tuple[str, RunRecord]]:
    wanted = list(dict.fromkeys(run_ids))
    found: list[tuple[str, RunRecord]] = []
    for given in wanted:
        for run_id in dict.fromkeys((given, _RERUN_SUFFIX.sub("", given))):
            raw = connection.hget(keys.day_runs(day), run_id)
            if raw is not None:
                found.append((run_id, decode_record(raw)))
                break
        else:
            raise ConfigError(f"no run {given!r} on {day.isoformat()}: take its run id from "
                              f"scheduler.py status --date {day.isoformat()} --json")
    return found


def _with_params(records: Mapping[str, RunRecord], task: str, params: Sequence[str]) -> dict[str, RunRecord]:
    chosen: dict[str, RunRecord] = {}
    for text in params:
        matches = {run_id: r for run_id, r in records.items()
                   if r.get("param") == text or r.get("param_json") == text or encode_param(r.get("param")) == text}
        if not matches:
            shown = ", ".join(sorted({str(r.get("param_json")) for r in records.values()})) or "none"
            raise ConfigError(f"task {task!r} has no run with param {text!r} on this day (its params: {shown})")
        chosen.update(matches)
    return chosen

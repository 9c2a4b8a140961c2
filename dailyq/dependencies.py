"""Dependencies between tasks: ``Task(after=["ingest", ...])``.

A run of a task with ``after`` for day D executes only once every run of each named
(upstream) task for D has finished -- D and "every run" as ``status`` has them
(``runs.runs_on``: each task's slots on D in its own zone, times its params -- for
computed params, the list stored for the slot, params_book.py).

Parked runs
---------
fan_out (fanout.py) writes such a run's record as ``waiting`` and parks the run in the
day's waiting hash (``keys.day_waiting``: run id -> ``fanout.Parked``, what enqueueing it
later takes), in the same MULTI/EXEC that adds its job id to the enqueued set; the day
enters ``keys.waiting_days``. The run is in no RQ queue, so it holds no worker: a
worker never sits on a run that cannot start while other runs are queued.

Release
-------
``release_after`` is the look made after each upstream run ended and at each leader
tick: it reads the day's dependency counts (dependency_counts.py: per task, how many of
its run ids are in the finished set, kept by FINISH in the same step; at least how many
of its runs are held), a few commands whatever the day's size. A task with parked runs
whose upstream tasks have as many finished run ids as the table gives them runs *may* be
ready: only then does it get ``release_ready``'s full look, which checks the run ids.
``release_ready`` (that full look; also ``trigger``, ``rerun`` and a leader's first look
at a day) looks at a day's parked runs, task by task. A task's upstream runs are
ready when every one of their run ids is in the day's finished set (FINISH adds it
atomically with recording the run, and nothing removes it, so "ready" never turns
false again). Ready runs are released in one WATCH/MULTI on the waiting hash: HDEL
them, records ``queued`` (SET_RUN_STATE), and their jobs pushed through
``fanout.job_data``, the path fan_out itself uses (RQ writes its own job hashes).
Two callers racing over one day: the second one's EXEC fails on the WATCH, it looks
again and finds the runs gone, so each parked run is enqueued exactly once. Parked runs
that are not ready are ``blocked``, with the upstream run named in ``error``, while an
unfinished upstream run is ``failed`` or ``skipped`` (or ``blocked`` itself, further up a
chain); ``waiting`` again once none is -- a ``rerun`` of the upstream run queued it, and
its finishing releases them. The upstream records are read in chunks and the blocking
run found is checked again by HOLD_WAITING (Lua), which sets the held records in the
same step (``_mark_parked`` says why not all in Lua). Blocked/waiting is for people to
see; the release never depends on it, only on the finished set. The full look marks
upstream tasks first, so one look unblocks a whole chain; ``release_after`` marks only
from an ended run (``ended``): a failed or skipped one blocks the parked runs downstream
of it, once (the counts keep the blocking run), and the chain below them.

Who calls it, and why that keeps "released within 2 s of the last upstream run
finishing", whatever dies:

a. the worker that recorded a run of an upstream task finished or failed, right after
   FINISH/FAIL (worker.WorkerContext, through the guard's ``on_ended`` hook): one
   round trip more, only for tasks that have downstream tasks. Of two upstream runs
   finishing at once, the one whose FINISH came last sees both in the finished set.
b. the leader, every tick, for each day in ``keys.waiting_days`` (``WaitingRuns``): the
   backstop for a worker that died between its FINISH and its release (its FINISH
   counted the run, so the counts show the task may be ready), and for a leader change
   (a new leader's first tick gives each day one full look). Runs the leader records
   failed itself (settle.py, recovery.py) block their downstream runs through
   ``WaitingRuns.ended``.
c. whoever fanned out parked runs, right after (``FanOutResult.waiting``): the upstream
   runs may be finished already (a trigger, rerun or backfill of a past day). The
   leader does so in the tick that fanned out; ``commands.trigger``/``rerun`` at once.

Transitive chains need nothing more: a downstream task's upstream runs that are held
themselves are not in the finished set.

Edge cases
----------
* Recovery (recovery.py) requeues an abandoned run of a downstream task directly
  (``hold_dependent=False``): it was executing, so it had been released; holding it
  again would only add a round trip.
* An upstream run ``skipped`` (overlap='skip') or ``cancelled`` (cancelling.py) blocks like a
  failed one: it will not run, and its output is missing. A rerun of it releases as for a
  failed one.
* An upstream task with no slot on D has no runs on D: its downstream runs are not
  held back by it.
* An upstream run never fanned out (``scheduled``, or ``missed`` past its misfire grace)
  keeps its downstream runs ``waiting``; ``trigger`` runs it, and its finishing
  releases them.
* A parked run whose task is not in the caller's table, or whose slot is not one of its
  task's on D, stays in the waiting hash (logged once per process): during a rolling
  deploy another node's table has it, and that node releases it (a worker after an
  upstream FINISH, or a leader with the new table). It is never dropped here.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Iterable

from redis import Redis, RedisError, WatchError
from rq import Queue

from .dependency_counts import DayCounts, may_be_ready, upstream_runs
from .fanout import Parked, job_data, longest_first
from .keys import Keys
from .params_book import ParamsBook, params_run_id
from .redis_values import as_text
from .rq_seam import enqueue_fresh
from .runs import BLOCKED, CANCELLED, FAILED, QUEUED, SKIPPED, DaySlots, Run, runs_on, task_slots_on
from .schedule import Slot
from .scripts import Scripts, scripts_for
from .table import Task, TaskTable

log = logging.getLogger(__name__)

# Upstream states that hold their downstream runs back for good, until a rerun
# (HOLD_WAITING checks the same four).
BLOCKING_STATES = (FAILED, SKIPPED, BLOCKED, CANCELLED)
READ_CHUNK = 10_000
LOOKED_MAX = 10_000


@dataclass
class ReleaseResult:
    released: list[str] = field(default_factory=list)  # run ids enqueued now
    blocked: dict[str, str] = field(default_factory=dict)  # parked run id -> the upstream run blocking it
    still_waiting: list[str] = field(default_factory=list)  # parked run ids whose upstream runs are not done
    # Parked runs this table cannot rebuild (a rolling deploy): left held; whether no live
    # table has them, and they end ``removed``, is the leader's to decide (deploys.py).
    unknown: dict[str, Parked] = field(default_factory=dict)


def downstream_of(table: TaskTable) -> dict[str, list[str]]:
    """Task name -> the tasks that name it in ``after`` (only tasks that have some)."""
    found: dict[str, list[str]] = defaultdict(list)
    for task in table.tasks:
        for upstream in task.after:
            found[upstream].append(task.name)
    return dict(found)


def release_ready(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, day: date, *,
                  retention_s: int, tasks: Iterable[str] | None = None) -> ReleaseResult:
    """Release the parked runs of ``day`` whose upstream runs have all finished, and mark
    the others ``blocked`` or ``waiting`` (see the module docstring). ``tasks``: only
    the parked runs of these tasks (a worker that just finished a run of their upstream).
    Safe to call from any process at any time, concurrently: each parked run is enqueued once."""
    only = set(tasks) if tasks is not None else None
    waiting_key = keys.day_waiting(day)
    finished_key = keys.day_finished(day)
    scripts = scripts_for(connection)
    result = ReleaseResult()
    pending: list[tuple[str, list[str], list[str]]] = []  # (task, its parked run ids, its unfinished upstream)
    with connection.pipeline(transaction=True) as pipe:
        while True:
            result, pending = ReleaseResult(), []
            try:
                pipe.watch(waiting_key)
                entries = {as_text(run_id): Parked.from_json(raw) for run_id, raw in pipe.hgetall(waiting_key).items()}
                by_task: dict[str, list[str]] = defaultdict(list)
                for run_id, held in entries.items():
                    if only is None or held.task in only:
                        by_task[held.task].append(run_id)
                ready: list[str] = []
                book = ParamsBook.read(pipe, keys, day) if by_task else None
                slots = DaySlots.read(pipe, keys, day) if by_task else None
                # Upstream tasks first: a parked run marked waiting again unblocks, in this same
                # look, the parked runs further down that it was blocking.
                depth = _depths(table)
                for task_name, run_ids in sorted(by_task.items(), key=lambda item: (depth.get(item[0], 0), item[0])):
                    unfinished = _unfinished_upstream(pipe, table, book, task_name, day, finished_key, slots)
                    if unfinished:
                        pending.append((task_name, run_ids, unfinished))
                    else:
                        ready.extend(run_ids)
                hints = _held_hints(table, by_task, only)
                if not ready:
                    # Forget the day, unless a fan-out holds a run for it meanwhile (WATCH).
                    pipe.multi()
                    _write_hints(pipe, keys, day, retention_s, hints)
                    if not entries:
                        pipe.srem(keys.waiting_days, day.isoformat())
                    pipe.execute()
                    break
                runs, unknown = _rebuild(table, day, {run_id: entries[run_id] for run_id in ready}, slots)
                if not runs:
                    pipe.multi()
                    _write_hints(pipe, keys, day, retention_s, hints)
                    pipe.execute()
                    _report_unknown(keys, day, unknown)
                    result.unknown = {run_id: entries[run_id] for run_id in unknown}
                    break
                pipe.multi()
                # Only what is enqueued now leaves the waiting hash: a parked run this table
                # cannot rebuild stays for a node whose table has its task (see _rebuild).
                pipe.hdel(waiting_key, *[run.run_id for run in runs])
                for run in runs:
                    hints[run.task.name] -= 1
                _write_hints(pipe, keys, day, retention_s, hints)
                if len(runs) == len(entries):
                    pipe.srem(keys.waiting_days, day.isoformat())
                scripts.set_run_state(runs_key=keys.day_runs(day), retention_s=retention_s, state=QUEUED,
                                      run_ids=[run.run_id for run in runs]).queue_in(pipe)
                # Longest expected first, as at fan-out (fanout.longest_first).
                ordered = longest_first(connection, keys, runs)
                enqueue_fresh(queue, [_job_of(queue, run, entries[run.run_id], retention_s) for run in ordered], pipe)
                pipe.execute()
            except WatchError:
                continue  # another caller released (or a fan-out held) runs of this day meanwhile: look again
            result.released = [run.run_id for run in runs]
            result.unknown = {run_id: entries[run_id] for run_id in unknown}
            _report_unknown(keys, day, unknown)
            break
    if result.released:
        log.info("released %d run%s of %s whose upstream runs have finished", len(result.released),
                 "" if len(result.released) == 1 else "s", day.isoformat())
    _mark_parked(connection, scripts, keys, day, retention_s, pending, result,
               _failed_for_good(table, book) if pending and book is not None else {})
    return result


def release_after(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, day: date, *,
                  retention_s: int, tasks: Iterable[str] | None = None, ended: str | None = None) -> ReleaseResult:
    """The look after each upstream run ended (the worker) and at each leader tick: from
    the day's counts (dependency_counts.py), a few reads whatever the day's size. Only a
    task with parked runs whose counts say it may be ready gets ``release_ready``'s full
    look (which checks its upstream run ids and releases). ``tasks``: only these (None:
    every task with parked runs, including tasks this table lacks, whose runs
    ``release_ready`` reports as unknown). ``ended``: the upstream run that just ended;
    if it failed or was skipped, the parked runs downstream of it are marked ``blocked``."""
    only = set(tasks) if tasks is not None else None
    counts = DayCounts.read(connection, keys, day, retention_s)
    if counts.waiting == 0:
        # Nothing held: the full look of an empty hash is a few commands, and forgets the day.
        return release_ready(connection, keys, queue, table, day, retention_s=retention_s, tasks=only)
    names = sorted(name for name, n in counts.held.items() if n > 0 and (only is None or name in only))
    known = [table.by_name[name] for name in names if name in table.by_name]
    if not names:
        return ReleaseResult()
    computed = any(up.params_computed for task in known for up in (table.by_name.get(n) for n in task.after) if up)
    book = ParamsBook.read(connection, keys, day) if computed else None
    slots = DaySlots.read(connection, keys, day)
    candidates: list[str] = []
    not_ready: list[str] = []
    for name in names:
        task = table.by_name.get(name)
        expected = upstream_runs(table, task, day, book, slots) if task is not None else {}
        (candidates if expected is not None and may_be_ready(counts, expected) else not_ready).append(name)
    result = release_ready(connection, keys, queue, table, day, retention_s=retention_s, tasks=candidates) \
        if candidates else ReleaseResult()
    if ended is not None and not_ready:
        _block_downstream(connection, keys, table, day, retention_s, ended, not_ready, counts, result)
    return result


def _block_downstream(connection: Redis, keys: Keys, table: TaskTable, day: date, retention_s: int, ended: str,
                      tasks: list[str], counts: DayCounts, result: ReleaseResult) -> None:
    """``ended`` failed or was skipped: the parked runs of ``tasks`` (its downstream tasks,
    not ready) are ``blocked`` by it, and so, further down, the parked runs waiting for
    those. One read of ``ended``'s record when it finished; the waiting hash is read only
    for a task whose parked runs are not blocked already by a run that still blocks."""
    runs_key = keys.day_runs(day)
    raw = connection.hget(runs_key, ended)
    if not _blocking(raw):
        return
    # Only the tasks that name its task in ``after``: HOLD_WAITING checks the blocker's
    # state, not that it is upstream of the parked runs.
    upstream_task = json.loads(raw).get("task")  # type: ignore[arg-type]
    scripts = scripts_for(connection)
    entries: dict[str, list[str]] | None = None
    todo = [(name, ended) for name in tasks if name in table.by_name and upstream_task in table.by_name[name].after]
    seen: set[str] = set()
    downstream = downstream_of(table)
    while todo:
        name, upstream = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        current = counts.blocked.get(name)
        if current and _blocking(connection.hget(runs_key, current)):
            continue  # blocked already, and still for a reason
        if entries is None:
            entries = defaultdict(list)
            for run_id, raw in connection.hgetall(keys.day_waiting(day)).items():
                entries[Parked.from_json(raw).task].append(as_text(run_id))
        held = entries.get(name, [])
        if not held:
            continue
        blocker, _ = scripts.hold_waiting(runs_key=runs_key, retention_s=retention_s,
                                          unfinished_upstream=[upstream], held=held).run()
        if blocker is None:
            continue
        result.blocked.update((run_id, blocker) for run_id in held)
        _note_blocked(connection, keys, day, retention_s, name, blocker)
        todo.extend((further, held[0]) for further in downstream.get(name, ()))


def _blocking(raw: bytes | str | None) -> bool:
    """The record (as stored) is failed, skipped or blocked: it holds downstream runs back."""
    text = as_text(raw) if raw else ""
    return any(state in text for state in BLOCKING_STATES) and json.loads(text).get("state") in BLOCKING_STATES


def _note_blocked(connection: Redis, keys: Keys, day: date, retention_s: int, task: str, blocker: str) -> None:
    with connection.pipeline(transaction=True) as pipe:
        pipe.hset(keys.day_deps(day), f"blocked:{task}", blocker)
        pipe.expire(keys.day_deps(day), retention_s)
        pipe.execute()


def _unfinished_upstream(pipe: Redis, table: TaskTable, book: ParamsBook | None, task_name: str, day: date,
                         finished_key: str, slots: DaySlots | None = None) -> list[str]:
    """Run ids of the task's upstream runs on ``day`` not in the finished set (none for a
    task not in the table: its parked runs then stay held, see ``_rebuild``). A
    computed upstream slot with no list stored yet (or only a failure) counts as one
    unfinished run, under the id ``status`` shows it by: its runs are not known yet.
    ``slots``: the day's stored once-a-day slots (runs.DaySlots), which the upstream runs use."""
    task = table.by_name.get(task_name)
    upstream = [run.run_id for run in runs_on(table, day, task.after, book=book, slots=slots)] \
        if task and task.after else []
    if task and book is not None:
        upstream += [params_run_id(up, slot) for up in (table.get(name) for name in task.after)
                     if up.params_computed for slot in task_slots_on(up, day, slots)
                     if (entry := book.entry(up, slot)) is None or not entry.ok]
    if not upstream:
        return []
    done = pipe.smismember(finished_key, upstream)
    return [run_id for run_id, is_done in zip(upstream, done) if not is_done]


def _depths(table: TaskTable) -> dict[str, int]:
    """Task -> its place in the ``after`` graph (0: depends on nothing; the table has no cycles)."""
    depth: dict[str, int] = {}

    def of(task: Task) -> int:
        if task.name not in depth:
            depth[task.name] = 1 + max((of(table.by_name[n]) for n in task.after if n in table.by_name), default=-1)
        return depth[task.name]

    for task in table.tasks:
        of(task)
    return depth


def _held_hints(table: TaskTable, by_task: dict[str, list[str]], only: set[str] | None) -> dict[str, int]:
    """The exact ``held:`` hints of what this look read (dependency_counts.py): each task
    looked at, with none held for a task with ``after`` (or one asked about) that has none."""
    hints = {task.name: 0 for task in table.tasks if task.after and (only is None or task.name in only)}
    hints.update((name, 0) for name in only or ())
    hints.update((name, len(run_ids)) for name, run_ids in by_task.items())
    return hints


def _write_hints(pipe: Any, keys: Keys, day: date, retention_s: int, hints: dict[str, int]) -> None:
    """Queued in the look's MULTI, under its WATCH of the waiting hash: exact at EXEC."""
    if hints:
        pipe.hset(keys.day_deps(day), mapping={f"held:{name}": n for name, n in hints.items()})
        pipe.expire(keys.day_deps(day), retention_s)


# Parked runs this process's table could not rebuild, already logged about: (prefix, day, run
# id). Such a run is looked at every leader tick while it waits; one line per run is enough.
_reported_unknown: set[tuple[str, str, str]] = set()
REPORTED_UNKNOWN_MAX = 100_000


def _report_unknown(keys: Keys, day: date, run_ids: list[str]) -> None:
    for run_id in run_ids:
        seen = (keys.prefix, day.isoformat(), run_id)
        if seen in _reported_unknown:
            continue
        if len(_reported_unknown) >= REPORTED_UNKNOWN_MAX:
            _reported_unknown.clear()  # a bound, not a history: at worst a line is logged again
        _reported_unknown.add(seen)
        log.warning("run %s of %s is parked for its upstream runs, but this node's task table has no such run (its "
                    "task, or its slot that day); left waiting for a node whose table has it", run_id,
                    day.isoformat(), extra={"run_id": run_id})


def _rebuild(table: TaskTable, day: date, held: dict[str, Parked],
             slots: DaySlots | None = None) -> tuple[list[Run], list[str]]:
    """The runs to enqueue, rebuilt from the table (task and slot, as the day's stored
    once-a-day slots map it) and the held param; and the run ids that cannot be rebuilt:
    they stay held (a rolling deploy: another node's table may have them; whether a run
    no table has is ``removed`` is decided from the live tables, deploys.py)."""
    runs: list[Run] = []
    dropped: list[str] = []
    for run_id, entry in held.items():
        task = table.by_name.get(entry.task)
        slot = next((s for s in task_slots_on(task, day, slots) if s.isoformat() == entry.slot), None) \
            if task else None
        run = Run(task, json.loads(entry.param_json), slot) if task and slot else None
        if run is None or run.run_id != run_id:
            dropped.append(run_id)
        else:
            runs.append(run)
    return runs, dropped


def _job_of(queue: Queue, run: Run, held: Parked, retention_s: int) -> Any:
    return job_data(queue, run, held.job_id, retention_s, held.force, held.at_front, held.again)


def _failed_for_good(table: TaskTable, book: ParamsBook) -> dict[str, str]:
    """Stand-in id -> error, for the computed slots whose params callable failed and has
    no retry left: they have no run record, yet their downstream runs are blocked."""
    dead: dict[str, str] = {}
    for entry in book.entries.values():
        task = table.by_name.get(entry.task)
        if task is None or entry.ok or entry.next_try_at is not None:
            continue
        try:
            slot = Slot.from_iso(entry.slot, task.tz)
        except ValueError:
            continue
        dead[params_run_id(task, slot)] = (f"upstream {task.name} slot {entry.slot}: its params callable failed "
                                           f"after {entry.attempts} attempts ({entry.error})")
    return dead


def _mark_parked(connection: Redis, scripts: Scripts, keys: Keys, day: date, retention_s: int,
               pending: list[tuple[str, list[str], list[str]]], result: ReleaseResult,
               failed_for_good: dict[str, str]) -> None:
    """``blocked`` or ``waiting`` for the parked runs not released.

    The upstream records are read here, in chunks, and only the blocking run found (if
    any) goes to HOLD_WAITING, which checks it again and sets the held records in one
    step. Reading them all inside the script would hold Redis for the whole day's
    upstream runs on every leader tick. The price: an upstream run that fails between
    this read and the script leaves the parked runs ``waiting`` until the next look (its
    worker's own look right after its FAIL, or the leader's next tick)."""
    runs_key = keys.day_runs(day)
    for task_name, run_ids, unfinished in pending:
        dead = next((run_id for run_id in unfinished if run_id in failed_for_good), None)
        found = None if dead else _first_blocking(connection, runs_key, unfinished)
        blocker, _ = scripts.hold_waiting(runs_key=runs_key, retention_s=retention_s,
                                          unfinished_upstream=[found] if found else [], held=run_ids,
                                          given_blocker=(dead, failed_for_good[dead]) if dead else None).run()
        if blocker is None:
            result.still_waiting.extend(run_ids)
            connection.hdel(keys.day_deps(day), f"blocked:{task_name}")
        else:
            result.blocked.update((run_id, blocker) for run_id in run_ids)
            _note_blocked(connection, keys, day, retention_s, task_name, blocker)


def _first_blocking(connection: Redis, runs_key: str, run_ids: list[str]) -> str | None:
    """The first of ``run_ids`` whose record is failed, skipped or blocked, or None."""
    for start in range(0, len(run_ids), READ_CHUNK):
        chunk = run_ids[start:start + READ_CHUNK]
        for run_id, raw in zip(chunk, connection.hmget(runs_key, chunk)):
            # Most records are queued or running: decode only those that may be blocking.
            if raw and any(state.encode() in raw for state in BLOCKING_STATES):
                if json.loads(raw).get("state") in BLOCKING_STATES:
                    return run_id
    return None



class WaitingRuns:
    """The leader's look, every tick, at each day with parked runs (caller b above)."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, table: TaskTable, retention_s: int) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.table = table
        self.retention_s = retention_s
        self.days_held = 0
        # Days this leader has given a full look (release_ready) since it started: later
        # ticks look at their counts only (release_after).
        self.looked: set[date] = set()
        # (day, run id) -> parked run this table cannot rebuild, at the last look (deploys.py
        # decides whether no live table has them).
        self.unknown: dict[tuple[date, str], Parked] = {}

    def forget(self) -> None:
        """A new term as leader: what others did meanwhile is unknown, so each day with held
        runs gets one full look again (blocked/waiting marked from the records)."""
        self.looked.clear()

    def ended(self, runs: Iterable[tuple[date, str]]) -> None:
        """Runs this leader recorded failed itself (RQ failed their job outside the guard,
        settle.py; their process was lost with no attempt left, recovery.py): the parked runs
        downstream of them are marked ``blocked`` now, as a worker does after its FAIL."""
        for day, run_id in runs:
            try:
                release_after(self.connection, self.keys, self.queue, self.table, day, retention_s=self.retention_s,
                              ended=run_id)
            except RedisError as exc:  # for people to see only; the next full look marks them too
                log.warning("could not mark the runs waiting for run %s (%s)", run_id, exc)

    def release_all(self) -> list[str]:
        """Release what is ready on every day with parked runs; returns the run ids released.
        One SMEMBERS when nothing is held; per day with parked runs, its counts (a few reads),
        and a full look the first time this leader sees the day (the backstop: blocked and
        waiting marked from the records, whatever happened before it led).
        ``days_held`` says how many days had parked runs."""
        released: list[str] = []
        self.unknown = {}
        days = sorted(self.connection.smembers(self.keys.waiting_days))
        self.days_held = len(days)
        for raw in days:
            try:
                day = date.fromisoformat(as_text(raw))
            except ValueError:
                self.connection.srem(self.keys.waiting_days, raw)
                continue
            if day in self.looked:
                result = release_after(self.connection, self.keys, self.queue, self.table, day,
                                       retention_s=self.retention_s)
            else:
                result = release_ready(self.connection, self.keys, self.queue, self.table, day,
                                       retention_s=self.retention_s)
                if len(self.looked) >= LOOKED_MAX:
                    self.looked.clear()  # a bound, not a history: at worst a day gets one more full look
                self.looked.add(day)
            released += result.released
            self.unknown.update(((day, run_id), held) for run_id, held in result.unknown.items())
        return released

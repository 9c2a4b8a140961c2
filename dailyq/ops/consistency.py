"""``doctor``: every run record of a day checked against what should stand behind it.

(Named ``consistency``, not ``doctor``: importing a submodule ``dailyq.doctor`` would
replace the function ``dailyq.doctor`` (api.py) on the package with the module.)

A record's state is a claim about the rest of Redis: ``queued`` says a job of the run
waits somewhere a worker or a mover will take it from, ``running`` that a copy holds
the run's claim (or recovery will find it in the ``running`` hash), ``waiting`` and
``blocked`` that the day's waiting hash holds the run for its release. ``doctor`` reads
each of those structures once and lists every place where they disagree -- a record
that lies, or an entry that would make the machinery act on a run that is not what the
entry says -- with what ``--repair`` does about it.

Kinds (a public contract, documented in docs/commands.md, "Checking a day": added to, never renamed)
------------------------------------------------------------------------
``queued_unbacked``      record ``queued`` (``paused`` in status) whose job is in none of:
                         the queue, RQ's intermediate queue, its started and scheduled
                         (retry) registries, rq-scheduler's delayed jobs, the task's held
                         list (the list, not its index ``keys.set_aside_index``, which only
                         spares a hold the scan), ``left`` -- or is there but RQ's job
                         hash is gone (RQ drops
                         such an entry unseen). Repair: the job id back at the queue's
                         front if RQ's job hash exists, else the record ``failed``, saying
                         what was missing.
``queued_finished``      record ``queued`` of a run in the day's finished set whose job is
                         not forced: BEGIN skips that job as finished and leaves the record
                         as it is, so it stays queued for good (recovery taking over a run
                         that had finished leaves this). Repair: the record ``finished``.
``running_unclaimed``    record ``running``, no claim and not in the ``running`` hash:
                         recovery never sees it. Repair: listed in ``running``; the
                         leader's recovery then requeues it, or fails it by its attempts.
``running_unlisted``     record ``running`` whose claim is held, but not in ``running``:
                         true now, stuck for good once that copy dies. Repair: listed.
``waiting_unbacked``     record ``waiting``/``blocked`` with no waiting entry (or one for
                         another job, which BEGIN would skip as superseded). Repair: its
                         job already pushed -> recorded ``queued``; else parked again,
                         rebuilt from this node's task table (task, slot, param: as
                         dependencies.py rebuilds it at release), so the leader releases
                         it when its upstream runs finish; a run the table cannot
                         rebuild -> ``failed``, with the reason.
``running_entry_stale``  a ``running`` entry of the day whose record is not ``running``
                         (or missing): recovery would enqueue that run again. Repair:
                         the entry removed.
``waiting_entry_stale``  a waiting entry whose record is neither waiting nor blocked (a
                         run that ended, or is queued with its job pushed): its release
                         would push a second job. Repair: the entry removed.
``left_stale``           a ``left`` job of the day whose run is finished, removed, cancelled, has no
                         record, or whose record names another job: the leader would
                         put back a job nothing waits for. Repair: entry removed.

Not reported, because nothing lies: a finished (failed, skipped, cancelled) run whose job is
still in a queue (BEGIN skips it), a cancelled run whose stopped copy has not yet released
its claim (it does within a second or two, or the claim lapses), a queued run whose job
waits in the waiting hash (the release pushes it), a waiting entry of a run with no record
(its release runs it).

Reads and repairs
-----------------
``read`` takes one snapshot in one MULTI/EXEC (each list and set read once, with the
day's records), so a job moving from one structure to the next meanwhile cannot look
absent from both; then one pipeline asks for the claims of running runs and for RQ's
job hashes. A problem found is looked for again at once and kept only if seen twice
(``confirmed``: a mover that is not atomic leaves a job nowhere for a moment).
``find_problems`` is pure: plain sets and dicts in, problems out. Each repair is a Lua
check-and-set (scripts/doctor.py) that acts only while the record (state and
job id) and the entry are still as read: a repair never overwrites a record that
changed meanwhile, it is left alone and says so. Stale entries are removed first
(that changes no record, which another repair of the same run then checks).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import date
from typing import AbstractSet, Any, Callable, Iterable, Mapping, Union

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError

from ..fanout import Parked, Requeued
from ..keys import Keys
from ..redis_values import as_text
from ..rq_seam import DailyJob, RQKeys
from ..runs import (
    BLOCKED,
    CANCELLED,
    FAILED,
    FINISHED,
    META_KEY,
    PAUSED,
    QUEUED,
    REMOVED,
    RUNNING,
    WAITING,
    DaySlots,
    Run,
    task_slots_on,
)
from ..scripts import scripts_for
from ..table import TaskTable

QUEUED_UNBACKED, QUEUED_FINISHED, RUNNING_UNCLAIMED, RUNNING_UNLISTED, WAITING_UNBACKED = (
    "queued_unbacked", "queued_finished", "running_unclaimed", "running_unlisted", "waiting_unbacked")
RUNNING_ENTRY_STALE, WAITING_ENTRY_STALE, LEFT_STALE = "running_entry_stale", "waiting_entry_stale", "left_stale"
KINDS = (QUEUED_UNBACKED, QUEUED_FINISHED, RUNNING_UNCLAIMED, RUNNING_UNLISTED, WAITING_UNBACKED, RUNNING_ENTRY_STALE,
         WAITING_ENTRY_STALE, LEFT_STALE)

HELD_STATES = (WAITING, BLOCKED)
EXISTS_CHUNK = 10_000  # EXISTS per pipeline round trip


# -- what was read ------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """One day's records and every structure that backs them, as plain data."""

    day: date
    records: Mapping[str, Mapping[str, Any]]  # run id -> record (keys.day_runs)
    queue: AbstractSet[str] = frozenset()  # job ids in the queue list
    intermediate: AbstractSet[str] = frozenset()  # RQ's intermediate queue: taken by a worker, not started
    started: AbstractSet[str] = frozenset()  # RQ's started registry (job ids)
    scheduled: AbstractSet[str] = frozenset()  # RQ's scheduled registry: retries waiting for their backoff
    delayed: AbstractSet[str] = frozenset()  # rq-scheduler's delayed jobs (keys.scheduled_jobs)
    failed: AbstractSet[str] = frozenset()  # RQ's failed registry (only named in details)
    finished: AbstractSet[str] = frozenset()  # RQ's finished registry (only named in details)
    held: Mapping[str, AbstractSet[str]] = field(default_factory=dict)  # task -> job ids (keys.set_aside)
    left: AbstractSet[str] = frozenset()  # job ids in keys.left
    left_info: Mapping[str, str] = field(default_factory=dict)  # job id -> raw JSON (keys.left_info)
    claims: AbstractSet[str] = frozenset()  # run ids whose claim key exists
    running: Mapping[str, str] = field(default_factory=dict)  # keys.running: run id -> day (every day's)
    waiting: Mapping[str, str] = field(default_factory=dict)  # keys.day_waiting: run id -> raw fanout.Parked
    jobs: AbstractSet[str] = frozenset()  # job ids whose RQ job hash exists (of those asked about)
    paused: AbstractSet[str] = frozenset()  # paused task names (a queued run of one shows ``paused``)
    finished_runs: AbstractSet[str] = frozenset()  # run ids in the day's finished set (keys.day_finished)
    forced: AbstractSet[str] = frozenset()  # job ids whose job is forced (a ``rerun --force``; of those asked)


# -- what --repair does: one script call each (scripts/doctor.py) ----------------------------------

@dataclass(frozen=True)
class Requeue:
    """The job back at the queue's front if RQ still has it, else the run failed."""

    job_id: str
    error: str  # the record's error should RQ's job hash be gone


@dataclass(frozen=True)
class Settle:
    """The record set ``state`` (failed with ``error``, queued, or finished: only while
    the run is in the day's finished set), its waiting entry ``entry`` (as read; '' =
    none) removed with it."""

    state: str
    error: str = ""
    entry: str = ""


@dataclass(frozen=True)
class Park:
    """A parked run's waiting entry written again (replacing ``old``, as read; '' = none)."""

    entry: str
    old: str = ""


@dataclass(frozen=True)
class ListRunning:
    """The run listed in the ``running`` hash, for the claim owner its record names."""

    owner: str


@dataclass(frozen=True)
class DropEntry:
    """A stale entry removed: ``field`` of ``structure`` while its value is still ``value``."""

    structure: str  # 'running' | 'waiting' | 'left'
    field: str
    value: str


Fix = Union[Requeue, Settle, Park, ListRunning, DropEntry]


@dataclass(frozen=True)
class Problem:
    run_id: str
    kind: str
    state: str | None  # the record's state as status shows it (None: no record)
    job_id: str | None  # the job the problem is about
    detail: str
    repair: str  # what --repair does, in words
    fix: Fix
    # The record as read, which the repair checks is unchanged: its stored state ('' = no
    # record) and job id ('' = none).
    read_state: str = ""
    read_job: str = ""

    def public(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "kind": self.kind, "state": self.state, "job_id": self.job_id,
                "detail": self.detail, "repair": self.repair}


# Rebuilds a parked run's waiting entry (fanout.Parked JSON) from a task table, or None.
Rebuild = Callable[[str, Mapping[str, Any]], Union[str, None]]


# -- the pure core ------------------------------------------------------------------------------

def find_problems(snap: Snapshot, rebuild: Rebuild | None = None) -> list[Problem]:
    """Every inconsistency in ``snap``, by kind then run id. ``rebuild``: how a parked run
    whose waiting entry is gone is parked again (None: such runs are failed)."""
    found = Finder(snap, rebuild or (lambda run_id, record: None))
    for run_id, record in snap.records.items():
        found.record(run_id, record)
    found.structures()
    return sorted(found.problems, key=lambda p: (KINDS.index(p.kind), p.run_id, p.job_id or ""))


class Finder:
    def __init__(self, snap: Snapshot, rebuild: Rebuild) -> None:
        self.snap = snap
        self.rebuild = rebuild
        self.day = snap.day.isoformat()
        self.problems: list[Problem] = []

    def places(self, job_id: str, task: str) -> list[str]:
        """Where a job of the run waits or executes, by name."""
        snap = self.snap
        named = (("the queue", snap.queue), ("RQ's intermediate queue", snap.intermediate),
                 ("RQ's started registry", snap.started), ("RQ's scheduled registry (a retry)", snap.scheduled),
                 ("rq-scheduler's delayed jobs", snap.delayed),
                 (f"the set-aside list of {task}", snap.held.get(task, ())),
                 ("left", snap.left))
        return [name for name, job_ids in named if job_id in job_ids]

    def backed(self, job_id: str, task: str) -> bool:
        # A queue entry whose job hash is gone is dropped by RQ unseen: no backing.
        return bool(self.places(job_id, task)) and job_id in self.snap.jobs

    def add(self, run_id: str, kind: str, record: Mapping[str, Any] | None, job_id: str | None, detail: str,
            repair: str, fix: Fix) -> None:
        state = record.get("state") if record else None
        shown = PAUSED if state == QUEUED and record and record.get("task") in self.snap.paused else state
        self.problems.append(Problem(run_id, kind, shown, job_id, detail, repair, fix, read_state=state or "",
                                     read_job=_job_of(record)))

    # -- records --

    def record(self, run_id: str, record: Mapping[str, Any]) -> None:
        state = record.get("state")
        if state == QUEUED:
            self.queued(run_id, record)
        elif state == RUNNING:
            self.running(run_id, record)
        elif state in HELD_STATES:
            self.held_run(run_id, record)

    def queued(self, run_id: str, record: Mapping[str, Any]) -> None:
        job_id, task = _job_of(record), str(record.get("task"))
        if not job_id:
            error = "doctor: recorded queued, but its record names no job; rerun it to run it"
            self.add(run_id, QUEUED_UNBACKED, record, None, "its record names no job",
                     f"record it failed ({error!r})", Settle(FAILED, error))
            return
        if run_id in self.snap.finished_runs and job_id not in self.snap.forced:
            self.add(run_id, QUEUED_FINISHED, record, job_id,
                     f"the run is in the day's finished set and its job {job_id} is not forced: BEGIN skips the job "
                     "and leaves the record queued", "record it finished", Settle(FINISHED))
            return
        if self.backed(job_id, task) or _entry_job(self.snap.waiting.get(run_id)) == job_id:
            return  # a queue entry, a retry, a set-aside list, left -- or its release will push it
        places = self.places(job_id, task)
        if places:
            missing = f"its job {job_id} is in {', '.join(places)} but RQ's job hash is gone (RQ drops it unseen)"
        else:
            missing = (f"its job {job_id} is in none of: the queue, RQ's intermediate queue, RQ's started and "
                       f"scheduled registries, rq-scheduler's delayed jobs, the set-aside list of {task}, left")
        detail = missing
        if job_id in self.snap.failed:
            detail += "; RQ's failed registry has it (RQ failed it outside the guard)"
        elif job_id in self.snap.finished:
            detail += "; RQ's finished registry has it (RQ ran it; the guard recorded nothing)"
        gone = missing if places else f"{missing}, and RQ's job hash is gone"
        error = f"doctor: recorded queued, but {gone}; rerun it to run it again"
        if job_id in self.snap.jobs:
            repair = f"push job {job_id} back to the front of the queue"
        else:
            repair = f"record it failed ({error!r}): RQ's job hash is gone"
        self.add(run_id, QUEUED_UNBACKED, record, job_id, detail, repair, Requeue(job_id, error))

    def running(self, run_id: str, record: Mapping[str, Any]) -> None:
        if self.snap.running.get(run_id) == self.day:
            return  # recovery sees it: it takes the run over once no claim is held
        job_id, owner = _job_of(record) or None, str(record.get("owner") or "")
        if run_id in self.snap.claims:
            self.add(run_id, RUNNING_UNLISTED, record, job_id,
                     "a copy holds its claim, but it is not in the running hash: should that copy die, recovery "
                     "never sees the run", "list it in the running hash", ListRunning(owner))
        else:
            self.add(run_id, RUNNING_UNCLAIMED, record, job_id,
                     f"no claim is held (no copy executes it; last on node {record.get('node')}) and it is not in "
                     "the running hash, so recovery never sees it",
                     "list it in the running hash: the leader's recovery then requeues it, or records it failed "
                     "when its attempts are used", ListRunning(owner))

    def held_run(self, run_id: str, record: Mapping[str, Any]) -> None:
        job_id, task = _job_of(record), str(record.get("task"))
        entry = self.snap.waiting.get(run_id)
        entry_job = _entry_job(entry)
        if entry is not None and entry_job == job_id:
            return
        if entry is None:
            missing = "the day's waiting hash has no entry for it"
            detail = f"{missing}: nothing will release it"
        else:
            missing = f"its waiting entry names job {entry_job}, not {job_id or 'none'}"
            detail = f"{missing}: the release would push a job BEGIN skips as superseded"
        if job_id and self.backed(job_id, task):
            places = ", ".join(self.places(job_id, task))
            self.add(run_id, WAITING_UNBACKED, record, job_id, f"{detail}; its job is in {places}",
                     "record it queued (its job is already pushed)", Settle(QUEUED, entry=entry or ""))
            return
        parked = self.rebuild(run_id, record) if job_id else None
        if parked is not None:
            self.add(run_id, WAITING_UNBACKED, record, job_id, detail,
                     "park it again in the waiting hash, rebuilt from this node's task table: the leader releases "
                     "it once its upstream runs have finished", Park(parked, old=entry or ""))
            return
        error = (f"doctor: parked for its upstream runs, but {missing}, and this node's task table cannot park "
                 f"it again (no task {task} with slot {record.get('slot')} on {self.day}); rerun it to run it")
        self.add(run_id, WAITING_UNBACKED, record, job_id or None, detail, f"record it failed ({error!r})",
                 Settle(FAILED, error, entry=entry or ""))

    # -- structures --

    def structures(self) -> None:
        snap = self.snap
        for run_id, day in snap.running.items():
            if day != self.day:
                continue  # another day's run: doctor --date that day
            record = snap.records.get(run_id)
            if record is None or record.get("state") != RUNNING:
                what = f"its record is {record.get('state')}" if record else "it has no record"
                self.add(run_id, RUNNING_ENTRY_STALE, record, _job_of(record) or None,
                         f"listed in the running hash, but {what}: recovery would take it for a dead run and "
                         "enqueue it again", "remove the entry", DropEntry("running", run_id, day))
        for run_id, entry in snap.waiting.items():
            record = snap.records.get(run_id)
            if record is None or record.get("state") in HELD_STATES:
                continue  # no record: its release runs it; held: checked with the record
            job_id, entry_job, task = _job_of(record), _entry_job(entry), str(record.get("task"))
            if record.get("state") == QUEUED and job_id == entry_job and not self.backed(job_id, task):
                continue  # the entry is what backs the queued run
            what = str(record.get("state"))
            if record.get("state") == QUEUED:
                what += (f" with job {job_id} pushed" if job_id == entry_job else f" with another job ({job_id})")
            self.add(run_id, WAITING_ENTRY_STALE, record, entry_job,
                     f"the day's waiting hash holds it (job {entry_job}), but its record is {what}: its release "
                     "would push a job for nothing", "remove the entry", DropEntry("waiting", run_id, entry))
        for job_id in sorted(snap.left):
            raw = snap.left_info.get(job_id)
            info = _json(raw)
            if raw is None or info.get("day") != self.day or not info.get("run_id"):
                continue  # another day's (or one the leader cannot place either)
            run_id = str(info["run_id"])
            record = snap.records.get(run_id)
            if record is None:
                why = f"its run {run_id} has no record on {self.day}"
            elif record.get("state") in (FINISHED, REMOVED, CANCELLED):
                why = f"its run is {record.get('state')}"
            elif _job_of(record) != job_id:
                why = f"its run's record names job {_job_of(record) or 'none'}"
            else:
                continue
            self.add(run_id, LEFT_STALE, record, job_id,
                     f"job {job_id} is in left, but {why}: the leader would put back a job nothing waits for",
                     "remove it from left", DropEntry("left", job_id, raw))


def _job_of(record: Mapping[str, Any] | None) -> str:
    job_id = record.get("job_id") if record else None
    return job_id if isinstance(job_id, str) else ""


def _json(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _entry_job(raw: str | None) -> str | None:
    """The job id a waiting entry (fanout.Parked JSON) would push; None without an entry."""
    if raw is None:
        return None
    return str(_json(raw).get("job_id") or "")


def _entry_task(raw: str) -> str:
    """The task a waiting entry (fanout.Parked JSON) holds a run of ('~' if it names none)."""
    return str(_json(raw).get("task") or "~")


RERUN_SUFFIX = re.compile(r"-r(\d+)$")


def table_rebuild(table: TaskTable, day: date, slots: DaySlots | None = None) -> Rebuild:
    """A parked run's waiting entry rebuilt from ``table``, as dependencies.py rebuilds the
    run at release: its task, one of the task's slots on ``day`` and its param must give
    the same run id. A rerun's job ({run_id}-rN) keeps its number and rerun id (force: a
    rerun's own job, so BEGIN does not skip it for the run's earlier finish)."""

    def rebuild(run_id: str, record: Mapping[str, Any]) -> str | None:
        task = table.by_name.get(str(record.get("task")))
        job_id = _job_of(record)
        if task is None or not job_id:
            return None
        # A once-a-day task's slot as its day was fanned out (runs.DaySlots: ``at`` may have moved since).
        slot = next((s for s in task_slots_on(task, day, slots) if s.isoformat() == record.get("slot")), None)
        try:
            run = Run(task, json.loads(str(record.get("param_json"))), slot) if slot else None
        except ValueError:
            return None
        if run is None or run.run_id != run_id:
            return None
        number = RERUN_SUFFIX.search(job_id)
        again = None
        if number and job_id == run.job_id(int(number.group(1))):
            rerun_id = record.get("rerun_id")
            again = Requeued(int(number.group(1)), rerun_id=rerun_id if isinstance(rerun_id, str) else None,
                          new_run=bool(rerun_id), attempts_before=int(record.get("attempts_before") or 0))
        elif job_id != run.job_id():
            return None
        return Parked(task.name, run.param_json, run.slot.isoformat(), job_id, force=again is not None and bool(
            again.rerun_id), again=again).to_json()

    return rebuild


# -- reading Redis ------------------------------------------------------------------------------

def read(connection: Redis, keys: Keys, queue: Queue, day: date, tasks: Iterable[str]) -> Snapshot:
    """One snapshot of ``day`` (see the module docstring). ``tasks``: whose set-aside lists to
    read; the tasks of the day's records are added (read again, atomically, if any was
    not among them)."""
    names = set(tasks)
    while True:
        snap = _read_atomically(connection, keys, queue, day, sorted(names))
        extra = {str(r.get("task")) for r in snap.records.values()} - names
        if not extra:
            break
        names |= extra
    running_ids = [run_id for run_id, r in snap.records.items() if r.get("state") == RUNNING]
    asked = sorted({job for r in snap.records.values() if r.get("state") in (QUEUED, *HELD_STATES)
                    if (job := _job_of(r))})
    claims = _existing(connection, [keys.claim(run_id) for run_id in running_ids], running_ids)
    jobs = _existing(connection, [RQKeys.job(job_id) for job_id in asked], asked)
    # Queued runs that finished before: only a forced job (rerun --force) of one executes.
    again = [job for run_id, r in snap.records.items() if run_id in snap.finished_runs and r.get("state") == QUEUED
             and (job := _job_of(r)) in jobs]
    forced = {job_id for job_id in again if _forced(connection, job_id)}
    return replace(snap, claims=claims, jobs=jobs, forced=forced)


def _forced(connection: Redis, job_id: str) -> bool:
    """Whether the job's meta says force (runs.RunJob.meta). Not Queue.fetch_job: that
    removes a job id whose hash is gone from the queue, and doctor only reads."""
    try:
        job = DailyJob.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return False
    return bool(((job.meta or {}).get(META_KEY) or {}).get("force"))


def _read_atomically(connection: Redis, keys: Keys, queue: Queue, day: date, tasks: list[str]) -> Snapshot:
    rq_keys = RQKeys(queue)
    registries = (rq_keys.started, rq_keys.scheduled, keys.scheduled_jobs, rq_keys.failed, rq_keys.finished, keys.left)
    with connection.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.day_runs(day))
        pipe.lrange(rq_keys.queue, 0, -1)
        pipe.lrange(rq_keys.intermediate, 0, -1)
        for key in registries:
            pipe.zrange(key, 0, -1)
        for task in tasks:
            pipe.lrange(keys.set_aside(task), 0, -1)
        pipe.hgetall(keys.left_info)
        pipe.hgetall(keys.running)
        pipe.hgetall(keys.day_waiting(day))
        pipe.hkeys(keys.paused)
        pipe.smembers(keys.day_finished(day))
        replies = pipe.execute()
    raw_records, queued, intermediate, *rest = replies
    started, scheduled, delayed, failed, finished, left = ({as_text(m) for m in reply} for reply in rest[:6])
    held_lists = rest[6:6 + len(tasks)]
    left_info, running, waiting, paused, finished_runs = rest[6 + len(tasks):]
    records = {as_text(k): json.loads(v) for k, v in raw_records.items()}
    return Snapshot(
        day=day, records=records, queue={as_text(j) for j in queued}, intermediate={as_text(j) for j in intermediate},
        # Started entries are "{job id}:{execution id}" (RQ 3); job ids have no ':'.
        started={entry.split(":", 1)[0] for entry in started}, scheduled=scheduled, delayed=delayed, failed=failed,
        finished=finished, held={task: {as_text(j) for j in ids} for task, ids in zip(tasks, held_lists)},
        left=left, left_info=_texts(left_info), running=_texts(running), waiting=_texts(waiting),
        paused={as_text(name) for name in paused}, finished_runs={as_text(run_id) for run_id in finished_runs})


def _texts(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in raw.items()}


def _existing(connection: Redis, keys: list[str], names: list[str]) -> set[str]:
    """Those of ``names`` whose key (same position in ``keys``) exists."""
    found: set[str] = set()
    for start in range(0, len(keys), EXISTS_CHUNK):
        with connection.pipeline(transaction=False) as pipe:
            for key in keys[start:start + EXISTS_CHUNK]:
                pipe.exists(key)
            found.update(name for name, n in zip(names[start:start + EXISTS_CHUNK], pipe.execute()) if n)
    return found


# -- repairing ----------------------------------------------------------------------------------

def repair(connection: Redis, keys: Keys, queue: Queue, day: date, problem: Problem, *, retention_s: int,
           now_iso: str) -> str:
    """Apply one problem's fix; returns what happened, in a word or a short phrase."""
    scripts = scripts_for(connection)
    rq_keys = RQKeys(queue)
    fix = problem.fix
    runs_key, waiting_key = keys.day_runs(day), keys.day_waiting(day)
    run_id, state, job_id = problem.run_id, problem.read_state, problem.read_job
    if isinstance(fix, Requeue):
        outcome = scripts.doctor_requeue(
            runs_key=runs_key, queue_key=rq_keys.queue, intermediate_queue_key=rq_keys.intermediate,
            job_key=rq_keys.job(fix.job_id), failed_registry_key=rq_keys.failed,
            failures_key=keys.alert_failures, run_id=run_id, job_id=fix.job_id, error=fix.error, now_iso=now_iso,
            retention_s=retention_s, day=day.isoformat()).run()
        return {"changed": CHANGED, "in-queue": "left alone: its job is in the queue now"}.get(outcome, outcome)
    if isinstance(fix, Settle):
        done = scripts.doctor_settle(runs_key=runs_key, waiting_key=waiting_key, finished_key=keys.day_finished(day),
                                     failures_key=keys.alert_failures, run_id=run_id, state=state, job_id=job_id,
                                     new_state=fix.state, error=fix.error, entry=fix.entry, now_iso=now_iso,
                                     retention_s=retention_s, day=day.isoformat()).run()
        return fix.state if done else CHANGED
    if isinstance(fix, Park):
        done = scripts.doctor_park(runs_key=runs_key, waiting_key=waiting_key, waiting_days_key=keys.waiting_days,
                                   deps_key=keys.day_deps(day), run_id=run_id, job_id=job_id, entry=fix.entry,
                                   old_entry=fix.old, day=day.isoformat(), retention_s=retention_s,
                                   task=_entry_task(fix.entry)).run()
        return "parked" if done else CHANGED
    if isinstance(fix, ListRunning):
        done = scripts.doctor_list_running(runs_key=runs_key, running_key=keys.running, run_id=run_id,
                                           day=day.isoformat(), owner=fix.owner, job_id=job_id).run()
        return "listed" if done else CHANGED
    structure = {"running": keys.running, "waiting": waiting_key, "left": keys.left_info}[fix.structure]
    done = scripts.doctor_drop_entry(hash_key=structure, runs_key=runs_key, field=fix.field, value=fix.value,
                                     run_id=run_id, state=state, job_id=job_id,
                                     zset_key=keys.left if fix.structure == "left" else None).run()
    return "removed" if done else CHANGED


CHANGED = "left alone: the record or the entry changed since it was read"


def confirmed(look: Callable[[], list[Problem]]) -> list[Problem]:
    """The problems found twice in a row. Each look is one atomic snapshot, but some
    movers are not atomic (rq-scheduler takes a due job off its set, then pushes it: for
    a moment the job is in neither), so a problem seen once is looked at again at once
    and kept only if the second look, whose words are shown, sees it too."""
    first = look()
    if not first:
        return first
    seen = {_identity(p) for p in first}
    return [p for p in look() if _identity(p) in seen]


def _identity(problem: Problem) -> tuple[str, str, str | None, str, str]:
    return problem.run_id, problem.kind, problem.job_id, problem.read_state, problem.read_job


def examine(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, day: date, *, fix: bool,
            retention_s: int, now_iso: str) -> dict[str, Any]:
    """``doctor``'s object: {"date", "problems": [...], "repaired"}; with ``fix`` each
    problem is repaired and has an ``outcome``."""
    problems = confirmed(lambda: find_problems(read(connection, keys, queue, day, [t.name for t in table.tasks]),
                                               table_rebuild(table, day, DaySlots.read(connection, keys, day))))
    shown = [problem.public() for problem in problems]
    if fix:
        # Stale entries first: removing one changes no record, while a record's repair
        # would make the check of another problem of the same run (record as read) refuse.
        for index in sorted(range(len(problems)), key=lambda i: not isinstance(problems[i].fix, DropEntry)):
            shown[index]["outcome"] = repair(connection, keys, queue, day, problems[index], retention_s=retention_s,
                                             now_iso=now_iso)
    return {"date": day.isoformat(), "problems": shown, "repaired": fix}


# -- text ---------------------------------------------------------------------------------------

def render(report: Mapping[str, Any]) -> str:
    """``doctor`` as text: a line per problem, its repair under it (pure)."""
    problems = report["problems"]
    if not problems:
        return (f"{report['date']}: no problems: every record's state has its queue entry, retry, set-aside list, "
                "claim or waiting entry behind it, and no entry is stale")
    lines = [f"{report['date']}: {len(problems)} problem{'' if len(problems) == 1 else 's'}"]
    for p in problems:
        job = "" if p["job_id"] == p["run_id"] else f", job {p['job_id'] or '-'}"
        lines.append(f"{p['kind']}  {p['run_id']} ({p['state'] or 'no record'}{job}): {p['detail']}")
        lines.append(f"    repair: {p['repair']}")
        if "outcome" in p:
            lines.append(f"    repaired: {p['outcome']}")
    if not report["repaired"]:
        lines.append("run doctor --repair to apply these repairs")
    return "\n".join(lines)

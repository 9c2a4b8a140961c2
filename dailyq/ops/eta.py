"""When the day is expected to end: a list-scheduling simulation of its pending runs.

Pure: the runs (``EtaRun``, made from ``status``' run entries by ``eta_runs``), the
learned durations of their series, the number of live worker processes and ``now`` go
in; an ``Estimate`` comes out. status.py reads those from Redis (and puts
``Estimate.at`` in ``status --json`` as ``eta``); alerts.py and metrics.py use the same.

The simulation follows what the cluster does with the runs:

* A run's expected duration is the last one recorded for its (task, param) series (the
  durations the guard learns, fanout.longest_first's input); a run never timed counts
  as the mean of its task's known durations on the day, else of all the day's. With no
  duration known at all, the estimate is unknown.
* A running run holds a worker until its start plus its expected duration (``now`` if
  that has passed: it is overdue, its end cannot be told).
* Queued runs are taken in the queue's order by each worker that frees up. Fan-out
  pushes a slot's runs longest first, never-timed runs first of all (fanout.py), so
  the order here is: slot time, then never timed first, then longest first.
* A scheduled run cannot start before its slot fires.
* A waiting run (``after``) joins the back of the queue when every pending run of
  its upstream tasks has ended in the simulation (dependencies.py's release).
* A task's ``max_running``, and its pool's size (``Task(pool=...)``, the table's
  POOLS): a run over either is set aside and goes to the queue's front when a run of
  that task (or of that pool) ends (limits.py).
* A paused run ends only after a ``resume``: its task, and those after it, are unknown.

Not modelled: ``max_per_node`` and which node runs what, runs of other days queued for
the same workers (a backfill), retries of runs that will fail, runs' own variance, and
what a worker spends per run around the task (dequeue, fork, BEGIN, FINISH), which the
learned durations leave out: on a day of sub-second runs the estimate is early by
about that cost times the runs left per worker. Each worker process is one worker.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, Sequence

from ..runs import DIGEST_LENGTH, PAUSED, QUEUED, RUNNING, SCHEDULED, WAITING, param_digest
from ..table import Task, encode_param
from ..timestamps import parse_iso

START_PRECISION = timedelta(seconds=1)  # of a stored start (timestamps.iso)

# The states of a run that still has to end; any other (finished, failed, blocked,
# skipped, missed, removed, ...) needs no worker any more.
PENDING = (SCHEDULED, QUEUED, RUNNING, WAITING, PAUSED)


# slots and not frozen: a big day makes 100k of them per estimate, and a frozen
# dataclass sets each field through object.__setattr__ (a third of eta_runs' time).
@dataclass(slots=True)
class EtaRun:
    task: str
    series: str  # (task, param) across days: the key of the learned durations
    state: str
    slot: datetime | None = None  # a scheduled run starts no sooner; earlier slots queue first
    started_at: datetime | None = None  # a running run's start
    duration_s: float | None = None  # a finished run's own duration (for the day's means)


@dataclass(frozen=True)
class EtaTask:
    """What the table says about a task that matters to the simulation."""

    after: tuple[str, ...] = ()
    max_running: int | None = None
    pool: str | None = None  # a name of the table's POOLS


@dataclass(frozen=True)
class Estimate:
    at: datetime | None  # every pending run expected to have ended; None when unknown or done
    done: bool  # no run is pending
    why: str | None = None  # when ``at`` is None and not done: why it is unknown
    # Per task with pending runs: when its last one is expected to end (None: unknown).
    task_ends: dict[str, datetime | None] = field(default_factory=dict)
    workers: int = 0
    # Each simulated run with its expected end in seconds after ``now`` (runs of unknown
    # tasks are not there): seconds, not datetimes, as most callers want only ``at``.
    run_ends: tuple[tuple[EtaRun, float], ...] = ()
    now: datetime | None = None  # the moment the seconds of run_ends count from

    def end_of(self, task: str, slots_until: datetime | None = None) -> datetime | None:
        """When ``task``'s pending runs whose slot is at or before ``slots_until`` (all when
        None) are expected to have ended; None when unknown, or none is pending."""
        if self.task_ends.get(task) is None or self.now is None:
            return None
        ends = [end_s for run, end_s in self.run_ends if run.task == task
                and (slots_until is None or run.slot is None or run.slot <= slots_until)]
        return self.now + timedelta(seconds=max(ends)) if ends else None


def eta_iso(at: datetime) -> str:
    """``eta`` as ``status --json`` shows it: ISO 8601 in UTC to the millisecond (stored
    times have seconds; a day of short runs needs better than that)."""
    return at.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def eta_tasks(tasks: Iterable[Task]) -> dict[str, EtaTask]:
    return {task.name: EtaTask(tuple(task.after), task.max_running, getattr(task, "pool", None)) for task in tasks}


def series_id(task: str, param: Any) -> str:
    """As runs.Run.series_id builds it."""
    return f"{task}-{param_digest(encode_param(param))}"


_DIGEST = re.compile(f"-[0-9a-f]{{{DIGEST_LENGTH}}}")


def run_series(task: str, run_id: Any, param: Any) -> str:
    """``series_id`` of a run entry, read off its run id when that is a run's own
    (``{task}-{slot label}-{param digest}``, runs.Run.run_id): the digest is the series',
    so a big day's params are not encoded again. Else (a computed slot's placeholder)
    from the param."""
    if (type(run_id) is str and len(run_id) > len(task) + DIGEST_LENGTH + 1 and run_id.startswith(task)
            and run_id[len(task)] == "-" and _DIGEST.fullmatch(run_id, len(run_id) - DIGEST_LENGTH - 1)):
        return task + run_id[-DIGEST_LENGTH - 1:]
    return series_id(task, param)


def eta_runs(runs: Iterable[Mapping[str, Any]]) -> list[EtaRun]:
    """``status``' run entries (status.day_runs) as the simulation's input. A stored start
    has second precision (timestamps.py): the run started within that second, so in its
    middle as far as anyone knows (never after ``now``: the simulation sees to that)."""
    shown = []
    slots: dict[str, datetime | None] = {}  # a day has few slots and many runs: each parsed once
    for run in runs:
        get = run.get
        state = get("state")
        if type(state) is not str:
            state = str(state)
        task = get("task")
        if type(task) is not str:
            task = str(task)
        duration = get("duration_s")
        slot = None
        if state in PENDING:
            text = get("slot")
            if type(text) is not str:
                slot = parse_iso(text)
            elif text in slots:
                slot = slots[text]
            else:
                slot = slots[text] = parse_iso(text)
        started = parse_iso(get("started_at")) if state == RUNNING else None
        shown.append(EtaRun(
            task=task, series=run_series(task, get("run_id"), get("param")), state=state, slot=slot,
            started_at=None if started is None else started + START_PRECISION / 2,
            duration_s=float(duration) if isinstance(duration, (int, float)) and duration >= 0 else None))
    return shown


def waits_for_a_worker(runs: Iterable[Mapping[str, Any]]) -> bool:
    """True when some run entry (as ``eta_runs`` takes them) is pending and not running:
    with no live worker ``estimate`` then says unknown ("no live worker") whatever the
    durations, so a caller that wants only ``Estimate.at`` need not build its input."""
    return any(state in PENDING and state != RUNNING for state in (str(run.get("state")) for run in runs))


def nothing_pending(runs: Iterable[Mapping[str, Any]]) -> bool:
    """True when no run entry (as ``eta_runs`` takes them) is pending: ``estimate`` then
    says done, with no ``at``, so a caller that wants only ``Estimate.at`` need not build
    its input (a finished 100k-run day: a third of its status' time)."""
    return not any(state in PENDING for state in (str(run.get("state")) for run in runs))


def pending_series(runs: Iterable[EtaRun]) -> list[str]:
    """The series whose learned duration the estimate needs (what to read from Redis)."""
    return list(dict.fromkeys(run.series for run in runs if run.state in PENDING))


def estimate(runs: Sequence[EtaRun], durations: Mapping[str, float], workers: int, now: datetime,
             tasks: Mapping[str, EtaTask] | None = None, pools: Mapping[str, int] | None = None) -> Estimate:
    """The day's expected end; see the module's docstring for the rules. ``durations``:
    the learned ones, of at least the pending runs' series (``pending_series``);
    ``workers``: the live worker processes; ``pools``: the table's POOLS (name -> size)."""
    tasks = tasks or {}
    pending = [run for run in runs if run.state in PENDING]
    if not pending:
        return Estimate(None, True, workers=workers)
    expected = _expected_durations(runs, pending, durations)
    if expected is None:
        return Estimate(None, False, "no duration learned for any run of the day", workers=workers)
    running = [run for run in pending if run.state == RUNNING]
    if workers == 0 and len(pending) > len(running):
        return Estimate(None, False, "no live worker", {run.task: None for run in pending}, workers)
    unknown = _unknown_tasks(pending, tasks)
    # A running run holds a worker whatever the heartbeats say (a worker about to beat).
    sim = _Simulation(now, max(workers, len(running)), tasks, expected, set(durations), pools or {})
    run_ends = tuple(sim.run([run for run in pending if run.task not in unknown]))
    ends_s: dict[str, float] = {}
    for run, end_s in run_ends:
        if end_s > ends_s.get(run.task, -1.0):
            ends_s[run.task] = end_s
    task_ends: dict[str, datetime | None] = {}
    for name in dict.fromkeys(run.task for run in pending):
        task_ends[name] = None if name in unknown or name not in ends_s else now + timedelta(seconds=ends_s[name])
    if any(end is None for end in task_ends.values()):
        named = sorted(name for name, end in task_ends.items() if end is None)
        return Estimate(None, False, f"runs of {', '.join(named)} cannot start (paused, or after a paused task)",
                        task_ends, workers, run_ends, now)
    return Estimate(max(end for end in task_ends.values() if end is not None), False, None, task_ends, workers,
                    run_ends, now)


def _expected_durations(runs: Sequence[EtaRun], pending: list[EtaRun],
                        durations: Mapping[str, float]) -> dict[str, float] | None:
    """Series -> expected seconds for every pending run's series; None when nothing is known."""
    if pending and all(run.series in durations for run in pending):
        # Every pending series learned (a day like yesterday's): the means are not needed.
        return {run.series: durations[run.series] for run in pending}
    known: dict[str, list[float]] = {}
    for run in runs:
        seconds = durations.get(run.series) if run.state in PENDING else run.duration_s
        if seconds is not None:
            known.setdefault(run.task, []).append(seconds)
    everything = [s for values in known.values() for s in values]
    if not everything:
        return None
    day_mean = sum(everything) / len(everything)
    expected: dict[str, float] = {}
    for run in pending:
        if run.series in durations:
            expected[run.series] = durations[run.series]
        elif run.series not in expected:
            timed = known.get(run.task)
            expected[run.series] = sum(timed) / len(timed) if timed else day_mean
    return expected


def _unknown_tasks(pending: list[EtaRun], tasks: Mapping[str, EtaTask]) -> set[str]:
    """Tasks with a paused run, and the tasks after them (directly or not)."""
    unknown = {run.task for run in pending if run.state == PAUSED}
    if not unknown:
        return unknown
    pending_tasks = {run.task for run in pending}
    grew = True
    while grew:
        grew = False
        for name in pending_tasks - unknown:
            if any(up in unknown for up in tasks.get(name, EtaTask()).after):
                unknown.add(name)
                grew = True
    return unknown


class _Simulation:
    """Discrete events in seconds after ``now``: a run's end frees its worker, which
    takes the head of the queue (a heap keyed by queue order) that it may start."""

    def __init__(self, now: datetime, workers: int, tasks: Mapping[str, EtaTask], expected: dict[str, float],
                 learned: set[str], pools: Mapping[str, int]) -> None:
        self.now = now
        self.tasks = tasks
        self.expected = expected
        self.learned = learned
        self.idle = workers
        self.seq = 0
        self.ends: list[tuple[float, int, EtaRun]] = []  # (time, seq, run) per executing run
        # (0 for the front, queued since, never timed first, longest first, seq, run, may start at)
        self.queue: list[tuple[int, float, bool, float, int, EtaRun, float]] = []
        # Limits: ("task", name) -> max_running, ("pool", name) -> its size; per limit, the
        # runs executing under it and those set aside over it (in queue order).
        self.limits: dict[tuple[str, str], int] = {("pool", name): size for name, size in pools.items()}
        for name, spec in tasks.items():
            if spec.max_running is not None:
                self.limits[("task", name)] = spec.max_running
        self.task_limits: dict[str, list[tuple[str, str]]] = {}  # _limits_of's answers
        self.held: dict[tuple[str, str], list[EtaRun]] = {}
        self.executing: dict[tuple[str, str], int] = {}
        self.left: dict[str, int] = {}  # runs of each task not ended yet
        self.waiting: dict[str, list[EtaRun]] = {}
        self.ended: list[tuple[EtaRun, float]] = []

    def run(self, pending: list[EtaRun], shortcut: bool = True) -> list[tuple[EtaRun, float]]:
        """Each run that got to start, with when it ends (seconds after now). ``shortcut``:
        take ``_in_order``'s way when it gives the same ends (tests compare the two)."""
        left, waiting, now = self.left, self.waiting, self.now
        # The seconds from now to each slot: a day has few slots and many runs (eta_runs
        # shares one datetime per slot text), so each is worked out once.
        slot_seconds: dict[datetime | None, float] = {None: 0.0}
        queued: list[EtaRun] = []
        queued_tasks: dict[str, EtaRun] = {}  # a run of each task with queued runs
        for run in pending:  # one pass: this runs once per pending run of the day
            task, slot, state = run.task, run.slot, run.state
            left[task] = left.get(task, 0) + 1
            if slot not in slot_seconds:
                slot_seconds[slot] = (slot - now).total_seconds()  # type: ignore[operator]
            if state == RUNNING:
                started = min(run.started_at or now, now)
                # Overdue (past its expected end): it may end any moment.
                self._execute(run, max(0.0, (started - now).total_seconds() + self.expected[run.series]))
            elif state == WAITING:
                waiting.setdefault(task, []).append(run)
            else:
                queued.append(run)
                queued_tasks[task] = run
        if shortcut and not waiting and not any(self._limits_of(run) for run in queued_tasks.values()):
            return self._in_order(queued, slot_seconds)
        for run in queued:
            since = slot_seconds[run.slot]
            self._push(run, since, max(0.0, since), heap=False)
        # Made a heap once (linear) rather than by a push per run; the order it pops in is
        # the same, as every entry's key is distinct (its seq).
        heapq.heapify(self.queue)
        for name in list(self.waiting):
            self._release_if_ready(name, 0.0)
        clock = 0.0
        while True:
            self._dispatch(clock)
            next_times = [self.ends[0][0]] if self.ends else []
            if self.idle > 0 and self.queue:
                next_times.append(self.queue[0][6])
            if not next_times:
                break
            clock = max(clock, min(next_times))
            while self.ends and self.ends[0][0] <= clock:
                _, _, ended = heapq.heappop(self.ends)
                self._ended(ended, clock)
        return self.ended

    def _in_order(self, queued: list[EtaRun], slot_seconds: dict[datetime | None, float]) -> list[tuple[EtaRun, float]]:
        """The event loop's answer when no run can be set aside (no limit applies to a
        queued run) and none waits for upstream runs: then each run of the queue, in its
        order, starts when the earliest worker frees up, or at its slot if that is later
        (the queue is in slot order, so a run's slot never holds back one behind it).
        A heap of the workers' free times instead of an event per run: a 100k-run day's
        estimate in a tenth of the time."""
        ended = [(run, end) for end, _, run in self.ends]  # the running runs
        free = [end for end, _, _ in self.ends] + [0.0] * self.idle
        heapq.heapify(free)
        expected = self.expected
        learned = self.learned
        # _push's queue order: slot, never timed first, longest first, then as given. The
        # runs are grouped by the first two (a day has a few groups), and each group put
        # longest first by a stable sort keyed by a list's __getitem__ (no Python call per
        # run: a third of the time of a tuple key).
        groups: dict[tuple[float, bool], list[EtaRun]] = {}
        for run in queued:
            groups.setdefault((slot_seconds[run.slot], run.series in learned), []).append(run)
        replace = heapq.heapreplace
        for (starts, _), group in sorted(groups.items(), key=lambda item: item[0]):
            seconds = [expected[run.series] for run in group]
            longest_first = sorted(range(len(group)), key=[-each for each in seconds].__getitem__)
            if starts < 0.0:
                starts = 0.0
            for index in longest_first:
                earliest = free[0]
                end = (earliest if earliest >= starts else starts) + seconds[index]
                replace(free, end)
                ended.append((group[index], end))
        return ended

    def _execute(self, run: EtaRun, end: float) -> None:
        self.seq += 1
        heapq.heappush(self.ends, (end, self.seq, run))
        for limit in self._limits_of(run):
            self.executing[limit] = self.executing.get(limit, 0) + 1
        self.idle -= 1

    def _limits_of(self, run: EtaRun) -> list[tuple[str, str]]:
        # Per task, once: the limits are set in __init__, and this is asked three times per run.
        found = self.task_limits.get(run.task)
        if found is None:
            spec = self.tasks.get(run.task, EtaTask())
            found = self.task_limits[run.task] = [limit for limit in (("task", run.task), ("pool", spec.pool or ""))
                                                  if limit in self.limits]
        return found

    def _push(self, run: EtaRun, since: float, starts: float, front: bool = False, heap: bool = True) -> None:
        self.seq += 1
        learned = run.series in self.learned
        entry = (0 if front else 1, since, learned, -self.expected[run.series], self.seq, run, starts)
        if heap:
            heapq.heappush(self.queue, entry)
        else:
            self.queue.append(entry)  # before the simulation starts, made a heap at once

    def _release_if_ready(self, task: str, clock: float) -> None:
        if task in self.waiting and all(self.left.get(up, 0) == 0 for up in self.tasks.get(task, EtaTask()).after):
            for run in self.waiting.pop(task):
                self._push(run, clock, clock)

    def _dispatch(self, clock: float) -> None:
        """Each idle worker takes the first run of the queue that may start now. The
        queue is in order of joining it, so a run whose slot has not come is the head
        only once every run ahead of it has been taken."""
        while self.idle > 0 and self.queue and self.queue[0][6] <= clock:
            run = heapq.heappop(self.queue)[5]
            full = [limit for limit in self._limits_of(run) if self.executing.get(limit, 0) >= self.limits[limit]]
            if full:
                self.held.setdefault(full[0], []).append(run)
                continue
            self._execute(run, clock + self.expected[run.series])

    def _ended(self, run: EtaRun, clock: float) -> None:
        task = run.task
        self.idle += 1
        self.left[task] -= 1
        self.ended.append((run, clock))
        for limit in self._limits_of(run):
            self.executing[limit] -= 1
            if self.held.get(limit):
                self._push(self.held[limit].pop(0), clock, clock, front=True)
        if self.left[task] == 0:
            for name, spec in self.tasks.items():
                if task in spec.after:
                    self._release_if_ready(name, clock)

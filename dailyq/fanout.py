"""Fan-out: turn runs into RQ jobs, each run at most once per day.

Every path that enqueues a run (the leader at a slot, ``trigger``, ``rerun``, a
second scheduler, a stale leader woken from a pause) goes through ``fan_out``; the
``trigger`` and ``rerun`` commands themselves, which choose the runs, are in
commands.py.
Idempotence comes from the day's *enqueued* set: a job id is pushed to the queue in
the same MULTI/EXEC that adds it to the set, under WATCH of that set, so two callers
racing for the same run cannot both enqueue it. A leader also WATCHes its lease and
checks it holds it before MULTI (fencing): a leader that lost the lease while paused
aborts instead of writing. We use WATCH/MULTI rather than a Lua script here so that
RQ itself writes its job hashes and queue entries, in whatever format RQ uses.

Work is batched: one transaction per chunk of runs, not one round trip per run.

With ``wait_replicas`` (DAILYQ_WAIT_REPLICAS, replicas.py) each chunk's EXEC is followed
by a WAIT: a chunk fewer replicas acknowledged raises ``ReplicasBehind`` (a RedisError),
so the leader does not move its cursor past the slot and fans it out again (a no-op for
what the enqueued set already has) rather than count on runs a failover may lose.

A run of a task with ``after`` is fanned out like any other (its job id enters the
enqueued set, its record is written) but *held*: recorded ``waiting`` and parked in the
day's waiting hash (``Parked``) instead of the RQ queue, in the same MULTI/EXEC, so it
occupies no worker. dependencies.py releases it (``job_data`` below) once its upstream
runs have finished; the caller of a fan-out that parked runs asks it at once
(``FanOutResult.waiting``), as the upstream runs may be done already.

The slot a once-a-day task (``Task.at``) is fanned out under on a day is recorded in the
day's slots hash (``keys.day_slots``, HSETNX: the first stays), in the same MULTI/EXEC,
once per task per chunk. Callers map their slots onto it (runs.DaySlots), so an ``at``
or ``tz`` edited after the slot ran does not run the day again; the chunk WATCHes that
hash and follows it too, so two callers with different tables racing for the day's
first fan-out still end with one slot (the loser's runs are mapped onto the winner's).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any, Mapping, Sequence

from redis import Redis, WatchError
from redis.client import Pipeline
from rq import Queue, Retry

from .errors import LeaseLost
from .keys import Keys
from .lease import Lease
from .replicas import ReplicaAcks, all_members
from .rq_seam import enqueue_fresh, job_entry
from .runs import QUEUED, WAITING, Run, day_slot_json, decode_day_slot
from .schedule import Slot
from .scripts import Scripts, scripts_for

log = logging.getLogger(__name__)

CHUNK_SIZE = 1000
DURATION_LOOKUP_CHUNK = 10_000


@dataclass(frozen=True)
class Requeued:
    """How a run enqueued before is enqueued once more, under a fresh job id: by recovery
    (the same run goes on) or by a user's rerun (``new_run``). Its record keeps its history
    (QUEUE_RECORDS)."""

    number: int  # gives the job a fresh id, {run_id}-r{number}
    rerun_id: str | None = None  # the run id the task sees (context.py): a user's rerun has its own
    new_run: bool = False  # a user's rerun: its attempts count from 1 again
    attempts_before: int = 0  # a user's rerun: the run's executions so far (``status`` goes on counting)
    retries: int | None = None  # RQ retries left for this job (recovery: what the attempt budget allows)


@dataclass
class FanOutResult:
    enqueued: list[str] = field(default_factory=list)  # job ids pushed now (or held, see ``waiting``)
    already: list[str] = field(default_factory=list)  # job ids some earlier call pushed
    waiting: list[str] = field(default_factory=list)  # of ``enqueued``: parked for their upstream runs


@dataclass(frozen=True)
class Parked:
    """A run parked for its upstream runs: what enqueueing it later needs (one entry of
    ``keys.day_waiting``). The run itself is rebuilt from the table by task and slot."""

    task: str
    param_json: str
    slot: str  # ISO, as Slot.isoformat()
    job_id: str
    force: bool = False
    at_front: bool = False
    again: Requeued | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Parked":
        data = json.loads(raw)
        again = data.pop("again", None)
        return cls(**data, again=Requeued(**again) if again else None)


def retry_policy(retries: int, backoff_s: int) -> Retry | None:
    """RQ retry with exponential backoff: backoff_s, 2*backoff_s, 4*backoff_s ..."""
    if retries <= 0:
        return None
    return Retry(max=retries, interval=[backoff_s * (2 ** i) for i in range(retries)])


@dataclass(frozen=True)
class FanOutOptions:
    """How one fan-out enqueues its runs: what ``fan_out`` hands down to each chunk and job.

    ``retention_s``: how long the day's records, sets and failed jobs live.
    ``fence``: enqueue only while this lease is held (raises LeaseLost otherwise).
    ``again`` maps run id -> how a run enqueued before is enqueued once more (a fresh job id).
    ``force``: the jobs run even if their run finished (a forced rerun).
    ``at_front``: jump the queue (recovered runs must not wait behind a whole day).
    ``hold_dependent``: hold the runs of tasks with ``after`` (see the module docstring);
    recovery passes False: a run that was executing had been released already.
    ``wait_replicas``: each chunk counts once that many replicas acknowledged it (else
    ReplicasBehind is raised; see the module docstring).
    """

    retention_s: int
    fence: Lease | None = None
    again: Mapping[str, Requeued] = field(default_factory=dict)
    force: bool = False
    at_front: bool = False
    hold_dependent: bool = True
    wait_replicas: int = 0


def fan_out(connection: Redis, keys: Keys, queue: Queue, runs: Sequence[Run], options: FanOutOptions) -> FanOutResult:
    """Enqueue each run not enqueued before (per job id), as ``options`` say; return what was done."""
    result = FanOutResult()
    by_day: dict[date, list[Run]] = defaultdict(list)
    for run in longest_first(connection, keys, runs):
        by_day[run.day].append(run)
    scripts = scripts_for(connection)
    acks = ReplicaAcks(connection, keys, options.wait_replicas)
    for day, day_runs in by_day.items():
        for start in range(0, len(day_runs), CHUNK_SIZE):
            chunk = day_runs[start:start + CHUNK_SIZE]
            # A big fan-out outlasts the lease TTL: renew between chunks (each chunk is
            # still fenced by its own WATCH of the lease).
            if options.fence is not None and start and not options.fence.renew():
                raise LeaseLost(f"leader lease {options.fence.key} is no longer ours")
            counts = len(result.enqueued), len(result.already)
            _fan_out_chunk(connection, keys, queue, day, chunk, options, scripts, result)
            if acks.on:  # the chunk's jobs, whoever enqueued them, on this server and its replicas
                job_ids = result.enqueued[counts[0]:] + result.already[counts[1]:]
                acks.confirm(f"the fan-out of {len(job_ids)} run(s) of {day.isoformat()}",
                             all_members(keys.day_enqueued(day), job_ids))
    return result


def longest_first(connection: Redis, keys: Keys, runs: Sequence[Run]) -> list[Run]:
    """Runs ordered longest expected duration first, runs never timed before first of all.

    Workers pull greedily from a FIFO queue, so this order turns the queue into LPT
    list scheduling: the long runs start early and the short ones fill the gaps at
    the end, which keeps the day's makespan close to max(total work / workers,
    longest run). Unknown durations go first because they may be the longest.

    A task limited to K runs at once (``max_running``) cannot finish sooner than its
    runs' work / K, however many workers are free: its backlog is the day's critical
    path when that is the longest. Each of its runs is ranked by that backlog (or its own
    duration, if longer), so the limited runs start first and keep their K slots busy
    while the other runs fill the remaining workers. (Runs over the limit cost nothing
    while they wait: a worker sets them aside, limits.py.)
    """
    if len(runs) < 2:
        return list(runs)
    series = list({run.series_id: None for run in runs})
    expected: dict[str, float] = {}
    for start in range(0, len(series), DURATION_LOOKUP_CHUNK):
        part = series[start:start + DURATION_LOOKUP_CHUNK]
        expected.update({s: float(v) for s, v in zip(part, connection.hmget(keys.durations, part)) if v is not None})
    backlog = limited_backlog_s(runs, expected)

    def rank(run: Run) -> tuple[bool, float, float]:
        own_s = expected.get(run.series_id, 0.0)
        task_backlog_s = backlog.get(run.task.name, 0.0)
        return run.series_id in expected, -max(own_s, task_backlog_s), -task_backlog_s

    # sorted() is stable: unknown runs keep the table's order among themselves.
    return sorted(runs, key=rank)


# Series whose durations one trim removes at most: a call stays short however many went stale.
TRIM_BATCH = 1000


def trim_durations(connection: Redis, keys: Keys, today: date, retention_days: int) -> int:
    """Forget the learned durations of series that no day fanned out for ``retention_days``
    (the fan-out notes each series' day in ``keys.durations_seen``). Returns how many went."""
    scripts = scripts_for(connection)
    removed = 0
    while True:
        gone = scripts.trim_durations(durations_key=keys.durations, seen_key=keys.durations_seen,
                                      oldest_kept_ordinal=today.toordinal() - retention_days,
                                      today_ordinal=today.toordinal(), batch=TRIM_BATCH).run()
        removed += gone
        if gone < TRIM_BATCH:
            return removed


def limited_backlog_s(runs: Sequence[Run], expected: dict[str, float]) -> dict[str, float]:
    """Task name -> its runs' expected work / max_running, for the limited tasks among
    ``runs``. A run never timed counts as its task's mean known duration, else 1 s: all
    that matters is how tasks compare."""
    limited = [run for run in runs if run.task.max_running]
    slots = {run.task.name: run.task.max_running or 1 for run in limited}
    known: dict[str, list[float]] = defaultdict(list)
    for run in limited:
        if run.series_id in expected:
            known[run.task.name].append(expected[run.series_id])
    work: dict[str, float] = defaultdict(float)
    for run in limited:
        timed = known[run.task.name]
        work[run.task.name] += expected.get(run.series_id, sum(timed) / len(timed) if timed else 1.0)
    return {name: total / slots[name] for name, total in work.items()}


def _fan_out_chunk(connection: Redis, keys: Keys, queue: Queue, day: date, chunk: list[Run],
                   options: FanOutOptions, scripts: Scripts, result: FanOutResult) -> None:
    retention_s, fence, force, at_front = options.retention_s, options.fence, options.force, options.at_front
    enqueued_key = keys.day_enqueued(day)
    runs_key = keys.day_runs(day)
    permits_key = keys.day_slots(day)
    once_names = list(dict.fromkeys(run.task.name for run in chunk if run.task.at is not None))
    given, given_again = chunk, options.again
    with connection.pipeline(transaction=True) as pipe:
        while True:
            try:
                watched = [enqueued_key] + ([permits_key] if once_names else []) + ([fence.key] if fence else [])
                pipe.watch(*watched)
                if fence is not None and pipe.get(fence.key) != fence.owner.encode():
                    raise LeaseLost(f"leader lease {fence.key} is no longer ours")
                stored = dict(zip(once_names, (decode_day_slot(raw) for raw in pipe.hmget(permits_key, once_names)))) \
                    if once_names else {}
                chunk, again = _follow_day_slots(day, given, given_again, stored) if stored else (given, given_again)
                job_ids = [run.job_id(again[run.run_id].number if run.run_id in again else 0) for run in chunk]
                present = pipe.smismember(enqueued_key, job_ids)
                fresh = [(run, job_id) for run, job_id, seen in zip(chunk, job_ids, present) if not seen]
                held = {run.run_id for run, _ in fresh if options.hold_dependent and run.task.after}
                pipe.multi()
                # Written only when a task has no entry yet, or runs are added (the hash lives as
                # long as the day's records): a chunk that adds nothing writes nothing.
                unset = {name for name, slot in stored.items() if slot is None}
                if unset or (fresh and stored):
                    first_slots: dict[str, str] = {}
                    for run in chunk:
                        if run.task.name in unset:
                            first_slots.setdefault(run.task.name, day_slot_json(run.slot))
                    for name, entry in first_slots.items():
                        pipe.hsetnx(permits_key, name, entry)
                    pipe.expire(permits_key, retention_s)
                if fresh:
                    pipe.sadd(enqueued_key, *[job_id for _, job_id in fresh])
                    pipe.expire(enqueued_key, retention_s)
                    # What keeps the learned durations bounded (scheduler.trim_durations).
                    pipe.zadd(keys.durations_seen, {run.series_id: day.toordinal() for run, _ in fresh}, gt=True)
                    # A run's first job (no rerun number) has no record yet: it is written whole.
                    # A run enqueued once more keeps its record (attempts, history).
                    scripts.queue_records(
                        runs_key=runs_key, retention_s=retention_s,
                        fresh=[(run.run_id, json.dumps(run.new_record(job_id, WAITING if run.run_id in held
                                                                      else QUEUED), ensure_ascii=False))
                               for run, job_id in fresh if run.run_id not in again],
                        again=[_requeued(run, job_id, again[run.run_id]) for run, job_id in fresh
                               if run.run_id in again]).queue_in(pipe)
                    enqueue_fresh(queue, [job_data(queue, run, job_id, retention_s, force, at_front,
                                                   again.get(run.run_id)) for run, job_id in fresh
                                          if run.run_id not in held], pipe)
                    if held:
                        _hold(pipe, keys, scripts, day, [(run, job_id) for run, job_id in fresh if run.run_id in held],
                              retention_s, again, force, at_front)
                pipe.execute()
            except WatchError:
                continue  # someone else enqueued for this day meanwhile: look again
            result.enqueued.extend(job_id for _, job_id in fresh)
            result.waiting.extend(job_id for run, job_id in fresh if run.run_id in held)
            result.already.extend(job_id for job_id, seen in zip(job_ids, present) if seen)
            return


def note_day_slot(connection: Redis, keys: Keys, slot: Slot, task_name: str, retention_s: int) -> None:
    """Record ``slot`` as the day's slot of a once-a-day task that fired without runs (a
    computed list that was empty or failed): its stored params entry is that slot's, so a
    schedule edit must map onto it as onto fanned-out runs. HSETNX: the first stays."""
    with connection.pipeline(transaction=True) as pipe:
        pipe.hsetnx(keys.day_slots(slot.day), task_name, day_slot_json(slot))
        pipe.expire(keys.day_slots(slot.day), retention_s)
        pipe.execute()


def _follow_day_slots(day: date, chunk: list[Run], again: Mapping[str, Requeued],
                      stored: dict[str, Slot | None]) -> tuple[list[Run], Mapping[str, Requeued]]:
    """The chunk with each once-a-day task's runs moved onto the slot stored for the day
    (when one is, and it differs), and ``again`` keyed by the moved runs' ids. Callers
    map slots themselves (runs.DaySlots): this is the net for one that raced another
    caller's first fan-out of the day, or did not map."""
    def target(run: Run) -> Slot | None:
        slot = stored.get(run.task.name) if run.task.at is not None else None
        return slot if slot is not None and slot.day == day and slot != run.slot else None

    moved = [run for run in chunk if target(run) is not None]
    if not moved:  # the usual case: the caller mapped (or nothing is stored yet)
        return chunk, again
    out: dict[str, Run] = {}  # by run id: a run given on both slots is fanned out once
    followed = dict(again)
    for run in chunk:
        slot = target(run)
        if slot is None:
            out.setdefault(run.run_id, run)
            continue
        follower = Run(run.task, run.param, slot)
        if run.run_id in followed:
            followed.setdefault(follower.run_id, followed[run.run_id])
        out.setdefault(follower.run_id, follower)
    for name in sorted({run.task.name for run in moved}):
        log.warning("task %s: %s's runs use slot %s (fanned out first that day); runs for another slot of it "
                    "were mapped onto it", name, day.isoformat(), stored[name].isoformat())  # type: ignore[union-attr]
    return list(out.values()), followed


def _hold(pipe: Pipeline, keys: Keys, scripts: Scripts, day: date, held: list[tuple[Run, str]], retention_s: int,
          again: Mapping[str, Requeued], force: bool, at_front: bool) -> None:
    """Park parked runs in the day's waiting hash (queued in the chunk's MULTI). A run
    enqueued before keeps its record, which QUEUE_RECORDS just marked queued: 'waiting' now."""
    waiting_key = keys.day_waiting(day)
    pipe.hset(waiting_key, mapping={
        run.run_id: Parked(run.task.name, run.param_json, run.slot.isoformat(), job_id, force, at_front,
                         again.get(run.run_id)).to_json() for run, job_id in held})
    pipe.expire(waiting_key, retention_s)
    # The hint a release reads instead of the waiting hash (dependency_counts.py): at least
    # this many runs of the task are held. A run parked again counts twice; the release
    # that finds fewer writes the exact number.
    deps_key = keys.day_deps(day)
    for task_name, n in Counter(run.task.name for run, _ in held).items():
        pipe.hincrby(deps_key, f"held:{task_name}", n)
    pipe.expire(deps_key, retention_s)
    pipe.sadd(keys.waiting_days, day.isoformat())
    requeued = [run.run_id for run, _ in held if run.run_id in again]
    if requeued:
        scripts.set_run_state(runs_key=keys.day_runs(day), retention_s=retention_s, state=WAITING,
                              run_ids=requeued).queue_in(pipe)


def _requeued(run: Run, job_id: str, again: Requeued) -> tuple[str, str, str, Requeued]:
    """A run enqueued once more as QUEUE_RECORDS takes it: queued again under ``job_id``,
    the one job of the run that may execute (older ones are skipped as superseded)."""
    return run.run_id, json.dumps(run.new_record(job_id), ensure_ascii=False), job_id, again


def job_data(queue: Queue, run: Run, job_id: str, retention_s: int, force: bool, at_front: bool,
             again: Requeued | None = None) -> Any:
    """What ``Queue.enqueue_many`` takes for one run's job (also dependencies.py's, at release)."""
    task = run.task
    retries = task.retries if again is None or again.retries is None else again.retries
    return job_entry(
        queue,
        task.func_path,
        args=(run.param,),
        job_id=job_id,
        timeout=task.timeout_s,
        # No result_ttl: the worker's default applies (DAILYQ_JOB_TTL_S, worker.py), so a
        # finished job lives as long as the node that ran it says, not as the day records.
        # A failed job stays as long as the day records: rq-dashboard shows it beside
        # ``status``, and the leader settles a run from RQ's failed registry (settle.py).
        failure_ttl=retention_s,
        description=f"{task.name}({run.param_json}) slot {run.slot.isoformat()}",
        meta=run.job(job_id, force=force, rerun_id=again.rerun_id if again else None).meta(),
        retry=retry_policy(retries, task.retry_backoff_s),
        at_front=at_front,
    )

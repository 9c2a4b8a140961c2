"""A run's identity and its record.

A run is (task, param, slot): ``Run``, the one identity every module uses -- fan-out
makes them from the table, the worker rebuilds them from a job (``RunJob.from_job``),
status, watch and report show them. Its id is deterministic, so every enqueue of the
same run, from any node, names the same thing; RQ job ids allow only [A-Za-z0-9_-],
so the param is hashed into the id and stored in full in the record.

``RunJob`` is one RQ job of a run: the run plus what that job was enqueued with (its
job id, force, a rerun's own id, the attempt budget). Its ``meta()`` is what the job
carries and ``from_job`` reads it back: the one place the job meta format lives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from functools import cached_property
from typing import Any, Iterable, Mapping, Protocol, Sequence, TypedDict

from .errors import ConfigError
from .keys import Keys
from .redis_values import as_text
from .schedule import Slot, parse_zone
from .table import DIGEST_LENGTH, Task, TaskTable, encode_param, param_digest  # noqa: F401 - named here too

# Run states shown by ``status``; a public contract.
SCHEDULED, QUEUED, RUNNING, FINISHED, FAILED, SKIPPED, MISSED = (
    "scheduled", "queued", "running", "finished", "failed", "skipped", "missed")
# A run of a task with ``after`` whose upstream runs have not all finished; ``blocked``:
# one of them failed (dependencies.py).
WAITING, BLOCKED = "waiting", "blocked"
# A queued run of a paused task (pausing.py): shown so by status, stored as queued.
PAUSED = "paused"
# A run no live node's table has had for longer than DAILYQ_REMOVED_GRACE_S: a deploy
# took its task, param or function away (deploys.py). Final, like finished: not failed,
# no alert, and its downstream runs go on as if it had finished.
REMOVED = "removed"
# A run stopped or kept from starting by ``cancel`` (cancelling.py): final like failed (no
# retry, its downstream runs blocked) until a ``rerun``; its error says who cancelled it.
CANCELLED = "cancelled"
STATES = (SCHEDULED, QUEUED, RUNNING, FINISHED, FAILED, SKIPPED, MISSED, WAITING, BLOCKED, PAUSED, REMOVED,
          CANCELLED)

META_KEY = "dailyq"  # the RQ job.meta entry that carries a run's identity
# What an execution returns to RQ when its copy stopped because its claim was gone and
# recorded nothing (guard.py; the worker then checks the run is not lost, rq_seam.py).
CLAIM_LOST_RESULT = {"skipped": "claim lost"}


@dataclass(frozen=True)
class Run:
    task: Task
    param: Any
    slot: Slot

    # Cached: a fan-out of 100k runs asks for each of these several times per run.
    @cached_property
    def param_json(self) -> str:
        return encode_param(self.param)

    @cached_property
    def run_id(self) -> str:
        return f"{self.task.name}-{self.slot.label}-{param_digest(self.param_json)}"

    @cached_property
    def series_id(self) -> str:
        """Same (task, param) across days: the key for learned durations and overlap."""
        return f"{self.task.name}-{param_digest(self.param_json)}"

    @property
    def day(self) -> date:
        return self.slot.day

    def job_id(self, rerun: int = 0) -> str:
        return self.run_id if rerun == 0 else f"{self.run_id}-r{rerun}"

    def job(self, job_id: str, force: bool = False, rerun_id: str | None = None) -> "RunJob":
        """A job of this run, with the task's attempt budget (retries + 1)."""
        return RunJob(self, job_id, force=force, rerun_id=rerun_id, max_attempts=self.task.retries + 1)

    def new_record(self, job_id: str | None, state: str = QUEUED) -> "RunRecord":
        return new_record(self.task.name, self.param_json, self.slot.isoformat(), job_id, state)


class StaleJob(ConfigError):
    """A job whose run the task table no longer describes (task gone, or renamed)."""


@dataclass(frozen=True)
class RunJob:
    """One RQ job of a run: what the guard executes and records."""

    run: Run
    job_id: str
    force: bool = False
    # The id the task sees: a user's rerun has its own, else the run's (context.py).
    rerun_id: str | None = None
    # retries + 1 when enqueued: executions allowed before the run is failed (0: no limit).
    max_attempts: int = 0

    def meta(self) -> dict[str, Any]:
        """The job's ``meta`` entry. ``run_id``, ``day``, ``series`` and ``overlap`` are
        not read back (``from_job`` derives them from the table) but are kept for people
        and tools that read jobs in rq-dashboard or Redis."""
        run = self.run
        meta: dict[str, Any] = {"run_id": run.run_id, "day": run.day.isoformat(), "task": run.task.name,
                                "slot": run.slot.isoformat(), "series": run.series_id, "force": self.force,
                                "overlap": run.task.overlap, "tz": run.slot.zone, "max_attempts": self.max_attempts}
        if self.rerun_id:
            meta["rerun_id"] = self.rerun_id
        return {META_KEY: meta}

    @classmethod
    def from_job(cls, job: Any, table: TaskTable) -> "RunJob | None":
        """The run job an RQ job carries, or None for an ad-hoc job (no dailyq meta).
        Raises StaleJob when the table cannot rebuild the same run (its id differs)."""
        meta = (job.meta or {}).get(META_KEY)
        if not meta:
            return None
        try:
            task = table.get(meta["task"])
            slot = Slot.from_iso(meta["slot"], meta.get("tz") or task.tz)
        except (ConfigError, KeyError, ValueError) as exc:
            raise StaleJob(f"job {job.id}: its run is not one of the task table's ({exc})") from None
        run = Run(task, job.args[0] if job.args else None, slot)
        if run.run_id != meta.get("run_id"):
            # Never execute under an id the records do not use: its guard would miss them.
            raise StaleJob(f"job {job.id}: run id {meta.get('run_id')!r} does not match its task, slot and param "
                           f"({run.run_id!r}); enqueue runs with trigger or rerun")
        return cls(run, job.id, force=bool(meta.get("force")), rerun_id=meta.get("rerun_id"),
                   max_attempts=int(meta.get("max_attempts") or 0))

    # The run's identity, as the guard's scripts and logs name it.
    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def task(self) -> Task:
        return self.run.task

    @property
    def param(self) -> Any:
        return self.run.param

    @property
    def slot(self) -> Slot:
        return self.run.slot

    @property
    def day(self) -> date:
        return self.run.day

    @property
    def series(self) -> str:
        return self.run.series_id

    @property
    def param_json(self) -> str:
        return self.run.param_json

    @property
    def context_run_id(self) -> str:
        return self.rerun_id or self.run.run_id

    @cached_property
    def base_record(self) -> str:
        """JSON of the record to start from if the run has none (sent with every script)."""
        return json.dumps(self.run.new_record(self.job_id), ensure_ascii=False)


class RunRecord(TypedDict, total=False):
    """A run's record: JSON, one field of the day's runs hash (keys.day_runs), so a
    whole day is one HGETALL. The one schema of it: ``new_record`` starts every record
    with the first group; the Lua in scripts/ (fan-out, guard, recovery) sets only
    these fields (tests/test_runs.py reads the field names out of the scripts);
    ``status`` shows ``PUBLIC_RUN_FIELDS`` of it."""

    # Set for every record from the start.
    task: str
    param_json: str  # canonical JSON of the param (table.encode_param)
    slot: str  # ISO 8601 with the task zone's offset
    state: str  # one of STATES
    node: str | None  # the node of the last execution (or of the skip)
    started_at: str | None  # ISO, Redis clock: the last execution's start
    ended_at: str | None
    attempts: int  # executions ever (``status`` goes on counting across reruns)
    error: str | None  # why the last execution failed, or why the run is skipped
    job_id: str | None  # the one job of the run that may execute (older ones are superseded)
    # Set by the guard while and after the run executes.
    owner: str  # owner token of the claim of the last execution
    # Its fencing token (context.RunContext.fence), as decimal digits: a token has 16, and
    # Redis's cjson writes numbers with 14 (older records hold a number).
    fence: str
    duration_s: float  # of the execution that finished it
    # Set by a user's rerun: a new run, counted afresh from here.
    attempts_before: int
    rerun_id: str | None
    # Only on the stand-in record ``status`` shows for a computed slot whose params
    # callable failed (params_book.placeholder_record): when it is tried again.
    next_try_at: str | None
    # Not stored: decode_record adds the param itself.
    param: Any


RECORD_FIELDS: tuple[str, ...] = tuple(RunRecord.__annotations__)
# What ``status`` shows of a record (a public contract: add, never rename), besides the
# run id it is stored under.
PUBLIC_RUN_FIELDS = ("task", "param", "state", "node", "started_at", "ended_at", "attempts", "error", "slot",
                     "job_id", "duration_s")


def new_record(task: str, param_json: str, slot: str, job_id: str | None, state: str = QUEUED) -> RunRecord:
    """The record of a run nothing has happened to yet: the one shape every writer starts from."""
    return {"task": task, "param_json": param_json, "slot": slot, "state": state, "node": None,
            "started_at": None, "ended_at": None, "attempts": 0, "error": None, "job_id": job_id}


class ParamsLookup(Protocol):
    """Where computed params are read from (params_book.ParamsBook): the list stored for a
    task's slot, or None while nothing (or only a failure) is stored."""

    def params_of(self, task: Task, slot: Slot) -> Sequence[Any] | None: ...


def slot_params(task: Task, slot: Slot, book: ParamsLookup | None = None) -> Sequence[Any]:
    """The params of one slot: a fixed list as it is; a computed one as stored for that
    slot, and none while nothing is stored (never called here: only the leader, trigger
    and rerun call a params callable, params_book.py)."""
    if not task.params_computed:
        return task.params  # type: ignore[return-value]
    stored = book.params_of(task, slot) if book is not None else None
    return stored or ()


class DaySlots:
    """The once-a-day slots fanned out on one day (``keys.day_slots``), read once.

    The rule a schedule edit keeps: *the runs of a once-a-day task (``Task.at``) on day D
    use the slot first fanned out for D.* A run's id names its slot, so without this,
    moving ``at`` from 03:00 to 05:00 (or changing ``tz``) after 03:00 ran would make the
    05:00 slot a new set of runs and run the day again. fan_out records the slot it
    used (HSETNX: the first stays); every path that builds a day's runs from the table
    maps the task's slot on D through ``slot_of`` (or ``permits_on``): the leader at the
    new slot time (which then finds every run enqueued), trigger, rerun, status,
    alerts, dependencies, metrics, params_book. Cron tasks (several slots a day) are
    never mapped: each slot is its own set of runs."""

    def __init__(self, day: date, stored: Mapping[str, Slot] | None = None) -> None:
        self.day = day
        self.stored: dict[str, Slot] = dict(stored or {})

    @classmethod
    def read(cls, connection: Any, keys: Keys, day: date) -> "DaySlots":
        # ``connection``: a redis.Redis (or pipeline), not named here: runs.py stays pure.
        return cls.decode(day, connection.hgetall(keys.day_slots(day)))

    @classmethod
    def read_days(cls, connection: Any, keys: Keys, days: Iterable[date]) -> "dict[date, DaySlots]":
        """Several days at once (one round trip): the leader's due slots may span two."""
        wanted = sorted(set(days))
        if not wanted:
            return {}
        with connection.pipeline(transaction=False) as pipe:
            for day in wanted:
                pipe.hgetall(keys.day_slots(day))
            replies = pipe.execute()
        return {day: cls.decode(day, raw) for day, raw in zip(wanted, replies)}

    @classmethod
    def decode(cls, day: date, raw: Mapping[Any, Any]) -> "DaySlots":
        stored: dict[str, Slot] = {}
        for name, value in raw.items():
            slot = decode_day_slot(value)
            # An entry that does not name a slot of this very day is not ours to follow.
            if slot is not None and slot.day == day:
                stored[as_text(name)] = slot
        return cls(day, stored)

    def slot_of(self, task: Task, slot: Slot) -> Slot:
        """The slot the day's runs of ``task`` use for the table's ``slot``: for a once-a-day
        task, the one first fanned out that day, if there was one (zone included: a ``tz``
        changed after the slot ran keeps the old one); else ``slot`` itself."""
        if task.at is None or slot.day != self.day:
            return slot
        return self.stored.get(task.name, slot)

    def due_at(self, task: Task, slot: Slot) -> datetime:
        """When the leader fans out a run of ``slot`` (one ``slot_of`` gave) that is not
        fanned out yet: at the later of the stored slot and the table's own slot that day,
        which the leader maps onto the stored one when it comes."""
        if task.at is None or slot.day != self.day or self.stored.get(task.name) != slot:
            return slot.fires_at
        return max([slot.fires_at] + [own.fires_at for own in task.schedule.permits_on(self.day)])

    def permits_on(self, task: Task) -> list[Slot]:
        """The task's slots on this day, each as ``slot_of`` maps it."""
        return [self.slot_of(task, slot) for slot in task.schedule.permits_on(self.day)]


def day_slot_json(slot: Slot) -> str:
    """One ``keys.day_slots`` entry: the slot as in run records, and its zone."""
    return json.dumps({"slot": slot.isoformat(), "tz": slot.zone})


def decode_day_slot(raw: bytes | str | None) -> Slot | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        zone = str(data["tz"])
        parse_zone(zone)  # a zone this host does not know names no slot it can use
        return Slot.from_iso(str(data["slot"]), zone)
    except (ValueError, KeyError, TypeError):
        return None


def task_slots_on(task: Task, day: date, slots: DaySlots | None = None) -> list[Slot]:
    """``task``'s slots on ``day``, mapped through the day's stored slots when given."""
    if slots is None or slots.day != day:
        return task.schedule.permits_on(day)
    return slots.permits_on(task)


def runs_on(table: TaskTable, day: date, task_names: Iterable[str] | None = None,
            book: ParamsLookup | None = None, slots: DaySlots | None = None) -> list[Run]:
    """Every run whose slot falls on ``day`` (each task's own zone), in firing order.
    ``slots``: the day's stored once-a-day slots (``DaySlots``), which the runs then use."""
    tasks = [table.get(n) for n in task_names] if task_names else table.tasks
    runs = [run for task in tasks for slot in task_slots_on(task, day, slots) for run in runs_of_slot(task, slot, book)]
    return sorted(runs, key=lambda r: r.slot.fires_at)


def runs_of_slot(task: Task, slot: Slot, book: ParamsLookup | None = None) -> list[Run]:
    if task.params_computed:
        return [Run(task, param, slot) for param in slot_params(task, slot, book)]
    runs = []
    for param, encoded in zip(task.params, task.encoded_params):  # type: ignore[arg-type]
        run = Run(task, param, slot)
        run.__dict__["param_json"] = encoded  # what its cached_property would compute, encoded once per task
        runs.append(run)
    return runs


@dataclass(frozen=True)
class SlotRuns:
    """The runs of one slot of one task, without a ``Run`` per param: what ``status``
    builds a day of 100k runs from (a ``Run`` each, its JSON and its SHA-1, cost a
    second of it). Index i of ``params``, ``params_json`` and ``run_ids`` is one run,
    the one ``Run(task, params[i], slot)`` names."""

    task: Task
    slot: Slot
    params: Sequence[Any]
    params_json: Sequence[str]
    run_ids: list[str]


def slot_runs_on(table: TaskTable, day: date, task_names: Iterable[str] | None = None,
                 book: ParamsLookup | None = None, slots: DaySlots | None = None) -> list[SlotRuns]:
    """``runs_on``'s runs, one ``SlotRuns`` per (task, slot), in the same order (firing
    order; ties in the table's order): a fixed list's ids are made from the digests
    its task keeps (Task.param_digests)."""
    tasks = [table.get(n) for n in task_names] if task_names else table.tasks
    found = []
    for task in tasks:
        for slot in task_slots_on(task, day, slots):
            if task.params_computed:
                params: Sequence[Any] = slot_params(task, slot, book)
                params_json: Sequence[str] = [encode_param(param) for param in params]
                digests: Sequence[str] = [param_digest(encoded) for encoded in params_json]
            else:
                params, params_json, digests = task.params, task.encoded_params, task.param_digests  # type: ignore[assignment]
            prefix = f"{task.name}-{slot.label}-"
            found.append(SlotRuns(task, slot, params, params_json, [prefix + digest for digest in digests]))
    return sorted(found, key=lambda group: group.slot.fires_at)


def decode_record(raw: bytes | str) -> RunRecord:
    record: RunRecord = json.loads(raw)
    record["param"] = json.loads(record.get("param_json", "null"))
    return record


def decode_records(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """A day's run records as HGETALL gives them (run id -> JSON), each decoded as
    ``json.loads`` would (``param`` not added). The values are parsed as one JSON array
    (a record is one JSON object, so joining them with commas makes one): on a day of
    100k records that takes half the time of a call per record. When the joined text does
    not give one object per field (a field holding something else), each is decoded on
    its own, as before (what does not parse raises)."""
    values = list(raw.values())
    if values and all(type(value) is bytes for value in values) and all(type(name) is bytes for name in raw):
        # The run ids too in one call ([A-Za-z0-9_-]: a field with a newline splits apart and
        # is decoded on its own below).
        run_ids = b"\n".join(raw).decode().split("\n")
        try:
            decoded = json.loads(b"[" + b",".join(values) + b"]")
        except ValueError:
            decoded = None
        if (len(run_ids) == len(values) and isinstance(decoded, list) and len(decoded) == len(values)
                and all(type(record) is dict for record in decoded)):
            return dict(zip(run_ids, decoded))
    return {as_text(run_id): json.loads(value) for run_id, value in raw.items()}


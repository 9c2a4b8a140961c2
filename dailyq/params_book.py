"""Computed params: the list a task's params callable gave for one slot, kept with the day.

A task whose ``params`` is a callable (or its dotted path) has no list in the table.
The list is made when the slot fires and stored in the day's params hash
(``Keys.day_params``, kept as long as the day's run records), one field per (task,
slot). Everyone else reads the stored list through ``ParamsBook`` (status, report,
trigger, rerun, alerts, metrics), so a day's runs stay what they were whatever the
callable would answer later, and a rerun runs again what ran.

When the callable is called:

* by the leader when the slot fires (``slot_runs``), only if nothing is stored for the
  slot yet: a new leader firing a slot again (its cursor was not saved) reuses the list;
* by the leader on a later tick (``retry_due``) when it failed: after
  ``retry_backoff_s * 2**n`` by the scheduler's clock (Redis's), until ``retries + 1``
  attempts were made, then the slot stays failed;
* by ``trigger`` and ``rerun`` of a day with nothing, or only a failure, stored;
* by ``rerun --refresh-params``, always: the new list replaces the stored one (a
  refresh that fails keeps the old list and says why).

Every write is one Lua check-and-set (``scripts.params.PARAMS_STORE``): a stored list is replaced only by
a refresh, a failure only by a later attempt or by a list. Two callers racing (the
leader at the slot and a user's ``trigger``) thus end with one stored list and both
fan out that one; the callable may have been called by both (only what is stored is
once-only).

What ``status`` shows for a computed slot with no list: its runs are not known yet,
so ONE entry stands for the slot, run id ``{task}-{slot label}-params``, param null:
``scheduled`` (or ``missed`` past the misfire grace) while nothing is stored, ``failed``
with the callable's error and attempts while a failure is (also between retries).

Entries, as JSON: a list ``{"task", "slot", "params": [...], "at"}``; a failure
``{"task", "slot", "error", "attempts", "max_attempts", "next_try_at", "at"}`` (no
``params`` key: the Lua tells the two apart by it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Literal

from redis import Redis

from .errors import DailyqError, LeaseLost
from .keys import Keys
from .lease import Lease
from .redis_values import as_text
from .runs import FAILED, MISSED, SCHEDULED, DaySlots, Run, RunRecord, new_record, runs_of_slot, task_slots_on
from .schedule import Slot
from .scripts import scripts_for
from .table import Task, TaskTable
from .timestamps import iso

# Which stored entry a caller accepts instead of calling the callable:
# "unset" calls it only when nothing is stored (the leader at the slot);
# "failed" also when a failure is stored (retries, trigger, rerun);
# "always" calls it whatever is stored (rerun --refresh-params).
When = Literal["unset", "failed", "always"]


class ParamsFailed(DailyqError):
    """A params callable failed where a user asked for its list (``rerun``): one line, exit 1."""


@dataclass(frozen=True)
class SlotParams:
    """What is stored for one (task, slot): a list, or a failure."""

    task: str
    slot: str  # the slot, ISO with its zone's offset (as in run records)
    params: list[Any] | None = None
    error: str | None = None
    attempts: int = 0  # calls that failed so far
    max_attempts: int = 0
    next_try_at: str | None = None  # ISO; None once the retries are used up
    at: str | None = None  # when it was stored

    @property
    def ok(self) -> bool:
        return self.params is not None

    def encode(self) -> str:
        fields = asdict(self)
        if self.ok:
            return json.dumps({k: fields[k] for k in ("task", "slot", "params", "at")}, ensure_ascii=False)
        fields.pop("params")  # absent, not null: PARAMS_STORE tells a failure by the missing key
        return json.dumps(fields, ensure_ascii=False)

    @classmethod
    def decode(cls, raw: bytes | str) -> "SlotParams":
        data = json.loads(raw)
        return cls(task=str(data.get("task")), slot=str(data.get("slot")), params=data.get("params"),
                   error=data.get("error"), attempts=int(data.get("attempts") or 0),
                   max_attempts=int(data.get("max_attempts") or 0), next_try_at=data.get("next_try_at"),
                   at=data.get("at"))


def field_of(task: Task, slot: Slot) -> str:
    return f"{task.name}|{slot.label}"


def params_run_id(task: Task, slot: Slot) -> str:
    """The id of the one entry ``status`` shows for a computed slot without a list."""
    return f"{task.name}-{slot.label}-params"


def _retry_member(task: Task, slot: Slot) -> str:
    return f"{slot.day.isoformat()}|{task.name}|{slot.label}"


class ParamsBook:
    """One day's stored params, read once (one HGETALL); a ``runs.ParamsLookup``."""

    def __init__(self, day: date, entries: dict[str, SlotParams]) -> None:
        self.day = day
        self.entries = entries

    @classmethod
    def read(cls, connection: Redis, keys: Keys, day: date) -> "ParamsBook":
        raw = connection.hgetall(keys.day_params(day))
        return cls(day, {as_text(k): SlotParams.decode(v)
                         for k, v in raw.items()})

    def entry(self, task: Task, slot: Slot) -> SlotParams | None:
        return self.entries.get(field_of(task, slot))

    def params_of(self, task: Task, slot: Slot) -> list[Any] | None:
        found = self.entry(task, slot)
        return found.params if found is not None else None

    def fired_slots(self) -> set[tuple[str, str]]:
        """(task, slot) of every entry: a slot whose callable was called has fired, even
        when it gave an empty list or failed (no run record says so)."""
        return {(entry.task, entry.slot) for entry in self.entries.values()}

    def placeholders(self, table: TaskTable, day: date, now: datetime, task_names: Iterable[str] | None = None,
                     slots: DaySlots | None = None) -> list[tuple[Slot, str, RunRecord]]:
        """(slot, run id, record) of the one entry shown per computed slot without a list.
        ``slots``: the day's stored once-a-day slots, which the entries are then of."""
        tasks = [table.get(n) for n in task_names] if task_names else table.tasks
        shown = []
        for task in tasks:
            if not task.params_computed:
                continue
            for slot in task_slots_on(task, day, slots):
                entry = self.entry(task, slot)
                if entry is not None and entry.ok:
                    continue
                shown.append((slot, params_run_id(task, slot), placeholder_record(task, slot, entry, now)))
        return shown


def placeholder_record(task: Task, slot: Slot, entry: SlotParams | None, now: datetime) -> RunRecord:
    if entry is None:
        overdue = now - slot.fires_at > timedelta(seconds=task.misfire_grace_s)
        record = new_record(task.name, "null", slot.isoformat(), None, MISSED if overdue else SCHEDULED)
    else:
        record = new_record(task.name, "null", slot.isoformat(), None, FAILED)
        record["error"], record["attempts"] = entry.error, entry.attempts
        record["ended_at"], record["next_try_at"] = entry.at, entry.next_try_at
    record["param"] = None
    return record


def read_entry(connection: Redis, keys: Keys, task: Task, slot: Slot) -> SlotParams | None:
    raw = connection.hget(keys.day_params(slot.day), field_of(task, slot))
    return SlotParams.decode(raw) if raw is not None else None


def settle(connection: Redis, keys: Keys, task: Task, slot: Slot, now: datetime, retention_s: int, *,
           when: When, fence: Lease | None = None, keep_retry: bool = False) -> SlotParams:
    """The params of ``task``'s ``slot``: the stored entry when ``when`` accepts it, else
    the callable's answer (or its failure), stored; returns what is stored afterwards,
    which is another caller's list when one got there first. A fixed list is returned
    as it is, nothing stored. Raises LeaseLost when ``fence`` is no longer held.
    ``keep_retry``: a list stored now leaves the slot's retry entry due (the retry path:
    the entry goes only once the runs are fanned out, ``retried``)."""
    if not task.params_computed:
        return SlotParams(task.name, slot.isoformat(), params=list(task.params))  # type: ignore[arg-type]
    current = read_entry(connection, keys, task, slot)
    if current is not None and (when == "unset" or (when == "failed" and current.ok)):
        return current
    failed_before = current.attempts if current is not None and not current.ok else 0
    try:
        entry = SlotParams(task.name, slot.isoformat(), params=task.compute_params(slot.day), at=iso(now))
    except ValueError as exc:
        if when == "always" and current is not None and current.ok:
            # A refresh that failed: the list the day's runs were made from stays.
            raise ParamsFailed(f"{exc}; task {task.name!r} keeps its stored list of {len(current.params or [])} "
                               f"params for slot {slot.isoformat()}") from None
        attempts = failed_before + 1
        max_attempts = task.retries + 1
        # The same backoff as a failed run's (fanout.retry_policy): backoff, 2*backoff, ...
        next_try = now + timedelta(seconds=task.retry_backoff_s * 2 ** (attempts - 1)) \
            if attempts < max_attempts else None
        entry = SlotParams(task.name, slot.isoformat(), error=str(exc), attempts=attempts,
                           max_attempts=max_attempts, next_try_at=iso(next_try), at=iso(now))
    else:
        next_try = now if keep_retry else None
    if fence is not None and not fence.acquire_or_renew():
        # The callable may outlast the lease (3 s by default): renewed here, before the
        # store it fences; lost only if another scheduler took the lease meanwhile.
        raise LeaseLost(f"leader lease {keys.leader} is no longer ours")
    return store(connection, keys, task, slot, entry, retention_s, replace=when == "always" and entry.ok,
                 next_try=next_try, fence=fence)


def store(connection: Redis, keys: Keys, task: Task, slot: Slot, entry: SlotParams, retention_s: int, *,
          replace: bool = False, next_try: datetime | None = None, fence: Lease | None = None) -> SlotParams:
    """Store ``entry`` unless PARAMS_STORE's rules keep what is there; returns what is stored."""
    stored, raw = scripts_for(connection).params_store(
        params_key=keys.day_params(slot.day), retries_key=keys.params_retries, lease_key=keys.leader,
        field=field_of(task, slot), entry_json=entry.encode(), retention_s=retention_s, replace=replace,
        retry_member=_retry_member(task, slot),
        next_try_ms=None if next_try is None else int(next_try.timestamp() * 1000),
        fence_owner=fence.owner if fence is not None else None).run()
    if not stored and raw == "lease":
        raise LeaseLost(f"leader lease {keys.leader} is no longer ours")
    return SlotParams.decode(raw)


def slot_runs(connection: Redis, keys: Keys, task: Task, slot: Slot, now: datetime, retention_s: int,
              fence: Lease | None = None) -> list[Run]:
    """The runs the leader fans out when ``slot`` fires: a computed task's list is made
    now if nothing is stored yet, else the stored one is used (none while it failed:
    ``retry_due`` takes over)."""
    if not task.params_computed:
        return runs_of_slot(task, slot)
    entry = settle(connection, keys, task, slot, now, retention_s, when="unset", fence=fence)
    return [Run(task, param, slot) for param in entry.params or ()]


def next_retry_at(connection: Redis, keys: Keys) -> datetime | None:
    """When the earliest failed params callable is due to be called again, if any."""
    earliest = connection.zrange(keys.params_retries, 0, 0, withscores=True)
    if not earliest:
        return None
    return datetime.fromtimestamp(float(earliest[0][1]) / 1000, tz=timezone.utc)


def retry_due(connection: Redis, keys: Keys, table: TaskTable, now: datetime, retention_s: int,
              fence: Lease | None = None) -> list[Run]:
    """Call again the params callables whose retry is due; the runs of those that now
    gave a list, to fan out. Their retry entries stay due until ``retried`` is called
    after the fan-out: a fan-out that fails (lease lost, Redis gone, the leader killed)
    is done by the next look, from the stored list. One ZRANGEBYSCORE per tick when
    nothing is due."""
    due = connection.zrangebyscore(keys.params_retries, "-inf", int(now.timestamp() * 1000))
    runs: list[Run] = []
    day_slots: dict[str, DaySlots] = {}
    for raw in due:
        member = as_text(raw)
        found = _slot_of(table, member, connection, keys, day_slots)
        if found is None:  # the task left the table (or the member is not ours): forget it
            connection.zrem(keys.params_retries, member)
            continue
        task, slot = found
        entry = settle(connection, keys, task, slot, now, retention_s, when="failed", fence=fence, keep_retry=True)
        runs += [Run(task, param, slot) for param in entry.params or ()]
        if (entry.ok and not entry.params) or (not entry.ok and entry.next_try_at is None):
            connection.zrem(keys.params_retries, member)  # nothing to fan out, or no attempt left
    return runs


def retried(connection: Redis, keys: Keys, runs: Iterable[Run]) -> None:
    """``retry_due``'s runs are fanned out: their slots need no retry any more."""
    members = {_retry_member(run.task, run.slot) for run in runs}
    if members:
        connection.zrem(keys.params_retries, *members)


def _slot_of(table: TaskTable, member: str, connection: Redis, keys: Keys,
             day_slots: dict[str, DaySlots]) -> tuple[Task, Slot] | None:
    """The (task, slot) a retry member names. A once-a-day task's slot is the one its day
    was fanned out under (runs.DaySlots), which an ``at`` moved since no longer names."""
    day_text, _, rest = member.partition("|")
    name, _, label = rest.partition("|")
    task = table.by_name.get(name)
    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        return None
    if task is None or not task.params_computed:
        return None
    if task.at is not None and day_text not in day_slots:
        day_slots[day_text] = DaySlots.read(connection, keys, day)
    slots = task_slots_on(task, day, day_slots.get(day_text))
    return next(((task, slot) for slot in slots if slot.label == label), None)

"""What happened on a day: every run's state, plus the current leader and the live nodes.

Expected runs come from the task table; what happened comes from the day's run
records (one HGETALL). A run with no record is ``scheduled`` until its slot is older
than the task's misfire grace, then ``missed`` (only ``trigger`` runs it then).
The live nodes are every scheduler and worker with a heartbeat (beats.py), each with
its clock's offset from Redis's (and, for a node's worker, how many worker processes
run there); ``clock_warnings`` names those more than 2 s off.
``paused`` maps each paused task to ``{"since", "by"}`` (pausing.py), and a queued run of
a paused task shows ``paused``; a run held back by a limit of its task stays ``queued``.
``tables`` says which live process runs which task table and what differs from the
leader's (table_skew.py's view, read by table_watch.read_tables).
``pools`` maps each pool of the table's POOLS to ``{"size", "running", "set_aside"}``
(limits.pool_use): its runs executing now, and its tasks' runs held back.
``redis_data_lost`` is ``{"since", "generation", "previous", "node", "last_seen"}`` when
the mark of Redis's data was written after a loss (generation.py), else null.

``redis`` is Redis's memory (redis_memory.redis_view: ``used_memory``, ``maxmemory``,
``full``...); while Redis refuses writes, a run of a slot whose fan-out it refused shows
``scheduled``, not ``missed``: the leader fans it out once writes work again, and
``late_slots`` lists those fanned out late for that reason.
``eta`` is when every run of the day is expected to have ended (eta.py: the learned
durations, the runs' states and the live worker processes, in the queue's order), null
when unknown (nothing learned, no live worker, a paused task) or when nothing is pending.
The ``--json`` shape is a public contract: keys are added, never renamed.

This module reads Redis; the text table made from its dict is render.py's (pure).
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from typing import Any, Collection, Iterable, Iterator

from redis import Redis

from ..beats import clock_warnings, live_processes
from ..clock import iso
from ..day_feed import DayView
from ..fanout import DURATION_LOOKUP_CHUNK
from ..fingerprint import describe, fingerprint
from ..generation import read_data_loss
from ..keys import Keys
from ..limits import pool_use
from ..params_book import ParamsBook
from ..pausing import paused_tasks
from ..redis_memory import redis_view
from ..redis_values import as_text
from ..runs import MISSED, PAUSED, QUEUED, SCHEDULED, DaySlots, RunRecord, decode_records, slot_runs_on
from ..table import TaskTable
from ..table_watch import read_tables
from .eta import (
    Estimate,
    estimate,
    eta_iso,
    eta_runs,
    eta_tasks,
    nothing_pending,
    pending_series,
    waits_for_a_worker,
)


def leader_info(connection: Redis, keys: Keys) -> dict[str, Any] | None:
    with connection.pipeline(transaction=False) as pipe:
        pipe.get(keys.leader)
        pipe.pttl(keys.leader)
        raw, ttl_ms = pipe.execute()
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        info = {"node": as_text(raw, errors="replace")}
    info.pop("token", None)
    info["lease_expires_in_s"] = round(ttl_ms / 1000, 1) if ttl_ms and ttl_ms > 0 else None
    return info


def day_status(connection: Redis, keys: Keys, table: TaskTable, day: date, now: datetime,
               view: DayView | None = None) -> dict[str, Any]:
    """``view``: the day's records kept by a caller that asks again and again (the
    dashboard, ``status --watch``), refreshed from the change feed instead of read whole."""
    with _cycle_collection_paused():
        return _day_status(connection, keys, table, day, now, view)


@contextmanager
def _cycle_collection_paused() -> Iterator[None]:
    """A big day's status builds a few hundred thousand dicts and lists that form no
    cycles (refcounting frees them), and CPython's cycle collector would walk the
    growing heap again and again meanwhile: about a sixth of a 100k-run day's status
    (0.5 of 2.9 s measured). It runs again once the status is built."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _day_status(connection: Redis, keys: Keys, table: TaskTable, day: date, now: datetime,
                view: DayView | None) -> dict[str, Any]:
    paused = paused_tasks(connection, keys)
    redis = redis_view(connection, keys)
    refused = {(entry["task"], entry["slot"]) for entry in redis["refused_slots"]}
    runs = day_runs(connection, keys, table, day, now, paused, refused=refused, view=view)
    nodes = live_processes(connection, keys, now)
    leader = leader_info(connection, keys)
    description = describe(table)
    leader_node = leader.get("node") if leader else None
    tables = read_tables(connection, keys, nodes, leader_node=None if leader_node is None else str(leader_node),
                         own_table=fingerprint(description), own_description=description)
    status = {"date": day.isoformat(), "leader": leader, "runs": runs, "generated_at": iso(now), "nodes": nodes,
              "clock_warnings": clock_warnings(nodes), "paused": paused, "tables": tables, "redis": redis,
              "late_slots": late_slots(connection, keys, day),
              "pools": pool_use(connection, keys, table, int(now.timestamp() * 1000))}
    # Since when Redis has lost dailyq's data, or None (generation.py): the records shown
    # may lack runs that did run before then.
    status["redis_data_lost"] = read_data_loss(connection, keys)
    # When every run of the day is expected to have ended (eta.py), null when unknown or done.
    status["eta"] = day_eta(connection, keys, table, runs, nodes, now)
    return status


def day_eta(connection: Redis, keys: Keys, table: TaskTable, runs: list[dict[str, Any]],
            nodes: list[dict[str, Any]], now: datetime) -> str | None:
    """``eta`` of ``status`` (``read_eta``'s ``at`` as eta_iso writes it), null when unknown
    or when nothing is pending. With no live worker and a run waiting for one it is
    unknown whatever else is known (eta.estimate), so the estimate is not made: on a day
    of 100k queued runs and no worker it was a fifth of status' time (BENCHMARKS.md, growth);
    nor when nothing is pending (a finished day's: a third)."""
    if nothing_pending(runs) or (live_workers(nodes) == 0 and waits_for_a_worker(runs)):
        return None
    expected_end = read_eta(connection, keys, table, runs, nodes, now).at
    return None if expected_end is None else eta_iso(expected_end)


def read_eta(connection: Redis, keys: Keys, table: TaskTable, runs: list[dict[str, Any]],
             nodes: list[dict[str, Any]], now: datetime) -> Estimate:
    """The estimate of eta.py for ``runs`` (status' run entries, already read) with the
    live worker processes of ``nodes`` (beats.live_processes): what it adds to reading the
    day is one HMGET of the pending runs' learned durations."""
    shown = eta_runs(runs)
    return estimate(shown, learned_durations(connection, keys, pending_series(shown)), live_workers(nodes), now,
                    eta_tasks(table.tasks), getattr(table, "pools", None))


def learned_durations(connection: Redis, keys: Keys, series: list[str]) -> dict[str, float]:
    """Series -> the last duration the guard recorded for it (keys.durations), for ``series`` only."""
    learned: dict[str, float] = {}
    for start in range(0, len(series), DURATION_LOOKUP_CHUNK):
        part = series[start:start + DURATION_LOOKUP_CHUNK]
        for name, raw in zip(part, connection.hmget(keys.durations, part)):
            try:
                seconds = float(raw) if raw is not None else None
            except ValueError:
                continue
            if seconds is not None and seconds >= 0:
                learned[name] = seconds
    return learned


def live_workers(nodes: list[dict[str, Any]]) -> int:
    """Worker processes alive across the nodes; a node's worker of a version that does not
    count them is one."""
    return sum(1 if p.get("workers") is None else int(p["workers"]) for p in nodes if p["role"] == "worker")


def late_slots(connection: Redis, keys: Keys, day: date) -> list[dict[str, Any]]:
    """The day's slots fanned out late because Redis had refused their fan-out (memory
    full), in slot order: ``{task, slot, due_at, refused_since, fanned_out_at, past_grace, why}``."""
    found = []
    for raw in connection.hvals(keys.day_late(day)):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return sorted(found, key=lambda entry: str(entry.get("due_at")))


def day_runs(connection: Redis, keys: Keys, table: TaskTable, day: date, now: datetime,
             paused: dict[str, Any] | None = None,
             refused: Collection[tuple[str, str]] = (), view: DayView | None = None) -> list[dict[str, Any]]:
    """Every run of ``day`` as ``status --json`` shows it, in firing order (``shown_runs``
    of the day's records, read with one HGETALL, or what changed since ``view``'s last look)."""
    if view is not None:
        records = view.refresh()
    else:
        # Decoded once; each param is set by shown_runs (from the table's run when it is a
        # plain value, so a big day's params are not decoded a second time).
        records = decode_records(connection.hgetall(keys.day_runs(day)))
    paused = paused_tasks(connection, keys) if paused is None else paused
    return shown_runs(table, day, now, records, paused, ParamsBook.read(connection, keys, day),
                      DaySlots.read(connection, keys, day), refused)


def shown_runs(table: TaskTable, day: date, now: datetime, records: dict[str, Any],
               paused: Collection[str], book: ParamsBook | None, slots: DaySlots | None,
               refused: Collection[tuple[str, str]] = (), task_names: Iterable[str] | None = None,
               ) -> list[dict[str, Any]]:
    """The runs of ``day`` as ``status`` shows them, from records already read (alerts and
    metrics read theirs with HSCAN, day_scan.py); ``records`` is changed in place. A
    record without ``param`` (raw JSON) gets it: its run's own for a plain value (the
    one its ``param_json`` encodes), else decoded from ``param_json``.

    A computed task's runs are those of the list stored for the slot (params_book.py);
    a slot of it with no list yet is one entry (``params_book.placeholder_record``).
    ``book`` may be None for a table without computed params, ``slots`` for one
    without once-a-day tasks; ``task_names`` keeps to those tasks (all when None)."""
    names = None if task_names is None else set(task_names)
    if names is not None and not names:
        return []
    if paused:
        for run_id, stored in list(records.items()):
            if stored.get("state") == QUEUED and stored.get("task") in paused:
                records[run_id] = {**stored, "state": PAUSED}  # a copy: a DayView's records stay as stored
    # A once-a-day task whose ``at`` or ``tz`` changed after its slot ran: its runs are
    # those of the slot first fanned out (runs.DaySlots), not new ones at the new time.
    # One group per (task, slot), in firing order: a slot's runs share their time, so the
    # groups are sorted, not the runs (a stable sort of either gives the same order).
    groups: list[tuple[datetime, list[dict[str, Any]]]] = []
    pop = records.pop
    for group in slot_runs_on(table, day, task_names=names, book=book, slots=slots):
        task, slot = group.task, group.slot
        name, slot_iso = task.name, slot.isoformat()
        # A run not fanned out yet is fanned out when the table's slot comes (a new param
        # of a moved task: under the stored slot, at the new time), so it is missed only
        # past the grace of the later of the two; a slot whose fan-out Redis refused,
        # ``refused`` (task, slot ISO), is still to come. The same for every run of the slot.
        due_at = slots.due_at(task, slot) if slots is not None else slot.fires_at
        overdue = now - due_at > timedelta(seconds=task.misfire_grace_s) and (name, slot_iso) not in refused
        state = MISSED if overdue else SCHEDULED
        shown: list[dict[str, Any]] = []
        add = shown.append
        for run_id, param in zip(group.run_ids, group.params):
            record = pop(run_id, None)
            if record is None:
                # Run.new_record(job_id=None, state=state) with the run's param, as _public shows it.
                add({"task": name, "param": param, "state": state, "node": None, "started_at": None,
                     "ended_at": None, "attempts": 0, "error": None, "slot": slot_iso, "job_id": None,
                     "duration_s": None, "run_id": run_id})
                continue
            if "param" not in record:
                record["param"] = param if type(param) in _PLAIN else _param_of(record)
            get = record.get  # _public(run_id, record), written out: this loop runs once per run of the day
            add({"task": get("task"), "param": get("param"), "state": get("state"), "node": get("node"),
                 "started_at": get("started_at"), "ended_at": get("ended_at"), "attempts": int(get("attempts") or 0),
                 "error": get("error"), "slot": get("slot"), "job_id": get("job_id"), "duration_s": get("duration_s"),
                 "run_id": run_id})
        groups.append((slot.fires_at, shown))
    if book is not None:
        groups += [(slot.fires_at, [_public(run_id, record)])
                   for slot, run_id, record in book.placeholders(table, day, now, task_names=names, slots=slots)]
    groups.sort(key=lambda item: item[0])  # stable: each slot's runs keep their order
    runs = [run for _, shown in groups for run in shown]
    # Runs recorded but no longer in the table (a task renamed or params changed) still count:
    # a renamed task is a new task, the old name's records stay listed under it.
    for run_id, record in sorted(records.items()):
        if names is None or record.get("task") in names:
            if "param" not in record:
                record["param"] = _param_of(record)
            runs.append(_public(run_id, record))
    return runs


# Params that JSON gives back as they were (a tuple comes back a list, an int key a str).
_PLAIN = (str, int, float, bool, type(None))


def _param_of(record: RunRecord) -> Any:
    return json.loads(record.get("param_json", "null"))


def _public(run_id: str, record: RunRecord) -> dict[str, Any]:
    """The run's entry in ``status``: PUBLIC_RUN_FIELDS of its record, in that order, then
    its run id (written out rather than looped over: it is made once per run of the day;
    tests/test_runs.py checks the keys against PUBLIC_RUN_FIELDS)."""
    get = record.get
    return {"task": get("task"), "param": get("param"), "state": get("state"), "node": get("node"),
            "started_at": get("started_at"), "ended_at": get("ended_at"), "attempts": int(record.get("attempts") or 0),
            "error": get("error"), "slot": get("slot"), "job_id": get("job_id"), "duration_s": get("duration_s"),
            "run_id": run_id}

"""What a task table says, as data: described, fingerprinted, compared, published.

During a rolling deploy the nodes run different tables for minutes. Each process
publishes the description of its own table under ``keys.table(fingerprint)`` and its
heartbeats name the fingerprint (beats.py), so any process can tell which nodes run
which table, what differs between them (``diff``), and whether some live node's table
has a given run (``has_run``): what the leader decides a run ``removed`` from
(deploys.py).

A description is plain JSON: per task its function, its params (the canonical JSON of
each fixed param, or the path of its params callable), its schedule, ``after`` and its
limits, and for a task in a pool the pool's name and size (absent for a task in none,
so that a table without pools keeps the fingerprint it had before pools). The
fingerprint is a digest of that JSON, so equal tables have equal fingerprints on
every node, and a published description never changes.

Everything here is pure; the descriptions in Redis are table_store.py's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, TypedDict

from .table import Task, TaskTable


class _PoolFields(TypedDict, total=False):
    pool: str  # the task's pool, only for a task in one
    pool_size: int  # the pool's size (POOLS), only in a table's description (``describe``)


class TaskDescription(_PoolFields):
    func: str
    params: list[str] | None  # canonical JSON of each fixed param; None: computed at the slot
    params_from: str | None  # the params callable's path, for a computed task
    schedule: str  # as people write it: "at 03:00:00 UTC", "cron '0 * * * *' Europe/Berlin"
    after: list[str]
    max_running: int | None
    max_per_node: int | None


Description = dict[str, TaskDescription]  # task name -> its description


def schedule_text(task: Task) -> str:
    if task.at is not None:
        return f"at {task.schedule.at.isoformat() if task.schedule.at else task.at} {task.tz}"
    return f"cron {task.cron!r} {task.tz}"


def describe_task(task: Task, pool_size: int | None = None) -> TaskDescription:
    described: TaskDescription = {
        "func": task.func_path,
        "params": None if task.params_computed else list(task.encoded_params),
        "params_from": task.params_path if task.params_computed else None,
        "schedule": schedule_text(task), "after": list(task.after),
        "max_running": task.max_running, "max_per_node": task.max_per_node}
    if task.pool is not None:
        described["pool"] = task.pool
        if pool_size is not None:
            described["pool_size"] = pool_size
    return described


def describe(table: TaskTable) -> Description:
    """Each task with its pool's size: a pool resized changes the description of each of its tasks."""
    return {task.name: describe_task(task, table.pools.get(task.pool) if task.pool else None)
            for task in table.tasks}


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def fingerprint(description: Description) -> str:
    """12 hex digits naming the table: equal on every node that runs the same table."""
    return _digest(description)


def task_digest(task: Task) -> str:
    """Names one task's definition: a leader whose table has another digest for a task
    than the leader that fired it fans its slots within the grace out again (scheduler.py).
    It names the task's pool but not the pool's size, which no firing depends on."""
    return _digest(describe_task(task))


def table_fingerprint(table: TaskTable) -> str:
    return fingerprint(describe(table))


def has_run(description: Mapping[str, TaskDescription], task: str, param_json: str, func: str | None) -> str | None:
    """None when the described table has this run (its task, its function and, for a
    fixed list, its param), else why not, in words."""
    found = description.get(task)
    if found is None:
        return f"no task {task!r}"
    if func is not None and found["func"] != func:
        return f"task {task!r} runs {found['func']}, not {func}"
    if found["params"] is not None and param_json not in found["params"]:
        return f"task {task!r} has no param {param_json}"
    return None


class TableDiff(TypedDict):
    tasks_added: list[str]  # in ``other``, not in ``base``
    tasks_removed: list[str]
    params: dict[str, dict[str, list[str]]]  # task -> {"added": [...], "removed": [...]} (param JSON)
    schedules: dict[str, dict[str, str]]  # task -> {"from": ..., "to": ...}
    other: dict[str, list[str]]  # task -> the other fields that differ (func, after, limits, params_from)


def diff(base: Mapping[str, TaskDescription], other: Mapping[str, TaskDescription]) -> TableDiff:
    """What ``other`` changes from ``base``."""
    result: TableDiff = {"tasks_added": sorted(set(other) - set(base)),
                         "tasks_removed": sorted(set(base) - set(other)), "params": {}, "schedules": {}, "other": {}}
    for name in sorted(set(base) & set(other)):
        old, new = base[name], other[name]
        if old["params"] is not None and new["params"] is not None and old["params"] != new["params"]:
            result["params"][name] = {"added": [p for p in new["params"] if p not in set(old["params"])],
                                      "removed": [p for p in old["params"] if p not in set(new["params"])]}
        elif (old["params"] is None) != (new["params"] is None):
            result["other"].setdefault(name, []).append("params")
        if old["schedule"] != new["schedule"]:
            result["schedules"][name] = {"from": old["schedule"], "to": new["schedule"]}
        for field in ("func", "params_from", "after", "max_running", "max_per_node", "pool", "pool_size"):
            if old.get(field) != new.get(field):
                result["other"].setdefault(name, []).append(field)
    return result


def is_empty(found: TableDiff) -> bool:
    return not any(found.values())


def diff_text(found: TableDiff) -> str:
    """One line: 'task nt added; hb: params +"p7" +"p8"; ...'."""
    parts = [f"task {name} added" for name in found["tasks_added"]]
    parts += [f"task {name} removed" for name in found["tasks_removed"]]
    for name, change in found["params"].items():
        shown = [f"+{p}" for p in change["added"]] + [f"-{p}" for p in change["removed"]]
        parts.append(f"{name}: params {' '.join(shown)}")
    parts += [f"{name}: {change['from']} -> {change['to']}" for name, change in found["schedules"].items()]
    parts += [f"{name}: {', '.join(fields)} changed" for name, fields in found["other"].items()]
    return "; ".join(parts) or "no difference"

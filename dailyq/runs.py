"""A run's identity and its record.

A run is (task, param, slot). Its id is deterministic, so every enqueue of the same
run, from any node, names the same thing; RQ job ids allow only [A-Za-z0-9_-], so
the param is hashed into the id and stored in full in the record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from datetime import date
from typing import Any, Iterable

from .schedule import Slot
from .table import Task, TaskTable, encode_param

# Run states shown by ``status``; a public contract.
SCHEDULED, QUEUED, RUNNING, FINISHED, FAILED, SKIPPED, MISSED = (
    "scheduled", "queued", "running", "finished", "failed", "skipped", "missed")
# A queued run of a paused task (pause.py): shown so by status, stored as queued.
PAUSED = "paused"
STATES = (SCHEDULED, QUEUED, RUNNING, FINISHED, FAILED, SKIPPED, MISSED, PAUSED)

META_KEY = "dailyq"  # the RQ job.meta entry that carries a run's identity


def param_digest(param_json: str) -> str:
    return hashlib.sha1(param_json.encode("utf-8")).hexdigest()[:12]


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

    def job_meta(self, force: bool = False, rerun_id: str | None = None) -> dict[str, Any]:
        meta = {"run_id": self.run_id, "day": self.day.isoformat(), "task": self.task.name,
                "slot": self.slot.isoformat(), "series": self.series_id, "force": force,
                "overlap": self.task.overlap, "tz": self.task.tz, "max_attempts": self.task.retries + 1}
        if rerun_id:
            meta["rerun_id"] = rerun_id
        return {META_KEY: meta}

    def new_record(self, job_id: str | None, state: str = QUEUED) -> dict[str, Any]:
        return new_record(self.task.name, self.param_json, self.slot.isoformat(), job_id, state)


def new_record(task: str, param_json: str, slot: str, job_id: str | None, state: str = QUEUED) -> dict[str, Any]:
    """The record of a run nothing has happened to yet: the one shape every writer starts from."""
    return {"task": task, "param_json": param_json, "slot": slot, "state": state, "node": None,
            "started_at": None, "ended_at": None, "attempts": 0, "error": None, "job_id": job_id}


def runs_on(table: TaskTable, day: date, task_names: Iterable[str] | None = None) -> list[Run]:
    """Every run whose slot falls on ``day`` (each task's own zone), in firing order."""
    tasks = [table.get(n) for n in task_names] if task_names else table.tasks
    runs = [Run(task, param, slot) for task in tasks for slot in task.schedule.slots_on(day) for param in task.params]
    return sorted(runs, key=lambda r: r.slot.fires_at)


def runs_of_slot(task: Task, slot: Slot) -> list[Run]:
    return [Run(task, param, slot) for param in task.params]


def decode_record(raw: bytes | str) -> dict[str, Any]:
    record = json.loads(raw)
    record["param"] = json.loads(record.get("param_json", "null"))
    return record

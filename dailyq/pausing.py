"""Pausing a task: ``scheduler.py pause TASK`` / ``resume TASK`` (or ``--all``).

A paused task is an entry in the ``keys.paused`` hash: task -> JSON ``{"since", "by"}``
(the moment by Redis's clock, the node that paused it). While it is there:

* the leader fans out none of the task's slots, and does not move the task's cursor
  (scheduler.fire_due_slots): on resume, the slots that fell due meanwhile fire if
  they are within the task's ``misfire_grace_s``; older ones show ``missed``;
* a worker that takes one of its queued runs off the queue holds it back instead of
  starting it (ADMIT, limits.py): the job goes onto the task's set-aside list, its RQ job
  stays queued, and ``status`` shows the run ``paused``. Runs already executing finish.

Workers learn which tasks are paused from Redis at most once a second
(``PausedCache``: one HKEYS per second per worker, and none while the worker is idle),
and ADMIT checks the hash again atomically. So a run taken off the queue more than a
second after ``pause`` returned is held; one taken within that second may still start.

``resume`` removes the entry and puts every set-aside run of the task back at the front of
the queue, in one script (RESUME), so no run held meanwhile is left behind; runs still
over a limit of the task are held again by ADMIT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from redis import Redis

from .clock import server_now
from .keys import Keys
from .redis_values import as_text
from .scripts import scripts_for
from .timestamps import iso

# How stale a worker's view of the paused tasks may be.
PAUSED_CACHE_S = 1.0


@dataclass(frozen=True)
class PauseResult:
    task: str
    since: str
    by: str
    already: bool  # it was paused before this call (since/by are the first pause's)


@dataclass(frozen=True)
class ResumeResult:
    task: str
    was_paused: bool
    requeued: int  # set-aside runs put back at the front of the queue


def pause(connection: Redis, keys: Keys, task_names: Iterable[str], node: str) -> list[PauseResult]:
    """Pause each task; pausing a paused task keeps its first ``since`` and ``by``."""
    since = iso(server_now(connection))
    results = []
    for name in task_names:
        entry = json.dumps({"since": since, "by": node})
        # HSETNX is the check-and-set: the first pause stays the one shown.
        added = connection.hsetnx(keys.paused, name, entry)
        stored = entry if added else as_text(connection.hget(keys.paused, name) or entry)
        info = _decode(stored)
        results.append(PauseResult(name, info["since"], info["by"], already=not added))
    return results


def resume(connection: Redis, keys: Keys, queue_key: str, task_names: Iterable[str]) -> list[ResumeResult]:
    scripts = scripts_for(connection)
    results = []
    for name in task_names:
        was_paused, moved = scripts.resume(paused_key=keys.paused, set_aside_key=keys.set_aside(name),
                                           set_aside_index_key=keys.set_aside_index(name), queue_key=queue_key, task=name).run()
        results.append(ResumeResult(name, was_paused, moved))
    return results


def paused_tasks(connection: Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Every paused task -> {"since", "by"}."""
    return {as_text(name): _decode(as_text(raw)) for name, raw in connection.hgetall(keys.paused).items()}


def paused_names(connection: Redis, keys: Keys) -> set[str]:
    return {as_text(name) for name in connection.hkeys(keys.paused)}


class PausedCache:
    """A worker's view of the paused tasks, read at most once per ``max_age_s`` and only
    when a run is about to start (an idle worker asks nothing)."""

    def __init__(self, connection: Redis, keys: Keys, max_age_s: float = PAUSED_CACHE_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.keys = keys
        self.max_age_s = max_age_s
        self._monotonic = monotonic
        self._names: set[str] = set()
        self._read_at = float("-inf")

    def contains(self, task: str) -> bool:
        now = self._monotonic()
        if now - self._read_at >= self.max_age_s:
            self._names = paused_names(self.connection, self.keys)
            self._read_at = now
        return task in self._names

    def saw(self, task: str) -> None:
        """ADMIT found the task paused: the next runs of it go to ADMIT too."""
        self._names.add(task)



def _decode(raw: str) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return {"since": None, "by": None}
    return {"since": info.get("since"), "by": info.get("by")}

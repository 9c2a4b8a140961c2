"""The day's dependency counts (``keys.day_deps``): what a release of parked runs reads
instead of the whole day.

A task's parked runs may be released once every upstream run of the day is in the day's
finished set (dependencies.py). Asking that of the set itself means rebuilding every
upstream run and asking the set about each, on every upstream finish and every leader
tick: a cost that grows with the day, per run. The counts answer most looks at once:

* ``done:{task}``: how many of the task's run ids are in the finished set. The scripts
  that add a run id to the set (FINISH, REMOVE_LEFT, REMOVE_WAITING) count it in the same
  step (scripts.DEPS_LUA), only when the SADD added it. Fewer counted run ids of an
  upstream task than it has runs that day (``upstream_runs``) proves one is unfinished:
  the release then reads nothing more. As many or more only *may* mean ready (the set can
  hold ids a table no longer has, a removed run's, say): the release then checks the run
  ids themselves, once, as before.
* ``held:{task}``: at least how many runs of the task the waiting hash holds. Fan-out and
  doctor's park add to it in the step that parks; each release writes the exact number of
  what it left held (under its WATCH). A task whose hint is 0 has nothing to release, so
  the waiting hash is read only when a task may be released. A hint is never lower than
  what is held, but may be higher (a run parked again, or removed by a deploy or doctor):
  that costs one more look, which corrects it.
* ``blocked:{task}``: the upstream run its parked runs were last marked ``blocked`` by, so
  that each further failure upstream does not mark them again.
* ``~counted``: the counts were made from the whole day (COUNT_DEPS).

Upgrades and disagreement: a day written by an older version has no counts; an older
worker still running during a rolling deploy adds run ids without counting them; a
``rerun`` takes run ids out of the set. Each leaves the sum of ``done:`` different from
the set's size, or ``held:`` below the waiting hash's length, or no ``~counted``: the
reader (``DayCounts.read``, one MULTI of three O(1) reads and one HGETALL of a hash with a
few fields per task) then has COUNT_DEPS count the day again, once, and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Mapping

from redis import Redis

from .keys import Keys
from .params_book import ParamsBook
from .redis_values import as_text
from .runs import DaySlots, slot_params, task_slots_on
from .scripts import scripts_for
from .table import Task, TaskTable

COUNTED = "~counted"


@dataclass(frozen=True)
class DayCounts:
    done: Mapping[str, int]  # task -> its run ids in the day's finished set
    held: Mapping[str, int]  # task -> at least how many of its runs the waiting hash holds
    blocked: Mapping[str, str]  # task -> the upstream run its parked runs were last marked blocked by
    counted: bool
    finished: int  # size of the day's finished set, read with the counts
    waiting: int  # fields of the day's waiting hash, read with the counts

    @property
    def agree(self) -> bool:
        """The counts describe the day (see the module docstring)."""
        return self.counted and sum(self.done.values()) == self.finished and sum(self.held.values()) >= self.waiting

    @classmethod
    def read(cls, connection: Redis, keys: Keys, day: date, retention_s: int) -> "DayCounts":
        """The day's counts, counted again first if they disagree with what they count."""
        counts = cls._read_once(connection, keys, day)
        if counts.agree:
            return counts
        scripts_for(connection).count_deps(deps_key=keys.day_deps(day), finished_key=keys.day_finished(day),
                                           runs_key=keys.day_runs(day), waiting_key=keys.day_waiting(day),
                                           retention_s=retention_s).run()
        return cls._read_once(connection, keys, day)

    @classmethod
    def _read_once(cls, connection: Redis, keys: Keys, day: date) -> "DayCounts":
        with connection.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.day_deps(day))
            pipe.scard(keys.day_finished(day))
            pipe.hlen(keys.day_waiting(day))
            raw, finished, waiting = pipe.execute()
        done: dict[str, int] = {}
        held: dict[str, int] = {}
        blocked: dict[str, str] = {}
        for key, value in raw.items():
            kind, _, task = as_text(key).partition(":")
            if kind == "done":
                done[task] = int(value)
            elif kind == "held":
                held[task] = int(value)
            elif kind == "blocked":
                blocked[task] = as_text(value)
        return cls(done, held, blocked, COUNTED.encode() in raw, int(finished), int(waiting))


def upstream_runs(table: TaskTable, task: Task, day: date, book: ParamsBook | None,
                  slots: DaySlots | None) -> dict[str, int] | None:
    """Upstream task -> how many runs it has on ``day`` (as ``runs.runs_on`` counts them,
    without building them); None while a computed upstream slot has no list stored (its
    runs are not known yet: they count as unfinished)."""
    found: dict[str, int] = {}
    for name in task.after:
        upstream = table.by_name.get(name)
        if upstream is None:
            continue
        n = 0
        for slot in task_slots_on(upstream, day, slots):
            if upstream.params_computed:
                entry = book.entry(upstream, slot) if book is not None else None
                if entry is None or not entry.ok:
                    return None
            # A slot's params are distinct (table.params_problem, for fixed and computed
            # lists alike): their number is the slot's number of runs, and no id is built.
            n += len(slot_params(upstream, slot, book))
        found[name] = n
    return found


def may_be_ready(counts: DayCounts, expected: Mapping[str, int]) -> bool:
    """False proves an upstream run unfinished; True asks for the run ids to be checked."""
    return all(counts.done.get(name, 0) >= n for name, n in expected.items())

"""Rolling deploys: jobs that the node holding them cannot run.

For some minutes of every deploy the nodes run different task tables. A job names its
run (task, param, slot) and its function; a worker whose table lacks the task, the
param (of a fixed list) or that function must not fail the job -- another node's
table may well have it -- and must not execute it either (it would run a param its
table no longer has, or a function the deploy replaced).

Leaving
-------
Such a worker *leaves* the job (``Leaver``, from ``GuardedWorker.execute_job`` before
anything else, LEAVE in scripts/deploys.py): off RQ's intermediate queue, into ``keys.left``
(due back after a wait that doubles with each leave, 1 s up to 10 s, so the worker
never spins on it) with what the leader needs to know in ``keys.left_info``; the RQ
job stays queued, and the run's record stays ``queued`` with an error saying which
node left it and why. The worker goes on with the next job.

Returning and removing
----------------------
The leader (``LeftJobs``, every tick while jobs are left, else every ``LOOK_AGAIN_S``)
asks, of each left job, which live processes' tables have its run (fingerprint.has_run
over the descriptions the heartbeats name). A due job that some live worker's table can
run goes back to the front of the queue, where any worker may take it (one whose table
lacks it leaves it again, with a longer wait); one that no live worker can run waits
``LOOK_AGAIN_S`` more, so nobody dequeues it in vain. A run that none has had for ``DAILYQ_REMOVED_GRACE_S`` (default
600 s) ends ``removed``: the deploy took its task, param or function away. Removed is
final, not failed, raises no alert; its run id joins the day's finished set, so no
later copy executes it and its downstream runs go on as if it had finished. A live
process whose table is unknown (an older version, or a description not published)
counts as having the run: a run is never removed on a guess. When the run is in a
table again, the wait starts over.

The time since when a run was found in no live table is kept in ``keys.absent``, so a
change of leader does not restart the grace.

What this costs: nothing per run on a worker whose table has the job (a set lookup in
memory); for a left job, one script per leave; for the leader, one script per look.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping

from redis import Redis
from rq import Queue

from .beats import live_processes
from .clock import iso
from .fingerprint import Description, has_run
from .keys import Keys
from .redis_values import as_text
from .rq_seam import RQKeys
from .runs import META_KEY, QUEUED
from .scripts import scripts_for
from .table_store import Descriptions

if TYPE_CHECKING:
    from .fanout import Parked

log = logging.getLogger(__name__)

FIRST_WAIT_MS = 1000
LONGEST_WAIT_MS = 10_000
# After leaving a job, a worker waits this long before it takes the next one: left jobs go
# back to the queue's front, and an idle worker whose table has them (blocked on the
# queue) should get them, not the worker that just left one.
STEP_ASIDE_S = 0.5
# How often the leader looks at the left set when nothing in it is due sooner.
LOOK_AGAIN_S = 10.0


class Leaver:
    """A worker's side: leave a job whose run this worker's table cannot run."""

    def __init__(self, connection: Redis, keys: Keys, node: str, table_fingerprint: str, retention_s: int) -> None:
        self.keys = keys
        self.node = node
        self.table_fingerprint = table_fingerprint
        self.retention_s = retention_s
        self._scripts = scripts_for(connection)

    def leave(self, job: Any, intermediate_queue_key: str, why: str) -> int:
        """Leave ``job`` (an RQ job with dailyq meta); returns the wait (ms) before it is back."""
        meta = (job.meta or {}).get(META_KEY) or {}
        param = job.args[0] if job.args else None
        info = {"run_id": meta.get("run_id"), "day": meta.get("day"), "task": meta.get("task"),
                "param_json": _param_json(param), "func": job.func_name}
        day = meta.get("day") or "0001-01-01"
        wait_ms = self._scripts.leave(
            left_key=self.keys.left, left_info_key=self.keys.left_info, intermediate_queue_key=intermediate_queue_key,
            runs_key=self.keys.day_runs(date.fromisoformat(day)), job_id=job.id,
            info_json=json.dumps(info, ensure_ascii=False), table=self.table_fingerprint, node=self.node, why=why,
            first_wait_ms=FIRST_WAIT_MS, longest_wait_ms=LONGEST_WAIT_MS, retention_s=self.retention_s).run()
        log.warning("run %s: left for a node whose table has it (this node's table: %s); back in the queue in %.0fs",
                    info["run_id"], why, wait_ms / 1000, extra={"run_id": info["run_id"]})
        time.sleep(STEP_ASIDE_S)
        return wait_ms


def _param_json(param: Any) -> str:
    from .table import encode_param  # a job's param is JSON already: this only canonicalizes it

    try:
        return encode_param(param)
    except (TypeError, ValueError):
        return json.dumps(param, default=str)


@dataclass(frozen=True)
class LiveTables:
    """The task tables of the live processes at one look of the leader."""

    descriptions: dict[str | None, Description | None]  # fingerprint (None: not named) -> description
    worker_tables: frozenset[str | None]  # the fingerprints live workers run

    @classmethod
    def read(cls, connection: Redis, keys: Keys, known: Descriptions, now: datetime) -> "LiveTables":
        processes = live_processes(connection, keys, now)
        names = {p["table"] for p in processes}
        return cls({name: known.get(name) if name else None for name in names},
                   frozenset(p["table"] for p in processes if p["role"] == "worker"))

    def find(self, task: str, param_json: str, func: str | None) -> tuple[bool, bool, list[str]]:
        """(whether some live table may have the run, whether some live worker's may, why the
        others do not). A process whose table is unknown (an older dailyq, a description not
        published) may have any run: nothing is removed on a guess."""
        reasons: list[str] = []
        having: set[str | None] = set()
        for name, description in self.descriptions.items():
            reason = None if description is None else has_run(description, task, param_json, func)
            if reason is None:
                having.add(name)
            else:
                reasons.append(reason)
        return bool(having), bool(having & self.worker_tables), sorted(set(reasons))


class Absence:
    """Since when each candidate run has been in no live table (``keys.absent``, Redis-clock
    seconds: a leader change does not restart the grace), and which are past the grace."""

    def __init__(self, connection: Redis, keys: Keys, grace_s: float, retention_s: int) -> None:
        self.connection = connection
        self.keys = keys
        self.grace_s = grace_s
        self.retention_s = retention_s

    def judge(self, looked_at: list[str], absent: dict[str, list[str]], now: datetime) -> dict[str, str]:
        """``looked_at``: the fields (``left:{job}``, ``waiting:{day}:{run}``) of every candidate
        looked at; ``absent``: those no live table has, with why. Returns the fields past the
        grace, each with the error its run is removed with; their entries are forgotten here."""
        if not looked_at:
            return {}
        since = {field: float(value) for field, value in zip(looked_at, self.connection.hmget(self.keys.absent,
                                                                                              looked_at))
                 if value is not None}
        due: dict[str, str] = {}
        for field, reasons in absent.items():
            first_s = since.get(field)
            if first_s is not None and now.timestamp() - first_s >= self.grace_s:
                due[field] = (f"removed: no live node's table has had this run for {self.grace_s:g}s "
                              f"(since {iso(datetime.fromtimestamp(first_s, now.tzinfo))}: {'; '.join(reasons)}); "
                              "rerun runs it again")
        newly = [field for field in absent if field not in since]
        gone = [field for field in since if field not in absent or field in due]
        with self.connection.pipeline(transaction=False) as pipe:
            for field in newly:
                pipe.hsetnx(self.keys.absent, field, now.timestamp())
            if newly:
                pipe.expire(self.keys.absent, self.retention_s)
            if gone:
                pipe.hdel(self.keys.absent, *gone)
            pipe.execute()
        return due


class LeftJobs:
    """The leader's side: return left jobs when due, and remove runs no live table has."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, retention_s: int, removed_grace_s: float,
                 clock: Callable[[], datetime]) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.retention_s = retention_s
        self.clock = clock
        self.descriptions = Descriptions(connection, keys)
        self.absence = Absence(connection, keys, removed_grace_s, retention_s)
        self._scripts = scripts_for(connection)
        self._next_look: float | None = None  # Redis-clock seconds; None: at the next tick

    def look_if_due(self) -> None:
        now_s = self.clock().timestamp()
        if self._next_look is not None and now_s < self._next_look:
            return
        # While jobs are left, every tick (a worker whose table has them may come up at any
        # moment); else every LOOK_AGAIN_S, for jobs a worker left meanwhile.
        self._next_look = None if self.look() else now_s + LOOK_AGAIN_S

    def look(self) -> bool:
        """Remove the runs no live table has had for the grace, forget left jobs whose runs
        no longer wait for them, and put back in the queue the due ones that a live
        worker's table can run (the others wait once more: nothing would run them).
        Returns whether any left job is still known (in the left set or back in the queue)."""
        raw = self.connection.hgetall(self.keys.left_info)
        if not raw:
            return False
        entries = {as_text(job_id): json.loads(value) for job_id, value in raw.items()}
        for job_id in self._no_longer_awaited(entries):
            self._remove(job_id, entries.pop(job_id), "", remove=False)
        now = self.clock()
        tables = LiveTables.read(self.connection, self.keys, self.descriptions, now)
        runnable: list[str] = []
        kept: list[str] = []
        absent: dict[str, list[str]] = {}  # field -> why no live table has its run
        for job_id, info in entries.items():
            anywhere, on_a_worker, reasons = tables.find(str(info.get("task")), str(info.get("param_json")),
                                                         info.get("func"))
            (runnable if on_a_worker else kept).append(job_id)
            if not anywhere:
                absent[f"left:{job_id}"] = reasons
        removed = set()
        for field, why in self.absence.judge([f"left:{job_id}" for job_id in entries], absent, now).items():
            job_id = field.removeprefix("left:")
            info = entries[job_id]
            if self._remove(job_id, info, why, remove=True) == "removed":
                log.warning("run %s %s", info.get("run_id"), why, extra={"run_id": info.get("run_id")})
            removed.add(job_id)
        _, moved = self._scripts.return_left(
            left_key=self.keys.left, queue_key=RQKeys(self.queue).queue,
            runnable=[j for j in runnable if j not in removed], kept=[j for j in kept if j not in removed],
            keep_ms=int(LOOK_AGAIN_S * 1000)).run()
        if moved:
            log.info("%d left job(s) back at the front of the queue, for a worker whose table has their runs",
                     len(moved))
        return bool(entries)

    def settle_waiting(self, unknown: Mapping[tuple[date, str], Parked]) -> list[str]:
        """Parked runs (``after``) that this leader's table cannot rebuild stay held for a node
        whose table has them; one that no live table has had for the grace ends ``removed``.
        ``unknown``: what the leader's last release look found (dependencies.WaitingRuns).
        Returns the run ids removed."""
        if not unknown:
            return []
        now = self.clock()
        tables = LiveTables.read(self.connection, self.keys, self.descriptions, now)
        fields = {f"waiting:{day.isoformat()}:{run_id}": (day, run_id) for day, run_id in unknown}
        absent = {}
        for field, key in fields.items():
            held = unknown[key]
            anywhere, _, reasons = tables.find(held.task, held.param_json, None)
            if not anywhere:
                absent[field] = reasons
        removed = []
        for field, why in self.absence.judge(list(fields), absent, now).items():
            day, run_id = fields[field]
            outcome = self._scripts.remove_waiting(
                waiting_key=self.keys.day_waiting(day), runs_key=self.keys.day_runs(day),
                finished_key=self.keys.day_finished(day), deps_key=self.keys.day_deps(day), run_id=run_id,
                now_iso=iso(now), why=why,
                retention_s=self.retention_s).run()
            if outcome == "removed":
                removed.append(run_id)
                log.warning("run %s %s", run_id, why, extra={"run_id": run_id})
        return removed

    def _no_longer_awaited(self, entries: dict[str, dict[str, Any]]) -> list[str]:
        """Left jobs whose run no longer waits for them: it finished, was removed or failed,
        or a later job of it (a rerun, a recovery) is the one that may execute."""
        by_day: dict[str, list[str]] = {}
        for job_id, info in entries.items():
            by_day.setdefault(str(info.get("day") or "0001-01-01"), []).append(job_id)
        stale = []
        for day, job_ids in by_day.items():
            run_ids = [str(entries[job_id].get("run_id")) for job_id in job_ids]
            records = self.connection.hmget(self.keys.day_runs(date.fromisoformat(day)), run_ids)
            for job_id, raw in zip(job_ids, records):
                record = json.loads(raw) if raw is not None else None
                if record is not None and (record.get("job_id") != job_id or record.get("state") != QUEUED):
                    stale.append(job_id)
        return stale

    def _remove(self, job_id: str, info: dict[str, Any], why: str, remove: bool) -> str:
        day = date.fromisoformat(str(info.get("day") or "0001-01-01"))
        return self._scripts.remove_left(
            left_key=self.keys.left, left_info_key=self.keys.left_info, runs_key=self.keys.day_runs(day),
            finished_key=self.keys.day_finished(day), deps_key=self.keys.day_deps(day), job_id=job_id,
            run_id=str(info.get("run_id")),
            now_iso=iso(self.clock()), why=why, retention_s=self.retention_s, remove=remove).run()

"""Rolling deploys: jobs that the node holding them cannot run.

For some minutes of every deploy the nodes run different task tables. A job names its
run (task, param, slot) and its function; a worker whose table lacks the task, the
param (of a fixed list) or that function must not fail the job -- another node's
table may well have it -- and must not execute it either (it would run a param its
table no longer has, or a function the deploy replaced).

Leaving
-------
Such a worker *leaves* the job (``Leaver``, from ``GuardedWorker.execute_job`` before
anything else, LEAVE in scripts.py): off RQ's intermediate queue, into ``keys.left``
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
from datetime import date, datetime
from typing import Any, Callable

from redis import Redis
from rq import Queue

from .beats import live_processes
from .clock import iso
from .fingerprint import Descriptions, has_run
from .keys import Keys
from .redis_values import as_text
from .runs import META_KEY, QUEUED
from .scripts import scripts_for

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


class LeftJobs:
    """The leader's side: return left jobs when due, and remove runs no live table has."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, retention_s: int, removed_grace_s: float,
                 clock: Callable[[], datetime]) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.retention_s = retention_s
        self.removed_grace_s = removed_grace_s
        self.clock = clock
        self.descriptions = Descriptions(connection, keys)
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
        processes = live_processes(self.connection, self.keys, now)
        by_table = {name: self.descriptions.get(name) if name else None for name in {p["table"] for p in processes}}
        worker_tables = {p["table"] for p in processes if p["role"] == "worker"}
        runnable: list[str] = []
        kept: list[str] = []
        absent: dict[str, list[str]] = {}  # job id -> why no live table has its run
        for job_id, info in entries.items():
            reasons = {name: None if description is None else
                       has_run(description, str(info.get("task")), str(info.get("param_json")), info.get("func"))
                       for name, description in by_table.items()}
            # A live process whose table is unknown might have any run: never removed on a guess.
            unknown = {name for name, description in by_table.items() if description is None}
            having = {name for name, reason in reasons.items() if reason is None}
            (runnable if (having | unknown) & worker_tables else kept).append(job_id)
            if not having:
                absent[job_id] = sorted({reason for reason in reasons.values() if reason})
        removed = self._remove_absent(entries, absent, now)
        _, moved = self._scripts.return_left(
            left_key=self.keys.left, queue_key=self.queue.key, runnable=[j for j in runnable if j not in removed],
            kept=[j for j in kept if j not in removed], keep_ms=int(LOOK_AGAIN_S * 1000)).run()
        if moved:
            log.info("%d left job(s) back at the front of the queue, for a worker whose table has their runs",
                     len(moved))
        return bool(entries)

    def _remove_absent(self, entries: dict[str, dict[str, Any]], absent: dict[str, list[str]],
                       now: datetime) -> set[str]:
        """Remove the runs of the ``absent`` left jobs once their grace has passed; keep in
        ``keys.absent`` since when each was absent. Returns the job ids removed or forgotten."""
        fields = {job_id: f"left:{job_id}" for job_id in entries}
        since_raw = self.connection.hmget(self.keys.absent, list(fields.values())) if fields else []
        since = {job_id: float(value) for job_id, value in zip(fields, since_raw) if value is not None}
        done: set[str] = set()
        newly_absent = {fields[job_id]: now.timestamp() for job_id in absent if job_id not in since}
        present_again = [fields[job_id] for job_id in since if job_id not in absent]
        for job_id, reasons in absent.items():
            first_s = since.get(job_id)
            if first_s is None or now.timestamp() - first_s < self.removed_grace_s:
                continue
            info = entries[job_id]
            why = (f"removed: no live node's table has had this run for {self.removed_grace_s:g}s "
                   f"(since {iso(datetime.fromtimestamp(first_s, now.tzinfo))}: {'; '.join(reasons)}); "
                   "rerun runs it again")
            if self._remove(job_id, info, why, remove=True) == "removed":
                log.warning("run %s %s", info.get("run_id"), why, extra={"run_id": info.get("run_id")})
            present_again.append(fields[job_id])
            done.add(job_id)
        with self.connection.pipeline(transaction=False) as pipe:
            for field, at in newly_absent.items():
                pipe.hsetnx(self.keys.absent, field, at)
            if newly_absent:
                pipe.expire(self.keys.absent, self.retention_s)
            if present_again:
                pipe.hdel(self.keys.absent, *present_again)
            pipe.execute()
        return done

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
            finished_key=self.keys.day_finished(day), job_id=job_id, run_id=str(info.get("run_id")),
            now_iso=iso(self.clock()), why=why, retention_s=self.retention_s, remove=remove).run()

"""Recovery of runs whose executing process died mid-run.

A copy that starts executing records itself in the ``running`` hash, atomically with
taking its claim (guard.py). Its claim is renewed from inside the executing process,
so a claim that has expired while the run is still listed as running means that
process is gone (node death, SIGKILL, OOM). The leader checks every few seconds and
enqueues such runs again under a fresh job id; the next copy counts as a new attempt.

We do not wait for RQ's own abandoned-job handling, which by default takes the job's
heartbeat TTL plus a 600 s maintenance interval, and then only fails the job.
"""

from __future__ import annotations

import json
import logging
from datetime import date

from redis import Redis
from rq import Queue

from .fanout import fan_out
from .keys import Keys
from .lease import Lease
from .runs import Run
from .table import TaskTable

log = logging.getLogger(__name__)

# KEYS[1] = running hash, KEYS[2] = the run's claim; ARGV[1] = run_id.
# Removes the run from ``running`` only if no live copy holds its claim.
TAKE_IF_ABANDONED = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


def requeue_abandoned_runs(connection: Redis, keys: Keys, queue: Queue, table: TaskTable, retention_s: int,
                           fence: Lease | None) -> list[str]:
    """Enqueue again every run whose executing process died; returns their run ids."""
    listed = connection.hgetall(keys.running)
    if not listed:
        return []
    run_ids = [raw.decode() for raw in listed]
    with connection.pipeline(transaction=False) as pipe:
        for run_id in run_ids:
            pipe.exists(keys.claim(run_id))
        claimed = pipe.execute()
    take = connection.register_script(TAKE_IF_ABANDONED)
    requeued = []
    for run_id, alive in zip(run_ids, claimed):
        if alive or not take(keys=[keys.running, keys.claim(run_id)], args=[run_id]):
            continue
        day = date.fromisoformat(listed[run_id.encode()].decode())
        run = _rebuild(connection, keys, table, run_id, day)
        if run is None:
            log.error("run %s died mid-run but its task or slot is no longer in the table; not requeued", run_id)
            continue
        try:
            rerun_number = int(connection.hincrby(keys.day_reruns(day), run_id, 1))
            connection.expire(keys.day_reruns(day), retention_s)
            fan_out(connection, keys, queue, [run], retention_s=retention_s, fence=fence,
                    rerun={run_id: rerun_number})
        except BaseException:
            # Not requeued (lease lost, Redis gone): list it again for the next leader.
            connection.hset(keys.running, run_id, day.isoformat())
            raise
        log.warning("run %s: its executing process died mid-run; enqueued again (job %s)", run_id,
                    run.job_id(rerun_number))
        requeued.append(run_id)
    return requeued


def _rebuild(connection: Redis, keys: Keys, table: TaskTable, run_id: str, day: date) -> Run | None:
    raw = connection.hget(keys.day_runs(day), run_id)
    if raw is None:
        return None
    record = json.loads(raw)
    task = table.by_name.get(record["task"])
    if task is None:
        return None
    param = json.loads(record["param_json"])
    for slot in task.schedule.slots_on(day):
        run = Run(task, param, slot)
        if run.run_id == run_id:
            return run
    return None

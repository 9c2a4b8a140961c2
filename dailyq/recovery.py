"""Recovery of runs whose executing process died mid-run.

A copy that starts executing records itself in the ``running`` hash, atomically with
taking its claim (guard.py). Its claim is renewed from inside the executing process,
so a run listed as running whose claim has expired has lost its process (node
death, SIGKILL, OOM) -- or Redis was away longer than the claim TTL. To tell the two
apart, the leader requeues a run only when it finds it claimless twice, at least
half a claim TTL apart: a live copy re-takes its claim within a third of the TTL
once Redis is back. First sightings are kept in Redis, timed by the Redis server's
clock, so a change of leader (or clocks that disagree between nodes) does not
restart the wait. The new copy counts as a new attempt.

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


class AbandonedRuns:
    """The leader's watch for runs that lost their executing process."""

    def __init__(self, connection: Redis, keys: Keys, queue: Queue, table: TaskTable, retention_s: int,
                 claim_ttl_s: float) -> None:
        self.connection = connection
        self.keys = keys
        self.queue = queue
        self.table = table
        self.retention_s = retention_s
        self.confirm_after_s = claim_ttl_s / 2
        self._take = connection.register_script(TAKE_IF_ABANDONED)

    def requeue(self, fence: Lease | None) -> list[str]:
        """Enqueue again every run confirmed abandoned; returns their run ids."""
        listed = {k.decode(): v.decode() for k, v in self.connection.hgetall(self.keys.running).items()}
        suspects = {k.decode(): float(v) for k, v in self.connection.hgetall(self.keys.abandoned_suspects).items()}
        run_ids = list(listed)
        with self.connection.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.exists(self.keys.claim(run_id))
            claimed = pipe.execute()
        claimless = {run_id for run_id, alive in zip(run_ids, claimed) if not alive}
        cleared = [run_id for run_id in suspects if run_id not in claimless]
        if cleared:
            self.connection.hdel(self.keys.abandoned_suspects, *cleared)
        if not claimless:
            return []
        seconds, micros = self.connection.time()
        now_s = seconds + micros / 1e6
        requeued = []
        for run_id in sorted(claimless):
            if run_id not in suspects:
                self.connection.hsetnx(self.keys.abandoned_suspects, run_id, now_s)
                continue
            if now_s - suspects[run_id] < self.confirm_after_s:
                continue
            self.connection.hdel(self.keys.abandoned_suspects, run_id)
            if not self._take(keys=[self.keys.running, self.keys.claim(run_id)], args=[run_id]):
                continue
            if self._requeue_one(run_id, date.fromisoformat(listed[run_id]), fence):
                requeued.append(run_id)
        return requeued

    def _requeue_one(self, run_id: str, day: date, fence: Lease | None) -> bool:
        run = self._rebuild(run_id, day)
        if run is None:
            log.error("run %s died mid-run but its task or slot is no longer in the table; not requeued", run_id,
                      extra={"run_id": run_id})
            return False
        try:
            rerun_number = int(self.connection.hincrby(self.keys.day_reruns(day), run_id, 1))
            self.connection.expire(self.keys.day_reruns(day), self.retention_s)
            fan_out(self.connection, self.keys, self.queue, [run], retention_s=self.retention_s, fence=fence,
                    rerun={run_id: rerun_number}, at_front=True)
        except BaseException:
            # Not requeued (lease lost, Redis gone): list it again for the next leader.
            self.connection.hset(self.keys.running, run_id, day.isoformat())
            raise
        log.warning("run %s: its executing process died mid-run; enqueued again (job %s)", run_id,
                    run.job_id(rerun_number), extra={"run_id": run_id})
        return True

    def _rebuild(self, run_id: str, day: date) -> Run | None:
        raw = self.connection.hget(self.keys.day_runs(day), run_id)
        if raw is None:
            return None
        record = json.loads(raw)
        task = self.table.by_name.get(record["task"])
        if task is None:
            return None
        param = json.loads(record["param_json"])
        for slot in task.schedule.slots_on(day):
            run = Run(task, param, slot)
            if run.run_id == run_id:
                return run
        return None

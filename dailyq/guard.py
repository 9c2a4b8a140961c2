"""The worker-side dedup guard: a run executes at most once at a time, and not again
once finished.

It wraps the call of a task function inside the process that executes it (RQ's
work-horse, or the worker itself for a non-forking worker):

1. ``BEGIN`` (one Lua script): if the run is in the day's finished set, skip it;
   else take the run's claim (an owner-token lease) and mark the record running.
   On a dailyq worker it rides in RQ's own transaction that marks the job started
   (worker.py), so it costs no round trip; it is sent on its own only when the
   claim must be waited for, or if that reply never arrived.
   A claim held by another live copy means "wait": the other copy may finish (then
   we skip) or die (its claim expires, then we run). A *series* claim, held for
   any slot of the same (task, param), applies the task's ``overlap`` policy when
   the previous slot's run is still executing: "wait" for it, or "skip" this run.
2. While the function runs, a thread renews the claim. It lives in the executing
   process, so an orphaned work-horse whose worker parent was killed keeps its claim
   and no second copy starts beside it.
3. ``FINISH`` adds the run to the finished set and releases the claim atomically
   (on a worker, inside RQ's transaction that records the job's success);
   ``FAIL`` releases the claim and records the error.

What the guard cannot prevent: a process that dies after the task's side effect but
before FINISH leaves the run unfinished, and it runs again. Tasks must be idempotent.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from datetime import date
from typing import Any, Callable, NamedTuple

from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import RedisError

from .clock import Clock, iso, utc_now
from .keys import Keys
from .lease import ACQUIRE_OR_RENEW
from .outage import OutageLog, through_outage
from .table import encode_param
from .runs import FAILED, FINISHED, META_KEY, PATCH_RECORD_LUA, QUEUED, RUNNING, SKIPPED, new_record

log = logging.getLogger(__name__)

# The error a run skipped by overlap='skip' shows in its record.
OVERLAP_SKIPPED = "overlap: the previous slot's run of this task and param was still running"

# KEYS[1] = day finished set, KEYS[2] = run claim, KEYS[3] = day runs hash, KEYS[4] = running hash,
# KEYS[5] = series claim (same task and param, any slot)
# ARGV = run_id, claim owner, claim ttl ms, force ('1'|'0'), base_json, retention_s, day,
#        overlap ('skip'|'wait'), node, now (ISO), job_id
# The record's fields are set here from plain arguments, not from a JSON patch: a run
# then costs the worker no JSON encoding beyond its base record.
BEGIN = PATCH_RECORD_LUA + f"""
if redis.call('GET', KEYS[2]) == ARGV[2] then
  return 'claimed'  -- a retry after a lost reply: we already hold it
end
if ARGV[4] ~= '1' and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 'finished'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'busy'  -- this very run is executing elsewhere
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  -- a run of another slot of the same task and param is still executing
  if ARGV[8] == 'skip' then
    local record = load_record(KEYS[3], ARGV[1], ARGV[5])
    record.state, record.node, record.ended_at, record.job_id = '{SKIPPED}', ARGV[9], ARGV[10], ARGV[11]
    record.error = [[{OVERLAP_SKIPPED}]]
    save_record(KEYS[3], ARGV[1], record, ARGV[6])
    return 'skipped'
  end
  return 'busy'
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[5], ARGV[2], 'PX', ARGV[3])
local record = load_record(KEYS[3], ARGV[1], ARGV[5])
record.state, record.node, record.started_at, record.job_id = '{RUNNING}', ARGV[9], ARGV[10], ARGV[11]
record.ended_at, record.error = cjson.null, cjson.null
record.attempts = (tonumber(record.attempts) or 0) + 1
save_record(KEYS[3], ARGV[1], record, ARGV[6])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[7])
return 'claimed'
"""

BEGIN_REPLIES = ("claimed", "finished", "busy", "skipped")

# Releases what BEGIN took, if still ours. A run whose claim is gone altogether
# leaves ``running`` too (nobody else is executing it).
RELEASE_LUA = """
local function release(claim_key, series_key, running_key, run_id, owner)
  local claim = redis.call('GET', claim_key)
  if claim == owner then
    redis.call('DEL', claim_key)
  end
  if redis.call('GET', series_key) == owner then
    redis.call('DEL', series_key)
  end
  if claim == owner or not claim then
    redis.call('HDEL', running_key, run_id)
  end
  return claim == owner
end
"""

# KEYS[1] = day finished set, KEYS[2] = run claim, KEYS[3] = day runs hash, KEYS[4] = durations hash,
# KEYS[5] = running hash, KEYS[6] = series claim
# ARGV = run_id, claim owner, base_json, retention_s, series id, duration_s, node, now (ISO)
FINISH = PATCH_RECORD_LUA + RELEASE_LUA + f"""
local still_ours = release(KEYS[2], KEYS[6], KEYS[5], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local record = load_record(KEYS[3], ARGV[1], ARGV[3])
record.state, record.node, record.ended_at, record.error = '{FINISHED}', ARGV[7], ARGV[8], cjson.null
record.duration_s = tonumber(ARGV[6])
save_record(KEYS[3], ARGV[1], record, ARGV[4])
redis.call('HSET', KEYS[4], ARGV[5], ARGV[6])
return still_ours and 1 or 0
"""

# KEYS[1] = run claim, KEYS[2] = day runs hash, KEYS[3] = running hash, KEYS[4] = series claim
# ARGV = run_id, claim owner, base_json, patch_json, retention_s
FAIL = PATCH_RECORD_LUA + RELEASE_LUA + """
release(KEYS[1], KEYS[4], KEYS[3], ARGV[1], ARGV[2])
patch_record(KEYS[2], ARGV[1], ARGV[3], ARGV[4], '0', ARGV[5])
return 1
"""

# How often a copy waiting for another live copy of the same run looks again.
WAIT_POLL_S = 1.0
# How long the executing process waits for Redis to come back to record a run
# before giving up (the run then shows as running until the leader requeues it).
RECORD_OUTAGE_LIMIT_S = 900.0


@dataclass(frozen=True)
class RunIdentity:
    """What the guard needs to know about a run, read from the RQ job."""

    run_id: str
    day: date
    task: str
    slot: str
    series: str
    param_json: str
    job_id: str
    force: bool
    overlap: str = "wait"

    @classmethod
    def from_job(cls, job: Any) -> "RunIdentity | None":
        meta = (job.meta or {}).get(META_KEY)
        if not meta:
            return None
        param = job.args[0] if job.args else None
        return cls(run_id=meta["run_id"], day=date.fromisoformat(meta["day"]), task=meta["task"],
                   slot=meta.get("slot", ""), series=meta.get("series", meta["run_id"]),
                   param_json=encode_param(param), job_id=job.id, force=bool(meta.get("force")),
                   overlap=meta.get("overlap", "wait"))

    @cached_property
    def base_record(self) -> str:
        """JSON of the record to start from if the run has none (sent with every script)."""
        return json.dumps(new_record(self.task, self.param_json, self.slot, self.job_id), ensure_ascii=False)


class HeldClaim(NamedTuple):
    """A claim this process holds: renewed by ClaimKeeper with ACQUIRE_OR_RENEW."""

    key: str
    owner: str
    ttl_ms: int


class ScriptCall(NamedTuple):
    """One call of a guard script: run on its own, or queued in a transaction RQ owns."""

    script: Script
    keys: list[str]
    args: list[Any]

    def run(self) -> Any:
        return self.script(keys=self.keys, args=self.args)

    def queue_in(self, pipeline: Pipeline) -> None:
        # EVAL with the body, not the Script object: on a pipeline, redis-py first sends
        # SCRIPT EXISTS (a round trip of its own, the very cost queueing saves), and an
        # EVALSHA that meets NOSCRIPT (Redis restarted since we loaded the script) would
        # fail RQ's whole transaction. Redis caches the compiled body either way.
        pipeline.eval(self.script.script, len(self.keys), *self.keys, *self.args)


class PendingFinish:
    """The FINISH of a run whose function returned: idempotent, so it may be queued in
    a transaction and, should that transaction not happen, applied again on its own."""

    def __init__(self, finish: ScriptCall, run_id: str) -> None:
        self.finish = finish
        self.run_id = run_id

    def queue_in(self, pipeline: Pipeline) -> None:
        self.finish.queue_in(pipeline)

    def apply(self) -> None:
        through_outage(self.finish.run, OutageLog(log, f"recording run {self.run_id} as finished"),
                       RECORD_OUTAGE_LIMIT_S)


@dataclass
class Attempt:
    """This process's attempt at executing one run: the owner token its claim carries
    and, when BEGIN rode in the worker's own preparation transaction, BEGIN's reply."""

    run: RunIdentity
    owner: str
    begin_reply: str | None = None

    def keep_begin_reply(self, reply: Any) -> None:
        reply = reply.decode() if isinstance(reply, bytes) else reply
        # Anything but one of BEGIN's own answers is ignored: the guard then asks again.
        self.begin_reply = reply if reply in BEGIN_REPLIES else None


class Guard:
    """Runs one call under the run's claim; see the module docstring."""

    def __init__(self, connection: Redis, keys: Keys, node: str, claim_ttl_s: int, retention_s: int,
                 clock: Clock = utc_now) -> None:
        self.connection = connection
        self.keys = keys
        self.node = node
        self.claim_ttl_s = claim_ttl_s
        self.retention_s = retention_s
        self.clock = clock
        self._begin = connection.register_script(BEGIN)
        self._finish = connection.register_script(FINISH)
        self._fail = connection.register_script(FAIL)
        self.keeper = ClaimKeeper(connection, claim_ttl_s / 3)

    def attempt(self, run: RunIdentity) -> Attempt:
        return Attempt(run, owner=f"{self.node}:{os.getpid()}:{uuid.uuid4().hex}")

    def claim_in(self, attempt: Attempt, pipeline: Pipeline) -> None:
        """Queue the attempt's first BEGIN in ``pipeline`` (RQ's preparation transaction),
        so claiming costs no round trip of its own. The caller hands the reply back via
        ``attempt.keep_begin_reply``; if it never arrives, ``execute`` sends BEGIN
        again, which returns 'claimed' when the first one had claimed for this owner."""
        self._begin_call(attempt).queue_in(pipeline)

    def execute(self, run: RunIdentity, call: Callable[[], Any], will_retry: Callable[[], bool],
                defer_finish: Callable[["PendingFinish"], None] | None = None,
                attempt: Attempt | None = None) -> Any:
        """Run ``call`` under the run's claim. With ``defer_finish``, recording the run
        as finished is handed to the caller (the worker adds it to RQ's own success
        transaction: one round trip fewer per run) instead of done here."""
        attempt = attempt or self.attempt(run)
        owner = attempt.owner
        outcome = self._wait_for_claim(attempt)
        if outcome != "claimed":
            log.info("run %s not executed: %s (job %s, node %s)", run.run_id, outcome, run.job_id, self.node,
                     extra={"run_id": run.run_id})
            return {"skipped": outcome}
        # DEBUG: RQ already logs each job's start at INFO (the job's description names the
        # task, param and slot; its id is the run id), and a second INFO line per run
        # cost 2% of a no-op run's throughput (measured beside plain RQ, BENCHMARKS.md).
        log.debug("run %s started on node %s (job %s)", run.run_id, self.node, run.job_id,
                  extra={"run_id": run.run_id})
        started = time.monotonic()
        ttl_ms = self.claim_ttl_s * 1000
        claim = HeldClaim(self.keys.claim(run.run_id), owner, ttl_ms)
        series = HeldClaim(self.keys.series_claim(run.series), owner, ttl_ms)
        self.keeper.hold(run.run_id, [claim, series])
        try:
            result = call()
        except BaseException as exc:  # timeouts arrive as exceptions too; record, then let RQ handle it
            self.keeper.release(run.run_id)
            retrying = will_retry()
            error = f"{type(exc).__name__}: {exc}"
            self._record_failure(run, owner, error, retrying)
            log.warning("run %s %s on node %s: %s", run.run_id, "will retry" if retrying else "failed",
                        self.node, error, extra={"run_id": run.run_id})
            raise
        self.keeper.release(run.run_id)
        duration_s = time.monotonic() - started
        finish_keys = [self.keys.day_finished(run.day), claim.key, self.keys.day_runs(run.day),
                       self.keys.durations, self.keys.running, series.key]
        finish_args = [run.run_id, owner, run.base_record, self.retention_s, run.series, f"{duration_s:.3f}",
                       self.node, iso(self.clock())]
        pending = PendingFinish(ScriptCall(self._finish, finish_keys, finish_args), run.run_id)
        if defer_finish is not None:
            defer_finish(pending)
        else:
            pending.apply()
        # DEBUG, like the start: RQ's own INFO lines say that the job succeeded and how long
        # it took (tagged with the run id in JSON logs), and a line costs ~40 us of CPU
        # per run in the worker (measured in-process), 1% of a no-op run.
        log.debug("run %s finished on node %s in %.1fs", run.run_id, self.node, duration_s,
                  extra={"run_id": run.run_id})
        return result

    def _begin_call(self, attempt: Attempt) -> ScriptCall:
        run = attempt.run
        begin_keys = [self.keys.day_finished(run.day), self.keys.claim(run.run_id), self.keys.day_runs(run.day),
                      self.keys.running, self.keys.series_claim(run.series)]
        begin_args = [run.run_id, attempt.owner, self.claim_ttl_s * 1000, "1" if run.force else "0",
                      run.base_record, self.retention_s, run.day.isoformat(), run.overlap, self.node,
                      iso(self.clock()), run.job_id]
        return ScriptCall(self._begin, begin_keys, begin_args)

    def _wait_for_claim(self, attempt: Attempt) -> str:
        """'claimed' once we hold the claim, or why not: 'finished' (already done) or
        'skipped' (overlap='skip' and the previous slot's run is still executing)."""
        run = attempt.run
        outcome = attempt.begin_reply  # None unless BEGIN already ran in RQ's preparation transaction
        told = False
        while True:
            if outcome is None:
                reply = through_outage(self._begin_call(attempt).run, OutageLog(log, f"claiming run {run.run_id}"),
                                       RECORD_OUTAGE_LIMIT_S)
                outcome = reply.decode() if isinstance(reply, bytes) else reply
            if outcome != "busy":
                return outcome
            if not told:
                # Another live copy holds the claim (an orphaned work-horse, a rerun beside
                # the original, or with overlap='wait' the previous slot's run): never run
                # beside it; wait for it to end or die.
                log.info("run %s: another copy of it (or of its task and param) is executing; waiting (job %s)",
                         run.run_id, run.job_id, extra={"run_id": run.run_id})
                told = True
            time.sleep(WAIT_POLL_S)
            outcome = None

    def _record_failure(self, run: RunIdentity, owner: str, error: str, retrying: bool) -> None:
        patch = {"state": QUEUED if retrying else FAILED, "ended_at": iso(self.clock()), "error": error,
                 "node": self.node}
        fail_keys = [self.keys.claim(run.run_id), self.keys.day_runs(run.day), self.keys.running,
                     self.keys.series_claim(run.series)]
        fail_args = [run.run_id, owner, run.base_record, json.dumps(patch), self.retention_s]
        try:
            through_outage(lambda: self._fail(keys=fail_keys, args=fail_args),
                           OutageLog(log, f"recording the failure of run {run.run_id}"), RECORD_OUTAGE_LIMIT_S)
        except RedisError as exc:
            # The claim then expires by itself; RQ still records the failure.
            log.error("run %s: could not record its failure (%s)", run.run_id, exc, extra={"run_id": run.run_id})


class ClaimKeeper:
    """Keeps the claims of every run executing in this process alive, from one
    background thread per process, started on first use. A forked work-horse inherits
    the keeper but not its thread, so the keeper starts afresh in each new process.

    If a claim expired (Redis was away longer than its TTL) and nobody took it, it is
    taken back: the leader requeues a claimless run only after looking twice, more
    than a renewal period apart (recovery.py), so a live copy always gets in first.
    """

    def __init__(self, connection: Redis, every_s: float) -> None:
        self.every_s = every_s
        self._keep = connection.register_script(ACQUIRE_OR_RENEW)
        self._outage = OutageLog(log, "renewing run claims")
        self._start_afresh()

    def _start_afresh(self) -> None:
        self._pid = os.getpid()
        self._held: dict[str, list[HeldClaim]] = {}
        self._lost: set[str] = set()
        # Held during each renewal pass, so that release() returns only once no pass
        # can still re-take a claim the caller is about to delete.
        self._lock = threading.Lock()
        self._renewing = False

    def hold(self, run_id: str, claims: list[HeldClaim]) -> None:
        if self._pid != os.getpid():
            # A fork: the parent's claims, lock state and thread are not this process's.
            self._start_afresh()
        with self._lock:
            self._held[run_id] = claims
            if not self._renewing:
                # _thread, not threading.Thread: Thread.start() waits until the new thread
                # has run, a handshake that cost a freshly forked work-horse about 1 ms per
                # run (bench/run.py overhead, forking). Like a daemon thread, it never holds
                # up the process's exit.
                _thread.start_new_thread(self._renew_forever, ())
                self._renewing = True

    def release(self, run_id: str) -> None:
        with self._lock:
            self._held.pop(run_id, None)
            self._lost.discard(run_id)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.every_s)
            with self._lock:
                try:
                    for run_id, claims in self._held.items():
                        held = all([self._keep(keys=[c.key], args=[c.owner, c.ttl_ms]) for c in claims])
                        if not held and run_id not in self._lost:
                            log.error("run %s: another copy holds its claim now; two copies may be running", run_id,
                                      extra={"run_id": run_id})
                            self._lost.add(run_id)
                except RedisError as exc:
                    self._outage.failed(exc)
                    continue
                self._outage.recovered()

"""Runs whose executing process is gone, or whose job RQ dropped: taken over, requeued or
settled (recovery.py, settle.py, worker/workers.py)."""

from __future__ import annotations

from typing import Literal

from ..redis_values import reply_text
from ..runs import FAILED, QUEUED, RUNNING, WAITING
from .shared import (
    NOTE_FAILED_LUA,
    RECORD_LUA,
    ScriptCall,
    ScriptSet,
    with_helpers,
)

TAKE_IF_ABANDONED = with_helpers(f"""
-- The leader takes over a run listed as running: only if no live copy holds its claim.
-- It records the run failed when it has no attempts left, or when the caller cannot
-- requeue it (ARGV[5] says why). A run to requeue stays listed as running: the caller's
-- requeue removes it in the same MULTI/EXEC that enqueues its new job (recovery.py), so
-- a leader that dies or loses Redis in between leaves it listed for the next look.
-- KEYS[1] = running hash, KEYS[2] = the run's claim, KEYS[3] = day runs hash, KEYS[4] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = max attempts (0 = no limit), ARGV[3] = now (ISO), ARGV[4] = retention (s),
-- ARGV[5] = why the caller cannot requeue it ('' = it can), ARGV[6] = day (ISO)
-- Returns 'alive', 'gone' (someone else took it, or its day's records expired), 'failed' or 'requeue'.
local running_key, claim_key, runs_key = KEYS[1], KEYS[2], KEYS[3]
local run_id, max_attempts, now, retention_s, cannot = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5] or ''
if redis.call('EXISTS', claim_key) == 1 then
  return 'alive'
end
if redis.call('HEXISTS', running_key, run_id) == 0 then
  return 'gone'
end
local record = load_record(runs_key, run_id)
if not record then
  redis.call('HDEL', running_key, run_id)
  return 'gone'  -- its record expired with its day: no run left to requeue or to show
end
if record.state ~= '{RUNNING}' then
  -- a stale entry (the run finished, failed or was requeued meanwhile): nothing executes
  -- it, and requeueing it would leave a job that BEGIN skips and a record stuck queued
  redis.call('HDEL', running_key, run_id)
  return 'gone'
end
local lost = 'executing process lost on node ' .. tostring(record.node) ..
  ' (node died, killed, or cut off from Redis); '
local attempts = run_attempts(record)
if max_attempts > 0 and attempts >= max_attempts then
  lost = lost .. attempts .. ' of ' .. max_attempts .. ' attempts used'
elseif cannot ~= '' then
  lost = lost .. 'not requeued: ' .. cannot
else
  return 'requeue'
end
redis.call('HDEL', running_key, run_id)
record.state, record.ended_at, record.error = '{FAILED}', now, lost
save_record(runs_key, run_id, record, retention_s)
note_failed(KEYS[4], ARGV[6], run_id, record, retention_s)
return 'failed'
""", RECORD_LUA, NOTE_FAILED_LUA)


REQUEUE_STRANDED = with_helpers(f"""
-- Puts a job a worker took off the queue but never started back at the front of the
-- queue, once, if its run still waits for exactly this job (queued, not begun since).
-- KEYS[1] = RQ's intermediate queue, KEYS[2] = our queue, KEYS[3] = day runs hash
-- ARGV[1] = job id, ARGV[2] = run id
-- Returns 1 when requeued, else 0.
local intermediate_key, queue_key, runs_key = KEYS[1], KEYS[2], KEYS[3]
local job_id, run_id = ARGV[1], ARGV[2]
local record = load_record(runs_key, run_id)
if record and (record.state ~= '{QUEUED}' or record.job_id ~= job_id) then
  return 0
end
if redis.call('LREM', intermediate_key, 1, job_id) == 0 then
  return 0
end
redis.call('LPUSH', queue_key, job_id)
return 1
""", RECORD_LUA)


SETTLE_FAILED = with_helpers(f"""
-- The leader settles the run of a job RQ failed outside the guard (settle.py): the record
-- is failed with RQ's reason, only while nothing else backs what it says -- it names this
-- job and says queued, running or waiting, RQ still has the job failed, no copy holds the
-- run's claim, recovery does not list it as running (recovery takes those over), and no
-- waiting entry or left job (deploys) stands behind it.
-- KEYS[1] = day runs hash, KEYS[2] = the run's claim, KEYS[3] = running hash,
-- KEYS[4] = day waiting hash, KEYS[5] = RQ's job hash, KEYS[6] = left jobs (sorted set),
-- KEYS[7] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = job_id, ARGV[3] = error, ARGV[4] = now (ISO), ARGV[5] = retention (s),
-- ARGV[6] = day (ISO)
-- Returns 1 when it settled the run, else 0.
local runs_key, claim_key, running_key, waiting_key, job_key, left_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local run_id, job_id, error_text, now, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local record = load_record(runs_key, run_id)
if not record or record.job_id ~= job_id then
  return 0
end
if record.state ~= '{QUEUED}' and record.state ~= '{RUNNING}' and record.state ~= '{WAITING}' then
  return 0
end
if redis.call('HGET', job_key, 'status') ~= 'failed' or redis.call('EXISTS', claim_key) == 1
    or redis.call('HEXISTS', running_key, run_id) == 1 or redis.call('HEXISTS', waiting_key, run_id) == 1
    or redis.call('ZSCORE', left_key, job_id) then
  return 0
end
record.state, record.error, record.ended_at = '{FAILED}', error_text, now
save_record(runs_key, run_id, record, retention_s)
note_failed(KEYS[7], ARGV[6], run_id, record, retention_s)
return 1
""", RECORD_LUA, NOTE_FAILED_LUA)


REQUEUE_ORPHANED = with_helpers(f"""
-- A copy that stopped because its claim was gone (guard.py) records nothing: another copy
-- owns the run, or the leader takes it over from the running hash. Unless Redis itself lost
-- the claim with the rest of the run's start (a failover to a replica that lagged): then
-- nothing backs the record any more, and the copy's worker puts the job back at the
-- queue's front here, after RQ handled the job's end, so that the run is not lost.
-- Only while the record names this job and says queued or running, no copy holds the
-- claim, the run is not finished, not in the running hash (recovery's), not waiting and
-- not left, and RQ still has the job's hash; a job still in the queue is not pushed twice.
-- KEYS[1] = day runs hash, KEYS[2] = the run's claim, KEYS[3] = running hash,
-- KEYS[4] = day finished set, KEYS[5] = day waiting hash, KEYS[6] = left jobs (sorted set),
-- KEYS[7] = queue, KEYS[8] = RQ's intermediate queue, KEYS[9] = RQ's job hash,
-- KEYS[10] = RQ's failed job registry
-- ARGV[1] = run_id, ARGV[2] = job_id, ARGV[3] = retention (s)
-- Returns 'requeued', 'in-queue' (made queued where it is), 'backed' or 'changed' (nothing done).
local runs_key, claim_key, running_key, finished_key, waiting_key, left_key = KEYS[1], KEYS[2], KEYS[3],
  KEYS[4], KEYS[5], KEYS[6]
local queue_key, intermediate_key, job_key, failed_key = KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local run_id, job_id, retention_s = ARGV[1], ARGV[2], ARGV[3]
local record = load_record(runs_key, run_id)
if not record or record.job_id ~= job_id or (record.state ~= '{QUEUED}' and record.state ~= '{RUNNING}') then
  return 'changed'
end
if redis.call('EXISTS', claim_key) == 1 or redis.call('SISMEMBER', finished_key, run_id) == 1
    or redis.call('HEXISTS', running_key, run_id) == 1 or redis.call('HEXISTS', waiting_key, run_id) == 1
    or redis.call('ZSCORE', left_key, job_id) or redis.call('EXISTS', job_key) == 0 then
  return 'backed'
end
redis.call('ZREM', failed_key, job_id)
-- Queued again: as RQ keeps a queued job (a finished one would expire with its result TTL).
redis.call('HSET', job_key, 'status', 'queued')
redis.call('PERSIST', job_key)
local outcome = 'in-queue'
if not (redis.call('LPOS', queue_key, job_id) or redis.call('LPOS', intermediate_key, job_id)) then
  redis.call('LPUSH', queue_key, job_id)
  outcome = 'requeued'
end
if record.state ~= '{QUEUED}' then
  record.state = '{QUEUED}'
  save_record(runs_key, run_id, record, retention_s)
end
return outcome
""", RECORD_LUA)


TakeOutcome = Literal["alive", "gone", "failed", "requeue"]


class RecoveryScripts(ScriptSet):
    """The scripts of runs taken over from dead copies and RQ's dropped jobs."""

    def take_if_abandoned(self, *, running_key: str, claim_key: str, runs_key: str, failures_key: str, run_id: str,
                          max_attempts: int, now_iso: str, retention_s: int, day: str,
                          cannot_requeue: str = "") -> ScriptCall[TakeOutcome]:
        """``cannot_requeue``: why the caller could not requeue the run (it is failed then)."""
        return ScriptCall(self.script(TAKE_IF_ABANDONED), [running_key, claim_key, runs_key, failures_key],
                          [run_id, max_attempts, now_iso, retention_s, cannot_requeue, day],
                          reply_text)  # type: ignore[arg-type]

    def requeue_stranded(self, *, intermediate_queue_key: str, queue_key: str, runs_key: str, job_id: str,
                         run_id: str) -> ScriptCall[bool]:
        return ScriptCall(self.script(REQUEUE_STRANDED), [intermediate_queue_key, queue_key, runs_key],
                          [job_id, run_id], bool)

    def settle_failed(self, *, runs_key: str, claim_key: str, running_key: str, waiting_key: str, job_key: str,
                      left_key: str, failures_key: str, run_id: str, job_id: str, error: str, now_iso: str,
                      retention_s: int, day: str) -> ScriptCall[bool]:
        """True when the run's record was failed with ``error`` (settle.py)."""
        return ScriptCall(self.script(SETTLE_FAILED),
                          [runs_key, claim_key, running_key, waiting_key, job_key, left_key, failures_key],
                          [run_id, job_id, error, now_iso, retention_s, day], bool)

    def requeue_orphaned(self, *, runs_key: str, claim_key: str, running_key: str, finished_key: str,
                         waiting_key: str, left_key: str, queue_key: str, intermediate_queue_key: str, job_key: str,
                         failed_registry_key: str, run_id: str, job_id: str,
                         retention_s: int) -> ScriptCall[str]:
        """'requeued', 'in-queue', 'backed' or 'changed' (REQUEUE_ORPHANED)."""
        return ScriptCall(self.script(REQUEUE_ORPHANED),
                          [runs_key, claim_key, running_key, finished_key, waiting_key, left_key, queue_key,
                           intermediate_queue_key, job_key, failed_registry_key],
                          [run_id, job_id, retention_s], reply_text)

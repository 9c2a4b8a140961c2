"""``doctor --repair`` (ops/consistency.py): doctor reads a day, decides, and only then
repairs. Each script first checks that the run's record is still as read (its state and job
id) and that the entry it touches still holds the value read, else does nothing and says
so. A repair never overwrites a record that changed meanwhile."""

from __future__ import annotations

from typing import Literal

from ..redis_values import reply_text
from ..runs import BLOCKED, FAILED, FINISHED, QUEUED, RUNNING, WAITING
from .shared import (
    NOTE_FAILED_LUA,
    RECORD_LUA,
    ScriptCall,
    ScriptSet,
    with_helpers,
)

# doctor reads a day, decides, and only then repairs: each script first checks that the
# run's record is still as read (its state and job id) and that the entry it touches still
# holds the value read, else does nothing and says so. A repair never overwrites a record
# that changed meanwhile.

DOCTOR_LUA = f"""
-- The leader turns parked runs waiting <-> blocked as their upstream runs change: one
-- state for this check.
local function held_state(state)
  return state == '{WAITING}' or state == '{BLOCKED}'
end
-- The record (nil: none) still as doctor read it: ``state`` ('' = no record) and the job
-- it names (``job_id``, '' = none).
local function still_as_read(record, state, job_id)
  if not record then
    return state == ''
  end
  local job = type(record.job_id) == 'string' and record.job_id or ''
  return job == job_id and (record.state == state or (held_state(state) and held_state(record.state)))
end
"""


DOCTOR_REQUEUE = with_helpers(f"""
-- A queued run whose job is in no queue, registry, set-aside list or left: its job id back at
-- the queue's front while RQ still has the job's hash (and off RQ's failed registry, so
-- that RQ's registries do not call a waiting job failed), else the run recorded failed.
-- Only while the record still says queued with this job and the job is in neither the
-- queue nor RQ's intermediate queue (pushed or taken meanwhile): never a second entry.
-- KEYS[1] = day runs hash, KEYS[2] = queue, KEYS[3] = RQ's intermediate queue,
-- KEYS[4] = RQ's job hash of the job, KEYS[5] = RQ's failed job registry, KEYS[6] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = job_id, ARGV[3] = the error to record if RQ's job hash is gone,
-- ARGV[4] = now (ISO), ARGV[5] = retention (s), ARGV[6] = day (ISO)
-- Returns 'requeued', 'failed', 'in-queue' or 'changed' (the record; nothing done).
local runs_key, queue_key, intermediate_key, job_key, failed_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local run_id, job_id, error_text, now, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local record = load_record(runs_key, run_id)
if not still_as_read(record, '{QUEUED}', job_id) then
  return 'changed'
end
if redis.call('LPOS', queue_key, job_id) or redis.call('LPOS', intermediate_key, job_id) then
  return 'in-queue'
end
if redis.call('EXISTS', job_key) == 1 then
  redis.call('ZREM', failed_key, job_id)
  redis.call('LPUSH', queue_key, job_id)
  return 'requeued'
end
record.state, record.ended_at, record.error = '{FAILED}', now, error_text
save_record(runs_key, run_id, record, retention_s)
note_failed(KEYS[6], ARGV[6], run_id, record, retention_s)
return 'failed'
""", RECORD_LUA, DOCTOR_LUA, NOTE_FAILED_LUA)


DOCTOR_SETTLE = with_helpers(f"""
-- A run's record set to what backs it: 'failed' with the reason (nothing can run it),
-- 'queued' (a parked run whose job is pushed already), or 'finished' (a queued run in the
-- day's finished set, whose job BEGIN skips: only while it is in that set); its waiting
-- entry, if given, removed in the same step.
-- KEYS[1] = day runs hash, KEYS[2] = day waiting hash, KEYS[3] = day finished set, KEYS[4] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = its state as read, ARGV[3] = its job id as read ('' = none),
-- ARGV[4] = the new state ('failed' | 'queued' | 'finished'), ARGV[5] = the error (for 'failed'),
-- ARGV[6] = its waiting entry to remove, as read ('' = none), ARGV[7] = now (ISO), ARGV[8] = retention (s),
-- ARGV[9] = day (ISO)
-- Returns 1, or 0 when the record or the entry changed since (nothing done).
local runs_key, waiting_key, finished_key = KEYS[1], KEYS[2], KEYS[3]
local run_id, state, job_id, new_state, error_text, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now, retention_s = ARGV[7], ARGV[8]
local record = load_record(runs_key, run_id)
if not still_as_read(record, state, job_id) then
  return 0
end
if new_state == '{FINISHED}' and redis.call('SISMEMBER', finished_key, run_id) == 0 then
  return 0
end
if entry ~= '' then
  if redis.call('HGET', waiting_key, run_id) ~= entry then
    return 0
  end
  redis.call('HDEL', waiting_key, run_id)
end
record.state = new_state
if new_state == '{FAILED}' then
  record.ended_at, record.error = now, error_text
else
  record.error = cjson.null
end
save_record(runs_key, run_id, record, retention_s)
if new_state == '{FAILED}' then
  note_failed(KEYS[4], ARGV[9], run_id, record, retention_s)
end
return 1
""", RECORD_LUA, DOCTOR_LUA, NOTE_FAILED_LUA)


DOCTOR_PARK = with_helpers(f"""
-- A parked run (waiting or blocked) parked again in the day's waiting hash, as fan-out
-- parks it (fanout._hold): the leader releases it once its upstream runs have finished.
-- KEYS[1] = day runs hash, KEYS[2] = day waiting hash, KEYS[3] = waiting days set,
-- KEYS[4] = day dependency counts (its held:<task> hint: the release looks only at tasks with some)
-- ARGV[1] = run_id, ARGV[2] = its job id as read, ARGV[3] = the entry (fanout.Parked JSON),
-- ARGV[4] = the entry it replaces, as read ('' = none), ARGV[5] = day (ISO), ARGV[6] = retention (s),
-- ARGV[7] = the run's task
-- Returns 1, or 0 when the record or the entry changed since (nothing done).
local runs_key, waiting_key, days_key, deps_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local run_id, job_id, entry, old, day, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if not still_as_read(load_record(runs_key, run_id), '{WAITING}', job_id) then
  return 0
end
local current = redis.call('HGET', waiting_key, run_id)
if (old == '' and current) or (old ~= '' and current ~= old) then
  return 0
end
redis.call('HSET', waiting_key, run_id, entry)
redis.call('EXPIRE', waiting_key, retention_s)
redis.call('HINCRBY', deps_key, 'held:' .. ARGV[7], 1)
redis.call('EXPIRE', deps_key, retention_s)
redis.call('SADD', days_key, day)
return 1
""", RECORD_LUA, DOCTOR_LUA)


DOCTOR_LIST_RUNNING = with_helpers(f"""
-- A running run listed in the running hash, where recovery looks for runs whose copy died
-- (BEGIN lists every run it claims; this one is missing): only while its record still says
-- running with the same job and claim owner.
-- KEYS[1] = day runs hash, KEYS[2] = running hash
-- ARGV[1] = run_id, ARGV[2] = day (ISO), ARGV[3] = the claim owner its record names ('' = none),
-- ARGV[4] = its job id as read ('' = none)
-- Returns 1, or 0 when the record changed since (nothing done).
local runs_key, running_key = KEYS[1], KEYS[2]
local run_id, day, owner, job_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local record = load_record(runs_key, run_id)
if not still_as_read(record, '{RUNNING}', job_id) then
  return 0
end
if (type(record.owner) == 'string' and record.owner or '') ~= owner then
  return 0
end
redis.call('HSET', running_key, run_id, day)
return 1
""", RECORD_LUA, DOCTOR_LUA)


DOCTOR_DROP_ENTRY = with_helpers("""
-- A stale entry removed: a field of the running hash, of a day's waiting hash, or of
-- left's info hash together with its member of left -- only while the field still holds
-- the value read and the run's record is still as read.
-- KEYS[1] = the hash, KEYS[2] = day runs hash, KEYS[3] = left (only for a left entry)
-- ARGV[1] = field, ARGV[2] = its value as read, ARGV[3] = run_id,
-- ARGV[4] = the record's state as read ('' = no record), ARGV[5] = its job id as read ('' = none)
-- Returns 1 when removed, else 0.
local hash_key, runs_key, left_key = KEYS[1], KEYS[2], KEYS[3]
local field, value, run_id, state, job_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', hash_key, field) ~= value then
  return 0
end
if not still_as_read(load_record(runs_key, run_id), state, job_id) then
  return 0
end
redis.call('HDEL', hash_key, field)
if left_key then
  redis.call('ZREM', left_key, field)
end
return 1
""", RECORD_LUA, DOCTOR_LUA)


# DOCTOR_REQUEUE's answer.
RequeueOutcome = Literal["requeued", "failed", "in-queue", "changed"]


class DoctorScripts(ScriptSet):
    """The scripts of doctor --repair."""

    def doctor_requeue(self, *, runs_key: str, queue_key: str, intermediate_queue_key: str, job_key: str,
                       failed_registry_key: str, failures_key: str, run_id: str, job_id: str, error: str,
                       now_iso: str, retention_s: int, day: str) -> ScriptCall[RequeueOutcome]:
        """``error``: the record's, should RQ's job hash be gone."""
        return ScriptCall(self.script(DOCTOR_REQUEUE),
                          [runs_key, queue_key, intermediate_queue_key, job_key, failed_registry_key, failures_key],
                          [run_id, job_id, error, now_iso, retention_s, day], reply_text)  # type: ignore[arg-type]

    def doctor_settle(self, *, runs_key: str, waiting_key: str, finished_key: str, failures_key: str, run_id: str,
                      state: str, job_id: str, new_state: str, error: str, entry: str, now_iso: str,
                      retention_s: int, day: str) -> ScriptCall[bool]:
        """``state``/``job_id``: the record as read; ``entry``: its waiting entry to remove ('' = none)."""
        return ScriptCall(self.script(DOCTOR_SETTLE), [runs_key, waiting_key, finished_key, failures_key],
                          [run_id, state, job_id, new_state, error, entry, now_iso, retention_s, day], bool)

    def doctor_park(self, *, runs_key: str, waiting_key: str, waiting_days_key: str, deps_key: str, run_id: str,
                    job_id: str, entry: str, old_entry: str, day: str, retention_s: int,
                    task: str) -> ScriptCall[bool]:
        return ScriptCall(self.script(DOCTOR_PARK), [runs_key, waiting_key, waiting_days_key, deps_key],
                          [run_id, job_id, entry, old_entry, day, retention_s, task], bool)

    def doctor_list_running(self, *, runs_key: str, running_key: str, run_id: str, day: str, owner: str,
                            job_id: str) -> ScriptCall[bool]:
        return ScriptCall(self.script(DOCTOR_LIST_RUNNING), [runs_key, running_key], [run_id, day, owner, job_id], bool)

    def doctor_drop_entry(self, *, hash_key: str, runs_key: str, field: str, value: str, run_id: str, state: str,
                          job_id: str, zset_key: str | None = None) -> ScriptCall[bool]:
        """``zset_key``: left, for an entry of left's info hash (its member goes too)."""
        keys = [hash_key, runs_key] + ([zset_key] if zset_key else [])
        return ScriptCall(self.script(DOCTOR_DROP_ENTRY), keys, [field, value, run_id, state, job_id], bool)

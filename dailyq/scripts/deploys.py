"""Rolling deploys: runs a node cannot run (its table lacks their task) left for a node that
can, returned to the queue or removed (deploys.py)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from ..redis_values import reply_text
from ..runs import BLOCKED, QUEUED, REMOVED, WAITING
from .shared import (
    DEPS_LUA,
    NOW_LUA,
    RECORD_LUA,
    ScriptCall,
    ScriptSet,
    lua_flag,
    lua_ms,
    reply_texts,
    with_helpers,
)

LEAVE = with_helpers(f"""
-- A worker whose table lacks a job's task, param or function leaves the job for a node
-- whose table has it: off RQ's intermediate queue (so no clean-up takes it for stranded)
-- and into the left set, due back in the queue after a wait that doubles with each leave
-- (so no worker spins on it); its RQ job stays queued. The run's record, while it still
-- waits for exactly this job, says why in its error (status shows it).
-- KEYS[1] = left set, KEYS[2] = left info hash, KEYS[3] = RQ's intermediate queue,
-- KEYS[4] = day runs hash
-- ARGV[1] = job id, ARGV[2] = info JSON for a first leave (run_id, day, task, param_json,
-- func), ARGV[3] = this worker's table fingerprint, ARGV[4] = node, ARGV[5] = why (words),
-- ARGV[6] = first wait (ms), ARGV[7] = longest wait (ms), ARGV[8] = retention (s)
-- Returns the wait (ms) before the job is back in the queue.
local left_key, info_key, intermediate_key, runs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, base_json, table_fp, node, why = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local first_wait, longest_wait, retention_s = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local now = redis_now_ms()
redis.call('LREM', intermediate_key, 1, job_id)
local raw = redis.call('HGET', info_key, job_id)
local info = cjson.decode(raw or base_json)
info.count = (tonumber(info.count) or 0) + 1
info.first_ms = info.first_ms or now
info.reason, info.node = why, node
local tables = info.tables or {{}}
local seen = false
for _, fp in ipairs(tables) do
  if fp == table_fp then
    seen = true
  end
end
if not seen then
  tables[#tables + 1] = table_fp
end
info.tables = tables
redis.call('HSET', info_key, job_id, cjson.encode(info))
local wait = math.min(longest_wait, first_wait * 2 ^ math.min(info.count - 1, 20))
redis.call('ZADD', left_key, now + wait, job_id)
local record = load_record(runs_key, info.run_id)
if record and record.job_id == job_id and record.state == '{QUEUED}' then
  record.error = 'left by node ' .. node .. ' (its table: ' .. why .. '); waiting for a node whose table has it'
  save_record(runs_key, info.run_id, record, retention_s)
end
return wait
""", NOW_LUA, RECORD_LUA)


RETURN_LEFT = with_helpers("""
-- The leader puts left jobs whose wait has passed back at the front of the queue: those
-- some live worker's table can run; the others wait once more (nothing would run them).
-- KEYS[1] = left set, KEYS[2] = queue
-- ARGV[1] = wait (ms) for the ones kept, ARGV[2] = n, then n job ids to return when due,
--   then the job ids to keep when due
-- Returns {next due (ms; -1 when the set is empty), job ids moved...}.
local left_key, queue_key = KEYS[1], KEYS[2]
local wait, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis_now_ms()
local moved = {}
for i = 3, #ARGV do
  local job_id = ARGV[i]
  local due = tonumber(redis.call('ZSCORE', left_key, job_id))
  if due and due <= now then
    if i <= 2 + n then
      redis.call('ZREM', left_key, job_id)
      moved[#moved + 1] = job_id
    else
      redis.call('ZADD', left_key, 'XX', now + wait, job_id)
    end
  end
end
for i = #moved, 1, -1 do
  redis.call('LPUSH', queue_key, moved[i])
end
local first = redis.call('ZRANGE', left_key, 0, 0, 'WITHSCORES')
local reply = {#first == 2 and first[2] or '-1'}
for _, job_id in ipairs(moved) do
  reply[#reply + 1] = job_id
end
return reply
""", NOW_LUA)


# How REMOVE_LEFT and REMOVE_WAITING end a run: 'removed', final (not failed), its run id in
# the day's finished set so that no copy executes it and its downstream runs go on.
END_REMOVED_LUA = f"""
local function end_removed(runs_key, finished_key, deps_key, run_id, record, now, why, retention_s)
  record.state, record.ended_at, record.error = '{REMOVED}', now, why
  save_record(runs_key, run_id, record, retention_s)
  if redis.call('SADD', finished_key, run_id) == 1 then
    count_finished(deps_key, record.task, retention_s)
  end
  redis.call('EXPIRE', finished_key, retention_s)
end
"""


REMOVE_LEFT = with_helpers(f"""
-- A left job's run that no live node's table has had for the grace ends 'removed': final,
-- not failed; its run id joins the day's finished set, so no copy executes it and its
-- downstream runs go on as if it had finished. A left job whose run no longer waits for
-- it (finished, superseded by a later job, failed...) is just forgotten.
-- KEYS[1] = left set, KEYS[2] = left info hash, KEYS[3] = day runs hash, KEYS[4] = day
-- finished set, KEYS[5] = day dependency counts (DEPS_LUA)
-- ARGV[1] = job id, ARGV[2] = run id, ARGV[3] = now (ISO), ARGV[4] = why (the record's
-- error), ARGV[5] = retention (s), ARGV[6] = '1' to remove the run, '0' only to forget
-- Returns 'removed' or 'forgotten'.
local left_key, info_key, runs_key, finished_key, deps_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_id, run_id, now, why, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
redis.call('ZREM', left_key, job_id)
redis.call('HDEL', info_key, job_id)
local record = load_record(runs_key, run_id)
if ARGV[6] ~= '1' or not record or record.job_id ~= job_id or record.state ~= '{QUEUED}' then
  return 'forgotten'
end
end_removed(runs_key, finished_key, deps_key, run_id, record, now, why, retention_s)
return 'removed'
""", RECORD_LUA, DEPS_LUA, END_REMOVED_LUA)


REMOVE_WAITING = with_helpers(f"""
-- A parked run (waiting for its upstream runs) that no live node's table has had for the
-- grace ends 'removed', as REMOVE_LEFT does for a left job: out of the waiting hash, its
-- run id in the day's finished set. Only while it is still held and waiting or blocked.
-- KEYS[1] = day waiting hash, KEYS[2] = day runs hash, KEYS[3] = day finished set,
-- KEYS[4] = day dependency counts (DEPS_LUA)
-- ARGV[1] = run id, ARGV[2] = now (ISO), ARGV[3] = why (the record's error), ARGV[4] = retention (s)
-- Returns 'removed' or 'kept'.
local waiting_key, runs_key, finished_key, deps_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local run_id, now, why, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local record = load_record(runs_key, run_id)
if redis.call('HEXISTS', waiting_key, run_id) == 0 or not record
    or (record.state ~= '{WAITING}' and record.state ~= '{BLOCKED}') then
  return 'kept'
end
redis.call('HDEL', waiting_key, run_id)
end_removed(runs_key, finished_key, deps_key, run_id, record, now, why, retention_s)
return 'removed'
""", RECORD_LUA, DEPS_LUA, END_REMOVED_LUA)


class DeployScripts(ScriptSet):
    """The scripts of runs left by a node whose table lacks their task."""

    def leave(self, *, left_key: str, left_info_key: str, intermediate_queue_key: str, runs_key: str, job_id: str,
              info_json: str, table: str, node: str, why: str, first_wait_ms: int, longest_wait_ms: int,
              retention_s: int) -> ScriptCall[int]:
        """The wait (ms) before the left job is back in the queue."""
        return ScriptCall(self.script(LEAVE), [left_key, left_info_key, intermediate_queue_key, runs_key],
                          [job_id, info_json, table, node, why, first_wait_ms, longest_wait_ms, retention_s],
                          lambda reply: lua_ms(reply))

    def return_left(self, *, left_key: str, queue_key: str, runnable: Sequence[str], kept: Sequence[str],
                    keep_ms: int) -> ScriptCall[tuple[int | None, list[str]]]:
        """(when the next left job is due, ms, or None when none is left; the job ids moved)."""
        def parse(reply: Any) -> tuple[int | None, list[str]]:
            next_ms = lua_ms(reply[0])
            return (next_ms if next_ms >= 0 else None), reply_texts(reply[1:])

        return ScriptCall(self.script(RETURN_LEFT), [left_key, queue_key], [keep_ms, len(runnable), *runnable, *kept],
                          parse)

    def remove_left(self, *, left_key: str, left_info_key: str, runs_key: str, finished_key: str, deps_key: str,
                    job_id: str, run_id: str, now_iso: str, why: str, retention_s: int,
                    remove: bool) -> ScriptCall[Literal["removed", "forgotten"]]:
        return ScriptCall(self.script(REMOVE_LEFT), [left_key, left_info_key, runs_key, finished_key, deps_key],
                          [job_id, run_id, now_iso, why, retention_s, lua_flag(remove)], reply_text)  # type: ignore[arg-type]

    def remove_waiting(self, *, waiting_key: str, runs_key: str, finished_key: str, deps_key: str, run_id: str,
                       now_iso: str, why: str, retention_s: int) -> ScriptCall[Literal["removed", "kept"]]:
        return ScriptCall(self.script(REMOVE_WAITING), [waiting_key, runs_key, finished_key, deps_key],
                          [run_id, now_iso, why, retention_s], reply_text)  # type: ignore[arg-type]

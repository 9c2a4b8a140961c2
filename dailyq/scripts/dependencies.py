"""Runs parked for their upstream runs: their records made waiting, blocked or queued, and
the day's dependency counts (fanout.py, dependencies.py, dependency_counts.py, day_feed.py)."""

from __future__ import annotations

from typing import Any, Sequence

from ..redis_values import reply_text
from ..runs import BLOCKED, CANCELLED, FAILED, SKIPPED, WAITING
from .shared import (
    RECORD_LUA,
    ScriptCall,
    ScriptSet,
    with_helpers,
)

SET_RUN_STATE = with_helpers("""
-- Sets the state of runs held back for their upstream runs (dependencies.py): 'waiting'
-- when a fan-out holds a run enqueued before (its record kept), 'queued' when released.
-- The error goes (a released run was maybe 'blocked'). A run without a record is left alone.
-- KEYS[1] = day runs hash
-- ARGV[1] = retention (s), ARGV[2] = state, ARGV[3..] = run ids
-- Returns the number of records changed.
local runs_key = KEYS[1]
local retention_s, state = ARGV[1], ARGV[2]
local changed = 0
for i = 3, #ARGV do
  local record = load_record(runs_key, ARGV[i])
  if record then
    record.state, record.error = state, cjson.null
    save_record(runs_key, ARGV[i], record, retention_s)
    changed = changed + 1
  end
end
return changed
""", RECORD_LUA)


RECOUNT_DAY = with_helpers("""
-- Counts a day's records afresh into its counts hash (day_feed.py): a day an older version
-- began (no '_counted'), or counts that disagree with the records. In one step, so no
-- record changes between the count and the counts written; '_seq' is kept. An HSCAN in
-- slices inside the script (a field met twice counted once) rather than one HGETALL
-- reply of the whole day in the script's memory.
-- KEYS[1] = day runs hash, KEYS[2] = day counts hash
-- Returns the number of records counted; an error, counting nothing, when a record is not JSON.
local runs_key, counts_key = KEYS[1], KEYS[2]
local seq = redis.call('HGET', counts_key, '_seq') or 0
local counts, seen, n, cursor = {}, {}, 0, '0'
repeat
  local page = redis.call('HSCAN', runs_key, cursor, 'COUNT', 1000)
  cursor = page[1]
  for i = 1, #page[2], 2 do
    local run_id = page[2][i]
    if not seen[run_id] then
      seen[run_id] = true
      n = n + 1
      local ok, record = pcall(cjson.decode, page[2][i + 1])
      if not ok or type(record) ~= 'table' then
        return redis.error_reply('unreadable run record ' .. run_id .. ' in ' .. runs_key)
      end
      local task = tostring(record.task)
      local fields = {'s|' .. tostring(record.state) .. '|' .. task, 'r|' .. tostring(record.slot) .. '|' .. task}
      for _, field in ipairs(fields) do
        counts[field] = (counts[field] or 0) + 1
      end
    end
  end
until cursor == '0'
redis.call('DEL', counts_key)
if n == 0 then
  return 0  -- no records: nothing to count (the day's first write starts its counts)
end
redis.call('HSET', counts_key, '_counted', 1, '_seq', seq)
local flat = {}
for field, number in pairs(counts) do
  flat[#flat + 1] = field
  flat[#flat + 1] = number
  if #flat >= 1000 then  -- within unpack's limit, however many tasks and slots
    redis.call('HSET', counts_key, unpack(flat))
    flat = {}
  end
end
if #flat > 0 then
  redis.call('HSET', counts_key, unpack(flat))
end
local ttl_ms = redis.call('PTTL', runs_key)
if ttl_ms > 0 then
  redis.call('PEXPIRE', counts_key, ttl_ms)
end
return n
""")


HOLD_WAITING = with_helpers(f"""
-- Parked runs of one task whose upstream runs have not all finished: 'blocked', with an
-- error naming the upstream run, while one of those is failed, skipped, cancelled or blocked itself;
-- 'waiting' again once none is (a rerun queued it). Checked and set in one step: only
-- records now 'waiting' or 'blocked' change (a run released or begun meanwhile stays as
-- it is), and a record already right is not rewritten.
-- KEYS[1] = day runs hash (upstream and downstream runs of one day share it)
-- ARGV[1] = retention (s), ARGV[2] = a blocker the caller found ('' = none: an upstream
--   slot with no run record, whose params callable failed for good), ARGV[3] = its error,
--   ARGV[4] = n, then n upstream run ids (those not in the day's finished set), then the
--   parked run ids
-- Returns {{blocking upstream run id or '', number of records changed}}.
local runs_key = KEYS[1]
local retention_s, n = ARGV[1], tonumber(ARGV[4])
local blocker, error_text = ARGV[2], cjson.null
if blocker ~= '' then
  error_text = ARGV[3]
  n = 0
end
for i = 5, 4 + n do
  local upstream = load_record(runs_key, ARGV[i])
  if upstream and (upstream.state == '{FAILED}' or upstream.state == '{SKIPPED}' or upstream.state == '{BLOCKED}'
      or upstream.state == '{CANCELLED}') then
    blocker = ARGV[i]
    error_text = 'upstream run ' .. tostring(upstream.task) .. '(' .. tostring(upstream.param_json) .. ') ' ..
      upstream.state .. ': ' .. blocker
    break
  end
end
local target = blocker ~= '' and '{BLOCKED}' or '{WAITING}'
local changed = 0
for i = 5 + tonumber(ARGV[4]), #ARGV do
  local record = load_record(runs_key, ARGV[i])
  if record and (record.state == '{WAITING}' or record.state == '{BLOCKED}')
      and (record.state ~= target or record.error ~= error_text) then
    record.state, record.error = target, error_text
    save_record(runs_key, ARGV[i], record, retention_s)
    changed = changed + 1
  end
end
return {{blocker, changed}}
""", RECORD_LUA)


COUNT_DEPS = with_helpers("""
-- The day's dependency counts made anew from what they count (dependency_counts.py): for
-- each task, its run ids in the finished set ('done:' fields; a member without a record
-- counts under 'done:~'), and its entries in the waiting hash ('held:' fields); then
-- '~counted'. Once per day (a day an older version wrote, or whose counts a rerun's SREM
-- or an older writer made disagree with the set): it reads the whole day, so it is the
-- exception, never the path of a tick. Atomic, so no FINISH slips between read and write.
-- KEYS[1] = day dependency counts, KEYS[2] = day finished set, KEYS[3] = day runs hash,
-- KEYS[4] = day waiting hash
-- ARGV[1] = retention (s)
-- Returns the number of finished run ids counted.
local deps_key, finished_key, runs_key, waiting_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local retention_s = ARGV[1]
local counts = {}
local function bump(field)
  counts[field] = (counts[field] or 0) + 1
end
local members = redis.call('SMEMBERS', finished_key)
for _, run_id in ipairs(members) do
  local raw = redis.call('HGET', runs_key, run_id)
  local ok, record = pcall(cjson.decode, raw or '')
  bump('done:' .. ((ok and type(record) == 'table' and type(record.task) == 'string') and record.task or '~'))
end
local entries = redis.call('HGETALL', waiting_key)
for i = 2, #entries, 2 do
  local ok, held = pcall(cjson.decode, entries[i])
  bump('held:' .. ((ok and type(held) == 'table' and type(held.task) == 'string') and held.task or '~'))
end
for _, field in ipairs(redis.call('HKEYS', deps_key)) do
  if string.sub(field, 1, 5) == 'done:' or string.sub(field, 1, 5) == 'held:' then
    redis.call('HDEL', deps_key, field)
  end
end
for field, n in pairs(counts) do
  redis.call('HSET', deps_key, field, n)
end
redis.call('HSET', deps_key, '~counted', '1')
redis.call('EXPIRE', deps_key, retention_s)
return #members
""")


# HOLD_WAITING's answer: (the upstream run blocking the parked runs or None, records changed).
HoldReply = tuple["str | None", int]


def _parse_hold(reply: Any) -> HoldReply:
    blocker = reply_text(reply[0])
    return (blocker or None), int(reply[1])


class DependencyScripts(ScriptSet):
    """The scripts of parked runs and the day's dependency counts."""

    def set_run_state(self, *, runs_key: str, retention_s: int, state: str,
                      run_ids: Sequence[str]) -> ScriptCall[int]:
        """Returns how many of the runs had a record (and now have ``state``)."""
        return ScriptCall(self.script(SET_RUN_STATE), [runs_key], [retention_s, state, *run_ids], int)

    def recount_day(self, *, runs_key: str, counts_key: str) -> ScriptCall[int]:
        """Counts the day's records afresh (day_feed.py); returns how many there are."""
        return ScriptCall(self.script(RECOUNT_DAY), [runs_key, counts_key], [], int)

    def hold_waiting(self, *, runs_key: str, retention_s: int, unfinished_upstream: Sequence[str],
                     held: Sequence[str], given_blocker: tuple[str, str] | None = None) -> ScriptCall[HoldReply]:
        """``held`` runs of one task, ``unfinished_upstream`` their upstream runs not in the
        day's finished set; ``given_blocker`` (id, error) blocks them whatever the records say.
        Returns (the upstream run blocking them or None, records changed)."""
        blocker_id, blocker_error = given_blocker or ("", "")
        return ScriptCall(self.script(HOLD_WAITING), [runs_key],
                          [retention_s, blocker_id, blocker_error, len(unfinished_upstream), *unfinished_upstream,
                           *held], _parse_hold)

    def count_deps(self, *, deps_key: str, finished_key: str, runs_key: str, waiting_key: str,
                   retention_s: int) -> ScriptCall[int]:
        """The day's dependency counts made anew; returns the finished run ids counted."""
        return ScriptCall(self.script(COUNT_DEPS), [deps_key, finished_key, runs_key, waiting_key], [retention_s], int)

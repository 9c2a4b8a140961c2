"""When Redis itself fails: the generation mark that tells a Redis that lost its data, what
a node remembers past it (generation.py, alerts/data_lost.py), and the mark of a Redis out
of memory (redis_memory.py)."""

from __future__ import annotations

from typing import Any, Sequence

from ..redis_values import reply_text
from .shared import (
    NOW_LUA,
    ScriptCall,
    ScriptSet,
    allow_oom,
    lua_ms,
    reply_texts,
    with_helpers,
)

MEMORY_FULL_MARK = allow_oom(with_helpers("""
-- A scheduler saw Redis refuse a write for memory: keeps the one small key that says so
-- (status, health and the leader read it), since the episode's first sighting. Allowed on
-- a full Redis: it is what a full Redis must still be able to tell.
-- KEYS[1] = memory-full marker
-- ARGV[1] = node, ARGV[2] = ttl (ms), ARGV[3] = used_memory, ARGV[4] = maxmemory,
-- ARGV[5] = JSON list of the slots whose fan-out was refused ('' = leave them as they are),
-- ARGV[6] = '' for a refusal seen, or the since (ms) of the episode whose redis_full was
-- delivered: that marker (only) remembers it; none is made (the episode may be over).
-- Returns {since (ms), '1' if redis_full was delivered else '0', the marker JSON}, or
-- {'0', '0', '{}'} when there was no marker to note a delivery in.
local marker_key = KEYS[1]
local node, ttl_ms, used, maxmemory, slots, delivered = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now = redis_now_ms()
local raw = redis.call('GET', marker_key)
local mark = raw and cjson.decode(raw)
if delivered ~= '' then
  if not mark or tostring(mark.since_ms) ~= delivered then
    return {'0', '0', '{}'}
  end
  mark.alerted = true
else
  mark = mark or {since_ms = now, node = node, alerted = false}
  mark.last_ms, mark.last_node = now, node
  mark.used_memory, mark.maxmemory = tonumber(used), tonumber(maxmemory)
  if slots ~= '' then
    mark.slots = cjson.decode(slots)
  end
end
raw = cjson.encode(mark)
redis.call('SET', marker_key, raw, 'PX', ttl_ms)
return {tostring(mark.since_ms), mark.alerted and '1' or '0', raw}
""", NOW_LUA))


GENERATION_ENSURE = with_helpers("""
-- dailyq's mark in this Redis: read it, and write it where it is gone or not ours.
-- KEYS[1] = generation key
-- ARGV[1] = a fresh token, ARGV[2] = the token this process remembers ('' at its start),
-- ARGV[3] = this node, ARGV[4] = when this process last saw its token (ms, Redis clock; '')
-- Returns the mark in force afterwards (JSON). Check and set in one script, so that of
-- two processes noticing a loss at once one writes the new mark and both adopt it.
local key = KEYS[1]
local token, remembered, node, last_seen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local raw = redis.call('GET', key)
local entry = nil
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' and type(decoded.token) == 'string' then
    entry = decoded
  end
end
-- Ours, or a process with nothing to compare found one, or the loss was noted already.
if entry and (remembered == '' or entry.token == remembered or entry.lost_since_ms) then
  return raw
end
local now = redis_now_ms()
if not entry then
  entry = {token = token, created_ms = now}
end
if remembered ~= '' then
  -- A mark gone, unreadable, or made by a process that started after the loss (it had
  -- nothing to compare): this process is the first to know what was lost.
  entry.previous = remembered
  entry.lost_since_ms = now
  entry.noticed_by = node
  if last_seen ~= '' then
    entry.last_seen_ms = tonumber(last_seen)
  end
end
raw = cjson.encode(entry)
redis.call('SET', key, raw)
return raw
""", NOW_LUA)


RESTORE_MEMORY = with_helpers("""
-- After a loss of Redis's data: writes back what one process remembers.
-- KEYS[1] = cursor hash, KEYS[2] = paused hash
-- ARGV[1] = n, then n pairs (task, ISO cursor), then pairs (task, pause JSON)
-- A cursor is raised, never lowered: each is an aware UTC time written by isoformat(),
-- so string order is time order, and of several nodes writing back the latest wins.
-- A pause is added only where none is (HSETNX): a pause or resume since the loss stays.
-- Returns {the cursor hash afterwards (flat pairs), the tasks whose pause was written}.
local cursor_key, paused_key = KEYS[1], KEYS[2]
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local task, cursor = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local stored = redis.call('HGET', cursor_key, task)
  if not stored or stored < cursor then
    redis.call('HSET', cursor_key, task, cursor)
  end
end
local restored = {}
for i = 2 + 2 * n, #ARGV - 1, 2 do
  if redis.call('HSETNX', paused_key, ARGV[i], ARGV[i + 1]) == 1 then
    restored[#restored + 1] = ARGV[i]
  end
end
return {redis.call('HGETALL', cursor_key), restored}
""")


DATA_LOST_ALERT_CLAIM = with_helpers("""
-- The redis_data_lost alert of one generation: one leader POSTs it at a time.
-- KEYS[1] = the alert's key
-- ARGV[1] = generation token, ARGV[2] = sender (owner), ARGV[3] = claim (ms)
-- Returns 'claimed' (ours to send now), 'held' (another sender's claim holds), or the
-- state it ended in for good: 'delivered', 'refused' or 'given-up'.
local key, generation, owner, claim_ms = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local raw = redis.call('GET', key)
if raw then
  local ok, entry = pcall(cjson.decode, raw)
  if ok and type(entry) == 'table' and entry.generation == generation then
    if entry.state ~= 'sending' then
      return entry.state
    end
    if entry.owner ~= owner then
      return 'held'
    end
  end
end
redis.call('SET', key, cjson.encode({generation = generation, state = 'sending', owner = owner}), 'PX', claim_ms)
return 'claimed'
""")


class RedisFaultScripts(ScriptSet):
    """The scripts of a Redis that lost its data or is out of memory."""

    def memory_full_mark(self, *, marker_key: str, node: str, ttl_ms: int, used_memory: int, maxmemory: int,
                         slots_json: str | None, delivered_since_ms: int | None = None,
                         ) -> ScriptCall[tuple[int, bool, str]]:
        """(since ms, whether redis_full was delivered, the marker JSON); with
        ``delivered_since_ms``, only notes that delivery on that episode's marker."""
        return ScriptCall(self.script(MEMORY_FULL_MARK), [marker_key],
                          [node, ttl_ms, used_memory, maxmemory, "" if slots_json is None else slots_json,
                           "" if delivered_since_ms is None else delivered_since_ms],
                          lambda reply: (lua_ms(reply[0]), reply_text(reply[1]) == "1", reply_text(reply[2])))

    def generation_ensure(self, *, generation_key: str, token: str, remembered: str | None, node: str,
                          last_seen_ms: int | None) -> ScriptCall[str]:
        """The mark in force afterwards (its JSON)."""
        return ScriptCall(self.script(GENERATION_ENSURE), [generation_key],
                          [token, remembered or "", node, "" if last_seen_ms is None else last_seen_ms], reply_text)

    def restore_memory(self, *, cursor_key: str, paused_key: str, cursors: Sequence[tuple[str, str]],
                       paused: Sequence[tuple[str, str]]) -> ScriptCall[tuple[dict[str, str], list[str]]]:
        """(the cursor hash afterwards, the tasks whose pause was written back)."""
        args: list[Any] = [len(cursors)]
        for task, cursor in cursors:
            args += [task, cursor]
        for task, entry in paused:
            args += [task, entry]

        def parse(reply: Any) -> tuple[dict[str, str], list[str]]:
            flat = reply_texts(reply[0])
            return dict(zip(flat[::2], flat[1::2])), reply_texts(reply[1])

        return ScriptCall(self.script(RESTORE_MEMORY), [cursor_key, paused_key], args, parse)

    def data_lost_alert_claim(self, *, alert_key: str, generation: str, owner: str,
                              claim_ms: int) -> ScriptCall[str]:
        return ScriptCall(self.script(DATA_LOST_ALERT_CLAIM), [alert_key], [generation, owner, claim_ms], reply_text)

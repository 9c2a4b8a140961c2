"""Stored computed params (params_book.py) and the table differences between nodes
(table_watch.py)."""

from __future__ import annotations

from typing import Any, Sequence

from ..redis_values import reply_text
from .shared import (
    NOW_LUA,
    OWNER_LUA,
    ScriptCall,
    ScriptSet,
    lua_flag,
    lua_ms,
    with_helpers,
)

PARAMS_STORE = with_helpers("""
-- The one write of a computed task's params for a slot (params_book.py): a list, or a
-- failure of its params callable. A stored list is replaced only by a refresh; a stored
-- failure only by a list or by a failure of a later attempt. The retry schedule follows
-- the entry stored by this call.
-- KEYS[1] = the day's params hash, KEYS[2] = the params retry schedule (sorted set),
-- KEYS[3] = the leader lease
-- ARGV[1] = field '{task}|{slot label}', ARGV[2] = entry JSON (a failure has no 'params'),
-- ARGV[3] = retention (s), ARGV[4] = '1' to replace whatever is stored (a refresh),
-- ARGV[5] = retry member '{day}|{task}|{slot label}', ARGV[6] = next try (ms) or '' for none,
-- ARGV[7] = the lease owner the caller must still be ('' = no fence)
-- Returns {1, entry} when stored, {0, stored entry} when kept, {0, 'lease'} when fenced off.
local params_key, retries_key, lease_key = KEYS[1], KEYS[2], KEYS[3]
local field, entry, retention_s, replace = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local member, next_try_ms, fence_owner = ARGV[5], ARGV[6], ARGV[7]
if fence_owner ~= '' and not holds(lease_key, fence_owner) then
  return {0, 'lease'}
end
local current = redis.call('HGET', params_key, field)
if current and replace ~= '1' then
  local old = cjson.decode(current)
  if old['params'] ~= nil then
    return {0, current}
  end
  local new = cjson.decode(entry)
  if new['params'] == nil and (tonumber(new['attempts']) or 0) <= (tonumber(old['attempts']) or 0) then
    return {0, current}
  end
end
redis.call('HSET', params_key, field, entry)
redis.call('EXPIRE', params_key, retention_s)
if next_try_ms ~= '' then
  redis.call('ZADD', retries_key, next_try_ms, member)
else
  redis.call('ZREM', retries_key, member)
end
return {1, entry}
""", OWNER_LUA)


TABLE_SKEW_SYNC = with_helpers("""
-- The leader's record of the table differences it sees (table_watch.py): each current
-- one keeps the time it was first seen, any other is dropped. Under the lease only, so
-- a leader that lost it (paused past it) does not undo its successor's record.
-- KEYS[1] = table skew hash, KEYS[2] = lease key
-- ARGV[1] = owner token, ARGV[2] = TTL of the hash (s), ARGV[3..] = current difference ids
-- Returns {} when not the lease holder, else {now_ms, id, first_ms, id, first_ms, ...}.
local skew_key, lease_key = KEYS[1], KEYS[2]
local owner, ttl_s = ARGV[1], tonumber(ARGV[2])
if not holds(lease_key, owner) then
  return {}
end
local now = redis_now_ms()
local current = {}
for i = 3, #ARGV do
  current[ARGV[i]] = true
end
for _, id in ipairs(redis.call('HKEYS', skew_key)) do
  if not current[id] then
    redis.call('HDEL', skew_key, id)
  end
end
local reply = {tostring(now)}
for i = 3, #ARGV do
  redis.call('HSETNX', skew_key, ARGV[i], tostring(now))
  reply[#reply + 1] = ARGV[i]
  reply[#reply + 1] = redis.call('HGET', skew_key, ARGV[i])
end
if #ARGV >= 3 then
  -- Forgotten if no leader looks for that long: a later difference starts afresh.
  redis.call('EXPIRE', skew_key, ttl_s)
end
return reply
""", OWNER_LUA, NOW_LUA)


def _parse_table_skew(reply: Any) -> tuple[int, dict[str, int]] | None:
    if not reply:
        return None
    return lua_ms(reply[0]), {reply_text(reply[i]): lua_ms(reply[i + 1]) for i in range(1, len(reply), 2)}


def _parse_params_store(reply: Any) -> tuple[bool, str]:
    return bool(int(reply[0])), reply_text(reply[1])


class ParamScripts(ScriptSet):
    """The scripts of computed params and table differences."""

    def params_store(self, *, params_key: str, retries_key: str, lease_key: str, field: str, entry_json: str,
                     retention_s: int, replace: bool, retry_member: str, next_try_ms: int | None,
                     fence_owner: str | None) -> ScriptCall[tuple[bool, str]]:
        """(stored, entry): whether ``entry_json`` was stored, and the entry stored now
        (``'lease'`` when ``fence_owner`` no longer holds the lease)."""
        return ScriptCall(self.script(PARAMS_STORE), [params_key, retries_key, lease_key],
                          [field, entry_json, retention_s, lua_flag(replace), retry_member,
                           "" if next_try_ms is None else next_try_ms, fence_owner or ""], _parse_params_store)

    def table_skew_sync(self, *, skew_key: str, lease_key: str, owner: str, ttl_s: int,
                        differences: Sequence[str]) -> ScriptCall[tuple[int, dict[str, int]] | None]:
        """None when ``owner`` does not hold the lease, else (Redis now in ms, difference
        id -> first seen ms) for ``differences``."""
        return ScriptCall(self.script(TABLE_SKEW_SYNC), [skew_key, lease_key], [owner, ttl_s, *differences],
                          _parse_table_skew)

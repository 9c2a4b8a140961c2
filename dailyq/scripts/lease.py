"""The leader lease and the leadership mark: owner-token leases (lease.py) and the tick
that says a leader held the lease without a gap (scheduler.py). All run on a full Redis."""

from __future__ import annotations

from typing import Any

from ..redis_values import reply_text
from .shared import (
    NOW_LUA,
    OWNER_LUA,
    ScriptCall,
    ScriptSet,
    allow_oom,
    lua_ms,
    with_helpers,
)

LEASE_ACQUIRE_OR_RENEW = allow_oom(with_helpers("""
-- Takes a free lease or extends our own. Returns 1 when we hold it afterwards, else 0.
-- KEYS[1] = lease key
-- ARGV[1] = owner token, ARGV[2] = ttl (ms)
-- One GET decides: every scheduler runs this every tick, and a node that is not the
-- leader then costs Redis that one command (bench/run.py's idle cost).
local lease_key = KEYS[1]
local owner, ttl_ms = ARGV[1], ARGV[2]
local holder = redis.call('GET', lease_key)
if holder == owner then
  redis.call('PEXPIRE', lease_key, ttl_ms)
  return 1
end
if holder then
  return 0
end
redis.call('SET', lease_key, owner, 'PX', ttl_ms)
return 1
"""))


LEASE_RENEW = allow_oom(with_helpers("""
-- Extends the lease only while we own it; never takes a free one. Returns 1 or 0.
-- KEYS[1] = lease key
-- ARGV[1] = owner token, ARGV[2] = ttl (ms)
return pexpire_if_owner(KEYS[1], ARGV[1], ARGV[2])
""", OWNER_LUA))


LEASE_RELEASE = allow_oom(with_helpers("""
-- Deletes the lease only while we own it. Returns 1 when deleted, else 0.
-- KEYS[1] = lease key
-- ARGV[1] = owner token
return del_if_owner(KEYS[1], ARGV[1])
""", OWNER_LUA))


MARK_LEADERSHIP = allow_oom(with_helpers("""
-- Under our lease only: records this scheduler tick as the latest held one. When the
-- previous one is older than the gap, it is left as is and reported: the caller enqueues
-- the no_leader alert, then calls again with gap 0 (so an alert that could not be
-- enqueued is tried again on the next tick, not lost).
-- KEYS[1] = leader lease, KEYS[2] = leadership hash
-- ARGV[1] = lease owner, ARGV[2] = longest tolerated gap (ms; 0: report none)
-- Returns {'not-leader'} | {'ok', now} | {'gap', last_ms, now}.
local lease_key, leadership_key = KEYS[1], KEYS[2]
local owner, gap = ARGV[1], tonumber(ARGV[2])
if not holds(lease_key, owner) then
  return {'not-leader'}
end
local now = redis_now_ms()
local held = redis.call('HMGET', leadership_key, 'first_ms', 'last_ms')
local last = tonumber(held[2])
if last and gap > 0 and now - last > gap then
  return {'gap', tostring(last), tostring(now)}
end
if held[1] then
  redis.call('HSET', leadership_key, 'last_ms', now)
else
  redis.call('HSET', leadership_key, 'last_ms', now, 'first_ms', now)
end
return {'ok', tostring(now)}
""", OWNER_LUA, NOW_LUA))


# MARK_LEADERSHIP's answer: ('ok', None, now_ms), ('gap', last_ms, now_ms) or ('not-leader', None, None).
LeadershipMark = tuple[str, "int | None", "int | None"]


def _parse_mark_leadership(reply: Any) -> LeadershipMark:
    outcome = reply_text(reply[0])
    if outcome == "gap":
        return outcome, lua_ms(reply[1]), lua_ms(reply[2])
    if outcome == "ok":
        return outcome, None, lua_ms(reply[1])
    return outcome, None, None


class LeaseScripts(ScriptSet):
    """The scripts of owner-token leases (lease.py) and the leadership mark (scheduler.py)."""

    def lease_acquire_or_renew(self, *, lease_key: str, owner: str, ttl_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self.script(LEASE_ACQUIRE_OR_RENEW), [lease_key], [owner, ttl_ms], bool)

    def lease_renew(self, *, lease_key: str, owner: str, ttl_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self.script(LEASE_RENEW), [lease_key], [owner, ttl_ms], bool)

    def lease_release(self, *, lease_key: str, owner: str) -> ScriptCall[bool]:
        return ScriptCall(self.script(LEASE_RELEASE), [lease_key], [owner], bool)

    def mark_leadership(self, *, lease_key: str, leadership_key: str, owner: str,
                        gap_ms: int) -> ScriptCall[LeadershipMark]:
        return ScriptCall(self.script(MARK_LEADERSHIP), [lease_key, leadership_key], [owner, gap_ms],
                          _parse_mark_leadership)

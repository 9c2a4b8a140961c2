"""The alert outbox: alerts enqueued once, claimed by one sender, acked, retried or dropped
(alerts/outbox.py)."""

from __future__ import annotations

from typing import Any, Callable, Literal, Protocol, Sequence, TypeVar

from ..redis_values import reply_text
from .shared import (
    NOW_LUA,
    ScriptCall,
    ScriptSet,
    with_helpers,
)

OUTBOX_ENQUEUE = with_helpers("""
-- Puts each alert not seen before into the outbox (due now), atomically with
-- remembering its id in its day's alert set: an alert enters once, however often raised.
-- KEYS[1] = outbox, KEYS[2] = entries, KEYS[3..] = the alerts' day sets
-- ARGV[1] = day set TTL (s), then per alert: index of its day set in KEYS, id, payload JSON
-- Returns the ids that were new.
local outbox_key, entries_key = KEYS[1], KEYS[2]
local day_set_ttl_s = ARGV[1]
local now = redis_now_ms()
local added = {}
for i = 2, #ARGV, 3 do
  local day_set, id, payload = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
  if redis.call('SADD', day_set, id) == 1 then
    redis.call('EXPIRE', day_set, day_set_ttl_s)
    redis.call('HSET', entries_key, id, cjson.encode({payload = payload, created_ms = tostring(now), attempts = 0}))
    redis.call('ZADD', outbox_key, now, id)
    added[#added + 1] = id
  end
end
return added
""", NOW_LUA)


OUTBOX_CLAIM = with_helpers("""
-- First, entries whose sender's claim ran out go back to the outbox; then the oldest due
-- entry moves to the in-flight set until now + claim, marked with the sender's token.
-- KEYS[1] = outbox, KEYS[2] = in-flight, KEYS[3] = entries
-- ARGV[1] = claim (ms), ARGV[2] = owner token
-- Returns {now, id, entry JSON}, or {now, next} when nothing is due: next is when
-- something may be (the earliest due time or claim deadline; -1 when both sets are empty).
local outbox_key, in_flight_key, entries_key = KEYS[1], KEYS[2], KEYS[3]
local claim_ms, owner = tonumber(ARGV[1]), ARGV[2]
local now = redis_now_ms()
local lapsed = redis.call('ZRANGEBYSCORE', in_flight_key, '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  redis.call('ZREM', in_flight_key, id)
  redis.call('ZADD', outbox_key, now, id)
end
while true do
  local due = redis.call('ZRANGEBYSCORE', outbox_key, '-inf', now, 'LIMIT', 0, 1)
  if #due == 0 then
    local next = -1
    for _, key in ipairs({outbox_key, in_flight_key}) do
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      if #first == 2 and (next < 0 or tonumber(first[2]) < next) then
        next = tonumber(first[2])
      end
    end
    return {tostring(now), tostring(next)}
  end
  local id = due[1]
  redis.call('ZREM', outbox_key, id)
  local raw = redis.call('HGET', entries_key, id)
  if raw then  -- (an id without its entry cannot be sent: it is just removed)
    local entry = cjson.decode(raw)
    entry.owner = owner
    raw = cjson.encode(entry)
    redis.call('HSET', entries_key, id, raw)
    redis.call('ZADD', in_flight_key, now + claim_ms, id)
    return {tostring(now), id, raw}
  end
end
""", NOW_LUA)


OUTBOX_ACK = """
-- A delivered entry leaves the outbox, whoever holds it: nothing must send it again.
-- KEYS[1] = outbox, KEYS[2] = in-flight, KEYS[3] = entries
-- ARGV[1] = id, ARGV[2] = owner token
-- Returns 'ours', 'taken' (another sender claimed it since) or 'gone'.
local outbox_key, in_flight_key, entries_key = KEYS[1], KEYS[2], KEYS[3]
local id, owner = ARGV[1], ARGV[2]
local raw = redis.call('HGET', entries_key, id)
redis.call('ZREM', outbox_key, id)
redis.call('ZREM', in_flight_key, id)
redis.call('HDEL', entries_key, id)
if not raw then
  return 'gone'
end
return cjson.decode(raw).owner == owner and 'ours' or 'taken'
"""


# The outbox entry a sender holds (its claim not lapsed), or nil.
OUTBOX_HELD_LUA = """
local function held_entry(in_flight_key, entries_key, id, owner)
  local raw = redis.call('HGET', entries_key, id)
  if not raw or not redis.call('ZSCORE', in_flight_key, id) then
    return nil
  end
  local entry = cjson.decode(raw)
  if entry.owner ~= owner then
    return nil
  end
  return entry
end
"""


OUTBOX_RETRY = with_helpers("""
-- Back to the outbox with its next due time and one more attempt; only by the sender
-- still holding the claim.
-- KEYS[1] = outbox, KEYS[2] = in-flight, KEYS[3] = entries
-- ARGV[1] = id, ARGV[2] = owner token, ARGV[3] = wait before the next attempt (ms)
-- Returns 1, or 0 when the claim is not ours.
local outbox_key, in_flight_key, entries_key = KEYS[1], KEYS[2], KEYS[3]
local id, owner, wait_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local entry = held_entry(in_flight_key, entries_key, id, owner)
if not entry then
  return 0
end
entry.owner = nil
entry.attempts = (tonumber(entry.attempts) or 0) + 1
redis.call('HSET', entries_key, id, cjson.encode(entry))
redis.call('ZREM', in_flight_key, id)
redis.call('ZADD', outbox_key, redis_now_ms() + wait_ms, id)
return 1
""", NOW_LUA, OUTBOX_HELD_LUA)


OUTBOX_DROP = with_helpers("""
-- Gives an entry up (deleted); only by the sender still holding the claim.
-- KEYS[1] = outbox, KEYS[2] = in-flight, KEYS[3] = entries
-- ARGV[1] = id, ARGV[2] = owner token
-- Returns 1, or 0 when the claim is not ours.
local in_flight_key, entries_key = KEYS[2], KEYS[3]
local id, owner = ARGV[1], ARGV[2]
if not held_entry(in_flight_key, entries_key, id, owner) then
  return 0
end
redis.call('ZREM', in_flight_key, id)
redis.call('HDEL', entries_key, id)
return 1
""", OUTBOX_HELD_LUA)


AckOutcome = Literal["ours", "taken", "gone"]




T = TypeVar("T")


class AlertEntry(Protocol):
    """What OUTBOX_ENQUEUE reads of one alert (alerts/outbox.OutboxAlert)."""

    @property
    def day_key(self) -> str: ...
    @property
    def alert_id(self) -> str: ...
    @property
    def payload_json(self) -> str: ...


class OutboxScripts(ScriptSet):
    """The scripts of the alert outbox (alerts/outbox.py)."""

    def outbox_enqueue(self, *, outbox_key: str, entries_key: str, day_set_ttl_s: int,
                       alerts: Sequence[AlertEntry]) -> ScriptCall[list[str]]:
        day_keys: list[str] = []
        args: list[Any] = [day_set_ttl_s]
        for alert in alerts:
            if alert.day_key not in day_keys:
                day_keys.append(alert.day_key)
            args += [3 + day_keys.index(alert.day_key), alert.alert_id, alert.payload_json]
        return ScriptCall(self.script(OUTBOX_ENQUEUE), [outbox_key, entries_key, *day_keys], args,
                          lambda reply: [reply_text(alert_id) for alert_id in reply])

    def outbox_claim(self, *, outbox_key: str, in_flight_key: str, entries_key: str, claim_ms: int,
                     owner: str, read: Callable[[Any], T]) -> ScriptCall[T]:
        """``read`` makes the reply the outbox's (alerts/outbox.parse_claim, whose types are
        alerts/outbox.py's): [now_ms, next_ms or -1] when nothing is due, else [now_ms,
        alert_id, entry JSON]."""
        return ScriptCall(self.script(OUTBOX_CLAIM), [outbox_key, in_flight_key, entries_key], [claim_ms, owner],
                          read)

    def outbox_ack(self, *, outbox_key: str, in_flight_key: str, entries_key: str, alert_id: str,
                   owner: str) -> ScriptCall[AckOutcome]:
        return ScriptCall(self.script(OUTBOX_ACK), [outbox_key, in_flight_key, entries_key], [alert_id, owner],
                          reply_text)  # type: ignore[arg-type]

    def outbox_retry(self, *, outbox_key: str, in_flight_key: str, entries_key: str, alert_id: str, owner: str,
                     wait_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self.script(OUTBOX_RETRY), [outbox_key, in_flight_key, entries_key],
                          [alert_id, owner, max(0, int(wait_ms))], bool)

    def outbox_drop(self, *, outbox_key: str, in_flight_key: str, entries_key: str, alert_id: str,
                    owner: str) -> ScriptCall[bool]:
        return ScriptCall(self.script(OUTBOX_DROP), [outbox_key, in_flight_key, entries_key], [alert_id, owner], bool)

"""The alert outbox in Redis: each alert enters once, is delivered by one sender at a
time, and leaves when delivered or given up. Every step is one Lua script.

* ``ENQUEUE``: ``SADD`` of the alert's id to its day's alert set and, only if it was
  new, the entry (payload, created_ms, attempts) and its place in the outbox (due
  now) -- together. Whoever detects the event, however often, it enters once.
* ``CLAIM``: first, entries whose sender's claim ran out go back to the outbox (their
  sender died, froze or lost Redis); then the oldest due entry moves to the in-flight
  set with a deadline (now + claim), marked with the claiming sender's token.
* ``ACK`` (after a 2xx): the entry is deleted, whoever holds it: it was delivered,
  so nothing must send it again.
* ``RETRY`` / ``DROP``: only by the sender still holding the claim -- back to the
  outbox with its next due time and one more attempt, or deleted.

All times are the Redis server's clock (``TIME`` inside the scripts): one clock for
every node, whatever their own clocks say.

The one duplicate left: a sender that stops for good (SIGKILL, power) or loses Redis
for longer than its claim between the endpoint accepting the POST and ``ACK``
reaching Redis. Its claim runs out and another sender delivers again. The window is
one Redis round trip long (``ACK`` is sent as soon as the response's status line is
read, before its body), plus any Redis outage in that moment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from redis import Redis

from .alert_events import Alert, encode_payload
from .keys import Keys

# Milliseconds of the Redis server's clock, in a script.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] = outbox, KEYS[2] = entries, KEYS[3..] = the alerts' day sets
# ARGV[1] = day set TTL (s), then per alert: index of its day set in KEYS, id, payload JSON.
# Returns the ids that were new.
ENQUEUE = _NOW_MS + """
local added = {}
for i = 2, #ARGV, 3 do
  local day_set = KEYS[tonumber(ARGV[i])]
  local id = ARGV[i + 1]
  if redis.call('SADD', day_set, id) == 1 then
    redis.call('EXPIRE', day_set, ARGV[1])
    redis.call('HSET', KEYS[2], id, cjson.encode({payload = ARGV[i + 2], created_ms = tostring(now), attempts = 0}))
    redis.call('ZADD', KEYS[1], now, id)
    added[#added + 1] = id
  end
end
return added
"""

# KEYS[1] = outbox, KEYS[2] = in-flight, KEYS[3] = entries; ARGV[1] = claim ms, ARGV[2] = owner token
# Returns {now, id, entry JSON}, or {now, next} when nothing is due: next is when
# something may be (the earliest due time or claim deadline; -1 when both sets are empty).
CLAIM = _NOW_MS + """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end
while true do
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
  if #due == 0 then
    local next = -1
    for _, key in ipairs({KEYS[1], KEYS[2]}) do
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      if #first == 2 and (next < 0 or tonumber(first[2]) < next) then
        next = tonumber(first[2])
      end
    end
    return {tostring(now), tostring(next)}
  end
  local id = due[1]
  redis.call('ZREM', KEYS[1], id)
  local raw = redis.call('HGET', KEYS[3], id)
  if raw then  -- (an id without its entry cannot be sent: it is just removed)
    local entry = cjson.decode(raw)
    entry.owner = ARGV[2]
    raw = cjson.encode(entry)
    redis.call('HSET', KEYS[3], id, raw)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
    return {tostring(now), id, raw}
  end
end
"""

# KEYS[1] = outbox, KEYS[2] = in-flight, KEYS[3] = entries; ARGV[1] = id, ARGV[2] = owner
# Returns 'ours', 'taken' (another sender claimed it since) or 'gone'.
ACK = """
local raw = redis.call('HGET', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if not raw then
  return 'gone'
end
return cjson.decode(raw).owner == ARGV[2] and 'ours' or 'taken'
"""

# KEYS[1] = outbox, KEYS[2] = in-flight, KEYS[3] = entries; ARGV[1] = id, ARGV[2] = owner,
# ARGV[3] = wait before the next attempt (ms). Returns 1, or 0 when the claim is not ours.
RETRY = _NOW_MS + """
local raw = redis.call('HGET', KEYS[3], ARGV[1])
if not raw or not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
local entry = cjson.decode(raw)
if entry.owner ~= ARGV[2] then
  return 0
end
entry.owner = nil
entry.attempts = (tonumber(entry.attempts) or 0) + 1
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(entry))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS as RETRY; ARGV[1] = id, ARGV[2] = owner. Returns 1, or 0 when the claim is not ours.
DROP = """
local raw = redis.call('HGET', KEYS[3], ARGV[1])
if not raw or cjson.decode(raw).owner ~= ARGV[2] or not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# KEYS[1] = leader lease, KEYS[2] = leadership hash; ARGV[1] = lease owner,
# ARGV[2] = longest tolerated gap (ms; 0: report none).
# Under our lease only: records this tick as the latest held one. When the previous
# one is older than the gap, it is left as is and reported: the caller enqueues the
# no_leader alert, then calls again with gap 0 (so an alert that could not be
# enqueued is tried again on the next tick, not lost).
# Returns {'not-leader'} | {'ok', now} | {'gap', last_ms, now}.
MARK_HELD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'not-leader'}
end
""" + _NOW_MS + """
local held = redis.call('HMGET', KEYS[2], 'first_ms', 'last_ms')
local last = tonumber(held[2])
local gap = tonumber(ARGV[2])
if last and gap > 0 and now - last > gap then
  return {'gap', tostring(last), tostring(now)}
end
if held[1] then
  redis.call('HSET', KEYS[2], 'last_ms', now)
else
  redis.call('HSET', KEYS[2], 'last_ms', now, 'first_ms', now)
end
return {'ok', tostring(now)}
"""


@dataclass(frozen=True)
class Claimed:
    """An outbox entry a sender holds: deliver it, then ack, retry or drop it."""

    alert_id: str
    payload_json: str
    created_ms: int
    attempts: int  # failed deliveries so far
    now_ms: int  # the Redis clock when it was claimed

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.payload_json))


@dataclass(frozen=True)
class Idle:
    """Nothing due: the Redis time, and when something may be (None: the outbox is empty)."""

    now_ms: int
    next_ms: int | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(value: Any) -> int:
    """Milliseconds as Lua wrote them (``tostring`` of a number: digits, maybe a float form)."""
    return int(float(_text(value)))


class Outbox:
    def __init__(self, connection: Redis, keys: Keys, retention_s: int) -> None:
        self.connection = connection
        self.keys = keys
        # An alert's id is remembered as long as its day's runs are, and a day longer:
        # a day scanned as "yesterday" is never re-alerted while it can still be seen.
        self.remember_s = retention_s + 2 * 86400
        self._enqueue = connection.register_script(ENQUEUE)
        self._claim = connection.register_script(CLAIM)
        self._ack = connection.register_script(ACK)
        self._retry = connection.register_script(RETRY)
        self._drop = connection.register_script(DROP)
        self._mark_held = connection.register_script(MARK_HELD)

    @property
    def _queue_keys(self) -> list[str]:
        return [self.keys.alert_outbox, self.keys.alert_in_flight, self.keys.alert_entries]

    def enqueue(self, alerts: Iterable[Alert]) -> list[str]:
        """Put each alert not seen before into the outbox, atomically; returns the new ids."""
        day_keys: list[str] = []
        args: list[Any] = [self.remember_s]
        for alert in alerts:
            key = self.keys.day_alerts(alert.day)
            if key not in day_keys:
                day_keys.append(key)
            args += [3 + day_keys.index(key), alert.alert_id, encode_payload(alert.payload)]
        if len(args) == 1:
            return []
        added = self._enqueue(keys=[self.keys.alert_outbox, self.keys.alert_entries, *day_keys], args=args)
        return [_text(alert_id) for alert_id in added]

    def claim(self, owner: str, claim_ms: int) -> Claimed | Idle:
        """The oldest due entry, now held by ``owner``; or, when none is due, when one may be."""
        reply = self._claim(keys=self._queue_keys, args=[claim_ms, owner])
        now_ms = _ms(reply[0])
        if len(reply) == 2:
            next_ms = _ms(reply[1])
            return Idle(now_ms, next_ms if next_ms >= 0 else None)
        entry = json.loads(_text(reply[2]))
        return Claimed(_text(reply[1]), str(entry["payload"]), _ms(entry["created_ms"]),
                       int(entry.get("attempts") or 0), now_ms)

    def ack(self, alert_id: str, owner: str) -> str:
        return _text(self._ack(keys=self._queue_keys, args=[alert_id, owner]))

    def retry(self, alert_id: str, owner: str, wait_ms: int) -> bool:
        return bool(self._retry(keys=self._queue_keys, args=[alert_id, owner, max(0, int(wait_ms))]))

    def drop(self, alert_id: str, owner: str) -> bool:
        return bool(self._drop(keys=self._queue_keys, args=[alert_id, owner]))

    def counts(self) -> tuple[int, int]:
        """(waiting in the outbox, in flight)."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.alert_outbox)
            pipe.zcard(self.keys.alert_in_flight)
            waiting, in_flight = pipe.execute()
        return int(waiting), int(in_flight)

    def mark_held(self, lease_key: str, owner: str, gap_ms: int) -> tuple[str, int | None, int | None]:
        """This tick held the lease (see MARK_HELD): ('ok', None, now), ('gap', last, now)
        or ('not-leader', None, None)."""
        reply = self._mark_held(keys=[lease_key, self.keys.leadership], args=[owner, gap_ms])
        outcome = _text(reply[0])
        if outcome == "gap":
            return outcome, _ms(reply[1]), _ms(reply[2])
        if outcome == "ok":
            return outcome, None, _ms(reply[1])
        return outcome, None, None

    def first_held_ms(self) -> int | None:
        raw = self.connection.hget(self.keys.leadership, "first_ms")
        return _ms(raw) if raw is not None else None

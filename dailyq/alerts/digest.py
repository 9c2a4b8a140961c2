"""Failed runs into alerts, without floods: ``run_failed`` for a task's first failure,
then one ``runs_failed`` digest per ``DAILYQ_ALERT_GROUP_S`` window while it keeps failing.

Every script that records a run ``failed`` (scripts.lifecycle.FAIL, END_WAIT, TAKE_IF_ABANDONED,
SETTLE_FAILED, DOCTOR_REQUEUE, DOCTOR_SETTLE) pushes a failure event onto
``keys.alert_failures`` in that same step (scripts.shared.NOTE_FAILED_LUA). The leader's alert
thread takes the events from the front of that list, in order, a batch at a time
(``FailureAlerts.take``): nothing reads a day's records for them, so a run of any day
(a backfill, a rerun of an old day) is alerted, and an idle day costs one LRANGE of an
empty list per pass.

Grouping, per task (``plan``, pure), at the Redis time the batch is taken:

* no window open: the failure is sent as ``run_failed`` and opens a window
  ``[now, now + group)``;
* within the window: it joins the window's ``runs_failed`` digest, an outbox entry due
  when the window ends (updated in place while it waits);
* after a window that had failures, within the next ``group`` seconds: a window chained
  to it (``[end, end + group)``) with its own digest. A window without failures ends the
  episode: the next failure is a ``run_failed`` again.

So N failures of one task within G seconds are 1 + 1 POSTs, and a failure storm of T
seconds at most 1 + ceil(T / G).

``TAKE_FAILURES`` applies a batch atomically, as a compare-and-set: only while the list
still starts with the events read, each task's window is as read, and each digest to
update still waits in the outbox before its window's end. Otherwise nothing is written
and the batch is read again (another leader took it, or a window closed meanwhile). Each
alert enters the outbox under an id naming it (``run_failed:<run id>:<attempts>``,
``runs_failed:<task>:<window start ms>``), so from there on delivery is the outbox's:
once, whichever leader sends it (alert_outbox.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Mapping, Sequence

from redis import Redis

from ..keys import Keys
from ..redis_values import as_text
from ..scripts.shared import NOW_LUA, compact
from .events import Alert, encode_payload, run_failed_alert, runs_failed_alert

# Events taken per script call; a pass takes batches until the list is empty (at most
# MAX_BATCHES, so one pass of a long backlog does not hold the thread for long).
BATCH = 200
MAX_BATCHES = 20

TAKE_FAILURES = NOW_LUA + """
-- Applies one batch of failure events (alert_digest.plan) as a compare-and-set.
-- KEYS[1] = failures list, KEYS[2] = groups hash, KEYS[3] = outbox, KEYS[4] = entries,
-- KEYS[5..] = the alerts' day sets
-- ARGV[1] = day set TTL (s), ARGV[2] = groups TTL (s), ARGV[3] = n, ARGV[4..3+n] = the
--   events read from the list's front, then m, then m times: task, its window as read
--   ('' = none), its window now ('' = none), then per alert: index of its day set in
--   KEYS, id, payload JSON, due (ms; '' = now), open until (ms; '' = a run_failed)
-- Returns 'ok' or 'stale' (nothing written).
local failures_key, groups_key, outbox_key, entries_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local day_set_ttl_s, groups_ttl_s, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = redis_now_ms()
-- check everything first: a script cannot undo a write
local head = redis.call('LRANGE', failures_key, 0, n - 1)
if #head ~= n then
  return 'stale'
end
for i = 1, n do
  if head[i] ~= ARGV[3 + i] then
    return 'stale'
  end
end
local m_at = 4 + n
local m = tonumber(ARGV[m_at])
for i = m_at + 1, m_at + 3 * m, 3 do
  if (redis.call('HGET', groups_key, ARGV[i]) or '') ~= ARGV[i + 1] then
    return 'stale'
  end
end
local alerts_at = m_at + 3 * m + 1
for i = alerts_at, #ARGV, 5 do
  local day_set, id, open_until = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 4]
  if open_until ~= '' then
    -- a digest: only before its window ends, and, if raised before, while it waits unsent
    if now >= tonumber(open_until) then
      return 'stale'
    end
    if redis.call('SISMEMBER', day_set, id) == 1 and not redis.call('ZSCORE', outbox_key, id) then
      return 'stale'
    end
  end
end
-- then write
redis.call('LTRIM', failures_key, n, -1)
for i = m_at + 1, m_at + 3 * m, 3 do
  if ARGV[i + 2] == '' then
    redis.call('HDEL', groups_key, ARGV[i])
  else
    redis.call('HSET', groups_key, ARGV[i], ARGV[i + 2])
  end
end
if m > 0 then
  redis.call('EXPIRE', groups_key, groups_ttl_s)
end
for i = alerts_at, #ARGV, 5 do
  local day_set, id, payload, due = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  due = due == '' and now or tonumber(due)
  if redis.call('SADD', day_set, id) == 1 then
    redis.call('EXPIRE', day_set, day_set_ttl_s)
    redis.call('HSET', entries_key, id, cjson.encode({payload = payload, created_ms = tostring(now), attempts = 0}))
    redis.call('ZADD', outbox_key, due, id)
  elseif ARGV[i + 4] ~= '' then
    -- a digest that grew: same entry, new payload (checked above: it has not been sent)
    local raw = redis.call('HGET', entries_key, id)
    local entry = raw and cjson.decode(raw) or {created_ms = tostring(now), attempts = 0}
    entry.payload = payload
    redis.call('HSET', entries_key, id, cjson.encode(entry))
  end
end
return 'ok'
"""


@dataclass(frozen=True)
class Failure:
    """One failure event as a script pushed it (scripts.shared.NOTE_FAILED_LUA)."""

    raw: str
    run_id: str
    day: date
    task: str
    param: Any
    node: str | None
    error: str | None
    ended_at: str | None
    attempts: int

    @classmethod
    def decode(cls, raw: bytes | str) -> "Failure":
        text = as_text(raw)
        event = json.loads(text)
        try:
            param = json.loads(event.get("param_json") or "null")
        except ValueError:
            param = event.get("param_json")
        return cls(text, str(event["run_id"]), date.fromisoformat(str(event["day"])), str(event.get("task")), param,
                   event.get("node"), event.get("error"), event.get("ended_at"), int(event.get("attempts") or 0))

    def record(self) -> dict[str, Any]:
        """The fields of its run record that run_failed_alert reads."""
        return {"task": self.task, "param": self.param, "node": self.node, "error": self.error,
                "ended_at": self.ended_at, "attempts": self.attempts}


@dataclass
class Window:
    """A task's grouping window: failures within [start_ms, until_ms) share one digest."""

    start_ms: int
    until_ms: int
    count: int = 0  # failures in its digest

    def encode(self) -> str:
        return json.dumps({"start_ms": self.start_ms, "until_ms": self.until_ms, "count": self.count})

    @classmethod
    def decode(cls, raw: bytes | str | None) -> "Window | None":
        if not raw:
            return None
        data = json.loads(raw)
        return cls(int(data["start_ms"]), int(data["until_ms"]), int(data.get("count") or 0))


@dataclass
class Plan:
    """What one batch becomes: run_failed for firsts, members per digest window, and the
    windows afterwards (None: none kept)."""

    firsts: list[Failure] = field(default_factory=list)
    digests: dict[tuple[str, int], list[Failure]] = field(default_factory=dict)
    windows: dict[str, Window | None] = field(default_factory=dict)


def plan(failures: Sequence[Failure], windows: Mapping[str, Window | None], now_ms: int, group_ms: int) -> Plan:
    """Group ``failures`` (in order) by task at ``now_ms``; ``windows``: each task's window
    as stored (see the module docstring for the rule)."""
    result = Plan(windows={task: None if w is None else Window(w.start_ms, w.until_ms, w.count)
                           for task, w in windows.items()})
    for failure in failures:
        window = result.windows.get(failure.task)
        if group_ms > 0 and window is not None and now_ms >= window.until_ms:
            if window.count > 0 and now_ms < window.until_ms + group_ms:
                window = Window(window.until_ms, window.until_ms + group_ms)  # the storm goes on: chained
            else:
                window = None  # a quiet window ended the episode
        if group_ms <= 0 or window is None:
            result.firsts.append(failure)
            result.windows[failure.task] = Window(now_ms, now_ms + group_ms) if group_ms > 0 else None
            continue
        window.count += 1
        result.windows[failure.task] = window
        result.digests.setdefault((failure.task, window.start_ms), []).append(failure)
    return result


def digest_id(task: str, start_ms: int) -> str:
    return f"runs_failed:{task}:{start_ms}"


class FailureAlerts:
    """The leader's reader of the failure events: ``take()`` turns what is waiting into
    outbox entries; returns the ids that entered the outbox (or grew, for a digest)."""

    def __init__(self, connection: Redis, keys: Keys, group_s: int, remember_s: int) -> None:
        self.connection = connection
        self.keys = keys
        self.group_ms = group_s * 1000
        self.remember_s = remember_s
        self._script = connection.register_script(compact(TAKE_FAILURES))

    def take(self) -> list[Alert]:
        """Every waiting failure, as alerts now in the outbox (a digest's latest payload)."""
        raised: list[Alert] = []
        for _ in range(MAX_BATCHES):
            batch = self.connection.lrange(self.keys.alert_failures, 0, BATCH - 1)
            if not batch:
                break
            alerts = self._apply([Failure.decode(raw) for raw in batch])
            if alerts is None:
                continue  # stale: read again
            raised += alerts
            if len(batch) < BATCH:
                break
        return raised

    def _apply(self, failures: list[Failure]) -> list[Alert] | None:
        tasks = sorted({f.task for f in failures})
        raw_windows = dict(zip(tasks, self.connection.hmget(self.keys.alert_groups, tasks)))
        seconds, micros = self.connection.time()
        now_ms = seconds * 1000 + micros // 1000
        windows = {task: Window.decode(raw) for task, raw in raw_windows.items()}
        grouped = plan(failures, windows, now_ms, self.group_ms)
        alerts: list[tuple[Alert, int | None, int | None]] = []  # (alert, due ms, open until ms)
        for failure in grouped.firsts:
            alerts.append((run_failed_alert(failure.day, failure.run_id, failure.record(), _at(now_ms)), None, None))
        ids = [digest_id(task, start) for task, start in grouped.digests]
        earlier = dict(zip(ids, self.connection.hmget(self.keys.alert_entries, ids))) if ids else {}
        for (task, start), members in grouped.digests.items():
            window = grouped.windows[task]
            assert window is not None and window.start_ms == start
            before = _digest_runs(earlier.get(digest_id(task, start)))
            alert = runs_failed_alert(task, start, window.until_ms, before + [_run_entry(m) for m in members])
            alerts.append((alert, window.until_ms, window.until_ms))
        day_keys: list[str] = []
        args: list[Any] = [self.remember_s, self.remember_s, len(failures), *[f.raw for f in failures]]
        read = {task: _text(raw) for task, raw in raw_windows.items()}
        changed = [task for task in tasks if _encoded(grouped.windows.get(task)) != read[task]]
        args.append(len(changed))
        for task in changed:
            args += [task, read[task], _encoded(grouped.windows.get(task))]
        for alert, due_ms, until_ms in alerts:
            day_key = self.keys.day_alerts(alert.day)
            if day_key not in day_keys:
                day_keys.append(day_key)
            args += [5 + day_keys.index(day_key), alert.alert_id, encode_payload(alert.payload),
                     "" if due_ms is None else due_ms, "" if until_ms is None else until_ms]
        keys = [self.keys.alert_failures, self.keys.alert_groups, self.keys.alert_outbox, self.keys.alert_entries,
                *day_keys]
        outcome = self._script(keys=keys, args=args)
        if _text(outcome) != "ok":
            return None
        return [alert for alert, _, _ in alerts]


def _text(raw: bytes | str | None) -> str:
    return "" if raw is None else as_text(raw)


def _encoded(window: Window | None) -> str:
    return "" if window is None else window.encode()


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def _run_entry(failure: Failure) -> dict[str, Any]:
    return {"run_id": failure.run_id, "param": failure.param, "node": failure.node, "error": failure.error,
            "day": failure.day.isoformat(), "at": failure.ended_at, "attempts": failure.attempts}


def _digest_runs(entry_raw: bytes | str | None) -> list[dict[str, Any]]:
    """The runs already in a digest's outbox entry (none when it has none yet)."""
    if not entry_raw:
        return []
    payload = json.loads(json.loads(entry_raw)["payload"])
    return list(payload.get("runs") or [])

"""A run's life in Redis: its record queued at fan-out, the claim a copy takes to execute
it (BEGIN), the claim renewed, the run finished, failed or cancelled, and the durations
learned from it (fanout.py, worker/guard.py, cancelling.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

from redis.exceptions import RedisError

from ..redis_values import reply_text
from ..runs import BLOCKED, CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, SKIPPED, WAITING
from .permits import PERMITS_LUA
from .shared import (
    DEPS_LUA,
    NOTE_FAILED_LUA,
    NOW_LUA,
    OWNER_LUA,
    RECORD_LUA,
    ScriptCall,
    ScriptSet,
    allow_oom,
    lua_flag,
    reply_texts,
    with_helpers,
)

# The error a run skipped by overlap='skip' shows in its record.
OVERLAP_SKIPPED = "overlap: the previous slot's run of this task and param was still running"


# ``cancel`` of an executing run renames its claim to owner .. CANCEL_MARK .. why (TTL
# kept): the copy's next renewal answers 'cancelled' and it stops its task; nothing it
# sends afterwards (FINISH, FAIL) holds the claim, so the record stays cancelled, and a
# rerun's copy waits ('busy') until the stopped copy releases the claim (or it lapses).
CANCEL_MARK = "|cancelled|"


CANCELLED_CLAIM_LUA = f"""
-- The claim of ``owner``'s copy as ``cancel`` renamed it: its text after the mark, else nil.
local function cancelled_why(claim_key, owner)
  local holder = redis.call('GET', claim_key)
  local prefix = owner .. '{CANCEL_MARK}'
  if holder and string.sub(holder, 1, #prefix) == prefix then
    return string.sub(holder, #prefix + 1)
  end
  return nil
end
-- Releases what a cancelled copy held, once it stopped: its renamed claim and its series
-- claim. Returns why it was cancelled, or nil (not a claim of this copy's that a cancel took).
local function release_cancelled(claim_key, series_key, owner)
  local why = cancelled_why(claim_key, owner)
  if why then
    redis.call('DEL', claim_key)
    del_if_owner(series_key, owner)
  end
  return why
end
"""


QUEUE_RECORDS = with_helpers(f"""
-- The records of runs a fan-out enqueues (one call per chunk, in its MULTI/EXEC).
-- KEYS[1] = day runs hash
-- ARGV[1] = retention (s), ARGV[2] = n, the number of new records, then
--   n times: run_id, record JSON (a run's first job: its record is written whole),
--   then per run enqueued once more (a recovery, a rerun; its record and history stay):
--   run_id, base record JSON (if it has none), job_id,
--   attempts_before ('' unless a user's rerun, which counts attempts afresh), rerun_id ('' = none)
-- Returns 1.
local runs_key = KEYS[1]
local retention_s, fresh = ARGV[1], tonumber(ARGV[2])
local again_from = 3 + 2 * fresh
if fresh > 0 then
  -- the day's counts and feed first (each record as it was, if any), then one HSET and one
  -- EXPIRE for all of them, not two commands per run: a fan-out chunk holds at most
  -- fanout.CHUNK_SIZE runs, 2 arguments each, well within unpack's limit
  for i = 3, again_from - 1, 2 do
    note_change(runs_key, ARGV[i], before_of(runs_key, ARGV[i]), cjson.decode(ARGV[i + 1]), retention_s)
  end
  redis.call('HSET', runs_key, unpack(ARGV, 3, again_from - 1))
  redis.call('EXPIRE', runs_key, retention_s)
end
for i = again_from, #ARGV, 5 do
  local run_id, base_json, job_id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local attempts_before, rerun_id = ARGV[i + 3], ARGV[i + 4]
  local record = load_record(runs_key, run_id, base_json)
  -- the job id names the one job of the run that may execute (older ones are superseded)
  record.state, record.job_id, record.error, record.ended_at = '{QUEUED}', job_id, cjson.null, cjson.null
  if attempts_before ~= '' then
    record.attempts_before = tonumber(attempts_before)
    record.rerun_id = rerun_id ~= '' and rerun_id or cjson.null
  end
  save_record(runs_key, run_id, record, retention_s)
end
return 1
""", RECORD_LUA)


BEGIN = with_helpers(f"""
-- A copy of a run asks to execute it: takes the run's claim and its series claim, draws a
-- fencing token and marks the record running -- unless the run is finished, superseded
-- by a later job, out of attempts, or executing elsewhere.
-- KEYS[1] = day finished set, KEYS[2] = run claim, KEYS[3] = day runs hash,
-- KEYS[4] = running hash, KEYS[5] = series claim (same task and param, any slot),
-- KEYS[6] = fence counter (the last fencing token handed out)
-- ARGV[1] = run_id, ARGV[2] = claim owner, ARGV[3] = claim ttl (ms), ARGV[4] = force ('1'|'0'),
-- ARGV[5] = base record JSON, ARGV[6] = retention (s), ARGV[7] = day, ARGV[8] = overlap ('skip'|'wait'),
-- ARGV[9] = node, ARGV[10] = now (ISO), ARGV[11] = job_id, ARGV[12] = max attempts (0 = no limit)
-- Replies {{'claimed', attempt, fence}} | {{'finished'}} | {{'superseded'}} | {{'exhausted'}} | {{'busy'}}
--   | {{'skipped'}} | {{'cancelled'}}.
-- Fields are set from plain arguments (no JSON patch): a run costs the worker no JSON
-- encoding beyond its base record.
local finished_key, claim_key, runs_key, running_key, series_key, fence_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local run_id, owner, ttl_ms, force, base_json, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1', ARGV[5], ARGV[6]
local day, overlap, node, now, job_id, max_attempts = ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], tonumber(ARGV[12])
if holds(claim_key, owner) then
  -- a retry after a lost reply: we already hold it; answer as the first time did
  local record = load_record(runs_key, run_id, base_json)
  return {{'claimed', run_attempts(record), tonumber(record.fence) or 0}}
end
if not force and redis.call('SISMEMBER', finished_key, run_id) == 1 then
  return {{'finished'}}
end
local record = load_record(runs_key, run_id, base_json)  -- decoded once, for the checks and the update
if type(record.job_id) == 'string' and record.job_id ~= job_id then
  return {{'superseded'}}  -- a later job of this run (recovery, rerun) is the one to execute
end
if record.state == '{CANCELLED}' then
  -- cancelling.py: never started; a rerun enqueues a new job. (A replay whose claim the cancel
  -- took meanwhile releases it: that copy never started its task.)
  release_cancelled(claim_key, series_key, owner)
  return {{'cancelled'}}
end
-- A second queue entry of this very job (two movers of one retry can push it twice) after
-- the job finished, or used every attempt: not executed again. Also for a forced rerun:
-- force skips the finished set (the run finished before), never this job's own outcome,
-- and a rerun is a new job whose record counts its attempts afresh (attempts_before).
if record.job_id == job_id and record.state == '{FINISHED}' then
  return {{'finished'}}
end
if max_attempts > 0 and run_attempts(record) >= max_attempts then
  return {{'exhausted'}}  -- the run stays failed; a rerun gives it a new budget
end
if redis.call('EXISTS', claim_key) == 1 then
  return {{'busy'}}  -- this very run is executing elsewhere
end
if redis.call('EXISTS', series_key) == 1 then
  -- a run of another slot of the same task and param is still executing
  if overlap == 'skip' then
    record.state, record.node, record.ended_at, record.job_id = '{SKIPPED}', node, now, job_id
    record.error = [[{OVERLAP_SKIPPED}]]
    save_record(runs_key, run_id, record, retention_s)
    return {{'skipped'}}
  end
  return {{'busy'}}
end
redis.call('SET', claim_key, owner, 'PX', ttl_ms)
redis.call('SET', series_key, owner, 'PX', ttl_ms)
-- The fencing token: above the counter (every token handed out here) and at least the
-- server's clock in microseconds. A counter lost with a failover to a replica that lagged
-- (or with a restart without data) restarts above every token handed out before, as long
-- as this server's clock is not behind the old one's by more than the failover took
-- (docs/failure-semantics.md). Written as digits: Lua's own number-to-string, and
-- cjson's, keep only 14 of the 16.
local server_time = redis.call('TIME')
local fence = math.max((tonumber(redis.call('GET', fence_key)) or 0) + 1,
  tonumber(server_time[1]) * 1000000 + tonumber(server_time[2]))
local fence_digits = string.format('%.0f', fence)
redis.call('SET', fence_key, fence_digits)
record.state, record.node, record.started_at, record.job_id = '{RUNNING}', node, now, job_id
record.ended_at, record.error = cjson.null, cjson.null
record.attempts = (tonumber(record.attempts) or 0) + 1
record.owner, record.fence = owner, fence_digits
save_record(runs_key, run_id, record, retention_s)
redis.call('HSET', running_key, run_id, day)
return {{'claimed', run_attempts(record), fence}}
""", OWNER_LUA, RECORD_LUA, CANCELLED_CLAIM_LUA)


# Releases what BEGIN took, only while the run's claim is ours: returns false, having
# changed nothing else, when it is not (a claim a cancel took from this copy is released).
RELEASE_RUN_LUA = """
local function release_run(claim_key, series_key, running_key, run_id, owner)
  if del_if_owner(claim_key, owner) == 0 then
    release_cancelled(claim_key, series_key, owner)  -- cancelling.py: its end frees a cancelled claim
    return false
  end
  del_if_owner(series_key, owner)
  redis.call('HDEL', running_key, run_id)
  return true
end
"""


FINISH = allow_oom(with_helpers(f"""
-- The owner of a run's claim records it finished and releases the claim. Idempotent.
-- KEYS[1] = day finished set, KEYS[2] = run claim, KEYS[3] = day runs hash,
-- KEYS[4] = durations hash, KEYS[5] = running hash, KEYS[6] = series claim,
-- KEYS[7] = day dependency counts (DEPS_LUA)
-- ARGV[1] = run_id, ARGV[2] = claim owner, ARGV[3] = base record JSON, ARGV[4] = retention (s),
-- ARGV[5] = series id, ARGV[6] = duration (s), ARGV[7] = node, ARGV[8] = now (ISO)
-- Returns 1, or 0 (and changes nothing) when the claim is not this owner's any more.
local finished_key, claim_key, runs_key, durations_key, running_key, series_key, deps_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local run_id, owner, base_json, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local series, duration_s, node, now = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if not release_run(claim_key, series_key, running_key, run_id, owner) then
  -- A replay of this very call (its reply was lost; the guard sends the same arguments
  -- again): the claim is gone because the first call released it. Answer as it did.
  local record = load_record(runs_key, run_id)
  if record and record.owner == owner and record.state == '{FINISHED}' and record.ended_at == now then
    return 1
  end
  return 0
end
local record = load_record(runs_key, run_id, base_json)
if redis.call('SADD', finished_key, run_id) == 1 then
  count_finished(deps_key, record.task, retention_s)
end
redis.call('EXPIRE', finished_key, retention_s)
record.state, record.node, record.ended_at, record.error = '{FINISHED}', node, now, cjson.null
record.duration_s = tonumber(duration_s)
save_record(runs_key, run_id, record, retention_s)
redis.call('HSET', durations_key, series, duration_s)
return 1
""", OWNER_LUA, RECORD_LUA, CANCELLED_CLAIM_LUA, RELEASE_RUN_LUA, DEPS_LUA))


FAIL = allow_oom(with_helpers(f"""
-- An execution that ended without finishing: the task raised (from the executing process)
-- or its process died (from the worker parent, which saw its work-horse die).
-- KEYS[1] = run claim, KEYS[2] = day runs hash, KEYS[3] = running hash, KEYS[4] = series claim,
-- KEYS[5] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = claim owner, ARGV[3] = base record JSON, ARGV[4] = retention (s),
-- ARGV[5] = RQ can retry ('1'|'0'), ARGV[6] = max attempts (0 = no limit), ARGV[7] = node,
-- ARGV[8] = now (ISO), ARGV[9] = error, ARGV[10] = day (ISO)
-- Returns 'retry' (recorded queued: RQ retries it), 'failed', or 'not-ours' (claim held by
-- another copy or gone: nothing changed). Replay-safe: sent again with the same arguments
-- after its reply was lost, it answers as the first call did.
local claim_key, runs_key, running_key, series_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local run_id, owner, base_json, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rq_can_retry, max_attempts, node, now, error_text = ARGV[5] == '1', tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
if not release_run(claim_key, series_key, running_key, run_id, owner) then
  -- The first call released the claim and wrote this owner's end (its time and error)
  -- into the record. Anything since -- a requeue by recovery or a rerun (which clears
  -- ended_at), a later execution (a new owner), recovery failing the run (its own time
  -- and error) -- makes it not this call's any more.
  local record = load_record(runs_key, run_id)
  if record and record.owner == owner and record.ended_at == now and record.error == error_text then
    if record.state == '{QUEUED}' then
      return 'retry'
    elseif record.state == '{FAILED}' then
      return 'failed'
    end
  end
  return 'not-ours'
end
local record = load_record(runs_key, run_id, base_json)
local retry = rq_can_retry and (max_attempts == 0 or run_attempts(record) < max_attempts)
record.state = retry and '{QUEUED}' or '{FAILED}'
record.node, record.ended_at, record.error = node, now, error_text
save_record(runs_key, run_id, record, retention_s)
if not retry then
  note_failed(KEYS[5], ARGV[10], run_id, record, retention_s)
end
return retry and 'retry' or 'failed'
""", OWNER_LUA, RECORD_LUA, CANCELLED_CLAIM_LUA, RELEASE_RUN_LUA, NOTE_FAILED_LUA))


END_WAIT = with_helpers(f"""
-- A copy that never got the run's claim stopped waiting for it: its job timed out (RQ's
-- death penalty) while another copy of the run, or with overlap='wait' the previous
-- slot's run of its task and param, held the claim. RQ then retries or fails the job
-- outside the guard, so the record says which, now -- only while it still names this job
-- and says queued (a record another copy or a later job moved on is left as it is).
-- KEYS[1] = day runs hash, KEYS[2] = run claim, KEYS[3] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = job_id, ARGV[3] = base record JSON, ARGV[4] = retention (s),
-- ARGV[5] = RQ will retry ('1'|'0'), ARGV[6] = node, ARGV[7] = now (ISO),
-- ARGV[8] = error while the run's own claim is held (another copy of the run),
-- ARGV[9] = error otherwise (the series claim: the previous slot's run), ARGV[10] = day (ISO)
-- Returns 'retry' (recorded queued, with the error: RQ retries it), 'failed' or 'not-ours'.
local runs_key, claim_key = KEYS[1], KEYS[2]
local run_id, job_id, base_json, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local retry, node, now = ARGV[5] == '1', ARGV[6], ARGV[7]
local record = load_record(runs_key, run_id, base_json)
if (type(record.job_id) == 'string' and record.job_id ~= job_id) or record.state ~= '{QUEUED}' then
  return 'not-ours'
end
record.state = retry and '{QUEUED}' or '{FAILED}'
record.node, record.ended_at = node, now
record.error = redis.call('EXISTS', claim_key) == 1 and ARGV[8] or ARGV[9]
save_record(runs_key, run_id, record, retention_s)
if not retry then
  note_failed(KEYS[3], ARGV[10], run_id, record, retention_s)
end
return retry and 'retry' or 'failed'
""", RECORD_LUA, NOTE_FAILED_LUA)


RENEW_CLAIM = allow_oom(with_helpers("""
-- Extends a run's claim and its series claim only while the run's claim is ours; never
-- re-takes one that lapsed: a copy that lost its claim must stop, whoever holds it now.
-- A run of a task with limits also extends its slot (limits.py) in the same call.
-- KEYS[1] = run claim, KEYS[2] = series claim, KEYS[3] = the task's slots (optional)
-- ARGV[1] = owner, ARGV[2] = ttl (ms)
-- Returns 'ok', 'taken' (another copy holds it), 'gone' or 'cancelled' (cancelling.py: stop).
local claim_key, series_key, permits_key = KEYS[1], KEYS[2], KEYS[3]
local owner, ttl_ms = ARGV[1], ARGV[2]
if pexpire_if_owner(claim_key, owner, ttl_ms) == 0 then
  if cancelled_why(claim_key, owner) then
    return 'cancelled'
  end
  return redis.call('EXISTS', claim_key) == 1 and 'taken' or 'gone'
end
pexpire_if_owner(series_key, owner, ttl_ms)
if permits_key then
  extend_permit(permits_key, owner, ttl_ms)
end
return 'ok'
""", OWNER_LUA, NOW_LUA, PERMITS_LUA, CANCELLED_CLAIM_LUA))


TRIM_DURATIONS = with_helpers("""
-- The learned durations are kept per series (task + param) across days; a series no day
-- fanned out for the retention period goes (computed params that change daily would
-- otherwise grow the hash forever). The fan-out notes each series' day in KEYS[2].
-- KEYS[1] = durations hash, KEYS[2] = zset series -> ordinal of the last day fanned out
-- ARGV[1] = oldest day kept (ordinal), ARGV[2] = today (ordinal), ARGV[3] = most removed per call
-- Returns how many series were removed.
local durations_key, seen_key = KEYS[1], KEYS[2]
local oldest_kept, today, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', seen_key) == 0 then
  -- Durations learned before series were noted (an upgrade): each counts as seen today,
  -- once. unpack() takes a few thousand values at most: in parts.
  local fields = redis.call('HKEYS', durations_key)
  for i = 1, #fields, 1000 do
    local part = {}
    for j = i, math.min(i + 999, #fields) do
      part[#part + 1] = today
      part[#part + 1] = fields[j]
    end
    redis.call('ZADD', seen_key, unpack(part))
  end
end
local stale = redis.call('ZRANGEBYSCORE', seen_key, '-inf', '(' .. oldest_kept, 'LIMIT', 0, batch)
if #stale > 0 then
  redis.call('HDEL', durations_key, unpack(stale))
  redis.call('ZREM', seen_key, unpack(stale))
end
return #stale
""")


CANCEL = with_helpers(f"""
-- ``cancel`` of one run: a run queued, running, waiting or blocked ends 'cancelled', its
-- error saying who asked. An executing copy's claim is renamed (CANCEL_MARK): its next
-- renewal tells it to stop, and it releases the claim once stopped. Out of the running
-- hash (recovery leaves it alone) and the waiting hash (no release pushes it); a job of it
-- still queued, held or due for a retry is refused by BEGIN.
-- KEYS[1] = day runs hash, KEYS[2] = run claim, KEYS[3] = running hash, KEYS[4] = day waiting hash
-- ARGV[1] = run_id, ARGV[2] = why (the record's error), ARGV[3] = now (ISO), ARGV[4] = retention (s)
-- Returns {{'cancelled', state before, '1' when a copy executes it ('0' if not)}},
--   {{'ended', state}} (nothing to cancel) or {{'none'}} (no record).
local runs_key, claim_key, running_key, waiting_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local run_id, why, now, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local record = load_record(runs_key, run_id)
if not record then
  return {{'none'}}
end
local state = record.state
if state ~= '{QUEUED}' and state ~= '{RUNNING}' and state ~= '{WAITING}' and state ~= '{BLOCKED}' then
  return {{'ended', tostring(state)}}
end
local executing = '0'
local holder = redis.call('GET', claim_key)
if holder and not string.find(holder, '{CANCEL_MARK}', 1, true) then
  redis.call('SET', claim_key, holder .. '{CANCEL_MARK}' .. why, 'KEEPTTL')
  executing = '1'
end
redis.call('HDEL', running_key, run_id)
redis.call('HDEL', waiting_key, run_id)
record.state, record.error, record.ended_at = '{CANCELLED}', why, now
save_record(runs_key, run_id, record, retention_s)
return {{'cancelled', state, executing}}
""", RECORD_LUA)


RELEASE_CANCELLED = with_helpers("""
-- A copy that stopped for a cancel releases its claim and series claim.
-- KEYS[1] = run claim, KEYS[2] = series claim
-- ARGV[1] = the copy's owner token
-- Returns why the run was cancelled, or '' (the claim is not one a cancel took from this copy).
return release_cancelled(KEYS[1], KEYS[2], ARGV[1]) or ''
""", OWNER_LUA, CANCELLED_CLAIM_LUA)


BeginOutcome = Literal["claimed", "finished", "superseded", "exhausted", "busy", "skipped", "cancelled"]


BEGIN_OUTCOMES: tuple[BeginOutcome, ...] = ("claimed", "finished", "superseded", "exhausted", "busy", "skipped",
                                            "cancelled")


FailOutcome = Literal["retry", "failed", "not-ours"]


RenewOutcome = Literal["ok", "taken", "gone", "cancelled"]


@dataclass(frozen=True)
class BeginReply:
    """BEGIN's answer; ``outcome`` is None for anything else (an error a pipeline
    handed back instead): the guard then asks again."""

    outcome: BeginOutcome | None
    attempt: int = 0
    fence: int = 0


def parse_begin(reply: Any) -> BeginReply:
    if not isinstance(reply, (list, tuple)) or not reply:
        return BeginReply(None)
    outcome = reply_text(reply[0])
    if outcome not in BEGIN_OUTCOMES:
        return BeginReply(None)
    numbers = [int(n) for n in reply[1:3]] + [0, 0]
    return BeginReply(outcome, numbers[0], numbers[1])


def _parse_finish(reply: Any) -> bool:
    # Only FINISH's 0 means "refused"; anything else a pipeline hands back is not read
    # as a refusal (FINISH is idempotent: the worker applies it again on its own).
    return reply_text(reply) != "0"


@dataclass(frozen=True)
class CancelReply:
    """CANCEL's answer: ``outcome`` 'cancelled' (``state`` before it; ``executing``: a copy
    runs it now and stops), 'ended' (``state``: nothing to cancel) or 'none' (no record)."""

    outcome: Literal["cancelled", "ended", "none"]
    state: str | None = None
    executing: bool = False


def _parse_cancel(reply: Any) -> CancelReply:
    items = reply_texts(reply)
    if items[0] == "cancelled":
        return CancelReply("cancelled", items[1], items[2] == "1")
    if items[0] == "ended":
        return CancelReply("ended", items[1])
    return CancelReply("none")


class Requeue(Protocol):
    """How QUEUE_RECORDS enqueues a run once more (fanout.Requeued): a user's rerun
    (``new_run``) counts its attempts afresh, after ``attempts_before``, and the task sees
    ``rerun_id``; anything else goes on with the same run."""

    @property
    def new_run(self) -> bool: ...
    @property
    def attempts_before(self) -> int: ...
    @property
    def rerun_id(self) -> str | None: ...


class RunScripts(ScriptSet):
    """The scripts of a run queued, begun, renewed, finished, failed or cancelled."""

    def queue_records(self, *, runs_key: str, retention_s: int, fresh: Sequence[tuple[str, str]],
                      again: Sequence[tuple[str, str, str, Requeue]]) -> ScriptCall[None]:
        """``fresh``: (run_id, record JSON) of runs enqueued for the first time; ``again``:
        (run_id, base record JSON if it has none, job id, how) of runs enqueued once more."""
        args: list[Any] = [retention_s, len(fresh)]
        for run_id, record_json in fresh:
            args += [run_id, record_json]
        for run_id, base_json, job_id, how in again:
            # A user's rerun counts attempts afresh, after the executions so far; a recovery
            # goes on with the same run ('' leaves its attempts and rerun id as they are).
            args += [run_id, base_json, job_id, how.attempts_before if how.new_run else "", how.rerun_id or ""]
        return ScriptCall(self.script(QUEUE_RECORDS), [runs_key], args, lambda reply: None)

    def register_execution_scripts(self) -> None:
        """Register the scripts a run's execution sends (BEGIN, FINISH, FAIL, END_WAIT,
        the claim's renewal) now: a worker does so before it forks, so that each work-horse
        inherits them registered instead of compacting and registering them afresh (see
        compact); registering sends nothing. BEGIN and FINISH, which ride in RQ's
        transactions with every run, are also loaded into Redis (ScriptSet.load), so that
        they travel by SHA there; if Redis does not answer now, they travel with their body."""
        for lua in (BEGIN, FINISH, FAIL, END_WAIT, RENEW_CLAIM):
            self.script(lua)
        try:
            for lua in (BEGIN, FINISH):
                self.load(lua)
        except RedisError:
            pass

    def begin(self, *, finished_key: str, claim_key: str, runs_key: str, running_key: str, series_key: str,
              fence_key: str, run_id: str, owner: str, claim_ttl_ms: int, force: bool, base_json: str,
              retention_s: int, day: str, overlap: str, node: str, now_iso: str, job_id: str,
              max_attempts: int) -> ScriptCall[BeginReply]:
        return ScriptCall(self.script(BEGIN), [finished_key, claim_key, runs_key, running_key, series_key, fence_key],
                          [run_id, owner, claim_ttl_ms, lua_flag(force), base_json, retention_s, day, overlap, node,
                           now_iso, job_id, max_attempts], parse_begin, self.loaded_sha(BEGIN))

    def finish(self, *, finished_key: str, claim_key: str, runs_key: str, durations_key: str, running_key: str,
               series_key: str, deps_key: str, run_id: str, owner: str, base_json: str, retention_s: int, series: str,
               duration_s: float, node: str, now_iso: str) -> ScriptCall[bool]:
        """False (nothing changed) when the claim is not ``owner``'s any more."""
        return ScriptCall(self.script(FINISH),
                          [finished_key, claim_key, runs_key, durations_key, running_key, series_key, deps_key],
                          [run_id, owner, base_json, retention_s, series, f"{duration_s:.3f}", node, now_iso],
                          _parse_finish, self.loaded_sha(FINISH))

    def fail(self, *, claim_key: str, runs_key: str, running_key: str, series_key: str, failures_key: str,
             run_id: str, owner: str, base_json: str, retention_s: int, rq_can_retry: bool, max_attempts: int,
             node: str, now_iso: str, error: str, day: str) -> ScriptCall[FailOutcome]:
        return ScriptCall(self.script(FAIL), [claim_key, runs_key, running_key, series_key, failures_key],
                          [run_id, owner, base_json, retention_s, lua_flag(rq_can_retry), max_attempts, node, now_iso,
                           error, day], reply_text)  # type: ignore[arg-type]

    def end_wait(self, *, runs_key: str, claim_key: str, failures_key: str, run_id: str, job_id: str,
                 base_json: str, retention_s: int, rq_will_retry: bool, node: str, now_iso: str,
                 error_if_run_busy: str, error_if_series_busy: str, day: str) -> ScriptCall[FailOutcome]:
        """'retry', 'failed' or 'not-ours' (the record no longer says queued for this job)."""
        return ScriptCall(self.script(END_WAIT), [runs_key, claim_key, failures_key],
                          [run_id, job_id, base_json, retention_s, lua_flag(rq_will_retry), node, now_iso,
                           error_if_run_busy, error_if_series_busy, day], reply_text)  # type: ignore[arg-type]

    def renew_claim(self, *, claim_key: str, series_key: str, owner: str, ttl_ms: int,
                    permits_key: str | None = None) -> ScriptCall[RenewOutcome]:
        """``permits_key``: the task's slots, for a run of a task with limits (extended too)."""
        keys = [claim_key, series_key] + ([permits_key] if permits_key else [])
        return ScriptCall(self.script(RENEW_CLAIM), keys, [owner, ttl_ms], reply_text)  # type: ignore[arg-type]

    def trim_durations(self, *, durations_key: str, seen_key: str, oldest_kept_ordinal: int, today_ordinal: int,
                       batch: int) -> ScriptCall[int]:
        """How many series' learned durations were dropped (not fanned out since before
        ``oldest_kept_ordinal``)."""
        return ScriptCall(self.script(TRIM_DURATIONS), [durations_key, seen_key],
                          [oldest_kept_ordinal, today_ordinal, batch], int)

    def cancel(self, *, runs_key: str, claim_key: str, running_key: str, waiting_key: str, run_id: str, why: str,
               now_iso: str, retention_s: int) -> ScriptCall["CancelReply"]:
        return ScriptCall(self.script(CANCEL), [runs_key, claim_key, running_key, waiting_key],
                          [run_id, why, now_iso, retention_s], _parse_cancel)

    def release_cancelled(self, *, claim_key: str, series_key: str, owner: str) -> ScriptCall[str | None]:
        """Why the run was cancelled, once this copy's renamed claim is released; None if
        the claim is not one a cancel took from ``owner``."""
        return ScriptCall(self.script(RELEASE_CANCELLED), [claim_key, series_key], [owner],
                          lambda reply: reply_text(reply) or None)

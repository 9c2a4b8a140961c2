"""Every Lua script dailyq runs, and one typed wrapper per script.

Each script documents its ``KEYS`` and ``ARGV`` in a header inside the Lua, and binds
them to named locals at its top. Scripts are built from a few shared helpers (Redis
runs no includes, so the helpers a script uses are prepended to it):

* ``holds`` / ``del_if_owner`` / ``pexpire_if_owner``: the one compare-and-delete and
  the one extend-if-owner of an owner-token lease (the leader lease, a run's claim and
  its series claim);
* ``load_record`` / ``save_record`` / ``store_record``: the one way a run record
  changes -- load it (or start from its base), set fields, save it; a brand-new
  record is stored as the JSON its writer sent;
* ``redis_now_ms``: the Redis server's clock, the one clock every node shares;
* ``purge_permits`` / ``room`` / ``extend_permit`` / ``hold`` / ``promote``: the slots of a task
  with limits and its held runs (limits.py), shared by ADMIT, RELEASE_PERMIT, SWEEP_PERMITS,
  TOUCH_PERMIT, RESUME and RENEW_CLAIM; ``pool_room`` / ``promote_pool``: the same for
  the tasks of one pool together (ADMIT, RELEASE_PERMIT, SWEEP_PERMITS);
* ``count_finished``: the day's dependency counts (dependency_counts.py), kept by every
  script that adds a run id to a day's finished set (FINISH, REMOVE_LEFT, REMOVE_WAITING).

A few scripts run on a Redis out of memory (``allow_oom``): the lease, the leadership
mark, and what lets a run that executes now renew its claim and record its end. Each
writes a handful of small keys that exist already or go away with it, so a full Redis
grows by a few hundred bytes per executing run at most, while everything that adds a
run's worth of data (fan-out, BEGIN, the outbox) stays refused.

A wrapper method takes named, typed arguments and returns a ``ScriptCall``: ``run()``
sends it now and returns the parsed reply; ``queue_in(pipeline)`` adds it to a
pipeline someone else executes (RQ's own MULTI/EXEC), and ``parse`` reads the reply
taken from there. ``scripts_for(connection)`` registers every script once per
connection object.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Generic, Literal, Sequence, TypeVar

from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script

from .keys import DAY_CHANGES_SUFFIX, DAY_COUNTS_SUFFIX
from .redis_values import reply_text
from .runs import BLOCKED, CANCELLED, FAILED, FINISHED, QUEUED, REMOVED, RUNNING, SKIPPED, WAITING

T = TypeVar("T")

# The error a run skipped by overlap='skip' shows in its record.
OVERLAP_SKIPPED = "overlap: the previous slot's run of this task and param was still running"

# -- shared helpers ---------------------------------------------------------------------

OWNER_LUA = """
-- Owner-token leases: a key whose value names its holder.
local function holds(key, owner)
  return redis.call('GET', key) == owner
end
-- The one compare-and-delete: 1 when the key was ours and is gone now, else 0.
local function del_if_owner(key, owner)
  if holds(key, owner) then
    return redis.call('DEL', key)
  end
  return 0
end
-- Extends the key only while it is ours; never takes a free or foreign one.
local function pexpire_if_owner(key, owner, ttl_ms)
  if holds(key, owner) then
    redis.call('PEXPIRE', key, ttl_ms)
    return 1
  end
  return 0
end
"""

RECORD_LUA = f"""
-- Run records: JSON, one hash per day (``status`` reads a whole day with one HGETALL).
-- Every change is load_record, set fields, save_record; a new record is stored whole.
-- Each write also keeps, in the same step, the day's counts and change feed (day_feed.py):
-- runs_key .. '{DAY_COUNTS_SUFFIX}', a hash 's|state|task' -> runs in that state, 'r|slot|task' ->
-- records of that slot, '_seq' -> the day's last change, and '_counted' = 1 while the
-- counts cover every record (a new day's from its first; a day an older version began is
-- counted once by day_feed.py); runs_key .. '{DAY_CHANGES_SUFFIX}', a sorted set run_id -> the
-- '_seq' of its last change. Both expire a retention after the day's last new run.
local loaded = {{}}  -- runs_key .. ' ' .. run_id -> {{state, task}} as load_record found it, or false
local function before_of(runs_key, run_id)
  local seen = loaded[runs_key .. ' ' .. run_id]
  if seen == nil then
    local raw = redis.call('HGET', runs_key, run_id)
    seen = raw and cjson.decode(raw) or false
    seen = seen and {{tostring(seen.state), tostring(seen.task)}}
  end
  return seen
end
local function note_change(runs_key, run_id, before, record, retention_s)
  local counts_key, changes_key = runs_key .. '{DAY_COUNTS_SUFFIX}', runs_key .. '{DAY_CHANGES_SUFFIX}'
  local state, task = tostring(record.state), tostring(record.task)
  local counted = redis.call('HEXISTS', counts_key, '_counted') == 1
  if not counted and redis.call('EXISTS', runs_key) == 0 then
    redis.call('HSET', counts_key, '_counted', 1)  -- a new day: counted from its first record
    counted = true
  end
  if counted then
    if not before then
      redis.call('HINCRBY', counts_key, 'r|' .. tostring(record.slot) .. '|' .. task, 1)
    end
    if not before or before[1] ~= state or before[2] ~= task then
      if before then
        redis.call('HINCRBY', counts_key, 's|' .. before[1] .. '|' .. before[2], -1)
      end
      redis.call('HINCRBY', counts_key, 's|' .. state .. '|' .. task, 1)
    end
  end
  local seq = redis.call('HINCRBY', counts_key, '_seq', 1)
  redis.call('ZADD', changes_key, seq, run_id)
  if seq == 1 or not before then
    -- Set when the run (or the day's counts) is new, not at every change: two commands
    -- less per BEGIN and FINISH. Counts that expire before their records (a rerun days
    -- later kept those alive) are counted again once (day_feed.py), then go on.
    redis.call('EXPIRE', counts_key, retention_s)
    redis.call('EXPIRE', changes_key, retention_s)
  end
  loaded[runs_key .. ' ' .. run_id] = {{state, task}}
end
local function store_record(runs_key, run_id, record_json, retention_s, record)
  note_change(runs_key, run_id, before_of(runs_key, run_id), record or cjson.decode(record_json), retention_s)
  redis.call('HSET', runs_key, run_id, record_json)
  redis.call('EXPIRE', runs_key, retention_s)
end
-- The stored record, else the one decoded from base_json (nil when neither exists).
local function load_record(runs_key, run_id, base_json)
  local stored = redis.call('HGET', runs_key, run_id)
  local record = (stored or base_json) and cjson.decode(stored or base_json)
  loaded[runs_key .. ' ' .. run_id] = stored and {{tostring(record.state), tostring(record.task)}} or false
  return record
end
local function save_record(runs_key, run_id, record, retention_s)
  store_record(runs_key, run_id, cjson.encode(record), retention_s, record)
end
-- Executions of the record's current run id: ``attempts`` counts every execution shown
-- in ``status``; a user's rerun starts a new run id from ``attempts_before``.
local function run_attempts(record)
  return (tonumber(record.attempts) or 0) - (tonumber(record.attempts_before) or 0)
end
"""

# At most this many failure events wait for the leader's alerts (keys.alert_failures):
# a bound for a Redis that no leader reads for long; the oldest go first.
FAILURE_EVENTS_MAX = 100_000

NOTE_FAILED_LUA = f"""
-- A run recorded failed tells the alerts in the same step (alert_digest.py): an event
-- pushed onto the failures list, which the leader takes from the front. So a failure of
-- any day (a backfill, a rerun of an old day) is alerted, and nothing scans days for it.
local function note_failed(failures_key, day, run_id, record, retention_s)
  redis.call('RPUSH', failures_key, cjson.encode({{run_id = run_id, day = day, task = record.task,
    param_json = record.param_json, node = record.node, error = record.error, ended_at = record.ended_at,
    attempts = tonumber(record.attempts) or 0}}))
  redis.call('LTRIM', failures_key, -{FAILURE_EVENTS_MAX}, -1)
  redis.call('EXPIRE', failures_key, retention_s)
end
"""

NOW_LUA = """
-- Milliseconds of the Redis server's clock.
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


# -- cancel (cancelling.py) --
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

DEPS_LUA = """
-- The day's dependency counts (keys.day_deps, dependency_counts.py): one more run id of
-- ``task`` in the day's finished set. Called in the same script as the SADD that added it,
-- so the counts of a day only ever miss what an older version's scripts added (their sum
-- then differs from the set's size, and the reader counts the day again).
local function count_finished(deps_key, task, retention_s)
  redis.call('HINCRBY', deps_key, 'done:' .. tostring(task), 1)
  redis.call('EXPIRE', deps_key, retention_s)
end
"""


PERMITS_LUA = """
-- Slots of a task with limits (limits.py): a sorted set owner -> expiry (ms, Redis clock)
-- and a hash owner -> node. A member whose expiry passed is a dead or cut-off holder's:
-- every check drops those first, so its slot frees when its claim would lapse.
local function purge_permits(permits_key, nodes_key, now)
  for _, owner in ipairs(redis.call('ZRANGEBYSCORE', permits_key, '-inf', now)) do
    redis.call('ZREM', permits_key, owner)
    redis.call('HDEL', nodes_key, owner)
  end
end
local function permits_on(nodes_key, node)
  local n = 0
  for _, holder in ipairs(redis.call('HVALS', nodes_key)) do
    if holder == node then
      n = n + 1
    end
  end
  return n
end
-- How many more runs may start: by the task-wide limit, and by the per-node one on
-- ``nodes`` (each node's room added up; a huge number when a limit is not set).
local function room(permits_key, nodes_key, max_running, max_per_node, nodes)
  local free = 1000000000
  if max_running > 0 then
    free = max_running - redis.call('ZCARD', permits_key)
  end
  if max_per_node > 0 then
    local on_nodes = 0
    for _, node in ipairs(nodes) do
      on_nodes = on_nodes + math.max(0, max_per_node - permits_on(nodes_key, node))
    end
    free = math.min(free, on_nodes)
  end
  return free
end
-- Extends a live slot only: a released or lapsed one is not taken back by a late renewal.
local function extend_permit(permits_key, owner, ttl_ms)
  local now = redis_now_ms()
  local expiry = tonumber(redis.call('ZSCORE', permits_key, owner))
  if expiry and expiry > now then
    redis.call('ZADD', permits_key, 'XX', now + ttl_ms, owner)
    return 1
  end
  return 0
end
-- Held runs: a list in the order held (promote pops its head), which is what backs a held
-- run, and a set of the same job ids (the index), so that holding a run is an SADD, not a
-- scan of the list for it. An older version holds with LREM + RPUSH and promotes with LPOP,
-- leaving the index as it was, so during a rolling deploy the two may differ:
-- * a list with no index (an older version's, or every indexed id gone): indexed at the
--   next hold, once;
-- * an id the index names but the list lacks (an older promote took it): looked for in
--   the list (LPOS, on this path only: a job held while the index names it) and pushed
--   again, so it is never lost behind a stale index;
-- * an id in the list but not the index (an older hold while the index existed): held
--   again while still listed, it is listed twice; promote moves it once per call (a
--   later copy it finds in the queue is refused by BEGIN: the claim, not the list, keeps
--   a run from executing twice).
-- Bounds: both keys expire ``ttl_s`` after the last hold (a list nothing promotes any
-- more, say of a task gone from the table, goes), and the index goes when a promote
-- empties the list (Redis deletes an empty list itself).
local function hold(set_aside_key, index_key, job_id, ttl_s)
  if redis.call('EXISTS', index_key) == 0 then
    local listed = redis.call('LRANGE', set_aside_key, 0, -1)
    for i = 1, #listed, 1000 do  -- SADD in chunks: unpack has a stack limit
      redis.call('SADD', index_key, unpack(listed, i, math.min(i + 999, #listed)))
    end
  end
  if redis.call('SADD', index_key, job_id) == 1 or not redis.call('LPOS', set_aside_key, job_id) then
    redis.call('RPUSH', set_aside_key, job_id)
  end
  redis.call('EXPIRE', set_aside_key, ttl_s)
  redis.call('EXPIRE', index_key, ttl_s)
end
-- Moves up to n held job ids to the front of the queue, the oldest held first in line,
-- each once (a second copy of an id in the list is dropped, see hold).
local function promote(set_aside_key, index_key, queue_key, n)
  local moved, seen, drained = {}, {}, false
  while #moved < n do
    local job_id = redis.call('LPOP', set_aside_key)
    if not job_id then
      drained = true
      break
    end
    if not seen[job_id] then
      seen[job_id] = true
      redis.call('SREM', index_key, job_id)
      moved[#moved + 1] = job_id
    end
  end
  -- Ids an older promote left in the index go with the list it emptied (checked only when
  -- something moved: a release with nothing held costs its one LPOP, as before).
  if #moved > 0 and (drained or redis.call('EXISTS', set_aside_key) == 0) then
    redis.call('DEL', index_key)
  end
  for i = #moved, 1, -1 do
    redis.call('LPUSH', queue_key, moved[i])
  end
  return moved
end
-- A pool (limits.py) has no slots of its own: a run of a pool's task takes a slot of its
-- task, and the pool counts the live slots of all its tasks against its size. So the one
-- slot is both permits, taken and freed at once, and it lapses with the claim as any slot.
-- ``members``: {permits_key, nodes_key} of each task of the pool.
local function pool_room(size, members, now)
  local used = 0
  for _, member in ipairs(members) do
    purge_permits(member[1], member[2], now)
    used = used + redis.call('ZCARD', member[1])
  end
  return size - used
end
-- Moves held runs of a pool's tasks to the queue's front while the pool and each task have
-- room (per-node room counted on ``nodes``), dealt one at a time in turn from member
-- ``first`` on, so no task of the pool waits behind another's backlog; a paused task gets
-- none. ``members``: {name, permits_key, nodes_key, set_aside_key, max_running, max_per_node,
-- held index} (0: none) of each task of the pool. Returns the job ids moved.
local function promote_pool(paused_key, queue_key, size, members, nodes, first, now)
  local slot_keys, wants, counts = {}, {}, {}
  for i, member in ipairs(members) do
    slot_keys[i] = {member[2], member[3]}
  end
  local free = pool_room(size, slot_keys, now)
  for i, member in ipairs(members) do
    counts[i] = 0
    wants[i] = 0
    if redis.call('HEXISTS', paused_key, member[1]) == 0 then
      wants[i] = math.min(redis.call('LLEN', member[4]), room(member[2], member[3], member[5], member[6], nodes))
    end
  end
  local n, dealt = #members, true
  while free > 0 and dealt do
    dealt = false
    for k = 0, n - 1 do
      local i = (first - 1 + k) % n + 1
      if free > 0 and counts[i] < wants[i] then
        counts[i], free, dealt = counts[i] + 1, free - 1, true
      end
    end
  end
  -- The last in turn first: each promote puts its runs at the queue's front.
  local moved = {}
  for k = n - 1, 0, -1 do
    local i = (first - 1 + k) % n + 1
    if counts[i] > 0 then
      for _, job_id in ipairs(promote(members[i][4], members[i][7], queue_key, counts[i])) do
        moved[#moved + 1] = job_id
      end
    end
  end
  return moved
end
-- Pool members from KEYS (from ``k``, 4 keys each: slots, slot nodes, held list, held
-- index) and ARGV (from ``i``, 3 values each: name, max_running, max_per_node), ``n`` of them.
local function pool_members(k, i, n)
  local members = {}
  for j = 0, n - 1 do
    members[j + 1] = {ARGV[i + 3 * j], KEYS[k + 4 * j], KEYS[k + 4 * j + 1], KEYS[k + 4 * j + 2],
                      tonumber(ARGV[i + 3 * j + 1]), tonumber(ARGV[i + 3 * j + 2]), KEYS[k + 4 * j + 3]}
  end
  return members
end
"""


def _lua(body: str, *helpers: str) -> str:
    return "".join(helpers) + body


# Redis 7's script flags, on the script's first line ("shebang"; EVAL script flags). Without
# flags a script that starts while Redis is out of memory is refused at its first write
# that may add data (SET, HSET, SADD...); ``allow-oom`` lets it run. Only for scripts that
# write little and to keys that exist or go away with the run (see the module docstring).
# Redis 6 cannot compile the line (Lua sees a syntax error): there the script is sent
# without it (_Flagged), and runs as before.
ALLOW_OOM = "#!lua flags=allow-oom\n"


def allow_oom(script: str) -> str:
    """``script`` with the ``allow-oom`` flag (must be its very first line)."""
    return ALLOW_OOM + script


# -- the scripts --------------------------------------------------------------------------

LEASE_ACQUIRE_OR_RENEW = allow_oom(_lua("""
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

LEASE_RENEW = allow_oom(_lua("""
-- Extends the lease only while we own it; never takes a free one. Returns 1 or 0.
-- KEYS[1] = lease key
-- ARGV[1] = owner token, ARGV[2] = ttl (ms)
return pexpire_if_owner(KEYS[1], ARGV[1], ARGV[2])
""", OWNER_LUA))

LEASE_RELEASE = allow_oom(_lua("""
-- Deletes the lease only while we own it. Returns 1 when deleted, else 0.
-- KEYS[1] = lease key
-- ARGV[1] = owner token
return del_if_owner(KEYS[1], ARGV[1])
""", OWNER_LUA))

QUEUE_RECORDS = _lua(f"""
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

BEGIN = _lua(f"""
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

FINISH = allow_oom(_lua(f"""
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

FAIL = allow_oom(_lua(f"""
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

END_WAIT = _lua(f"""
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

RENEW_CLAIM = allow_oom(_lua("""
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

TAKE_IF_ABANDONED = _lua(f"""
-- The leader takes over a run listed as running: only if no live copy holds its claim.
-- It records the run failed when it has no attempts left, or when the caller cannot
-- requeue it (ARGV[5] says why). A run to requeue stays listed as running: the caller's
-- requeue removes it in the same MULTI/EXEC that enqueues its new job (recovery.py), so
-- a leader that dies or loses Redis in between leaves it listed for the next look.
-- KEYS[1] = running hash, KEYS[2] = the run's claim, KEYS[3] = day runs hash, KEYS[4] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = max attempts (0 = no limit), ARGV[3] = now (ISO), ARGV[4] = retention (s),
-- ARGV[5] = why the caller cannot requeue it ('' = it can), ARGV[6] = day (ISO)
-- Returns 'alive', 'gone' (someone else took it, or its day's records expired), 'failed' or 'requeue'.
local running_key, claim_key, runs_key = KEYS[1], KEYS[2], KEYS[3]
local run_id, max_attempts, now, retention_s, cannot = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5] or ''
if redis.call('EXISTS', claim_key) == 1 then
  return 'alive'
end
if redis.call('HEXISTS', running_key, run_id) == 0 then
  return 'gone'
end
local record = load_record(runs_key, run_id)
if not record then
  redis.call('HDEL', running_key, run_id)
  return 'gone'  -- its record expired with its day: no run left to requeue or to show
end
if record.state ~= '{RUNNING}' then
  -- a stale entry (the run finished, failed or was requeued meanwhile): nothing executes
  -- it, and requeueing it would leave a job that BEGIN skips and a record stuck queued
  redis.call('HDEL', running_key, run_id)
  return 'gone'
end
local lost = 'executing process lost on node ' .. tostring(record.node) ..
  ' (node died, killed, or cut off from Redis); '
local attempts = run_attempts(record)
if max_attempts > 0 and attempts >= max_attempts then
  lost = lost .. attempts .. ' of ' .. max_attempts .. ' attempts used'
elseif cannot ~= '' then
  lost = lost .. 'not requeued: ' .. cannot
else
  return 'requeue'
end
redis.call('HDEL', running_key, run_id)
record.state, record.ended_at, record.error = '{FAILED}', now, lost
save_record(runs_key, run_id, record, retention_s)
note_failed(KEYS[4], ARGV[6], run_id, record, retention_s)
return 'failed'
""", RECORD_LUA, NOTE_FAILED_LUA)

REQUEUE_STRANDED = _lua(f"""
-- Puts a job a worker took off the queue but never started back at the front of the
-- queue, once, if its run still waits for exactly this job (queued, not begun since).
-- KEYS[1] = RQ's intermediate queue, KEYS[2] = our queue, KEYS[3] = day runs hash
-- ARGV[1] = job id, ARGV[2] = run id
-- Returns 1 when requeued, else 0.
local intermediate_key, queue_key, runs_key = KEYS[1], KEYS[2], KEYS[3]
local job_id, run_id = ARGV[1], ARGV[2]
local record = load_record(runs_key, run_id)
if record and (record.state ~= '{QUEUED}' or record.job_id ~= job_id) then
  return 0
end
if redis.call('LREM', intermediate_key, 1, job_id) == 0 then
  return 0
end
redis.call('LPUSH', queue_key, job_id)
return 1
""", RECORD_LUA)

SET_RUN_STATE = _lua("""
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

RECOUNT_DAY = _lua("""
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

HOLD_WAITING = _lua(f"""
-- Held runs of one task whose upstream runs have not all finished: 'blocked', with an
-- error naming the upstream run, while one of those is failed, skipped, cancelled or blocked itself;
-- 'waiting' again once none is (a rerun queued it). Checked and set in one step: only
-- records now 'waiting' or 'blocked' change (a run released or begun meanwhile stays as
-- it is), and a record already right is not rewritten.
-- KEYS[1] = day runs hash (upstream and downstream runs of one day share it)
-- ARGV[1] = retention (s), ARGV[2] = a blocker the caller found ('' = none: an upstream
--   slot with no run record, whose params callable failed for good), ARGV[3] = its error,
--   ARGV[4] = n, then n upstream run ids (those not in the day's finished set), then the
--   held run ids
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

COUNT_DEPS = _lua("""
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

OUTBOX_ENQUEUE = _lua("""
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

OUTBOX_CLAIM = _lua("""
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

OUTBOX_RETRY = _lua("""
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

OUTBOX_DROP = _lua("""
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

MARK_LEADERSHIP = allow_oom(_lua("""
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


ADMIT = _lua("""
-- A worker asks, before it starts a run of a task with limits or a paused task, whether it
-- may: if the task is paused or has no room, the job is held back -- off RQ's intermediate
-- queue (so nothing takes it for stranded) and onto the task's held list, its RQ job left
-- queued -- else the run takes a slot (when the task has limits or a pool). A run of a
-- pool's task needs room in its task and in its pool; its one slot counts for both.
-- KEYS[1] = paused hash, KEYS[2] = the task's slots, KEYS[3] = slot nodes, KEYS[4] = held list,
-- KEYS[5] = RQ's intermediate queue, KEYS[6] = the held list's index (a set, see hold), then
-- per task of its pool (its own included): its slots, slot nodes
-- ARGV[1] = task, ARGV[2] = owner (the attempt's claim owner token), ARGV[3] = node,
-- ARGV[4] = job id, ARGV[5] = slot ttl (ms, the claim's), ARGV[6] = max_running (0: none),
-- ARGV[7] = max_per_node (0: none), ARGV[8] = the pool's size (0: in no pool),
-- ARGV[9] = how long the held list lives after its last hold (s)
-- Returns 'admitted', 'paused' or 'held'.
local paused_key, permits_key, nodes_key, set_aside_key, intermediate_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local index_key = KEYS[6]
local task, owner, node, job_id, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local max_running, max_per_node, pool_size = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local set_aside_ttl_s = tonumber(ARGV[9])
local now = redis_now_ms()
purge_permits(permits_key, nodes_key, now)
local pool = {}
for k = 7, #KEYS, 2 do
  pool[#pool + 1] = {KEYS[k], KEYS[k + 1]}
end
local why = nil
if redis.call('HEXISTS', paused_key, task) == 1 then
  why = 'paused'
elseif room(permits_key, nodes_key, max_running, max_per_node, {node}) < 1 then
  why = 'held'
elseif pool_size > 0 and pool_room(pool_size, pool, now) < 1 then
  why = 'held'
end
if why then
  redis.call('LREM', intermediate_key, 1, job_id)
  hold(set_aside_key, index_key, job_id, set_aside_ttl_s)  -- once in the list, however often held
  return why
end
if max_running > 0 or max_per_node > 0 or pool_size > 0 then
  redis.call('ZADD', permits_key, now + ttl_ms, owner)
  redis.call('HSET', nodes_key, owner, node)
end
return 'admitted'
""", NOW_LUA, PERMITS_LUA)

RELEASE_PERMIT = allow_oom(_lua("""
-- An admitted execution ended (finished, failed, not executed after all, or its work-horse
-- died): its slot frees, and held runs move to the queue's front while there is room --
-- in the same script as every hold, so no held run misses the wake-up. For a pool's task,
-- held runs of every task of the pool, starting with the task after this one (in turn).
-- KEYS[1] = paused hash, KEYS[2] = the task's slots, KEYS[3] = slot nodes, KEYS[4] = held list,
-- KEYS[5] = queue, KEYS[6] = the held list's index, then per task of its pool (its own
-- included): its slots, slot nodes, held list, held list's index
-- ARGV[1] = task, ARGV[2] = owner, ARGV[3] = node (whose room the freed slot is),
-- ARGV[4] = max_running (0: none), ARGV[5] = max_per_node (0: none), ARGV[6] = the pool's
-- size (0: in no pool), ARGV[7] = the task's place among the pool's tasks (from 1), then per
-- task of the pool: name, max_running (0: none), max_per_node (0: none)
-- Returns the job ids moved to the queue.
local paused_key, permits_key, nodes_key, set_aside_key, queue_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local index_key = KEYS[6]
local task, owner, node = ARGV[1], ARGV[2], ARGV[3]
local max_running, max_per_node, pool_size = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = redis_now_ms()
redis.call('ZREM', permits_key, owner)
redis.call('HDEL', nodes_key, owner)
purge_permits(permits_key, nodes_key, now)
if pool_size > 0 then
  local members = pool_members(7, 8, (#KEYS - 6) / 4)
  return promote_pool(paused_key, queue_key, pool_size, members, {node}, tonumber(ARGV[7]) % #members + 1, now)
end
if redis.call('HEXISTS', paused_key, task) == 1 then
  return {}
end
return promote(set_aside_key, index_key, queue_key, room(permits_key, nodes_key, max_running, max_per_node, {node}))
""", NOW_LUA, PERMITS_LUA))

SWEEP_PERMITS = _lua("""
-- The leader, every tick: drops lapsed slots (holders that died or were cut off) and moves
-- held runs of tasks with limits to the queue's front while there is room. Per-node room
-- is counted on every node that beat within the last ``live_s`` seconds. The tasks of a
-- pool are moved together (promote_pool), while the pool has room.
-- KEYS[1] = paused hash, KEYS[2] = queue, KEYS[3] = nodes registry (node -> last beat, s),
-- then per task: its slots, slot nodes, held list, held list's index
-- ARGV[1] = live_s, then per task: name, max_running (0: none), max_per_node (0: none),
-- its pool ('' for none), the pool's size (0: none)
-- Returns the job ids moved to the queue.
local paused_key, queue_key, registry_key = KEYS[1], KEYS[2], KEYS[3]
local now = redis_now_ms()
local nodes = redis.call('ZRANGEBYSCORE', registry_key, now / 1000 - tonumber(ARGV[1]), '+inf')
-- no node known: count one, so held runs are not stuck behind an empty registry
local where = #nodes > 0 and nodes or {''}
local moved = {}
local pools, pool_names = {}, {}
for i = 2, #ARGV, 5 do
  local k = 4 + 4 * (i - 2) / 5
  local permits_key, nodes_key, set_aside_key, index_key = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local task, max_running, max_per_node = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local pool, pool_size = ARGV[i + 3], tonumber(ARGV[i + 4])
  purge_permits(permits_key, nodes_key, now)
  if pool ~= '' then
    if not pools[pool] then
      pools[pool] = {size = pool_size, members = {}}
      pool_names[#pool_names + 1] = pool
    end
    local members = pools[pool].members
    members[#members + 1] = {task, permits_key, nodes_key, set_aside_key, max_running, max_per_node, index_key}
  elseif redis.call('HEXISTS', paused_key, task) == 0 and redis.call('LLEN', set_aside_key) > 0 then
    for _, job_id in ipairs(promote(set_aside_key, index_key, queue_key,
                                    room(permits_key, nodes_key, max_running, max_per_node, where))) do
      moved[#moved + 1] = job_id
    end
  end
end
for _, pool in ipairs(pool_names) do
  for _, job_id in ipairs(promote_pool(paused_key, queue_key, pools[pool].size, pools[pool].members, where, 1,
                                       now)) do
    moved[#moved + 1] = job_id
  end
end
return moved
""", NOW_LUA, PERMITS_LUA)

TOUCH_PERMIT = allow_oom(_lua("""
-- Keeps the slot of an admitted run alive while it waits for another copy of the run
-- (BEGIN said busy): it has no claim yet for RENEW_CLAIM to extend the slot with.
-- KEYS[1] = the task's slots
-- ARGV[1] = owner, ARGV[2] = ttl (ms)
-- Returns 1, or 0 when the slot is gone.
return extend_permit(KEYS[1], ARGV[1], ARGV[2])
""", NOW_LUA, PERMITS_LUA))

RESUME = _lua("""
-- Resumes a task: no longer paused, and every run held back (paused or over a limit) goes
-- to the queue's front, in the order held; ADMIT holds again any still over a limit.
-- KEYS[1] = paused hash, KEYS[2] = held list, KEYS[3] = queue, KEYS[4] = the held list's index
-- ARGV[1] = task
-- Returns {1 if it was paused else 0, number of runs moved}.
local paused_key, set_aside_key, queue_key, index_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local was_paused = redis.call('HDEL', paused_key, ARGV[1])
local moved = promote(set_aside_key, index_key, queue_key, redis.call('LLEN', set_aside_key))
return {was_paused, #moved}
""", NOW_LUA, PERMITS_LUA)


SETTLE_FAILED = _lua(f"""
-- The leader settles the run of a job RQ failed outside the guard (settle.py): the record
-- is failed with RQ's reason, only while nothing else backs what it says -- it names this
-- job and says queued, running or waiting, RQ still has the job failed, no copy holds the
-- run's claim, recovery does not list it as running (recovery takes those over), and no
-- waiting entry or left job (deploys) stands behind it.
-- KEYS[1] = day runs hash, KEYS[2] = the run's claim, KEYS[3] = running hash,
-- KEYS[4] = day waiting hash, KEYS[5] = RQ's job hash, KEYS[6] = left jobs (sorted set),
-- KEYS[7] = alert failures list
-- ARGV[1] = run_id, ARGV[2] = job_id, ARGV[3] = error, ARGV[4] = now (ISO), ARGV[5] = retention (s),
-- ARGV[6] = day (ISO)
-- Returns 1 when it settled the run, else 0.
local runs_key, claim_key, running_key, waiting_key, job_key, left_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local run_id, job_id, error_text, now, retention_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local record = load_record(runs_key, run_id)
if not record or record.job_id ~= job_id then
  return 0
end
if record.state ~= '{QUEUED}' and record.state ~= '{RUNNING}' and record.state ~= '{WAITING}' then
  return 0
end
if redis.call('HGET', job_key, 'status') ~= 'failed' or redis.call('EXISTS', claim_key) == 1
    or redis.call('HEXISTS', running_key, run_id) == 1 or redis.call('HEXISTS', waiting_key, run_id) == 1
    or redis.call('ZSCORE', left_key, job_id) then
  return 0
end
record.state, record.error, record.ended_at = '{FAILED}', error_text, now
save_record(runs_key, run_id, record, retention_s)
note_failed(KEYS[7], ARGV[6], run_id, record, retention_s)
return 1
""", RECORD_LUA, NOTE_FAILED_LUA)

REQUEUE_ORPHANED = _lua(f"""
-- A copy that stopped because its claim was gone (guard.py) records nothing: another copy
-- owns the run, or the leader takes it over from the running hash. Unless Redis itself lost
-- the claim with the rest of the run's start (a failover to a replica that lagged): then
-- nothing backs the record any more, and the copy's worker puts the job back at the
-- queue's front here, after RQ handled the job's end, so that the run is not lost.
-- Only while the record names this job and says queued or running, no copy holds the
-- claim, the run is not finished, not in the running hash (recovery's), not waiting and
-- not left, and RQ still has the job's hash; a job still in the queue is not pushed twice.
-- KEYS[1] = day runs hash, KEYS[2] = the run's claim, KEYS[3] = running hash,
-- KEYS[4] = day finished set, KEYS[5] = day waiting hash, KEYS[6] = left jobs (sorted set),
-- KEYS[7] = queue, KEYS[8] = RQ's intermediate queue, KEYS[9] = RQ's job hash,
-- KEYS[10] = RQ's failed job registry
-- ARGV[1] = run_id, ARGV[2] = job_id, ARGV[3] = retention (s)
-- Returns 'requeued', 'in-queue' (made queued where it is), 'backed' or 'changed' (nothing done).
local runs_key, claim_key, running_key, finished_key, waiting_key, left_key = KEYS[1], KEYS[2], KEYS[3],
  KEYS[4], KEYS[5], KEYS[6]
local queue_key, intermediate_key, job_key, failed_key = KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local run_id, job_id, retention_s = ARGV[1], ARGV[2], ARGV[3]
local record = load_record(runs_key, run_id)
if not record or record.job_id ~= job_id or (record.state ~= '{QUEUED}' and record.state ~= '{RUNNING}') then
  return 'changed'
end
if redis.call('EXISTS', claim_key) == 1 or redis.call('SISMEMBER', finished_key, run_id) == 1
    or redis.call('HEXISTS', running_key, run_id) == 1 or redis.call('HEXISTS', waiting_key, run_id) == 1
    or redis.call('ZSCORE', left_key, job_id) or redis.call('EXISTS', job_key) == 0 then
  return 'backed'
end
redis.call('ZREM', failed_key, job_id)
-- Queued again: as RQ keeps a queued job (a finished one would expire with its result TTL).
redis.call('HSET', job_key, 'status', 'queued')
redis.call('PERSIST', job_key)
local outcome = 'in-queue'
if not (redis.call('LPOS', queue_key, job_id) or redis.call('LPOS', intermediate_key, job_id)) then
  redis.call('LPUSH', queue_key, job_id)
  outcome = 'requeued'
end
if record.state ~= '{QUEUED}' then
  record.state = '{QUEUED}'
  save_record(runs_key, run_id, record, retention_s)
end
return outcome
""", RECORD_LUA)

# -- learned durations (fanout.py, scheduler.py) ------------------------------------------

TRIM_DURATIONS = _lua("""
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

# -- rolling deploys (deploys.py) ----------------------------------------------------------

LEAVE = _lua(f"""
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

RETURN_LEFT = _lua("""
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

REMOVE_LEFT = _lua(f"""
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
record.state, record.ended_at, record.error = '{REMOVED}', now, why
save_record(runs_key, run_id, record, retention_s)
if redis.call('SADD', finished_key, run_id) == 1 then
  count_finished(deps_key, record.task, retention_s)
end
redis.call('EXPIRE', finished_key, retention_s)
return 'removed'
""", RECORD_LUA, DEPS_LUA)

REMOVE_WAITING = _lua(f"""
-- A held run (waiting for its upstream runs) that no live node's table has had for the
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
record.state, record.ended_at, record.error = '{REMOVED}', now, why
save_record(runs_key, run_id, record, retention_s)
if redis.call('SADD', finished_key, run_id) == 1 then
  count_finished(deps_key, record.task, retention_s)
end
redis.call('EXPIRE', finished_key, retention_s)
return 'removed'
""", RECORD_LUA, DEPS_LUA)


# -- cancel (cancelling.py) ----------------------------------------------------------------------

CANCEL = _lua(f"""
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

RELEASE_CANCELLED = _lua("""
-- A copy that stopped for a cancel releases its claim and series claim.
-- KEYS[1] = run claim, KEYS[2] = series claim
-- ARGV[1] = the copy's owner token
-- Returns why the run was cancelled, or '' (the claim is not one a cancel took from this copy).
return release_cancelled(KEYS[1], KEYS[2], ARGV[1]) or ''
""", OWNER_LUA, CANCELLED_CLAIM_LUA)


# -- Redis out of memory (redis_memory.py) ---------------------------------------------------

MEMORY_FULL_MARK = allow_oom(_lua("""
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


# -- parsed replies -----------------------------------------------------------------------

# MARK_LEADERSHIP's answer: ('ok', None, now_ms), ('gap', last_ms, now_ms) or ('not-leader', None, None).
LeadershipMark = tuple[str, "int | None", "int | None"]
BeginOutcome = Literal["claimed", "finished", "superseded", "exhausted", "busy", "skipped", "cancelled"]
BEGIN_OUTCOMES: tuple[BeginOutcome, ...] = ("claimed", "finished", "superseded", "exhausted", "busy", "skipped",
                                            "cancelled")
FailOutcome = Literal["retry", "failed", "not-ours"]
RenewOutcome = Literal["ok", "taken", "gone", "cancelled"]
TakeOutcome = Literal["alive", "gone", "failed", "requeue"]
AckOutcome = Literal["ours", "taken", "gone"]
# HOLD_WAITING's answer: (the upstream run blocking the held runs or None, records changed).
HoldReply = tuple["str | None", int]

AdmitOutcome = Literal["admitted", "paused", "held"]


@dataclass(frozen=True)
class LimitedTask:
    """One task's limits and keys, for SWEEP_PERMITS (and, for the tasks of a pool, ADMIT
    and RELEASE_PERMIT); ``pool`` and ``pool_size`` (0: in no pool) from the table's POOLS."""

    name: str
    max_running: int | None
    max_per_node: int | None
    permits_key: str
    permit_nodes_key: str
    set_aside_key: str
    set_aside_index_key: str
    pool: str | None = None
    pool_size: int = 0


@dataclass(frozen=True)
class BeginReply:
    """BEGIN's answer; ``outcome`` is None for anything else (an error a pipeline
    handed back instead): the guard then asks again."""

    outcome: BeginOutcome | None
    attempt: int = 0
    fence: int = 0


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


@dataclass(frozen=True)
class Requeued:
    """A run enqueued once more (QUEUE_RECORDS): its record keeps its history."""

    run_id: str
    base_json: str  # its record if it has none
    job_id: str
    # A user's rerun (a new run id, attempts counted afresh): the executions so far, and
    # the id the task sees. None for a recovery, which goes on with the same run.
    attempts_before: int | None = None
    rerun_id: str | None = None


@dataclass(frozen=True)
class OutboxAlert:
    """One alert for OUTBOX_ENQUEUE."""

    day_key: str  # keys.day_alerts(day)
    alert_id: str
    payload_json: str


def _texts(reply: Any) -> list[str]:
    return [reply_text(item) for item in reply or []]


def lua_ms(value: Any) -> int:
    """Milliseconds as Lua wrote them (``tostring`` of a number: digits, maybe a float form)."""
    return int(float(reply_text(value)))


def _flag(value: bool) -> str:
    return "1" if value else "0"


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


def _parse_claim(reply: Any) -> Claimed | Idle:
    now_ms = lua_ms(reply[0])
    if len(reply) == 2:
        next_ms = lua_ms(reply[1])
        return Idle(now_ms, next_ms if next_ms >= 0 else None)
    entry = json.loads(reply_text(reply[2]))
    return Claimed(reply_text(reply[1]), str(entry["payload"]), lua_ms(entry["created_ms"]),
                   int(entry.get("attempts") or 0), now_ms)


def _parse_hold(reply: Any) -> HoldReply:
    blocker = reply_text(reply[0])
    return (blocker or None), int(reply[1])


def _parse_mark_leadership(reply: Any) -> LeadershipMark:
    outcome = reply_text(reply[0])
    if outcome == "gap":
        return outcome, lua_ms(reply[1]), lua_ms(reply[2])
    if outcome == "ok":
        return outcome, None, lua_ms(reply[1])
    return outcome, None, None


PARAMS_STORE = _lua("""
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


TABLE_SKEW_SYNC = _lua("""
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


# -- the generation mark and what a node remembers past a loss (generation.py) -----------

GENERATION_ENSURE = _lua("""
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

RESTORE_MEMORY = _lua("""
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

DATA_LOST_ALERT_CLAIM = _lua("""
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


# -- calls --------------------------------------------------------------------------------

class _Flagged:
    """A script with Redis 7 flags on its first line (``allow_oom``), and the same script
    without that line for an older Redis, which cannot compile it. Which one is sent is
    decided by the server's version, read once per connection (``Scripts.flags_supported``).
    Looks like a redis-py ``Script`` to ScriptCall: called, or its ``script`` queued."""

    def __init__(self, owner: "Scripts", flagged: Script, plain: Script) -> None:
        self.owner = owner
        self.flagged = flagged
        self.plain = plain

    def chosen(self) -> Script:
        return self.flagged if self.owner.flags_supported() else self.plain

    @property
    def script(self) -> str:
        return str(self.chosen().script)

    @property
    def sha(self) -> str:
        """The SHA the chosen script is sent under (EVALSHA)."""
        return str(self.chosen().sha)

    def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self.chosen()(keys=keys, args=args)


@dataclass(frozen=True)
class ScriptCall(Generic[T]):
    """One call of a script: sent now (``run``), or queued in a pipeline someone else
    executes (``queue_in``), whose reply ``parse`` then reads."""

    script: Script | _Flagged
    keys: Sequence[str]
    args: Sequence[Any]
    parse: Callable[[Any], T]

    def run(self) -> T:
        return self.parse(self.script(keys=self.keys, args=self.args))

    def queue_in(self, pipeline: Pipeline) -> None:
        # EVAL with the body, not the Script object: on a pipeline, redis-py first sends
        # SCRIPT EXISTS (a round trip of its own, the very cost queueing saves), and an
        # EVALSHA that meets NOSCRIPT (Redis restarted since we loaded the script) would
        # fail the caller's whole transaction. Redis caches the compiled body either way.
        pipeline.eval(self.script.script, len(self.keys), *self.keys, *self.args)  # type: ignore[arg-type]


def compact(lua: str) -> str:
    """The script as sent: without its comment lines and indentation. BEGIN and FINISH
    travel as EVAL bodies with every run (ScriptCall.queue_in), and their documentation
    would otherwise more than double what each run sends."""
    kept = (line.strip() for line in lua.splitlines())
    # (A flags line, "#!lua flags=...", is no comment: it stays, and stays first.)
    return "\n".join(line for line in kept if line and not (line.startswith("--") and not line.startswith("--[[")))


# The first Redis major version that reads script flags (EVAL's "#!lua flags=..." line).
FLAGS_SINCE_MAJOR = 7


def redis_major(version: str) -> int:
    """``7`` for "7.0.15"; 0 when unreadable (then no flags are sent)."""
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return 0


class Scripts:
    """Every script, registered on one connection: get it with ``scripts_for``."""

    def __init__(self, connection: Redis) -> None:
        self.connection = connection
        # Whether the server reads script flags (Redis >= 7): asked on first need, not here
        # (Redis may be away when a process builds its Scripts).
        self._flags: bool | None = None

        def register(lua: str) -> Any:
            if lua.startswith(ALLOW_OOM):
                return _Flagged(self, connection.register_script(compact(lua)),
                                connection.register_script(compact(lua[len(ALLOW_OOM):])))
            return connection.register_script(compact(lua))

        self._lease_acquire_or_renew = register(LEASE_ACQUIRE_OR_RENEW)
        self._lease_renew = register(LEASE_RENEW)
        self._lease_release = register(LEASE_RELEASE)
        self._queue_records = register(QUEUE_RECORDS)
        self._begin = register(BEGIN)
        self._finish = register(FINISH)
        self._fail = register(FAIL)
        self._end_wait = register(END_WAIT)
        self._renew_claim = register(RENEW_CLAIM)
        self._take_if_abandoned = register(TAKE_IF_ABANDONED)
        self._requeue_stranded = register(REQUEUE_STRANDED)
        self._recount_day = register(RECOUNT_DAY)
        self._settle_failed = register(SETTLE_FAILED)
        self._requeue_orphaned = register(REQUEUE_ORPHANED)
        self._outbox_enqueue = register(OUTBOX_ENQUEUE)
        self._outbox_claim = register(OUTBOX_CLAIM)
        self._outbox_ack = register(OUTBOX_ACK)
        self._outbox_retry = register(OUTBOX_RETRY)
        self._outbox_drop = register(OUTBOX_DROP)
        self._mark_parked = register(MARK_LEADERSHIP)
        self._params_store = register(PARAMS_STORE)
        self._set_run_state = register(SET_RUN_STATE)
        self._hold_waiting = register(HOLD_WAITING)
        self._count_deps = register(COUNT_DEPS)
        self._admit = register(ADMIT)
        self._release_slot = register(RELEASE_PERMIT)
        self._sweep_slots = register(SWEEP_PERMITS)
        self._touch_slot = register(TOUCH_PERMIT)
        self._resume = register(RESUME)
        self._leave = register(LEAVE)
        self._trim_durations = register(TRIM_DURATIONS)
        self._return_left = register(RETURN_LEFT)
        self._remove_left = register(REMOVE_LEFT)
        self._remove_waiting = register(REMOVE_WAITING)
        self._table_skew_sync = register(TABLE_SKEW_SYNC)
        self._doctor_requeue = register(DOCTOR_REQUEUE)
        self._doctor_settle = register(DOCTOR_SETTLE)
        self._doctor_park = register(DOCTOR_PARK)
        self._doctor_list_running = register(DOCTOR_LIST_RUNNING)
        self._doctor_drop_entry = register(DOCTOR_DROP_ENTRY)
        self._generation_ensure = register(GENERATION_ENSURE)
        self._restore_memory = register(RESTORE_MEMORY)
        self._data_lost_alert_claim = register(DATA_LOST_ALERT_CLAIM)
        self._memory_full_mark = register(MEMORY_FULL_MARK)
        self._cancel = register(CANCEL)
        self._release_cancelled = register(RELEASE_CANCELLED)

    def flags_supported(self) -> bool:
        """Whether this connection's server reads script flags (Redis >= 7); one INFO the
        first time, then remembered for the connection. A worker asks before it forks
        (worker.WorkerContext), so its work-horses inherit the answer and a run costs no
        round trip for it. (A Sentinel failover to a server of another version would need a
        restart of the process to be seen.)"""
        if self._flags is None:
            info = self.connection.info("server")
            self._flags = redis_major(str(info.get("redis_version", "0"))) >= FLAGS_SINCE_MAJOR
        return self._flags

    # -- owner-token leases (lease.py) --

    def lease_acquire_or_renew(self, *, lease_key: str, owner: str, ttl_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self._lease_acquire_or_renew, [lease_key], [owner, ttl_ms], bool)

    def lease_renew(self, *, lease_key: str, owner: str, ttl_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self._lease_renew, [lease_key], [owner, ttl_ms], bool)

    def lease_release(self, *, lease_key: str, owner: str) -> ScriptCall[bool]:
        return ScriptCall(self._lease_release, [lease_key], [owner], bool)

    # -- run records at fan-out (fanout.py) --

    def queue_records(self, *, runs_key: str, retention_s: int, fresh: Sequence[tuple[str, str]],
                      again: Sequence[Requeued]) -> ScriptCall[None]:
        """``fresh``: (run_id, record JSON) of runs enqueued for the first time."""
        args: list[Any] = [retention_s, len(fresh)]
        for run_id, record_json in fresh:
            args += [run_id, record_json]
        for run in again:
            args += [run.run_id, run.base_json, run.job_id,
                     "" if run.attempts_before is None else run.attempts_before, run.rerun_id or ""]
        return ScriptCall(self._queue_records, [runs_key], args, lambda reply: None)

    # -- runs held for their upstream runs (fanout.py, dependencies.py) --

    def set_run_state(self, *, runs_key: str, retention_s: int, state: str,
                      run_ids: Sequence[str]) -> ScriptCall[int]:
        """Returns how many of the runs had a record (and now have ``state``)."""
        return ScriptCall(self._set_run_state, [runs_key], [retention_s, state, *run_ids], int)

    def recount_day(self, *, runs_key: str, counts_key: str) -> ScriptCall[int]:
        """Counts the day's records afresh (day_feed.py); returns how many there are."""
        return ScriptCall(self._recount_day, [runs_key, counts_key], [], int)

    def hold_waiting(self, *, runs_key: str, retention_s: int, unfinished_upstream: Sequence[str],
                     held: Sequence[str], given_blocker: tuple[str, str] | None = None) -> ScriptCall[HoldReply]:
        """``held`` runs of one task, ``unfinished_upstream`` their upstream runs not in the
        day's finished set; ``given_blocker`` (id, error) blocks them whatever the records say.
        Returns (the upstream run blocking them or None, records changed)."""
        blocker_id, blocker_error = given_blocker or ("", "")
        return ScriptCall(self._hold_waiting, [runs_key],
                          [retention_s, blocker_id, blocker_error, len(unfinished_upstream), *unfinished_upstream,
                           *held], _parse_hold)

    # -- the worker-side guard (guard.py) --

    def count_deps(self, *, deps_key: str, finished_key: str, runs_key: str, waiting_key: str,
                   retention_s: int) -> ScriptCall[int]:
        """The day's dependency counts made anew; returns the finished run ids counted."""
        return ScriptCall(self._count_deps, [deps_key, finished_key, runs_key, waiting_key], [retention_s], int)

    def begin(self, *, finished_key: str, claim_key: str, runs_key: str, running_key: str, series_key: str,
              fence_key: str, run_id: str, owner: str, claim_ttl_ms: int, force: bool, base_json: str,
              retention_s: int, day: str, overlap: str, node: str, now_iso: str, job_id: str,
              max_attempts: int) -> ScriptCall[BeginReply]:
        return ScriptCall(self._begin, [finished_key, claim_key, runs_key, running_key, series_key, fence_key],
                          [run_id, owner, claim_ttl_ms, _flag(force), base_json, retention_s, day, overlap, node,
                           now_iso, job_id, max_attempts], parse_begin)

    def finish(self, *, finished_key: str, claim_key: str, runs_key: str, durations_key: str, running_key: str,
               series_key: str, deps_key: str, run_id: str, owner: str, base_json: str, retention_s: int, series: str,
               duration_s: float, node: str, now_iso: str) -> ScriptCall[bool]:
        """False (nothing changed) when the claim is not ``owner``'s any more."""
        return ScriptCall(self._finish, [finished_key, claim_key, runs_key, durations_key, running_key, series_key,
                                         deps_key],
                          [run_id, owner, base_json, retention_s, series, f"{duration_s:.3f}", node, now_iso],
                          _parse_finish)

    def fail(self, *, claim_key: str, runs_key: str, running_key: str, series_key: str, failures_key: str,
             run_id: str, owner: str, base_json: str, retention_s: int, rq_can_retry: bool, max_attempts: int,
             node: str, now_iso: str, error: str, day: str) -> ScriptCall[FailOutcome]:
        return ScriptCall(self._fail, [claim_key, runs_key, running_key, series_key, failures_key],
                          [run_id, owner, base_json, retention_s, _flag(rq_can_retry), max_attempts, node, now_iso,
                           error, day], reply_text)  # type: ignore[arg-type]

    def end_wait(self, *, runs_key: str, claim_key: str, failures_key: str, run_id: str, job_id: str,
                 base_json: str, retention_s: int, rq_will_retry: bool, node: str, now_iso: str,
                 error_if_run_busy: str, error_if_series_busy: str, day: str) -> ScriptCall[FailOutcome]:
        """'retry', 'failed' or 'not-ours' (the record no longer says queued for this job)."""
        return ScriptCall(self._end_wait, [runs_key, claim_key, failures_key],
                          [run_id, job_id, base_json, retention_s, _flag(rq_will_retry), node, now_iso,
                           error_if_run_busy, error_if_series_busy, day], reply_text)  # type: ignore[arg-type]

    def renew_claim(self, *, claim_key: str, series_key: str, owner: str, ttl_ms: int,
                    permits_key: str | None = None) -> ScriptCall[RenewOutcome]:
        """``permits_key``: the task's slots, for a run of a task with limits (extended too)."""
        keys = [claim_key, series_key] + ([permits_key] if permits_key else [])
        return ScriptCall(self._renew_claim, keys, [owner, ttl_ms], reply_text)  # type: ignore[arg-type]

    # -- limits and pause (limits.py, pausing.py) --

    def admit(self, *, paused_key: str, permits_key: str, permit_nodes_key: str, set_aside_key: str, set_aside_index_key: str,
              intermediate_queue_key: str, task: str, owner: str, node: str, job_id: str, ttl_ms: int,
              max_running: int | None, max_per_node: int | None, set_aside_ttl_s: int, pool_size: int = 0,
              pool: Sequence[LimitedTask] = ()) -> ScriptCall[AdmitOutcome]:
        """``pool``: every task of the run's pool (its own included), of size ``pool_size``;
        ``set_aside_ttl_s``: how long the held list (and its index) lives after its last hold."""
        keys = [paused_key, permits_key, permit_nodes_key, set_aside_key, intermediate_queue_key, set_aside_index_key]
        for member in pool:
            keys += [member.permits_key, member.permit_nodes_key]
        return ScriptCall(self._admit, keys,
                          [task, owner, node, job_id, ttl_ms, max_running or 0, max_per_node or 0, pool_size,
                           set_aside_ttl_s], reply_text)  # type: ignore[arg-type]

    def release_permit(self, *, paused_key: str, permits_key: str, permit_nodes_key: str, set_aside_key: str,
                     set_aside_index_key: str, queue_key: str, task: str, owner: str, node: str, max_running: int | None,
                     max_per_node: int | None, pool_size: int = 0,
                     pool: Sequence[LimitedTask] = ()) -> ScriptCall[list[str]]:
        """The job ids it moved from the held list (for a pool's task: the pool's tasks'
        held lists) to the queue. ``pool``: every task of the pool, ``task`` among them."""
        keys = [paused_key, permits_key, permit_nodes_key, set_aside_key, queue_key, set_aside_index_key]
        place = next((i + 1 for i, member in enumerate(pool) if member.name == task), 0)
        args: list[Any] = [task, owner, node, max_running or 0, max_per_node or 0, pool_size if place else 0, place]
        for member in pool if place else ():
            keys += [member.permits_key, member.permit_nodes_key, member.set_aside_key, member.set_aside_index_key]
            args += [member.name, member.max_running or 0, member.max_per_node or 0]
        return ScriptCall(self._release_slot, keys, args, _texts)

    def sweep_permits(self, *, paused_key: str, queue_key: str, nodes_key: str, live_s: int,
                    tasks: Sequence[LimitedTask]) -> ScriptCall[list[str]]:
        """The job ids it moved from held lists to the queue."""
        keys = [paused_key, queue_key, nodes_key]
        args: list[Any] = [live_s]
        for task in tasks:
            keys += [task.permits_key, task.permit_nodes_key, task.set_aside_key, task.set_aside_index_key]
            args += [task.name, task.max_running or 0, task.max_per_node or 0, task.pool or "",
                     task.pool_size if task.pool else 0]
        return ScriptCall(self._sweep_slots, keys, args, _texts)

    def touch_permit(self, *, permits_key: str, owner: str, ttl_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self._touch_slot, [permits_key], [owner, ttl_ms], bool)

    def resume(self, *, paused_key: str, set_aside_key: str, set_aside_index_key: str, queue_key: str,
               task: str) -> ScriptCall[tuple[bool, int]]:
        """(whether the task was paused, how many held runs went back to the queue)."""
        return ScriptCall(self._resume, [paused_key, set_aside_key, queue_key, set_aside_index_key], [task],
                          lambda reply: (bool(int(reply[0])), int(reply[1])))

    # -- recovery (recovery.py) --

    def take_if_abandoned(self, *, running_key: str, claim_key: str, runs_key: str, failures_key: str, run_id: str,
                          max_attempts: int, now_iso: str, retention_s: int, day: str,
                          cannot_requeue: str = "") -> ScriptCall[TakeOutcome]:
        """``cannot_requeue``: why the caller could not requeue the run (it is failed then)."""
        return ScriptCall(self._take_if_abandoned, [running_key, claim_key, runs_key, failures_key],
                          [run_id, max_attempts, now_iso, retention_s, cannot_requeue, day],
                          reply_text)  # type: ignore[arg-type]

    def requeue_stranded(self, *, intermediate_queue_key: str, queue_key: str, runs_key: str, job_id: str,
                         run_id: str) -> ScriptCall[bool]:
        return ScriptCall(self._requeue_stranded, [intermediate_queue_key, queue_key, runs_key], [job_id, run_id],
                          bool)

    def settle_failed(self, *, runs_key: str, claim_key: str, running_key: str, waiting_key: str, job_key: str,
                      left_key: str, failures_key: str, run_id: str, job_id: str, error: str, now_iso: str,
                      retention_s: int, day: str) -> ScriptCall[bool]:
        """True when the run's record was failed with ``error`` (settle.py)."""
        return ScriptCall(self._settle_failed,
                          [runs_key, claim_key, running_key, waiting_key, job_key, left_key, failures_key],
                          [run_id, job_id, error, now_iso, retention_s, day], bool)

    def requeue_orphaned(self, *, runs_key: str, claim_key: str, running_key: str, finished_key: str,
                         waiting_key: str, left_key: str, queue_key: str, intermediate_queue_key: str, job_key: str,
                         failed_registry_key: str, run_id: str, job_id: str,
                         retention_s: int) -> ScriptCall[str]:
        """'requeued', 'in-queue', 'backed' or 'changed' (REQUEUE_ORPHANED)."""
        return ScriptCall(self._requeue_orphaned,
                          [runs_key, claim_key, running_key, finished_key, waiting_key, left_key, queue_key,
                           intermediate_queue_key, job_key, failed_registry_key],
                          [run_id, job_id, retention_s], reply_text)

    # -- the alert outbox (alert_outbox.py) --

    def outbox_enqueue(self, *, outbox_key: str, entries_key: str, day_set_ttl_s: int,
                       alerts: Sequence[OutboxAlert]) -> ScriptCall[list[str]]:
        day_keys: list[str] = []
        args: list[Any] = [day_set_ttl_s]
        for alert in alerts:
            if alert.day_key not in day_keys:
                day_keys.append(alert.day_key)
            args += [3 + day_keys.index(alert.day_key), alert.alert_id, alert.payload_json]
        return ScriptCall(self._outbox_enqueue, [outbox_key, entries_key, *day_keys], args,
                          lambda reply: [reply_text(alert_id) for alert_id in reply])

    def outbox_claim(self, *, outbox_key: str, in_flight_key: str, entries_key: str, claim_ms: int,
                     owner: str) -> ScriptCall[Claimed | Idle]:
        return ScriptCall(self._outbox_claim, [outbox_key, in_flight_key, entries_key], [claim_ms, owner],
                          _parse_claim)

    def outbox_ack(self, *, outbox_key: str, in_flight_key: str, entries_key: str, alert_id: str,
                   owner: str) -> ScriptCall[AckOutcome]:
        return ScriptCall(self._outbox_ack, [outbox_key, in_flight_key, entries_key], [alert_id, owner],
                          reply_text)  # type: ignore[arg-type]

    def outbox_retry(self, *, outbox_key: str, in_flight_key: str, entries_key: str, alert_id: str, owner: str,
                     wait_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self._outbox_retry, [outbox_key, in_flight_key, entries_key],
                          [alert_id, owner, max(0, int(wait_ms))], bool)

    def outbox_drop(self, *, outbox_key: str, in_flight_key: str, entries_key: str, alert_id: str,
                    owner: str) -> ScriptCall[bool]:
        return ScriptCall(self._outbox_drop, [outbox_key, in_flight_key, entries_key], [alert_id, owner], bool)

    def mark_leadership(self, *, lease_key: str, leadership_key: str, owner: str, gap_ms: int) -> ScriptCall[LeadershipMark]:
        return ScriptCall(self._mark_parked, [lease_key, leadership_key], [owner, gap_ms], _parse_mark_leadership)


    # -- rolling deploys (deploys.py) --

    def trim_durations(self, *, durations_key: str, seen_key: str, oldest_kept_ordinal: int, today_ordinal: int,
                       batch: int) -> ScriptCall[int]:
        """How many series' learned durations were dropped (not fanned out since before
        ``oldest_kept_ordinal``)."""
        return ScriptCall(self._trim_durations, [durations_key, seen_key],
                          [oldest_kept_ordinal, today_ordinal, batch], int)

    def leave(self, *, left_key: str, left_info_key: str, intermediate_queue_key: str, runs_key: str, job_id: str,
              info_json: str, table: str, node: str, why: str, first_wait_ms: int, longest_wait_ms: int,
              retention_s: int) -> ScriptCall[int]:
        """The wait (ms) before the left job is back in the queue."""
        return ScriptCall(self._leave, [left_key, left_info_key, intermediate_queue_key, runs_key],
                          [job_id, info_json, table, node, why, first_wait_ms, longest_wait_ms, retention_s],
                          lambda reply: lua_ms(reply))

    def return_left(self, *, left_key: str, queue_key: str, runnable: Sequence[str], kept: Sequence[str],
                    keep_ms: int) -> ScriptCall[tuple[int | None, list[str]]]:
        """(when the next left job is due, ms, or None when none is left; the job ids moved)."""
        def parse(reply: Any) -> tuple[int | None, list[str]]:
            next_ms = lua_ms(reply[0])
            return (next_ms if next_ms >= 0 else None), _texts(reply[1:])

        return ScriptCall(self._return_left, [left_key, queue_key], [keep_ms, len(runnable), *runnable, *kept],
                          parse)

    def remove_left(self, *, left_key: str, left_info_key: str, runs_key: str, finished_key: str, deps_key: str,
                    job_id: str, run_id: str, now_iso: str, why: str, retention_s: int,
                    remove: bool) -> ScriptCall[Literal["removed", "forgotten"]]:
        return ScriptCall(self._remove_left, [left_key, left_info_key, runs_key, finished_key, deps_key],
                          [job_id, run_id, now_iso, why, retention_s, _flag(remove)], reply_text)  # type: ignore[arg-type]

    def remove_waiting(self, *, waiting_key: str, runs_key: str, finished_key: str, deps_key: str, run_id: str,
                       now_iso: str, why: str, retention_s: int) -> ScriptCall[Literal["removed", "kept"]]:
        return ScriptCall(self._remove_waiting, [waiting_key, runs_key, finished_key, deps_key],
                          [run_id, now_iso, why, retention_s], reply_text)  # type: ignore[arg-type]

    # -- computed params (params_book.py) --

    def params_store(self, *, params_key: str, retries_key: str, lease_key: str, field: str, entry_json: str,
                     retention_s: int, replace: bool, retry_member: str, next_try_ms: int | None,
                     fence_owner: str | None) -> ScriptCall[tuple[bool, str]]:
        """(stored, entry): whether ``entry_json`` was stored, and the entry stored now
        (``'lease'`` when ``fence_owner`` no longer holds the lease)."""
        return ScriptCall(self._params_store, [params_key, retries_key, lease_key],
                          [field, entry_json, retention_s, _flag(replace), retry_member,
                           "" if next_try_ms is None else next_try_ms, fence_owner or ""], _parse_params_store)

    # -- doctor --repair (consistency.py): each acts only while the record is as doctor read it --

    def doctor_requeue(self, *, runs_key: str, queue_key: str, intermediate_queue_key: str, job_key: str,
                       failed_registry_key: str, failures_key: str, run_id: str, job_id: str, error: str,
                       now_iso: str, retention_s: int, day: str) -> ScriptCall[RequeueOutcome]:
        """``error``: the record's, should RQ's job hash be gone."""
        return ScriptCall(self._doctor_requeue,
                          [runs_key, queue_key, intermediate_queue_key, job_key, failed_registry_key, failures_key],
                          [run_id, job_id, error, now_iso, retention_s, day], reply_text)  # type: ignore[arg-type]

    def doctor_settle(self, *, runs_key: str, waiting_key: str, finished_key: str, failures_key: str, run_id: str,
                      state: str, job_id: str, new_state: str, error: str, entry: str, now_iso: str,
                      retention_s: int, day: str) -> ScriptCall[bool]:
        """``state``/``job_id``: the record as read; ``entry``: its waiting entry to remove ('' = none)."""
        return ScriptCall(self._doctor_settle, [runs_key, waiting_key, finished_key, failures_key],
                          [run_id, state, job_id, new_state, error, entry, now_iso, retention_s, day], bool)

    def doctor_park(self, *, runs_key: str, waiting_key: str, waiting_days_key: str, deps_key: str, run_id: str,
                    job_id: str, entry: str, old_entry: str, day: str, retention_s: int,
                    task: str) -> ScriptCall[bool]:
        return ScriptCall(self._doctor_park, [runs_key, waiting_key, waiting_days_key, deps_key],
                          [run_id, job_id, entry, old_entry, day, retention_s, task], bool)

    def doctor_list_running(self, *, runs_key: str, running_key: str, run_id: str, day: str, owner: str,
                            job_id: str) -> ScriptCall[bool]:
        return ScriptCall(self._doctor_list_running, [runs_key, running_key], [run_id, day, owner, job_id], bool)

    def doctor_drop_entry(self, *, hash_key: str, runs_key: str, field: str, value: str, run_id: str, state: str,
                          job_id: str, zset_key: str | None = None) -> ScriptCall[bool]:
        """``zset_key``: left, for an entry of left's info hash (its member goes too)."""
        keys = [hash_key, runs_key] + ([zset_key] if zset_key else [])
        return ScriptCall(self._doctor_drop_entry, keys, [field, value, run_id, state, job_id], bool)


    # -- Redis out of memory (redis_memory.py) --

    def memory_full_mark(self, *, marker_key: str, node: str, ttl_ms: int, used_memory: int, maxmemory: int,
                         slots_json: str | None, delivered_since_ms: int | None = None,
                         ) -> ScriptCall[tuple[int, bool, str]]:
        """(since ms, whether redis_full was delivered, the marker JSON); with
        ``delivered_since_ms``, only notes that delivery on that episode's marker."""
        return ScriptCall(self._memory_full_mark, [marker_key],
                          [node, ttl_ms, used_memory, maxmemory, "" if slots_json is None else slots_json,
                           "" if delivered_since_ms is None else delivered_since_ms],
                          lambda reply: (lua_ms(reply[0]), reply_text(reply[1]) == "1", reply_text(reply[2])))

    # -- table differences (table_watch.py) --

    def table_skew_sync(self, *, skew_key: str, lease_key: str, owner: str, ttl_s: int,
                        differences: Sequence[str]) -> ScriptCall[tuple[int, dict[str, int]] | None]:
        """None when ``owner`` does not hold the lease, else (Redis now in ms, difference
        id -> first seen ms) for ``differences``."""
        return ScriptCall(self._table_skew_sync, [skew_key, lease_key], [owner, ttl_s, *differences],
                          _parse_table_skew)


    # -- the generation mark (generation.py, data_lost_alert.py) --

    def generation_ensure(self, *, generation_key: str, token: str, remembered: str | None, node: str,
                          last_seen_ms: int | None) -> ScriptCall[str]:
        """The mark in force afterwards (its JSON)."""
        return ScriptCall(self._generation_ensure, [generation_key],
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
            flat = _texts(reply[0])
            return dict(zip(flat[::2], flat[1::2])), _texts(reply[1])

        return ScriptCall(self._restore_memory, [cursor_key, paused_key], args, parse)

    def data_lost_alert_claim(self, *, alert_key: str, generation: str, owner: str,
                              claim_ms: int) -> ScriptCall[str]:
        return ScriptCall(self._data_lost_alert_claim, [alert_key], [generation, owner, claim_ms], reply_text)

    # -- cancel (cancelling.py) --

    def cancel(self, *, runs_key: str, claim_key: str, running_key: str, waiting_key: str, run_id: str, why: str,
               now_iso: str, retention_s: int) -> ScriptCall["CancelReply"]:
        return ScriptCall(self._cancel, [runs_key, claim_key, running_key, waiting_key],
                          [run_id, why, now_iso, retention_s], _parse_cancel)

    def release_cancelled(self, *, claim_key: str, series_key: str, owner: str) -> ScriptCall[str | None]:
        """Why the run was cancelled, once this copy's renamed claim is released; None if
        the claim is not one a cancel took from ``owner``."""
        return ScriptCall(self._release_cancelled, [claim_key, series_key], [owner],
                          lambda reply: reply_text(reply) or None)


@dataclass(frozen=True)
class CancelReply:
    """CANCEL's answer: ``outcome`` 'cancelled' (``state`` before it; ``executing``: a copy
    runs it now and stops), 'ended' (``state``: nothing to cancel) or 'none' (no record)."""

    outcome: Literal["cancelled", "ended", "none"]
    state: str | None = None
    executing: bool = False


def _parse_cancel(reply: Any) -> CancelReply:
    items = _texts(reply)
    if items[0] == "cancelled":
        return CancelReply("cancelled", items[1], items[2] == "1")
    if items[0] == "ended":
        return CancelReply("ended", items[1])
    return CancelReply("none")


# One Scripts per connection object, dropped with it. A cache, not shared state: building
# one twice is harmless, so no lock.
_registered: "weakref.WeakKeyDictionary[Redis, Scripts]" = weakref.WeakKeyDictionary()


def scripts_for(connection: Redis) -> Scripts:
    """The scripts registered on ``connection`` (once per connection object)."""
    scripts = _registered.get(connection)
    if scripts is None:
        scripts = _registered[connection] = Scripts(connection)
    return scripts


# -- doctor --repair (consistency.py) ---------------------------------------------------------
# doctor reads a day, decides, and only then repairs: each script first checks that the
# run's record is still as read (its state and job id) and that the entry it touches still
# holds the value read, else does nothing and says so. A repair never overwrites a record
# that changed meanwhile.

DOCTOR_LUA = f"""
-- The leader turns held runs waiting <-> blocked as their upstream runs change: one
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

DOCTOR_REQUEUE = _lua(f"""
-- A queued run whose job is in no queue, registry, held list or left: its job id back at
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

DOCTOR_SETTLE = _lua(f"""
-- A run's record set to what backs it: 'failed' with the reason (nothing can run it),
-- 'queued' (a held run whose job is pushed already), or 'finished' (a queued run in the
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

DOCTOR_PARK = _lua(f"""
-- A held run (waiting or blocked) parked again in the day's waiting hash, as fan-out
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

DOCTOR_LIST_RUNNING = _lua(f"""
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

DOCTOR_DROP_ENTRY = _lua("""
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

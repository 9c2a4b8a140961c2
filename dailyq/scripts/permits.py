"""Concurrency permits of tasks with limits, and the runs set aside by a limit or a pause
(limits.py, pausing.py). ``PERMITS_LUA`` holds the helpers they share with RENEW_CLAIM."""

from __future__ import annotations

from typing import Any, Literal, Protocol, Sequence

from ..redis_values import reply_text
from .shared import (
    NOW_LUA,
    ScriptCall,
    ScriptSet,
    allow_oom,
    reply_texts,
    with_helpers,
)

PERMITS_LUA = """
-- Permits of a task with limits (limits.py): a sorted set owner -> expiry (ms, Redis clock)
-- and a hash owner -> node. A member whose expiry passed is a dead or cut-off holder's:
-- every check drops those first, so its permit frees when its claim would lapse.
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
-- Extends a live permit only: a released or lapsed one is not taken back by a late renewal.
local function extend_permit(permits_key, owner, ttl_ms)
  local now = redis_now_ms()
  local expiry = tonumber(redis.call('ZSCORE', permits_key, owner))
  if expiry and expiry > now then
    redis.call('ZADD', permits_key, 'XX', now + ttl_ms, owner)
    return 1
  end
  return 0
end
-- Set-aside runs: a list in the order held (promote pops its head), which is what backs a held
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
-- Moves up to n set-aside job ids to the front of the queue, the oldest held first in line,
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
-- A pool (limits.py) has no permits of its own: a run of a pool's task takes a permit of its
-- task, and the pool counts the live permits of all its tasks against its size. So the one
-- permit is both permits, taken and freed at once, and it lapses with the claim as any permit.
-- ``members``: {permits_key, nodes_key} of each task of the pool.
local function pool_room(size, members, now)
  local used = 0
  for _, member in ipairs(members) do
    purge_permits(member[1], member[2], now)
    used = used + redis.call('ZCARD', member[1])
  end
  return size - used
end
-- Moves set-aside runs of a pool's tasks to the queue's front while the pool and each task have
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
-- Pool members from KEYS (from ``k``, 4 keys each: permits, permit nodes, set-aside list, held
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


ADMIT = with_helpers("""
-- A worker asks, before it starts a run of a task with limits or a paused task, whether it
-- may: if the task is paused or has no room, the job is set aside -- off RQ's intermediate
-- queue (so nothing takes it for stranded) and onto the task's set-aside list, its RQ job left
-- queued -- else the run takes a permit (when the task has limits or a pool). A run of a
-- pool's task needs room in its task and in its pool; its one permit counts for both.
-- KEYS[1] = paused hash, KEYS[2] = the task's permits, KEYS[3] = permit nodes, KEYS[4] = set-aside list,
-- KEYS[5] = RQ's intermediate queue, KEYS[6] = the set-aside list's index (a set, see hold), then
-- per task of its pool (its own included): its permits, permit nodes
-- ARGV[1] = task, ARGV[2] = owner (the attempt's claim owner token), ARGV[3] = node,
-- ARGV[4] = job id, ARGV[5] = permit ttl (ms, the claim's), ARGV[6] = max_running (0: none),
-- ARGV[7] = max_per_node (0: none), ARGV[8] = the pool's size (0: in no pool),
-- ARGV[9] = how long the set-aside list lives after its last hold (s)
-- Returns 'admitted', 'paused' or 'set_aside'.
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
  why = 'set_aside'
elseif pool_size > 0 and pool_room(pool_size, pool, now) < 1 then
  why = 'set_aside'
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


RELEASE_PERMIT = allow_oom(with_helpers("""
-- An admitted execution ended (finished, failed, not executed after all, or its work-horse
-- died): its permit frees, and set-aside runs move to the queue's front while there is room --
-- in the same script as every hold, so no set-aside run misses the wake-up. For a pool's task,
-- set-aside runs of every task of the pool, starting with the task after this one (in turn).
-- KEYS[1] = paused hash, KEYS[2] = the task's permits, KEYS[3] = permit nodes, KEYS[4] = set-aside list,
-- KEYS[5] = queue, KEYS[6] = the set-aside list's index, then per task of its pool (its own
-- included): its permits, permit nodes, set-aside list, set-aside list's index
-- ARGV[1] = task, ARGV[2] = owner, ARGV[3] = node (whose room the freed permit is),
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


SWEEP_PERMITS = with_helpers("""
-- The leader, every tick: drops lapsed permits (holders that died or were cut off) and moves
-- set-aside runs of tasks with limits to the queue's front while there is room. Per-node room
-- is counted on every node that beat within the last ``live_s`` seconds. The tasks of a
-- pool are moved together (promote_pool), while the pool has room.
-- KEYS[1] = paused hash, KEYS[2] = queue, KEYS[3] = nodes registry (node -> last beat, s),
-- then per task: its permits, permit nodes, set-aside list, set-aside list's index
-- ARGV[1] = live_s, then per task: name, max_running (0: none), max_per_node (0: none),
-- its pool ('' for none), the pool's size (0: none)
-- Returns the job ids moved to the queue.
local paused_key, queue_key, registry_key = KEYS[1], KEYS[2], KEYS[3]
local now = redis_now_ms()
local nodes = redis.call('ZRANGEBYSCORE', registry_key, now / 1000 - tonumber(ARGV[1]), '+inf')
-- no node known: count one, so set-aside runs are not stuck behind an empty registry
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


TOUCH_PERMIT = allow_oom(with_helpers("""
-- Keeps the permit of an admitted run alive while it waits for another copy of the run
-- (BEGIN said busy): it has no claim yet for RENEW_CLAIM to extend the permit with.
-- KEYS[1] = the task's permits
-- ARGV[1] = owner, ARGV[2] = ttl (ms)
-- Returns 1, or 0 when the permit is gone.
return extend_permit(KEYS[1], ARGV[1], ARGV[2])
""", NOW_LUA, PERMITS_LUA))


RESUME = with_helpers("""
-- Resumes a task: no longer paused, and every run set aside (paused or over a limit) goes
-- to the queue's front, in the order held; ADMIT holds again any still over a limit.
-- KEYS[1] = paused hash, KEYS[2] = set-aside list, KEYS[3] = queue, KEYS[4] = the set-aside list's index
-- ARGV[1] = task
-- Returns {1 if it was paused else 0, number of runs moved}.
local paused_key, set_aside_key, queue_key, index_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local was_paused = redis.call('HDEL', paused_key, ARGV[1])
local moved = promote(set_aside_key, index_key, queue_key, redis.call('LLEN', set_aside_key))
return {was_paused, #moved}
""", NOW_LUA, PERMITS_LUA)


AdmitOutcome = Literal["admitted", "paused", "set_aside"]




class TaskLimits(Protocol):
    """What the permit scripts read of one task with limits (limits.LimitedTask builds it
    from the table): its limits, its pool, and its keys."""

    @property
    def name(self) -> str: ...
    @property
    def max_running(self) -> int | None: ...
    @property
    def max_per_node(self) -> int | None: ...
    @property
    def permits_key(self) -> str: ...
    @property
    def permit_nodes_key(self) -> str: ...
    @property
    def set_aside_key(self) -> str: ...
    @property
    def set_aside_index_key(self) -> str: ...
    @property
    def pool(self) -> str | None: ...
    @property
    def pool_size(self) -> int: ...


class PermitScripts(ScriptSet):
    """The scripts of permits (limits.py) and runs set aside (pausing.py)."""

    def admit(self, *, paused_key: str, permits_key: str, permit_nodes_key: str, set_aside_key: str,
              set_aside_index_key: str, intermediate_queue_key: str, task: str, owner: str, node: str, job_id: str,
              ttl_ms: int,
              max_running: int | None, max_per_node: int | None, set_aside_ttl_s: int, pool_size: int = 0,
              pool: Sequence[TaskLimits] = ()) -> ScriptCall[AdmitOutcome]:
        """``pool``: every task of the run's pool (its own included), of size ``pool_size``;
        ``set_aside_ttl_s``: how long the set-aside list (and its index) lives after its last hold."""
        keys = [paused_key, permits_key, permit_nodes_key, set_aside_key, intermediate_queue_key, set_aside_index_key]
        for member in pool:
            keys += [member.permits_key, member.permit_nodes_key]
        return ScriptCall(self.script(ADMIT), keys,
                          [task, owner, node, job_id, ttl_ms, max_running or 0, max_per_node or 0, pool_size,
                           set_aside_ttl_s], reply_text)  # type: ignore[arg-type]

    def release_permit(self, *, paused_key: str, permits_key: str, permit_nodes_key: str, set_aside_key: str,
                       set_aside_index_key: str, queue_key: str, task: str, owner: str, node: str,
                       max_running: int | None, max_per_node: int | None, pool_size: int = 0,
                     pool: Sequence[TaskLimits] = ()) -> ScriptCall[list[str]]:
        """The job ids it moved from the set-aside list (for a pool's task: the pool's tasks'
        set-aside lists) to the queue. ``pool``: every task of the pool, ``task`` among them."""
        keys = [paused_key, permits_key, permit_nodes_key, set_aside_key, queue_key, set_aside_index_key]
        place = next((i + 1 for i, member in enumerate(pool) if member.name == task), 0)
        args: list[Any] = [task, owner, node, max_running or 0, max_per_node or 0, pool_size if place else 0, place]
        for member in pool if place else ():
            keys += [member.permits_key, member.permit_nodes_key, member.set_aside_key, member.set_aside_index_key]
            args += [member.name, member.max_running or 0, member.max_per_node or 0]
        return ScriptCall(self.script(RELEASE_PERMIT), keys, args, reply_texts)

    def sweep_permits(self, *, paused_key: str, queue_key: str, nodes_key: str, live_s: int,
                    tasks: Sequence[TaskLimits]) -> ScriptCall[list[str]]:
        """The job ids it moved from set-aside lists to the queue."""
        keys = [paused_key, queue_key, nodes_key]
        args: list[Any] = [live_s]
        for task in tasks:
            keys += [task.permits_key, task.permit_nodes_key, task.set_aside_key, task.set_aside_index_key]
            args += [task.name, task.max_running or 0, task.max_per_node or 0, task.pool or "",
                     task.pool_size if task.pool else 0]
        return ScriptCall(self.script(SWEEP_PERMITS), keys, args, reply_texts)

    def touch_permit(self, *, permits_key: str, owner: str, ttl_ms: int) -> ScriptCall[bool]:
        return ScriptCall(self.script(TOUCH_PERMIT), [permits_key], [owner, ttl_ms], bool)

    def resume(self, *, paused_key: str, set_aside_key: str, set_aside_index_key: str, queue_key: str,
               task: str) -> ScriptCall[tuple[bool, int]]:
        """(whether the task was paused, how many set-aside runs went back to the queue)."""
        return ScriptCall(self.script(RESUME), [paused_key, set_aside_key, queue_key, set_aside_index_key], [task],
                          lambda reply: (bool(int(reply[0])), int(reply[1])))

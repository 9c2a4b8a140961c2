"""What every script shares: the Lua helpers they are built from, the call of one script
(``ScriptCall``), and the base of the concern classes that make up ``Scripts``.

Redis runs no includes, so the helpers a script uses are prepended to it (``with_helpers``):

* ``holds`` / ``del_if_owner`` / ``pexpire_if_owner`` (OWNER_LUA): the one compare-and-delete
  and the one extend-if-owner of an owner-token lease (the leader lease, a run's claim and
  its series claim);
* ``load_record`` / ``save_record`` / ``store_record`` (RECORD_LUA): the one way a run record
  changes -- load it (or start from its base), set fields, save it; a brand-new record is
  stored as the JSON its writer sent;
* ``redis_now_ms`` (NOW_LUA): the Redis server's clock, the one clock every node shares;
* ``note_failed`` (NOTE_FAILED_LUA): a run recorded failed tells the alerts in the same step;
* ``count_finished`` (DEPS_LUA): the day's dependency counts (dependency_counts.py), kept by
  every script that adds a run id to a day's finished set.

The helpers of one concern live with it: the permits' in permits.py (PERMITS_LUA), the
cancelled claim's in lifecycle.py, doctor's in doctor.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script

from ..keys import DAY_CHANGES_SUFFIX, DAY_COUNTS_SUFFIX
from ..redis_values import reply_text

T = TypeVar("T")


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


# How long a day's change feed outlives the last run it took in (day_feed.py): its readers
# look every few seconds, and a reader that finds it gone or short reads the day whole.
# A day, not the retention: the feed was about 130 bytes per run of what outlived a day.
CHANGES_KEPT_S = 86400

RECORD_LUA = f"""
-- Run records: JSON, one hash per day (``status`` reads a whole day with one HGETALL).
-- Every change is load_record, set fields, save_record; a new record is stored whole.
-- Each write also keeps, in the same step, the day's counts and change feed (day_feed.py):
-- runs_key .. '{DAY_COUNTS_SUFFIX}', a hash 's|state|task' -> runs in that state, 'r|slot|task' ->
-- records of that slot, '_seq' -> the day's last change, and '_counted' = 1 while the
-- counts cover every record (a new day's from its first; a day an older version began is
-- counted once by day_feed.py); runs_key .. '{DAY_CHANGES_SUFFIX}', a sorted set run_id -> the
-- '_seq' of its last change. The counts expire a retention after the day's last new run;
-- the feed CHANGES_KEPT_S after the last run it took in, as it only serves readers that
-- look every few seconds. Until then it names every record of the day (ZCARD = HLEN);
-- one taken in again after that names only those written since, and a reader that
-- finds it short reads the day whole (day_feed.DayView).
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
  local taken_in = redis.call('ZADD', changes_key, seq, run_id) == 1
  if seq == 1 or not before then
    -- Set when the run (or the day's counts) is new, not at every change: two commands
    -- less per BEGIN and FINISH. Counts that expire before their records (a rerun days
    -- later kept those alive) are counted again once (day_feed.py), then go on.
    redis.call('EXPIRE', counts_key, retention_s)
  end
  if taken_in then
    -- A run new to the feed: a new run, or any run once the feed expired and starts again.
    redis.call('EXPIRE', changes_key, math.min(tonumber(retention_s), {CHANGES_KEPT_S}))
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


def with_helpers(body: str, *helpers: str) -> str:
    """A script: the Lua helpers it calls, then its body (Redis runs no includes)."""
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


def reply_texts(reply: Any) -> list[str]:
    """A script's list reply as text."""
    return [reply_text(item) for item in reply or []]


def lua_ms(value: Any) -> int:
    """Milliseconds as Lua wrote them (``tostring`` of a number: digits, maybe a float form)."""
    return int(float(reply_text(value)))


def lua_flag(value: bool) -> str:
    """A boolean argument as the scripts read it ('1' / '0')."""
    return "1" if value else "0"


class _Flagged:
    """A script with Redis 7 flags on its first line (``allow_oom``), and the same script
    without that line for an older Redis, which cannot compile it. Which one is sent is
    decided by the server's version, read once per connection (``Scripts.flags_supported``).
    Looks like a redis-py ``Script`` to ScriptCall: called, or its ``script`` queued."""

    def __init__(self, owner: "ScriptSet", flagged: Script, plain: Script) -> None:
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
    # The SHA under which this process loaded the script into Redis (ScriptSet.load), if it did.
    loaded_sha: str | None = None

    def run(self) -> T:
        return self.parse(self.script(keys=self.keys, args=self.args))

    def queue_in(self, pipeline: Pipeline, by_sha: bool = False) -> None:
        """Add the call to ``pipeline``: as EVAL with the body, or with ``by_sha`` as EVALSHA
        when the script was loaded. Not the Script object: on a pipeline, redis-py first sends
        SCRIPT EXISTS (a round trip of its own, the very cost queueing saves). EVALSHA only
        where the pipeline's owner survives NOSCRIPT (the script cache emptied by a restart or
        a failover): in a MULTI/EXEC that error comes with EXEC, after every other command
        committed, so only a caller that takes it as "not sent" (rq_seam.queue_keeping_reply)
        may ask for it. Sending BEGIN's and FINISH's SHA instead of their 5 KB bodies took
        15-20 us of Redis time per run (hashing the bodies) and 10 KB per run off the wire."""
        if by_sha and self.loaded_sha is not None:
            pipeline.evalsha(self.loaded_sha, len(self.keys), *self.keys, *self.args)
        else:
            pipeline.eval(self.script.script, len(self.keys), *self.keys, *self.args)  # type: ignore[arg-type]


@functools.cache
def compact(lua: str) -> str:
    """The script as sent: without its comment lines and indentation. Scripts queued in
    pipelines travel as EVAL bodies (ScriptCall.queue_in; BEGIN and FINISH by SHA once
    loaded), and their documentation would otherwise more than double what each call
    sends. Cached per process: a forked
    work-horse inherits what its worker compacted, and a horse compacting BEGIN and
    FINISH for itself was a tenth of a no-op run's CPU in it (BENCHMARKS.md)."""
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


class ScriptSet:
    """The base of the concern classes that make up ``Scripts``: one connection, and each
    script registered on it at its first call (``script``). Registering sends nothing: redis-py
    only hashes the body, and loads it on the first NOSCRIPT."""

    def __init__(self, connection: Redis) -> None:
        self.connection = connection
        # Whether the server reads script flags (Redis >= 7): asked on first need, not here
        # (Redis may be away when a process builds its Scripts).
        self._flags: bool | None = None
        # Lua body -> its registered script. Two threads registering the same body at once
        # build two equal objects; either is kept, so no lock.
        self._registered: dict[str, Script | _Flagged] = {}
        # Lua body -> the SHA it was loaded under (``load``): what ScriptCall.queue_in may send.
        self._loaded: dict[str, str] = {}

    def script(self, lua: str) -> Script | _Flagged:
        """``lua`` (a module constant of a concern) registered on this connection."""
        registered = self._registered.get(lua)
        if registered is None:
            if lua.startswith(ALLOW_OOM):
                registered = _Flagged(self, self.connection.register_script(compact(lua)),
                                      self.connection.register_script(compact(lua[len(ALLOW_OOM):])))
            else:
                registered = self.connection.register_script(compact(lua))
            self._registered[lua] = registered
        return registered

    def load(self, lua: str) -> None:
        """Load ``lua`` into Redis now (SCRIPT LOAD, one round trip), so that its calls may be
        queued by SHA (ScriptCall.queue_in). Raises RedisError if Redis does not answer: the
        calls are then queued with their body, as before."""
        self._loaded[lua] = reply_text(self.connection.script_load(self.script(lua).script))

    def loaded_sha(self, lua: str) -> str | None:
        """The SHA ``lua`` was loaded under by this process (``load``), else None."""
        return self._loaded.get(lua)

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

"""What each of the run's guarantees costs: BEGIN and FINISH cut down to rungs of a ladder.

A guarded run's extra cost against plain RQ is almost all in BEGIN and FINISH (the Redis
scripts that ride in RQ's own transactions, and their arguments packed by redis-py;
BENCHMARKS.md). To say which guarantee costs what, ``bench/guard_cost.py`` drains the same
day with the worker's scripts replaced by one rung at a time, each keeping what the rung
below kept and adding one guarantee:

| rung | BEGIN / FINISH do | what it guarantees |
| --- | --- | --- |
| ``claim`` | take the run's claim (owner token, TTL) / release it if ours | one copy at a time executes a run |
| ``dedup`` | + refuse a run in the day's finished set / add it there | a finished run is not run again |
| ``fence`` | + the series claim and the fencing token | overlap between slots; stale copies fenced off |
| ``record`` | the real scripts, less the day's counts and change feed | each state backed by a record |
| ``full`` | the real BEGIN and FINISH | + the day's counts and change feed |

Each rung keeps the scripts' KEYS, ARGV and replies, so the worker's Python side (the
guard, the claim keeper, the run context) is the same in every rung: what separates
``claim`` from dailyq's worker without a guard (``bench/worker_cpu.py --side adhoc``)
is that Python side plus the cheapest claim. The records back ``status``, rerun, recovery,
the ETA and dependencies; the counts and the change feed let status, the dashboard and
the alerts read what changed instead of whole days. Nothing here is used outside benchmarks.
"""

from __future__ import annotations

from dailyq.scripts import lifecycle
from dailyq.scripts.shared import OWNER_LUA, with_helpers

RUNGS = ("claim", "dedup", "fence", "record", "full")

# KEYS and ARGV as lifecycle.BEGIN and lifecycle.FINISH document them; the rungs read only
# what they need. A rung's BEGIN answers {'claimed', attempt, fence} as the real one does.
_BEGIN_CLAIM = """
local claim_key, owner, ttl_ms = KEYS[2], ARGV[2], ARGV[3]
if holds(claim_key, owner) then
  return {'claimed', 1, 0}
end
--DEDUP if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return {'finished'} end
if redis.call('EXISTS', claim_key) == 1 then
  return {'busy'}
end
redis.call('SET', claim_key, owner, 'PX', ttl_ms)
--FENCE if redis.call('EXISTS', KEYS[5]) == 1 then return {'busy'} end
--FENCE redis.call('SET', KEYS[5], owner, 'PX', ttl_ms)
--FENCE local t = redis.call('TIME')
--FENCE local last = tonumber(redis.call('GET', KEYS[6])) or 0
--FENCE local fence = math.max(last + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
--FENCE redis.call('SET', KEYS[6], string.format('%.0f', fence))
--FENCE do return {'claimed', 1, fence} end
return {'claimed', 1, 0}
"""

_FINISH_CLAIM = """
local claim_key, owner = KEYS[2], ARGV[2]
if del_if_owner(claim_key, owner) == 0 then
  return 0
end
--FENCE del_if_owner(KEYS[6], owner)
--DEDUP redis.call('SADD', KEYS[1], ARGV[1])
--DEDUP redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# The first line of the record's change bookkeeping (scripts.shared.RECORD_LUA): the
# ``record`` rung returns from it at once, so records are written as always and the
# day's counts and change feed are not.
_NOTE_CHANGE = "local function note_change(runs_key, run_id, before, record, retention_s)\n"


def _rung_script(body: str, rung: str) -> str:
    kept = {"claim": (), "dedup": ("--DEDUP ",), "fence": ("--DEDUP ", "--FENCE ")}[rung]
    for marker in kept:
        body = body.replace(marker, "")
    return with_helpers(body, OWNER_LUA)


def scripts(rung: str) -> tuple[str, str]:
    """(BEGIN, FINISH) of ``rung``."""
    if rung == "full":
        return lifecycle.BEGIN, lifecycle.FINISH
    if rung == "record":
        cut = _NOTE_CHANGE + "  do return end\n"
        begin, finish = (lua.replace(_NOTE_CHANGE, cut) for lua in (lifecycle.BEGIN, lifecycle.FINISH))
        assert cut in begin and cut in finish, "RECORD_LUA's note_change moved: update bench/guard_ladder.py"
        return begin, finish
    return _rung_script(_BEGIN_CLAIM, rung), _rung_script(_FINISH_CLAIM, rung)


def install(rung: str) -> None:
    """Replace the worker's BEGIN and FINISH with ``rung``'s, in this process (before the
    worker starts: RunScripts reads the module's constants when it registers them)."""
    lifecycle.BEGIN, lifecycle.FINISH = scripts(rung)


# Runs a worker entry point with the rung installed: python -c RUNNER RUNG script args...
RUNNER = "\n".join([
    "import runpy, sys",
    "from bench.guard_ladder import install",
    "install(sys.argv[1]); sys.argv = sys.argv[2:]",
    "runpy.run_path(sys.argv[0], run_name='__main__')"])

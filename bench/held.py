"""The cost of holding a run (limits, pause) as its task's set-aside list grows: server-side
time of one ADMIT that holds a run of a paused task, with L runs held already, at
growing L; beside it, in the same run on the same redis-server, the hold an older
version did (LREM of the job id from the whole list, then RPUSH), as the baseline.

    python bench/held.py                     # L = 1,000, 10,000 and 100,000, 500 holds each
    python bench/held.py --holds 200 --sizes 1000 20000

Redis's own INFO commandstats (usec_per_call of EVALSHA) is the figure, not the client's
wall time: on a shared machine the round trip varies far more than the script does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis import Redis  # noqa: E402

from dailyq.keys import Keys  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.scripts import scripts_for  # noqa: E402

# The older version's hold, as its ADMIT did it: a scan of the list for the job id.
# KEYS[1] = set-aside list; ARGV[1] = job id
OLDER_HOLD = """
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('RPUSH', KEYS[1], ARGV[1])
"""


def fill(connection: Redis, keys: Keys, task: str, size: int, index: bool) -> None:
    ids = [f"held-{i}" for i in range(size)]
    for start in range(0, size, 10_000):
        connection.rpush(keys.set_aside(task), *ids[start:start + 10_000])
        if index:
            connection.sadd(keys.set_aside_index(task), *ids[start:start + 10_000])


def hold_us(connection: Redis, keys: Keys, size: int, holds: int) -> float:
    """Mean server-side microseconds of one ADMIT hold with ``size`` runs held already."""
    task = "t"
    connection.hset(keys.paused, task, "{}")
    fill(connection, keys, task, size, index=True)
    scripts = scripts_for(connection)
    connection.config_resetstat()
    for i in range(holds):
        scripts.admit(paused_key=keys.paused, permits_key=keys.limit_permits(task),
                      permit_nodes_key=keys.limit_permit_nodes(task), set_aside_key=keys.set_aside(task),
                      set_aside_index_key=keys.set_aside_index(task),
                      intermediate_queue_key=f"{keys.prefix}:q:intermediate", task=task, owner=f"o{i}", node="n1",
                      job_id=f"j{i}", ttl_ms=60_000, max_running=None, max_per_node=None, set_aside_ttl_s=86400).run()
    return float(connection.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def older_hold_us(connection: Redis, keys: Keys, size: int, holds: int) -> float:
    task = "t"
    fill(connection, keys, task, size, index=False)
    script = connection.register_script(OLDER_HOLD)
    connection.config_resetstat()
    for i in range(holds):
        script(keys=[keys.set_aside(task)], args=[f"j{i}"])
    return float(connection.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holds", type=int, default=500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    now: dict[int, float] = {}
    older: dict[int, float] = {}
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        for size in args.sizes:
            now[size] = hold_us(connection, Keys(f"b-now-{size}"), size, args.holds)
            older[size] = older_hold_us(connection, Keys(f"b-older-{size}"), size, args.holds)
            print(f"{size:>7} held: a hold {now[size]:8.1f} us (the older LREM scan {older[size]:9.1f} us)")
    small, large = min(args.sizes), max(args.sizes)
    print(f"{large} held over {small} held, per hold: {now[large] / now[small]:.2f}x "
          f"(the older scan {older[large] / older[small]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cost of pools in Redis: server-side time of one ADMIT or RELEASE_PERMIT for a run of
a pool's task (the pool counts the live slots of each of its tasks), against a task with
``max_running`` only, measured in the same run on the same redis-server.

    python bench/pools.py                 # pools of 2 and 10 tasks, 3 rounds of 3,000 pairs
    python bench/pools.py --rounds 5 --pairs 5000

Redis's own INFO commandstats (usec_per_call of EVALSHA) is the figure, not the client's
wall time: on a shared machine the round trip varies far more than the script does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis import Redis  # noqa: E402

from dailyq.keys import Keys  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.scripts import LimitedTask, scripts_for  # noqa: E402


def member(keys: Keys, name: str, pool_size: int) -> LimitedTask:
    return LimitedTask(name, 1_000_000, None, keys.limit_permits(name), keys.limit_permit_nodes(name), keys.set_aside(name),
                       keys.set_aside_index(name), "p" if pool_size else None, pool_size)


def script_us(connection: Redis, keys: Keys, pool_tasks: int, pairs: int) -> float:
    """Mean server-side microseconds per script over ``pairs`` admit+release pairs of one
    task, in a pool of ``pool_tasks`` tasks (0: in none, max_running only)."""
    own = member(keys, "t0", 1_000_000 if pool_tasks else 0)
    pool = [own] + [member(keys, f"t{i}", own.pool_size) for i in range(1, pool_tasks)] if pool_tasks else []
    scripts = scripts_for(connection)
    connection.config_resetstat()
    for i in range(pairs):
        common = dict(paused_key=keys.paused, permits_key=own.permits_key, permit_nodes_key=own.permit_nodes_key,
                      set_aside_key=own.set_aside_key, set_aside_index_key=own.set_aside_index_key, task=own.name, owner=f"o{i}",
                      node="n1", max_running=own.max_running,
                      max_per_node=None, pool_size=own.pool_size, pool=pool)
        scripts.admit(intermediate_queue_key=f"{keys.prefix}:q:intermediate", job_id=f"j{i}", ttl_ms=60_000,
                      set_aside_ttl_s=86400, **common).run()  # type: ignore[arg-type]
        scripts.release_permit(queue_key=f"{keys.prefix}:q", **common).run()  # type: ignore[arg-type]
    return float(connection.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3000)
    args = parser.parse_args()
    sizes = (0, 2, 10)
    ratios: dict[int, list[float]] = {size: [] for size in sizes}
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        for round_number in range(args.rounds):
            figures = {size: script_us(connection, Keys(f"b{round_number}-{size}"), size, args.pairs) for size in sizes}
            for size in sizes:
                ratios[size].append(figures[size] / figures[0])
            print(f"round {round_number + 1}: " + ", ".join(
                f"{'max_running only' if size == 0 else f'pool of {size}'} {figures[size]:.1f} us"
                for size in sizes))
    for size in sizes[1:]:
        print(f"pool of {size} tasks over max_running only: {statistics.median(ratios[size]):.2f}x "
              f"(rounds {', '.join(f'{r:.2f}' for r in ratios[size])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

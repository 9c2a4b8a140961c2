"""What a dashboard refresh and ``status --json`` cost on a big day (issue 20 items 2-3).

A private redis-server; a task of N params whose N runs of DAY_ONE are fanned out with
``dailyq.commands.trigger`` (recorded queued). Per size, N and 2N:

* ``full``: one ``day_status`` that reads the day whole (what each dashboard tab did
  every 5 s, and what ``status`` does once);
* ``idle``: a refresh of a DayView (day_feed.py) after nothing changed;
* ``changed``: a refresh after 100 runs changed state;
* ``heartbeat``: the outside heartbeat's count (metrics.count_today);
* ``status --json``: wall seconds of ``scheduler.py status --json --date D > file``.

Prints the Redis commands, bytes Redis sent back and seconds of each: the idle refresh
and the heartbeat should cost the same at N and 2N (ratio near 1), the full read twice.

    .venv/bin/python -m bench.day_feed [--n 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis import Redis  # noqa: E402

from bench.alert_detect import redis_figures  # noqa: E402
from bench.run import DAY_ONE, PY, ROOT, env_for  # noqa: E402
from dailyq.commands import trigger  # noqa: E402
from dailyq.day_feed import DayView  # noqa: E402
from dailyq.keys import Keys  # noqa: E402
from dailyq.ops.metrics import count_today  # noqa: E402
from dailyq.ops.status import day_status  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.rq_seam import make_queue  # noqa: E402
from dailyq.scripts import scripts_for  # noqa: E402
from dailyq.table import Task, TaskTable  # noqa: E402

PREFIX = "feed"
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)


def measured(connection: Redis, action: Callable[[], object], repeats: int) -> dict[str, float]:
    """Per call of ``action``: commands Redis ran (without the measuring INFOs), bytes it
    sent, wall seconds; the median-free mean of ``repeats`` calls."""
    calls0, sent0, _ = redis_figures(connection)
    started = time.perf_counter()
    for _ in range(repeats):
        action()
    seconds = (time.perf_counter() - started) / repeats
    calls1, sent1, _ = redis_figures(connection)
    # redis_figures itself sends 3 INFOs, which count in the next reading.
    return {"commands": (calls1 - calls0 - 3) / repeats, "bytes": (sent1 - sent0) / repeats, "seconds": seconds}


def one_size(n: int, repeats: int) -> dict[str, float]:
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        keys = Keys(PREFIX)
        table = TaskTable([Task(name="noop", func="bench.noop.noop", params=list(range(n)), at="03:00", retries=0)])
        trigger(connection, keys, make_queue(connection, keys), table, DAY_ONE, None, 7 * 86400)
        run_ids = [k.decode() for k in connection.hkeys(keys.day_runs(DAY_ONE))]
        figures: dict[str, float] = {}
        for name, numbers in [
            ("full", measured(connection, lambda: day_status(connection, keys, table, DAY_ONE, NOW), repeats)),
        ]:
            figures.update({f"{name} {k}": v for k, v in numbers.items()})
        view = DayView(connection, keys, DAY_ONE)
        view.refresh()
        figures.update({f"idle {k}": v for k, v in measured(connection, view.refresh, repeats).items()})
        scripts = scripts_for(connection)
        changes = iter(range(10**9))

        def change_and_refresh() -> None:
            at = next(changes) * 100 % max(1, n - 100)
            scripts.set_run_state(runs_key=keys.day_runs(DAY_ONE), retention_s=7 * 86400, state="waiting",
                                  run_ids=run_ids[at:at + 100]).run()
            view.refresh()

        figures.update({f"changed {k}": v for k, v in measured(connection, change_and_refresh, repeats).items()})
        figures.update({f"heartbeat {k}": v for k, v in measured(
            connection, lambda: count_today(connection, keys, table, NOW), repeats).items()})
        env = env_for(server, PREFIX, BENCH_NOOP=str(n), NODE_NAME="bench")
        with tempfile.TemporaryFile() as out:
            started = time.perf_counter()
            subprocess.run([PY, "scheduler.py", "status", "--json", "--date", DAY_ONE.isoformat()], cwd=ROOT, env=env,
                           stdout=out, stderr=subprocess.DEVNULL, check=True, timeout=600)
            figures["status --json seconds"] = time.perf_counter() - started
        connection.close()
        return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    small, big = one_size(args.n, args.repeats), one_size(2 * args.n, args.repeats)
    for key in small:
        ratio = big[key] / small[key] if small[key] else float("nan")
        print(f"{key:24} N={args.n}: {small[key]:14.3f}   2N: {big[key]:14.3f}   2N/N: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What one pass of the leader's alert detection costs Redis on a big day (issue 20 item 2).

A private redis-server; a task of N params whose N runs of today are recorded finished;
``AlertService.detect()`` run ``--passes`` times, as the leader's thread does every 2 s.
Prints, per pass, the Redis commands it sent, the bytes Redis sent back, and Redis's CPU
seconds, at N and 2N: a pass that reads what changed costs the same at both sizes (a
ratio near 1), one that reads the day costs twice as much (a ratio near 2). The same
script runs on an older checkout, for the figures before a change.

    .venv/bin/python -m bench.alert_detect [--n 50000] [--passes 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis import Redis  # noqa: E402

from dailyq.alerts.alerter import AlertService  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.runs import new_record, runs_on  # noqa: E402
from dailyq.settings import Settings  # noqa: E402
from dailyq.table import Task, TaskTable  # noqa: E402
from tests.tables.sample_tasks import record  # noqa: E402


def redis_figures(connection: Redis) -> tuple[int, int, float]:
    """(commands so far, bytes sent to clients so far, CPU seconds so far) of the server."""
    stats = connection.info("stats")
    cpu = connection.info("cpu")
    calls = sum(int(v["calls"]) for v in connection.info("commandstats").values())
    return calls, int(stats.get("total_net_output_bytes", 0)), float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def one_size(n: int, passes: int) -> dict[str, float]:
    server = PrivateRedis(appendonly=False).start()
    try:
        connection = Redis.from_url(server.url)
        now = datetime.now(timezone.utc)
        # A slot at 00:00:01 UTC with a deadline and grace long past are judged once and
        # settled; what the passes after the first cost is what every 2 s costs.
        task = Task(name="big", func=record, params=list(range(n)), at="00:00:01", tz="UTC")
        table = TaskTable([task])
        settings = Settings(redis_url=server.url, prefix="bench", node_name="bench",
                            alert_url="http://127.0.0.1:9/hook")
        day = now.date()
        runs = runs_on(table, day)
        with connection.pipeline(transaction=False) as pipe:
            for i, run in enumerate(runs):
                rec = dict(new_record("big", run.param_json, run.slot.isoformat(), run.run_id, "finished"),
                           attempts=1, node="n1", ended_at=now.isoformat())
                pipe.hset(settings.keys.day_runs(day), run.run_id, json.dumps(rec))
                if i % 5000 == 4999:
                    pipe.execute()
            pipe.execute()
        alerts = AlertService(connection, settings, table)
        alerts._leader_until = time.monotonic() + 3600  # as if its scheduler led
        alerts.detect()  # the first pass judges the slot once
        before = redis_figures(connection)
        started = time.perf_counter()
        for _ in range(passes):
            alerts.detect()
        wall = time.perf_counter() - started
        after = redis_figures(connection)
        # INFO's own calls (3 per redis_figures) are not the pass's.
        return {"commands_per_pass": (after[0] - before[0] - 3) / passes,
                "bytes_per_pass": (after[1] - before[1]) / passes,
                "redis_cpu_ms_per_pass": (after[2] - before[2]) * 1000 / passes,
                "wall_ms_per_pass": wall * 1000 / passes}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args()
    small, big = one_size(args.n, args.passes), one_size(2 * args.n, args.passes)
    for key in small:
        ratio = big[key] / small[key] if small[key] else float("nan")
        print(f"{key:24} N={args.n}: {small[key]:12.1f}   2N: {big[key]:12.1f}   2N/N: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

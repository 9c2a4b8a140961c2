"""CPU per run of one burst worker draining N no-op runs, for the checkout it is run in.

For an A/B of two versions of dailyq: run it from the root of each checkout (each with
its own venv), alternating, e.g. ``.venv/bin/python bench/worker_cpu.py 3000 --simple``
(``--simple``: the non-forking worker; without it, the forking one). Prints wall time,
the worker's CPU (rusage of the worker process and its work-horses) and Redis's CPU
(INFO) per run. The fan-out before it is not timed. Also imports from checkouts older
than the commands / rq_seam modules, so that a new version can be set against an old one.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from datetime import date

sys.path.insert(0, os.getcwd())

from redis import Redis  # noqa: E402

from dailyq.keys import Keys  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.table import Task, TaskTable  # noqa: E402

try:
    from dailyq.commands import trigger
except ImportError:  # before the commands module
    from dailyq.fanout import trigger  # type: ignore[attr-defined,no-redef]
try:
    from dailyq.rq_seam import make_queue
except ImportError:  # before the RQ seam
    from dailyq.worker import make_queue  # type: ignore[no-redef]


def redis_cpu_s(connection: Redis) -> float:
    info = connection.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    runs, flags = int(sys.argv[1]), sys.argv[2:]
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        keys = Keys("p")
        table = TaskTable([Task(name="noop", func="bench.noop.noop", params=list(range(runs)), at="03:00", retries=0)])
        trigger(connection, keys, make_queue(connection, keys), table, date(2026, 1, 5), None, 7 * 86400)
        env = dict(os.environ, REDIS_URL=server.url, DAILYQ_PREFIX="p", DAILYQ_TASKS="bench.bench_tasks",
                   BENCH_NOOP=str(runs), NODE_NAME="n1", PYTHONPATH=os.getcwd())
        worker_before, redis_before, started = children_cpu_s(), redis_cpu_s(connection), time.perf_counter()
        subprocess.run([sys.executable, "worker_entry.py", "--burst", *flags], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall_s = time.perf_counter() - started
        worker_s, redis_s = children_cpu_s() - worker_before, redis_cpu_s(connection) - redis_before
    per_run = {"wall": wall_s, "worker cpu": worker_s, "redis cpu": redis_s}
    shown = ", ".join(f"{name} {seconds / runs * 1000:.3f} ms/run" for name, seconds in per_run.items())
    print(f"{os.path.basename(os.getcwd())} {' '.join(flags) or 'forking'}: {shown}")


if __name__ == "__main__":
    main()

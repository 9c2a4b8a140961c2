"""Task table for the benchmarks, shaped by environment variables so that separate
node processes share it:

* BENCH_DURATIONS: JSON list of seconds; one param per entry, in table order.
* BENCH_NOOP: number of no-op params (the overhead benchmark).
* BENCH_SLOTS: JSON list of "HH:MM:SS" (UTC); one single-param task per slot.
* BENCH_WORKFLOW: JSON {"ingest": [s...], "report": [s...], "heavy": [s...], "light": [s...],
  "heavy_max_running": K}: report runs after every ingest run; heavy is limited to K at once.
"""

import json
import os
import time

from redis import Redis

from bench.noop import noop
from dailyq.table import Task


def _log(event: str, param: object) -> None:
    connection = Redis.from_url(os.environ["REDIS_URL"])
    connection.rpush(f"{os.environ.get('DAILYQ_PREFIX', 'dailyq')}:bench:events",
                     json.dumps({"event": event, "param": param, "node": os.environ.get("NODE_NAME"),
                                 "t": time.time()}))
    connection.close()


def work(param: dict) -> None:
    """Sleeps param["s"] seconds, logging start and end (makespan, latency)."""
    _log("start", param)
    time.sleep(param["s"])
    _log("end", param)


TASKS = []
if os.environ.get("BENCH_DURATIONS"):
    durations = json.loads(os.environ["BENCH_DURATIONS"])
    TASKS.append(Task(name="uneven", func=work, params=[{"i": i, "s": s} for i, s in enumerate(durations)],
                      at="03:00", retries=0, timeout_s=600))
if os.environ.get("BENCH_NOOP"):
    TASKS.append(Task(name="noop", func=noop, params=list(range(int(os.environ["BENCH_NOOP"]))), at="03:00",
                      retries=0))
for index, at in enumerate(json.loads(os.environ.get("BENCH_SLOTS", "[]"))):
    TASKS.append(Task(name=f"slot{index}", func=work, params=[{"i": index, "s": 0}], at=at, retries=0))
if os.environ.get("BENCH_WORKFLOW"):
    flow = json.loads(os.environ["BENCH_WORKFLOW"])
    for name in ("ingest", "report", "heavy", "light"):
        TASKS.append(Task(name=name, func=work, params=[{"task": name, "i": i, "s": s} for i, s in enumerate(flow[name])],
                          at="03:00", retries=0, timeout_s=600, after=["ingest"] if name == "report" else [],
                          max_running=flow["heavy_max_running"] if name == "heavy" else None))
if not TASKS:  # importable with no settings (e.g. by a worker that only needs the allow-list)
    TASKS.append(Task(name="idle", func=noop, params=[0], at="03:00"))

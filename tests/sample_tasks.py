"""Task table for the tests, shaped by environment variables so that separate node
processes share it: SAMPLE_AT / SAMPLE_TZ / SAMPLE_PARAMS / SAMPLE_SLEEP_S / SAMPLE_ONLY.

A test that starts a live ``scheduler.py`` sets SAMPLE_AT: with the default 03:00 UTC the
scheduler fans out that day's slot by itself from 03:00 to 04:00 UTC (the misfire
grace), beside whatever the test triggers. ``tests.helpers.quiet_sample_at()`` gives a
slot 12 h away; tests of firing use a slot a few seconds ahead."""

import json
import os
import time

from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from dailyq.connection import connect
from dailyq.settings import Settings
from dailyq.table import Task


def _log(event: str, param: object) -> None:
    # connect() rather than Redis.from_url: it also understands redis+sentinel:// URLs.
    # check=False: an outage is ridden out by the loop below, not raised.
    connection = connect(Settings(redis_url=os.environ["REDIS_URL"]), check=False)
    key = f"{os.environ.get('DAILYQ_PREFIX', 'dailyq')}:test:executions"
    entry = json.dumps({"event": event, "param": param, "node": os.environ.get("NODE_NAME"), "pid": os.getpid(),
                        "t": time.time()}, ensure_ascii=False)
    for _ in range(600):  # ride out the outages the tests cause, like a careful task would
        try:
            connection.rpush(key, entry)
            break
        except (ConnectionError, TimeoutError, BusyLoadingError):
            time.sleep(0.1)
    connection.close()


def record(param: object) -> object:
    """Logs its start and end in Redis, so tests can count executions and overlaps."""
    _log("start", param)
    time.sleep(float(os.environ.get("SAMPLE_SLEEP_S", "0.2")))
    _log("end", param)
    return param


def explode(param: object) -> None:
    _log("start", param)
    raise RuntimeError(f"boom for {param}")


PARAMS = [f"任务参数{i}" for i in range(int(os.environ.get("SAMPLE_PARAMS", "4")))]

TASKS = [
    Task(name="sample", func=record, params=PARAMS, at=os.environ.get("SAMPLE_AT", "03:00"),
         tz=os.environ.get("SAMPLE_TZ", "UTC"), retries=0, timeout_s=60),
]
# SAMPLE_ONLY=1 leaves just "sample", so that live schedulers in a test fire nothing else.
if not os.environ.get("SAMPLE_ONLY"):
    TASKS += [
        Task(name="numbers", func=record, params=[1, 2.5, {"k": "値"}, ["a", 1]], cron="30 4 * * *", retries=0),
        Task(name="broken", func=explode, params=["x"], at="05:00", retries=0, retry_backoff_s=1),
    ]


def noop(param: object) -> object:
    """Does nothing: for counting what the machinery around a run costs."""
    return param

"""Task table with computed params, for tests/test_params_backfill.py (DAILYQ_TASKS=
tests.tables.computed_tasks), shared by the test and its node processes.

``computed`` takes its params from ``day_params``, called with the run's day. What it
does is steered through Redis, so a test can change it while processes run:
``{prefix}:test:params_mode`` ``list`` (default) or ``raise``; ``{prefix}:test:params_version``
(default 1) goes into each param, so a list made later differs from one made before.
``{prefix}:test:params_sleep_s`` (default 0): how long a call takes.
Every call is counted in ``{prefix}:test:params_calls``. ``fixed`` has a plain list:
the other task, which goes on whatever ``computed`` does.
"""

import os
import time
from datetime import date

from dailyq.connection import connect
from dailyq.settings import Settings
from dailyq.table import Task


def test_key(name: str) -> str:
    return f"{os.environ.get('DAILYQ_PREFIX', 'dailyq')}:test:{name}"


def day_params(day: date) -> list[str]:
    connection = connect(Settings(redis_url=os.environ["REDIS_URL"]), check=False)
    try:
        connection.incr(test_key("params_calls"))
        mode = (connection.get(test_key("params_mode")) or b"list").decode()
        version = int(connection.get(test_key("params_version")) or 1)
        sleep_s = float(connection.get(test_key("params_sleep_s")) or 0)
    finally:
        connection.close()
    time.sleep(sleep_s)
    if mode == "raise":
        raise RuntimeError(f"inventory for {day.isoformat()} is not ready")
    return [f"{day.isoformat()}-a-v{version}", f"{day.isoformat()}-b-v{version}"]


TASKS = [
    Task(name="computed", func="tests.tables.sample_tasks.record", params="tests.tables.computed_tasks.day_params",
         at="03:00", retries=2, retry_backoff_s=10, timeout_s=60),
    Task(name="fixed", func="tests.tables.sample_tasks.record", params=["x", "y"], at="03:00", retries=0, timeout_s=60),
]

"""Task table for the pool tests (DAILYQ_TASKS=tests.tables.pool_tasks), shaped by environment
variables so that separate node processes share it:

* ``POOLS = {"warehouse": POOL_SIZE}`` (default 2);
* ``load`` and ``export``: POOL_PARAMS runs each (W0, W1, ... and X0, X1, ...), both in
  the pool; ``load`` also has ``max_running=LOAD_MAX_RUNNING`` when that is set;
* ``other``: OTHER_PARAMS runs (O0, ...), in no pool.

All run tests.tables.sample_tasks.record (SAMPLE_SLEEP_S long), which logs each execution's
start and end with its node and pid, at POOL_AT (UTC): tests set it to a quiet time
(tests.support.helpers.quiet_sample_at) so that a live scheduler fires nothing by itself."""

import os

from dailyq.table import Task

POOLS = {"warehouse": int(os.environ.get("POOL_SIZE", "2"))}

_AT = os.environ.get("POOL_AT", "00:00")
_COUNT = int(os.environ.get("POOL_PARAMS", "6"))
_SHARED = dict(func="tests.tables.sample_tasks.record", at=_AT, retries=0, timeout_s=120)
_LOAD_MAX = os.environ.get("LOAD_MAX_RUNNING")

TASKS = [
    Task(name="load", params=[f"W{i}" for i in range(_COUNT)], pool="warehouse",
         max_running=int(_LOAD_MAX) if _LOAD_MAX else None, **_SHARED),
    Task(name="export", params=[f"X{i}" for i in range(_COUNT)], pool="warehouse", **_SHARED),
    Task(name="other", params=[f"O{i}" for i in range(int(os.environ.get("OTHER_PARAMS", "6")))], **_SHARED),
]

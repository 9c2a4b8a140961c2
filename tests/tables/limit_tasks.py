"""Task table for the limits and pause tests (DAILYQ_TASKS=tests.tables.limit_tasks), shaped by
environment variables so that separate node processes share it:

* ``limited``: LIMIT_PARAMS runs (L0, L1, ...), LIMIT_MAX_RUNNING / LIMIT_MAX_PER_NODE
  (unset: no limit), slot LIMIT_AT in LIMIT_TZ with misfire grace LIMIT_GRACE_S;
* ``other``: OTHER_PARAMS runs (O0, ...), no limits, slot OTHER_AT in OTHER_TZ (default UTC).

Both run tests.tables.sample_tasks.record (SAMPLE_SLEEP_S long), which logs each execution's
start and end with its node and pid. The default slots are 12 h from import time in
UTC: a live scheduler fires nothing by itself unless a test sets a slot."""

import os
from datetime import timedelta

from dailyq.clock import utc_now
from dailyq.table import Task

# 12 h from import time; each process computes its own, so tests that start several
# set LIMIT_AT and OTHER_AT (tests.support.helpers.quiet_sample_at) for them all to agree.
_QUIET = (utc_now() + timedelta(hours=12)).strftime("%H:%M")


def _limit(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


TASKS = [
    Task(name="limited", func="tests.tables.sample_tasks.record",
         params=[f"L{i}" for i in range(int(os.environ.get("LIMIT_PARAMS", "6")))],
         at=os.environ.get("LIMIT_AT") or _QUIET, tz=os.environ.get("LIMIT_TZ", "UTC"), retries=0,
         misfire_grace_s=int(os.environ.get("LIMIT_GRACE_S", "3600")), timeout_s=120,
         max_running=_limit("LIMIT_MAX_RUNNING"), max_per_node=_limit("LIMIT_MAX_PER_NODE")),
    Task(name="other", func="tests.tables.sample_tasks.record",
         params=[f"O{i}" for i in range(int(os.environ.get("OTHER_PARAMS", "6")))],
         at=os.environ.get("OTHER_AT") or _QUIET, tz=os.environ.get("OTHER_TZ", "UTC"), retries=0, timeout_s=120),
]

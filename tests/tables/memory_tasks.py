"""Task table of the memory-full test (tests/test_memory_full.py), shaped by environment
variables so that its node processes share it.

Two tasks fire at the same instant (MEM_FIRE_AT, Unix seconds) in zones whose dates always
differ (UTC+14 and UTC-12): their runs are two days, so the leader's fan-out is two
transactions (fanout.py fans out one day at a time), and a Redis that fills up with the
first day refuses the second: memory is reached in the middle of the fan-out. MEM_PARAMS
runs each, every param MEM_PARAM_BYTES long (big-ish: each run costs Redis a few KB);
``west`` (fanned out second) has a misfire grace of MEM_GRACE_S, shorter than the test keeps Redis full.
The runs are tests.tables.sample_tasks.record, logging to SAMPLE_LOG_URL (another Redis, which
does not fill up)."""

import os
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from dailyq.table import Task

EAST, WEST = "Etc/GMT-14", "Etc/GMT+12"  # UTC+14 and UTC-12 (POSIX signs)
FIRE_AT = datetime.fromtimestamp(float(os.environ.get("MEM_FIRE_AT", "0")), timezone.utc)
PARAMS = [f"p{i:04d}-" + "x" * int(os.environ.get("MEM_PARAM_BYTES", "1000")) for i in
          range(int(os.environ.get("MEM_PARAMS", "100")))]


def _at(zone: str) -> str:
    return FIRE_AT.astimezone(ZoneInfo(zone)).strftime("%H:%M:%S")


def day_of(zone: str) -> str:
    return FIRE_AT.astimezone(ZoneInfo(zone)).date().isoformat()


TASKS = [
    Task(name="east", func="tests.tables.sample_tasks.record", params=PARAMS, at=_at(EAST), tz=EAST, retries=0,
         timeout_s=60),
    Task(name="west", func="tests.tables.sample_tasks.record", params=PARAMS, at=_at(WEST), tz=WEST, retries=0,
         timeout_s=60, misfire_grace_s=int(os.environ.get("MEM_GRACE_S", "5"))),
]

"""Two versions of one task table, for rolling-deploy tests: DEPLOY_TABLE=v1 or v2.

v1: task ``hb`` with params p1..p6. v2, the next deploy: ``hb`` gains p7 and p8, a new
task ``nt`` (n1..n3) appears, and a new task ``nd`` (d1) runs after ``hb``. Both run
tests.tables.sample_tasks.record (which logs each execution with its node), once a day at
DEPLOY_AT (HH:MM:SS) in DEPLOY_TZ.
"""

import os

from dailyq.table import Task

VERSION = os.environ.get("DEPLOY_TABLE", "v1")
AT = os.environ.get("DEPLOY_AT", "03:00")
TZ = os.environ.get("DEPLOY_TZ", "UTC")

HB_PARAMS = [f"p{i}" for i in range(1, 7)] + (["p7", "p8"] if VERSION == "v2" else [])

TASKS = [Task("hb", func="tests.tables.sample_tasks.record", params=HB_PARAMS, at=AT, tz=TZ, retries=1)]
if VERSION == "v2":
    TASKS.append(Task("nt", func="tests.tables.sample_tasks.record", params=["n1", "n2", "n3"], at=AT, tz=TZ,
                      retries=1))
    TASKS.append(Task("nd", func="tests.tables.sample_tasks.record", params=["d1"], at=AT, tz=TZ, retries=1,
                      after=["hb"]))

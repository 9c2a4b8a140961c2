"""Deliberately broken task tables for the CLI error tests; BAD_TABLE picks one."""

import os

from dailyq.table import Task
from tests.tables.sample_tasks import record

_CASE = os.environ.get("BAD_TABLE", "duplicate")
_OK = dict(func=record, params=["a"], at="09:00")

if _CASE == "duplicate":
    TASKS = [Task(name="twice", **_OK), Task(name="twice", **_OK)]
elif _CASE == "bad_at":
    TASKS = [Task(name="late", func=record, params=["a"], at="25:61")]
elif _CASE == "bad_cron":
    TASKS = [Task(name="cronned", func=record, params=["a"], cron="every day")]
elif _CASE == "bad_tz":
    TASKS = [Task(name="zoned", func=record, params=["a"], at="09:00", tz="Moon/Base")]
elif _CASE == "non_json":
    TASKS = [Task(name="objects", func=record, params=[object()], at="09:00")]
elif _CASE == "unimportable":
    TASKS = [Task(name="ghost", func="no_such_module.work", params=["a"], at="09:00")]
elif _CASE == "bad_deadline":
    TASKS = [Task(name="tardy", func=record, params=["a"], at="09:00", deadline="9h")]
elif _CASE == "unknown_after":
    TASKS = [Task(name="report", after=["ingest"], **_OK)]
elif _CASE == "after_cycle":
    TASKS = [Task(name="a", after=["c"], **_OK), Task(name="b", after=["a"], **_OK), Task(name="c", after=["b"], **_OK)]
elif _CASE == "bad_limit":
    TASKS = [Task(name="greedy", max_running=0, **_OK)]
elif _CASE == "unknown_pool":
    POOLS = {"warehouse": 3}
    TASKS = [Task(name="loader", pool="warehouse", **_OK), Task(name="stray", pool="wherehouse", **_OK)]
elif _CASE == "bad_pool_size":
    POOLS = {"warehouse": 0}
    TASKS = [Task(name="loader", pool="warehouse", **_OK)]
elif _CASE == "syntax":
    raise SyntaxError("simulated broken table module")

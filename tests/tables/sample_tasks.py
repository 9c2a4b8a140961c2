"""Task table for the tests, shaped by environment variables so that separate node
processes share it: SAMPLE_AT / SAMPLE_TZ / SAMPLE_PARAMS / SAMPLE_SLEEP_S / SAMPLE_ONLY /
SAMPLE_RETRIES / SAMPLE_FUNC (record, progress, hold_gil, die, die_when_told, fail_first, explode,
fail_some, uneven: SAMPLE_SLEEPS) /
SAMPLE_FAIL (the params fail_some fails, comma-separated) / SAMPLE_DEADLINE (the sample
task's deadline) / SAMPLE_LOG_URL (where the tasks log their executions; default
REDIS_URL, which a test may route through a proxy) / SAMPLE_DOWNSTREAM (N: a task
"downstream" with N params and ``after=["sample"]``, also with SAMPLE_ONLY) /
SAMPLE_MARKER (fail_until_marker fails the SAMPLE_FAIL params while this file is absent) /
SAMPLE_GIL_N, SAMPLE_GIL_ATTEMPTS (hold_gil: the input size of its GIL-holding call, and
on which attempts it makes it) / SAMPLE_MAX_RUNNING (the sample task's ``max_running``) /
SAMPLE_POOL (N: ``POOLS = {"shared": N}`` with the sample task in it).

A test that starts a live ``scheduler.py`` sets SAMPLE_AT: with the default 03:00 UTC the
scheduler fans out that day's slot by itself from 03:00 to 04:00 UTC (the misfire
grace), beside whatever the test triggers. ``tests.support.helpers.quiet_sample_at()`` gives a
slot 12 h away; tests of firing use a slot a few seconds ahead."""

import json
import os
import re
import time
from typing import Any

from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from dailyq import current_run
from dailyq.connection import connect
from dailyq.settings import Settings
from dailyq.table import Task


def _log(event: str, param: object, **extra: Any) -> None:
    # connect() rather than Redis.from_url: it also understands redis+sentinel:// URLs.
    # check=False: an outage is ridden out by the loop below, not raised.
    url = os.environ.get("SAMPLE_LOG_URL") or os.environ["REDIS_URL"]
    connection = connect(Settings(redis_url=url), check=False)
    key = f"{os.environ.get('DAILYQ_PREFIX', 'dailyq')}:test:executions"
    entry = json.dumps({"event": event, "param": param, "node": os.environ.get("NODE_NAME"), "pid": os.getpid(),
                        "t": time.time(), **extra}, ensure_ascii=False)
    for _ in range(600):  # ride out the outages the tests cause, like a careful task would
        try:
            connection.rpush(key, entry)
            break
        except (ConnectionError, TimeoutError, BusyLoadingError):
            time.sleep(0.1)
    connection.close()


def _context_fields() -> dict[str, Any]:
    run = current_run()
    if run is None:
        return {"context": None}
    return {"context": {"task": run.task, "param": run.param, "day": run.day.isoformat(), "slot": run.slot.isoformat(),
                        "slot_tz": str(run.slot.tzinfo), "run_id": run.run_id, "attempt": run.attempt,
                        "node": run.node, "fence": run.fence}}


def _tick_for_the_sleep(param: object) -> object:
    """A tick every 0.1 s for SAMPLE_SLEEP_S, then the end."""
    deadline = time.monotonic() + float(os.environ.get("SAMPLE_SLEEP_S", "0.2"))
    while time.monotonic() < deadline:
        _log("tick", param)
        time.sleep(0.1)
    _log("end", param)
    return param


def progress(param: object) -> object:
    """Logs its run context, then a tick every 0.1 s for SAMPLE_SLEEP_S: a copy's span is
    its first to its last tick, even when the copy is stopped without a word."""
    _log("start", param, **_context_fields())
    return _tick_for_the_sleep(param)


def hold_gil(param: object) -> object:
    """Logs its start, then, on the run's first SAMPLE_GIL_ATTEMPTS attempts (default 1),
    holds the GIL in one C call: ``re`` backtracking catastrophically over SAMPLE_GIL_N
    characters (each one more takes about 1.35 times as long; on an idle 2-core machine
    34 took 2 s, so the default 42 takes 20 s or more). No other thread of its process
    runs meanwhile. Then it ticks like ``progress``."""
    _log("start", param, **_context_fields())
    run = current_run()
    if run is None or run.attempt <= int(os.environ.get("SAMPLE_GIL_ATTEMPTS", "1")):
        re.match(r"(a|aa)+$", "a" * int(os.environ.get("SAMPLE_GIL_N", "42")) + "b")
        _log("held", param)
    return _tick_for_the_sleep(param)


def die(param: object) -> None:
    """Ends its own process, as a segfault or the OOM killer would."""
    _log("start", param, **_context_fields())
    os._exit(3)


def die_when_told(param: object) -> object:
    """Ticks like ``progress``; when a test sets the key ``{prefix}:test:die``, takes it
    and ends its own process with exit code 1 (as a work-horse does whose Redis vanished
    under RQ's feet). The next execution, finding no key, runs to its end."""
    _log("start", param, **_context_fields())
    connection = connect(Settings(redis_url=os.environ["REDIS_URL"]), check=False)
    key = f"{os.environ.get('DAILYQ_PREFIX', 'dailyq')}:test:die"
    deadline = time.monotonic() + float(os.environ.get("SAMPLE_SLEEP_S", "0.2"))
    while time.monotonic() < deadline:
        if connection.delete(key):
            os._exit(1)
        _log("tick", param)
        time.sleep(0.1)
    _log("end", param)
    return param


def flush_scripts(param: object) -> object:
    """Records its start, then empties Redis's script cache (as a restart or a failover to
    a replica would): the FINISH of this very run, and the next run's BEGIN, find no script
    under the SHA the worker loaded them with."""
    _log("start", param, **_context_fields())
    connect(Settings(redis_url=os.environ["REDIS_URL"]), check=False).script_flush()
    return param


def fail_first(param: object) -> object:
    """Raises on the run's first attempt, then works like ``record``."""
    run = current_run()
    if run is not None and run.attempt == 1:
        _log("start", param, **_context_fields())
        raise RuntimeError(f"first attempt of {param} fails")
    _log("start", param, **_context_fields())
    time.sleep(float(os.environ.get("SAMPLE_SLEEP_S", "0.2")))
    _log("end", param)
    return param


def record(param: object) -> object:
    """Logs its start (with its run context) and end in Redis, so tests can count
    executions and overlaps."""
    _log("start", param, **_context_fields())
    time.sleep(float(os.environ.get("SAMPLE_SLEEP_S", "0.2")))
    _log("end", param)
    return param


def uneven(param: object) -> object:
    """Like ``record``, sleeping the param's own time: the i-th entry of SAMPLE_SLEEPS
    (comma-separated seconds) for param 任务参数i."""
    sleeps = [float(s) for s in os.environ["SAMPLE_SLEEPS"].split(",")]
    _log("start", param, **_context_fields())
    time.sleep(sleeps[int(str(param).removeprefix("任务参数")) % len(sleeps)])
    _log("end", param)
    return param


def explode(param: object) -> None:
    _log("start", param)
    raise RuntimeError(f"boom for {param}")


def fail_until_marker(param: object) -> object:
    """Like ``fail_some`` until the file SAMPLE_MARKER exists (a test "fixes" the task)."""
    if not os.path.exists(os.environ.get("SAMPLE_MARKER", "")):
        return fail_some(param)
    return record(param)


def fail_some(param: object) -> object:
    """Raises for the params listed in SAMPLE_FAIL, else works like ``record``."""
    if str(param) in os.environ.get("SAMPLE_FAIL", "").split(","):
        explode(param)
    return record(param)


PARAMS = [f"任务参数{i}" for i in range(int(os.environ.get("SAMPLE_PARAMS", "4")))]

TASKS = [
    Task(name="sample", func=f"tests.tables.sample_tasks.{os.environ.get('SAMPLE_FUNC', 'record')}", params=PARAMS,
         at=os.environ.get("SAMPLE_AT", "03:00"), tz=os.environ.get("SAMPLE_TZ", "UTC"),
         retries=int(os.environ.get("SAMPLE_RETRIES", "0")),
         retry_backoff_s=int(os.environ.get("SAMPLE_BACKOFF_S", "1")),
         timeout_s=60, deadline=os.environ.get("SAMPLE_DEADLINE") or None,
         max_running=int(os.environ["SAMPLE_MAX_RUNNING"]) if os.environ.get("SAMPLE_MAX_RUNNING") else None,
         pool="shared" if os.environ.get("SAMPLE_POOL") else None),
]
if os.environ.get("SAMPLE_POOL"):
    POOLS = {"shared": int(os.environ["SAMPLE_POOL"])}
if os.environ.get("SAMPLE_DOWNSTREAM"):
    DOWNSTREAM_PARAMS = [f"下游{i}" for i in range(int(os.environ["SAMPLE_DOWNSTREAM"]))]
    TASKS.append(Task(name="downstream", func=record, params=DOWNSTREAM_PARAMS,
                      at=os.environ.get("SAMPLE_AT", "03:00"), tz=os.environ.get("SAMPLE_TZ", "UTC"), retries=0,
                      timeout_s=60, after=["sample"]))
# SAMPLE_ONLY=1 leaves just "sample" (and "downstream"), so that live schedulers in a test fire nothing else.
if not os.environ.get("SAMPLE_ONLY"):
    TASKS += [
        Task(name="numbers", func=record, params=[1, 2.5, {"k": "値"}, ["a", 1]], cron="30 4 * * *", retries=0),
        Task(name="broken", func=explode, params=["x"], at="05:00", retries=0, retry_backoff_s=1),
    ]


def noop(param: object) -> object:
    """Does nothing: for counting what the machinery around a run costs."""
    return param

"""DAILYQ_LOG_FORMAT: text by default, json = one object per line with node and run_id."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import date

import pytest

from dailyq.commands import trigger
from dailyq.errors import ConfigError
from dailyq.logs import JsonFormatter, OncePerOutage, log_format, make_formatter, setup_logging
from dailyq.runs import runs_on
from dailyq.worker.workers import make_queue
from tests.support.helpers import ROOT

DAY = date(2026, 11, 26)


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.getLogger("dailyq.worker.guard").makeRecord("dailyq.worker.guard", logging.INFO, __file__, 1,
                                                                message, args, None, extra=extra or None)
    made.created = 1795770000.25  # 2026-11-27T09:00:00.250Z: fixed, not the clock
    return made


def test_json_lines_carry_node_and_run_id():
    line = JsonFormatter("node-1").format(record("run %s started on node %s", "r-1", "node-1", run_id="r-1"))
    assert "\n" not in line
    assert json.loads(line) == {"ts": "2026-11-27T09:00:00.250+00:00", "level": "INFO", "logger": "dailyq.worker.guard",
                                "node": "node-1", "message": "run r-1 started on node node-1", "run_id": "r-1"}


def test_json_lines_without_a_run_have_no_run_id_and_keep_non_ascii_and_tracebacks():
    formatter = JsonFormatter("节点-1")
    assert "run_id" not in json.loads(formatter.format(record("leader changed")))
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        failing = record("pass failed for %s", "任务参数1")
        failing.exc_info = sys.exc_info()
    line = formatter.format(failing)
    assert "\n" not in line and "任务参数1" in line  # one line, readable
    parsed = json.loads(line)
    assert parsed["node"] == "节点-1"
    assert "RuntimeError: boom" in parsed["exc"]


def test_text_stays_the_default_format():
    assert log_format({}) == "text" and log_format({"DAILYQ_LOG_FORMAT": ""}) == "text"
    assert log_format({"DAILYQ_LOG_FORMAT": "JSON"}) == "json"
    line = make_formatter("node-1", "text").format(record("leader changed"))
    assert line.endswith(" INFO [node-1] dailyq.worker.guard: leader changed")


def test_an_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match=r"DAILYQ_LOG_FORMAT='yaml' is not a log format: use text or json"):
        log_format({"DAILYQ_LOG_FORMAT": "yaml"})


def test_setup_logging_in_json_keeps_the_outage_filter():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    flags = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved_flags = {f: getattr(logging, f) for f in flags}  # setup_logging turns these off process-wide
    try:
        setup_logging("node-1", fmt="json")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        assert any(isinstance(f, OncePerOutage) for f in handler.filters)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        for flag, value in saved_flags.items():
            setattr(logging, flag, value)


def run_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "worker_entry.py", "--burst"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_json_worker_logs_only_json_lines_with_its_node_and_each_runs_id(node_env, connection, settings, table):
    trigger(connection, settings.keys, make_queue(connection, settings.keys), table, DAY, ["sample"],
            settings.retention_s)
    finished = run_worker(dict(node_env, NODE_NAME="node-j", DAILYQ_LOG_FORMAT="json"))
    assert finished.returncode == 0, finished.stderr
    entries = [json.loads(line) for line in finished.stderr.splitlines() if line.strip()]  # every line is JSON
    assert entries and all(e["node"] == "node-j" for e in entries)
    assert {e["logger"].split(".")[0] for e in entries} >= {"dailyq", "rq"}
    expected = {run.run_id for run in runs_on(table, DAY, ["sample"])}
    # RQ's own lines while it handles a run carry that run's id: its success, with the duration.
    succeeded = {e["run_id"] for e in entries
                 if e["logger"] == "rq.worker" and e["message"].startswith("Successfully completed") and "run_id" in e}
    assert succeeded == expected
    assert all(e["run_id"] in expected for e in entries if "run_id" in e)
    # Between runs (start-up, the idle loop, shutdown) nothing is tagged.
    assert not any("run_id" in e for e in entries if "quitting" in e["message"] or "started with PID" in e["message"])
    # A run's start is RQ's own line naming the job, whose id is the run id.
    started = {run_id for run_id in expected for e in entries
               if e["logger"] == "rq.worker" and e["message"].endswith(f"({run_id})")}
    assert started == expected


def test_an_unknown_log_format_stops_the_worker_with_one_line(node_env):
    stopped = run_worker(dict(node_env, NODE_NAME="node-j", DAILYQ_LOG_FORMAT="yaml"))
    assert stopped.returncode == 2
    assert stopped.stderr.count("\n") == 1 and "DAILYQ_LOG_FORMAT='yaml'" in stopped.stderr, stopped.stderr


def test_rqs_could_not_connect_line_is_kept_once_per_outage():
    template = "Worker %s: could not connect to Redis instance: %s retrying in %d seconds..."

    def rq_record(level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.getLogger("rq.worker").makeRecord("rq.worker", level, __file__, 1, msg, args, None)

    once = OncePerOutage()
    outage = [once.filter(rq_record(logging.ERROR, template, "w1", "refused", 2)) for _ in range(3)]
    assert outage == [True, False, False]
    assert once.filter(rq_record(logging.INFO, "Worker %s: %s: %s", "w1", "q", "job-1"))  # back: passes, resets
    assert once.filter(rq_record(logging.ERROR, template, "w1", "refused", 2))  # the next outage is told again

"""The public surface: ``from dailyq import ...``, the commands as functions returning
data (dailyq/api.py) against the real redis-server, and the installed ``dailyq``
console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import date
from importlib.metadata import version
from pathlib import Path

import pytest

import dailyq
from dailyq.errors import ConfigError
from dailyq.redis_server import free_port
from dailyq.runs import runs_on
from dailyq.worker.workers import DailySimpleWorker, make_queue
from tests.support.helpers import ROOT, executions, run_cli, starts_per_param

DAY = "2026-11-26"  # long past: with no scheduler then, a run nobody triggered shows as missed


def sample_runs(table) -> list:
    return runs_on(table, date.fromisoformat(DAY), ["sample"])


def run_queue(connection, settings, table) -> None:
    """Execute what is queued, in this process (the real guard, the sample task)."""
    DailySimpleWorker(connection=connection, settings=settings, table=table).work(burst=True)


# -- the package ------------------------------------------------------------------------


def test_importing_dailyq_pulls_in_neither_redis_nor_rq_and_exports_the_public_names():
    probe = ("import sys, dailyq\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'rq', 'rq_scheduler'))\n"
             "print(repr(heavy))\n"
             "from jobs import Task\n"
             "print(Task is dailyq.Task)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True"]  # task modules import dailyq on every worker
    assert {"Task", "current_run", "ClaimLost", "RunContext", "trigger", "rerun", "day_status"} <= set(dailyq.__all__)
    for name in dailyq.__all__:
        assert getattr(dailyq, name) is not None
    assert dailyq.trigger is dailyq.api.trigger and dailyq.day_status is dailyq.api.day_status
    with pytest.raises(AttributeError):
        dailyq.no_such_name  # noqa: B018 - the lazy look-up must not swallow typos


def test_the_installed_version_is_dailyqs_own():
    assert version("dailyq") == dailyq.__version__  # pyproject.toml reads it from dailyq/__init__.py


# -- trigger ----------------------------------------------------------------------------


def test_trigger_with_a_client_returns_the_runs_it_enqueued_and_is_idempotent(connection, settings, table):
    first = dailyq.trigger(connection, DAY, "sample", settings=settings, table=table)
    expected = sample_runs(table)
    assert first["date"] == DAY and first["tasks"] == ["sample"] and first["already"] == []
    assert sorted(r["run_id"] for r in first["enqueued"]) == sorted(r.run_id for r in expected)
    one = next(r for r in first["enqueued"] if r["param"] == "任务参数0")
    assert one == {"task": "sample", "param": "任务参数0", "slot": "2026-11-26T03:00:00+00:00",
                   "run_id": one["run_id"], "job_id": one["run_id"]}
    queue = make_queue(connection, settings.keys)
    assert sorted(queue.job_ids) == sorted(r["job_id"] for r in first["enqueued"])

    second = dailyq.trigger(connection, date.fromisoformat(DAY), ["sample"], settings=settings, table=table)
    assert second["enqueued"] == [] and sorted(r["run_id"] for r in second["already"]) == sorted(
        r.run_id for r in expected)
    assert queue.count == len(expected)
    assert connection.ping()  # a client handed in is left open


def test_trigger_with_a_url_reads_prefix_and_table_from_the_environment(node_env, connection, settings, table):
    result = dailyq.trigger(settings.redis_url, DAY)  # no settings, no table: DAILYQ_PREFIX and DAILYQ_TASKS
    assert len(result["enqueued"]) == len(runs_on(table, date.fromisoformat(DAY)))
    assert result["tasks"] == [task.name for task in table.tasks]
    assert make_queue(connection, settings.keys).count == len(result["enqueued"])  # under this test's prefix


def test_trigger_with_a_list_of_tasks_as_the_table(connection, settings):
    tasks = [dailyq.Task(name="adhoc", func="tests.tables.sample_tasks.noop", params=[1, 2], at="07:30",
                         tz="Asia/Shanghai")]
    result = dailyq.trigger(connection, DAY, settings=settings, table=tasks)
    assert [(r["task"], r["param"], r["slot"]) for r in result["enqueued"]] == [
        ("adhoc", 1, "2026-11-26T07:30:00+08:00"), ("adhoc", 2, "2026-11-26T07:30:00+08:00")]


def test_bad_input_is_a_config_error_before_redis_is_asked(settings, table):
    # Nothing listens there: an error about the input proves Redis was not asked first.
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    cases = [
        (lambda: dailyq.trigger(nowhere, DAY, ["nope"], settings=settings, table=table), "unknown task 'nope'"),
        (lambda: dailyq.trigger(nowhere, "26/11/2026", settings=settings, table=table), "bad date '26/11/2026'"),
        (lambda: dailyq.rerun(nowhere, "nope", settings=settings, table=table), "unknown task 'nope'"),
        (lambda: dailyq.rerun(nowhere, "sample", ["zzz"], DAY, settings=settings, table=table), "no param 'zzz'"),
        (lambda: dailyq.day_status(nowhere, "2026-13-01", settings=settings, table=table), "bad date"),
        (lambda: dailyq.day_status(12345, DAY, settings=settings, table=table), "need a redis.Redis client"),
    ]
    for call, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            call()


def test_an_unreachable_or_malformed_url_is_one_line_dailyq_error(settings, table):
    nowhere = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(dailyq.DailyqError) as unreachable:
        dailyq.day_status(nowhere, DAY, settings=settings, table=table)
    assert "cannot reach Redis" in str(unreachable.value) and "user:***@" in str(unreachable.value)
    assert "secret" not in str(unreachable.value) and "\n" not in str(unreachable.value)
    with pytest.raises(ConfigError, match="bad REDIS_URL"):
        dailyq.day_status("http://example/0", DAY, settings=settings, table=table)


# -- rerun ------------------------------------------------------------------------------


def test_rerun_skips_finished_runs_unless_forced_and_names_the_new_job(node_env, connection, settings, table):
    dailyq.trigger(connection, DAY, ["sample"], settings=settings, table=table)
    run_queue(connection, settings, table)

    plain = dailyq.rerun(connection, "sample", ["任务参数1"], DAY, settings=settings, table=table)
    assert plain["enqueued"] == [] and plain["in_progress"] == []
    (finished,) = plain["finished"]
    assert finished["param"] == "任务参数1" and finished["job_id"] == finished["run_id"]

    forced = dailyq.rerun(settings.redis_url, "sample", "任务参数1", DAY, force=True, settings=settings, table=table)
    (again,) = forced["enqueued"]
    assert forced["force"] is True and forced["task"] == "sample" and forced["date"] == DAY
    assert again["run_id"] == finished["run_id"] and again["job_id"] == f"{finished['run_id']}-r1"
    assert make_queue(connection, settings.keys).job_ids == [again["job_id"]]
    run_queue(connection, settings, table)
    counts = starts_per_param(executions(connection, settings.prefix))
    assert counts['"任务参数1"'] == 2 and counts['"任务参数0"'] == 1


def test_rerun_by_param_value_or_json_text_of_a_never_enqueued_run(connection, settings, table):
    by_value = dailyq.rerun(connection, "numbers", [2.5, {"k": "値"}], DAY, settings=settings, table=table)
    assert sorted(json.dumps(r["param"], ensure_ascii=False) for r in by_value["enqueued"]) == ['2.5', '{"k": "値"}']
    # A run never enqueued keeps its first job id: the leader's own fan-out of it stays a no-op.
    assert all(r["job_id"] == r["run_id"] for r in by_value["enqueued"])
    by_text = dailyq.rerun(connection, "numbers", ["1"], DAY, settings=settings, table=table)
    assert [r["param"] for r in by_text["enqueued"]] == [1]
    queued = dailyq.rerun(connection, "numbers", ["2.5"], DAY, settings=settings, table=table)
    assert queued["enqueued"] == [] and [r["param"] for r in queued["in_progress"]] == [2.5]


# -- day_status -------------------------------------------------------------------------


def comparable(status: dict) -> dict:
    """A status without what changes between two reads a moment apart (Redis's used memory too)."""
    shown = {k: v for k, v in status.items() if k not in ("generated_at", "leader")}
    shown["redis"] = {k: v for k, v in shown.get("redis", {}).items() if k != "used_memory"}
    return shown


def test_day_status_is_what_status_json_prints(node_env, connection, settings, table):
    dailyq.trigger(connection, DAY, ["sample"], settings=settings, table=table)
    from_function = dailyq.day_status(connection, DAY, settings=settings, table=table)
    printed = run_cli(["status", "--date", DAY, "--json"], node_env)
    assert printed.returncode == 0, printed.stderr
    assert comparable(from_function) == comparable(json.loads(printed.stdout))
    states = {r["task"]: r["state"] for r in from_function["runs"]}
    assert states == {"sample": "queued", "numbers": "missed", "broken": "missed"}
    assert set(from_function) >= {"date", "leader", "runs", "nodes", "clock_warnings", "generated_at", "redis"}
    assert set(from_function["redis"]) >= {"used_memory", "maxmemory", "full"}
    assert from_function["redis"]["full"] is False and from_function["redis"]["used_memory"] > 0


def test_day_status_defaults_to_today_in_the_tasks_zone(settings):
    from dailyq.api import default_day
    from dailyq.clock import utc_now
    from dailyq.table import TaskTable

    table = [dailyq.Task(name="east", func="tests.tables.sample_tasks.noop", params=[1], at="09:00",
                         tz="Pacific/Kiritimati")]
    before = default_day(TaskTable(table), utc_now()).isoformat()
    status = dailyq.day_status(settings.redis_url, table=table, settings=settings)
    after = default_day(TaskTable(table), utc_now()).isoformat()
    assert status["date"] in (before, after)  # UTC+14: usually not UTC's date
    assert [r["task"] for r in status["runs"]] == ["east"]


# -- the console script -----------------------------------------------------------------


def dailyq_script() -> str:
    """The `dailyq` the install put next to this interpreter (not one found elsewhere on PATH)."""
    found = shutil.which("dailyq", path=str(Path(sys.executable).parent))
    assert found, f"no dailyq console script next to {sys.executable}: pip install -e '.[dev]'"
    return found


def run_script(args: list[str], env: dict) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dailyq_script(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_the_dailyq_console_script_runs_the_same_commands(node_env, connection, settings):
    triggered = run_script(["trigger", "--date", DAY, "--task", "sample"], node_env)
    assert triggered.returncode == 0, triggered.stderr
    assert triggered.stdout == f"{DAY}: enqueued 4 runs, 0 were already enqueued\n"

    status = run_script(["status", "--date", DAY, "--json"], node_env)
    assert status.returncode == 0, status.stderr
    printed = run_cli(["status", "--date", DAY, "--json"], node_env)
    assert comparable(json.loads(status.stdout)) == comparable(json.loads(printed.stdout))
    assert {r["state"] for r in json.loads(status.stdout)["runs"] if r["task"] == "sample"} == {"queued"}

    # Bad input: one line naming the command as typed, exit 2, no traceback.
    bad = run_script(["status", "--date", "2026-13-01"], node_env)
    assert bad.returncode == 2 and bad.stderr.startswith("dailyq status: error: argument --date: bad date")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_the_command_functions_stay_functions_once_every_module_is_loaded():
    """A submodule named like a command (``dailyq.pause``) would replace the function on
    the package as soon as anything imported it: no module may share a command's name."""
    import subprocess
    import sys

    code = ("import pkgutil, importlib, dailyq\n"
            "for m in pkgutil.iter_modules(dailyq.__path__): importlib.import_module('dailyq.' + m.name)\n"
            "bad = [n for n in sorted(dailyq._LAZY) if not callable(getattr(dailyq, n))]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

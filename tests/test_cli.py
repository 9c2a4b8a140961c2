"""The CLI as users run it: separate processes, one-line errors, status, trigger, rerun, demo."""

import json
import os
import subprocess
import sys

import pytest

from dailyq.redis_server import free_port
from tests.support.helpers import ROOT, executions, run_cli, starts_per_param

DAY = "2026-11-26"


def assert_clean_error(result, exit_code: int, *fragments: str) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, env_changes, code, fragments", [
    (["status"], {"REDIS_URL": "redis://127.0.0.1:{free}/0"}, 3, ["cannot reach Redis", "REDIS_URL"]),
    (["status"], {"REDIS_URL": "http://example/0"}, 2, ["bad REDIS_URL"]),
    (["status"], {"REDIS_URL": "redis://user:secret@127.0.0.1:{free}/0"}, 3, ["user:***@"]),
    (["status", "--date", "2026-13-01"], {}, 2, ["bad date '2026-13-01'", "YYYY-MM-DD"]),
    (["trigger", "--date", "yesterday"], {}, 2, ["bad date"]),
    (["rerun", "nope"], {}, 2, ["unknown task 'nope'", "known: broken, numbers, sample"]),
    (["trigger", "--task", "nope"], {}, 2, ["unknown task 'nope'"]),
    (["rerun", "sample", "--param", "zzz", "--date", DAY], {}, 2, ["no param 'zzz'", "任务参数0"]),
    (["frobnicate"], {}, 2, ["invalid choice"]),
    (["status"], {"DAILYQ_RETENTION_DAYS": "week"}, 2, ["DAILYQ_RETENTION_DAYS"]),
    (["status"], {"DAILYQ_TASKS": "no_such_table"}, 2, ["cannot import task table module 'no_such_table'"]),
])
def test_bad_input_gives_one_clean_line(node_env, args, env_changes, code, fragments):
    port = free_port()
    env = dict(node_env, **{k: v.replace("{free}", str(port)) for k, v in env_changes.items()})
    assert_clean_error(run_cli(args, env), code, *fragments)


@pytest.mark.parametrize("case, fragment", [
    ("duplicate", "task 'twice': name is used twice"),
    ("bad_at", "task 'late': bad at='25:61'"),
    ("bad_cron", "task 'cronned': bad cron='every day'"),
    ("bad_tz", "task 'zoned': unknown time zone 'Moon/Base'"),
    ("non_json", "task 'objects': param"),
    ("unimportable", "task 'ghost': cannot import func 'no_such_module.work'"),
    ("bad_deadline", "task 'tardy': bad deadline='9h'"),
    ("unknown_after", "task 'report': after names unknown task 'ingest'"),
    ("after_cycle", "tasks 'a' -> 'c' -> 'b' -> 'a': a cycle in after"),
    ("bad_limit", "task 'greedy': max_running must be a positive integer"),
    ("unknown_pool", "task 'stray': pool 'wherehouse' is not in POOLS (known: warehouse)"),
    ("bad_pool_size", "POOLS['warehouse'] must be a positive integer"),
    ("syntax", "cannot import task table module 'tests.tables.bad_table'"),
])
def test_a_bad_table_stops_every_entry_point_with_the_task_named(node_env, case, fragment):
    env = dict(node_env, DAILYQ_TASKS="tests.tables.bad_table", BAD_TABLE=case)
    assert_clean_error(run_cli(["status"], env), 2, fragment)
    assert_clean_error(run_cli(["--burst"], env), 2, fragment)
    worker = subprocess.run([sys.executable, "worker_entry.py", "--burst"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert_clean_error(worker, 2, fragment)
    # The dashboard loads the table too (its /dailyq/ timeline lists the table's runs). A
    # port of its own: were the table not checked, it would start serving (and time out here).
    dashboard_env = {k: v for k, v in env.items() if not k.startswith(("DASHBOARD_", "RQ_DASHBOARD_"))}
    dashboard = subprocess.run([sys.executable, "-m", "dailyq.dashboard"], cwd=ROOT,
                               env=dict(dashboard_env, DASHBOARD_PORT=str(free_port())), capture_output=True,
                               text=True, timeout=30)
    assert_clean_error(dashboard, 2, fragment)


def test_worker_and_scheduler_refuse_to_start_without_redis(node_env):
    env = dict(node_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    worker = subprocess.run([sys.executable, "worker_entry.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert_clean_error(worker, 3, "cannot reach Redis")
    assert_clean_error(run_cli([], env), 3, "cannot reach Redis")


def burst_worker(env) -> None:
    subprocess.run([sys.executable, "worker_entry.py", "--burst"], cwd=ROOT, env=dict(env, NODE_NAME="n1"),
                   check=True, capture_output=True, timeout=120)


def status_json(env, day=DAY) -> dict:
    result = run_cli(["status", "--date", day, "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_json_has_the_public_keys(node_env):
    status = status_json(node_env)
    assert set(status) >= {"date", "leader", "runs"}
    assert status["date"] == DAY and status["leader"] is None
    assert {"task", "param", "state", "node", "started_at", "ended_at", "attempts", "error"} <= set(status["runs"][0])
    # 2026-11-26 is long past: with no scheduler then, every run shows as missed.
    assert {r["state"] for r in status["runs"]} == {"missed"}


def test_trigger_twice_runs_each_once(node_env, connection, prefix):
    first = run_cli(["trigger", "--date", DAY, "--task", "sample"], node_env)
    second = run_cli(["trigger", "--date", DAY, "--task", "sample"], node_env)
    assert "enqueued 4 runs, 0 were already enqueued" in first.stdout
    assert "enqueued 0 runs, 4 were already enqueued" in second.stdout
    burst_worker(node_env)
    assert set(starts_per_param(executions(connection, prefix)).values()) == {1}
    runs = [r for r in status_json(node_env)["runs"] if r["task"] == "sample"]
    assert {r["state"] for r in runs} == {"finished"}
    assert all(r["started_at"] and r["ended_at"] and r["attempts"] == 1 for r in runs)


@pytest.mark.slow
def test_rerun_skips_finished_runs_unless_forced(node_env, connection, prefix):
    run_cli(["trigger", "--date", DAY, "--task", "sample"], node_env)
    burst_worker(node_env)

    plain = run_cli(["rerun", "sample", "--date", DAY, "--param", "任务参数1"], node_env)
    assert plain.returncode == 0, plain.stderr
    assert "skipped, already finished (use --force): sample \"任务参数1\"" in plain.stdout
    assert "0 enqueued" in plain.stdout

    forced = run_cli(["rerun", "sample", "--date", DAY, "--param", "任务参数1", "--force"], node_env)
    assert "1 enqueued" in forced.stdout, forced.stdout
    burst_worker(node_env)
    counts = starts_per_param(executions(connection, prefix))
    assert counts['"任务参数1"'] == 2 and counts['"任务参数0"'] == 1
    rerun_record = next(r for r in status_json(node_env)["runs"] if r["param"] == "任务参数1")
    assert rerun_record["state"] == "finished" and rerun_record["attempts"] == 2


@pytest.mark.slow
def test_rerun_runs_a_missed_or_failed_run_without_force(node_env, connection, prefix):
    result = run_cli(["rerun", "broken", "--date", DAY], node_env)
    assert "1 enqueued" in result.stdout
    burst_worker(node_env)
    assert next(r for r in status_json(node_env)["runs"] if r["task"] == "broken")["state"] == "failed"
    again = run_cli(["rerun", "broken", "--date", DAY], node_env)
    assert "1 enqueued" in again.stdout
    burst_worker(node_env)
    broken = next(r for r in status_json(node_env)["runs"] if r["task"] == "broken")
    assert broken["attempts"] == 2 and "boom" in broken["error"]


@pytest.mark.slow
def test_rerun_without_force_runs_a_run_that_failed_after_a_forced_rerun(node_env, connection, prefix):
    """The run finished once (its id is in the day's finished set); a forced rerun failed; a
    plain rerun must run it, not leave it queued behind BEGIN's finished check."""
    env = dict(node_env, SAMPLE_FUNC="fail_some")
    run_cli(["trigger", "--date", DAY, "--task", "sample"], env)
    burst_worker(env)
    forced = run_cli(["rerun", "sample", "--date", DAY, "--param", "任务参数1", "--force"], env)
    assert "1 enqueued" in forced.stdout, forced.stdout
    burst_worker(dict(env, SAMPLE_FAIL="任务参数1"))
    assert next(r for r in status_json(env)["runs"] if r["param"] == "任务参数1")["state"] == "failed"
    plain = run_cli(["rerun", "sample", "--date", DAY, "--param", "任务参数1"], env)
    assert "1 enqueued" in plain.stdout, plain.stdout
    burst_worker(env)
    record = next(r for r in status_json(env)["runs"] if r["param"] == "任务参数1")
    assert record["state"] == "finished" and record["attempts"] == 3


def test_demo_runs_on_a_machine_without_redis_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("DAILYQ_")}
    env.update(DAILYQ_EXAMPLE_SLEEP_S="0.5", DAILYQ_DEMO_LOG_DIR=str(tmp_path))
    result = run_cli(["demo"], env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4/4 done" in result.stdout
    assert result.stdout.count("finished") >= 4
    assert "任务参数1" in result.stdout


def test_json_output_to_a_pipe_is_the_json_modules_text_and_takes_what_orjson_refuses(capsys):
    from dailyq.cli import print_json

    value = {"runs": [{"param": "任务参数0", "duration_s": 1.5, "node": None, "attempts": 2}], "eta": None}
    print_json(value)  # capsys' stdout is no terminal: the compact form
    assert capsys.readouterr().out == json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"
    # An int param beyond 64 bits (a table allows it: it round-trips) and an int key: json's text.
    for odd in ({"param": 2 ** 70}, {1: "a"}):
        print_json(odd)
        assert capsys.readouterr().out == json.dumps(odd, ensure_ascii=False, separators=(",", ":")) + "\n"

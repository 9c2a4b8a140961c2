"""``cancel`` (dailyq/cancelling.py): an executing run stops, on both worker kinds, within the
promise; queued, waiting and set-aside runs (by a pause, ``max_running`` or a pool) and runs
waiting for an RQ retry never start; a cancelled run blocks its downstream runs until a
rerun, which runs it again. Real processes: a scheduler and a worker per node."""

from __future__ import annotations

import json
import time
from datetime import date

import pytest

import dailyq
from dailyq.keys import Keys
from dailyq.runs import CANCELLED, FINISHED, RUNNING
from dailyq.scripts import scripts_for
from dailyq.settings import Settings
from tests.support.helpers import base_env, executions, quiet_sample_at, run_cli, wait_for

DAY = "2026-11-20"
DAY_DATE = date.fromisoformat(DAY)
# The promise (issue 22): an executing run stops within 3 s of the cancel call.
STOP_PROMISE_S = 3.0


def status_runs(env: dict) -> list[dict]:
    result = run_cli(["status", "--date", DAY, "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["runs"]


def by_param(env: dict) -> dict[str, dict]:
    return {run["param"]: run for run in status_runs(env)}


def events_of(connection, prefix: str, param: str, kind: str) -> list[dict]:
    return [e for e in executions(connection, prefix) if e["param"] == param and e["event"] == kind]


# -- the scripts, in process --------------------------------------------------------------

def _begin(scripts, keys: Keys, run_id: str, owner: str, job_id: str):
    return scripts.begin(finished_key=keys.day_finished(DAY_DATE), claim_key=keys.claim(run_id),
                         runs_key=keys.day_runs(DAY_DATE), running_key=keys.running,
                         series_key=keys.series_claim("s"), fence_key=keys.fence, run_id=run_id, owner=owner,
                         claim_ttl_ms=6000, force=False, base_json=json.dumps(_record(job_id)), retention_s=600,
                         day=DAY, overlap="wait", node="n1", now_iso="2026-11-20T01:00:00+00:00", job_id=job_id,
                         max_attempts=3).run()


def _record(job_id: str) -> dict:
    return {"task": "sample", "param_json": '"p"', "slot": "2026-11-20T03:00:00+00:00", "state": "queued",
            "node": None, "started_at": None, "ended_at": None, "attempts": 0, "error": None, "job_id": job_id}


def _cancel(scripts, keys: Keys, run_id: str):
    return scripts.cancel(runs_key=keys.day_runs(DAY_DATE), claim_key=keys.claim(run_id), running_key=keys.running,
                          waiting_key=keys.day_waiting(DAY_DATE), run_id=run_id, why="cancelled by alice on ops",
                          now_iso="2026-11-20T01:00:01+00:00", retention_s=600).run()


def test_cancel_renames_an_executing_claim_so_its_renewal_stops_and_its_end_releases_it(connection, prefix):
    keys, scripts = Keys(prefix), scripts_for(connection)
    connection.hset(keys.day_runs(DAY_DATE), "r1", json.dumps(_record("r1")))
    assert _begin(scripts, keys, "r1", "copy-a", "r1").outcome == "claimed"
    reply = _cancel(scripts, keys, "r1")
    assert (reply.outcome, reply.state, reply.executing) == ("cancelled", RUNNING, True)
    record = json.loads(connection.hget(keys.day_runs(DAY_DATE), "r1"))
    assert (record["state"], record["error"]) == (CANCELLED, "cancelled by alice on ops")
    assert not connection.hexists(keys.running, "r1")  # recovery leaves it alone
    renew = scripts.renew_claim(claim_key=keys.claim("r1"), series_key=keys.series_claim("s"), owner="copy-a",
                                ttl_ms=6000)
    assert renew.run() == "cancelled"
    # A rerun's copy waits while the cancelled copy still holds the claim.
    connection.hset(keys.day_runs(DAY_DATE), "r1", json.dumps(dict(_record("r1-r1"))))
    assert _begin(scripts, keys, "r1", "copy-b", "r1-r1").outcome == "busy"
    connection.hset(keys.day_runs(DAY_DATE), "r1", json.dumps(record))
    # FAIL of the stopped copy records nothing, and frees the claim.
    fail = scripts.fail(claim_key=keys.claim("r1"), runs_key=keys.day_runs(DAY_DATE), running_key=keys.running,
                        series_key=keys.series_claim("s"), failures_key=keys.alert_failures, run_id="r1",
                        owner="copy-a", base_json="{}", retention_s=600, rq_can_retry=True, max_attempts=3,
                        node="n1", now_iso="2026-11-20T01:00:02+00:00", error="RunStopped",
                        day=DAY_DATE.isoformat())
    assert fail.run() == "not-ours"
    assert json.loads(connection.hget(keys.day_runs(DAY_DATE), "r1"))["state"] == CANCELLED
    assert not connection.exists(keys.claim("r1")) and not connection.exists(keys.series_claim("s"))
    assert _cancel(scripts, keys, "r1").outcome == "ended"


def test_begin_refuses_a_cancelled_run_and_release_answers_who_cancelled(connection, prefix):
    keys, scripts = Keys(prefix), scripts_for(connection)
    connection.hset(keys.day_runs(DAY_DATE), "r2", json.dumps(_record("r2")))
    reply = _cancel(scripts, keys, "r2")
    assert (reply.outcome, reply.state, reply.executing) == ("cancelled", "queued", False)
    assert _begin(scripts, keys, "r2", "copy-a", "r2").outcome == "cancelled"  # a retry or queued job of it
    assert not connection.exists(keys.claim("r2"))
    connection.hset(keys.day_runs(DAY_DATE), "r3", json.dumps(_record("r3")))
    assert _begin(scripts, keys, "r3", "copy-a", "r3").outcome == "claimed"
    _cancel(scripts, keys, "r3")
    release = scripts.release_cancelled(claim_key=keys.claim("r3"), series_key=keys.series_claim("s"), owner="x")
    assert release.run() is None  # not that copy's claim
    release = scripts.release_cancelled(claim_key=keys.claim("r3"), series_key=keys.series_claim("s"),
                                        owner="copy-a")
    assert release.run() == "cancelled by alice on ops"
    assert not connection.exists(keys.claim("r3"))
    assert _cancel(scripts, keys, "none").outcome == "none"


# -- real processes -----------------------------------------------------------------------

@pytest.mark.parametrize("worker_args", [(), ("--simple",)], ids=["forking", "non-forking"])
def test_cancel_stops_an_executing_run_within_3s_and_it_is_not_retried(redis_server, prefix, connection, processes,
                                                                       worker_args):
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_FUNC="progress",
                   SAMPLE_SLEEP_S="60", SAMPLE_RETRIES="2", SAMPLE_BACKOFF_S="1", SAMPLE_AT=quiet_sample_at(),
                   NODE_NAME="node-a")
    processes.start("scheduler.py", env)  # its leader moves RQ retries back: a retry would show
    worker = processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"), *worker_args)
    keys = Keys(prefix)
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0
    wait_for(lambda: len(events_of(connection, prefix, "任务参数0", "tick")) >= 3, 30, "the run to execute")
    (run,) = status_runs(env)
    assert run["state"] == RUNNING and run["node"] == "node-b"

    settings = Settings(redis_url=redis_server.url, prefix=prefix, node_name="node-ops",
                        tasks_module="tests.tables.sample_tasks", claim_ttl_s=6)
    asked_at, asked_wall = time.monotonic(), time.time()
    result = dailyq.cancel(connection, DAY, "sample", user="alice", settings=settings)
    wait_for(lambda: not connection.exists(keys.claim(run["run_id"])), 10, "the stopped copy to release its claim",
             every=0.02)
    stopped_s = time.monotonic() - asked_at
    print(f"cancel to claim release: {stopped_s:.2f}s ({worker_args or 'forking'})")
    assert result["cancelled"] == [{"task": "sample", "param": "任务参数0", "slot": run["slot"],
                                    "run_id": run["run_id"], "state": RUNNING, "node": "node-b", "executing": True}]
    assert stopped_s <= STOP_PROMISE_S
    ticks = events_of(connection, prefix, "任务参数0", "tick")
    assert max(e["t"] for e in ticks) <= asked_wall + STOP_PROMISE_S  # the task itself stopped
    time.sleep(3)  # three retry backoffs: a retry would have started by now
    assert len(events_of(connection, prefix, "任务参数0", "start")) == 1
    assert not events_of(connection, prefix, "任务参数0", "end")
    (after,) = status_runs(env)
    assert (after["state"], after["error"], after["attempts"]) == (CANCELLED, "cancelled by alice on node-ops", 1)
    wait_for(lambda: "cancelled by alice on node-ops; claim released" in processes.log_of(worker), 5,
             "the worker's log line")
    assert worker.poll() is None  # the worker goes on

    # A rerun runs it again, as a new run.
    assert run_cli(["rerun", "sample", "--date", DAY], env).returncode == 0
    wait_for(lambda: len(events_of(connection, prefix, "任务参数0", "start")) == 2, 30, "the rerun to start")
    assert events_of(connection, prefix, "任务参数0", "start")[1]["context"]["run_id"] == f"{run['run_id']}-r1"
    again = dailyq.cancel(connection, DAY, run_id=f"{run['run_id']}-r1", user="alice", settings=settings)
    assert [r["executing"] for r in again["cancelled"]] == [True]  # a rerun's job id names the run too
    wait_for(lambda: not connection.exists(keys.claim(run["run_id"])), 10, "the rerun's copy to stop")


@pytest.mark.slow
def test_cancelled_queued_and_waiting_runs_never_start_and_block_downstream_until_a_rerun(
        redis_server, prefix, connection, processes):
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="2", SAMPLE_DOWNSTREAM="2",
                   SAMPLE_SLEEP_S="0.2", SAMPLE_AT=quiet_sample_at(), NODE_NAME="node-a")
    processes.start("scheduler.py", env)
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0  # no worker yet: all queued or waiting
    ops = dict(env, NODE_NAME="node-ops", LOGNAME="bob", USER="bob")
    result = run_cli(["cancel", "--date", DAY, "--task", "sample", "--param", "任务参数1"], ops)
    assert result.returncode == 0, result.stderr
    assert 'cancelled: sample "任务参数1" slot' in result.stdout and "(was queued)" in result.stdout
    assert f"{DAY}: 1 cancelled (0 executing) by bob on node-ops" in result.stdout
    assert "WARNING [node-ops] dailyq.cancelling: run sample-" in result.stderr  # the cancel is logged
    assert "cancelled by bob on node-ops (it was queued)" in result.stderr
    waiting_id = by_param(env)["下游0"]["run_id"]
    result = run_cli(["cancel", "--date", DAY, "--run", waiting_id], ops)
    # Waiting, or blocked already: the leader saw the cancelled upstream run.
    assert result.returncode == 0 and ("(was waiting)" in result.stdout or "(was blocked)" in result.stdout), \
        result.stdout + result.stderr

    processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))
    wait_for(lambda: by_param(env)["任务参数0"]["state"] == FINISHED and by_param(env)["下游1"]["state"] == "blocked",
             30, "the other upstream run to finish and downstream to be blocked", every=0.3)
    runs = by_param(env)
    assert runs["任务参数1"]["state"] == CANCELLED and runs["任务参数1"]["error"] == "cancelled by bob on node-ops"
    assert runs["下游0"]["state"] == CANCELLED
    assert runs["下游1"]["error"] == f'upstream run sample("任务参数1") cancelled: {runs["任务参数1"]["run_id"]}'
    assert not events_of(connection, prefix, "任务参数1", "start")
    assert not [e for e in executions(connection, prefix) if e["param"] in ("下游0", "下游1")]
    doctor = run_cli(["doctor", "--date", DAY, "--json"], env)
    assert doctor.returncode == 0 and json.loads(doctor.stdout)["problems"] == [], doctor.stdout
    counts = json.loads(run_cli(["status", "--from", DAY, "--to", DAY, "--json"], env).stdout)[0]["states"]
    assert counts[CANCELLED] == 2
    again = run_cli(["cancel", "--date", DAY, "--task", "sample"], ops)
    assert "not cancelled, already finished: sample" in again.stdout and "2 had ended already" in again.stdout
    assert 'not cancelled, already cancelled: sample "任务参数1"' in again.stdout

    # A rerun of the cancelled upstream run runs it; its finishing releases the blocked run.
    assert run_cli(["rerun", "sample", "--param", "任务参数1", "--date", DAY], env).returncode == 0
    wait_for(lambda: by_param(env)["下游1"]["state"] == FINISHED, 30, "the rerun, then the downstream run", every=0.3)
    assert by_param(env)["任务参数1"]["state"] == FINISHED
    assert by_param(env)["下游0"]["state"] == CANCELLED  # until a rerun of its own
    assert len(events_of(connection, prefix, "任务参数1", "start")) == 1


def test_a_cancel_blocks_the_runs_downstream_at_once_without_a_leader(redis_server, prefix, connection):
    """Nothing else would: once the leader gave the day its full look, its ticks read the
    day's counts only, and a cancelled run that never started records no end for a
    worker's look (CI saw the downstream run stay ``waiting`` for good under load)."""
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="2", SAMPLE_DOWNSTREAM="2",
                   SAMPLE_AT=quiet_sample_at(), NODE_NAME="node-ops")
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0  # no leader, no worker
    assert {r["state"] for r in status_runs(env) if r["task"] == "downstream"} == {"waiting"}
    result = run_cli(["cancel", "--date", DAY, "--task", "sample", "--param", "任务参数1"], env)
    assert result.returncode == 0, result.stderr
    runs = by_param(env)
    cancelled_id = runs["任务参数1"]["run_id"]
    assert [(runs[p]["state"], runs[p]["error"]) for p in ("下游0", "下游1")] == \
        [("blocked", f'upstream run sample("任务参数1") cancelled: {cancelled_id}')] * 2


def test_bad_cancel_input_is_one_line_and_exit_2(redis_server, prefix):
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1")
    for args, says in ((["--param", "x"], "--param needs --task"),
                       (["--run", "nope"], "no run 'nope' on 2026-11-20"),
                       (["--task", "nosuch"], "nosuch"),
                       (["--task", "sample", "--run", "r"], "either --run or --task")):
        result = run_cli(["cancel", "--date", DAY, *args], env)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr, result.stderr
    result = run_cli(["cancel", "--task", "sample"], env)
    assert result.returncode == 2 and "--date" in result.stderr


def test_a_cancelled_run_held_by_a_pause_never_starts_after_resume(redis_server, prefix, connection, processes):
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_AT=quiet_sample_at(),
                   NODE_NAME="node-a")
    keys = Keys(prefix)
    worker = processes.start("worker_entry.py", env)
    wait_for(lambda: connection.exists(keys.heartbeat("worker", "node-a")), 30, "the worker")
    assert run_cli(["pause", "sample"], env).returncode == 0
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0
    wait_for(lambda: connection.llen(keys.set_aside("sample")) == 1, 30, "the worker to set the run aside")
    settings = Settings(redis_url=redis_server.url, prefix=prefix, node_name="node-ops",
                        tasks_module="tests.tables.sample_tasks")
    assert [r["state"] for r in dailyq.cancel(connection, DAY, "sample", user="carol", settings=settings)
            ["cancelled"]] == ["queued"]
    assert run_cli(["resume", "sample"], env).returncode == 0  # its job goes back to the queue
    wait_for(lambda: "not executed: cancelled" in processes.log_of(worker), 30, "the worker to refuse it")
    assert not executions(connection, prefix)
    (run,) = status_runs(env)
    assert (run["state"], run["error"], run["attempts"]) == (CANCELLED, "cancelled by carol on node-ops", 0)


def cancel_run(env: dict, run_id: str) -> str:
    """``cancel --run`` from an operator's node; its stdout (the confirmation)."""
    result = run_cli(["cancel", "--date", DAY, "--run", run_id], dict(env, NODE_NAME="node-ops", LOGNAME="dave",
                                                                       USER="dave"))
    assert result.returncode == 0, result.stderr
    return result.stdout


def blocked_by(env: dict, param: str, cancelled_id: str) -> None:
    """The downstream run is blocked by the cancelled upstream run, as by a failed one."""
    (down,) = [r for r in status_runs(env) if r["task"] == "downstream"]
    assert (down["state"], down["error"]) == ("blocked", f'upstream run sample("{param}") cancelled: {cancelled_id}')


@pytest.mark.slow
@pytest.mark.parametrize("limit", [{"SAMPLE_MAX_RUNNING": "1"}, {"SAMPLE_POOL": "1"}], ids=["max_running", "pool"])
def test_a_cancelled_run_set_aside_by_a_limit_never_starts_when_the_permit_frees(redis_server, prefix, connection,
                                                                              processes, limit):
    """Two runs, room for one (the task's ``max_running``, or a pool of 1): the second is
    set aside while the first executes, then cancelled. The first one's end puts the
    held job back on the queue; BEGIN refuses it, so it never starts and takes no permit."""
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="2", SAMPLE_DOWNSTREAM="1",
                   SAMPLE_FUNC="progress", SAMPLE_SLEEP_S="5", SAMPLE_AT=quiet_sample_at(), NODE_NAME="node-a", **limit)
    keys = Keys(prefix)
    processes.start("scheduler.py", env)
    workers = [processes.start("worker_entry.py", dict(env, NODE_NAME="node-b")) for _ in range(2)]
    wait_for(lambda: connection.exists(keys.heartbeat("worker", "node-b")), 30, "the workers")
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0
    wait_for(lambda: connection.llen(keys.set_aside("sample")) == 1, 30, "one run executing, the other set aside")
    (executing,) = {e["param"] for e in executions(connection, prefix) if e["event"] == "start"}
    (held,) = {"任务参数0", "任务参数1"} - {executing}
    runs = by_param(env)
    if "SAMPLE_POOL" in limit:  # held by the pool's room, not a limit of the task's own
        assert json.loads(run_cli(["status", "--date", DAY, "--json"], env).stdout)["pools"] == \
            {"shared": {"size": 1, "running": 1, "set_aside": 1}}
    held_id = runs[held]["run_id"]
    assert runs[held]["state"] == "queued"

    assert "(was queued)" in cancel_run(env, held_id)
    assert not events_of(connection, prefix, executing, "end"), "the first run ended before the cancel: no test"
    blocked_by(env, held, held_id)
    wait_for(lambda: events_of(connection, prefix, executing, "end"), 30, "the first run to end")

    def refused() -> bool:
        return any(f"run {held_id} not executed: cancelled" in processes.log_of(w) for w in workers)

    # The freed permit sends the held job to a worker: it is refused, or (were BEGIN not to
    # look at the record) it starts.
    wait_for(lambda: refused() or events_of(connection, prefix, held, "start"), 30, "a worker to take the held job")
    assert not events_of(connection, prefix, held, "start")
    assert refused()
    assert not [e for e in executions(connection, prefix) if e["param"] == "下游0"]
    runs = by_param(env)
    assert (runs[held]["state"], runs[held]["error"], runs[held]["attempts"]) == \
        (CANCELLED, "cancelled by dave on node-ops", 0)
    assert runs[executing]["state"] == FINISHED
    blocked_by(env, held, held_id)
    # The refused job took no permit for good and left nothing set aside.
    wait_for(lambda: connection.zcard(keys.limit_permits("sample")) == 0, 10, "every permit released")
    assert connection.exists(keys.set_aside("sample"), keys.set_aside_index("sample")) == 0


@pytest.mark.slow
def test_a_cancelled_run_waiting_for_its_retry_is_not_retried(redis_server, prefix, connection, processes):
    """Both runs' first attempts fail; RQ keeps their retries in the ScheduledJobRegistry
    for the backoff, and one run is cancelled meanwhile. When the backoff ends both retries
    are moved to the queue: the other run's executes, the cancelled run's is refused by
    BEGIN (no second attempt), and the downstream run is blocked by it."""
    backoff_s = 5
    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="2", SAMPLE_DOWNSTREAM="1",
                   SAMPLE_FUNC="fail_first", SAMPLE_RETRIES="1", SAMPLE_BACKOFF_S=str(backoff_s),
                   SAMPLE_AT=quiet_sample_at(), NODE_NAME="node-a")
    processes.start("scheduler.py", env)  # its leader moves RQ retries back, as RQ's scheduler does
    worker = processes.start("worker_entry.py", dict(env, NODE_NAME="node-b"))
    scheduled = f"rq:scheduled:{prefix}"  # RQ's ScheduledJobRegistry of our queue
    assert run_cli(["trigger", "--date", DAY], env).returncode == 0
    wait_for(lambda: connection.zcard(scheduled) == 2, 30, "both first attempts to fail and their retries to wait")
    run = by_param(env)["任务参数1"]
    assert (run["state"], run["attempts"]) == ("queued", 1) and "first attempt" in run["error"], run

    assert "(was queued)" in cancel_run(env, run["run_id"])
    assert connection.zcard(scheduled) == 2, "a retry left its wait before the cancel: no test"
    blocked_by(env, "任务参数1", run["run_id"])

    def refused() -> bool:
        return f"run {run['run_id']} not executed: cancelled" in processes.log_of(worker)

    # After the backoff the retry is moved to the queue: refused, or (were BEGIN not to look
    # at the record) its second attempt starts.
    wait_for(lambda: refused() or len(events_of(connection, prefix, "任务参数1", "start")) > 1, backoff_s + 30,
             "the retry to be moved to the queue and taken by the worker")
    assert len(events_of(connection, prefix, "任务参数1", "start")) == 1  # the failed attempt only
    assert refused()
    wait_for(lambda: by_param(env)["任务参数0"]["state"] == FINISHED, 30, "the other run's retry to finish")
    assert connection.zcard(scheduled) == 0
    assert len(events_of(connection, prefix, "任务参数0", "start")) == 2  # the movers did move the retries
    after = by_param(env)["任务参数1"]
    assert (after["state"], after["error"], after["attempts"]) == (CANCELLED, "cancelled by dave on node-ops", 1)
    blocked_by(env, "任务参数1", run["run_id"])
    assert not [e for e in executions(connection, prefix) if e["param"] == "下游0"]


def test_the_cancelled_state_shows_in_the_watch_line_the_table_and_the_report():
    from datetime import datetime, timezone

    from dailyq.ops.render import render_table, summary
    from dailyq.ops.report import render_report
    from dailyq.ops.watch import is_settled, progress, render_line

    def run(param: str, state: str) -> dict:
        return {"task": "sample", "param": param, "state": state, "node": "n1", "started_at": None,
                "ended_at": None, "attempts": 1, "error": "cancelled by alice on ops" if state == CANCELLED else None,
                "run_id": f"sample-{param}", "slot": "2026-11-20T03:00:00+00:00", "job_id": None, "duration_s": None}

    status = {"date": DAY, "leader": None, "runs": [run("a", FINISHED), run("b", CANCELLED)], "nodes": [],
              "generated_at": "2026-11-20T04:00:00+00:00"}
    p = progress(status, {}, datetime(2026, 11, 20, 4, tzinfo=timezone.utc))
    assert (p.done, p.cancelled, p.pending) == (2, 1, 0)  # final: --until-done does not wait for it
    assert " 1 cancelled" in render_line(p) and is_settled(status)
    assert summary(status) == {FINISHED: 1, CANCELLED: 1}
    assert "\x1b[1;33mcancelled\x1b[0m" in render_table(status, colour=True)
    html = render_report(status)
    assert 'data-state="cancelled"' in html and "cancelled by alice on ops" in html

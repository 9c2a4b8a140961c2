"""Rolling deploys with real processes: nodes on two task tables (tests/tables/deploy_tables.py)."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from datetime import date, timedelta

import pytest

from dailyq.clock import utc_now
from dailyq.keys import Keys
from dailyq.runs import new_record
from tests.support.helpers import executions, run_cli, wait_for

V2_ONLY = {"p7", "p8", "n1", "n2", "n3", "d1"}  # d1: task nd, after hb
ALL_V2 = {f"p{i}" for i in range(1, 9)} | {"n1", "n2", "n3", "d1"}


def deploy_env(node_env: dict, version: str, node: str, **extra: str) -> dict:
    return dict(node_env, DAILYQ_TASKS="tests.tables.deploy_tables", DEPLOY_TABLE=version, NODE_NAME=node,
                SAMPLE_SLEEP_S="0.2", **extra)


def status_of(env: dict, day: str) -> dict:
    result = run_cli(["status", "--date", day, "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def states(env: dict, day: str) -> dict[str, str]:
    return {r["param"]: r["state"] for r in status_of(env, day)["runs"]}


def leader_node(connection, keys: Keys) -> str | None:
    raw = connection.get(keys.leader)
    return json.loads(raw)["node"] if raw else None


@pytest.mark.slow
def test_nodes_on_two_tables_run_every_v2_run_once_on_a_node_whose_table_has_it(node_env, processes, connection,
                                                                                 prefix):
    """Issue 18 (a): node "new" (v2: hb gains p7, p8; task nt) leads and fires the slot while
    node "old" (v1) runs its worker and the new node's worker is not up yet; old leads in
    between. Old's worker leaves the v2-only jobs instead of failing them (and does not
    spin on them), and once new's worker is up every v2 run executes once, on a node whose
    table has it; none is failed or stuck."""
    keys = Keys(prefix)
    slot = (utc_now() + timedelta(seconds=8)).replace(microsecond=0)
    timing = {"DEPLOY_AT": slot.strftime("%H:%M:%S"), "DEPLOY_TZ": "UTC"}
    new_env = deploy_env(node_env, "v2", "new", **timing)
    old_env = deploy_env(node_env, "v1", "old", **timing)
    day = slot.date().isoformat()

    new_scheduler = processes.start("scheduler.py", new_env)
    wait_for(lambda: leader_node(connection, keys) == "new", timeout=20, what="node new leading")
    old_scheduler = processes.start("scheduler.py", old_env)
    processes.start("worker_entry.py", old_env)
    wait_for(lambda: connection.exists(keys.heartbeat("worker", "old")), timeout=20, what="old's worker")

    # New fires the slot (12 runs; d1 held for hb); old's worker runs p1..p6 and leaves the
    # other five.
    wait_for(lambda: connection.scard(keys.day_enqueued(slot.date())) == 12, timeout=40, what="the v2 fan-out")
    wait_for(lambda: connection.hlen(keys.left_info) == 5, timeout=30, what="old's worker leaving 5 jobs")
    wait_for(lambda: sum(s == "finished" for s in states(new_env, day).values()) == 6, timeout=30,
             what="p1..p6 finished on old")

    # The other node leads for a while: it returns the left jobs, old's worker leaves them again.
    new_scheduler.send_signal(signal.SIGTERM)
    new_scheduler.wait(timeout=15)
    wait_for(lambda: leader_node(connection, keys) == "old", timeout=20, what="node old leading")
    time.sleep(4)
    shown = states(new_env, day)
    assert {p for p, s in shown.items() if s == "queued"} == V2_ONLY - {"d1"}, shown
    # nd's run waits for hb p7, p8; the old leader, whose table has no nd, leaves it held.
    assert shown["d1"] == "waiting"
    info = {json.loads(v)["param_json"]: json.loads(v) for v in connection.hvals(keys.left_info)}
    assert set(info) == {json.dumps(p) for p in V2_ONLY - {"d1"}}
    # Left, not spun on: a handful of leaves each in ~10 s, with the wait doubling.
    assert all(1 <= entry["count"] <= 6 for entry in info.values()), info
    queued = [r for r in status_of(new_env, day)["runs"] if r["state"] == "queued"]
    assert all("left by node old" in (r["error"] or "") for r in queued), queued

    # New's worker starts, and new's scheduler again (old keeps leading): every run ends.
    processes.start("worker_entry.py", new_env)
    processes.start("scheduler.py", new_env)
    wait_for(lambda: set(states(new_env, day).values()) == {"finished"}, timeout=60, what="every v2 run finished")

    events = [e for e in executions(connection, prefix) if e["event"] == "start"]
    assert Counter(e["param"] for e in events) == Counter({p: 1 for p in ALL_V2})
    assert {e["node"] for e in events if e["param"] in V2_ONLY} == {"new"}
    # The leader forgets left jobs whose runs no longer wait for them at its next look.
    wait_for(lambda: connection.hlen(keys.left_info) == 0 and connection.zcard(keys.left) == 0, timeout=5,
             what="the left set emptied")
    status = status_of(new_env, day)
    assert len(status["runs"]) == 12 and {r["state"] for r in status["runs"]} == {"finished"}
    assert old_scheduler.poll() is None
    # status names the nodes whose table differs from the leader's (old), and what differs.
    tables = status["tables"]
    assert tables["same"] is False and tables["reference_from"] == "leader"
    (difference,) = tables["differences"]
    assert difference["nodes"] == ["new"] and difference["tasks_added"] == ["nd", "nt"]
    assert difference["params"] == {"hb": {"added": ['"p7"', '"p8"'], "removed": []}}
    text = run_cli(["status", "--date", day], new_env).stdout
    assert "tables differ: new" in text and "task nd added; task nt added" in text


@pytest.mark.slow
def test_runs_no_live_table_has_end_removed_and_rerun_runs_them(node_env, processes, connection, prefix):
    """A deploy that takes p7, p8 and tasks nt, nd away: their runs (fanned out by a v2
    trigger: queued, and nd's held for hb) end 'removed' after DAILYQ_REMOVED_GRACE_S once no
    live node's table has them, saying why; not failed, no alert; the rest finish. A rerun
    (v2) runs a removed run again."""
    keys = Keys(prefix)
    far = (utc_now() + timedelta(hours=12)).strftime("%H:%M")
    today = utc_now().date()  # read once: the test may cross midnight (UTC)
    day = today.isoformat()
    v2_cli = deploy_env(node_env, "v2", "cli", DEPLOY_AT=far)
    assert run_cli(["trigger", "--date", day], v2_cli).returncode == 0
    old_env = deploy_env(node_env, "v1", "old", DEPLOY_AT=far, DAILYQ_REMOVED_GRACE_S="2")
    processes.start("scheduler.py", old_env)
    processes.start("worker_entry.py", old_env)

    wait_for(lambda: set(states(v2_cli, day).values()) == {"finished", "removed"}, timeout=60,
             what="p1..p6 finished and the rest removed")
    runs = {r["param"]: r for r in status_of(v2_cli, day)["runs"]}
    assert {p for p, r in runs.items() if r["state"] == "removed"} == V2_ONLY
    assert all("no live node's table has had this run" in runs[p]["error"] for p in V2_ONLY)
    assert "no task 'nt'" in runs["n1"]["error"] and "has no param \"p7\"" in runs["p7"]["error"]
    assert "no task 'nd'" in runs["d1"]["error"]  # held for hb, never queued: removed from waiting
    assert not connection.hexists(keys.day_waiting(today), runs["d1"]["run_id"])
    assert not any(e["param"] in V2_ONLY for e in executions(connection, prefix))
    finished_ids = {m.decode() for m in connection.smembers(keys.day_finished(today))}
    assert {runs[p]["run_id"] for p in V2_ONLY} <= finished_ids  # downstream runs go on as if it finished

    # Rerun asks for it again: with a v2 worker up, it runs.
    processes.start("worker_entry.py", deploy_env(node_env, "v2", "new", DEPLOY_AT=far))
    result = run_cli(["rerun", "nt", "--date", day], v2_cli)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: {states(v2_cli, day)[p] for p in ("n1", "n2", "n3")} == {"finished"}, timeout=40,
             what="the rerun of nt")
    assert {e["node"] for e in executions(connection, prefix) if e["param"] in {"n1", "n2", "n3"}} == {"new"}


# -- the scripts, directly against the real Redis ---------------------------------------

SCRIPT_DAY = "2026-11-26"


def _leave(connection, keys: Keys, prefix: str, job_id: str = "j1", table: str = "aaaa") -> int:
    from dailyq.scripts import scripts_for

    info = json.dumps({"run_id": "r1", "day": SCRIPT_DAY, "task": "nt", "param_json": '"n1"', "func": "m.f"})
    return scripts_for(connection).leave(
        left_key=keys.left, left_info_key=keys.left_info, intermediate_queue_key=f"{prefix}:intermediate",
        runs_key=keys.day_runs(date.fromisoformat(SCRIPT_DAY)), job_id=job_id, info_json=info, table=table,
        node="old", why="no task 'nt'", first_wait_ms=1000, longest_wait_ms=4000, retention_s=600).run()


def _record(connection, keys: Keys, run_id: str = "r1") -> dict:
    return json.loads(connection.hget(keys.day_runs(date.fromisoformat(SCRIPT_DAY)), run_id))


def test_leave_parks_the_job_off_the_intermediate_queue_with_a_doubling_wait(connection, prefix):
    keys = Keys(prefix)
    connection.rpush(f"{prefix}:intermediate", "j1")
    connection.hset(keys.day_runs(date.fromisoformat(SCRIPT_DAY)), "r1",
                    json.dumps(new_record("nt", '"n1"', "slot", "j1")))
    assert [_leave(connection, keys, prefix) for _ in range(4)] == [1000, 2000, 4000, 4000]
    assert connection.llen(f"{prefix}:intermediate") == 0
    assert connection.zscore(keys.left, "j1") is not None
    info = json.loads(connection.hget(keys.left_info, "j1"))
    assert info["count"] == 4 and info["tables"] == ["aaaa"] and info["reason"] == "no task 'nt'"
    _leave(connection, keys, prefix, table="bbbb")
    assert json.loads(connection.hget(keys.left_info, "j1"))["tables"] == ["aaaa", "bbbb"]
    record = _record(connection, keys)
    assert record["state"] == "queued" and "left by node old (its table: no task 'nt')" in record["error"]


def test_return_left_moves_due_runnable_jobs_to_the_front_and_keeps_the_others(connection, prefix):
    from dailyq.scripts import scripts_for

    keys = Keys(prefix)
    now_ms = int(time.time() * 1000)  # the test's Redis runs on this host's clock
    connection.zadd(keys.left, {"due-runnable": now_ms - 5000, "due-kept": now_ms - 5000,
                                "later-runnable": now_ms + 60_000})
    connection.rpush(f"{prefix}:q", "other")
    next_ms, moved = scripts_for(connection).return_left(
        left_key=keys.left, queue_key=f"{prefix}:q", runnable=["due-runnable", "later-runnable"], kept=["due-kept"],
        keep_ms=10_000).run()
    assert moved == ["due-runnable"]
    assert connection.lrange(f"{prefix}:q", 0, -1) == [b"due-runnable", b"other"]
    kept_until = connection.zscore(keys.left, "due-kept")
    assert kept_until is not None and kept_until > now_ms + 5000  # waits once more: nothing would run it
    assert next_ms is not None and next_ms >= now_ms


def test_remove_left_removes_a_run_still_waiting_for_the_job_and_forgets_others(connection, prefix):
    from dailyq.scripts import scripts_for

    keys = Keys(prefix)
    day = date.fromisoformat(SCRIPT_DAY)
    runs = keys.day_runs(day)
    connection.hset(runs, "r1", json.dumps(new_record("nt", '"n1"', "slot", "j1")))
    connection.hset(runs, "r2", json.dumps(new_record("nt", '"n2"', "slot", "j2-r1")))  # a later job is the one
    for job_id in ("j1", "j2"):
        connection.zadd(keys.left, {job_id: 1})
        connection.hset(keys.left_info, job_id, "{}")

    def remove(job_id: str, run_id: str, really: bool = True) -> str:
        return scripts_for(connection).remove_left(
            left_key=keys.left, left_info_key=keys.left_info, runs_key=runs, finished_key=keys.day_finished(day),
            deps_key=keys.day_deps(day), job_id=job_id, run_id=run_id, now_iso="2026-11-26T10:00:00+00:00",
            why="removed: because",
            retention_s=600, remove=really).run()

    assert remove("j2", "r2") == "forgotten"
    assert _record(connection, keys, "r2")["state"] == "queued"
    assert remove("j1", "r1") == "removed"
    record = _record(connection, keys, "r1")
    assert record["state"] == "removed" and record["error"] == "removed: because" and record["ended_at"]
    assert connection.sismember(keys.day_finished(day), "r1")
    assert connection.zcard(keys.left) == 0 and connection.hlen(keys.left_info) == 0
    assert remove("j1", "r1") == "forgotten"  # once only: it no longer waits for the job

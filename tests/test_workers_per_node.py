"""Several workers per node: ``worker_entry.py --concurrency N`` (one supervisor, N forked
workers) and N separate worker processes, counted per node by ``health`` and ``status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from dailyq.ops.health import judge
from dailyq.ops.render import render_nodes
from tests.support.helpers import ROOT, executions, quiet_sample_at, run_cli, wait_for

DAY = "2026-11-26"


def worker_pids(connection, settings, node: str) -> set[int]:
    """The pids in the node's worker set (members are ``host:pid``)."""
    members = connection.zrange(settings.keys.node_workers(node), 0, -1)
    return {int(member.decode().rsplit(":", 1)[1]) for member in members}


def health_code(env, *args: str) -> int:
    return run_cli(["health", "--role", "worker", *args], env).returncode


def workers_in_status(env) -> dict[str, int]:
    result = run_cli(["status", "--date", DAY, "--json"], env)
    assert result.returncode == 0, result.stderr
    return {p["node"]: p["workers"] for p in json.loads(result.stdout)["nodes"] if p["role"] == "worker"}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_health_and_status_count_each_nodes_workers(node_env, processes, connection, settings):
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_AT=quiet_sample_at())
    pool_env, pair_env = dict(env, NODE_NAME="node-pool"), dict(env, NODE_NAME="node-pair")
    pool = processes.start("worker_entry.py", pool_env, "--concurrency", "3")
    for _ in range(2):
        processes.start("worker_entry.py", pair_env)

    wait_for(lambda: len(worker_pids(connection, settings, "node-pool")) == 3
             and len(worker_pids(connection, settings, "node-pair")) == 2, timeout=30, what="5 workers to beat")
    children = worker_pids(connection, settings, "node-pool")
    assert pool.pid not in children  # the supervisor runs no worker itself

    ok = run_cli(["health", "--role", "worker", "--min-workers", "3"], pool_env)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: worker of node-pool alive"), ok.stdout
    assert "; 3 workers alive" in ok.stdout and ok.stdout.count("\n") == 1, ok.stdout
    assert health_code(pair_env, "--min-workers", "2") == 0
    short = run_cli(["health", "--min-workers", "3"], pair_env)  # no scheduler either: both named
    assert short.returncode == 1
    assert "2 of at least 3 workers alive on node-pair (--min-workers)" in short.stdout, short.stdout
    assert workers_in_status(pool_env) == {"node-pool": 3, "node-pair": 2}
    text = run_cli(["status", "--date", DAY], pool_env).stdout.splitlines()
    assert "workers per node: node-pair 2, node-pool 3" in text, text[-3:]

    # A child killed outright: the supervisor removes it from the count and starts another.
    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in worker_pids(connection, settings, "node-pool")
             and len(worker_pids(connection, settings, "node-pool")) == 3, timeout=20, what="a replacement worker")
    replaced = worker_pids(connection, settings, "node-pool")
    assert len(replaced - children) == 1 and pool.poll() is None
    assert "killed by SIGKILL; starting another" in processes.log_of(pool)

    # SIGTERM to the supervisor alone: it forwards a warm stop to every child and waits for them.
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(timeout=20) == 0
    wait_for(lambda: not any(alive(pid) for pid in replaced), timeout=10, what="the children to end")
    # Each child left the count as it stopped, not when its beat expires.
    assert worker_pids(connection, settings, "node-pool") == set()
    assert health_code(pool_env, "--min-workers", "1") == 1
    assert workers_in_status(pool_env) == {"node-pool": 0, "node-pair": 2}
    assert "cold shut down" not in processes.log_of(pool)


def test_three_runs_at_once_on_a_node_with_concurrency_3(node_env, connection, settings):
    env = dict(node_env, NODE_NAME="node-c3", SAMPLE_ONLY="1", SAMPLE_PARAMS="6", SAMPLE_SLEEP_S="2")
    trigger = run_cli(["trigger", "--date", DAY, "--task", "sample"], env)
    assert "enqueued 6 runs" in trigger.stdout, trigger.stdout + trigger.stderr

    worker = subprocess.run([sys.executable, "worker_entry.py", "--burst", "--concurrency", "3"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=40)
    assert worker.returncode == 0, worker.stderr[-2000:]

    runs = json.loads(run_cli(["status", "--date", DAY, "--json"], env).stdout)["runs"]
    assert len(runs) == 6 and {r["state"] for r in runs} == {"finished"}, (runs, worker.stderr[-8000:])
    assert {r["node"] for r in runs} == {"node-c3"}
    spans = [(datetime.fromisoformat(r["started_at"]), datetime.fromisoformat(r["ended_at"])) for r in runs]
    most_at_once = max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans)
    assert most_at_once == 3, spans
    # Burst children stopped cleanly: none is counted any more.
    assert worker_pids(connection, settings, "node-c3") == set()


def test_a_stop_sent_to_the_whole_group_still_lets_runs_finish(node_env, processes, connection, settings):
    # honcho and `kill -- -PGID` signal the supervisor and its children at once; the
    # supervisor forwards the signal too, and RQ takes the second one within a second
    # as the same request, not as a cold stop (which would kill the runs).
    env = dict(node_env, NODE_NAME="node-g", SAMPLE_ONLY="1", SAMPLE_PARAMS="2", SAMPLE_SLEEP_S="3")
    assert "enqueued 2 runs" in run_cli(["trigger", "--date", DAY, "--task", "sample"], env).stdout
    pool = processes.start("worker_entry.py", env, "--concurrency", "2")
    wait_for(lambda: sum(e["event"] == "start" for e in executions(connection, settings.prefix)) == 2,
             timeout=20, what="both runs to start")

    os.killpg(pool.pid, signal.SIGTERM)
    assert pool.wait(timeout=20) == 0
    runs = json.loads(run_cli(["status", "--date", DAY, "--json"], env).stdout)["runs"]
    assert [r["state"] for r in runs] == ["finished", "finished"], runs
    assert [r["attempts"] for r in runs] == [1, 1]
    assert "cold shut down" not in processes.log_of(pool)
    assert worker_pids(connection, settings, "node-g") == set()


def test_bad_concurrency_is_one_line_exit_2(node_env):
    for value in ("0", "-2", "three"):
        result = subprocess.run([sys.executable, "worker_entry.py", "--concurrency", value], cwd=ROOT, env=node_env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (value, result.stderr)
        assert result.stderr.count("\n") == 1 and "--concurrency" in result.stderr, result.stderr
    bad = run_cli(["health", "--role", "scheduler", "--min-workers", "2"], node_env)
    assert bad.returncode == 2 and "--min-workers" in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


# -- pure: the verdict and the text ------------------------------------------------------

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=timezone.utc)


def beat(seconds_ago: float) -> str:
    return json.dumps({"at": (NOW - timedelta(seconds=seconds_ago)).isoformat(), "pid": 7, "offset_s": 0.0})


def test_the_verdict_counts_workers_and_holds_them_to_min_workers():
    beats = {"worker": beat(3)}
    assert judge("n", beats, NOW).line == "ok: worker of n alive, Redis answers (last heartbeat 3s ago; " \
                                          "clock offset from Redis +0.0s)"  # no count read: as before
    assert judge("n", beats, NOW, workers=1).line.endswith("+0.0s); 1 worker alive")
    assert judge("n", beats, NOW, workers=3, min_workers=3).line.endswith("; 3 workers alive")
    short = judge("n", beats, NOW, workers=2, min_workers=3)
    assert not short.healthy and short.line == "unhealthy: 2 of at least 3 workers alive on n (--min-workers)"
    # Without --min-workers a live heartbeat key is enough, as with one worker per node.
    assert judge("n", beats, NOW, workers=0).healthy


def test_status_text_gives_workers_per_node_before_the_clock_offsets():
    nodes = [{"node": "a", "role": "scheduler", "offset_s": 0.0, "workers": None},
             {"node": "a", "role": "worker", "offset_s": 0.0, "workers": 3},
             {"node": "b", "role": "worker", "offset_s": None, "workers": 2}]
    lines = render_nodes({"nodes": nodes, "clock_warnings": []})
    assert lines[0] == "workers per node: a 3, b 2"
    assert lines[1].startswith("clock offsets from Redis")
    # A status dict from before the count (no "workers") renders as it did.
    assert render_nodes({"nodes": [{"node": "a", "role": "worker", "offset_s": 0.0}]})[0].startswith("clock offsets")


def test_the_template_unit_is_the_one_the_docs_point_to():
    unit = (ROOT / "deploy" / "dailyq-worker@.service").read_text()
    assert "ExecStart=/opt/dailyq/.venv/bin/python -u worker_entry.py" in unit
    assert "KillMode=mixed" in unit  # SIGTERM to the worker, never to its work-horse
    for doc in ("README.md", "docs/deploy.md"):
        text = (ROOT / doc).read_text()
        assert "deploy/dailyq-worker@.service" in text and "--concurrency" in text, doc

"""``scheduler.py health``: the decision with fixed times, then real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
from datetime import datetime, timedelta, timezone

from rq.defaults import DEFAULT_WORKER_TTL

from dailyq.beats import beat_value
from dailyq.ops.health import Beat, judge, parse_beat, roles_of
from tests.support.helpers import quiet_sample_at, run_cli, wait_for

NOW = datetime(2026, 11, 27, 9, 0, 0, tzinfo=timezone.utc)


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def worker_beat(seconds: float, pid: int = 4242) -> bytes:
    return json.dumps({"at": ago(seconds), "pid": pid}).encode()


# -- the decision ----------------------------------------------------------------------

def test_both_beating_is_healthy_with_one_ok_line():
    verdict = judge("node-1", {"scheduler": ago(1).encode(), "worker": worker_beat(40)}, NOW)
    assert verdict.healthy and verdict.exit_code == 0
    assert verdict.line.startswith("ok: scheduler and worker of node-1 alive, Redis answers")
    assert "\n" not in verdict.line


def test_a_missing_worker_heartbeat_is_unhealthy_and_named():
    verdict = judge("node-1", {"scheduler": ago(1), "worker": None}, NOW)
    assert not verdict.healthy and verdict.exit_code == 1
    assert verdict.line.startswith("unhealthy: no worker heartbeat from node-1")
    assert "scheduler" not in verdict.line


def test_max_age_makes_an_old_beat_stale_and_says_how_old():
    beats = {"scheduler": ago(1), "worker": worker_beat(42)}
    assert judge("node-1", beats, NOW).healthy  # present key, no limit asked: alive
    verdict = judge("node-1", beats, NOW, max_age_s=5)
    assert verdict.exit_code == 1
    assert verdict.line == "unhealthy: no worker heartbeat from node-1 for 42s (--max-age-s 5)"
    assert judge("node-1", beats, NOW, max_age_s=42).healthy  # at the limit is still fresh


def test_every_problem_is_on_the_one_line():
    verdict = judge("node-2", {"scheduler": None, "worker": worker_beat(600)}, NOW, max_age_s=480)
    assert verdict.line == ("unhealthy: no scheduler heartbeat from node-2 (none within its TTL, or it never "
                            "started); no worker heartbeat from node-2 for 600s (--max-age-s 480)")


def test_one_role_only():
    verdict = judge("node-1", {"worker": worker_beat(3)}, NOW, max_age_s=10)
    assert verdict.healthy
    assert verdict.line.startswith("ok: worker of node-1 alive")
    assert roles_of("both") == ("scheduler", "worker")
    assert roles_of("worker") == ("worker",)


def test_a_beat_from_slightly_in_the_future_is_fresh():
    assert judge("node-1", {"scheduler": (NOW + timedelta(seconds=2)).isoformat()}, NOW, max_age_s=1).healthy


def test_an_unreadable_beat_is_unhealthy():
    verdict = judge("node-1", {"scheduler": b"yesterday", "worker": b'{"pid": 1}'}, NOW)
    assert not verdict.healthy
    assert "unreadable scheduler heartbeat" in verdict.line and "unreadable worker heartbeat" in verdict.line


def test_every_heartbeat_form_parses():
    assert parse_beat(ago(3).encode()) == Beat(NOW - timedelta(seconds=3))  # a scheduler of an earlier version
    assert parse_beat(worker_beat(3, pid=7)) == Beat(NOW - timedelta(seconds=3), 7)  # a worker of one
    assert parse_beat(beat_value(NOW, 7, 90.01234)) == Beat(NOW, 7, 90.012)
    assert parse_beat(beat_value(NOW, 7, None)) == Beat(NOW, 7, None)
    assert parse_beat(None) is None


def beat(seconds: float, offset_s: float | None) -> str:
    return beat_value(NOW - timedelta(seconds=seconds), 4242, offset_s)


def test_the_ok_line_shows_each_clock_offset_from_redis():
    verdict = judge("node-1", {"scheduler": beat(1, 0.004), "worker": beat(40, -0.3)}, NOW)
    assert verdict.line == ("ok: scheduler and worker of node-1 alive, Redis answers (last heartbeats 1s and 40s ago; "
                            "clock offsets from Redis +0.0s and -0.3s)")
    old_worker = judge("node-1", {"scheduler": beat(1, 0.004), "worker": worker_beat(40)}, NOW)
    assert old_worker.line.endswith("(last heartbeats 1s and 40s ago; clock offsets from Redis +0.0s and unknown)")


def test_a_clock_more_than_2s_off_warns_on_the_line_but_stays_healthy():
    verdict = judge("node-1", {"scheduler": beat(1, 90.0), "worker": beat(40, -2.5)}, NOW)
    assert verdict.healthy and verdict.exit_code == 0
    assert "\n" not in verdict.line
    assert verdict.line == (
        "ok: scheduler and worker of node-1 alive, Redis answers (last heartbeats 1s and 40s ago; clock offsets "
        "from Redis +90.0s and -2.5s); warning: scheduler clock of node-1 is 90.0s ahead of Redis's (more than 2s); "
        "fix the node's time sync (NTP); warning: worker clock of node-1 is 2.5s behind Redis's (more than 2s); "
        "fix the node's time sync (NTP)")
    assert judge("node-1", {"scheduler": beat(1, 2.0)}, NOW).line.endswith("offset from Redis +2.0s)")  # 2 s is fine
    stale = judge("node-1", {"scheduler": beat(60, 90.0)}, NOW, max_age_s=10)
    assert not stale.healthy
    assert stale.line.startswith("unhealthy: no scheduler heartbeat from node-1 for 60s (--max-age-s 10); "
                                 "warning: scheduler clock of node-1 is 90.0s ahead")


# -- real processes ----------------------------------------------------------------------

def health(env: dict[str, str], *args: str):
    result = run_cli(["health", *args], env)
    assert result.stdout.count("\n") == 1, (result.stdout, result.stderr)  # exactly one line
    return result


def test_health_of_live_processes_then_of_a_killed_worker(node_env, processes, connection, settings):
    # The one sample task's slot is 12 h away: the scheduler fires nothing, the worker stays idle.
    env = dict(node_env, NODE_NAME="node-h", SAMPLE_ONLY="1", SAMPLE_AT=quiet_sample_at())
    processes.start("scheduler.py", env)
    worker = processes.start("worker_entry.py", env)

    wait_for(lambda: run_cli(["health"], env).returncode == 0, timeout=60, what="both heartbeats")
    alive = health(env)
    assert alive.stdout.startswith("ok: scheduler and worker of node-h alive, Redis answers"), alive.stdout

    # The worker's key names the worker process and outlives RQ's idle wait between
    # beats (BLMOVE for worker_ttl - 15 s), so an idle healthy worker stays present.
    key = settings.keys.heartbeat("worker", "node-h")
    assert json.loads(connection.get(key))["pid"] == worker.pid
    assert connection.ttl(key) > DEFAULT_WORKER_TTL - 15

    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    # A small --max-age-s stands in for waiting out the key's TTL.
    wait_for(lambda: run_cli(["health", "--role", "worker", "--max-age-s", "2"], env).returncode == 1, timeout=30,
             what="the dead worker's heartbeat to go stale")
    dead = health(env, "--role", "worker", "--max-age-s", "2")
    assert dead.returncode == 1
    assert dead.stdout.startswith("unhealthy: no worker heartbeat from node-h for "), dead.stdout
    # A probe per process: the scheduler, beating every 5 s, is still fine.
    wait_for(lambda: run_cli(["health", "--role", "scheduler", "--max-age-s", "8"], env).returncode == 0,
             timeout=30, what="the scheduler's probe to pass")


def test_a_node_that_never_started_is_unhealthy(node_env):
    result = health(dict(node_env, NODE_NAME="node-never"))
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy: no scheduler heartbeat from node-never"), result.stdout
    assert "no worker heartbeat from node-never" in result.stdout


def test_redis_unreachable_is_exit_1_with_one_line(node_env):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = health(dict(node_env, NODE_NAME="node-h", REDIS_URL=f"redis://127.0.0.1:{port}/0"))
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy: cannot reach Redis at redis://127.0.0.1:"), result.stdout
    assert result.stderr == ""


def test_bad_health_arguments_are_one_line_errors(node_env):
    for args in (["--max-age-s", "soon"], ["--max-age-s", "0"], ["--role", "leader"]):
        result = run_cli(["health", *args], node_env)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr

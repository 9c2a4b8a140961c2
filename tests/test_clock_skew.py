"""A node whose clock is off: real scheduler processes under libfaketime, a real
redis-server and the real clock everywhere else. Slots fire by Redis's clock, and
status and health show each process's offset, warning above 2 s."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timedelta

import pytest

from dailyq.clock import server_now
from dailyq.keys import Keys
from tests.support.helpers import faketime_library, quiet_sample_at, run_cli, wait_for, with_clock_off

# The slot is this far ahead of Redis's clock when the scheduler starts: room for the
# process to start (about 1 s here) before it.
SLOT_AHEAD_S = 6
# The test sees the fan-out, then reads Redis's TIME: what it measures is at or after
# the fire. The scheduler knows Redis's time to within half a round trip (its TIME
# reading's midpoint), so a fire right at the slot may land a hair before it; 50 ms
# allows for that and nothing more. (The bug this guards against fired 39 s early.)
MEASURE_SLACK_S = 0.05


@pytest.fixture
def libfaketime() -> str:
    library = faketime_library()
    if library is None:
        if os.environ.get("CI"):
            pytest.fail("libfaketime is not installed; .ci/run installs it (apt-get install faketime)")
        pytest.skip("libfaketime is not installed (apt-get install -y faketime) - needed to start a node "
                    "whose clock is off")
    return library


def first_seen(connection, predicate, until: datetime) -> datetime:
    """Redis's time just after ``predicate()`` first held, polling every 20 ms; fails
    once Redis's clock passes ``until``."""
    while True:
        if predicate():
            return server_now(connection)
        now = server_now(connection)
        assert now < until, f"not seen by {until.isoformat()} (Redis's clock)"
        time.sleep(0.02)


@pytest.mark.parametrize("offset_s", [90, -90], ids=["node-90s-fast", "node-90s-slow"])
def test_a_scheduler_whose_clock_is_off_fires_the_slot_within_1s_of_redis_time(
        offset_s, libfaketime, node_env, processes, connection, prefix):
    keys = Keys(prefix)
    slot = (server_now(connection) + timedelta(seconds=SLOT_AHEAD_S)).replace(microsecond=0)
    env = dict(node_env, NODE_NAME="node-skewed", SAMPLE_ONLY="1", SAMPLE_AT=slot.strftime("%H:%M:%S"),
               SAMPLE_TZ="UTC", SAMPLE_PARAMS="3")
    scheduler = processes.start("scheduler.py", with_clock_off(env, offset_s, libfaketime))

    beat_key = keys.heartbeat("scheduler", "node-skewed")
    wait_for(lambda: connection.exists(beat_key), timeout=SLOT_AHEAD_S, what="the scheduler's first heartbeat")
    assert server_now(connection) < slot, "the scheduler started after its slot: cannot tell early from on time"
    # libfaketime took: the scheduler's host clock is off by offset_s, as the scheduler measures it.
    assert abs(json.loads(connection.get(beat_key))["offset_s"] - offset_s) < 1

    fired_seen = first_seen(connection, lambda: connection.scard(keys.day_enqueued(slot.date())) == 3,
                            until=slot + timedelta(seconds=5))
    late_s = (fired_seen - slot).total_seconds()
    assert -MEASURE_SLACK_S <= late_s <= 1.0, f"fired {late_s:+.3f}s from its slot by Redis's clock"

    # The fan-out's log line follows its transaction: wait for it rather than race it.
    wait_for(lambda: "fanned out sample slot" in processes.log_of(scheduler), timeout=10,
             what="the scheduler's fan-out log line")
    log = processes.log_of(scheduler)
    way = "ahead of" if offset_s > 0 else "behind"
    warned = re.findall(rf"the clock of node node-skewed is (?:89|90)\.\ds {way} Redis's \(more than 2s\)", log)
    assert len(warned) == 1, log


def test_status_and_health_show_each_process_offset_and_warn_above_2s(libfaketime, node_env, processes):
    env = dict(node_env, NODE_NAME="node-fast", SAMPLE_ONLY="1", SAMPLE_AT=quiet_sample_at())
    scheduler = processes.start("scheduler.py", with_clock_off(env, 90, libfaketime))
    processes.start("worker_entry.py", env)  # the same node's worker keeps the right time
    wait_for(lambda: run_cli(["health"], env).returncode == 0, timeout=30, what="both heartbeats")

    health = run_cli(["health"], env)
    assert health.returncode == 0, health.stdout  # an offset warns; it does not make the node unhealthy
    assert health.stdout.count("\n") == 1
    offsets = re.search(r"clock offsets from Redis ([+-]\d+\.\d)s and ([+-]\d+\.\d)s\)", health.stdout)
    assert offsets, health.stdout
    assert abs(float(offsets[1]) - 90) < 1 and abs(float(offsets[2])) < 1
    assert re.search(r"; warning: scheduler clock of node-fast is (89|90)\.\ds ahead of Redis's \(more than 2s\)",
                     health.stdout), health.stdout
    assert "worker clock" not in health.stdout

    result = run_cli(["status", "--json"], env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert {"date", "leader", "runs"} <= set(status)  # the old keys are all there
    by_role = {p["role"]: p for p in status["nodes"] if p["node"] == "node-fast"}
    assert set(by_role) == {"scheduler", "worker"}
    assert abs(by_role["scheduler"]["offset_s"] - 90) < 1 and by_role["scheduler"]["clock_off"] is True
    assert abs(by_role["worker"]["offset_s"]) < 1 and by_role["worker"]["clock_off"] is False
    assert by_role["scheduler"]["pid"] == scheduler.pid
    (warning,) = status["clock_warnings"]
    assert warning.startswith("scheduler clock of node-fast is ") and "ahead of Redis's" in warning

    text = run_cli(["status"], env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert re.fullmatch(r"clock offsets from Redis \(warned beyond 2s\): node-fast scheduler \+(89|90)\.\ds, "
                        r"node-fast worker [+-]0\.\ds", lines[-2]), lines[-2:]
    assert lines[-1].startswith("warning: scheduler clock of node-fast is "), lines[-1]

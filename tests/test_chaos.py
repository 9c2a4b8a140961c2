"""A short version of bench/chaos.py: real kills of workers and leaders, nodes cut off
from Redis, frozen workers, one Redis restart and Redis out of memory once."""

import pytest

from bench.chaos import run_chaos


@pytest.mark.slow
def test_short_chaos_run_loses_nothing_and_never_runs_two_copies(tmp_path):
    report = run_chaos(runs=18, sleep_s=1.5, seed=11, kill_every_s=2.0, timeout_s=240, log_dir=tmp_path)
    print("\n".join(report.lines()))
    # Every kind of fault happened, and a run killed mid-way ran again.
    assert report.redis_restarts == 1 and report.cuts >= 1 and report.freezes >= 1
    assert report.leader_kills >= 1 and report.midrun_kills >= 1 and report.reexecutions >= 1
    assert report.memory_fulls == 1 and report.exits_while_full == 0
    assert report.lost == 0
    assert report.finished == 18
    assert report.longest_overlap_s["cut"] == 0.0 and report.longest_overlap_s["other"] == 0.0
    assert report.longest_overlap_s["freeze"] <= 2.0

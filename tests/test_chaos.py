"""A short version of bench/chaos.py: real kills of workers, leaders and Redis."""

from bench.chaos import run_chaos


def test_short_chaos_run_loses_nothing_and_never_runs_two_copies(tmp_path):
    report = run_chaos(runs=24, sleep_s=0.5, seed=11, kill_every_s=2.5, timeout_s=240, log_dir=tmp_path)
    print("\n".join(report.lines()))
    assert report.worker_kills + report.leader_kills > 0 and report.redis_restarts <= 1
    assert report.lost == 0
    assert report.finished == 24
    assert report.concurrent_duplicates == 0

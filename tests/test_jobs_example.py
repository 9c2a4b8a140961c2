"""The shipped example table: a backfill computes the day it was asked for."""

import subprocess
import sys
from datetime import date

from rq.job import Job
from rq.serializers import JSONSerializer

from dailyq.keys import Keys
from tests.support.helpers import ROOT, base_env, run_cli


def test_a_backfill_of_the_example_task_works_on_its_own_day(redis_server, prefix, connection):
    env = base_env(redis_server.url, prefix, DAILYQ_TASKS="jobs", DAILYQ_EXAMPLE_SLEEP_S="0", NODE_NAME="node-a")
    assert run_cli(["trigger", "--date", "2026-11-20", "--task", "daily_report"], env).returncode == 0
    worker = subprocess.run([sys.executable, "worker_entry.py", "--burst"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr
    job_ids = [k.decode() for k in connection.hkeys(Keys(prefix).day_runs(date(2026, 11, 20)))]
    assert len(job_ids) == 4
    results = [Job.fetch(job_id, connection=connection, serializer=JSONSerializer).return_value()
               for job_id in job_ids]
    assert sorted(results) == [f"任务参数{i} for 2026-11-20 done on node-a" for i in range(1, 5)]

"""A naive approach, as the baseline: every node walks the task list and takes each task whose per-task
``SET NX`` lock it wins. Its bug is fixed (``sismember`` returns 0/1 with redis-py
5+, so ``is False`` never matched and nothing ran); otherwise it is as written,
including deleting the finished set at start. Each node runs ``start()`` once.

    python -m bench.naive_task_manager   (REDIS_URL, DAILYQ_PREFIX, BENCH_DURATIONS)
"""

import json
import os

from redis import Redis

from bench.bench_tasks import work


def start() -> None:
    r = Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    prefix = os.environ.get("DAILYQ_PREFIX", "naive")
    task_list = [{"i": i, "s": s} for i, s in enumerate(json.loads(os.environ["BENCH_DURATIONS"]))]
    finished_key = f"{prefix}:task:finished"
    task_keys = [f"{prefix}:task: {i}" for i in range(len(task_list))]
    task_map = dict(zip(task_keys, task_list))
    expire = 60 * 60 * 23
    r.delete(finished_key)
    for key in task_keys:
        status = r.set(key, 1, ex=expire, nx=True)
        is_finished = r.sismember(finished_key, key)
        if status and not is_finished:  # the fix: truthiness, not `is True` / `is False`
            work(task_map[key])
            r.sadd(finished_key, key)
            r.delete(key)


if __name__ == "__main__":
    start()

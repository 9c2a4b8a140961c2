"""``status --json`` of a big day, as a user runs it (issue 20: <= 2 s at 100,000 runs).

A private redis-server; a one-task table of N int params whose N runs of DAY_ONE are
fanned out with ``dailyq.commands.trigger`` (recorded queued), as bench/run.py's
growth case does. Then ``scheduler.py status --json --date DAY_ONE > file`` of each
checkout (this one, and with ``--baseline ROOT`` another with its own ``.venv``, e.g.
/work/main), alternated, ``--repeats`` each: the process's CPU seconds (user + system,
RUSAGE_CHILDREN) and wall seconds, medians.

``--mixed``: some records are changed first (finished with a duration, running,
failed, one of a task no longer in the table), so the comparison covers more than
queued runs. ``--finished``: every record finished first (a day's status once it ran).
``--worker``: a live worker's heartbeat (one process) and a learned
duration for every run's series, so the ETA simulates the day instead of stopping at
"no live worker".

Then each checkout's output with the clock fixed (``api.server_now`` patched to one
moment), compared as JSON text minus ``redis.used_memory`` (Redis's own memory,
which moves between calls): the outputs must be the same. ``--profile``: cProfile of
this checkout's command in-process (top functions by own time, to stderr; PROFILE_SORT=cumulative
and PROFILE_N=40 change the order and the count).

    .venv/bin/python -m bench.status_day [--n 100000] [--repeats 3] [--baseline /work/main] [--mixed] [--worker]
        [--finished]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis import Redis  # noqa: E402

from bench.run import DAY_ONE, ROOT, env_for  # noqa: E402
from dailyq.beats import beat_value, register_node, register_worker  # noqa: E402
from dailyq.clock import server_now  # noqa: E402
from dailyq.commands import trigger  # noqa: E402
from dailyq.keys import Keys  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.rq_seam import make_queue  # noqa: E402
from dailyq.runs import runs_on  # noqa: E402
from dailyq.table import Task, TaskTable  # noqa: E402

PREFIX = "statusday"
TASKS = """from dailyq.table import Task
import os
TASKS = [Task(name="plain", func="bench.noop.noop", params=list(range(int(os.environ["BENCH_STATUS_N"]))),
              at="03:00", retries=0)]
"""
# The command with Redis's clock fixed, so two checkouts' outputs can be compared whole.
FIXED_NOW = """import sys
from datetime import datetime
import dailyq.api
from dailyq.cli import main
at = datetime.fromisoformat(sys.argv[1])
dailyq.api.server_now = lambda connection: at
sys.exit(main(sys.argv[2:]))
"""
PROFILED = """import cProfile, os, pstats, sys
from dailyq.cli import main
profile = cProfile.Profile()
profile.enable()
main(sys.argv[1:])
profile.disable()
stats = pstats.Stats(profile, stream=sys.stderr).sort_stats(os.environ.get("PROFILE_SORT", "tottime"))
stats.print_stats(int(os.environ.get("PROFILE_N", "25")))
"""


def python_of(root: Path) -> str:
    own = root / ".venv" / "bin" / "python"
    return str(own) if own.exists() else sys.executable


def make_day(connection: Redis, keys: Keys, table: TaskTable, mixed: bool, worker: bool,
             finished: bool = False) -> None:
    trigger(connection, keys, make_queue(connection, keys), table, DAY_ONE, None, 7 * 86400)
    runs = runs_on(table, DAY_ONE)
    if finished:
        for start in range(0, len(runs), 10_000):
            done = {}
            for index, run in enumerate(runs[start:start + 10_000], start):
                record = run.new_record(job_id=run.run_id)
                record.update(state="finished", node=f"n{index % 3}", started_at="2026-01-05T03:00:01+00:00",
                              ended_at="2026-01-05T03:00:03+00:00", attempts=1, duration_s=1.5 + index % 97 / 100)
                done[run.run_id] = json.dumps(record)
            connection.hset(keys.day_runs(DAY_ONE), mapping=done)  # type: ignore[arg-type]
    if mixed:
        changed: dict[str, str] = {}
        for index, run in enumerate(runs[:5000]):
            record = run.new_record(job_id=run.run_id)
            if index % 5 == 0:
                record.update(state="finished", node="n1", started_at="2026-01-05T03:00:01+00:00",
                              ended_at="2026-01-05T03:00:03+00:00", attempts=1, duration_s=1.5 + index / 1000)
            elif index % 5 == 1:
                record.update(state="failed", node="n1", started_at="2026-01-05T03:00:01+00:00",
                              ended_at="2026-01-05T03:00:02+00:00", attempts=3, error="ValueError: no")
            elif index % 50 == 2:
                record.update(state="running", node="n1", started_at="2026-01-05T03:00:04+00:00", attempts=1)
            else:
                continue
            changed[run.run_id] = json.dumps(record)
        old = runs[0].new_record(job_id=None, state="finished")
        old.update(task="renamed", duration_s=2.0)
        changed["renamed-20260105T030000-0123456789ab"] = json.dumps(old)
        connection.hset(keys.day_runs(DAY_ONE), mapping=changed)  # type: ignore[arg-type]
    if worker:
        now = server_now(connection)
        with connection.pipeline(transaction=False) as pipe:
            pipe.set(keys.heartbeat("worker", "n1"), beat_value(now, 4242, 0.0), ex=3600)
            register_node(pipe, keys, "n1", now)
            register_worker(pipe, keys, "n1", "bench:4242", now, 3600)
            pipe.execute()
        durations = {run.series_id: 0.5 + (index % 7) / 10 for index, run in enumerate(runs)}
        items = list(durations.items())
        for start in range(0, len(items), 10_000):
            connection.hset(keys.durations, mapping=dict(items[start:start + 10_000]))


def timed(python: str, root: Path, env: dict[str, str], out: Path) -> tuple[float, float]:
    """CPU and wall seconds of one ``status --json`` of ``root``'s code, printed to ``out``."""
    cpu_before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with out.open("w") as sink:
        subprocess.run([python, str(root / "scheduler.py"), "status", "--json", "--date", DAY_ONE.isoformat()],
                       cwd=root, env=env, check=True, timeout=600, stdout=sink)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, wall


def comparable(text: str) -> str:
    status = json.loads(text)
    for name in ("used_memory",):
        status["redis"].pop(name, None)
    return json.dumps(status, ensure_ascii=False, separators=(",", ":"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout (with its own .venv) to time and compare")
    parser.add_argument("--mixed", action="store_true", help="finished, failed, running and stale records too")
    parser.add_argument("--worker", action="store_true", help="a live worker and learned durations (the ETA runs)")
    parser.add_argument("--finished", action="store_true", help="every run finished (the day after it ran)")
    parser.add_argument("--profile", action="store_true", help="cProfile of this checkout's command, to stderr")
    args = parser.parse_args()
    roots = {"this": ROOT}
    if args.baseline:
        roots = {"baseline": args.baseline.resolve(), **roots}
    work = Path(tempfile.mkdtemp(prefix="status-day-"))
    (work / "bench_status_tasks.py").write_text(TASKS)
    (work / "fixed_now.py").write_text(FIXED_NOW)
    (work / "profiled.py").write_text(PROFILED)
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        keys = Keys(PREFIX)
        table = TaskTable([Task(name="plain", func="bench.noop.noop", params=list(range(args.n)), at="03:00",
                                retries=0)])
        make_day(connection, keys, table, args.mixed, args.worker, args.finished)
        envs = {name: env_for(server, PREFIX, BENCH_STATUS_N=str(args.n), DAILYQ_TASKS="bench_status_tasks",
                              DAILYQ_TZ="UTC", PYTHONPATH=f"{root}{os.pathsep}{work}", NODE_NAME="n0")
                for name, root in roots.items()}
        cpu: dict[str, list[float]] = {name: [] for name in roots}
        wall: dict[str, list[float]] = {name: [] for name in roots}
        for _ in range(args.repeats):
            for name, root in roots.items():
                seconds = timed(python_of(root), root, envs[name], work / f"{name}.json")
                cpu[name].append(seconds[0])
                wall[name].append(seconds[1])
        results: dict = {"n": args.n, "mixed": args.mixed, "worker": args.worker, "finished": args.finished,
                         "load_average": [round(x, 2) for x in os.getloadavg()]}
        for name in roots:
            results[name] = {"cpu_s": [round(x, 2) for x in cpu[name]], "wall_s": [round(x, 2) for x in wall[name]],
                             "cpu_median_s": round(statistics.median(cpu[name]), 2),
                             "wall_median_s": round(statistics.median(wall[name]), 2)}
        at = (server_now(connection) + timedelta(seconds=1)).astimezone(timezone.utc)
        outputs = {}
        for name, root in roots.items():
            done = subprocess.run([python_of(root), str(work / "fixed_now.py"), at.isoformat(), "status", "--json",
                                   "--date", DAY_ONE.isoformat()], cwd=root, env=envs[name], check=True,
                                  timeout=600, capture_output=True, text=True)
            outputs[name] = comparable(done.stdout)
        results["output_bytes"] = {name: len(text) for name, text in outputs.items()}
        if args.baseline:
            results["outputs_equal"] = outputs["baseline"] == outputs["this"]
        eta = json.loads(outputs["this"])["eta"]
        results["eta"] = eta
        if args.profile:
            subprocess.run([python_of(ROOT), str(work / "profiled.py"), "status", "--json", "--date",
                            DAY_ONE.isoformat()], cwd=ROOT, env=envs["this"], check=True, timeout=600,
                           stdout=subprocess.DEVNULL)
    print(json.dumps(results, indent=2))
    print(f"generated at {datetime.now(timezone.utc).isoformat(timespec='seconds')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost per run of one burst worker draining N no-op runs, for the checkout it is run in.

For an A/B of two versions of dailyq: run it from the root of each checkout (each with
its own venv), alternating, e.g. ``.venv/bin/python bench/worker_cpu.py 3000 --simple``
(``--simple``: the non-forking worker; without it, the forking one). Prints wall time,
the worker's CPU (rusage of the worker process and its work-horses), Redis's CPU (INFO),
and the Redis commands (INFO stats: those run inside scripts count too) and bytes each
way per run. The fan-out before it is not measured. Also imports from checkouts older
than the commands / rq_seam modules, so that a new version can be set against an old one.

``--side`` picks what drains the queue, for the profile against plain RQ (BENCHMARKS.md):

* ``dailyq`` (default): dailyq's worker, runs fanned out by dailyq;
* ``plain``: ``rq worker`` (``rq.Worker``/``rq.SimpleWorker``) on minimal JSON jobs;
* ``plain_dailyq_jobs``: ``rq worker`` on the jobs dailyq's fan-out makes (meta, description);
* ``adhoc``: dailyq's worker on minimal jobs of a table function (no run identity, so no
  guard: what the worker costs around RQ's job without the run's claim and record).

``--guard RUNG`` (with ``--side dailyq``) cuts the worker's BEGIN and FINISH down to one
rung of bench/guard_ladder.py: what each of the run's guarantees costs.

``--callgrind FILE`` runs the worker under ``valgrind --tool=callgrind`` (instructions
are counted, so the figure holds on a loaded machine; the work-horses of a forking worker
are not counted); ``--profile FILE`` under cProfile, timed by CPU time, not wall time.
Per run, take the difference of two sizes (say 300 and 1): the start-up cancels out.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.getcwd())

from redis import Redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from dailyq.keys import Keys  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.table import Task, TaskTable  # noqa: E402

try:
    from dailyq.commands import trigger
except ImportError:  # before the commands module
    from dailyq.fanout import trigger  # type: ignore[attr-defined,no-redef]
try:
    from dailyq.rq_seam import make_queue
except ImportError:  # before the RQ seam
    from dailyq.worker.workers import make_queue  # type: ignore[no-redef]

try:
    from bench.guard_ladder import RUNGS
    from bench.guard_ladder import RUNNER as GUARD_RUNNER
except ImportError:  # a checkout from before the ladder
    RUNGS, GUARD_RUNNER = ("full",), ""

SIDES = ("dailyq", "plain", "plain_dailyq_jobs", "adhoc")
# Runs the worker's entry point under cProfile with CPU time as its clock (the default,
# wall time, charges each Redis round trip's wait to the function that waits).
CPU_PROFILE = "\n".join([
    "import cProfile, runpy, sys, time",
    "out = sys.argv[1]; sys.argv = sys.argv[2:]",
    "p = cProfile.Profile(time.process_time)",
    "p.enable()",
    "try:",
    "    runpy.run_path(sys.argv[0], run_name='__main__')",
    "except SystemExit:",
    "    pass",
    "finally:",
    "    p.disable(); p.dump_stats(out)"])


def redis_cpu_s(connection: Redis) -> float:
    info = connection.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def children_split() -> tuple[float, float, int]:
    """The children's user and system CPU seconds and minor page faults (a fork's
    copy-on-write shows in the last two)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def enqueue_minimal(connection: Redis, queue_name: str, runs: int) -> None:
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    for lo in range(0, runs, 1000):
        queue.enqueue_many([Queue.prepare_data("bench.noop.noop", args=(i,), job_id=f"noop-{i}")
                            for i in range(lo, min(runs, lo + 1000))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=int)
    parser.add_argument("--simple", action="store_true", help="the non-forking worker")
    parser.add_argument("--side", choices=SIDES, default="dailyq")
    parser.add_argument("--callgrind", metavar="FILE")
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--commands", action="store_true",
                        help="also each Redis command's calls per run (INFO commandstats), most first")
    parser.add_argument("--guard", choices=RUNGS, default="full",
                        help="with --side dailyq: the worker's BEGIN and FINISH cut down to this rung of "
                             "bench/guard_ladder.py (default: the real ones)")
    args = parser.parse_args()
    if args.guard != "full" and (args.side != "dailyq" or args.profile or args.callgrind):
        parser.error("--guard is for --side dailyq, without --profile or --callgrind")
    runs = args.runs
    rq_cli = str(Path(sys.executable).with_name("rq"))
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        keys = Keys("p")
        table = TaskTable([Task(name="noop", func="bench.noop.noop", params=list(range(runs)), at="03:00", retries=0)])
        env = dict(os.environ, REDIS_URL=server.url, DAILYQ_PREFIX="p", DAILYQ_TASKS="bench.bench_tasks",
                   BENCH_NOOP=str(runs), NODE_NAME="n1", PYTHONPATH=os.getcwd())
        worker = ["worker_entry.py", "--burst"] + (["--simple"] if args.simple else [])
        if args.side == "dailyq":
            trigger(connection, keys, make_queue(connection, keys), table, date(2026, 1, 5), None, 7 * 86400)
        elif args.side == "adhoc":
            enqueue_minimal(connection, keys.queue_name, runs)
        else:
            if args.side == "plain":
                enqueue_minimal(connection, "plain", runs)
            else:
                from bench.run import enqueue_dailyq_jobs_with_plain_rq

                enqueue_dailyq_jobs_with_plain_rq(connection, "plain", table.tasks[0], date(2026, 1, 5))
            worker = [rq_cli, "worker", "--burst", "-w", "rq.SimpleWorker" if args.simple else "rq.Worker",
                      "-S", "rq.serializers.JSONSerializer", "plain"]
        command = [sys.executable, *(["-c", CPU_PROFILE, args.profile] if args.profile else []), *worker]
        if args.guard != "full":
            command = [sys.executable, "-c", GUARD_RUNNER, args.guard, *worker]
        if args.callgrind:
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={args.callgrind}", *command]
        connection.config_resetstat()
        split_before, redis_before, started = children_split(), redis_cpu_s(connection), time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall_s = time.perf_counter() - started
        split = [after - before for after, before in zip(children_split(), split_before)]
        worker_s, redis_s = split[0] + split[1], redis_cpu_s(connection) - redis_before
        stats = connection.info("stats")
        command_stats = connection.info("commandstats")
    per_run = {"wall": wall_s, "worker cpu": worker_s, "redis cpu": redis_s}
    shown = ", ".join(f"{name} {seconds / runs * 1000:.3f} ms/run" for name, seconds in per_run.items())
    counts = (f"{stats['total_commands_processed'] / runs:.1f} commands, {stats['total_net_input_bytes'] / runs:.0f} B "
              f"in, {stats['total_net_output_bytes'] / runs:.0f} B out per run")
    counts += (f"; worker user {split[0] / runs * 1000:.3f} / system {split[1] / runs * 1000:.3f} ms/run, "
               f"{split[2] / runs:.0f} minor faults/run")
    kind = "non-forking" if args.simple else "forking"
    side = args.side if args.guard == "full" else f"{args.side}[{args.guard}]"
    print(f"{os.path.basename(os.getcwd())} {side} {kind}: {shown}; {counts}")
    if args.commands:
        calls = sorted(((int(v["calls"]), name.removeprefix("cmdstat_")) for name, v in command_stats.items()),
                       reverse=True)
        print("  " + ", ".join(f"{name} {count / runs:.2f}" for count, name in calls))
        usec = sorted(((float(v["usec"]), name.removeprefix("cmdstat_")) for name, v in command_stats.items()),
                      reverse=True)
        print("  Redis µs per run: " + ", ".join(f"{name} {spent / runs:.1f}" for spent, name in usec[:12]))


if __name__ == "__main__":
    main()

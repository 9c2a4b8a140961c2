"""dailyq benchmarks. Every figure is printed next to a baseline measured in the same
run (plain RQ, the naive SET NX script, the lower bound) or the issue's goal.

    python bench/run.py                      # all twelve
    python bench/run.py --only makespan,idle # some
    python bench/run.py --quick              # smaller sizes, for a smoke run

Each benchmark starts its own redis-server and its own node processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis import Redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from dailyq.commands import trigger  # noqa: E402
from dailyq.keys import Keys  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from dailyq.table import Task, TaskTable  # noqa: E402
from dailyq.worker.workers import make_queue  # noqa: E402
from tests.helpers import ProcessGroup  # noqa: E402

PY = sys.executable
RQ = str(Path(PY).with_name("rq"))
LOG_DIR = Path(os.environ.get("DAILYQ_BENCH_LOG_DIR", "/tmp/dailyq-bench"))
DAY_ONE, DAY_TWO = date(2026, 1, 5), date(2026, 1, 6)
# Another checkout whose worker the overhead case also measures, in the same rounds.
BASELINE_ROOT = Path(os.environ["DAILYQ_BENCH_BASELINE_ROOT"]).resolve() if os.environ.get(
    "DAILYQ_BENCH_BASELINE_ROOT") else None


def env_for(server: PrivateRedis, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAILYQ_", "BENCH_")) and k != "REDIS_URL"}
    env.update(REDIS_URL=server.url, DAILYQ_PREFIX=prefix, DAILYQ_TASKS="bench.bench_tasks", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT), **bytecode_env())
    env.update(extra)
    return env


def bytecode_env() -> dict[str, str]:
    """Node processes read compiled bytecode, as they would from an installed package.
    With PYTHONDONTWRITEBYTECODE set (as on shared development machines), a checkout's
    modules are compiled afresh by every process while RQ's, installed with their .pyc,
    are not: each dailyq worker start paid ~0.1 s of CPU that plain RQ's did not. The
    bytecode goes under LOG_DIR, never into the checkout (PYTHONPYCACHEPREFIX); since a
    prefix applies to every module, RQ's are compiled there too (``warm_bytecode``)."""
    return {"PYTHONPYCACHEPREFIX": str(LOG_DIR / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}


def warm_bytecode(root: Path = ROOT) -> None:
    """Compile what the worker sides import, before any timed pass."""
    env = dict(os.environ, **bytecode_env(), PYTHONPATH=str(root))
    subprocess.run([PY, "-c", "import dailyq.cli, dailyq.worker.supervisor, bench.bench_tasks, rq.cli, rq.worker"],
                   cwd=root, env=env, check=True, timeout=300)


def run(args: list[str], env: dict[str, str], timeout: float = 900, cwd: Path = ROOT) -> None:
    subprocess.run(args, cwd=cwd, env=env, check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def run_parallel(commands: list[list[str]], env_of: Callable[[int], dict[str, str]], timeout: float = 900) -> None:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen(c, cwd=ROOT, env=env_of(i), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i, c in enumerate(commands)]
    for p in procs:
        p.wait(timeout=timeout)


def events(connection: Redis, prefix: str) -> list[dict]:
    return [json.loads(e) for e in connection.lrange(f"{prefix}:bench:events", 0, -1)]


def span(evts: list[dict]) -> float:
    return max(e["t"] for e in evts if e["event"] == "end") - min(e["t"] for e in evts if e["event"] == "start")


# -- 1. makespan ---------------------------------------------------------------------

def uneven_durations(n: int, seed: int) -> list[float]:
    """Mostly short runs with a few long ones at random places (fixed seed)."""
    rng = random.Random(seed)
    durations = [round(rng.uniform(0.2, 0.9), 2) for _ in range(n)]
    for index in rng.sample(range(n), max(3, n // 6)):
        durations[index] = round(rng.uniform(2.0, 4.0), 2)
    return durations


def bench_makespan(quick: bool) -> dict:
    durations = uneven_durations(30 if quick else 36, seed=42)
    workers = 3
    lower_bound = max(sum(durations) / workers, max(durations))
    bench_env = {"BENCH_DURATIONS": json.dumps(durations)}
    results = {}

    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, "naive", **bench_env)
        run_parallel([[PY, "-m", "bench.naive_task_manager"]] * workers, lambda i: dict(env, NODE_NAME=f"n{i}"))
        results["naive SET NX script (fixed), in-process"] = span(events(connection, "naive"))

        # The same worker kind on both sides, so what differs is the order of the queue.
        for kind, rq_class, flags in (("forking", "rq.Worker", []), ("non-forking", "rq.SimpleWorker", ["--simple"])):
            prefix = f"plain-{kind}"
            env = env_for(server, prefix, **bench_env)
            queue = Queue(prefix, connection=connection, serializer=JSONSerializer)
            queue.enqueue_many([Queue.prepare_data("bench.bench_tasks.work", args=({"i": i, "s": s},), timeout=600)
                                for i, s in enumerate(durations)])
            run_parallel([[RQ, "worker", "--burst", "-w", rq_class, "-S", "rq.serializers.JSONSerializer", prefix]]
                         * workers, lambda i, env=env: dict(env, NODE_NAME=f"n{i}"))
            results[f"plain RQ FIFO, {kind}"] = span(events(connection, prefix))

            # One deployment (prefix) for both days, so day two uses day one's durations.
            prefix = f"dailyq-{kind}"
            env = env_for(server, prefix, **bench_env)
            for day, label in ((DAY_ONE, "first day (nothing learned)"), (DAY_TWO, "after one learning day")):
                run([PY, "scheduler.py", "trigger", "--date", day.isoformat()], env)
                run_parallel([[PY, "worker_entry.py", "--burst", *flags]] * workers,
                             lambda i, env=env: dict(env, NODE_NAME=f"n{i}"))
                results[f"dailyq {label}, {kind}"] = span(events(connection, prefix))
                connection.delete(f"{prefix}:bench:events")
    return {"runs": len(durations), "total_work_s": round(sum(durations), 2), "workers": workers,
            "lower_bound_s": round(lower_bound, 2), "goal_ratio_dailyq_learned": 1.05,
            "makespan_s": {k: round(v, 2) for k, v in results.items()},
            "ratio_to_lower_bound": {k: round(v / lower_bound, 3) for k, v in results.items()}}


# -- 1b. makespan of a day with a dependency chain and a limited task ------------------

def workflow_lower_bound(flow: dict, workers: int) -> dict[str, float]:
    """No schedule can beat any of these: every run's work spread over all workers; the
    chain (report starts after the longest ingest run ends); the limited task's work
    spread over its K slots (and its longest run)."""
    total = sum(sum(flow[name]) for name in ("ingest", "report", "heavy", "light"))
    return {"work / workers": total / workers,
            "critical path ingest -> report": max(flow["ingest"]) + max(flow["report"]),
            "heavy work / max_running": max(sum(flow["heavy"]) / flow["heavy_max_running"], max(flow["heavy"]))}


def workflow_flow(quick: bool) -> dict:
    """The workflow day's run durations (seconds), the same in every case that uses it."""
    rng = random.Random(7)
    scale = 0.5 if quick else 1.0
    return {"ingest": [round(rng.uniform(1.0, 3.0) * scale, 2) for _ in range(8)],
            "report": [round(rng.uniform(0.5, 1.5) * scale, 2) for _ in range(4)],
            "heavy": [round(rng.uniform(1.5, 2.5) * scale, 2) for _ in range(8)],
            "light": [round(rng.uniform(0.3, 1.0) * scale, 2) for _ in range(12)],
            "heavy_max_running": 2}


def start_nodes(group: ProcessGroup, env: dict[str, str], nodes: int, per_node: int) -> None:
    """``nodes`` nodes as deployed: a scheduler and a ``per_node``-worker supervisor each."""
    for i in range(nodes):
        node_env = dict(env, NODE_NAME=f"n{i}")
        group.start("scheduler.py", node_env, log_dir=LOG_DIR)
        group.start("worker_entry.py", node_env, "--concurrency", str(per_node), log_dir=LOG_DIR)


def bench_workflow(quick: bool) -> dict:
    """A day of four tasks on 3 nodes x 2 workers: ingest (uneven), report after ingest,
    heavy limited to max_running=2, light. Nodes run a scheduler and a 2-worker supervisor
    each, as deployed; each day is triggered and timed from its first start to its last
    end: a first day (no durations known) and the next (durations learned)."""
    flow = workflow_flow(quick)
    nodes, per_node = 3, 2
    bounds = workflow_lower_bound(flow, nodes * per_node)
    lower_bound = max(bounds.values())
    runs = sum(len(flow[n]) for n in ("ingest", "report", "heavy", "light"))
    days: dict[str, dict] = {}
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        prefix = "workflow"
        env = env_for(server, prefix, BENCH_WORKFLOW=json.dumps(flow))
        group = ProcessGroup()
        try:
            start_nodes(group, env, nodes, per_node)
            for day, label in ((DAY_ONE, "first day (nothing learned)"), (DAY_TWO, "after one learning day")):
                connection.delete(f"{prefix}:bench:events")
                run([PY, "scheduler.py", "trigger", "--date", day.isoformat()], env)
                deadline = time.monotonic() + 300
                while len([e for e in events(connection, prefix) if e["event"] == "end"]) < runs:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"workflow {day} did not finish within 300 s")
                    time.sleep(0.2)
                days[label] = workflow_day(events(connection, prefix), lower_bound)
        finally:
            group.stop_all()
    return {"runs": runs, "workers": nodes * per_node, "flow": flow,
            "lower_bounds_s": {k: round(v, 2) for k, v in bounds.items()}, "lower_bound_s": round(lower_bound, 2),
            "goal_ratio": 1.10, "days": days}


def workflow_day(evts: list[dict], lower_bound: float) -> dict:
    started = {json.dumps(e["param"], sort_keys=True): e["t"] for e in evts if e["event"] == "start"}
    ended = {json.dumps(e["param"], sort_keys=True): e["t"] for e in evts if e["event"] == "end"}
    last_ingest_end = max(t for k, t in ended.items() if '"ingest"' in k)
    first_report_start = min(t for k, t in started.items() if '"report"' in k)
    heavy = sorted((started[k], ended[k]) for k in started if '"heavy"' in k)
    makespan = span(evts)
    return {"makespan_s": round(makespan, 2), "ratio_to_lower_bound": round(makespan / lower_bound, 3),
            "report started after the last ingest ended": first_report_start >= last_ingest_end,
            "release delay s (last ingest end -> first report start)": round(first_report_start - last_ingest_end, 3),
            "most heavy runs at once": max(sum(1 for s, e in heavy if s <= moment < e) for moment, _ in heavy)}


# -- 1c. the ETA's error on a learned day ---------------------------------------------

def status_json(env: dict[str, str], day: date) -> tuple[dict, float]:
    """``status --json`` of ``day``, and when it was read (its second-precision
    ``generated_at`` narrowed by the time around the call)."""
    before = time.time()
    done = subprocess.run([PY, "scheduler.py", "status", "--date", day.isoformat(), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True, timeout=120)
    after = time.time()
    status = json.loads(done.stdout)
    generated = datetime.fromisoformat(status["generated_at"]).timestamp()
    return status, (max(before, generated) + min(after, generated + 1)) / 2


def bench_eta(quick: bool) -> dict:
    """The workflow case's day (uneven ingest, report after ingest, heavy limited to 2,
    light) on 3 nodes x 2 workers: day one teaches the durations; on day two the ETA of
    ``status --json`` is read early (after 3 runs ended) and at mid-day, and compared with
    when the last run really ended, relative to the time left then. The baseline, read
    from the same snapshot: the old ``status --watch`` estimate (expected work left /
    workers, watch.eta_seconds)."""
    from dailyq.ops.watch import eta_seconds, parse_durations

    flow = workflow_flow(quick)
    nodes, per_node = 3, 2
    runs = sum(len(flow[n]) for n in ("ingest", "report", "heavy", "light"))
    readings: dict[str, dict] = {}
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        prefix = "eta"
        env = env_for(server, prefix, BENCH_WORKFLOW=json.dumps(flow))
        group = ProcessGroup()
        try:
            start_nodes(group, env, nodes, per_node)
            taken: list[tuple[str, dict, float]] = []
            for day in (DAY_ONE, DAY_TWO):
                connection.delete(f"{prefix}:bench:events")
                run([PY, "scheduler.py", "trigger", "--date", day.isoformat()], env)
                deadline = time.monotonic() + 300
                marks = {"early (3 runs ended)": 3, "mid-day (half the runs ended)": runs // 2}
                while True:
                    ended = len([e for e in events(connection, prefix) if e["event"] == "end"])
                    for label, count in list(marks.items()):
                        if day == DAY_TWO and ended >= count:
                            status, at = status_json(env, day)
                            taken.append((label, status, at))
                            del marks[label]
                    if ended >= runs:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"eta day {day} did not finish within 300 s")
                    time.sleep(0.1)
            evts = events(connection, prefix)
            actual_end = max(e["t"] for e in evts if e["event"] == "end")
            durations = parse_durations(connection.hgetall(f"{prefix}:durations"))
            for label, status, at in taken:
                left_s = actual_end - at
                eta = status["eta"] and datetime.fromisoformat(status["eta"]).timestamp()
                naive = eta_seconds(status["runs"], durations, datetime.fromtimestamp(at, timezone.utc),
                                    nodes * per_node)
                readings[label] = {
                    "time_left_s": round(left_s, 2),
                    "eta_error_s": None if not eta else round(eta - actual_end, 2),
                    "eta_error_pct": None if not eta else round(100 * (eta - actual_end) / left_s, 1),
                    "baseline_work_over_workers_error_s": None if naive is None else round(at + naive - actual_end, 2),
                    "baseline_error_pct": None if naive is None else round(100 * (at + naive - actual_end) / left_s, 1)}
            starts = [e["t"] for e in evts if e["event"] == "start"]
            ends = [e["t"] for e in evts if e["event"] == "end"]
            worker_cost = (nodes * per_node * (max(ends) - min(starts)) - (sum(ends) - sum(starts))) / len(starts)
        finally:
            group.stop_all()
    return {"runs": runs, "workers": nodes * per_node, "flow": flow, "goal_error_pct": 20,
            "day_two_makespan_s": round(max(ends) - min(starts), 2),
            "idle_worker_s_per_run (worker cost, waits for upstream and limits, the tail)": round(worker_cost, 3),
            "readings": readings}


# -- 2. per-run overhead -------------------------------------------------------------

def enqueue_dailyq_jobs_with_plain_rq(connection: Redis, queue_name: str, task: Task, day: date) -> int:
    """The jobs dailyq makes for ``task`` on ``day`` (ids, args, meta, description, retry,
    TTLs), enqueued with plain ``enqueue_many`` in chunks of 1,000: a baseline that
    differs from dailyq only by dailyq's own bookkeeping (records, dedup, guard)."""
    from dailyq.fanout import job_data
    from dailyq.runs import runs_of_slot

    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    (slot,) = task.schedule.permits_on(day)
    runs = runs_of_slot(task, slot)
    for lo in range(0, len(runs), 1000):
        with connection.pipeline() as pipe:
            queue.enqueue_many([job_data(queue, run, run.job_id(), 7 * 86400, False, False)
                                for run in runs[lo:lo + 1000]], pipeline=pipe)
            pipe.execute()
    return len(runs)


def overhead_pass(side: str, rq_class: str, dailyq_flags: list[str], n: int) -> dict:
    """One side's pass, in a Redis of its own: enqueue n no-op runs, drain them with one
    burst worker. Returns wall seconds and the CPU seconds of everything involved
    (this process's enqueue, the worker and its work-horses, the Redis server)."""
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, side, BENCH_NOOP=str(n), NODE_NAME="n1")
        redis_cpu = lambda: sum(connection.info("cpu")[f] for f in ("used_cpu_user", "used_cpu_sys"))  # noqa: E731
        cpu_before = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) + redis_cpu()
        started = time.perf_counter()
        table = TaskTable([Task(name="noop", func="bench.noop.noop", params=list(range(n)), at="03:00")])
        if side == "plain":
            queue = Queue("plain", connection=connection, serializer=JSONSerializer)
            for lo in range(0, n, 1000):
                queue.enqueue_many([Queue.prepare_data("bench.noop.noop", args=(i,), job_id=f"noop-{i}")
                                    for i in range(lo, min(n, lo + 1000))])
            run([RQ, "worker", "--burst", "-w", rq_class, "-S", "rq.serializers.JSONSerializer", "plain"], env)
        elif side == "plain_dailyq_jobs":
            enqueue_dailyq_jobs_with_plain_rq(connection, "plain", table.tasks[0], DAY_ONE)
            run([RQ, "worker", "--burst", "-w", rq_class, "-S", "rq.serializers.JSONSerializer", "plain"], env)
        else:
            keys = Keys(side)
            # In-process, like the plain enqueue above: both sides pay one worker start-up.
            trigger(connection, keys, make_queue(connection, keys), table, DAY_ONE, None, 7 * 86400)
            # The baseline side: the worker of another checkout (its fan-out is this one's).
            root = BASELINE_ROOT if side == "dailyq_baseline" and BASELINE_ROOT else ROOT
            run([PY, "worker_entry.py", "--burst", *dailyq_flags], dict(env, PYTHONPATH=str(root)), cwd=root)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) + redis_cpu() - cpu_before
        return {"seconds": seconds, "cpu_seconds": cpu}


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def bench_overhead(quick: bool, repeats: int = 5) -> dict:
    n = 300 if quick else 2000
    # Rounds of passes in alternating order (plain first, then dailyq first, ...), each in
    # a fresh Redis; ratios are taken within a round, then the median over rounds: fork
    # cost on a shared 2-core VM drifts by 2x over minutes, and a round sees one drift.
    # CPU seconds per run (client, worker, work-horses and Redis) are reported as well:
    # they vary less than wall time between passes.
    # A third side, plain RQ running dailyq's own jobs (meta, description, retry, TTLs),
    # splits the difference: RQ's cost of richer jobs, and dailyq's own (guard, records).
    sides: tuple[str, ...] = ("plain", "plain_dailyq_jobs", "dailyq")
    out: dict = {"runs": n, "repeats": repeats}
    warm_bytecode()
    if BASELINE_ROOT:
        # DAILYQ_BENCH_BASELINE_ROOT: a fourth side, the worker of another checkout (say, main
        # in a worktree), so that a change is measured against its base in the same rounds.
        sides += ("dailyq_baseline",)
        warm_bytecode(BASELINE_ROOT)
        out["baseline_root"] = str(BASELINE_ROOT)
    modes = (("forking", "rq.Worker", []), ("non-forking", "rq.SimpleWorker", ["--simple"]))
    for mode, rq_class, dailyq_flags in modes:
        rounds = []
        for i in range(repeats):
            order = sides if i % 2 == 0 else sides[::-1]
            rounds.append({side: overhead_pass(side, rq_class, dailyq_flags, n) for side in order})

        def ratio(over: str, under: str, field: str = "seconds", rounds: list = rounds) -> float:
            return round(statistics.median(r[over][field] / r[under][field] for r in rounds), 3)

        out[mode] = {
            **{f"{side}_runs_per_s": round(n / statistics.median(r[side]["seconds"] for r in rounds), 1)
               for side in sides},
            "throughput_ratio": ratio("plain", "dailyq"),
            "throughput_ratio_each": [round(r["plain"]["seconds"] / r["dailyq"]["seconds"], 3) for r in rounds],
            # plain RQ with dailyq's jobs against plain RQ, and dailyq against that:
            "ratio_richer_jobs": ratio("plain", "plain_dailyq_jobs"),
            "ratio_dailyq_bookkeeping": ratio("plain_dailyq_jobs", "dailyq"),
            **{f"{side}_cpu_ms_per_run": round(1000 * statistics.median(r[side]["cpu_seconds"] for r in rounds) / n, 3)
               for side in sides},
            "cpu_ratio": ratio("plain", "dailyq", "cpu_seconds"),
        }
        if BASELINE_ROOT:
            out[mode].update(baseline_throughput_ratio=ratio("plain", "dailyq_baseline"),
                             baseline_cpu_ratio=ratio("plain", "dailyq_baseline", "cpu_seconds"),
                             dailyq_over_baseline=ratio("dailyq_baseline", "dailyq"))
    out["goal_ratio"] = 0.95  # issue 20, item 4
    return out


# -- 2a. Redis memory per run ---------------------------------------------------------

def kept_bytes(connection: Redis, longer_than_s: int) -> int:
    """MEMORY USAGE summed over the keys that live longer than ``longer_than_s`` (or forever)."""
    total = 0
    for key in connection.scan_iter(count=1000):
        ttl = connection.ttl(key)
        if ttl == -1 or ttl > longer_than_s:
            total += connection.memory_usage(key) or 0
    return total


def memory_pass(side: str, n: int, job_ttl_s: int) -> dict:
    """One side in a Redis of its own: n no-op runs drained by one non-forking burst
    worker. used_memory per run right after the day, and once dailyq's job TTL has passed
    (plain RQ keeps its results for RQ's default 500 s), and the bytes per run in keys that
    live longer than a day."""
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, side, BENCH_NOOP=str(n), NODE_NAME="n1", DAILYQ_JOB_TTL_S=str(job_ttl_s))
        before = int(connection.info("memory")["used_memory"])
        if side.startswith("plain"):
            # plain: RQ's default result TTL (500 s); plain_same_ttl: dailyq's job TTL, so
            # that what Redis itself keeps after keys expire is seen on both sides.
            ttl = {"result_ttl": job_ttl_s} if side == "plain_same_ttl" else {}
            queue = Queue("plain", connection=connection, serializer=JSONSerializer)
            for lo in range(0, n, 1000):
                queue.enqueue_many([Queue.prepare_data("bench.noop.noop", args=(i,), job_id=f"noop-{i}", **ttl)
                                    for i in range(lo, min(n, lo + 1000))])
            run([RQ, "worker", "--burst", "-w", "rq.SimpleWorker", "-S", "rq.serializers.JSONSerializer", "plain"], env)
        else:
            keys = Keys(side)
            table = TaskTable([Task(name="noop", func="bench.noop.noop", params=list(range(n)), at="03:00")])
            trigger(connection, keys, make_queue(connection, keys), table, DAY_ONE, None, 7 * 86400)
            run([PY, "worker_entry.py", "--burst", "--simple"], env)
        per_run = lambda: round((int(connection.info("memory")["used_memory"]) - before) / n)  # noqa: E731
        after_day = per_run()
        time.sleep(job_ttl_s + 2)
        return {"after_day": after_day, "after_job_ttl": per_run(),
                "kept_over_a_day": round(kept_bytes(connection, 86400) / n)}


def bench_memory(quick: bool) -> dict:
    """dailyq's Redis memory per run against plain RQ's for the same no-op jobs (JSON),
    each side in a fresh Redis, in this run. ``--quick`` shortens DAILYQ_JOB_TTL_S to 5 s
    (the default is 60 s) so as not to wait a minute."""
    n = 500 if quick else 3000
    job_ttl_s = 5 if quick else 60
    plain, dailyq = memory_pass("plain", n, job_ttl_s), memory_pass("dailyq", n, job_ttl_s)
    same_ttl = memory_pass("plain_same_ttl", n, job_ttl_s)
    return {"runs": n, "DAILYQ_JOB_TTL_S": job_ttl_s,
            "plain_rq_bytes_per_run": plain, "dailyq_bytes_per_run": dailyq,
            "plain_rq_with_the_job_ttl_bytes_per_run": same_ttl,
            "ratio_after_day": round(dailyq["after_day"] / plain["after_day"], 3),
            "ratio_after_job_ttl": round(dailyq["after_job_ttl"] / max(1, plain["after_job_ttl"]), 3),
            "goal": "after the day at most plain RQ's; at most 1000 bytes per run kept over a day"}


# -- 2b. the cost of DAILYQ_WAIT_REPLICAS --------------------------------------------

class PrimaryWithReplica:
    """A fresh primary and one replica of it, synced (both without persistence, as the
    overhead case's server)."""

    def __enter__(self) -> "PrimaryWithReplica":
        self.server = PrivateRedis(appendonly=False).start()
        self.replica = PrivateRedis(appendonly=False,
                                    extra_args=["--replicaof", "127.0.0.1", str(self.server.port)]).start()
        replica_client = Redis.from_url(self.replica.url, decode_responses=True)
        deadline = time.monotonic() + 30
        while replica_client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync within 30 s")
            time.sleep(0.05)
        self.clients = [Redis.from_url(self.server.url), replica_client]
        return self

    def cpu_seconds(self) -> float:
        return sum(float(c.info("cpu")[f]) for c in self.clients for f in ("used_cpu_user", "used_cpu_sys"))

    def __exit__(self, *_: object) -> None:
        self.replica.cleanup()
        self.server.cleanup()


def wait_replicas_pass(wait_replicas: int, flags: list[str], n: int) -> dict:
    """The overhead case's dailyq side against a primary with one replica: fan out n
    no-op runs, then drain them with one burst worker, DAILYQ_WAIT_REPLICAS set to
    ``wait_replicas`` for both. Seconds of each, and the CPU seconds of the drain (the
    worker, its work-horses, both Redis servers)."""
    with PrimaryWithReplica() as servers:
        connection = Redis.from_url(servers.server.url)
        prefix = f"wait{wait_replicas}"
        keys = Keys(prefix)
        env = env_for(servers.server, prefix, BENCH_NOOP=str(n), NODE_NAME="n1",
                      DAILYQ_WAIT_REPLICAS=str(wait_replicas))
        table = TaskTable([Task(name="noop", func="bench.noop.noop", params=list(range(n)), at="03:00")])
        started = time.perf_counter()
        trigger(connection, keys, make_queue(connection, keys), table, DAY_ONE, None, 7 * 86400,
                wait_replicas=wait_replicas)
        fan_out_s = time.perf_counter() - started
        cpu_before = cpu_seconds(resource.RUSAGE_CHILDREN) + servers.cpu_seconds()
        started = time.perf_counter()
        run([PY, "worker_entry.py", "--burst", *flags], env)
        drain_s = time.perf_counter() - started
        cpu = cpu_seconds(resource.RUSAGE_CHILDREN) + servers.cpu_seconds() - cpu_before
        finished = connection.scard(keys.day_finished(DAY_ONE))
        if finished != n:
            raise RuntimeError(f"DAILYQ_WAIT_REPLICAS={wait_replicas}: {finished} of {n} runs finished")
        return {"fan_out_s": fan_out_s, "drain_s": drain_s, "cpu_s": cpu}


def guard_latency_pass(wait_replicas: int, n: int) -> float:
    """Seconds per run of the guard alone, in this process (no RQ, no fork): BEGIN, the
    call of a no-op, FINISH, one after the other, against a primary with one replica.
    The wall-clock difference between the two settings is what WAIT adds to each run's
    latency, without the noise of forks and worker start-up."""
    from dailyq.runs import RunJob, runs_on
    from dailyq.worker.guard import Guard

    with PrimaryWithReplica() as servers:
        connection = Redis.from_url(servers.server.url)
        guard = Guard(connection, Keys(f"guard{wait_replicas}"), "bench", claim_ttl_s=30, retention_s=86400,
                      wait_replicas=wait_replicas)
        table = TaskTable([Task(name="g", func="bench.noop.noop", params=list(range(n)), at="03:00")])
        jobs = [RunJob(run, run.job_id()) for run in runs_on(table, DAY_ONE)]
        started = time.perf_counter()
        for job in jobs:
            guard.execute(job, lambda: None, will_retry=lambda: False)
        return (time.perf_counter() - started) / n


def bench_wait_replicas(quick: bool, repeats: int = 5) -> dict:
    """DAILYQ_WAIT_REPLICAS=1 against 0, both with a replica: rounds of alternated passes,
    ratios within a round, medians over rounds (as the overhead case). With 1, each run
    adds two round trips that WAIT (after its claim, after its finish; the replica's
    acknowledgement included), each claim renewal of a run longer than a second waits
    too, and each fan-out chunk adds one."""
    n = 300 if quick else 2000
    out: dict = {"runs": n, "repeats": repeats}
    median = statistics.median
    for mode, flags in (("forking", []), ("non-forking", ["--simple"])):
        rounds = []
        for i in range(repeats):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            rounds.append({w: wait_replicas_pass(w, flags, n) for w in order})
        out[mode] = {
            **{f"wait_{w}_runs_per_s": round(n / median(r[w]["drain_s"] for r in rounds), 1) for w in (0, 1)},
            "throughput_ratio_wait_0_over_1": round(median(r[1]["drain_s"] / r[0]["drain_s"] for r in rounds), 3),
            "throughput_ratio_each": [round(r[1]["drain_s"] / r[0]["drain_s"], 3) for r in rounds],
            "wall_ms_per_run_added": round(1000 * median((r[1]["drain_s"] - r[0]["drain_s"]) / n for r in rounds), 3),
            **{f"wait_{w}_cpu_ms_per_run": round(1000 * median(r[w]["cpu_s"] for r in rounds) / n, 3)
               for w in (0, 1)},
            "cpu_ratio_wait_1_over_0": round(median(r[1]["cpu_s"] / r[0]["cpu_s"] for r in rounds), 3),
            **{f"fan_out_wait_{w}_s": round(median(r[w]["fan_out_s"] for r in rounds), 3) for w in (0, 1)},
        }
    latency = []
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        latency.append({w: guard_latency_pass(w, n // 2) for w in order})
    out["guard_alone"] = {
        **{f"wait_{w}_ms_per_run": round(1000 * median(r[w] for r in latency), 3) for w in (0, 1)},
        "ms_per_run_added": round(1000 * median(r[1] - r[0] for r in latency), 3),
        "ratio_wait_1_over_0": round(median(r[1] / r[0] for r in latency), 3),
    }
    return out


# -- 3. fan-out of 100k ------------------------------------------------------------

def fan_out_probe(kind: str, n: int, url: str) -> None:
    """Runs in a child process so that its peak RSS is its own."""
    from dailyq.clock import utc_now
    from dailyq.scheduler import DailyScheduler
    from dailyq.settings import Settings
    from dailyq.table import Task, TaskTable

    connection = Redis.from_url(url)
    slot_at = (utc_now() - timedelta(seconds=30)).strftime("%H:%M:%S")
    params = [f"param-{i}" for i in range(n)]
    table = TaskTable([Task(name="big", func="bench.noop.noop", params=params, at=slot_at)])
    started = time.perf_counter()  # both sides start from a loaded, validated table
    if kind == "plain":
        enqueued = enqueue_dailyq_jobs_with_plain_rq(connection, "plain", table.tasks[0], utc_now().date())
    else:
        settings = Settings(redis_url=url, prefix="dailyq", node_name="bench")
        scheduler = DailyScheduler(connection, settings, table)
        assert scheduler.take_lease()
        enqueued = scheduler.fire_due_slots(utc_now())
    seconds = time.perf_counter() - started
    report = {"seconds": seconds, "enqueued": enqueued,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if kind == "dailyq":  # and how long `status` takes for that day
        from dailyq.ops.status import day_status

        started = time.perf_counter()
        status = day_status(connection, settings.keys, table, utc_now().date(), utc_now())
        report["status_seconds"] = time.perf_counter() - started
        assert len(status["runs"]) == n
    print(json.dumps(report))


def bench_fanout(quick: bool) -> dict:
    n = 10_000 if quick else 100_000
    repeats = 3  # alternated, medians reported: one slow pass on a 2-core machine is noise
    samples: dict[str, list[dict]] = {"plain": [], "dailyq": []}
    for _ in range(repeats):
        for kind in ("plain", "dailyq"):
            with PrivateRedis(appendonly=False) as server:
                connection = Redis.from_url(server.url)
                before = connection.info("memory")["used_memory"]
                result = subprocess.run([PY, str(Path(__file__)), "--fan-out-probe", kind, str(n), server.url],
                                        cwd=ROOT, capture_output=True, text=True, check=True, timeout=1800)
                probe = json.loads(result.stdout.strip().splitlines()[-1])
                assert probe["enqueued"] == n, probe
                probe["redis_bytes_per_run"] = (connection.info("memory")["used_memory"] - before) / n
                samples[kind].append(probe)
    out: dict = {"runs": n, "repeats": repeats}
    for kind, probes in samples.items():
        out[kind] = {field: round(statistics.median(p[field] for p in probes), 2)
                     for field in ("seconds", "peak_rss_mb", "redis_bytes_per_run", "status_seconds")
                     if field in probes[0]}
        out[kind]["seconds_each"] = [round(p["seconds"], 2) for p in probes]
    out["time_ratio_dailyq_over_plain"] = round(out["dailyq"]["seconds"] / out["plain"]["seconds"], 3)
    out["goal_ratio"] = 1.2
    return out


# -- 4. failover -------------------------------------------------------------------

def leader_pid(connection: Redis, prefix: str) -> int | None:
    raw = connection.get(f"{prefix}:leader")
    return json.loads(raw)["pid"] if raw else None


def bench_failover(quick: bool) -> dict:
    trials = 4 if quick else 10
    gaps = []
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, "fo")
        group = ProcessGroup()
        try:
            procs = {}
            for i in range(3):
                p = group.start("scheduler.py", dict(env, NODE_NAME=f"n{i}"), log_dir=LOG_DIR)
                procs[p.pid] = i
            for _ in range(trials):
                deadline = time.monotonic() + 30
                while leader_pid(connection, "fo") not in procs and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(1.5)  # a settled leader, renewing normally
                victim = leader_pid(connection, "fo")
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                while True:
                    current = leader_pid(connection, "fo")
                    if current is not None and current != victim:
                        break
                    time.sleep(0.01)
                gaps.append(time.monotonic() - killed)
                node = procs.pop(victim)
                p = group.start("scheduler.py", dict(env, NODE_NAME=f"n{node}"), log_dir=LOG_DIR)
                procs[p.pid] = node
        finally:
            group.stop_all()
    return {"trials": trials, "p50_s": round(statistics.median(gaps), 2), "max_s": round(max(gaps), 2),
            "goal_max_s": 5.0}


# -- 5. trigger latency ---------------------------------------------------------------

def bench_latency(quick: bool) -> dict:
    count = 5 if quick else 12
    first_slot = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=8)
    slots = [first_slot + timedelta(seconds=3 * i) for i in range(count)]
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, "lat", BENCH_SLOTS=json.dumps([s.strftime("%H:%M:%S") for s in slots]))
        group = ProcessGroup()
        try:
            for i in range(3):
                group.start("scheduler.py", dict(env, NODE_NAME=f"n{i}"), log_dir=LOG_DIR)
                group.start("worker_entry.py", dict(env, NODE_NAME=f"n{i}"), log_dir=LOG_DIR)
            deadline = time.monotonic() + (slots[-1] - datetime.now(timezone.utc)).total_seconds() + 20
            while time.monotonic() < deadline:
                if len([e for e in events(connection, "lat") if e["event"] == "start"]) >= count:
                    break
                time.sleep(0.2)
        finally:
            group.stop_all()
        starts = {e["param"]["i"]: e["t"] for e in events(connection, "lat") if e["event"] == "start"}
    latencies = sorted(starts[i] - slots[i].timestamp() for i in range(count) if i in starts)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    return {"slots": count, "started": len(latencies), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(p95, 3), "max_s": round(latencies[-1], 3), "goal_p95_s": 1.0}


# -- 6. idle cost ------------------------------------------------------------------

def total_calls(connection: Redis) -> tuple[int, dict[str, int]]:
    stats = connection.info("commandstats")
    per = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
    return sum(per.values()), per


def measure_idle(commands: list[tuple[str, list[str]]], env: dict[str, str], connection: Redis,
                 seconds: float) -> tuple[float, dict[str, float]]:
    group = ProcessGroup()
    try:
        for i in range(3):
            for _name, args in commands:
                group.start(args[0], dict(env, NODE_NAME=f"n{i}"), *args[1:], log_dir=LOG_DIR)
        time.sleep(8)  # start-up traffic is not idle traffic
        before, per_before = total_calls(connection)
        time.sleep(seconds)
        after, per_after = total_calls(connection)
    finally:
        group.stop_all()
    rates = {k: round((v - per_before.get(k, 0)) / seconds, 2) for k, v in per_after.items()
             if v - per_before.get(k, 0) > 0}
    # The INFO calls of this measurement itself are not the nodes' traffic.
    return (after - before - 1) / seconds, dict(sorted(rates.items(), key=lambda kv: -kv[1]))


def bench_idle(quick: bool) -> dict:
    seconds = 15 if quick else 30
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, "idle")
        dailyq_rate, dailyq_by_command = measure_idle(
            [("scheduler", ["scheduler.py"]), ("worker", ["worker_entry.py"])], env, connection, seconds)
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, "idle")
        plain_rate, _ = measure_idle([("worker", ["-m", "rq.cli", "worker", "--with-scheduler", "idle"])], env,
                                     connection, seconds)
    return {"seconds": seconds, "dailyq_3_nodes_cmds_per_s": round(dailyq_rate, 2),
            "plain_rq_3_workers_with_scheduler_cmds_per_s": round(plain_rate, 2), "goal_cmds_per_s": 20,
            "dailyq_by_command": dailyq_by_command}


# -- 7. dependencies: cost per run at N and 2N ----------------------------------------

CHAIN_TASKS = """from dailyq.table import Task
import os
N = int(os.environ["BENCH_CHAIN"])
AT = os.environ["BENCH_CHAIN_AT"]
TASKS = [Task(name="up", func="bench.noop.noop", params=list(range(N)), at=AT, retries=0),
         Task(name="down", func="bench.noop.noop", params=list(range(N)), at=AT, retries=0, after=["up"])]
"""

# The same day without the dependency: N runs of one task.
PLAIN_TASKS = """from dailyq.table import Task
import os
N = int(os.environ["BENCH_CHAIN"])
AT = os.environ["BENCH_CHAIN_AT"]
TASKS = [Task(name="plain", func="bench.noop.noop", params=list(range(N)), at=AT, retries=0)]
"""

DAY_TABLES = {"chain": (CHAIN_TASKS, 2), "plain": (PLAIN_TASKS, 1)}  # the table, and runs per N


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live descendants (Linux
    /proc; the scheduler command runs its loop in a child process)."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent pid, CPU seconds)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == current]
    return total


def timed_status_s(root: Path, env: dict[str, str], day: str, repeats: int = 3) -> tuple[float, float]:
    """Median wall seconds of ``scheduler.py status --date day --json`` of the code in
    ``root``, as a user runs it (a fresh interpreter each time), and the median CPU
    seconds of that process (user + system; less sensitive to a loaded machine)."""
    seconds, cpu = [], []
    for _ in range(repeats):
        cpu_before, started = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run([PY, str(root / "scheduler.py"), "status", "--date", day, "--json"], cwd=root, env=env,
                       check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - started)
        cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before)
    return statistics.median(seconds), statistics.median(cpu)


def day_pass(root: Path, n: int, table: str = "chain", workers: int = 3, status: bool = False) -> dict:
    """One day of ``table`` (DAY_TABLES: "chain", task "down" of n runs after "up" of n
    runs; "plain", one task of n runs) on ``workers`` non-forking workers and one
    scheduler (the leader) of the code in ``root``, in a Redis of its own. Counts every
    Redis command (INFO commandstats) and Redis CPU from the trigger until every run
    finished; with ``status``, then times ``status --json`` of the finished day."""
    tasks_text, runs_per_n = DAY_TABLES[table]
    module = f"bench_{table}_tasks"
    modules = LOG_DIR / "day_tables"
    modules.mkdir(parents=True, exist_ok=True)
    (modules / f"{module}.py").write_text(tasks_text)
    # A slot half a day away: the leader fans out nothing of its own meanwhile.
    at = (datetime.now(timezone.utc) + timedelta(hours=12)).strftime("%H:%M")
    day = DAY_ONE.isoformat()
    runs = runs_per_n * n
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        env = env_for(server, "deps", BENCH_CHAIN=str(n), BENCH_CHAIN_AT=at, DAILYQ_TASKS=module,
                      DAILYQ_TZ="UTC", PYTHONPATH=f"{root}{os.pathsep}{modules}")
        # This interpreter, the other tree's scripts: a script's own directory comes first on
        # sys.path, so its dailyq is imported (the installed packages are the same).
        py = PY
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        procs: list[subprocess.Popen] = []

        def start(script: str, node: str, *args: str) -> None:
            log = open(LOG_DIR / f"{table}-{root.name}-{n}-{node}-{script}.log", "w")  # noqa: SIM115 - the child's
            procs.append(subprocess.Popen([py, str(root / script), *args], cwd=root, env=dict(env, NODE_NAME=node),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            start("scheduler.py", "n0")
            for i in range(workers):
                start("worker_entry.py", f"n{i}", "--simple")
            time.sleep(5)  # start-up traffic is not the day's
            redis_cpu = lambda: sum(connection.info("cpu")[f] for f in ("used_cpu_user", "used_cpu_sys"))  # noqa: E731
            calls_before, _ = total_calls(connection)
            procs_before = [process_cpu_s(proc.pid) for proc in procs]
            cpu_before, started = redis_cpu(), time.perf_counter()
            subprocess.run([py, str(root / "scheduler.py"), "trigger", "--date", day], cwd=root,
                           env=dict(env, NODE_NAME="n0"), check=True, timeout=1800,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            finished = Keys("deps").day_finished(DAY_ONE)
            # A generous limit that grows with the day (a loaded 2-core machine drains
            # 100-250 no-op runs a second).
            limit_s = max(1800.0, runs / 20)
            while connection.scard(finished) < runs:
                if time.perf_counter() - started > limit_s:
                    raise RuntimeError(f"{table} day: {connection.scard(finished)} of {runs} runs finished")
                time.sleep(0.2)
            seconds = time.perf_counter() - started
            calls_after, _ = total_calls(connection)
            cpu = redis_cpu() - cpu_before
            procs_cpu = [process_cpu_s(proc.pid) - before for proc, before in zip(procs, procs_before)]
            status_s = timed_status_s(root, dict(env, NODE_NAME="n0"), day) if status else None
        finally:
            for proc in procs:
                os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)
    out = {"runs": runs, "seconds": round(seconds, 1),
           "commands_per_run": round((calls_after - calls_before) / runs, 1),
           "redis_cpu_ms_per_run": round(cpu * 1000 / runs, 3),
           "leader_cpu_ms_per_run": round(procs_cpu[0] * 1000 / runs, 3),
           "workers_cpu_ms_per_run": round(sum(procs_cpu[1:]) * 1000 / runs, 3)}
    if status_s is not None:
        out["status_json_s"], out["status_json_cpu_s"] = (round(x, 2) for x in status_s)
    return out


PER_RUN_FIELDS = ("commands_per_run", "redis_cpu_ms_per_run", "leader_cpu_ms_per_run", "workers_cpu_ms_per_run")


def at_n_and_2n(small: dict, large: dict, n: int) -> dict:
    """Both passes and the ratio 2N/N of each per-run figure."""
    # None: nothing measurable at N (CPU is counted in clock ticks of 10 ms).
    return {f"N={n}": small, f"N={2 * n}": large,
            "ratio_2N_over_N": {field: round(large[field] / small[field], 2) if small[field] else None
                                for field in PER_RUN_FIELDS}}


def bench_deps(quick: bool) -> dict:
    """Issue 20, item 2: a day's cost per run should not grow with the day. The same chain
    day at N and 2N; with DAILYQ_BENCH_BASELINE_ROOT (a checkout of the code to compare
    against, e.g. a worktree of main with its own .venv) that code is measured too, in
    the same run."""
    n = 300 if quick else 1500
    roots = {"this": ROOT}
    if os.environ.get("DAILYQ_BENCH_BASELINE_ROOT"):
        roots["baseline"] = Path(os.environ["DAILYQ_BENCH_BASELINE_ROOT"]).resolve()
    out: dict = {"n": n, "workers": "3 non-forking, 1 scheduler"}
    for name, root in roots.items():
        out[name] = at_n_and_2n(day_pass(root, n), day_pass(root, 2 * n), n)
    return out


# -- 7b. growth: the cost per run of a day at N and 2N, and `status` of a big day ----

def queued_day_status_s(root: Path, n: int) -> tuple[float, float]:
    """``status --json`` (median of 3: wall and CPU seconds) of a day of n runs of one
    task, fanned out here and not run (every run queued), in a Redis of its own."""
    modules = LOG_DIR / "day_tables"
    modules.mkdir(parents=True, exist_ok=True)
    (modules / "bench_plain_tasks.py").write_text(PLAIN_TASKS)
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        keys = Keys("deps")
        table = TaskTable([Task(name="plain", func="bench.noop.noop", params=list(range(n)), at="03:00", retries=0)])
        trigger(connection, keys, make_queue(connection, keys), table, DAY_ONE, None, 7 * 86400)
        env = env_for(server, "deps", BENCH_CHAIN=str(n), BENCH_CHAIN_AT="03:00", DAILYQ_TASKS="bench_plain_tasks",
                      DAILYQ_TZ="UTC", PYTHONPATH=f"{root}{os.pathsep}{modules}", NODE_NAME="n0")
        return timed_status_s(root, env, DAY_ONE.isoformat())


def bench_growth(quick: bool) -> dict:
    """Issue 20, item 3: a day of N plain runs and a day of an ``after`` chain (N runs
    of "down" after N of "up"), each at N and 2N, on 3 non-forking workers and one
    scheduler: Redis commands and CPU per run and the leader's CPU per run, and their
    ratio 2N/N (goal <= 1.2). Then ``status --json`` of the finished chain days (2N and
    4N runs) and of fanned-out days of 50,000 and 100,000 queued runs (goal <= 2 s at
    100,000). DAILYQ_BENCH_BASELINE_ROOT measures another checkout too (as ``deps``),
    which doubles the time."""
    n = 2_000 if quick else 25_000
    roots = {"this": ROOT}
    if os.environ.get("DAILYQ_BENCH_BASELINE_ROOT"):
        roots["baseline"] = Path(os.environ["DAILYQ_BENCH_BASELINE_ROOT"]).resolve()
    out: dict = {"n": n, "workers": "3 non-forking, 1 scheduler", "goal_ratio_2N_over_N": 1.2,
                 "goal_status_json_s_at_100000_runs": 2.0}
    for name, root in roots.items():
        out[name] = {table: at_n_and_2n(day_pass(root, n, table, status=table == "chain"),
                                        day_pass(root, 2 * n, table, status=table == "chain"), n)
                     for table in ("plain", "chain")}
        queued = {size: queued_day_status_s(root, size) for size in (50_000, 100_000)}
        out[name]["status_json_queued_day"] = {
            **{f"{size}_runs_s": round(wall, 2) for size, (wall, _) in queued.items()},
            **{f"{size}_runs_cpu_s": round(cpu, 2) for size, (_, cpu) in queued.items()},
            "ratio_100000_over_50000": round(queued[100_000][0] / queued[50_000][0], 2),
            "cpu_ratio_100000_over_50000": round(queued[100_000][1] / queued[50_000][1], 2),
            "goal_met_at_100000": queued[100_000][0] <= 2.0}
    return out


BENCHMARKS = {"makespan": bench_makespan, "workflow": bench_workflow, "eta": bench_eta, "overhead": bench_overhead,
              "memory": bench_memory,
              "wait_replicas": bench_wait_replicas, "fanout": bench_fanout, "failover": bench_failover,
              "latency": bench_latency, "idle": bench_idle, "deps": bench_deps, "growth": bench_growth}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--fan-out-probe":
        fan_out_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description="dailyq benchmarks")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", dest="json_out", help="also write all results to this file")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of alternated passes for 'overhead' and 'wait_replicas'")
    args = parser.parse_args()
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {platform.node()}: "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}", flush=True)
    results = {}
    for name in args.only.split(","):
        started = time.perf_counter()
        results[name] = (bench_overhead(args.quick, args.repeats) if name == "overhead"
                         else bench_wait_replicas(args.quick, args.repeats) if name == "wait_replicas"
                         else BENCHMARKS[name](args.quick))
        print(f"\n## {name} ({time.perf_counter() - started:.0f}s)\n{json.dumps(results[name], indent=2)}",
              flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

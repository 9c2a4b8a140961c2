"""Which of the run's guarantees costs what, against plain RQ in the same rounds.

Drains a day of N no-op runs per pass (``bench/worker_cpu.py``: one burst worker, a fresh
Redis per pass) with, in turn: plain RQ's worker on minimal jobs (``plain``), dailyq's
worker on minimal jobs, no guard (``adhoc``), and dailyq's runs with BEGIN and FINISH cut
down to each rung of ``bench/guard_ladder.py`` (``claim`` ... ``full``, the real scripts).
The sides run in alternating order per round (this machine's speed drifts within
minutes), each ratio to plain RQ is taken within its round, then the median over rounds;
a rung's cost is the median over rounds of its wall time per run minus the rung's below.

    .venv/bin/python -m bench.guard_cost                      # non-forking, 2,000 runs, 5 rounds
    .venv/bin/python -m bench.guard_cost --forking --runs 800
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.guard_ladder import RUNGS

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("plain", "adhoc", *RUNGS)
# Every worker reads cached bytecode, as an installed dailyq does (this machine sets
# PYTHONDONTWRITEBYTECODE: each pass would compile the checkout afresh, bench/run.py's note).
BYTECODE_CACHED = dict(os.environ, PYTHONDONTWRITEBYTECODE="",
                       PYTHONPYCACHEPREFIX=os.path.join(tempfile.gettempdir(), "dailyq-bench-pycache"))
FIGURES = re.compile(r"wall ([\d.]+) ms/run, worker cpu ([\d.]+) ms/run, redis cpu ([\d.]+) ms/run")


def one_pass(side: str, runs: int, forking: bool) -> tuple[float, float, float]:
    """(wall, worker CPU, Redis CPU) in ms per run."""
    command = [sys.executable, "bench/worker_cpu.py", str(runs), *([] if forking else ["--simple"])]
    command += ["--side", side] if side in ("plain", "adhoc") else ["--guard", side]
    printed = subprocess.run(command, cwd=ROOT, env=BYTECODE_CACHED, check=True, capture_output=True,
                             text=True).stdout
    found = FIGURES.search(printed)
    if found is None:
        raise SystemExit(f"bench/worker_cpu.py printed no figures: {printed!r}")
    wall, worker, redis = (float(value) for value in found.groups())
    return wall, worker, redis


def python_pieces(repeat: int = 20_000) -> dict[str, float]:
    """Microseconds per run of each piece of the guard's Python side, each timed alone in a
    warm loop (a lower bound: in a worker, between RQ's own work, the same code runs with
    cold caches and costs a few times as much; the passes above measure the whole)."""
    import timeit
    from types import SimpleNamespace

    from redis import Redis
    from redis.connection import Connection

    from dailyq.context import RunContext, running_as
    from dailyq.keys import Keys
    from dailyq.runs import Run, RunJob
    from dailyq.schedule import Slot
    from dailyq.scripts.lifecycle import BEGIN, FINISH, parse_begin
    from dailyq.table import Task, TaskTable
    from dailyq.worker.guard import Guard

    connection, keys = Redis(port=1), Keys("p")  # nothing here talks to Redis
    task = Task(name="noop", func="bench.noop.noop", params=list(range(100)), at="03:00", retries=0)
    table = TaskTable([task])
    run = Run(task, 7, Slot.from_iso("2026-01-05T03:00:00+00:00", "UTC")).job("noop-2026-01-05T0300-x")
    job = SimpleNamespace(meta=run.meta(), args=[7], id=run.job_id)
    guard = Guard(connection, keys, "n1", 30, 7 * 86400)
    guard.scripts._flags = True  # as a worker knows it before its first run
    guard.scripts._loaded.update({BEGIN: "a" * 40, FINISH: "b" * 40})
    attempt = guard.attempt(run)
    begin = guard._begin_call(attempt)
    finish = guard._finish_call(attempt, 0.001)
    packer = Connection()
    commands = [("EVALSHA", call.loaded_sha, len(call.keys), *call.keys, *call.args) for call in (begin, finish)]

    def hold_and_release() -> None:
        guard.keeper.hold(run.run_id, begin.keys[1], begin.keys[4], attempt.owner, 30_000, confirmed_at=0.0)
        guard.keeper.release(run.run_id)

    def run_context() -> None:
        context = RunContext(task=task.name, param=7, day=run.day, slot=run.slot.in_zone, run_id=run.run_id,
                             attempt=1, node="n1", fence=1)
        with running_as(context):
            pass

    pieces = {
        "the run's identity rebuilt from the job and checked (RunJob.from_job)": lambda: RunJob.from_job(job, table),
        "the owner token (guard.attempt)": lambda: guard.attempt(run),
        "BEGIN's and FINISH's arguments (guard._begin_call, guard._finish_call)": lambda: (
            guard._begin_call(attempt), guard._finish_call(attempt, 0.001)),
        "redis-py packing them (39 arguments)": lambda: packer.pack_commands(commands),
        "the claim keeper: hold and release": hold_and_release,
        "the run context (current_run)": run_context,
        "reading the replies": lambda: (parse_begin([b"claimed", 1, 1]), finish.parse(1)),
    }
    hold_and_release()  # starts the keeper's threads once, as a worker's first run does
    return {name: min(timeit.repeat(piece, number=repeat, repeat=3)) / repeat * 1e6 for name, piece in pieces.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--forking", action="store_true", help="the forking worker (default: non-forking)")
    parser.add_argument("--python-pieces", action="store_true",
                        help="only time each piece of the guard's Python side in a warm loop")
    args = parser.parse_args()
    if args.python_pieces:
        pieces = python_pieces()
        for name, micros in pieces.items():
            print(f"{micros:7.1f} us  {name}")
        print(f"{sum(pieces.values()):7.1f} us  in all, per run (warm loops: a lower bound)")
        return
    for side in ("plain", "full"):  # fills the bytecode cache; not measured
        one_pass(side, 10, args.forking)
    rounds: list[dict[str, tuple[float, float, float]]] = []
    for number in range(args.rounds):
        order = SIDES if number % 2 == 0 else tuple(reversed(SIDES))
        measured = {side: one_pass(side, args.runs, args.forking) for side in order}
        rounds.append(measured)
        print(f"round {number + 1}: " + ", ".join(f"{side} {measured[side][0]:.3f}" for side in SIDES) + " ms/run",
              flush=True)
    kind = "forking" if args.forking else "non-forking"
    print(f"\n{kind} worker, {args.runs} no-op runs per pass, {args.rounds} rounds (medians)")
    print("| side | wall ms/run | × plain RQ runs/s | worker CPU ms/run | Redis CPU ms/run "
          "| wall ms/run over the side above |")
    print("| --- | --- | --- | --- | --- | --- |")
    for index, side in enumerate(SIDES):
        wall, worker, redis = (statistics.median(r[side][i] for r in rounds) for i in range(3))
        ratio = statistics.median(r["plain"][0] / r[side][0] for r in rounds)
        step = "" if index == 0 else \
            f"{statistics.median(r[side][0] - r[SIDES[index - 1]][0] for r in rounds):+.3f}"
        print(f"| {side} | {wall:.3f} | {ratio:.3f} | {worker:.3f} | {redis:.3f} | {step} |")


if __name__ == "__main__":
    main()

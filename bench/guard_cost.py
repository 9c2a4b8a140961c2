"""Which of the run's guarantees costs what, against plain RQ in the same rounds.

Drains a day of N no-op runs per pass (``bench/worker_cpu.py``: one burst worker, a fresh
Redis per pass) with, in turn: plain RQ's worker on minimal jobs (``plain``), dailyq's
worker on minimal jobs, no guard (``adhoc``), and dailyq's runs with BEGIN and FINISH cut
down to each rung of ``bench/guard_ladder.py`` (``claim`` ... ``full``, the real scripts).
The sides run in alternating order per round (this machine's speed drifts within
minutes), each ratio to plain RQ is taken within its round, then the median over rounds;
a rung's cost is the median over rounds of its wall time per run minus the rung's below.

    .venv/bin/python bench/guard_cost.py                      # non-forking, 2,000 runs, 5 rounds
    .venv/bin/python bench/guard_cost.py --forking --runs 800
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--forking", action="store_true", help="the forking worker (default: non-forking)")
    args = parser.parse_args()
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

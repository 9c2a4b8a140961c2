"""Chaos run: three nodes (scheduler + worker each) work through a day of runs while
workers and the leader are SIGKILLed every few seconds and Redis is restarted once.

    python bench/chaos.py [--runs 120] [--sleep 0.8] [--seed 7] [--kill-every 3]

Prints runs, finished, lost (must be 0), concurrent duplicates (must be 0),
re-executions after a mid-run death, and the longest recovery. A process manager
is simulated: every killed process is started again after a second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis import Redis  # noqa: E402

from dailyq.clock import utc_now  # noqa: E402
from dailyq.redis_server import PrivateRedis  # noqa: E402
from tests.helpers import ProcessGroup, base_env, executions, param_key  # noqa: E402

PREFIX = "chaos"
NODES = ("node-1", "node-2", "node-3")


@dataclass
class ChaosReport:
    runs: int
    finished: int = 0
    lost: int = 0
    concurrent_duplicates: int = 0
    reexecutions: int = 0
    worker_kills: int = 0
    leader_kills: int = 0
    redis_restarts: int = 0
    longest_recovery_s: float = 0.0
    longest_leader_gap_s: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"runs: {self.runs}", f"finished: {self.finished}", f"lost: {self.lost}",
                f"concurrent duplicates: {self.concurrent_duplicates}",
                f"re-executions after a mid-run death: {self.reexecutions}",
                f"kills: {self.worker_kills} workers (with their work-horses), {self.leader_kills} leaders; "
                f"redis restarts: {self.redis_restarts}",
                f"longest recovery (run killed -> restarted elsewhere): {self.longest_recovery_s:.1f}s",
                f"longest time without a leader after a leader kill: {self.longest_leader_gap_s:.1f}s",
                f"wall time: {self.wall_s:.1f}s", *self.notes]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_chaos(runs: int = 120, sleep_s: float = 0.8, seed: int = 7, kill_every_s: float = 3.0,
              restart_redis: bool = True, timeout_s: float = 600.0, log_dir: Path | None = None) -> ChaosReport:
    rng = random.Random(seed)
    log_dir = log_dir or Path("/tmp/dailyq-chaos")
    report = ChaosReport(runs=runs)
    server = PrivateRedis(appendonly=True).start()
    group = ProcessGroup()
    started = time.monotonic()
    try:
        slot = (utc_now().replace(microsecond=0)).timestamp() + 6
        slot_text = time.strftime("%H:%M:%S", time.gmtime(slot))
        day = time.strftime("%Y-%m-%d", time.gmtime(slot))
        env = base_env(server.url, PREFIX, SAMPLE_ONLY="1", SAMPLE_PARAMS=str(runs), SAMPLE_SLEEP_S=str(sleep_s),
                       SAMPLE_AT=slot_text, SAMPLE_TZ="UTC", DAILYQ_LEASE_TTL_S="3", DAILYQ_CLAIM_TTL_S="20")
        connection = Redis.from_url(server.url, socket_timeout=5)
        procs = {}
        for node in NODES:
            for role, script in (("scheduler", "scheduler.py"), ("worker", "worker_entry.py")):
                procs[(node, role)] = group.start(script, dict(env, NODE_NAME=node), log_dir=log_dir)

        runs_key = f"{PREFIX}:day:{day}:runs"
        kill_log: dict[int, float] = {}  # horse pid -> when it was killed
        pending_restarts: list[tuple[float, str, str]] = []
        leader_gaps: list[float] = []
        redis_restarted = not restart_redis
        next_kill = time.monotonic() + 6 + kill_every_s

        def states() -> dict[str, str]:
            return {k.decode(): json.loads(v)["state"] for k, v in connection.hgetall(runs_key).items()}

        while time.monotonic() - started < timeout_s:
            now = time.monotonic()
            for due, node, role in [p for p in pending_restarts if p[0] <= now]:
                pending_restarts.remove((due, node, role))
                script = "scheduler.py" if role == "scheduler" else "worker_entry.py"
                procs[(node, role)] = group.start(script, dict(env, NODE_NAME=node), log_dir=log_dir)
            try:
                current = states()
            except Exception:  # noqa: BLE001 - Redis is down during the restart
                time.sleep(0.5)
                continue
            if len(current) == runs and all(s == "finished" for s in current.values()):
                break
            if now >= next_kill and len(current) == runs:
                next_kill = now + kill_every_s * rng.uniform(0.7, 1.3)
                busy = [k for k, v in current.items() if v == "running"]
                if not redis_restarted and rng.random() < 0.25 and busy:
                    server.kill()
                    time.sleep(rng.uniform(5, 8))
                    server.start()
                    report.redis_restarts += 1
                    redis_restarted = True
                    continue
                leader = connection.get(f"{PREFIX}:leader")
                if leader and rng.random() < 0.3:
                    node = json.loads(leader)["node"]
                    kill(procs[(node, "scheduler")].pid)
                    killed_at = time.monotonic()
                    report.leader_kills += 1
                    pending_restarts.append((killed_at + 1, node, "scheduler"))
                    while time.monotonic() - killed_at < 30:
                        raw = connection.get(f"{PREFIX}:leader")
                        if raw and json.loads(raw).get("pid") != procs[(node, "scheduler")].pid:
                            break
                        time.sleep(0.05)
                    leader_gaps.append(time.monotonic() - killed_at)
                    continue
                node = rng.choice(NODES)
                worker = procs[(node, "worker")]
                horses = children_of(worker.pid)
                kill(worker.pid)
                for horse in horses:
                    kill(horse)
                    kill_log[horse] = time.time()
                report.worker_kills += 1
                pending_restarts.append((time.monotonic() + 1, node, "worker"))
            time.sleep(0.2)

        report.wall_s = time.monotonic() - started
        final = states()
        report.finished = sum(s == "finished" for s in final.values())
        report.lost = runs - report.finished
        events = executions(connection, PREFIX)
        report.concurrent_duplicates, report.reexecutions, report.longest_recovery_s = _analyse(events, kill_log)
        report.longest_leader_gap_s = max(leader_gaps, default=0.0)
    finally:
        group.stop_all()
        for pid in list(kill_log):
            kill(pid)
        server.cleanup()
    return report


def _analyse(events: list[dict], kills: dict[int, float]) -> tuple[int, int, float]:
    """(params with overlapping copies, re-executions, longest kill -> restart gap)."""
    by_param: dict[str, list[dict]] = {}
    for event in events:
        by_param.setdefault(param_key(event["param"]), []).append(event)
    duplicates = reexecutions = 0
    longest = 0.0
    for param_events in by_param.values():
        intervals = []
        for start in (e for e in param_events if e["event"] == "start"):
            end = next((e["t"] for e in param_events if e["event"] == "end" and e["pid"] == start["pid"]
                        and e["t"] >= start["t"]), None)
            end = end if end is not None else kills.get(start["pid"], float("inf"))
            intervals.append((start["t"], end, start["pid"]))
        intervals.sort()
        reexecutions += max(0, len(intervals) - 1)
        if any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:])):
            duplicates += 1
        for earlier, later in zip(intervals, intervals[1:]):
            if earlier[2] in kills:
                longest = max(longest, later[0] - kills[earlier[2]])
    return duplicates, reexecutions, longest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=120)
    parser.add_argument("--sleep", type=float, default=0.8, help="seconds each run works")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    report = run_chaos(args.runs, args.sleep, args.seed, args.kill_every, timeout_s=args.timeout)
    print("\n".join(report.lines()))
    return 0 if report.lost == 0 and report.concurrent_duplicates == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

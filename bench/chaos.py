"""Chaos run: three nodes (scheduler + worker each) work through a day of runs while
workers and the leader are SIGKILLed every few seconds, nodes are cut off from Redis
(each node reaches Redis through its own TCP proxy, which stops forwarding), workers
are frozen (SIGSTOP of the worker and its work-horse, then SIGCONT), Redis is
restarted once, and Redis runs out of memory once (maxmemory with noeviction, held past
the claim TTL while runs execute: every process must stay up, every executing run renew
its claim and record its end, and all go on once memory is raised).

    python bench/chaos.py [--runs 120] [--sleep 0.8] [--seed 7] [--kill-every 3]
    python bench/chaos.py --failover [--wait-replicas 1]   # and one failover that loses writes

Prints runs, finished, lost (must be 0), the longest overlap of two copies of a run
(0 for cut-off nodes and kills; at most 2 s for a frozen worker, which stops within
a moment of resuming), re-executions after a mid-run death, the longest recovery,
and how many of each fault happened. A process manager is simulated: every killed
process is started again after a second. The runs tick into a Redis of their own, which
the proxies do not cut and which neither restarts nor fills up, every 0.1 s, so an
overlap is measured, not inferred.

With ``--failover`` Redis is a primary with a replica (itself replicated once more), and
the last planned fault is a failover that loses writes: the replica stops replicating,
2 s later the primary is SIGKILLed, the replica is promoted and every node's address
moves to it (tests/test_failover.py in small). It also prints how many executions
carried a fence not greater than an earlier execution's of the same run (must be 0),
and overlaps that began around the failover; those must be 0 with
``--wait-replicas 1`` (DAILYQ_WAIT_REPLICAS) and are reported, not failed, without.
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
from tests.support.helpers import ProcessGroup, base_env, children_of, executions, overlaps, param_key  # noqa: E402
from tests.support.tcp_proxy import TcpProxy  # noqa: E402

PREFIX = "chaos"
NODES = ("node-1", "node-2", "node-3")
FAULTS = ("redis", "memory", "cut", "freeze", "leader", "worker")
# How long before the primary is killed the replica stops replicating (--failover).
FAILOVER_LAG_S = 2.0


@dataclass
class ChaosReport:
    runs: int
    finished: int = 0
    lost: int = 0
    longest_overlap_s: dict[str, float] = field(default_factory=lambda: {"cut": 0.0, "freeze": 0.0, "other": 0.0,
                                                                          "failover": 0.0})
    reexecutions: int = 0
    midrun_kills: int = 0
    worker_kills: int = 0
    leader_kills: int = 0
    redis_restarts: int = 0
    cuts: int = 0
    freezes: int = 0
    memory_fulls: int = 0
    memory_full_s: float = 0.0
    exits_while_full: int = 0  # processes that ended while Redis was out of memory (must be 0)
    longest_recovery_s: float = 0.0
    longest_leader_gap_s: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    # --failover: failovers done, the DAILYQ_WAIT_REPLICAS of the nodes, executions whose
    # fence was not greater than an earlier execution's of the same run, runs executed
    # again after the failover.
    failovers: int = 0
    wait_replicas: int = 0
    fences_not_increasing: int = 0
    rerun_after_failover: int = 0

    @property
    def concurrent_duplicates(self) -> int:
        """Overlaps that must never happen (freezes may overlap for at most 2 s; around a
        failover that lost writes, only without DAILYQ_WAIT_REPLICAS)."""
        return (int(self.longest_overlap_s["cut"] > 0) + int(self.longest_overlap_s["other"] > 0)
                + int(self.wait_replicas > 0 and self.longest_overlap_s["failover"] > 0))

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.concurrent_duplicates == 0 and self.longest_overlap_s["freeze"] <= 2.0
                and self.fences_not_increasing == 0 and self.exits_while_full == 0)

    def lines(self) -> list[str]:
        overlap = self.longest_overlap_s
        return [f"runs: {self.runs}", f"finished: {self.finished}", f"lost: {self.lost}",
                f"longest overlap of two copies: {max(overlap.values()):.2f}s (cut-off nodes {overlap['cut']:.2f}s, "
                f"frozen workers {overlap['freeze']:.2f}s, kills and the rest {overlap['other']:.2f}s)",
                f"re-executions after a mid-run death or stop: {self.reexecutions}",
                f"kills: {self.worker_kills} workers (with their work-horses; {self.midrun_kills} mid-run), "
                f"{self.leader_kills} leaders; cuts: {self.cuts}; freezes: {self.freezes}; "
                f"redis restarts: {self.redis_restarts}; memory full: {self.memory_fulls} "
                f"({self.memory_full_s:.1f}s; processes that exited meanwhile: {self.exits_while_full})",
                f"longest recovery (run killed -> restarted elsewhere): {self.longest_recovery_s:.1f}s",
                f"longest time without a leader after a leader kill: {self.longest_leader_gap_s:.1f}s",
                *([f"failovers losing {FAILOVER_LAG_S:g}s of writes: {self.failovers} "
                   f"(DAILYQ_WAIT_REPLICAS={self.wait_replicas}); overlaps around them "
                   f"{overlap['failover']:.2f}s; runs executed again after them: {self.rerun_after_failover}"]
                  if self.failovers else []),
                f"executions whose fence was not greater than an earlier one's of the run: "
                f"{self.fences_not_increasing}",
                f"wall time: {self.wall_s:.1f}s", *self.notes]


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def fill_memory(connection: Redis, hold_s: float) -> None:
    """Redis out of memory for ``hold_s``: maxmemory set to what it uses, then a little
    more written past it (a script flagged allow-oom may), as a day's results would; then
    maxmemory off again (raised) and the filler gone."""
    connection.config_set("maxmemory", int(connection.info("memory")["used_memory"]))
    connection.eval("#!lua flags=allow-oom\nredis.call('SET', KEYS[1], string.rep('x', 262144))", 1,
                    f"{PREFIX}:chaos:filler")
    time.sleep(hold_s)
    connection.config_set("maxmemory", 0)
    connection.delete(f"{PREFIX}:chaos:filler")


def run_chaos(runs: int = 120, sleep_s: float = 0.8, seed: int = 7, kill_every_s: float = 3.0,
              restart_redis: bool = True, timeout_s: float = 600.0, log_dir: Path | None = None,
              claim_ttl_s: int = 6, memory_full: bool = True, failover: bool = False,
              wait_replicas: int = 0) -> ChaosReport:
    """A cut, a freeze or Redis out of memory lasts claim_ttl_s + 3 s: past the claim, so
    a cut or frozen run is taken over (and one on a full Redis must not be).
    ``failover``: a primary and replicas, and one failover that loses writes (see above)."""
    rng = random.Random(seed)
    log_dir = log_dir or Path("/tmp/dailyq-chaos")
    report = ChaosReport(runs=runs, wait_replicas=wait_replicas)
    server = PrivateRedis(appendonly=True, extra_args=["--maxmemory-policy", "noeviction"]).start()
    replicas = Replicas.start(server) if failover else None
    log_server = PrivateRedis(appendonly=False).start()  # where runs tick: never cut, restarted, full or failed over
    failed_over_at: float | None = None
    proxies = {node: TcpProxy("127.0.0.1", server.port) for node in NODES}
    group = ProcessGroup()
    started = time.monotonic()
    fault_s = claim_ttl_s + 3
    try:
        slot = (utc_now().replace(microsecond=0)).timestamp() + 6
        slot_text = time.strftime("%H:%M:%S", time.gmtime(slot))
        day = time.strftime("%Y-%m-%d", time.gmtime(slot))
        # Every run may die many times here: a generous attempt budget (deaths count).
        env = base_env(server.url, PREFIX, SAMPLE_ONLY="1", SAMPLE_PARAMS=str(runs), SAMPLE_SLEEP_S=str(sleep_s),
                       SAMPLE_AT=slot_text, SAMPLE_TZ="UTC", SAMPLE_FUNC="progress", SAMPLE_RETRIES="100",
                       SAMPLE_LOG_URL=log_server.url, DAILYQ_LEASE_TTL_S="3", DAILYQ_CLAIM_TTL_S=str(claim_ttl_s),
                       DAILYQ_WAIT_REPLICAS=str(wait_replicas))
        node_env = {node: dict(env, NODE_NAME=node, REDIS_URL=proxies[node].url()) for node in NODES}
        connection = Redis.from_url(server.url, socket_timeout=5)
        procs = {}
        for node in NODES:
            for role, script in (("scheduler", "scheduler.py"), ("worker", "worker_entry.py")):
                procs[(node, role)] = group.start(script, node_env[node], log_dir=log_dir)

        runs_key = f"{PREFIX}:day:{day}:runs"
        kill_log: dict[int, float] = {}  # horse pid -> when it was killed
        frozen_pids: set[int] = set()
        cut_windows: list[tuple[str, float, float]] = []  # node, from, to (wall clock)
        pending: list[tuple[float, str, str]] = []  # (due, action, node): restarts, heals, thaws
        faulty: set[str] = set()  # nodes cut off or frozen right now
        leader_gaps: list[float] = []
        # Each fault at least once, first.
        to_do = [f for f in FAULTS if (restart_redis or f != "redis") and (memory_full or f != "memory")]
        if replicas is not None:
            to_do.append("failover")  # last: the Redis restart above is of the first primary
        next_fault = time.monotonic() + 6 + kill_every_s

        fault_log = open(log_dir / "faults.log", "a")  # noqa: SIM115 - closed below

        def note(what: str, node: str = "") -> None:
            fault_log.write(f"{time.time():.3f} {what} {node}\n")
            fault_log.flush()

        def states() -> dict[str, str]:
            return {k.decode(): json.loads(v)["state"] for k, v in connection.hgetall(runs_key).items()}

        while time.monotonic() - started < timeout_s:
            now = time.monotonic()
            for due, action, node in [p for p in pending if p[0] <= now]:
                pending.remove((due, action, node))
                if action in ("scheduler", "worker"):
                    script = "scheduler.py" if action == "scheduler" else "worker_entry.py"
                    procs[(node, action)] = group.start(script, node_env[node], log_dir=log_dir)
                    note(f"restart {action}", node)
                elif action == "heal":
                    note("heal", node)
                    proxies[node].heal()
                    opened = max(i for i, window in enumerate(cut_windows) if window[0] == node)
                    cut_windows[opened] = (node, cut_windows[opened][1], time.time())
                    faulty.discard(node)
                elif action == "thaw":
                    note("thaw", node)
                    for pid in [procs[(node, "worker")].pid, *children_of(procs[(node, "worker")].pid)]:
                        _signal(pid, signal.SIGCONT)
                    faulty.discard(node)
            try:
                current = states()
            except Exception:  # noqa: BLE001 - Redis is down during the restart
                time.sleep(0.5)
                continue
            if len(current) == runs and all(s == "finished" for s in current.values()) and not faulty:
                break
            busy = [k for k, v in current.items() if v == "running"]
            if now < next_fault or len(current) < runs or not busy:
                time.sleep(0.2)
                continue
            next_fault = now + kill_every_s * rng.uniform(0.7, 1.3)
            healthy = [n for n in NODES if n not in faulty]
            planned = bool(to_do)
            fault = to_do.pop(0) if planned else rng.choice(("cut", "freeze", "leader", "worker", "worker"))
            if fault == "failover" and replicas is not None:
                note("replica stops replicating")
                replicas.link.cut()
                time.sleep(FAILOVER_LAG_S)
                note("primary killed, replica promoted")
                replicas.fail_over(server)
                for proxy in proxies.values():
                    proxy.switch(replicas.replica.port)
                connection = Redis.from_url(replicas.replica.url, socket_timeout=5)
                failed_over_at = time.time()
                report.failovers += 1
                continue
            if fault == "redis":
                note("redis down")
                server.kill()
                time.sleep(rng.uniform(5, 8))
                server.start()
                note("redis up")
                report.redis_restarts += 1
                continue
            if fault == "memory":
                alive = [p for p in procs.values() if p.poll() is None]
                note("memory full")
                began = time.monotonic()
                fill_memory(connection, fault_s)
                note("memory raised")
                report.memory_fulls += 1
                report.memory_full_s += time.monotonic() - began
                report.exits_while_full += sum(p.poll() is not None for p in alive)
                continue
            if not healthy:
                continue
            if fault == "leader":
                leader = connection.get(f"{PREFIX}:leader")
                node = json.loads(leader)["node"] if leader else None
                if node is None or faulty:
                    # Only while every node can take over: the gap measures failover alone.
                    if planned:
                        to_do.append("leader")
                    continue
                kill(procs[(node, "scheduler")].pid)
                note("kill leader", node)
                killed_at = time.monotonic()
                report.leader_kills += 1
                pending.append((killed_at + 1, "scheduler", node))
                while time.monotonic() - killed_at < 30:
                    raw = connection.get(f"{PREFIX}:leader")
                    if raw and json.loads(raw).get("pid") != procs[(node, "scheduler")].pid:
                        break
                    time.sleep(0.05)
                leader_gaps.append(time.monotonic() - killed_at)
                continue
            # A node in the middle of a run, when there is one: that is where faults hurt.
            busy_nodes = [n for n in healthy if children_of(procs[(n, "worker")].pid)]
            node = rng.choice(busy_nodes or healthy)
            worker = procs[(node, "worker")]
            horses = children_of(worker.pid)
            note(f"{fault} (horses {horses})", node)
            if fault == "cut":
                proxies[node].cut()
                cut_windows.append((node, time.time(), float("inf")))
                faulty.add(node)
                report.cuts += 1
                pending.append((time.monotonic() + fault_s, "heal", node))
            elif fault == "freeze":
                for pid in [worker.pid, *horses]:
                    _signal(pid, signal.SIGSTOP)
                frozen_pids.update(horses)
                faulty.add(node)
                report.freezes += 1
                pending.append((time.monotonic() + fault_s, "thaw", node))
            else:
                kill(worker.pid)
                for horse in horses:
                    kill(horse)
                    kill_log[horse] = time.time()
                report.worker_kills += 1
                report.midrun_kills += bool(horses)
                pending.append((time.monotonic() + 1, "worker", node))

        fault_log.close()
        report.wall_s = time.monotonic() - started
        final = states()
        report.finished = sum(s == "finished" for s in final.values())
        report.lost = runs - report.finished
        # What a run not finished in time was left as: the record says why (a true state) or
        # shows a bug; either way the report names it.
        for run_id, raw in sorted(connection.hgetall(runs_key).items()):
            record = json.loads(raw)
            if record.get("state") != "finished":
                report.notes.append(f"not finished: {run_id.decode()} {record.get('state')} on "
                                    f"{record.get('node')}, attempts {record.get('attempts')}, "
                                    f"error {record.get('error')!r}")
        events = executions(Redis.from_url(log_server.url, socket_timeout=5), PREFIX)
        around = (failed_over_at - FAILOVER_LAG_S, failed_over_at + claim_ttl_s + 5) if failed_over_at else None
        report.longest_overlap_s = _overlaps(events, frozen_pids, cut_windows, around)
        report.reexecutions, report.longest_recovery_s = _reexecutions(events, kill_log)
        report.longest_leader_gap_s = max(leader_gaps, default=0.0)
        report.fences_not_increasing = _fences_not_increasing(events)
        if failed_over_at is not None:
            report.rerun_after_failover = _rerun_after(events, failed_over_at - FAILOVER_LAG_S)
    finally:
        for proxy in proxies.values():
            proxy.heal()
        group.stop_all()
        for pid in list(kill_log):
            kill(pid)
        for proxy in proxies.values():
            proxy.close()
        server.cleanup()
        log_server.cleanup()
        if replicas is not None:
            replicas.cleanup()
    return report


@dataclass
class Replicas:
    """The primary's replica, which reaches it through a proxy (``link``: cut, the replica
    lags), and that replica's own replica, which follows it once it is promoted
    (tests.support.redis_servers.LaggingReplica, with PrivateRedis servers)."""

    link: TcpProxy
    replica: PrivateRedis
    sub_replica: PrivateRedis

    @classmethod
    def start(cls, primary: PrivateRedis) -> "Replicas":
        link = TcpProxy("127.0.0.1", primary.port)
        replica = PrivateRedis(appendonly=True, extra_args=["--replicaof", "127.0.0.1", str(link.port)]).start()
        sub_replica = PrivateRedis(appendonly=True,
                                   extra_args=["--replicaof", "127.0.0.1", str(replica.port)]).start()
        for server in (replica, sub_replica):
            client = Redis.from_url(server.url, decode_responses=True)
            deadline = time.monotonic() + 30
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica on port {server.port} did not sync")
                time.sleep(0.05)
        return cls(link, replica, sub_replica)

    def fail_over(self, primary: PrivateRedis) -> None:
        primary.kill()
        Redis.from_url(self.replica.url, socket_timeout=5).execute_command("REPLICAOF", "NO", "ONE")

    def cleanup(self) -> None:
        self.link.close()
        self.replica.cleanup()
        self.sub_replica.cleanup()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _overlaps(events: list[dict], frozen: set[int], cuts: list[tuple[str, float, float]],
              failover: tuple[float, float] | None = None) -> dict[str, float]:
    """Longest time two copies of one run were both seen working, by cause: a frozen copy
    that resumed, a copy on a node cut off from Redis (during the cut or within 2 s of
    its healing), a failover that lost writes (beginning within ``failover``: from the
    replica's last write to the claim TTL after), or anything else."""
    node_of = {e["pid"]: e["node"] for e in events}
    longest = {"cut": 0.0, "freeze": 0.0, "other": 0.0, "failover": 0.0}
    for pid, other, begin, seconds in overlaps(events):
        pids = {pid, other}
        if pids & frozen:
            cause = "freeze"
        elif any(node_of.get(p) == node and cut_from <= begin + seconds and begin <= cut_to + 2
                 for p in pids for node, cut_from, cut_to in cuts):
            cause = "cut"
        elif failover is not None and failover[0] <= begin <= failover[1]:
            cause = "failover"
        else:
            cause = "other"
        longest[cause] = max(longest[cause], seconds)
    return longest


def _reexecutions(events: list[dict], kills: dict[int, float]) -> tuple[int, float]:
    """(copies beyond the first of each run, longest kill -> next copy's start)."""
    starts: dict[str, list[dict]] = {}
    for event in events:
        if event["event"] == "start":
            starts.setdefault(param_key(event["param"]), []).append(event)
    reexecutions = 0
    longest = 0.0
    for param_starts in starts.values():
        param_starts.sort(key=lambda e: e["t"])
        reexecutions += len(param_starts) - 1
        for earlier, later in zip(param_starts, param_starts[1:]):
            if earlier["pid"] in kills:
                longest = max(longest, later["t"] - kills[earlier["pid"]])
    return reexecutions, longest


def _starts_by_run(events: list[dict]) -> dict[str, list[dict]]:
    starts: dict[str, list[dict]] = {}
    for event in events:
        if event["event"] == "start":
            starts.setdefault(param_key(event["param"]), []).append(event)
    for param_starts in starts.values():
        param_starts.sort(key=lambda e: e["t"])
    return starts


def _fences_not_increasing(events: list[dict]) -> int:
    """Executions whose fence is not greater than every earlier execution's of the same run."""
    found = 0
    for param_starts in _starts_by_run(events).values():
        highest = None
        for event in param_starts:
            fence = (event.get("context") or {}).get("fence")
            if fence is None:
                continue
            if highest is not None and fence <= highest:
                found += 1
            highest = fence if highest is None else max(highest, fence)
    return found


def _rerun_after(events: list[dict], since: float) -> int:
    """Runs that started once before ``since`` and again after it."""
    return sum(1 for param_starts in _starts_by_run(events).values()
               if param_starts[0]["t"] < since and any(e["t"] >= since for e in param_starts[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=120)
    parser.add_argument("--sleep", type=float, default=0.8, help="seconds each run works")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--claim-ttl", type=int, default=6, help="DAILYQ_CLAIM_TTL_S of the nodes (s)")
    parser.add_argument("--failover", action="store_true",
                        help="Redis with replicas, and one failover to a replica that stopped replicating 2 s before")
    parser.add_argument("--wait-replicas", type=int, default=0, help="DAILYQ_WAIT_REPLICAS of the nodes")
    args = parser.parse_args()
    report = run_chaos(args.runs, args.sleep, args.seed, args.kill_every, timeout_s=args.timeout,
                       claim_ttl_s=args.claim_ttl, failover=args.failover, wait_replicas=args.wait_replicas)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

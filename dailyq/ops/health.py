"""``scheduler.py health``: is this node's scheduler and worker alive? For probes.

Each process keeps a heartbeat key (``keys.heartbeat(role, node)``) with a TTL: the
scheduler every 5 s, the worker every RQ heartbeat (see ``worker.WorkerContext.beat``);
its value (beats.py) carries the beat's time and the process's clock offset from
Redis. A present key means the process beat within its TTL; ``max_age_s`` optionally
asks for a more recent beat.

The line also says how many worker processes the node runs (beats.py's worker set:
several per node with ``worker_entry.py --concurrency N`` or one unit per worker);
``min_workers`` makes fewer than that many unhealthy. Without it, any live worker
will do, as with one worker per node.

A clock more than 2 s off Redis's is named on the line but stays healthy (exit 0): the
process does its work right anyway (slots fire by Redis's clock, leases and claims
expire by Redis's), and a probe that failed would only get it restarted, which does not
set a clock.

Tables (a rolling deploy, table_skew.py): every table difference among the live
processes is named on the line (``warning: tables differ: node-old (worker) runs table
..., not the leader's ... for 40s: task nt removed``). A difference involving one of the
processes checked here (this node's, of the roles asked) makes the node unhealthy
(exit 1) only once it is older than ``DAILYQ_TABLE_SKEW_ALERT_S`` (default 900 s, by the
leader's record of when it first saw it): an ordinary rolling deploy runs two tables for
minutes, and a probe that failed then would have Kubernetes restart pods in the middle
of it. Past that, the node's process runs a table other than the leader's for longer than
any deploy should take (a process not restarted after its code changed, a deploy stuck):
a restart loads the table deployed. The leader's node and the nodes that agree with it
stay healthy: restarting them would not change the odd node's table. A difference the
leader has not recorded yet (no ``since``: no leader, or seen for under 5 s) counts as young.

Redis out of memory (``redis``: status's ``redis`` view, redis_memory.redis_view) makes
every node unhealthy, the line naming Redis's memory first: no run starts and no slot
is fanned out until memory is raised or freed. (A probe that restarts processes then does
no harm: none of them exits by itself, and a restarted one waits like the others.)

``judge`` is pure (values read + now in, verdict out) so it is tested with fixed
times; ``read_beats`` is the one Redis read. Probes want 0 or 1, so every problem
here, Redis included, is "unhealthy" with exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from redis import Redis

from ..beats import ROLES, Beat, clock_is_off, count_live_workers, format_offset, offset_warning, parse_beat
from ..keys import Keys
from ..redis_values import as_bytes
from ..timestamps import parse_iso
from .render import human_bytes
from .table_skew import difference_text

__all__ = ["ROLES", "Beat", "Verdict", "judge", "parse_beat", "read_beats", "read_worker_count", "redis_down",
           "roles_of", "table_findings"]


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    line: str

    @property
    def exit_code(self) -> int:
        return 0 if self.healthy else 1


def roles_of(choice: str) -> tuple[str, ...]:
    """``--role`` value -> roles to check (``both`` = scheduler and worker)."""
    return ROLES if choice == "both" else (choice,)


def read_beats(connection: Redis, keys: Keys, node: str, roles: Sequence[str]) -> dict[str, bytes | None]:
    """The raw heartbeat values of ``roles`` on ``node``, in one round trip."""
    values = connection.mget([keys.heartbeat(role, node) for role in roles])
    return {role: None if value is None else as_bytes(value) for role, value in zip(roles, values)}


def read_worker_count(connection: Redis, keys: Keys, node: str, now: datetime) -> int:
    """How many worker processes of ``node`` are alive at ``now`` (Redis time)."""
    return int(count_live_workers(connection, keys, node, now))


def judge(node: str, raw_beats: Mapping[str, bytes | str | None], now: datetime,
          max_age_s: float | None = None, workers: int | None = None, min_workers: int | None = None,
          tables: Mapping[str, Any] | None = None, table_skew_alert_s: float = 900,
          redis: Mapping[str, Any] | None = None) -> Verdict:
    """Healthy when every role in ``raw_beats`` has a heartbeat (and, with
    ``max_age_s``, one at most that old) and, with ``min_workers``, ``workers`` (the
    node's live worker processes) is at least that, and no process checked has run a
    table other than the reference of ``tables`` (status' ``tables`` view) for longer
    than ``table_skew_alert_s``. The line names every problem found, the worker count
    when given, every clock more than 2 s off Redis's and every table difference (warnings,
    not problems)."""
    problems: list[str] = []
    if redis is not None and redis.get("full"):
        problems.append(redis_full_problem(redis))
    ages: list[str] = []
    offsets: list[str] = []
    warnings: list[str] = []
    for role, raw in raw_beats.items():
        try:
            beat = parse_beat(raw)
        except (ValueError, KeyError, TypeError):
            problems.append(f"unreadable {role} heartbeat from {node}: {raw!r}")
            continue
        if beat is None:
            problems.append(f"no {role} heartbeat from {node} (none within its TTL, or it never started)")
            continue
        offsets.append(format_offset(beat.offset_s))  # "unknown" from a process of an earlier version
        if beat.offset_s is not None and clock_is_off(beat.offset_s):
            warnings.append("warning: " + offset_warning(node, role, beat.offset_s))
        # A beat stamped slightly in the future (clocks of two containers) counts as fresh.
        age_s = max(0.0, (now - beat.at).total_seconds())
        if max_age_s is not None and age_s > max_age_s:
            problems.append(f"no {role} heartbeat from {node} for {age_s:.0f}s (--max-age-s {max_age_s:g})")
            continue
        ages.append(f"{age_s:.0f}s")
    counted = [] if workers is None else [f"{workers} worker{'' if workers == 1 else 's'} alive"]
    if min_workers is not None and (workers or 0) < min_workers:
        problems.append(f"{workers or 0} of at least {min_workers} workers alive on {node} (--min-workers)")
        counted = []
    table_problems, table_warnings = table_findings(node, tuple(raw_beats), tables, now, table_skew_alert_s)
    problems += table_problems
    warnings += table_warnings
    if problems:
        return Verdict(False, "; ".join(["unhealthy: " + "; ".join(problems), *warnings]))
    roles = " and ".join(raw_beats)
    beats = "last heartbeats" if len(ages) > 1 else "last heartbeat"
    clocks = ""
    if any(offset != "unknown" for offset in offsets):
        clocks = f"; clock {'offsets' if len(offsets) > 1 else 'offset'} from Redis {' and '.join(offsets)}"
    line = f"ok: {roles} of {node} alive, Redis answers ({beats} {' and '.join(ages)} ago{clocks})"
    return Verdict(True, "; ".join([line, *counted, *warnings]))


def table_findings(node: str, roles: Sequence[str], tables: Mapping[str, Any] | None, now: datetime,
                   alert_s: float) -> tuple[list[str], list[str]]:
    """(problems, warnings) from the ``tables`` view: a difference of one of ``node``'s
    ``roles`` older than ``alert_s`` is a problem, any other difference a warning."""
    problems: list[str] = []
    warnings: list[str] = []
    checked = {f"{node}/{role}" for role in roles}
    for difference in (tables or {}).get("differences", []):
        since = parse_iso(difference.get("since"))
        age_s = None if since is None else max(0.0, (now - since).total_seconds())
        text = "tables differ: " + difference_text(tables or {}, difference,
                                                   "" if age_s is None else f" for {age_s:.0f}s")
        if checked & set(difference["processes"]) and age_s is not None and age_s > alert_s:
            problems.append(f"{text} (longer than DAILYQ_TABLE_SKEW_ALERT_S={alert_s:g}s)")
        else:
            warnings.append(f"warning: {text}")
    return problems, warnings


def redis_full_problem(redis: Mapping[str, Any]) -> str:
    """``Redis is out of memory (used ... of maxmemory ...) and refuses writes since ...``."""
    if redis.get("used_memory") is None:
        memory = "memory figures unreadable"
    elif redis.get("maxmemory"):
        memory = (f"used_memory {redis['used_memory']} ({human_bytes(int(redis['used_memory']))}) of maxmemory "
                  f"{redis['maxmemory']} ({human_bytes(int(redis['maxmemory']))}), maxmemory-policy "
                  f"{redis.get('maxmemory_policy')}")
    else:
        memory = f"used_memory {redis['used_memory']}, no maxmemory"
    since = f" since {redis['full_since']}" if redis.get("full_since") else ""
    return (f"Redis is out of memory ({memory}) and refuses writes{since}: no run starts and no slot is fanned out "
            "until maxmemory is raised or memory freed")


def redis_down(reason: str) -> Verdict:
    """Redis cannot be asked: unhealthy (exit 1), whatever the heartbeats."""
    return Verdict(False, f"unhealthy: {reason}")

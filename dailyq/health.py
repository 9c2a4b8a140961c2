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

``judge`` is pure (values read + now in, verdict out) so it is tested with fixed
times; ``read_beats`` is the one Redis read. Probes want 0 or 1, so every problem
here, Redis included, is "unhealthy" with exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Sequence

from redis import Redis

from .beats import ROLES, Beat, clock_is_off, count_live_workers, format_offset, offset_warning, parse_beat
from .keys import Keys

__all__ = ["ROLES", "Beat", "Verdict", "judge", "parse_beat", "read_beats", "read_worker_count", "redis_down",
           "roles_of"]


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
    return dict(zip(roles, values))


def read_worker_count(connection: Redis, keys: Keys, node: str, now: datetime) -> int:
    """How many worker processes of ``node`` are alive at ``now`` (Redis time)."""
    return int(count_live_workers(connection, keys, node, now))


def judge(node: str, raw_beats: Mapping[str, bytes | str | None], now: datetime,
          max_age_s: float | None = None, workers: int | None = None, min_workers: int | None = None) -> Verdict:
    """Healthy when every role in ``raw_beats`` has a heartbeat (and, with
    ``max_age_s``, one at most that old) and, with ``min_workers``, ``workers`` (the
    node's live worker processes) is at least that. The line names every problem found,
    the worker count when given, and every clock more than 2 s off Redis's (a warning,
    not a problem)."""
    problems: list[str] = []
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
    if problems:
        return Verdict(False, "; ".join(["unhealthy: " + "; ".join(problems), *warnings]))
    roles = " and ".join(raw_beats)
    beats = "last heartbeats" if len(ages) > 1 else "last heartbeat"
    clocks = ""
    if any(offset != "unknown" for offset in offsets):
        clocks = f"; clock {'offsets' if len(offsets) > 1 else 'offset'} from Redis {' and '.join(offsets)}"
    line = f"ok: {roles} of {node} alive, Redis answers ({beats} {' and '.join(ages)} ago{clocks})"
    return Verdict(True, "; ".join([line, *counted, *warnings]))


def redis_down(reason: str) -> Verdict:
    """Redis cannot be asked: unhealthy (exit 1), whatever the heartbeats."""
    return Verdict(False, f"unhealthy: {reason}")

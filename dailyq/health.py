"""``scheduler.py health``: is this node's scheduler and worker alive? For probes.

Each process keeps a heartbeat key (``keys.heartbeat(role, node)``) with a TTL: the
scheduler every 5 s (plain ISO time), the worker every RQ heartbeat (JSON
``{"at", "pid"}``; see ``_DailyWorkerMixin.heartbeat``). A present key means the
process beat within its TTL; ``max_age_s`` optionally asks for a more recent beat.

``judge`` is pure (values read + now in, verdict out) so it is tested with fixed
times; ``read_beats`` is the one Redis read. Probes want 0 or 1, so every problem
here, Redis included, is "unhealthy" with exit 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Sequence

from redis import Redis

from .keys import Keys

ROLES = ("scheduler", "worker")


@dataclass(frozen=True)
class Beat:
    at: datetime
    pid: int | None = None


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


def parse_beat(raw: bytes | str | None) -> Beat | None:
    """A heartbeat value, either form; None when absent. Raises ValueError if unreadable."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        pid = data.get("pid")
        return Beat(_aware(datetime.fromisoformat(data["at"])), int(pid) if pid is not None else None)
    return Beat(_aware(datetime.fromisoformat(text)))


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"time {moment.isoformat()} has no UTC offset")
    return moment


def read_beats(connection: Redis, keys: Keys, node: str, roles: Sequence[str]) -> dict[str, bytes | None]:
    """The raw heartbeat values of ``roles`` on ``node``, in one round trip."""
    values = connection.mget([keys.heartbeat(role, node) for role in roles])
    return dict(zip(roles, values))


def judge(node: str, raw_beats: Mapping[str, bytes | str | None], now: datetime,
          max_age_s: float | None = None) -> Verdict:
    """Healthy when every role in ``raw_beats`` has a heartbeat (and, with
    ``max_age_s``, one at most that old). The line names every problem found."""
    problems: list[str] = []
    ages: list[str] = []
    for role, raw in raw_beats.items():
        try:
            beat = parse_beat(raw)
        except (ValueError, KeyError, TypeError):
            problems.append(f"unreadable {role} heartbeat from {node}: {raw!r}")
            continue
        if beat is None:
            problems.append(f"no {role} heartbeat from {node} (none within its TTL, or it never started)")
            continue
        # A beat stamped slightly in the future (clocks of two containers) counts as fresh.
        age_s = max(0.0, (now - beat.at).total_seconds())
        if max_age_s is not None and age_s > max_age_s:
            problems.append(f"no {role} heartbeat from {node} for {age_s:.0f}s (--max-age-s {max_age_s:g})")
            continue
        ages.append(f"{age_s:.0f}s")
    if problems:
        return Verdict(False, "unhealthy: " + "; ".join(problems))
    roles = " and ".join(raw_beats)
    beats = "last heartbeats" if len(ages) > 1 else "last heartbeat"
    return Verdict(True, f"ok: {roles} of {node} alive, Redis answers ({beats} {' and '.join(ages)} ago)")


def redis_down(reason: str) -> Verdict:
    """Redis cannot be asked: unhealthy (exit 1), whatever the heartbeats."""
    return Verdict(False, f"unhealthy: {reason}")

"""Heartbeat values, and the live nodes that write them.

Each scheduler and each worker keeps a key ``keys.heartbeat(role, node)`` with a TTL
(its refresh schedules are in scheduler.py and ``worker.WorkerContext.beat``). Its
value is JSON ``{"at", "pid", "offset_s"}``: when it beat, by Redis's clock; the
process; and how far that process's host clock is from Redis's (host minus Redis, in
seconds, + = ahead). Schedulers of earlier versions wrote a plain ISO time, and
workers ``{"at", "pid"}``; both still parse (offset unknown).

Every beat also puts its node in ``keys.nodes`` (score: the beat's time), so ``status``
finds the live nodes' keys without a SCAN over the whole keyspace.

``parse_beat``, ``offset_warning`` and ``clock_warnings`` are pure; ``live_processes``
is the one read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

from redis import Redis

from .clock import iso
from .keys import Keys
# Pure, and shown by render.py too; kept importable from here.
from .offsets import OFFSET_WARN_S, clock_is_off, describe_offset, format_offset, offset_warning  # noqa: F401

ROLES = ("scheduler", "worker")


@dataclass(frozen=True)
class Beat:
    at: datetime
    pid: int | None = None
    offset_s: float | None = None


def beat_value(at: datetime, pid: int, offset_s: float | None) -> str:
    # Milliseconds are all a TIME round trip can tell; "+ 0.0" turns a rounded -0.0 into 0.0.
    offset = None if offset_s is None else round(offset_s, 3) + 0.0
    return json.dumps({"at": iso(at), "pid": pid, "offset_s": offset})


def parse_beat(raw: bytes | str | None) -> Beat | None:
    """A heartbeat value, any form; None when absent. Raises ValueError if unreadable."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        pid, offset = data.get("pid"), data.get("offset_s")
        return Beat(_aware(datetime.fromisoformat(data["at"])), int(pid) if pid is not None else None,
                    float(offset) if offset is not None else None)
    return Beat(_aware(datetime.fromisoformat(text)))


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"time {moment.isoformat()} has no UTC offset")
    return moment


def register_node(pipe: Any, keys: Keys, node: str, at: datetime) -> None:
    """Queue, on ``pipe``, the write that lists ``node`` among the nodes that beat."""
    pipe.zadd(keys.nodes, {node: at.timestamp()})


def forget_silent_nodes(pipe: Any, keys: Keys, now: datetime, after_s: float) -> None:
    """Queue the removal of nodes that have not beaten for ``after_s`` (machines gone)."""
    pipe.zremrangebyscore(keys.nodes, "-inf", now.timestamp() - after_s)


def live_processes(connection: Redis, keys: Keys) -> list[dict[str, Any]]:
    """One entry per process with a live heartbeat key, by node then role: node, role,
    pid, beat_at, offset_s (None when unknown) and clock_off."""
    nodes = sorted(name.decode() for name in connection.zrange(keys.nodes, 0, -1))
    if not nodes:
        return []
    pairs = [(node, role) for node in nodes for role in ROLES]
    values = connection.mget([keys.heartbeat(role, node) for node, role in pairs])
    shown = []
    for (node, role), raw in zip(pairs, values):
        if raw is None:
            continue  # that process's key expired: not alive
        try:
            beat = parse_beat(raw)
        except (ValueError, KeyError, TypeError):
            beat = None  # present, so alive, but nothing more can be said
        offset = beat.offset_s if beat else None
        shown.append({"node": node, "role": role, "pid": beat.pid if beat else None,
                      "beat_at": iso(beat.at) if beat else None, "offset_s": offset,
                      "clock_off": clock_is_off(offset)})
    return shown


def clock_warnings(processes: Iterable[dict[str, Any]]) -> list[str]:
    """A line per process whose clock is off, for ``live_processes``' entries."""
    return [offset_warning(p["node"], p["role"], p["offset_s"]) for p in processes if p["clock_off"]]

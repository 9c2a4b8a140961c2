"""Heartbeat values, and the live nodes that write them.

Each scheduler and each worker keeps a key ``keys.heartbeat(role, node)`` with a TTL
(its refresh schedules are in scheduler.py and ``worker.WorkerContext.beat``). Its
value is JSON ``{"at", "pid", "offset_s"}``: when it beat, by Redis's clock; the
process; and how far that process's host clock is from Redis's (host minus Redis, in
seconds, + = ahead). Schedulers of earlier versions wrote a plain ISO time, and
workers ``{"at", "pid"}``; both still parse (offset unknown).

Every beat also puts its node in ``keys.nodes`` (score: the beat's time), so ``status``
finds the live nodes' keys without a SCAN over the whole keyspace.

Several workers may run on one node (``worker_entry.py --concurrency N``, ``honcho start
-c worker=N``, a systemd template unit); they share the node's one heartbeat key, so
each worker process is also a member of ``keys.node_workers(node)``, scored with the
Redis time its beat promises it is alive until. ``count_live_workers`` counts the
members not past that time: no SCAN, and a reader writes nothing. Members are pruned by
the beats themselves, and a worker that stops cleanly removes its own (``forget_worker``).

``parse_beat``, ``offset_warning`` and ``clock_warnings`` are pure; ``live_processes``
is the one read.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

from redis import Redis

from .clock import iso, server_now
from .keys import Keys

# Pure, and shown by render.py too; kept importable from here.
from .ops.offsets import OFFSET_WARN_S, clock_is_off, describe_offset, format_offset, offset_warning  # noqa: F401
from .redis_values import as_text

ROLES = ("scheduler", "worker")

# A node's worker set lives at least this long after its last beat (each beat resets it).
# Generous on purpose: Redis before 7 has no EXPIRE GT, so a beat promising little (an
# idle worker) must not cut short the set of a neighbour that promised a long run
# (a non-forking worker promises the run's timeout); members expire by their own score.
WORKER_SET_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Beat:
    at: datetime
    pid: int | None = None
    offset_s: float | None = None
    # The fingerprint of the process's task table (fingerprint.py); None from versions
    # before it was carried.
    table: str | None = None


def beat_value(at: datetime, pid: int, offset_s: float | None, table: str | None = None) -> str:
    # Milliseconds are all a TIME round trip can tell; "+ 0.0" turns a rounded -0.0 into 0.0.
    offset = None if offset_s is None else round(offset_s, 3) + 0.0
    value: dict[str, Any] = {"at": iso(at), "pid": pid, "offset_s": offset}
    if table is not None:
        value["table"] = table
    return json.dumps(value)


def parse_beat(raw: bytes | str | None) -> Beat | None:
    """A heartbeat value, any form; None when absent. Raises ValueError if unreadable."""
    if raw is None:
        return None
    text = as_text(raw)
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        pid, offset, table = data.get("pid"), data.get("offset_s"), data.get("table")
        return Beat(_aware(datetime.fromisoformat(data["at"])), int(pid) if pid is not None else None,
                    float(offset) if offset is not None else None, str(table) if table is not None else None)
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


def worker_member(pid: int) -> str:
    """A worker process's member in its node's worker set. The host name too: two
    containers given one NODE_NAME may well run their workers under the same pid."""
    return f"{socket.gethostname()}:{pid}"


def register_worker(pipe: Any, keys: Keys, node: str, member: str, now: datetime, alive_s: float) -> None:
    """Queue, on ``pipe``, the writes that count ``member`` among ``node``'s live workers
    for ``alive_s`` from ``now`` (Redis time), and drop members whose time has passed."""
    key = keys.node_workers(node)
    pipe.zadd(key, {member: now.timestamp() + alive_s})
    pipe.zremrangebyscore(key, "-inf", now.timestamp())
    pipe.expire(key, max(int(alive_s) + 1, WORKER_SET_TTL_S))


def forget_worker(connection: Redis, keys: Keys, node: str, member: str) -> None:
    """``member`` stopped (cleanly, or its supervisor saw it die): count it no longer."""
    connection.zrem(keys.node_workers(node), member)


def count_live_workers(pipe: Any, keys: Keys, node: str, now: datetime) -> Any:
    """Queue (or, on a connection, send) the count of ``node``'s workers alive at ``now``."""
    return pipe.zcount(keys.node_workers(node), now.timestamp(), "+inf")


def live_processes(connection: Redis, keys: Keys, now: datetime | None = None,
                   count_workers: bool = True) -> list[dict[str, Any]]:
    """One entry per process with a live heartbeat key, by node then role: node, role,
    pid, beat_at, offset_s (None when unknown), clock_off, table (its table's
    fingerprint, None when unknown), and workers: for a worker
    entry the number of worker processes alive on its node at ``now`` (Redis time; read
    from Redis when not given), None for a scheduler. ``count_workers=False`` leaves the
    counts None and reads only the heartbeats (the leader's table check, every few
    seconds: an idle cluster's traffic is a budget)."""
    nodes = sorted(as_text(name) for name in connection.zrange(keys.nodes, 0, -1))
    if not nodes:
        return []
    if count_workers:
        now = now or server_now(connection)
    pairs = [(node, role) for node in nodes for role in ROLES]
    # One round trip for every heartbeat and every node's worker count.
    with connection.pipeline(transaction=False) as pipe:
        pipe.mget([keys.heartbeat(role, node) for node, role in pairs])
        if count_workers and now is not None:
            for node in nodes:
                count_live_workers(pipe, keys, node, now)
        values, *counts = pipe.execute()
    workers = dict(zip(nodes, counts))
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
                      "clock_off": clock_is_off(offset), "table": beat.table if beat else None,
                      "workers": int(workers[node]) if role == "worker" and node in workers else None})
    return shown


def clock_warnings(processes: Iterable[dict[str, Any]]) -> list[str]:
    """A line per process whose clock is off, for ``live_processes``' entries."""
    return [offset_warning(p["node"], p["role"], p["offset_s"]) for p in processes if p["clock_off"]]

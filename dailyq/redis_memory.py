"""Redis out of memory: what it looks like, how dailyq tells, and when it is over.

With ``maxmemory`` and ``maxmemory-policy noeviction`` (what dailyq asks for: its keys
must not be evicted), a full Redis still answers and still serves reads, but refuses
every command that may add data ("OOM command not allowed when used memory >
'maxmemory'"), and every MULTI/EXEC with any command in it. dailyq treats that as an
outage (outage.py): nothing exits, every loop retries with backoff.

* ``read_memory``: INFO memory's figures, for the lines that name them.
* ``probe_writes``: Redis's own answer to "would you take a write now?": ``SETRANGE`` of
  an empty string on a key that does not exist (``keys.memory_probe``) is refused like
  any write while Redis is out of memory, and creates nothing when it is not.
* ``writes_accepted``: the probe passes and, with ``noeviction``, at least
  ``HEADROOM_FRACTION`` of maxmemory is free. A full Redis sits right at its limit:
  every key that expires and every run that finishes frees a little, and without the
  headroom each process would flip between working and waiting with every few bytes.
* The marker (``keys.memory_full``): one small key, written with an allow-oom script by
  every scheduler that meets a refusal (``mark_full``), with a short TTL, and dropped by
  the leader once writes are accepted again. It is how ``status`` and ``health`` know
  that Redis refuses dailyq's writes even when INFO shows memory a little below the
  limit (the refused command's own buffer was freed with it), which node saw it first,
  since when, the slots whose fan-out was refused, and whether ``redis_full`` was sent.
* ``redis_view``: the ``redis`` object of ``status --json``.

Redis 6 has no script flags: there the marker cannot be written while Redis is full, and
``status``/``health`` go by INFO alone (see docs/failure-semantics.md).
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from redis import Redis
from redis.exceptions import RedisError

from .keys import Keys
from .ops.render import human_bytes
from .outage import refused_for_memory, transient
from .scripts import scripts_for

# With noeviction, writes resume once this much of maxmemory is free (see the docstring),
# and at least HEADROOM_MIN_BYTES.
HEADROOM_FRACTION = 0.01
HEADROOM_MIN_BYTES = 64 * 1024
# The marker lives this long after the last refusal a scheduler saw: schedulers meet one
# at least every heartbeat (5 s) while Redis is full, so it outlives none of them by much.
MARK_TTL_S = 15


@dataclass(frozen=True)
class RedisMemory:
    """INFO memory's figures (bytes). ``not_counted``: replication and AOF buffers,
    which Redis leaves out when it compares its memory with maxmemory."""

    used_memory: int
    maxmemory: int  # 0: no limit
    policy: str
    not_counted: int = 0

    @property
    def counted(self) -> int:
        return max(0, self.used_memory - self.not_counted)

    @property
    def over(self) -> bool:
        """Past maxmemory with noeviction: Redis refuses writes (with an evicting policy
        it evicts instead, and refuses only when nothing is left to evict)."""
        return self.maxmemory > 0 and self.policy == "noeviction" and self.counted > self.maxmemory

    @property
    def has_headroom(self) -> bool:
        if self.maxmemory <= 0 or self.policy != "noeviction":
            return True
        return self.counted <= self.maxmemory - max(HEADROOM_MIN_BYTES, int(self.maxmemory * HEADROOM_FRACTION))

    def describe(self) -> str:
        """``used 20.1 MiB of maxmemory 20.0 MiB, maxmemory-policy noeviction``."""
        if self.maxmemory <= 0:
            return f"used {human_bytes(self.used_memory)}, no maxmemory"
        return (f"used {human_bytes(self.used_memory)} of maxmemory {human_bytes(self.maxmemory)}, "
                f"maxmemory-policy {self.policy}")


def describer(connection: Redis) -> Callable[[], str]:
    """Redis's memory in words, read when called (outage.MemoryNotice's lines). Holds
    the connection weakly: a notice outliving its scheduler (tests) says nothing wrong."""
    ref = weakref.ref(connection)

    def describe() -> str:
        client = ref()
        return read_memory(client).describe() if client is not None else "memory figures unknown"

    return describe


def read_memory(connection: Redis) -> RedisMemory:
    """One INFO memory (a read: Redis answers it however full it is)."""
    info = connection.info("memory")
    return RedisMemory(used_memory=int(info.get("used_memory") or 0), maxmemory=int(info.get("maxmemory") or 0),
                       policy=str(info.get("maxmemory_policy") or "noeviction"),
                       not_counted=int(info.get("mem_not_counted_for_evict") or 0))


def probe_writes(connection: Redis, keys: Keys) -> bool:
    """False while Redis refuses writes for memory (see the module docstring)."""
    try:
        connection.setrange(keys.memory_probe, 0, "")
    except RedisError as exc:
        if refused_for_memory(exc):
            return False
        raise
    return True


def writes_accepted(connection: Redis, keys: Keys) -> bool:
    """The probe passes, and (noeviction) there is headroom: a process may resume."""
    return probe_writes(connection, keys) and read_memory(connection).has_headroom


def wait_for_writes(connection: Redis, keys: Keys, stopping: Callable[[], bool] = lambda: False,
                    first_wait_s: float = 0.5, max_wait_s: float = 5.0) -> bool:
    """Block until Redis accepts writes again (True; see ``writes_accepted``), probing with
    backoff, or until ``stopping()`` (False). Redis away meanwhile is waited out too."""
    wait_s = first_wait_s
    while not stopping():
        time.sleep(wait_s)
        try:
            if writes_accepted(connection, keys):
                return True
        except RedisError as exc:
            if not transient(exc):
                raise
        wait_s = min(max_wait_s, wait_s * 2)
    return False


@dataclass(frozen=True)
class FullMark:
    """The marker as ``mark_full`` left it."""

    since_ms: int  # the episode's first sighting (Redis clock): also the redis_full alert's id
    alerted: bool  # redis_full was delivered for this episode
    node: str  # who saw it first
    slots: list[dict[str, str]]  # {task, slot, tz}: slots whose fan-out Redis refused


def mark_full(connection: Redis, keys: Keys, node: str, memory: RedisMemory | None,
              slots: list[dict[str, str]] | None = None) -> FullMark:
    """Keep the marker (allow-oom: it works on a full Redis 7). ``slots``: the leader's
    refused slots (None leaves the stored ones). Raises what Redis raises (on Redis 6,
    the very refusal it is about)."""
    since_ms, was_alerted, raw = scripts_for(connection).memory_full_mark(
        marker_key=keys.memory_full, node=node, ttl_ms=MARK_TTL_S * 1000,
        used_memory=memory.used_memory if memory else 0, maxmemory=memory.maxmemory if memory else 0,
        slots_json=None if slots is None else json.dumps(slots)).run()
    stored = json.loads(raw)
    return FullMark(since_ms, was_alerted, str(stored.get("node") or node), _slot_list(stored.get("slots")))


def note_delivered(connection: Redis, keys: Keys, node: str, since_ms: int) -> bool:
    """redis_full of the episode ``since_ms`` was delivered: its marker says so, and no
    other leader sends it again. False when that marker is gone (the episode is over)."""
    found, _, _ = scripts_for(connection).memory_full_mark(
        marker_key=keys.memory_full, node=node, ttl_ms=MARK_TTL_S * 1000, used_memory=0, maxmemory=0,
        slots_json=None, delivered_since_ms=since_ms).run()
    return found == since_ms


def read_mark(connection: Redis, keys: Keys) -> dict[str, Any] | None:
    raw = connection.get(keys.memory_full)
    if raw is None:
        return None
    try:
        mark = json.loads(raw)
    except ValueError:
        return None
    return mark if isinstance(mark, dict) else None


def clear_mark(connection: Redis, keys: Keys) -> None:
    """Writes are accepted again (the leader saw it): the marker goes."""
    connection.delete(keys.memory_full)


def _slot_list(value: Any) -> list[dict[str, str]]:
    # cjson encodes an empty list as {}: anything but a list of objects is no slots.
    if not isinstance(value, list):
        return []
    return [{k: str(v) for k, v in item.items()} for item in value if isinstance(item, dict)]


def iso_ms(ms: int | float | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(float(ms) / 1000, timezone.utc).isoformat(timespec="seconds")


def redis_view(connection: Redis, keys: Keys) -> dict[str, Any]:
    """``status --json``'s ``redis``: ``used_memory``, ``maxmemory`` (bytes; 0: no limit;
    null when INFO cannot be read), ``maxmemory_policy``, ``full`` (Redis refuses
    dailyq's writes for memory: INFO says it is past maxmemory with noeviction, or a
    scheduler saw a write refused within the last ``MARK_TTL_S`` s), and, while full,
    ``full_since`` (ISO, Redis clock, when a scheduler first saw it), ``seen_by`` (that
    node) and ``refused_slots`` (``[{task, slot}]``: slots whose fan-out Redis refused;
    the leader fans them out once writes work again, even past their misfire grace)."""
    try:
        memory: RedisMemory | None = read_memory(connection)
    except RedisError:  # INFO may be refused to an ACL user; the marker still tells
        memory = None
    mark = read_mark(connection, keys)
    full = bool(mark) or bool(memory and memory.over)
    return {"used_memory": memory.used_memory if memory else None,
            "maxmemory": memory.maxmemory if memory else None,
            "maxmemory_policy": memory.policy if memory else None,
            "full": full,
            "full_since": iso_ms(mark.get("since_ms")) if mark else None,
            "seen_by": mark.get("node") if mark else None,
            "refused_slots": [{"task": s["task"], "slot": s["slot"]} for s in _slot_list(mark.get("slots"))]
            if mark else []}


def describe_view(view: dict[str, Any]) -> str:
    """The memory figures of a ``redis_view`` as words."""
    if view.get("used_memory") is None:
        return "memory figures unreadable (INFO memory)"
    return RedisMemory(int(view["used_memory"]), int(view["maxmemory"] or 0),
                       str(view.get("maxmemory_policy") or "noeviction")).describe()

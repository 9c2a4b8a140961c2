"""dailyq's mark in the Redis it writes to, and what a node remembers when that Redis
loses its data (a restart without persistence, a FLUSHDB/FLUSHALL, a failover to an
empty replica, an eviction of our keys).

**The mark.** ``keys.generation`` holds ``{"token", "created_ms"}``, written (SET if
absent, in Lua) by the first process that finds none. Every scheduler and worker
remembers the token it saw at start (``GenerationWatch``) and reads the key again where
it costs no round trip: in the scheduler's heartbeat pipeline (every 5 s), in the
worker's beat (RQ's pipeline), and in the leader's tick whenever a slot is due, in one
pipeline with the paused tasks it reads then. A mark gone or changed is a loss: the
process that sees it first writes a new mark with ``previous`` (the old token),
``lost_since_ms`` (Redis's clock), ``noticed_by`` and ``last_seen_ms`` (when it last saw
the old mark), all in the new mark itself, as Redis lost everything else; others adopt
it. Each process logs the loss once (a WARNING), ``status`` shows it
(``redis_data_lost``), and the leader sends the ``redis_data_lost`` alert directly
(data_lost_alert.py).

**What a scheduler remembers** (``NodeMemory``), read in the same heartbeat pipeline:
the paused hash (every scheduler) and the cursors (a scheduler that is not the leader;
the leader has its own, ``DailyScheduler._cursors``). On a loss it writes them back
(``RESTORE_MEMORY``): a cursor only raised, a pause only where none is. The leader then
goes on from the highest cursors known, so no slot that any node knew fired fires again.

What no node can know after a loss is in docs/operations.md, "When Redis loses its data": which
runs finished (records, attempts and the finished sets are gone), pauses and cursors
changed in the 5 s before the loss, what a process that started after the loss never
saw, and fences (the counter restarts).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from redis import Redis
from redis.client import Pipeline

from .alerts.events import loss_text
from .keys import Keys
from .redis_values import as_text
from .scripts import scripts_for
from .timestamps import iso

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One mark, as read from Redis."""

    token: str
    created_ms: int | None = None
    # Set on the mark written when a loss was noticed: the token it replaced, when and by
    # which node that was noticed, and when that node last saw the old mark (Redis clock).
    previous: str | None = None
    lost_since_ms: int | None = None
    noticed_by: str | None = None
    last_seen_ms: int | None = None


def parse_generation(raw: bytes | str | None) -> Generation | None:
    """None when absent or unreadable (the script then writes a new one)."""
    if raw is None:
        return None
    try:
        data = json.loads(as_text(raw))
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        return None
    return Generation(token=data["token"], created_ms=_ms(data.get("created_ms")),
                      previous=data.get("previous") if isinstance(data.get("previous"), str) else None,
                      lost_since_ms=_ms(data.get("lost_since_ms")),
                      noticed_by=str(data["noticed_by"]) if data.get("noticed_by") is not None else None,
                      last_seen_ms=_ms(data.get("last_seen_ms")))


def _ms(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _iso_ms(ms: int | None) -> str | None:
    return iso(datetime.fromtimestamp(ms / 1000, timezone.utc)) if ms is not None else None


def data_loss_view(generation: Generation | None) -> dict[str, Any] | None:
    """``status --json``'s ``redis_data_lost``: None unless the mark in force was written
    after a loss; else since when (noticed, Redis's clock), the generations, who noticed,
    and when that node last saw the old mark (the loss lies between the two)."""
    if generation is None or generation.lost_since_ms is None:
        return None
    return {"since": _iso_ms(generation.lost_since_ms), "generation": generation.token,
            "previous": generation.previous, "node": generation.noticed_by,
            "last_seen": _iso_ms(generation.last_seen_ms)}


def read_data_loss(connection: Redis, keys: Keys) -> dict[str, Any] | None:
    return data_loss_view(parse_generation(connection.get(keys.generation)))


class GenerationWatch:
    """One process's memory of the mark it saw. ``observe`` is handed each read of the
    key; it returns the new mark once, when the one remembered is gone or changed (and
    logs it, once per change)."""

    def __init__(self, connection: Redis, keys: Keys, node: str, role: str) -> None:
        self.connection = connection
        self.keys = keys
        self.node = node
        self.role = role
        self.seen: Generation | None = None
        self.last_seen_ms: int | None = None  # Redis time of our last read that found ours

    def queue_read(self, pipe: Pipeline) -> None:
        pipe.get(self.keys.generation)

    def check(self, now: datetime | None = None) -> Generation | None:
        """Read the mark now (one GET): see ``observe``."""
        return self.observe(self.connection.get(self.keys.generation), now)

    def observe(self, raw: bytes | str | None, now: datetime | None = None) -> Generation | None:
        """``raw``: what a GET of the key returned; ``now``: Redis's time of that read
        (an estimate is fine). The first call only remembers (writing the mark if there
        is none). Returns the new mark when this call found ours gone or changed."""
        current = parse_generation(raw)
        if self.seen is not None and current is not None and current.token == self.seen.token:
            if now is not None:
                self.last_seen_ms = int(now.timestamp() * 1000)
            return None
        if self.seen is None and current is not None:
            self.seen = current
            return None
        remembered = self.seen.token if self.seen is not None else None
        written = scripts_for(self.connection).generation_ensure(
            generation_key=self.keys.generation, token=uuid.uuid4().hex[:16], remembered=remembered,
            node=self.node, last_seen_ms=self.last_seen_ms).run()
        adopted = parse_generation(written)
        if adopted is None:  # cannot be: the script writes a readable mark
            return None
        self.seen = adopted
        if now is not None:
            self.last_seen_ms = int(now.timestamp() * 1000)
        if remembered is None or adopted.token == remembered:
            return None
        view = data_loss_view(adopted)
        log.warning("%s on node %s: %s", self.role, self.node,
                    loss_text(view) if view else f"dailyq's mark in Redis changed from {remembered} to "
                                                 f"{adopted.token}: Redis lost or replaced its data")
        return adopted


class NodeMemory:
    """What one scheduler remembers of the paused tasks and the cursors, read in its
    heartbeat pipeline, and written back after a loss."""

    def __init__(self, connection: Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys
        self.paused: dict[str, str] = {}  # task -> the pause's JSON, as stored
        self.cursors: dict[str, str] = {}  # task -> ISO cursor, the highest seen

    def queue_reads(self, pipe: Pipeline, cursors: bool) -> int:
        """Queue the reads; returns how many replies they add. ``cursors``: also the
        cursor hash (a scheduler that is not the leader: the leader has its own)."""
        pipe.hgetall(self.keys.paused)
        if cursors:
            pipe.hgetall(self.keys.cursor)
        return 2 if cursors else 1

    def take(self, replies: list[Any]) -> None:
        self.paused = {as_text(k): as_text(v) for k, v in (replies[0] or {}).items()}
        if len(replies) > 1:
            self.remember_cursors({as_text(k): as_text(v) for k, v in (replies[1] or {}).items()})

    def remember_cursors(self, cursors: Mapping[str, str | datetime]) -> None:
        for task, value in cursors.items():
            text = value.isoformat() if isinstance(value, datetime) else value
            if task not in self.cursors or self.cursors[task] < text:
                self.cursors[task] = text

    def restore(self, cursors: Mapping[str, datetime]) -> tuple[dict[str, datetime], list[str]]:
        """Write back the remembered cursors (with ``cursors``, the leader's own) and
        pauses; returns (the cursors in Redis afterwards, the tasks paused again)."""
        self.remember_cursors(cursors)
        stored, restored = scripts_for(self.connection).restore_memory(
            cursor_key=self.keys.cursor, paused_key=self.keys.paused, cursors=sorted(self.cursors.items()),
            paused=sorted(self.paused.items())).run()
        merged = {}
        for task, text in stored.items():
            try:
                merged[task] = datetime.fromisoformat(text)
            except ValueError:
                continue
        return merged, restored

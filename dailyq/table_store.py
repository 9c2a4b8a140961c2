"""Task table descriptions in Redis: each process publishes its own (fingerprint.py
describes it) under ``keys.table(fingerprint)``, and its heartbeats keep it alive; any
process reads them by the fingerprints the heartbeats name."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from .fingerprint import Description, describe, fingerprint
from .keys import Keys
from .table import TaskTable

# A published description lives this long after the last heartbeat of a process that
# runs it: the tables of nodes long gone are forgotten.
TABLE_TTL_S = 86400


def publish(connection: Redis, keys: Keys, table: TaskTable, ttl_s: int = TABLE_TTL_S) -> str:
    """Store this table's description under its fingerprint (for ``ttl_s``; heartbeats
    keep it alive with ``keep_published``); returns the fingerprint."""
    description = describe(table)
    name = fingerprint(description)
    connection.set(keys.table(name), json.dumps(description, sort_keys=True, ensure_ascii=False), ex=ttl_s)
    return name


def keep_published(pipe: Any, keys: Keys, name: str, ttl_s: int = TABLE_TTL_S) -> None:
    """Queue, on ``pipe``, the EXPIRE that keeps a published description alive."""
    pipe.expire(keys.table(name), ttl_s)


class Descriptions:
    """Published descriptions read by fingerprint, cached for good: a fingerprint names
    one content, so what was read once never changes."""

    def __init__(self, connection: Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys
        self._known: dict[str, Description] = {}

    def get(self, name: str) -> Description | None:
        """The description named ``name``, or None when none is published (yet, or any more)."""
        if name not in self._known:
            raw = self.connection.get(self.keys.table(name))
            if raw is None:
                return None
            self._known[name] = json.loads(raw)
        return self._known[name]

    def remember(self, name: str, description: Description) -> None:
        self._known[name] = description

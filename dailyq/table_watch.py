"""Table differences in Redis: read for ``status``, ``health`` and ``/metrics``; kept by the leader.

* ``read_tables`` -- the ``tables`` view (table_skew.py) from the live processes the
  caller already read: the descriptions of the tables involved and the leader's
  first-seen times come in one round trip, and nothing is read at all while every live
  process runs the reference table (the usual case).
* ``TableWatch`` -- a tick hook of every scheduler (cli.py). Under the lease, every
  ``CHECK_EVERY_S`` (never per tick: an idle cluster's traffic is a budget; more often
  only for a threshold of seconds, as in tests) it reads the
  heartbeats (one round trip), records in ``keys.table_skew`` when each difference was
  first seen and drops those no longer seen (one Lua call, fenced by the lease, and
  only while some difference is seen or recorded), and hands a ``tables_differ`` alert
  for each difference older than ``Settings.table_skew_alert_s`` to the alert service,
  whose outbox takes each id once.

The record is kept whether or not alerts are on: ``status`` shows each difference's
``since`` from it, and ``health`` fails a node whose table has differed for too long.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Protocol

from redis import Redis
from redis.exceptions import RedisError

from .alerts.events import Alert, tables_differ_alert
from .beats import live_processes
from .fingerprint import Description, describe, fingerprint
from .keys import Keys
from .lease import Lease
from .ops.table_skew import differing_tables, lease_node, reference_of, tables_view
from .outage import OutageLog
from .redis_values import as_text
from .scripts import scripts_for
from .scripts.shared import lua_ms
from .settings import Settings
from .table import TaskTable


class Ticking(Protocol):
    """What a tick hook reads of the scheduler (scheduler.DailyScheduler): named by shape,
    not imported, so that status (which reads tables through this module) does not load
    the leader loop."""

    is_leader: bool
    lease: Lease

log = logging.getLogger(__name__)

# How often the leader compares the live processes' tables, at most.
CHECK_EVERY_S = 5.0
# The record is forgotten when no leader refreshed it for this long (a new difference
# after a long leaderless stretch starts afresh rather than inheriting an old "since").
SKEW_TTL_S = 3600


def read_tables(connection: Redis, keys: Keys, processes: list[dict[str, Any]], *, leader_node: str | None,
                own_table: str | None, own_description: Description | None = None) -> dict[str, Any]:
    """The ``tables`` view of ``processes`` (beats.live_processes entries); the caller's
    own table's description, when it has one, is not read from Redis."""
    known: dict[str, Description] = {}
    if own_table is not None and own_description is not None:
        known[own_table] = own_description
    reference, _ = reference_of(processes, leader_node, own_table)
    named = {str(p["table"]) for p in processes if p.get("table")}
    first_seen: dict[str, int] = {}
    if named - {reference}:
        wanted = sorted(t for t in named | {reference} if t is not None and t not in known)
        known.update(read_descriptions(connection, keys, wanted, first_seen))
    return tables_view(processes, leader_node=leader_node, own_table=own_table, descriptions=known,
                       first_seen_ms=first_seen)


def read_descriptions(connection: Redis, keys: Keys, tables: Iterable[str],
                      first_seen: dict[str, int] | None = None) -> dict[str, Description]:
    """The published descriptions of ``tables`` (those found, readable and matching
    their name) and, with ``first_seen``, the leader's record into it: one round trip."""
    names = list(tables)
    with connection.pipeline(transaction=False) as pipe:
        if names:
            pipe.mget([keys.table(name) for name in names])
        if first_seen is not None:
            pipe.hgetall(keys.table_skew)
        replies = pipe.execute()
    found: dict[str, Description] = {}
    for name, raw in zip(names, replies[0] if names else []):
        if raw is None:
            continue
        try:
            description = json.loads(raw)
        except ValueError:
            continue
        # A description is trusted only under its own name: fingerprints are a digest of it.
        if isinstance(description, dict) and fingerprint(description) == name:
            found[name] = description
    if first_seen is not None:
        for key, value in replies[-1].items():
            try:
                first_seen[as_text(key)] = lua_ms(value)
            except ValueError:
                continue
    return found


def node_table(processes: Iterable[Mapping[str, Any]], node: str) -> str | None:
    """The table this node's processes name (its scheduler's first): the reference of a
    caller without a table of its own (``health``) when no leader names one."""
    mine = {p["role"]: p.get("table") for p in processes if p["node"] == node}
    return mine.get("scheduler") or mine.get("worker")


def read_node_tables(connection: Redis, keys: Keys, node: str, now: datetime) -> dict[str, Any]:
    """The ``tables`` view as ``node``'s ``health`` sees it, without a table of its own:
    the reference is the leader's, else this node's (its scheduler's) table."""
    processes = live_processes(connection, keys, now, count_workers=False)
    return read_tables(connection, keys, processes, leader_node=lease_node(connection.get(keys.leader)),
                       own_table=node_table(processes, node))


class TableWatch:
    """The leader's record of table differences, and their ``tables_differ`` alerts."""

    def __init__(self, connection: Redis, settings: Settings, table: TaskTable,
                 raise_alerts: Callable[[list[Alert]], object] | None = None,
                 every_s: float | None = None) -> None:
        self.connection = connection
        self.settings = settings
        self.keys = settings.keys
        self.node = settings.node_name
        description = describe(table)
        self.own_table = fingerprint(description)
        self._descriptions: dict[str, Description] = {self.own_table: description}
        self.raise_alerts = raise_alerts
        # Every CHECK_EVERY_S, and a few times within the alert threshold when that is
        # shorter (tests use a second or two), never more often than once a second.
        self.every_s = every_s if every_s is not None else \
            min(CHECK_EVERY_S, max(1.0, settings.table_skew_alert_s / 4))
        self._scripts = scripts_for(connection)
        self._next_check = 0.0
        # Whether keys.table_skew may hold entries: unknown at a term's start, so the
        # first check of each term syncs it; after that, a check that finds every table
        # alike and knows the record empty writes nothing.
        self._maybe_recorded = True
        # (difference id, first seen ms) of every alert this process has handed over.
        self._raised: set[tuple[str, int]] = set()
        self._outage = OutageLog(log, f"the table check on node {settings.node_name}")
        self._last_failure_log = 0.0

    def on_tick(self, scheduler: Ticking) -> None:
        """Check every ``every_s`` while leading. Never raises: runs inside the tick."""
        if not scheduler.is_leader:
            self._next_check = 0.0
            self._maybe_recorded = True
            return
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.every_s
        try:
            self.check(scheduler.lease.key, scheduler.lease.owner)
            self._outage.recovered()
        except RedisError as exc:
            self._outage.failed(exc)
        except Exception:  # noqa: BLE001 - a failing check must not cost the scheduler its tick
            if time.monotonic() - self._last_failure_log > 60:
                self._last_failure_log = time.monotonic()
                log.exception("the table check failed on node %s; going on", self.node)

    def check(self, lease_key: str, owner: str) -> list[str]:
        """One look: the record brought up to date; returns the ids of the alerts raised."""
        processes = live_processes(self.connection, self.keys, count_workers=False)
        current = differing_tables(processes, self.own_table)
        if not current and not self._maybe_recorded:
            return []
        synced = self._scripts.table_skew_sync(skew_key=self.keys.table_skew, lease_key=lease_key, owner=owner,
                                               ttl_s=SKEW_TTL_S, differences=sorted(current)).run()
        if synced is None:
            return []  # not the lease holder (any more): the next leader keeps the record
        now_ms, first_seen = synced
        self._maybe_recorded = bool(current)
        self._raised &= set(first_seen.items())
        if self.raise_alerts is None:
            return []
        alert_ms = self.settings.table_skew_alert_s * 1000
        due = {difference_id for difference_id, first_ms in first_seen.items()
               if now_ms - first_ms >= alert_ms and (difference_id, first_ms) not in self._raised}
        if not due:
            return []
        wanted = [t for t in {self.own_table, *current.values()} if t not in self._descriptions]
        self._descriptions.update(read_descriptions(self.connection, self.keys, wanted))
        view = tables_view(processes, leader_node=self.node, own_table=self.own_table,
                           descriptions=self._descriptions, first_seen_ms=first_seen)
        # A difference whose other description is not published yet waits for a later check.
        alerts = [tables_differ_alert(view, difference, first_seen[difference["id"]],
                                      self.settings.table_skew_alert_s)
                  for difference in view["differences"] if difference["id"] in due]
        if not alerts:
            return []
        self.raise_alerts(alerts)
        self._raised |= {(difference["id"], first_seen[difference["id"]]) for difference in view["differences"]
                         if difference["id"] in due}
        return [alert.alert_id for alert in alerts]

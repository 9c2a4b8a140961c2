"""Prometheus metrics of a scheduler process (``DAILYQ_METRICS_PORT``).

Served with prometheus_client on ``DAILYQ_METRICS_BIND:DAILYQ_METRICS_PORT`` (any
path; ``/metrics`` by convention), from a thread of the scheduler process:

* ``dailyq_leader`` -- 1 on the node whose scheduler holds the lease, else 0;
* ``dailyq_runs{task,state}`` -- today's runs of each task (today in the task's zone),
  by state, as ``status`` counts them (every state listed, 0 included);
* ``dailyq_queue_jobs`` -- jobs waiting in our RQ queue;
* ``dailyq_run_duration_seconds{task}`` -- histogram of finished runs' durations: those
  finished today when this process started, then every run finished since;
* ``dailyq_slot_last_fired_timestamp_seconds{task}`` -- the time of the last slot the
  leader fanned out (its scheduled time, Unix seconds);
* ``dailyq_alert_outbox{state}`` -- alerts waiting (``pending``) or being sent
  (``in_flight``);
* ``dailyq_tables`` -- how many distinct task tables the live processes run (1 but
  during a rolling deploy; processes of versions that name none are not counted);
* ``dailyq_table_differs{node,role,table}`` -- per live process naming its table: 1 when
  that table differs from the reference (the leader's scheduler's, else this process's),
  else 0 (table_skew.py);
* ``dailyq_leader_heartbeat_timestamp_seconds`` -- when this process, as the leader,
  last sent the outside heartbeat and had a 2xx (heartbeat_ping.py); without
  ``DAILYQ_HEARTBEAT_URL``, when it last would have. Absent until this process first
  did; kept (growing old) after it stops leading, and shown while Redis is down, so
  ``time() - max(...)`` over all nodes is the cluster's silence;
* ``dailyq_pool_running{pool}`` / ``dailyq_pool_size{pool}`` -- per pool of the table's
  POOLS, its runs executing now (live slots of its tasks, limits.pool_use) and its size;
* ``dailyq_day_eta_timestamp_seconds`` -- when every run of today is expected to have
  ended (Unix seconds; ``status --json``'s ``eta``, eta.py), over the tasks' todays
  together; left out while that is unknown or nothing is pending;
* ``dailyq_redis_up`` -- 0 when this scrape could not read Redis (the cluster-wide
  figures are then left out rather than shown stale);
* prometheus_client's ``process_*``, ``python_gc_*`` and ``python_info``.

Everything but ``dailyq_leader`` and the heartbeat's time is the same cluster-wide
figure on every node: it is read from Redis when scraped, by the ``Collector`` below,
and kept for ``CACHE_S``
(longer on big days: a refresh that took t seconds is kept ``CACHE_DUTY * t``), so
that scrapes from several Prometheus servers of a 100,000-run day cost Redis one
HSCAN of the day every few seconds, not one per scrape.

A scrape that fails answers without the cluster-wide figures and is logged once per
outage; it never touches the scheduler's loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIServer
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from redis import Redis
from redis.exceptions import RedisError

from ..beats import live_processes
from ..clock import parse_iso
from ..day_feed import DayViews, read_counts
from ..day_scan import DayRecords
from ..errors import ConfigError
from ..fingerprint import table_fingerprint
from ..keys import Keys
from ..limits import pool_use
from ..outage import OutageLog
from ..params_book import ParamsBook, placeholder_record
from ..pausing import paused_tasks
from ..redis_values import as_text
from ..rq_seam import RQKeys, make_queue
from ..runs import FINISHED, MISSED, SCHEDULED, STATES, DaySlots, task_slots_on
from ..settings import Settings
from ..table import Task, TaskTable
from .status import read_eta, shown_runs
from .table_skew import lease_node, reference_of

log = logging.getLogger(__name__)

CACHE_S = 5.0
CACHE_DUTY = 10
DURATION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))  # last: +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(DURATION_BUCKETS):
            if value <= bound:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip([*map(_bound_text, DURATION_BUCKETS), "+Inf"], self.buckets):
            running += count
            out.append((bound, float(running)))
        return out


def _bound_text(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{bound:.1f}"


@dataclass(frozen=True)
class ClusterView:
    """The cluster-wide figures at one moment (read from Redis)."""

    runs: dict[tuple[str, str], int]  # (task, state) -> runs today
    queue_jobs: int
    last_fired: dict[str, float]  # task -> Unix time of its last fired slot
    outbox: tuple[int, int]  # pending, in flight
    tables: int = 0  # distinct tables the live processes name
    table_differs: tuple[tuple[str, str, str, bool], ...] = ()  # (node, role, table, differs from the reference)
    pools: dict[str, dict[str, int]] = field(default_factory=dict)  # pool -> {"size", "running", "set_aside"}
    eta: float | None = None  # Unix time every run of today is expected to have ended; None: unknown or done


def runs_by_state(tasks: list[Task], records: dict[str, dict], now: datetime,
                  book: ParamsBook | None = None, slots: DaySlots | None = None) -> Counter:
    """(task, state) -> runs of ``tasks`` on the day of ``records``, as status.day_status
    counts them: a run with a record in its state; one without, ``scheduled`` or, past its
    misfire grace, ``missed``. Counted per slot, without building every run's id. A
    computed task's slot counts its stored list (``book``, that day's), or one entry
    while it has none (params_book.placeholder_record). ``slots``: that day's stored
    once-a-day slots (runs.DaySlots), which its runs use."""
    counts: Counter = Counter()
    recorded: Counter = Counter()
    for record in records.values():
        counts[(record.get("task"), str(record.get("state")))] += 1
        recorded[(record.get("task"), record.get("slot"))] += 1
    return counts_by_state(tasks, counts, recorded, now, book, slots)


def counts_by_state(tasks: list[Task], states: Counter, recorded: Counter, now: datetime,
                    book: ParamsBook | None = None, slots: DaySlots | None = None) -> Counter:
    """``runs_by_state`` from counts instead of records (day_feed.DayCounts): ``states``
    (task, state) -> runs recorded, ``recorded`` (task, slot ISO) -> records of that slot."""
    names = {task.name for task in tasks}
    counts = Counter({key: number for key, number in states.items() if key[0] in names})
    return counts + _unrecorded(tasks, recorded, now, book, slots)


def _unrecorded(tasks: list[Task], recorded: Counter, now: datetime,
                book: ParamsBook | None, slots: DaySlots | None = None) -> Counter:
    counts: Counter = Counter()
    if not tasks:
        return counts
    for task in tasks:
        day = now.astimezone(ZoneInfo(task.tz)).date()
        for slot in task_slots_on(task, day, slots):
            entry = book.entry(task, slot) if book is not None and task.params_computed else None
            if task.params_computed and (entry is None or not entry.ok):
                counts[(task.name, str(placeholder_record(task, slot, entry, now)["state"]))] += 1
                continue
            expected = len(entry.params or []) if entry is not None else len(task.params)  # type: ignore[arg-type]
            missing = max(0, expected - recorded[(task.name, slot.isoformat())])
            if missing:
                due_at = slots.due_at(task, slot) if slots is not None else slot.fires_at
                overdue = now - due_at > timedelta(seconds=task.misfire_grace_s)
                counts[(task.name, MISSED if overdue else SCHEDULED)] += missing
    return counts


def _today(table: TaskTable, now: datetime) -> dict[date, list[Task]]:
    """Today in each task's zone -> the tasks for which it is today."""
    by_day: dict[date, list[Task]] = {}
    for task in table.tasks:
        by_day.setdefault(now.astimezone(ZoneInfo(task.tz)).date(), []).append(task)
    return by_day


def count_today(connection: Redis, keys: Keys, table: TaskTable, now: datetime) -> Counter:
    """Today's runs as ``runs_by_state`` counts them, from each day's counts
    (day_feed.read_counts): no record is read, whatever the day's size."""
    runs: Counter = Counter()
    for day, tasks in _today(table, now).items():
        counts = read_counts(connection, keys, day)
        computed = any(task.params_computed for task in tasks)
        runs += counts_by_state(tasks, counts.states, counts.slots, now,
                                ParamsBook.read(connection, keys, day) if computed else None,
                                DaySlots.read(connection, keys, day) if any(t.at for t in tasks) else None)
    return runs


def read_today(connection: Redis, keys: Keys, table: TaskTable, now: datetime,
               views: DayViews | None = None) -> tuple[Counter, dict[date, tuple[set[str], dict[str, dict]]]]:
    """Today's runs (today in each task's zone) as ``runs_by_state`` counts them, and
    per day read, its tasks' names and records. With ``views`` (a scraper's, kept between
    scrapes) the records changed since the last scrape are read (day_feed.py); without,
    one HSCAN of each such day (day_scan.py)."""
    runs: Counter = Counter()
    read: dict[date, tuple[set[str], dict[str, dict]]] = {}
    for day, tasks in _today(table, now).items():
        records: dict[str, dict] = (views.of(day).refresh() if views is not None  # type: ignore[assignment]
                                    else DayRecords.read(connection, keys.day_runs(day)).all)
        computed = any(task.params_computed for task in tasks)  # no read for a table of fixed lists
        runs += runs_by_state(tasks, records, now,
                              ParamsBook.read(connection, keys, day) if computed else None,
                              DaySlots.read(connection, keys, day) if any(t.at for t in tasks) else None)
        read[day] = ({t.name for t in tasks}, records)
    return runs, read


class Collector:
    """prometheus_client collector: the leader flag from this process, the rest from Redis."""

    def __init__(self, connection: Redis, keys: Keys, table: TaskTable, is_leader: Callable[[], bool],
                 cache_s: float = CACHE_S, last_heartbeat: Callable[[], float | None] = lambda: None) -> None:
        self.connection = connection
        self.last_heartbeat = last_heartbeat
        self.keys = keys
        self.table = table
        self.is_leader = is_leader
        self.cache_s = cache_s
        self.queue_key = RQKeys(make_queue(connection, keys)).queue
        self.table_fingerprint = table_fingerprint(table)
        self._lock = threading.Lock()
        self._view: ClusterView | None = None
        self._fresh_until = 0.0
        self._durations: dict[str, _Histogram] = {task.name: _Histogram() for task in table.tasks}
        self._observed: dict[date, set[str]] = {}  # runs whose duration is in the histogram, per day
        self._views = DayViews(connection, keys)  # today's records, kept between scrapes (day_feed.py)
        self._outage = OutageLog(log, "a metrics scrape")
        self._last_failure_log = 0.0

    def describe(self) -> Iterator[Metric]:
        # Names only (no Redis read when registering).
        yield GaugeMetricFamily("dailyq_leader", "")
        yield GaugeMetricFamily("dailyq_redis_up", "")
        yield GaugeMetricFamily("dailyq_leader_heartbeat_timestamp_seconds", "")
        yield GaugeMetricFamily("dailyq_runs", "", labels=["task", "state"])
        yield GaugeMetricFamily("dailyq_queue_jobs", "")
        yield GaugeMetricFamily("dailyq_slot_last_fired_timestamp_seconds", "", labels=["task"])
        yield GaugeMetricFamily("dailyq_alert_outbox", "", labels=["state"])
        yield GaugeMetricFamily("dailyq_tables", "")
        yield GaugeMetricFamily("dailyq_table_differs", "", labels=["node", "role", "table"])
        yield GaugeMetricFamily("dailyq_pool_running", "", labels=["pool"])
        yield GaugeMetricFamily("dailyq_pool_size", "", labels=["pool"])
        yield GaugeMetricFamily("dailyq_day_eta_timestamp_seconds", "")
        yield HistogramMetricFamily("dailyq_run_duration_seconds", "", labels=["task"])

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("dailyq_leader", "1 when this node's scheduler holds the leader lease, else 0",
                                value=1.0 if self.is_leader() else 0.0)
        # From this process, before Redis is read: it must show (and age) while Redis is down.
        last_beat = self.last_heartbeat()
        if last_beat is not None:
            yield GaugeMetricFamily("dailyq_leader_heartbeat_timestamp_seconds",
                                    "When this node, as the leader, last sent the outside heartbeat (answered 2xx), "
                                    "or without DAILYQ_HEARTBEAT_URL last would have (Unix seconds)", value=last_beat)
        view = self.refresh()
        yield GaugeMetricFamily("dailyq_redis_up", "1 when this scrape read Redis, else 0 (then the cluster-wide "
                                "figures are left out)", value=1.0 if view else 0.0)
        if view is None:
            return
        runs = GaugeMetricFamily("dailyq_runs", "Today's runs of each task (today in the task's zone), by state",
                                 labels=["task", "state"])
        for task in self.table.tasks:
            for state in STATES:
                runs.add_metric([task.name, state], float(view.runs.get((task.name, state), 0)))
        yield runs
        yield GaugeMetricFamily("dailyq_queue_jobs", "Jobs waiting in dailyq's RQ queue", value=float(view.queue_jobs))
        fired = GaugeMetricFamily("dailyq_slot_last_fired_timestamp_seconds",
                                  "Scheduled time of the last slot the leader fanned out, per task (Unix seconds)",
                                  labels=["task"])
        for name, seconds in sorted(view.last_fired.items()):
            fired.add_metric([name], seconds)
        yield fired
        outbox = GaugeMetricFamily("dailyq_alert_outbox", "Alerts waiting to be sent (pending) or being sent "
                                   "(in_flight)", labels=["state"])
        outbox.add_metric(["pending"], float(view.outbox[0]))
        outbox.add_metric(["in_flight"], float(view.outbox[1]))
        yield outbox
        yield GaugeMetricFamily("dailyq_tables", "Distinct task tables the live processes run (more than 1 during a "
                                "rolling deploy)", value=float(view.tables))
        differs = GaugeMetricFamily("dailyq_table_differs", "1 for a live process whose task table differs from the "
                                    "leader's, else 0", labels=["node", "role", "table"])
        for node, role, table, differ in view.table_differs:
            differs.add_metric([node, role, table], 1.0 if differ else 0.0)
        yield differs
        running = GaugeMetricFamily("dailyq_pool_running", "Runs of the pool's tasks executing now", labels=["pool"])
        size = GaugeMetricFamily("dailyq_pool_size", "How many runs of the pool's tasks may execute at once (POOLS)",
                                 labels=["pool"])
        for name, use in sorted(view.pools.items()):
            running.add_metric([name], float(use["running"]))
            size.add_metric([name], float(use["size"]))
        yield running
        yield size
        eta = GaugeMetricFamily("dailyq_day_eta_timestamp_seconds", "When every run of today is expected to have "
                                "ended (Unix seconds); absent while unknown or when nothing is pending")
        if view.eta is not None:
            eta.add_metric([], view.eta)
        yield eta
        durations = HistogramMetricFamily("dailyq_run_duration_seconds", "Durations of finished runs seen since this "
                                          "scheduler started (and today's before)", labels=["task"])
        with self._lock:
            for name, histogram in sorted(self._durations.items()):
                durations.add_metric([name], histogram.cumulative(), histogram.total)
        yield durations

    def refresh(self) -> ClusterView | None:
        """The cached view, read again when older than the cache time; None when Redis
        failed (logged once per outage)."""
        with self._lock:
            if self._view is not None and time.monotonic() < self._fresh_until:
                return self._view
            started = time.monotonic()
            try:
                view = self._read()
            except RedisError as exc:
                self._outage.failed(exc)
                self._view = None
                return None
            except Exception:  # noqa: BLE001 - a scrape must answer, and must not end the scheduler
                if time.monotonic() - self._last_failure_log > 60:
                    self._last_failure_log = time.monotonic()
                    log.exception("reading the metrics from Redis failed; this scrape has no cluster-wide figures")
                self._view = None
                return None
            self._outage.recovered()
            self._view = view
            self._fresh_until = time.monotonic() + max(self.cache_s, CACHE_DUTY * (time.monotonic() - started))
            return view

    def _read(self) -> ClusterView:
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.llen(self.queue_key)
            pipe.hgetall(self.keys.cursor)
            pipe.zcard(self.keys.alert_outbox)
            pipe.zcard(self.keys.alert_in_flight)
            pipe.get(self.keys.leader)
            (seconds, micros), queue_jobs, cursor, pending, in_flight, leader = pipe.execute()
        now = datetime.fromtimestamp(seconds + micros / 1e6, timezone.utc)
        runs, read = read_today(self.connection, self.keys, self.table, now, self._views)
        paused = paused_tasks(self.connection, self.keys)
        shown: list[dict] = []  # today's runs as status shows them, for the ETA
        for day, (names, records) in read.items():
            self._observe(day, names, records)
            tasks = [task for task in self.table.tasks if task.name in names]
            # Small hashes, read only for tables that have computed params or once-a-day tasks.
            book = ParamsBook.read(self.connection, self.keys, day) if any(t.params_computed for t in tasks) else None
            slots = DaySlots.read(self.connection, self.keys, day) if any(t.at for t in tasks) else None
            shown += shown_runs(self.table, day, now, dict(records), paused, book, slots, task_names=names)
        for day in [d for d in self._observed if d not in read]:
            del self._observed[day]
        last_fired = {}
        for name, value in cursor.items():
            moment = parse_iso(as_text(value))
            if moment is not None:
                last_fired[as_text(name)] = moment.timestamp()
        nodes = live_processes(self.connection, self.keys, now)
        tables, differs = self._tables(leader, nodes)
        pools = pool_use(self.connection, self.keys, self.table, seconds * 1000 + micros // 1000)
        # The same day's records, already read: the ETA adds one HMGET of the pending runs' durations.
        expected_end = read_eta(self.connection, self.keys, self.table, shown, nodes, now).at
        return ClusterView(dict(runs), int(queue_jobs), last_fired, (int(pending), int(in_flight)), tables, differs,
                           pools, None if expected_end is None else expected_end.timestamp())

    def _tables(self, leader: bytes | None,
                nodes: list[dict]) -> tuple[int, tuple[tuple[str, str, str, bool], ...]]:
        """(distinct tables, per process naming one: node, role, table, differs), from
        ``nodes`` (beats.live_processes)."""
        processes = [p for p in nodes if p.get("table")]
        reference, _ = reference_of(processes, lease_node(leader), self.table_fingerprint)
        differs = tuple((str(p["node"]), str(p["role"]), str(p["table"]), p["table"] != reference) for p in processes)
        return len({p["table"] for p in processes}), differs

    def _observe(self, day: date, tasks: set[str], records: dict[str, dict]) -> None:
        """Add each finished run not seen before to its task's histogram (a rerun that
        finished again is a new observation: it has a new end)."""
        seen = self._observed.setdefault(day, set())
        for run_id, record in records.items():
            if record.get("state") != FINISHED or record.get("task") not in tasks:
                continue
            duration = record.get("duration_s")
            if not isinstance(duration, (int, float)):
                continue
            key = f"{run_id}@{record.get('ended_at')}"
            if key in seen:
                continue
            seen.add(key)
            self._durations.setdefault(str(record["task"]), _Histogram()).observe(float(duration))


class MetricsServer:
    def __init__(self, server: WSGIServer, thread: threading.Thread, where: str) -> None:
        self.server = server
        self.thread = thread
        self.where = where

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(settings: Settings, connection: Redis, table: TaskTable, is_leader: Callable[[], bool],
                  last_heartbeat: Callable[[], float | None] = lambda: None) -> MetricsServer:
    """Start serving on ``DAILYQ_METRICS_BIND:DAILYQ_METRICS_PORT``; ConfigError (one line)
    when that address cannot be bound. ``last_heartbeat``: heartbeat_ping.HeartbeatPing's
    ``last_beat_s``."""
    assert settings.metrics_port is not None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(connection, settings.keys, table, is_leader, last_heartbeat=last_heartbeat))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    bind, port = settings.metrics_bind, settings.metrics_port
    try:
        server, thread = start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {bind}:{port} ({exc.strerror or exc}): set DAILYQ_METRICS_PORT "
                          "to a free port, or DAILYQ_METRICS_BIND to an address of this machine") from None
    host = f"[{bind}]" if ":" in bind else bind
    return MetricsServer(server, thread, f"http://{host}:{port}/metrics")

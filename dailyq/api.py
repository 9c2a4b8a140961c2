"""The commands as functions, for scripts and web apps: ``trigger``, ``rerun``, ``cancel``,
``day_status``, ``pause``, ``resume`` and ``doctor`` do what ``scheduler.py
trigger|rerun|cancel|status --json|pause|resume|doctor --json`` do, and ``trigger_range`` and
``days_status`` what ``trigger --from --to`` and ``status --from --to --json`` do; they
return data instead of printing it.

Each takes a Redis client or a ``REDIS_URL``-style string (``redis://``, ``rediss://``,
``unix://``, ``redis+sentinel://``). Whatever is not given comes from the environment,
as for every dailyq process: ``settings`` from ``Settings.from_env()`` (the key prefix,
``DAILYQ_PREFIX``, above all), ``table`` from the module ``DAILYQ_TASKS`` names. A
client given is used and left open; one made from a URL is closed before returning.

Errors are ``dailyq.DailyqError``s with one line that says what to fix: ``ConfigError``
for a bad date, an unknown task or param, a bad table or URL; ``RedisUnavailable`` when
the server cannot be reached or refuses us. (Redis failing in the middle of a call
raises redis-py's own ``RedisError``.)

"Today" and "now" are read from Redis's clock (``TIME``), as the CLI does: every node
shares it, whatever the caller's own clock says.

Imported lazily by ``dailyq/__init__.py``: task modules import ``dailyq`` and must
not pull in redis and RQ for it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from datetime import date, datetime
from typing import Any, Iterable, Iterator, Sequence, Union

from redis import Redis

from .backfill import day_range, day_summary
from .cancelling import CancelledRun, asking_user
from .cancelling import cancel as _cancel_command
from .clock import iso, server_now
from .commands import pause as _pause_command
from .commands import rerun as _rerun_command
from .commands import resume as _resume_command
from .commands import select_params
from .commands import trigger as _trigger_command
from .connection import connect
from .errors import ConfigError
from .ops.status import day_runs as _day_runs
from .ops.status import day_status as _day_status
from .runs import Run, decode_record
from .settings import Settings
from .table import Task, TaskTable, default_day, encode_param, load_table

__all__ = ["ConnectionOrUrl", "DayLike", "TableLike", "cancel", "day_status", "days_status", "default_day", "doctor",
           "pause", "rerun", "resume", "trigger", "trigger_range"]

ConnectionOrUrl = Union[Redis, str]
DayLike = Union[date, str, None]  # a date, "YYYY-MM-DD", or None for today in the tasks' zone
TableLike = Union[TaskTable, Sequence[Task], None]


def trigger(connection_or_url: ConnectionOrUrl, day: DayLike = None, tasks: Iterable[str] | str | None = None, *,
            settings: Settings | None = None, table: TableLike = None) -> dict[str, Any]:
    """Fan out every run of ``day`` now (ad-hoc or a backfill), like ``scheduler.py
    trigger``. Idempotent: a run enqueued before, by anyone, is not enqueued again.

    ``tasks``: task names (or one name); None for every task in the table.

    Returns ``{"date": "YYYY-MM-DD", "tasks": [names], "enqueued": [run, ...],
    "already": [run, ...], "params_failed": [failure, ...]}``, each run ``{"task",
    "param", "slot", "run_id", "job_id"}``: ``enqueued`` were pushed by this call,
    ``already`` by an earlier one. The job id is the RQ job's id. A computed task's
    runs are those of the list stored for the day (made now when none is stored);
    ``params_failed`` are its slots whose callable failed, each ``{"task", "slot",
    "error", "attempts", "next_try_at"}``: they have no runs (the leader retries them).
    """
    settings, table_ = _settings_and_table(settings, table)
    names = _task_names(table_, tasks)
    parsed_day = _parse_day(day)
    from .rq_seam import make_queue  # noqa: PLC0415 - RQ only where a queue is needed

    with _connection(connection_or_url, settings) as connection:
        now = server_now(connection)
        day_ = parsed_day or default_day(table_, now)
        return _trigger_day(connection, settings, make_queue(connection, settings.keys), table_, day_, names, now)


def trigger_range(connection_or_url: ConnectionOrUrl, start: DayLike, end: DayLike,
                  tasks: Iterable[str] | str | None = None, *, settings: Settings | None = None,
                  table: TableLike = None) -> dict[str, Any]:
    """Backfill: ``trigger`` each day from ``start`` to ``end``, both included, at most
    ``backfill.MAX_RANGE_DAYS`` days (``scheduler.py trigger --from D1 --to D2``). Each
    run carries its own day (``current_run().day``); idempotent like ``trigger``.

    Returns ``{"from", "to", "tasks", "days": [trigger's object per day, in order]}``.
    """
    settings, table_ = _settings_and_table(settings, table)
    names = _task_names(table_, tasks)
    days = _range(start, end)
    from .rq_seam import make_queue  # noqa: PLC0415

    with _connection(connection_or_url, settings) as connection:
        now = server_now(connection)
        queue = make_queue(connection, settings.keys)
        results = [_trigger_day(connection, settings, queue, table_, day_, names, now) for day_ in days]
    return {"from": days[0].isoformat(), "to": days[-1].isoformat(),
            "tasks": names or [task.name for task in table_.tasks], "days": results}


def _trigger_day(connection: Redis, settings: Settings, queue: Any, table: TaskTable, day: date,
                 names: list[str] | None, now: datetime) -> dict[str, Any]:
    result = _trigger_command(connection, settings.keys, queue, table, day, names, settings.retention_s, now,
                              wait_replicas=settings.wait_replicas)
    # Trigger enqueues each run's first job, whose id is the run id (runs.Run.job_id).
    by_job_id = {run.job_id(): run for run in result.runs}
    return {"date": day.isoformat(), "tasks": names or [task.name for task in table.tasks],
            "enqueued": [_run_entry(by_job_id[job_id], job_id) for job_id in result.enqueued],
            "already": [_run_entry(by_job_id[job_id], job_id) for job_id in result.already],
            "params_failed": [{"task": f.task, "slot": f.slot, "error": f.error, "attempts": f.attempts,
                               "next_try_at": f.next_try_at} for f in result.params_failed]}


def rerun(connection_or_url: ConnectionOrUrl, task: str, params: Iterable[Any] = (), day: DayLike = None,
          force: bool = False, *, refresh_params: bool = False, settings: Settings | None = None,
          table: TableLike = None) -> dict[str, Any]:
    """Run ``task`` again for ``day``, like ``scheduler.py rerun``.

    ``params``: which of the task's params (their values, or their JSON text as on the
    command line: ``3`` or ``"3"`` for the param 3; one string is one param); empty for
    all of them. Without
    ``force``, runs that finished, and runs queued, running or waiting now, are skipped; with it
    they run again (still never two copies of one run at once).

    Returns ``{"date", "task", "force", "enqueued": [run, ...], "finished": [run, ...],
    "in_progress": [run, ...]}`` (the last two: skipped), each run ``{"task", "param",
    "slot", "run_id", "job_id"}``. ``job_id`` is the run's current RQ job (a rerun of a
    run enqueued before gets a new one, ``{run_id}-rN``), None if it never had one.

    A computed task's params are those stored for the day (its callable is not called
    again); ``refresh_params`` calls it again and replaces the stored list first (a
    failure raises ``DailyqError`` and keeps the old list).
    """
    settings, table_ = _settings_and_table(settings, table)
    task_ = table_.get(task)
    # One string is one param, not its characters.
    wanted = [params] if isinstance(params, str) else list(params)
    if not task_.params_computed:  # a computed task's params are known only from Redis
        select_params(task_, wanted)  # an unknown param: a clear error before Redis is asked anything
    parsed_day = _parse_day(day)
    from .rq_seam import make_queue  # noqa: PLC0415

    with _connection(connection_or_url, settings) as connection:
        day_ = parsed_day or default_day(table_, server_now(connection))
        report = _rerun_command(connection, settings.keys, make_queue(connection, settings.keys), table_,
                                task_.name, wanted, day_, force, settings.retention_s, refresh_params,
                                wait_replicas=settings.wait_replicas)
        groups = {"enqueued": report.enqueued, "finished": report.finished, "in_progress": report.in_progress}
        every = [run for runs in groups.values() for run in runs]
        # The job ids fan_out chose (a rerun's -rN) are in the records it just wrote.
        raw = connection.hmget(settings.keys.day_runs(day_), [run.run_id for run in every]) if every else []
    job_ids = {run.run_id: decode_record(record).get("job_id") if record else None for run, record in zip(every, raw)}
    return {"date": day_.isoformat(), "task": task_.name, "force": force,
            **{name: [_run_entry(run, job_ids[run.run_id]) for run in runs] for name, runs in groups.items()}}


def cancel(connection_or_url: ConnectionOrUrl, day: DayLike, task: str | None = None, params: Iterable[Any] = (),
           run_id: str | Iterable[str] | None = None, *, user: str | None = None, settings: Settings | None = None,
           table: TableLike = None) -> dict[str, Any]:
    """Cancel runs of ``day``, like ``scheduler.py cancel``: ``run_id`` (one or several run
    ids, or a rerun's job id), or the runs of ``task`` (only ``params`` when given: values
    or JSON text, as for ``rerun``), or every run of the day. A run executing stops within
    about a second, on any node (its claim renewer is told); a queued, waiting or set-aside run
    never starts. Each ends ``cancelled``, its error "cancelled by USER on NODE" (``user``:
    default the login name; the node is ``NODE_NAME``); ``rerun`` runs it again.

    Returns ``{"date", "by", "cancelled": [run, ...], "ended": [run, ...]}``, each run
    ``{"task", "param", "slot", "run_id", "state", "node", "executing"}``: ``cancelled``
    with the state it had (``executing``: a copy was running it and stops), ``ended``
    the runs chosen that had ended already (finished, failed, ...: nothing to cancel).
    """
    settings, table_ = _settings_and_table(settings, table)
    parsed_day = _parse_day(day)
    if parsed_day is None:
        raise ConfigError("cancel needs a day: --date YYYY-MM-DD")
    ids = [run_id] if isinstance(run_id, str) else list(run_id or [])
    wanted = [params] if isinstance(params, str) else [p if isinstance(p, str) else encode_param(p) for p in params]
    from .rq_seam import make_queue  # noqa: PLC0415
    with _connection(connection_or_url, settings) as connection:
        report = _cancel_command(connection, settings.keys, make_queue(connection, settings.keys), table_,
                                 parsed_day, task_name=task, params=wanted,
                                 run_ids=ids, node=settings.node_name, user=user or asking_user(),
                                 retention_s=settings.retention_s, now_iso=iso(server_now(connection)))

    def entry(run: CancelledRun) -> dict[str, Any]:
        return {"task": run.task, "param": run.param, "slot": run.slot, "run_id": run.run_id, "state": run.state,
                "node": run.node, "executing": run.executing}

    return {"date": parsed_day.isoformat(), "by": report.by, "cancelled": [entry(r) for r in report.cancelled],
            "ended": [entry(r) for r in report.ended]}


def day_status(connection_or_url: ConnectionOrUrl, day: DayLike = None, *, settings: Settings | None = None,
               table: TableLike = None) -> dict[str, Any]:
    """Every run of ``day`` with its state, the leader and the live nodes: the object
    ``scheduler.py status --json`` prints (its keys are a public contract)."""
    settings, table_ = _settings_and_table(settings, table)
    parsed_day = _parse_day(day)
    with _connection(connection_or_url, settings) as connection:
        now = server_now(connection)
        status = _day_status(connection, settings.keys, table_, parsed_day or default_day(table_, now), now)
        status["alerts"] = _alert_summary(connection, settings)
        return status


def doctor(connection_or_url: ConnectionOrUrl, day: DayLike = None, *, repair: bool = False,
           settings: Settings | None = None, table: TableLike = None) -> dict[str, Any]:
    """Every inconsistency between ``day``'s run records and what should back them (the
    queue, RQ's registries, rq-scheduler's delayed jobs, claims, the running hash, the
    day's waiting hash, set-aside lists, left jobs), like ``scheduler.py doctor --json``
    (the kinds: dailyq/ops/consistency.py).

    Returns ``{"date", "problems": [{"run_id", "kind", "state", "job_id", "detail",
    "repair"}, ...], "repaired"}``. With ``repair`` each problem's repair is applied, in
    a check-and-set that leaves a record changed since it was read alone, and the
    problem has an ``"outcome"`` saying what happened; ``repaired`` is then true.
    """
    from .ops.consistency import examine  # noqa: PLC0415 - RQ's queue only where one is needed
    from .rq_seam import make_queue  # noqa: PLC0415

    settings, table_ = _settings_and_table(settings, table)
    parsed_day = _parse_day(day)
    with _connection(connection_or_url, settings) as connection:
        now = server_now(connection)
        return examine(connection, settings.keys, make_queue(connection, settings.keys), table_,
                       parsed_day or default_day(table_, now), fix=repair, retention_s=settings.retention_s,
                       now_iso=iso(now))


def pause(connection_or_url: ConnectionOrUrl, tasks: Iterable[str] | str | None = None, *, all_tasks: bool = False,
          settings: Settings | None = None, table: TableLike = None) -> dict[str, Any]:
    """Pause ``tasks`` (a name or names), or with ``all_tasks`` every task, like
    ``scheduler.py pause``: their slots are not fanned out and their queued runs not
    started until ``resume``; runs executing now finish (see dailyq/pausing.py).

    Returns ``{"paused": [{"task", "since", "by", "already"}, ...]}``: ``since`` (ISO,
    Redis's clock) and ``by`` (the node, ``NODE_NAME``) of the pause in force;
    ``already`` when the task was paused before this call (its first pause is kept).
    """
    settings, table_ = _settings_and_table(settings, table)
    names = _chosen_tasks(table_, tasks, all_tasks)
    with _connection(connection_or_url, settings) as connection:
        results = _pause_command(connection, settings.keys, table_, names, settings.node_name)
    return {"paused": [{"task": r.task, "since": r.since, "by": r.by, "already": r.already} for r in results]}


def resume(connection_or_url: ConnectionOrUrl, tasks: Iterable[str] | str | None = None, *, all_tasks: bool = False,
           settings: Settings | None = None, table: TableLike = None) -> dict[str, Any]:
    """Resume ``tasks`` (a name or names), or with ``all_tasks`` every paused task, like
    ``scheduler.py resume``: slots that fell due while paused fire if within the task's
    ``misfire_grace_s`` (older ones are missed), and its set-aside runs go back to the front
    of the queue.

    Returns ``{"resumed": [{"task", "was_paused", "requeued"}, ...]}``: ``requeued`` is
    the number of set-aside runs put back in the queue.
    """
    settings, table_ = _settings_and_table(settings, table)
    names = _chosen_tasks(table_, tasks, all_tasks)
    from .rq_seam import make_queue  # noqa: PLC0415

    with _connection(connection_or_url, settings) as connection:
        results = _resume_command(connection, settings.keys, make_queue(connection, settings.keys), table_, names)
    if names is None:  # --all: report the tasks that were paused (every task would be noise)
        results = [r for r in results if r.was_paused or r.requeued]
    return {"resumed": [{"task": r.task, "was_paused": r.was_paused, "requeued": r.requeued} for r in results]}


def days_status(connection_or_url: ConnectionOrUrl, start: DayLike, end: DayLike, *,
                settings: Settings | None = None, table: TableLike = None) -> list[dict[str, Any]]:
    """One summary per day from ``start`` to ``end`` (both included, at most
    ``backfill.MAX_RANGE_DAYS``), what ``scheduler.py status --from D1 --to D2 --json``
    prints: ``[{"date", "total", "done", "failed", "states": {state: runs}}, ...]``
    (``done``: finished runs; ``states`` has every state of ``status``)."""
    settings, table_ = _settings_and_table(settings, table)
    days = _range(start, end)
    with _connection(connection_or_url, settings) as connection:
        now = server_now(connection)
        return [day_summary(day_, _day_runs(connection, settings.keys, table_, day_, now)) for day_ in days]


# -- helpers ----------------------------------------------------------------------------


def _chosen_tasks(table: TaskTable, tasks: Iterable[str] | str | None, all_tasks: bool) -> list[str] | None:
    """Task names (checked against the table), or None for every task."""
    names = [tasks] if isinstance(tasks, str) else (list(tasks) if tasks is not None else [])
    if all_tasks == bool(names):
        raise ConfigError("name the tasks or ask for all of them (--all), not both or neither")
    if all_tasks:
        return None
    return [table.get(name).name for name in names]


def _alert_summary(connection: Redis, settings: Settings) -> dict[str, object]:
    """Where alerts go (the URL redacted: it holds a token) and how many wait (the
    outbox is cluster-wide, not per day)."""
    from .alerts.outbox import Outbox  # noqa: PLC0415

    pending, in_flight = Outbox(connection, settings.keys, settings.retention_s).counts()
    return {"url": settings.redacted_alert_url(), "pending": pending, "in_flight": in_flight}


def _settings_and_table(settings: Settings | None, table: TableLike) -> tuple[Settings, TaskTable]:
    settings = settings or Settings.from_env()
    if table is None:
        return settings, load_table(settings.tasks_module)
    # A list of Task is validated like a table module's TASKS.
    return settings, table if isinstance(table, TaskTable) else TaskTable(table)


def _task_names(table: TaskTable, tasks: Iterable[str] | str | None) -> list[str] | None:
    """The names asked for (one string is one name), each checked: an unknown task is a
    clear error before Redis is asked anything. None: every task."""
    names = [tasks] if isinstance(tasks, str) else (list(tasks) if tasks is not None else None)
    return [table.get(name).name for name in names] if names else None


def _range(start: DayLike, end: DayLike) -> list[date]:
    first, last = _parse_day(start), _parse_day(end)
    if first is None or last is None:
        raise ConfigError("a range needs both ends: --from YYYY-MM-DD --to YYYY-MM-DD")
    return day_range(first, last)


def _parse_day(day: DayLike) -> date | None:
    if day is None or isinstance(day, date):
        # datetime is a date too: take its date, not a moment.
        return day.date() if isinstance(day, datetime) else day
    if isinstance(day, str):
        try:
            return date.fromisoformat(day)
        except ValueError:
            raise ConfigError(f"bad date {day!r}: use YYYY-MM-DD") from None
    raise ConfigError(f"bad date {day!r}: give a datetime.date or 'YYYY-MM-DD'")


@contextmanager
def _connection(connection_or_url: ConnectionOrUrl, settings: Settings) -> Iterator[Redis]:
    """The caller's client as it is, or a client for the URL (checked, one-line errors,
    like every dailyq process's), closed afterwards."""
    if isinstance(connection_or_url, str):
        connection = connect(replace(settings, redis_url=connection_or_url))
        try:
            yield connection
        finally:
            connection.close()
    elif isinstance(connection_or_url, Redis):
        yield connection_or_url
    else:
        raise ConfigError(f"need a redis.Redis client or a Redis URL string, not {type(connection_or_url).__name__}")


def _run_entry(run: Run, job_id: str | None) -> dict[str, Any]:
    return {"task": run.task.name, "param": run.param, "slot": run.slot.isoformat(), "run_id": run.run_id,
            "job_id": job_id}

"""The task table: what runs, with which params, when.

The table is the attribute ``TASKS`` of the module named by ``DAILYQ_TASKS``
(default ``jobs``): a list of ``Task``, and optionally ``POOLS``, a dict pool name ->
size that tasks name in ``Task(pool=...)`` (limits.py). It is validated once, when
loaded, so a bad table stops a process at start with one line naming the task (or
the pool), not at 3 a.m.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

from .errors import ConfigError
from .schedule import Schedule, parse_at

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
OVERLAP_POLICIES = ("skip", "wait")


@dataclass
class Task:
    """One daily task: ``func`` is called once per param at each slot.

    The field names are a public contract: keep them, add new ones at the end.
    """

    name: str
    func: Callable[[Any], Any] | str
    # A list of JSON values, or a callable (or its dotted path) taking the run's day and
    # returning one: the leader calls it once when the slot fires and stores the list
    # with the day's runs (params_book.py); everyone else reads the stored list.
    params: list[Any] | Callable[[date], list[Any]] | str
    at: str | None = None
    cron: str | None = None
    tz: str = "UTC"
    timeout_s: int = 3600
    retries: int = 2
    misfire_grace_s: int = 3600
    overlap: str = "wait"
    retry_backoff_s: int = 10
    # "HH:MM" (or "HH:MM:SS") in ``tz``: a run of the day not finished by then raises a
    # ``day_late`` alert (alert_events.deadline_at says which moment that is).
    deadline: str | None = None
    # Names of tasks whose every run of the same day must have finished before a run of
    # this one starts (dependencies.py). Until then this task's runs are 'waiting'.
    after: list[str] = field(default_factory=list)
    # At most this many runs of this task execute at once across all nodes / on any one
    # node (limits.py); None: no limit.
    max_running: int | None = None
    max_per_node: int | None = None
    # A name from the table's POOLS: at most POOLS[pool] runs of all the pool's tasks
    # execute at once across all nodes (limits.py); None: in no pool.
    pool: str | None = None
    schedule: Schedule = field(init=False, repr=False, compare=False)

    @property
    def func_path(self) -> str:
        """Dotted import path of ``func``: what RQ stores and every node imports."""
        if isinstance(self.func, str):
            return self.func
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def validate(self) -> None:
        """Raise ConfigError naming this task on the first thing wrong with it."""
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise ConfigError(f"task {self.name!r}: name must match [A-Za-z0-9_-]+")
        problem = _first_problem(self)
        if problem:
            raise ConfigError(f"task {self.name!r}: {problem}")

    def resolve(self) -> Callable[[Any], Any]:
        return _import_callable(self.func_path)

    @property
    def params_computed(self) -> bool:
        """True when params come from a callable called at the slot, not a fixed list."""
        return not isinstance(self.params, (list, tuple))

    @cached_property
    def encoded_params(self) -> tuple[str, ...]:
        """A fixed list's params as canonical JSON, in order, encoded once per process: every
        run of every day needs its param's (its run id), and a 100k-param table spent
        seconds of each ``status`` encoding them again. Empty for computed params."""
        return () if self.params_computed else tuple(map(encode_param, self.params))  # type: ignore[arg-type]

    @cached_property
    def param_digests(self) -> tuple[str, ...]:
        """``param_digest`` of each of ``encoded_params``, in order: the last part of each
        of its runs' ids (runs.Run.run_id), hashed once per process, not once per run."""
        return tuple(param_digest(encoded) for encoded in self.encoded_params)

    @property
    def has_limits(self) -> bool:
        """A run of it takes a slot (limits.py): the task has a limit of its own or a pool."""
        return self.max_running is not None or self.max_per_node is not None or self.pool is not None

    def compute_params(self, day: date) -> list[Any]:
        """Call the params callable for ``day``; raise ValueError with a readable reason
        when it fails or returns something that is not a list of distinct JSON values."""
        if not self.params_computed:
            return list(self.params)  # type: ignore[arg-type]
        try:
            produce = self.params if callable(self.params) else _import_callable(str(self.params))
            produced = produce(day)
        except Exception as exc:  # noqa: BLE001 - the user's code: any failure is reported, not raised
            raise ValueError(f"params callable {self.params_path} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(produced, list):
            raise ValueError(f"params callable {self.params_path} returned {type(produced).__name__}, not a list")
        problem = params_problem(produced)
        if problem:
            raise ValueError(f"params callable {self.params_path} returned a bad list: {problem}")
        return produced

    @property
    def params_path(self) -> str:
        if isinstance(self.params, str):
            return self.params
        return f"{getattr(self.params, '__module__', '?')}.{getattr(self.params, '__qualname__', '?')}"


def _first_problem(task: Task) -> str | None:
    try:
        task.schedule = Schedule.parse(task.at, task.cron, task.tz)
    except ValueError as exc:
        return str(exc)
    if isinstance(task.params, str):
        try:
            _import_callable(task.params)
        except ImportError as exc:
            return (f"params must be a list or a callable (or its dotted path 'module.function'); "
                    f"cannot import params {task.params!r}: {exc}")
    elif not isinstance(task.params, (list, tuple)) and not callable(task.params):
        return f"params must be a list or a callable taking the day, got {type(task.params).__name__}"
    elif isinstance(task.params, (list, tuple)):
        try:
            encoded: tuple[str, ...] | None = task.encoded_params  # kept: every run needs its param's
        except (TypeError, ValueError):
            encoded = None  # not JSON: params_problem names the param
        problem = params_problem(task.params, encoded)
        if problem:
            return problem
    for attr in ("timeout_s", "retries", "misfire_grace_s", "retry_backoff_s"):
        value = getattr(task, attr)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (attr == "timeout_s" and value == 0):
            return f"{attr} must be a {'positive' if attr == 'timeout_s' else 'non-negative'} integer, got {value!r}"
    if task.deadline is not None:
        try:
            parse_at(task.deadline if isinstance(task.deadline, str) else "")
        except ValueError:
            return f"bad deadline={task.deadline!r} (use 'HH:MM' or 'HH:MM:SS', 24-hour, in the task's tz)"
    if task.overlap not in OVERLAP_POLICIES:
        return f"overlap must be one of {', '.join(OVERLAP_POLICIES)}, got {task.overlap!r}"
    if not isinstance(task.after, (list, tuple)) or not all(isinstance(n, str) for n in task.after):
        return f"after must be a list of task names, got {task.after!r}"
    for attr in ("max_running", "max_per_node"):
        value = getattr(task, attr)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"{attr} must be a positive integer or None, got {value!r}"
    if task.pool is not None and not isinstance(task.pool, str):
        return f"pool must be a name from POOLS or None, got {task.pool!r}"
    if not callable(task.func) and not isinstance(task.func, str):
        return "func must be a callable or a dotted path 'module.function'"
    try:
        resolved = _import_callable(task.func_path)
    except ImportError as exc:
        return f"cannot import func {task.func_path!r}: {exc}"
    if callable(task.func) and resolved is not task.func:
        return f"func {task.func_path!r} is not importable by that name (define it at module level)"
    return None


_ROUND_TRIPPING = (str, int, bool, type(None))


def params_problem(params: Sequence[Any], encoded_params: Sequence[str] | None = None) -> str | None:
    """What is wrong with a list of params (not JSON, not round-tripping, repeated), or None.
    ``encoded_params``: the params' canonical JSON if already made (Task.encoded_params)."""
    seen: set[str] = set()
    for index, param in enumerate(params):
        try:
            encoded = encode_param(param) if encoded_params is None else encoded_params[index]
        except (TypeError, ValueError):
            return f"param {param!r} is not JSON-serializable (use str, int, float, bool, None, list, dict)"
        # str, int, bool and None survive a JSON round trip by construction; floats,
        # lists and dicts are checked (nan, tuples, non-str keys).
        if type(param) not in _ROUND_TRIPPING and (json.loads(encoded) != param or isinstance(param, tuple)):
            return f"param {param!r} does not survive a JSON round trip (use lists and str keys)"
        if encoded in seen:
            return f"param {param!r} is listed twice"
        seen.add(encoded)
    return None


def _import_callable(path: str) -> Callable[[Any], Any]:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError("need 'module.function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken user module is a config problem, whatever it raised
        raise ImportError(f"{type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ImportError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ImportError(f"{path!r} is not callable")
    return target


# One encoder, built once: json.dumps with options builds a new one per call, which was a
# good part of reading a 100k-run day (every run's param is encoded for its run id).
_PARAM_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


def encode_param(param: Any) -> str:
    """Canonical JSON of a param: its identity in run ids and in Redis."""
    if type(param) is int:
        return repr(param)  # what the encoder writes for an int (int.__repr__), without its set-up per call
    return _PARAM_ENCODER.encode(param)


# Hex digits of a param's digest at the end of a run id (eta.run_series reads it back).
DIGEST_LENGTH = 12


def param_digest(param_json: str) -> str:
    """The digest of a param's canonical JSON that names it in run and series ids."""
    return hashlib.sha1(param_json.encode("utf-8")).hexdigest()[:DIGEST_LENGTH]


class TaskTable:
    """The validated table, indexed by task name; ``pools`` is the module's POOLS."""

    def __init__(self, tasks: Iterable[Task], pools: Mapping[str, int] | None = None) -> None:
        self.tasks: list[Task] = list(tasks)
        self.pools: dict[str, int] = _checked_pools({} if pools is None else pools)
        self.by_name: dict[str, Task] = {}
        for task in self.tasks:
            if not isinstance(task, Task):
                raise ConfigError(f"TASKS holds {task!r}: every entry must be a dailyq.Task")
            task.validate()
            if task.name in self.by_name:
                raise ConfigError(f"task {task.name!r}: name is used twice; task names must be unique")
            self.by_name[task.name] = task
        _check_dependencies(self.tasks, self.by_name)
        for task in self.tasks:
            if task.pool is not None and task.pool not in self.pools:
                known = ", ".join(sorted(self.pools)) or "none"
                raise ConfigError(f"task {task.name!r}: pool {task.pool!r} is not in POOLS (known: {known}); "
                                  f"define it in the table module: POOLS = {{{task.pool!r}: N}}")
        # Workers refuse to execute anything else: a job naming os.system is not run.
        self.allowed_functions: frozenset[str] = frozenset(t.func_path for t in self.tasks)

    def get(self, name: str) -> Task:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise ConfigError(f"unknown task {name!r} (known: {known})") from None

    def pool_tasks(self, pool: str) -> list[Task]:
        """The tasks in ``pool``, in the table's order."""
        return [task for task in self.tasks if task.pool == pool]


def _checked_pools(pools: Any) -> dict[str, int]:
    """POOLS as a plain dict, or ConfigError on the first bad entry."""
    if not isinstance(pools, Mapping):
        raise ConfigError(f"POOLS must be a dict of pool name -> size, e.g. POOLS = {{'warehouse': 3}}; "
                          f"got {type(pools).__name__}")
    for name, size in pools.items():
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ConfigError(f"POOLS: pool name {name!r} must match [A-Za-z0-9_-]+")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"POOLS[{name!r}] must be a positive integer (how many runs of the pool's tasks "
                              f"may execute at once), got {size!r}")
    return dict(pools)


def _check_dependencies(tasks: list[Task], by_name: dict[str, Task]) -> None:
    """Every name in ``after`` is a task of the table, and ``after`` has no cycle: a run
    waiting on itself, directly or not, would wait forever."""
    for task in tasks:
        for name in task.after:
            if name not in by_name:
                known = ", ".join(sorted(by_name))
                raise ConfigError(f"task {task.name!r}: after names unknown task {name!r} (known: {known})")
            if name == task.name:
                raise ConfigError(f"task {task.name!r}: after names the task itself")
    done: set[str] = set()
    for task in tasks:
        path: list[str] = []
        _walk_after(task.name, by_name, path, set(), done)


def _walk_after(name: str, by_name: dict[str, Task], path: list[str], on_path: set[str], done: set[str]) -> None:
    if name in done:
        return
    if name in on_path:
        cycle = path[path.index(name):] + [name]
        raise ConfigError(f"tasks {' -> '.join(repr(n) for n in cycle)}: a cycle in after; "
                          "remove one of these dependencies")
    on_path.add(name)
    path.append(name)
    for upstream in by_name[name].after:
        _walk_after(upstream, by_name, path, on_path, done)
    path.pop()
    on_path.discard(name)
    done.add(name)


def load_table(module_name: str) -> TaskTable:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"cannot import task table module {module_name!r} ({type(exc).__name__}: {exc}); "
            "set DAILYQ_TASKS to an importable module") from None
    tasks = getattr(module, "TASKS", None)
    if not isinstance(tasks, (list, tuple)):
        raise ConfigError(f"module {module_name!r} has no list TASKS; define TASKS = [Task(...), ...]")
    return TaskTable(tasks, getattr(module, "POOLS", None))


def default_day(table: TaskTable, now: datetime) -> date:
    """Today in the tasks' zone when they all share one, else in UTC: the day every
    command, the watch and the dashboard mean when no date is given."""
    zones = {task.tz for task in table.tasks}
    zone = ZoneInfo(zones.pop()) if len(zones) == 1 else timezone.utc
    return now.astimezone(zone).date()

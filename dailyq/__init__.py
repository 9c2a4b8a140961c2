"""dailyq: each day's scheduled runs executed once, spread over every node.

One module per concern; start reading at ``scheduler.py`` (the leader loop) and
``worker.py`` (what a node runs), then ``fanout.py`` and ``guard.py``.

What a task table and a task use is importable from here::

    from dailyq import Task, current_run

and so are the commands, as functions returning data (see ``dailyq/api.py``)::

    import dailyq
    dailyq.trigger("redis://localhost:6379/0", day="2026-11-26")
    dailyq.rerun(connection, "daily_report", params=["任务参数1"], force=True)
    dailyq.day_status(connection)["runs"]
    dailyq.pause(connection, "daily_report"); dailyq.resume(connection, "daily_report")
    dailyq.cancel(connection, "2026-11-26", "daily_report")  # stops it; "cancelled" until a rerun
    dailyq.doctor(connection)["problems"]  # records that lie, and what repair=True does
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .context import RunContext, current_run
from .errors import ClaimLost, ConfigError, DailyqError
from .table import Task

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ below imports them
    from .api import cancel, day_status, days_status, doctor, pause, rerun, resume, trigger, trigger_range

# The one version source: pyproject.toml reads it from here (setuptools' dynamic version).
__version__ = "0.1.0"

__all__ = ["ClaimLost", "ConfigError", "DailyqError", "RunContext", "Task", "__version__", "cancel", "current_run",
           "day_status", "days_status", "doctor", "pause", "rerun", "resume", "trigger", "trigger_range"]

# Task modules import this package on every worker; redis and RQ come only with the
# first use of a command function (PEP 562 module __getattr__).
_LAZY = {"trigger", "trigger_range", "rerun", "cancel", "day_status", "days_status", "pause", "resume", "doctor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import api  # noqa: PLC0415

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)

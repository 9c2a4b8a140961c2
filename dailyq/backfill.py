"""Ranges of days: ``trigger --from D1 --to D2`` (a backfill) and ``status --from --to``.

Pure: the range checked, and a day's runs (status.day_runs) summed up; api.py reads
Redis and enqueues, one day at a time, each run with its own day in its context.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Iterable

from .errors import ConfigError
from .runs import FAILED, FINISHED, STATES

# At most this many days per range, both ends included: a month. A typo in a year
# (2025 for 2026) would otherwise enqueue a year of work at once; longer backfills
# are done a month at a time.
MAX_RANGE_DAYS = 31


def day_range(start: date, end: date) -> list[date]:
    """Every day from ``start`` to ``end``, both included; ConfigError (one line) when
    ``start`` is after ``end`` or the range is longer than MAX_RANGE_DAYS."""
    if start > end:
        raise ConfigError(f"--from {start.isoformat()} is after --to {end.isoformat()}: give the earlier day first")
    days = (end - start).days + 1
    if days > MAX_RANGE_DAYS:
        raise ConfigError(f"--from {start.isoformat()} --to {end.isoformat()} spans {days} days, more than the "
                          f"maximum of {MAX_RANGE_DAYS}; split it into ranges of at most {MAX_RANGE_DAYS} days")
    return [start + timedelta(days=n) for n in range(days)]


def day_summary(day: date, runs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One day of ``status --from --to --json``: ``date``, ``total``, ``done`` (finished),
    ``failed``, and ``states``: runs per state, every state present (0 when none)."""
    states = {state: 0 for state in STATES}
    for run in runs:
        states[run["state"]] = states.get(run["state"], 0) + 1
    return {"date": day.isoformat(), "total": sum(states.values()), "done": states[FINISHED],
            "failed": states[FAILED], "states": states}


def render_days(days: list[dict[str, Any]]) -> str:
    """One line per day: ``2026-11-26  3/4 done  1 failed``, then the runs in other
    states than finished and failed, when there are any (``  2 queued, 1 running``)."""
    lines = []
    for day in days:
        others = ", ".join(f"{n} {state}" for state, n in day["states"].items()
                           if n and state not in (FINISHED, FAILED))
        line = f"{day['date']}  {day['done']}/{day['total']} done  {day['failed']} failed"
        lines.append(f"{line}  {others}" if others else line)
    return "\n".join(lines)

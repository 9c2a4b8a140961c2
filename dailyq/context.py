"""The run context: what a task function can know about the run it is executing.

Inside a run, ``current_run()`` returns a ``RunContext``; outside one, None. The guard
(guard.py) sets it around the call of the task function, in whichever process
executes it (a forked work-horse, or the worker itself for a non-forking worker).

``day`` is the run's day (a backfill's date, not today), so a daily task computes
the right day's data. ``run_id`` and ``fence`` are keys to be idempotent on:

* ``run_id`` is the same for every execution of one run (retries, recoveries after a
  node died); a ``rerun`` is a new run with its own id;
* ``fence`` is a fencing token: every execution that takes this run's claim gets a
  strictly greater number than any earlier one (a 64-bit integer, at least the Redis
  server's clock in microseconds, so also after a failover that lost the last tokens:
  scripts.lifecycle.BEGIN). A store that remembers the largest
  token it has seen and rejects writes carrying a smaller one can never be written
  by a copy that lost its claim while frozen (see docs/failure-semantics.md).

``check()`` raises ``ClaimLost`` once this copy no longer holds the run's claim: call
it before each external write. It reads only this process's own record of when the
claim was last confirmed in Redis, so it costs no round trip.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Callable

from .errors import ClaimLost


@dataclass(frozen=True)
class RunContext:
    task: str
    param: Any
    day: date
    slot: datetime  # aware, in the task's zone
    run_id: str
    attempt: int  # 1 for the first execution of this run_id, +1 for each later one
    node: str
    fence: int
    # Why this copy lost its claim, or None while it holds it (guard.ClaimKeeper).
    _lost_because: Callable[[], str | None] = field(repr=False, compare=False, default=lambda: None)

    def check(self) -> None:
        """Raise ``ClaimLost`` if this copy no longer holds the run's claim."""
        reason = self._lost_because()
        if reason is not None:
            raise ClaimLost(f"run {self.run_id} (fence {self.fence}) lost its claim: {reason}")


_current: ContextVar[RunContext | None] = ContextVar("dailyq_current_run", default=None)


def current_run() -> RunContext | None:
    """The run being executed by this thread, or None outside a run."""
    return _current.get()


class running_as:
    """``with running_as(context):`` makes ``current_run()`` return it inside the block."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def __enter__(self) -> RunContext:
        self._token = _current.set(self.context)
        return self.context

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)

"""The worker side: the RQ workers that execute a node's share of the day.

* ``workers`` -- ``DailyWorker`` / ``DailySimpleWorker`` and their hooks: the table check,
  the guard around each execution, death records, the node's worker heartbeat;
* ``guard`` -- the finished-set check and the claim around each execution;
* ``claim_watch`` -- the forking worker's parent watching its work-horse's claim;
* ``supervisor`` -- the worker process: a fresh RQ worker after each outage;
* ``pool`` -- ``worker_entry.py --concurrency N``: N forked workers, supervised.

What the leader shares with the workers stays on top: the seam to RQ (``rq_seam``), the
permits (``limits``) and the heartbeats (``beats``); nothing the leader imports lives here
(tests/test_boundaries.py checks it).

``rq worker -w dailyq.worker.DailyWorker`` names the classes through this package: they
are re-exported here, loaded on first use (PEP 562), so that importing one module of the
package (``claim_watch``, which ``rq_seam`` uses) does not load the whole worker stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .workers import DailySimpleWorker, DailyWorker

__all__ = ["DailySimpleWorker", "DailyWorker"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import workers  # noqa: PLC0415 - on first use, see the docstring

        return getattr(workers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

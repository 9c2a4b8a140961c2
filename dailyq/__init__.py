"""dailyq: each day's scheduled runs executed once, spread over every node.

One module per concern; start reading at ``scheduler.py`` (the leader loop) and
``worker.py`` (what a node runs), then ``fanout.py`` and ``guard.py``.

What a task table and a task use is importable from here::

    from dailyq import Task, current_run
"""

from .context import RunContext, current_run
from .errors import ClaimLost, ConfigError, DailyqError
from .table import Task

__version__ = "0.1.0"

__all__ = ["ClaimLost", "ConfigError", "DailyqError", "RunContext", "Task", "current_run", "__version__"]

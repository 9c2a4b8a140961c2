"""dailyq: each day's scheduled runs executed once, spread over every node.

One module per concern; start reading at ``scheduler.py`` (the leader loop) and
``worker.py`` (what a node runs), then ``fanout.py`` and ``guard.py``.
"""

__version__ = "0.1.0"

"""What operators read: a day's status and its views, health, doctor, metrics, the demo.

* ``status`` -- a day's runs and the leader, read from Redis (``status --json``);
* ``consistency`` -- ``doctor``: every record checked against what should back it;
* ``health`` -- the health verdict from heartbeats, Redis's memory and the tables;
* ``metrics`` -- the scheduler's Prometheus metrics;
* ``eta`` -- the day's ETA (pure);
* ``render``, ``text_width``, ``offsets``, ``table_skew`` -- status as text (pure);
* ``watch`` (pure) and ``watch_loop`` -- ``status --watch``;
* ``report`` (pure) and ``live_timeline`` -- the day as an HTML timeline, and live;
* ``demo`` -- ``scheduler.py demo``.

The commands themselves are ``dailyq.api`` (functions) and ``dailyq.cli`` (the command
line); ``python -m dailyq.dashboard`` stays on top as the entry point it is. Nothing is
re-exported here.
"""

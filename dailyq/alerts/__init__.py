"""Alerts: what the leader tells a webhook, and the outside heartbeat.

* ``alerter`` -- the leader's alert detection and delivery thread, and the tick hook;
* ``events`` -- what is worth an alert, and its text (pure);
* ``outbox`` -- the outbox in Redis: each alert once, one sender at a time;
* ``digest`` -- failure events into ``run_failed`` and ``runs_failed`` digests;
* ``direct`` / ``data_lost`` -- the one path without the outbox (``redis_full``,
  ``redis_data_lost``);
* ``sender`` -- one webhook POST and its outcome, for alerts and the heartbeat;
* ``webhook_url`` -- ``DAILYQ_ALERT_URL`` / ``DAILYQ_HEARTBEAT_URL``, checked (pure);
* ``heartbeat_ping`` -- the outside heartbeat (``DAILYQ_HEARTBEAT_URL``).

Nothing is re-exported: the scheduler imports ``alerter`` and ``heartbeat_ping``, so that
the pure modules here load without Redis (tests/test_boundaries.py).
"""

"""Tests of dailyq/alerts/: events, outbox, digests, the direct path, the heartbeat ping, alerts end to end."""

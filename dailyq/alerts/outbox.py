"""The alert outbox in Redis: each alert enters once, is delivered by one sender at a
time, and leaves when delivered or given up. Every step is one Lua script.

* ``ENQUEUE``: ``SADD`` of the alert's id to its day's alert set and, only if it was
  new, the entry (payload, created_ms, attempts) and its place in the outbox (due
  now) -- together. Whoever detects the event, however often, it enters once.
* ``CLAIM``: first, entries whose sender's claim ran out go back to the outbox (their
  sender died, froze or lost Redis); then the oldest due entry moves to the in-flight
  set with a deadline (now + claim), marked with the claiming sender's token.
* ``ACK`` (after a 2xx): the entry is deleted, whoever holds it: it was delivered,
  so nothing must send it again.
* ``RETRY`` / ``DROP``: only by the sender still holding the claim -- back to the
  outbox with its next due time and one more attempt, or deleted.

All times are the Redis server's clock (``TIME`` inside the scripts): one clock for
every node, whatever their own clocks say.

The one duplicate left: a sender that stops for good (SIGKILL, power) or loses Redis
for longer than its claim between the endpoint accepting the POST and ``ACK``
reaching Redis. Its claim runs out and another sender delivers again. The window is
one Redis round trip long (``ACK`` is sent as soon as the response's status line is
read, before its body), plus any Redis outage in that moment.
"""

from __future__ import annotations

from typing import Iterable

from redis import Redis

from ..keys import Keys

# Claimed and Idle are the outbox's public reply types (alerts.py imports them from here).
from ..scripts import Claimed, Idle, OutboxAlert, lua_ms, scripts_for
from .events import Alert, encode_payload

__all__ = ["Claimed", "Idle", "Outbox"]


class Outbox:
    def __init__(self, connection: Redis, keys: Keys, retention_s: int) -> None:
        self.connection = connection
        self.keys = keys
        # An alert's id is remembered as long as its day's runs are, and a day longer:
        # a day scanned as "yesterday" is never re-alerted while it can still be seen.
        self.remember_s = retention_s + 2 * 86400
        self._scripts = scripts_for(connection)

    def enqueue(self, alerts: Iterable[Alert]) -> list[str]:
        """Put each alert not seen before into the outbox, atomically; returns the new ids."""
        entries = [OutboxAlert(self.keys.day_alerts(alert.day), alert.alert_id, encode_payload(alert.payload))
                   for alert in alerts]
        if not entries:
            return []
        return self._scripts.outbox_enqueue(outbox_key=self.keys.alert_outbox, entries_key=self.keys.alert_entries,
                                            day_set_ttl_s=self.remember_s, alerts=entries).run()

    def claim(self, owner: str, claim_ms: int) -> Claimed | Idle:
        """The oldest due entry, now held by ``owner``; or, when none is due, when one may be."""
        return self._scripts.outbox_claim(outbox_key=self.keys.alert_outbox, in_flight_key=self.keys.alert_in_flight,
                                          entries_key=self.keys.alert_entries, claim_ms=claim_ms, owner=owner).run()

    def ack(self, alert_id: str, owner: str) -> str:
        return self._scripts.outbox_ack(outbox_key=self.keys.alert_outbox, in_flight_key=self.keys.alert_in_flight,
                                        entries_key=self.keys.alert_entries, alert_id=alert_id, owner=owner).run()

    def retry(self, alert_id: str, owner: str, wait_ms: int) -> bool:
        return self._scripts.outbox_retry(outbox_key=self.keys.alert_outbox, in_flight_key=self.keys.alert_in_flight,
                                          entries_key=self.keys.alert_entries, alert_id=alert_id, owner=owner,
                                          wait_ms=wait_ms).run()

    def drop(self, alert_id: str, owner: str) -> bool:
        return self._scripts.outbox_drop(outbox_key=self.keys.alert_outbox, in_flight_key=self.keys.alert_in_flight,
                                         entries_key=self.keys.alert_entries, alert_id=alert_id, owner=owner).run()

    def counts(self) -> tuple[int, int]:
        """(waiting in the outbox, in flight)."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.alert_outbox)
            pipe.zcard(self.keys.alert_in_flight)
            waiting, in_flight = pipe.execute()
        return int(waiting), int(in_flight)

    def mark_leadership(self, lease_key: str, owner: str, gap_ms: int) -> tuple[str, int | None, int | None]:
        """This tick held the lease (see scripts.MARK_LEADERSHIP): ('ok', None, now), ('gap', last, now)
        or ('not-leader', None, None)."""
        return self._scripts.mark_leadership(lease_key=lease_key, leadership_key=self.keys.leadership, owner=owner,
                                       gap_ms=gap_ms).run()

    def first_held_ms(self) -> int | None:
        raw = self.connection.hget(self.keys.leadership, "first_ms")
        return lua_ms(raw) if raw is not None else None

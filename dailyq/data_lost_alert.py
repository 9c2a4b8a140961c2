"""The ``redis_data_lost`` alert, POSTed directly by the leader: not through the outbox
(alert_outbox.py), which lived in the Redis that lost its data.

``post_directly`` is one POST of one alert through alert_sender.py, nothing else: the
path an alert takes when the outbox cannot carry it. ``DataLostAlerts`` is the leader's
use of it: one thread per loss, which POSTs until delivered, refused or an hour old
(GIVE_UP_S), with the outbox's backoff (``DAILYQ_ALERT_RETRY_S`` doubling up to
``DAILYQ_ALERT_RETRY_MAX_S``, at least a ``Retry-After``).

Once across nodes: before each POST the sender claims the alert in the new Redis
(``keys.generation_alert``, DATA_LOST_ALERT_CLAIM, 30 s), and records how it ended
(delivered, refused, given up) for good, so a leader that takes over after a crash
sends it only if nobody did. A claim that cannot be written (Redis away again) does not
stop the POST: this alert is worth more than its duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Mapping

from redis import Redis
from redis.exceptions import RedisError

from .alert_events import Alert, encode_payload, redis_data_lost_alert
from .alert_sender import DELIVERED, REFUSED, Delivery, post_alert
from .scripts import scripts_for
from .settings import Settings

log = logging.getLogger(__name__)

# As the outbox's (alerts.py): an alert not delivered within an hour is dropped, and a
# sender's claim is far longer than one POST can take (two 5 s timeouts).
GIVE_UP_S = 3600.0
CLAIM_S = 30.0
FINAL_STATES = ("delivered", "refused", "given-up")


def post_directly(url: str, alert: Alert, on_accepted: Any = None) -> Delivery:
    """POST ``alert`` to ``url`` now (alert_sender.post_alert: same body, headers and
    outcomes as the outbox's deliveries); never raises for a network or HTTP problem."""
    return post_alert(url, encode_payload(alert.payload), alert.alert_id, on_accepted or (lambda: None))


class DataLostAlerts:
    """The leader's sender of ``redis_data_lost``: ``raise_for(view)`` starts one thread
    per generation (later calls for the same one do nothing)."""

    def __init__(self, connection: Redis, settings: Settings, *, give_up_s: float = GIVE_UP_S,
                 claim_s: float = CLAIM_S) -> None:
        self.connection = connection
        self.settings = settings
        self.keys = settings.keys
        self.give_up_s = give_up_s
        self.claim_ms = int(claim_s * 1000)
        self.owner = f"{settings.node_name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._started: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def enabled(self) -> bool:
        return self.settings.alert_url is not None

    def raise_for(self, view: Mapping[str, Any]) -> None:
        """``view``: status's ``redis_data_lost``; nothing without an alert URL."""
        generation = str(view["generation"])
        if generation in self._started:
            return
        self._started.add(generation)
        if not self.enabled:
            return  # the loss is in the log of every process (generation.py) and in status
        alert = redis_data_lost_alert(view)
        thread = threading.Thread(target=self._send, args=(alert, generation), name="dailyq-data-lost-alert",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout_s: float = 11.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)

    def _claim(self, generation: str) -> str:
        try:
            return scripts_for(self.connection).data_lost_alert_claim(
                alert_key=self.keys.generation_alert, generation=generation, owner=self.owner,
                claim_ms=self.claim_ms).run()
        except RedisError as exc:
            log.warning("alert %s:%s: could not claim it in Redis (%s); sending it anyway", "redis_data_lost",
                        generation, exc)
            return "claimed"

    def _end(self, generation: str, state: str) -> None:
        try:
            self.connection.set(self.keys.generation_alert, json.dumps(
                {"generation": generation, "state": state, "owner": self.owner}))
        except RedisError as exc:
            log.warning("alert redis_data_lost:%s %s, but Redis did not take note (%s)", generation, state, exc)

    def _send(self, alert: Alert, generation: str) -> None:
        assert self.settings.alert_url is not None
        url, shown = self.settings.alert_url, self.settings.redacted_alert_url()
        deadline = time.monotonic() + self.give_up_s
        attempts = 0
        while not self._stop.is_set():
            state = self._claim(generation)
            if state in FINAL_STATES:
                return  # another leader sent it (or gave up on it)
            if state != "claimed":  # another sender holds it now: look again when its claim may lapse
                if time.monotonic() > deadline:
                    return
                self._stop.wait(self.claim_ms / 2000)
                continue
            if attempts == 0:
                # As every alert, in the leader's log when raised (by the one sender sending it).
                log.warning("alert %s: %s", alert.event, alert.payload["text"])
            result = post_directly(url, alert)
            attempts += 1
            if result.outcome == DELIVERED:
                self._end(generation, "delivered")
                log.info("alert %s delivered to %s (%s)", alert.alert_id, shown, result.reason)
                return
            if result.outcome == REFUSED:
                self._end(generation, "refused")
                log.error("alert %s (redis_data_lost) dropped: %s refused it with %s, which a retry would not "
                          "change", alert.alert_id, shown, result.reason)
                return
            if time.monotonic() > deadline:
                self._end(generation, "given-up")
                log.error("alert %s (redis_data_lost) dropped: not delivered to %s within %.0fs, %d attempts "
                          "(last: %s)", alert.alert_id, shown, self.give_up_s, attempts, result.reason)
                return
            wait_s = min(self.settings.alert_retry_max_s, self.settings.alert_retry_s * 2 ** min(attempts - 1, 30))
            if result.retry_after_s is not None:
                wait_s = max(wait_s, result.retry_after_s)
            log.warning("alert %s (redis_data_lost) not delivered to %s (%s), attempt %d; next in %.0fs",
                        alert.alert_id, shown, result.reason, attempts, wait_s)
            self._stop.wait(wait_s)

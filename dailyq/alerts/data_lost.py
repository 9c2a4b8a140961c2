"""The ``redis_data_lost`` alert, POSTed directly by the leader: not through the outbox
(alert_outbox.py), which lived in the Redis that lost its data.

The sending is alert_direct.DirectAlerts's, as for ``redis_full``: POSTed at once and
retried with the outbox's backoff until delivered, refused or an hour old (GIVE_UP_S).
What is this alert's own is once across nodes: before each POST the sender claims the
alert in the new Redis (``keys.generation_alert``, DATA_LOST_ALERT_CLAIM, 30 s), and
records how it ended (delivered, refused, given up) for good, so a leader that takes over
after a crash sends it only if nobody did. A claim that cannot be written (Redis away
again) does not stop the POST: this alert is worth more than its duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any, Mapping

from redis import Redis
from redis.exceptions import RedisError

from ..scripts import scripts_for
from ..settings import Settings
from .direct import GIVE_UP_S, ClaimAnswer, DirectAlerts, Ended
from .events import redis_data_lost_alert

log = logging.getLogger(__name__)

__all__ = ["GIVE_UP_S", "DataLostAlerts"]

# A sender's claim is far longer than one POST can take (two 5 s timeouts).
CLAIM_S = 30.0
FINAL_STATES = ("delivered", "refused", "given-up")


class DataLostAlerts:
    """The leader's sender of ``redis_data_lost``: ``raise_for(view)`` sends the alert of
    one generation (later calls for the same one do nothing)."""

    def __init__(self, connection: Redis, settings: Settings, *, give_up_s: float = GIVE_UP_S,
                 claim_s: float = CLAIM_S) -> None:
        self.connection = connection
        self.settings = settings
        self.keys = settings.keys
        self.claim_ms = int(claim_s * 1000)
        self.owner = f"{settings.node_name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.direct = DirectAlerts(settings, give_up_s=give_up_s, name="dailyq-data-lost-alert")

    @property
    def enabled(self) -> bool:
        return self.direct.enabled

    def raise_for(self, view: Mapping[str, Any]) -> None:
        """``view``: status's ``redis_data_lost``; nothing without an alert URL (the loss
        is in the log of every process, generation.py, and in status)."""
        generation = str(view["generation"])
        self.direct.send(redis_data_lost_alert(view), claim=lambda: self._claim(generation),
                         on_end=lambda how: self._end(generation, how))

    def stop(self, timeout_s: float = 11.0) -> None:
        self.direct.stop(timeout_s)

    def _claim(self, generation: str) -> ClaimAnswer:
        try:
            state = scripts_for(self.connection).data_lost_alert_claim(
                alert_key=self.keys.generation_alert, generation=generation, owner=self.owner,
                claim_ms=self.claim_ms).run()
        except RedisError as exc:
            log.warning("alert %s:%s: could not claim it in Redis (%s); sending it anyway", "redis_data_lost",
                        generation, exc)
            return "send", 0.0
        if state == "claimed":
            return "send", 0.0
        if state in FINAL_STATES:
            return "done", 0.0  # another leader sent it (or gave up on it)
        return "wait", self.claim_ms / 2000  # another sender holds it: look again when its claim may lapse

    def _end(self, generation: str, how: Ended) -> None:
        try:
            self.connection.set(self.keys.generation_alert, json.dumps(
                {"generation": generation, "state": how, "owner": self.owner}))
        except RedisError as exc:
            log.warning("alert redis_data_lost:%s %s, but Redis did not take note (%s)", generation, how, exc)

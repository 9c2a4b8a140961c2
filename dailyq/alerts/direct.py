"""Alerts POSTed directly, not through the outbox: for what Redis cannot keep.

Two alerts take this path: ``redis_full`` (a Redis out of memory refuses the outbox's
writes; alerts.AlertService.send_direct) and ``redis_data_lost`` (the outbox lived in
the Redis that lost its data; data_lost_alert.py). Both go through ``DirectAlerts``:
held in this process's memory and POSTed by a thread of its own (started with the first
alert) at once, before anything asks Redis, retried with the outbox's backoff
(``DAILYQ_ALERT_RETRY_S`` doubling, at most ``DAILYQ_ALERT_RETRY_MAX_S`` apart, at least
a ``Retry-After``) until delivered, refused or ``GIVE_UP_S`` old. Each id once per process.

What differs between the two is passed in, not coded twice: ``claim`` (asked before each
POST; data_lost_alert.py claims the alert in the new Redis, so two leaders do not both
send it) and ``on_end`` (told how it ended: data_lost_alert.py records it for good,
redis_full marks its episode delivered). A leader that dies before delivering takes the
alert with it; the next leader raises its own when it sees the same.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

from ..settings import Settings
from .events import Alert, encode_payload
from .sender import DELIVERED, REFUSED, post_alert

log = logging.getLogger(__name__)

# As the outbox's (alerts.py): an alert not delivered within an hour is dropped.
GIVE_UP_S = 3600.0
# The longest the thread sleeps with nothing due (it is woken for a new alert).
IDLE_WAIT_S = 1.0

# What ``claim`` answers before a POST: send it now; wait (another sender holds it: ask
# again after the wait returned with it); or done (someone sent it, or gave it up, for good).
ClaimAnswer = tuple[Literal["send", "wait", "done"], float]
Ended = Literal["delivered", "refused", "given-up"]


def backoff_s(settings: Settings, attempts: int, retry_after_s: float | None) -> float:
    """The wait after the ``attempts``-th failed delivery: the outbox's and the direct
    alerts' one rule (``DAILYQ_ALERT_RETRY_S`` doubling, capped, at least a Retry-After)."""
    wait_s = min(settings.alert_retry_max_s, settings.alert_retry_s * 2 ** min(max(attempts, 1) - 1, 30))
    return max(wait_s, retry_after_s) if retry_after_s is not None else wait_s


@dataclass
class _Direct:
    alert: Alert
    raised_at: float  # monotonic
    claim: Callable[[], ClaimAnswer] | None
    on_end: Callable[[Ended], None] | None
    attempts: int = 0  # failed deliveries so far
    due_at: float = 0.0  # monotonic
    logged: bool = False


class DirectAlerts:
    def __init__(self, settings: Settings, *, give_up_s: float = GIVE_UP_S, name: str = "dailyq-direct-alerts") -> None:
        self.settings = settings
        self.url = settings.alert_url
        self.shown_url = settings.redacted_alert_url()
        self.give_up_s = give_up_s
        self.name = name
        self._waiting: list[_Direct] = []
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def send(self, alert: Alert, *, claim: Callable[[], ClaimAnswer] | None = None,
             on_end: Callable[[Ended], None] | None = None) -> bool:
        """Send ``alert`` as soon as the thread gets to it. False when its id was sent
        before by this process, or alerts are off."""
        if not self.enabled:
            return False
        with self._lock:
            if alert.alert_id in self._ids:
                return False
            self._ids.add(alert.alert_id)
            self._waiting.append(_Direct(alert, time.monotonic(), claim, on_end))
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._wake.set()
        return True

    def stop(self, timeout_s: float = 11.0) -> None:
        """Stop the thread, letting a POST under way finish (two 5 s timeouts at most)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait_s = self.deliver_due()
            except Exception:  # noqa: BLE001 - a failing pass must not end direct alerts
                log.exception("a direct alert pass failed; going on")
                wait_s = 5.0
            self._wake.wait(wait_s)
            self._wake.clear()

    def deliver_due(self) -> float:
        """POST the alerts that are due; returns how long until the next one is."""
        with self._lock:
            due = [d for d in self._waiting if d.due_at <= time.monotonic()]
        for direct in due:
            if self._stop.is_set():
                break
            if self._deliver(direct):
                with self._lock:
                    self._waiting.remove(direct)
        with self._lock:
            return min((max(0.05, d.due_at - time.monotonic()) for d in self._waiting), default=IDLE_WAIT_S)

    def _deliver(self, direct: _Direct) -> bool:
        """One attempt; True when the alert is done with (delivered, dropped, or sent by another)."""
        assert self.url is not None
        alert = direct.alert
        old = time.monotonic() - direct.raised_at >= self.give_up_s
        if direct.claim is not None:
            answer, wait_s = direct.claim()
            if answer == "done":
                return True
            if answer == "wait":
                if old:
                    return True  # nobody sent it within its life, nor will we
                direct.due_at = time.monotonic() + wait_s
                return False
        if not direct.logged:
            # As every alert, in the log when raised (by the one sender sending it).
            direct.logged = True
            log.warning("alert %s: %s", alert.event, alert.payload["text"])
        result = post_alert(self.url, encode_payload(alert.payload), alert.alert_id, lambda: None)
        if result.outcome == DELIVERED:
            log.info("alert %s delivered to %s (%s; sent directly, not through the outbox)", alert.alert_id,
                     self.shown_url, result.reason)
            self._end(direct, "delivered")
            return True
        if result.outcome == REFUSED:
            log.error("alert %s (%s) dropped: %s refused it with %s, which a retry would not change",
                      alert.alert_id, alert.event, self.shown_url, result.reason)
            self._end(direct, "refused")
            return True
        direct.attempts += 1
        if time.monotonic() - direct.raised_at >= self.give_up_s:
            log.error("alert %s (%s) dropped: not delivered to %s within %.0fs of being raised, %d attempts "
                      "(last: %s)", alert.alert_id, alert.event, self.shown_url, self.give_up_s, direct.attempts,
                      result.reason)
            self._end(direct, "given-up")
            return True
        wait_s = backoff_s(self.settings, direct.attempts, result.retry_after_s)
        direct.due_at = time.monotonic() + wait_s
        log.warning("alert %s (%s) not delivered to %s (%s), attempt %d; next in %.0fs", alert.alert_id,
                    alert.event, self.shown_url, result.reason, direct.attempts, wait_s)
        return False

    def _end(self, direct: _Direct, how: Ended) -> None:
        if direct.on_end is None:
            return
        try:
            direct.on_end(how)
        except Exception:  # noqa: BLE001 - delivered is delivered
            log.exception("after alert %s ended %s", direct.alert.alert_id, how)

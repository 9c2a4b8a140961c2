"""Alerts: the leading scheduler tells a webhook when something went wrong.

Three parts, each with one job:

* ``on_tick`` -- called by every scheduler on every tick (scheduler.py's tick hook).
  Under the lease it records the tick's Redis time as the latest held one; when the
  previous one is older than ``DAILYQ_ALERT_NO_LEADER_S``, nobody led in between and
  it raises ``no_leader`` (once: the alert's id is that previous time).
* detection -- in the background thread, every ``DETECT_EVERY_S`` while this scheduler
  leads: takes the failure events that the scripts recording ``failed`` pushed (any day:
  alert_digest.py, which also groups a task's failures into ``runs_failed`` digests), and
  judges ``day_late`` / ``slot_missed`` once each, when a deadline or a slot's grace has
  passed, from the records of just those runs. No pass reads a whole day. A task with a
  ``deadline`` still ahead gets, every PREDICT_EVERY_S, the ETA (eta.py) of its runs,
  from their records: a predicted ``day_late``. Every alert found (alert_events.py) goes
  into the outbox, where each id enters once.
* ``tables_differ`` -- found by table_watch.TableWatch (a tick hook of its own, every
  few seconds under the lease), handed to ``raise_alerts``.
* delivery -- in the same thread: claims due alerts one at a time, POSTs each
  (alert_sender.py), and acks, retries with backoff, or drops it (alert_outbox.py).
* direct alerts (``send_direct``) -- for what Redis cannot keep: ``redis_full`` (Redis out
  of memory refuses the outbox's writes). Held in this process's memory and POSTed by a
  thread of their own (alert_direct.py, the one direct path, which ``redis_data_lost``
  takes too), without Redis, with the outbox's backoff; once per id.

Only the leader detects and sends, to keep the other nodes quiet; nothing depends on
it. Two schedulers that both believe they lead (one paused past its lease) raise
the same ids, which enter once, and each outbox entry has one holder at a time.

Nothing here runs inside the tick but ``on_tick`` (one Lua call every few seconds),
and nothing here stops the scheduler: the thread logs a failed pass and goes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Callable

from redis import Redis
from redis.exceptions import RedisError

from ..beats import live_processes
from ..day_scan import read_records
from ..ops.status import read_eta, shown_runs
from ..outage import OutageLog
from ..params_book import ParamsBook
from ..pausing import paused_tasks
from ..redis_memory import note_delivered
from ..runs import DaySlots, runs_of_slot, task_slots_on
from ..schedule import Slot
from ..settings import Settings
from ..table import Task, TaskTable
from .digest import FailureAlerts
from .direct import DirectAlerts, backoff_s
from .events import (
    DAY_LATE,
    SLOT_MISSED,
    Alert,
    day_late_alert,
    deadline_at,
    fired_slots,
    lateness,
    missed_slot_alerts,
    no_leader_alert,
    overdue_slots,
    predicted_day_late_alert,
    predicted_late,
    redis_full_alert,
    watched_days,
)
from .outbox import Claimed, Idle, Outbox
from .sender import DELIVERED, REFUSED, TIMEOUT_S, post_alert

if TYPE_CHECKING:
    from ..scheduler import DailyScheduler

log = logging.getLogger(__name__)

# How often the leader looks for new alerts, at least; a pass that took t seconds (a
# judgment of a task of many runs, a backlog of failures) waits DETECT_DUTY * t before
# the next, so detection takes at most 1/DETECT_DUTY of the time.
DETECT_EVERY_S = 2.0
DETECT_DUTY = 20
# A sender's hold on an alert: far longer than one POST can take (connect and read
# timeouts of TIMEOUT_S each), so a live sender's claim never runs out mid-POST; and the
# delay before another sender takes over the alerts of a sender that died.
CLAIM_S = 30.0
# An alert not delivered this long after it was raised is dropped (logged).
GIVE_UP_S = 3600.0
# The longest the thread sleeps (it is woken for new alerts); it asks Redis nothing
# when it wakes with nothing due.
IDLE_WAIT_S = 1.0
# The outbox is looked at this often even when nothing is known to be due there.
OUTBOX_POLL_S = 30.0
MARK_EVERY_S = 5.0
MARK_EVERY_WITHOUT_ALERTS_S = 30.0
# How often, at most, the leader looks at a day's ETA for a predicted day_late (alerts on,
# a task with a deadline still ahead whose day has begun): an estimate moves slowly, and
# each look reads the records of that task's runs.
PREDICT_EVERY_S = 15.0
# What ``_settled`` remembers for a task's day once its day_late was predicted, or its
# deadline came (it is not predicted after the deadline: the day_late then is real).
PREDICTED = "day_late_predicted"


class AlertService:
    def __init__(self, connection: Redis, settings: Settings, table: TaskTable, *, give_up_s: float = GIVE_UP_S,
                 claim_s: float = CLAIM_S, detect_every_s: float = DETECT_EVERY_S,
                 predict_every_s: float = PREDICT_EVERY_S) -> None:
        self.connection = connection
        self.settings = settings
        self.table = table
        self.keys = settings.keys
        self.url = settings.alert_url
        self.shown_url = settings.redacted_alert_url()
        self.outbox = Outbox(connection, self.keys, settings.retention_s)
        self.failures = FailureAlerts(connection, self.keys, settings.alert_group_s, self.outbox.remember_s)
        self.give_up_ms = int(give_up_s * 1000)
        self.claim_ms = int(claim_s * 1000)
        self.detect_every_s = detect_every_s
        self.predict_every_s = predict_every_s
        self._next_predict: dict[date, float] = {}  # monotonic: when to look at a day's ETA again
        self.owner = f"{settings.node_name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._leader_until = 0.0  # monotonic: on_tick saw us hold the lease until about then
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_detect = 0.0
        # When to look at the outbox next (monotonic): when its earliest entry falls due,
        # after a failed delivery when the endpoint's rest ends, at once for a new alert.
        self._claim_at = 0.0
        self._next_mark = 0.0
        # How often the leader notes that it leads (MARK_LEADERSHIP): a few times within the
        # no_leader threshold, so a leader that ticks never looks absent, and at most every
        # MARK_EVERY_S. Without alerts only seldom (the record is then kept only for a
        # node whose alerts are turned on later): idle Redis traffic is a budget.
        self.mark_every_s = (min(MARK_EVERY_S, max(1.0, settings.alert_no_leader_s / 4)) if self.enabled
                             else MARK_EVERY_WITHOUT_ALERTS_S)
        # What this process already judged for good (a task's day against its deadline, a
        # slot past its grace), so each is judged once. Per day, and only for the days still
        # watched. A new leader starts empty (and judges again); Redis's day sets keep the
        # alerts once.
        self._settled: dict[date, set[tuple[str, ...]]] = {}
        self._watched_since: datetime | None = None
        self._tick_outage = OutageLog(log, f"alert bookkeeping on node {settings.node_name}")
        # Direct alerts (send_direct): POSTed by a thread of their own, no Redis asked.
        self.direct = DirectAlerts(settings, give_up_s=give_up_s)
        # (task, slot label) of slots whose fan-out Redis refused and the leader still holds:
        # not judged missed while it does (it fans them out once writes work again).
        self._held_slots: set[tuple[str, str]] = set()
        # A local episode id for a Redis without the marker (Redis 6): (episode start, ms).
        self._memory_episode: tuple[float, int] | None = None
        self._outage = OutageLog(log, f"alert delivery on node {settings.node_name}")
        self._last_failure_log = 0.0

    @property
    def enabled(self) -> bool:
        return self.url is not None

    # -- the tick hook ---------------------------------------------------------------

    def on_tick(self, scheduler: "DailyScheduler") -> None:
        """Keep the leadership record; raise no_leader after a gap. Never raises: a
        problem here must not cost the scheduler its tick or its lease."""
        if not scheduler.is_leader:
            self._leader_until = 0.0
            self._next_mark = 0.0  # a new term marks on its first tick
            return
        if not self.leading():
            self._claim_at = 0.0  # a new term: look at once for what the last leader left
        # The scheduler renewed its lease in this tick: it leads for as long as that lease.
        # A scheduler that stops ticking (stopped, frozen, cut off) stops detecting and
        # claiming about when another one may lead.
        self._leader_until = time.monotonic() + self.settings.lease_ttl_s
        self._held_slots = {(name, label) for name, label in getattr(scheduler, "refused_slots", {})}
        self._tell_memory_full(scheduler)
        if time.monotonic() < self._next_mark:
            return
        gap_ms = self.settings.alert_no_leader_s * 1000 if self.enabled else 0
        try:
            outcome, last_ms, now_ms = self.outbox.mark_leadership(scheduler.lease.key, scheduler.lease.owner, gap_ms)
            if outcome == "gap" and last_ms is not None and now_ms is not None:
                self._raise([no_leader_alert(last_ms, now_ms, self.settings.node_name)])
                outcome, _, _ = self.outbox.mark_leadership(scheduler.lease.key, scheduler.lease.owner, 0)
            self._tick_outage.recovered()
        except RedisError as exc:
            self._tick_outage.failed(exc)
            return
        except Exception:  # noqa: BLE001 - see the docstring
            self._log_failure("alert bookkeeping failed on node %s; going on")
            return
        if outcome == "not-leader":
            self._leader_until = 0.0
        else:
            self._next_mark = time.monotonic() + self.mark_every_s
            if not self.enabled:
                self._drop_failures()

    def _drop_failures(self) -> None:
        """Without alerts nobody takes the failure events (alert_digest.py): the leader
        drops them, so the list does not grow for days."""
        try:
            self.connection.delete(self.keys.alert_failures)
        except RedisError as exc:
            self._tick_outage.failed(exc)

    def leading(self) -> bool:
        return time.monotonic() < self._leader_until

    def _tell_memory_full(self, scheduler: "DailyScheduler") -> None:
        """While the leader sees Redis refuse writes for memory: ``redis_full``, sent
        directly (the outbox is one of the things refused), once per episode. The episode
        is the marker's (redis_memory.py), which every leader reads, so a new leader does
        not send it again; without a marker (Redis 6) it is this process's own."""
        since = getattr(scheduler, "memory_full_since", None)
        if since is None:
            self._memory_episode = None
            return
        if not self.enabled:
            return
        mark = scheduler.memory_mark or {}
        if mark.get("alerted"):
            return
        if mark.get("since_ms") is not None:
            since_ms = int(str(mark["since_ms"]))
        else:
            if self._memory_episode is None or self._memory_episode[0] != since:
                self._memory_episode = (since, int(scheduler.clock().timestamp() * 1000))
            since_ms = self._memory_episode[1]
        memory = scheduler.redis_memory.describe() if scheduler.redis_memory is not None else "memory figures unknown"

        def delivered() -> None:
            try:
                note_delivered(self.connection, self.keys, self.settings.node_name, since_ms)
            except RedisError as exc:  # Redis 6 cannot take it either; this process still sends it once
                log.debug("could not note redis_full as delivered: %s", exc)

        self.send_direct(redis_full_alert(since_ms, self.settings.node_name, memory), on_delivered=delivered)

    # -- direct alerts (no outbox) -----------------------------------------------------

    def send_direct(self, alert: Alert, on_delivered: Callable[[], None] | None = None) -> bool:
        """Send ``alert`` to the webhook without the outbox (alert_direct.py): for what Redis
        cannot keep (``redis_full``: a Redis out of memory refuses the outbox's writes).
        ``on_delivered`` runs (in the direct alerts' thread) after a 2xx. Each id once per
        process: False when it was raised before, or alerts are off."""
        def ended(how: str) -> None:
            if how == "delivered" and on_delivered is not None:
                on_delivered()

        return self.direct.send(alert, on_end=ended)

    # -- the background thread ---------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        log.info("alerts to %s (no_leader after %ss without a leader)", self.shown_url,
                 self.settings.alert_no_leader_s)
        self._thread = threading.Thread(target=self._run, name="dailyq-alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2 * TIMEOUT_S + 1) -> None:
        """Stop the thread, letting a POST under way finish and be acked (after the
        lease was released: waiting here holds up nobody's takeover)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.direct.stop(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait_s = IDLE_WAIT_S
            try:
                if self.leading():
                    self.detect_if_due()
                    wait_s = min(wait_s, self.deliver_due(), max(0.05, self._next_detect - time.monotonic()))
                self._outage.recovered()
            except RedisError as exc:
                self._outage.failed(exc)
                wait_s = 2.0
            except Exception:  # noqa: BLE001 - a failing pass must not end alerting, nor the scheduler
                self._log_failure("an alert pass failed on node %s; going on")
                wait_s = 5.0
            self._wake.wait(wait_s)
            self._wake.clear()

    def _log_failure(self, message: str) -> None:
        """An unexpected error, with its traceback, at most once a minute (a bug that
        fails every pass must not flood the log)."""
        if time.monotonic() - self._last_failure_log > 60:
            self._last_failure_log = time.monotonic()
            log.exception(message, self.settings.node_name)

    # -- detection ---------------------------------------------------------------------

    def detect_if_due(self) -> list[str]:
        if not self.enabled or time.monotonic() < self._next_detect:
            return []
        started = time.monotonic()
        raised = self.detect()
        took = time.monotonic() - started
        self._next_detect = time.monotonic() + max(self.detect_every_s, DETECT_DUTY * took)
        return raised

    def detect(self) -> list[str]:
        """Take the failures recorded since the last look (alert_digest.py) and judge what
        fell due on the watched days; put what is new into the outbox. Returns the ids
        that entered it (or, for a digest, grew).

        No day is read whole: a failure reaches the alerts as an event its script pushed;
        ``day_late`` and ``slot_missed`` are judged once each, when a deadline or a slot's
        grace passes, from the records of just the runs concerned (HMGET). A pass with
        nothing due asks Redis for its time, the day's stored slots and the failures list."""
        seconds, micros = self.connection.time()
        now = datetime.fromtimestamp(seconds + micros / 1e6, timezone.utc)
        taken = self.failures.take()
        for alert in taken:
            log.warning("alert %s: %s", alert.event, alert.payload["text"])
        if taken:
            self._claim_at = 0.0
            self._wake.set()
        if self._watched_since is None:  # set once for good by the first leader: read until known
            first_ms = self.outbox.first_held_ms()
            if first_ms is not None:
                self._watched_since = datetime.fromtimestamp(first_ms / 1000, timezone.utc)
        watched_since = self._watched_since
        days = watched_days(self.table, now)
        for day in [d for d in self._settled if d not in days]:
            del self._settled[day]
        for day in [d for d in self._next_predict if d not in days]:
            del self._next_predict[day]
        alerts: list[Alert] = []
        settled: list[tuple[date, tuple[str, ...]]] = []
        for day, tasks in days.items():
            # Once-a-day tasks' slots as their day was fanned out (runs.DaySlots, one field per
            # task): an ``at`` moved after the slot ran is neither late nor missed at its new time.
            slots = DaySlots.read(self.connection, self.keys, day) if any(task.at for task in tasks) else None
            done = self._settled.get(day, set())
            late_due: list[tuple[Task, datetime]] = []
            overdue: dict[str, list[Slot]] = {}
            for task in tasks:
                if (DAY_LATE, task.name) not in done:
                    deadline = deadline_at(task, day)
                    if deadline is None or now >= deadline:
                        # A deadline that passed before any dailyq leader ran here was not
                        # missed by dailyq: a fresh deployment is not late for yesterday.
                        if deadline is not None and watched_since is not None and deadline >= watched_since:
                            late_due.append((task, deadline))
                        settled.append((day, (DAY_LATE, task.name)))
                # Each slot is judged once, when its grace has passed: fired by then, or missed.
                # (Not a slot whose fan-out Redis refused: the leader fans it out once it can.)
                past = [slot for slot in overdue_slots(task, day, now, slots)
                        if (SLOT_MISSED, task.name, slot.label) not in done
                        and (task.name, slot.label) not in self._held_slots]
                if past:
                    overdue[task.name] = past
                    settled += [(day, (SLOT_MISSED, task.name, slot.label)) for slot in past]
            predict = [task for task in tasks if task.deadline is not None and (PREDICTED, task.name) not in done]
            if predict:
                alerts += self._predict_late(day, predict, slots, now, settled)
            if not late_due and not overdue:
                continue
            judged = [task for task, _ in late_due] + [task for task in tasks if task.name in overdue]
            # Computed params (params_book.py): read only when a computed task is judged.
            book = ParamsBook.read(self.connection, self.keys, day) \
                if any(task.params_computed for task in judged) else None
            wanted = [run.run_id for task, deadline in late_due for slot in task_slots_on(task, day, slots)
                      if slot.fires_at <= deadline for run in runs_of_slot(task, slot, book)]
            wanted += [run.run_id for task in tasks for slot in overdue.get(task.name, ())
                       for run in runs_of_slot(task, slot, book)]
            records = read_records(self.connection, self.keys.day_runs(day), wanted)
            for task, deadline in late_due:
                found = lateness(task, day, records, deadline, book, slots)
                if found.late:
                    alerts.append(day_late_alert(task, day, found))
            if overdue:
                # A computed slot whose callable was called fired, runs or not.
                fired = fired_slots(records.values()) | (book.fired_slots() if book else set())
                for task in tasks:
                    if task.name in overdue:
                        alerts += missed_slot_alerts(task, overdue[task.name], fired, watched_since)
        raised = self._raise(alerts)
        # Only now that the alerts are in Redis: a pass that failed half-way is redone whole.
        for day, what in settled:
            self._settled.setdefault(day, set()).add(what)
        return [alert.alert_id for alert in taken] + raised

    def _predict_late(self, day: date, tasks: list[Task], slots: DaySlots | None, now: datetime,
                      settled: list[tuple[date, tuple[str, ...]]]) -> list[Alert]:
        """``day_late`` with ``predicted: true`` for each of ``tasks`` whose runs due by its
        deadline are expected (eta.py) to end more than PREDICTED_LATE_MARGIN_S after it,
        while the deadline is still ahead; ``settled`` gets each task predicted late, or
        whose deadline came. At most every ``predict_every_s``, and only for tasks whose
        day has begun (a slot fired). What it reads: the records of those tasks' runs and of
        the runs they come ``after`` (HMGET: not the day), the paused tasks, the heartbeats
        and the pending runs' learned durations. The ETA is of those runs alone, on every
        live worker: other tasks' runs would only make it later, so a day_late it predicts
        is no false alarm, and one it misses still comes at the deadline."""
        ahead: list[tuple[Task, datetime]] = []
        for task in tasks:
            deadline = deadline_at(task, day)
            if deadline is None or now >= deadline:
                settled.append((day, (PREDICTED, task.name)))
                continue
            fired = [slot for slot in task_slots_on(task, day, slots) if slot.fires_at <= now]
            if fired:
                ahead.append((task, deadline))
        if not ahead or time.monotonic() < self._next_predict.get(day, 0.0):
            return []
        self._next_predict[day] = time.monotonic() + self.predict_every_s
        names: set[str] = set()
        todo = [task.name for task, _ in ahead]
        while todo:  # the tasks and, transitively, those they come after
            name = todo.pop()
            if name not in names:
                names.add(name)
                todo += self.table.get(name).after
        chosen = [self.table.get(name) for name in names]
        book = ParamsBook.read(self.connection, self.keys, day) if any(t.params_computed for t in chosen) else None
        wanted = [run.run_id for task in chosen for slot in task_slots_on(task, day, slots)
                  for run in runs_of_slot(task, slot, book)]
        records = read_records(self.connection, self.keys.day_runs(day), wanted)
        runs = shown_runs(self.table, day, now, records, paused_tasks(self.connection, self.keys), book, slots,
                          task_names=names)
        estimate = read_eta(self.connection, self.keys, self.table, runs,
                            live_processes(self.connection, self.keys, now), now)
        found = []
        for task, deadline in ahead:
            end = estimate.end_of(task.name, slots_until=deadline)
            if end is not None and predicted_late(deadline, end, now):
                found.append(predicted_day_late_alert(task, day, deadline, end, now))
                settled.append((day, (PREDICTED, task.name)))
        return found

    def raise_alerts(self, alerts: list[Alert]) -> list[str]:
        """Put alerts found elsewhere (table_watch.py's ``tables_differ``) into the outbox,
        each id once, and wake the sender; returns the ids that entered it."""
        return self._raise(alerts)

    def _raise(self, alerts: list[Alert]) -> list[str]:
        if not alerts:
            return []
        new = set(self.outbox.enqueue(alerts))
        for alert in alerts:
            if alert.alert_id in new:
                # The log has every alert too, whether or not the webhook takes it.
                log.warning("alert %s: %s", alert.event, alert.payload["text"])
        if new:
            self._claim_at = 0.0
            self._wake.set()
        return [a.alert_id for a in alerts if a.alert_id in new]

    # -- delivery ----------------------------------------------------------------------

    def deliver_due(self) -> float:
        """Send every due alert (stopping at the first failure); returns how long the
        thread may sleep before something is due."""
        while not self._stop.is_set() and self.leading():
            rest_s = self._claim_at - time.monotonic()
            if rest_s > 0:
                return rest_s
            got = self.outbox.claim(self.owner, self.claim_ms)
            claimed_at = time.monotonic()
            if isinstance(got, Idle):
                due_in_s = OUTBOX_POLL_S if got.next_ms is None else max(0.05, (got.next_ms - got.now_ms) / 1000)
                self._claim_at = time.monotonic() + min(OUTBOX_POLL_S, due_in_s)
                continue
            wait_s = self.deliver(got, claimed_at)
            if wait_s is not None:
                self._claim_at = time.monotonic() + wait_s  # the endpoint gets a rest
        return IDLE_WAIT_S

    def deliver(self, claimed: Claimed, claimed_at: float) -> float | None:
        """POST one claimed alert; ack, drop or retry it. Returns the rest the endpoint
        gets after a retryable failure, else None."""
        assert self.url is not None
        if time.monotonic() - claimed_at > self.claim_ms / 2000:
            # Frozen (SIGSTOP, a VM pause) since the claim: another sender may hold the
            # alert by now. Hand it back (only if still ours) and claim anew rather than
            # POST on a stale claim: a freeze must not turn into a duplicate.
            log.warning("alert %s: this sender was held up since claiming it; claiming it anew before sending",
                        claimed.alert_id)
            self.outbox.retry(claimed.alert_id, self.owner, 0)
            return None
        acks: list[str] = []
        result = post_alert(self.url, claimed.payload_json, claimed.alert_id,
                            lambda: acks.append(self._ack(claimed.alert_id, claimed_at)))
        event = claimed.alert_id.split(":", 1)[0]
        if result.outcome == DELIVERED:
            if acks and acks[0] == "taken":
                log.warning("alert %s was taken over by another sender while this POST to %s took %.1fs; "
                            "it may arrive twice", claimed.alert_id, self.shown_url, time.monotonic() - claimed_at)
            log.info("alert %s delivered to %s (%s)", claimed.alert_id, self.shown_url, result.reason)
            return None
        attempts = claimed.attempts + 1
        age_ms = claimed.now_ms - claimed.created_ms
        if result.outcome == REFUSED:
            self.outbox.drop(claimed.alert_id, self.owner)
            log.error("alert %s (%s) dropped: %s refused it with %s, which a retry would not change",
                      claimed.alert_id, event, self.shown_url, result.reason)
            return None
        if age_ms >= self.give_up_ms:
            self.outbox.drop(claimed.alert_id, self.owner)
            log.error("alert %s (%s) dropped: not delivered to %s within %s of being raised, %d attempts "
                      "(last: %s)", claimed.alert_id, event, self.shown_url, _hours(self.give_up_ms), attempts,
                      result.reason)
            return None
        wait_s = backoff_s(self.settings, attempts, result.retry_after_s)
        # The last attempt comes when the alert turns give_up_s old, not a backoff later.
        wait_s = max(0.0, min(wait_s, (self.give_up_ms - age_ms) / 1000))
        self.outbox.retry(claimed.alert_id, self.owner, int(wait_s * 1000))
        log.warning("alert %s (%s) not delivered to %s (%s), attempt %d; next in %.0fs", claimed.alert_id, event,
                    self.shown_url, result.reason, attempts, wait_s)
        return wait_s

    def _ack(self, alert_id: str, started: float) -> str:
        """Forget the delivered alert, trying through a Redis hiccup for as long as our
        claim holds (after that, another sender may send it again anyway)."""
        deadline = started + self.claim_ms / 1000
        pause_s = 0.1
        while True:
            try:
                return self.outbox.ack(alert_id, self.owner)
            except RedisError as exc:
                if time.monotonic() + pause_s > deadline:
                    log.error("alert %s was delivered but Redis did not take note (%s); it will be sent again",
                              alert_id, exc)
                    return "unrecorded"
                time.sleep(pause_s)
                pause_s = min(2.0, pause_s * 2)


def _hours(ms: int) -> str:
    seconds = ms // 1000
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds}s"

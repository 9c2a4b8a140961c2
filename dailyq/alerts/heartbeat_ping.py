"""The outside heartbeat (``DAILYQ_HEARTBEAT_URL``): a dead-man's switch for the whole cluster.

Every alert goes through the Redis outbox and is sent by the leader, so with Redis down,
or no node leading, nothing is sent. An outside service (healthchecks.io, Cronitor, Dead
Man's Snitch, or Prometheus on ``dailyq_leader_heartbeat_timestamp_seconds``) alarms
when a ping it expects does not come: the leader POSTs one every ``DAILYQ_HEARTBEAT_S``
while it leads and Redis answers, and none otherwise.

* A beat falls due in the scheduler's tick (``on_tick``, one of its ``tick_hooks``),
  only on a tick that went through, as the leader. A tick that met Redis down never
  reaches its hooks, and a follower's does nothing: no beat while nobody leads or
  Redis is away. A new term beats at its first tick, so pings resume within a tick of
  a leader being back, well within one period.
* The beat is sent from a thread of its own: reading today's counts and the POST
  (alert_sender.post_json, at most its timeouts) never hold the tick. One beat waits at
  most; a newer one replaces it, so a slow endpoint gets fewer pings, never a backlog.
* The thread sends a beat only while the lease renewed at its tick still holds
  (``lease_ttl_s`` after it), and only if Redis answered its read of the counts.

Today's counts (done/total/failed, as ``status --watch`` counts them: watch.DONE_STATES)
come from metrics.count_today: the day's counts that every record write keeps
(day_feed.py), no read of the records, whatever the day's size.

Any 2xx is a success (healthchecks.io answers ``200 OK``). The URL is a secret: logs
show it redacted (webhook_url.redact_webhook_url). A failing endpoint is logged once
when it starts failing and once when it works again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Mapping

from redis import Redis
from redis.exceptions import RedisError, ResponseError

from ..clock import Clock, iso, utc_now
from ..ops.metrics import count_today
from ..ops.watch import DONE_STATES
from ..outage import OutageLog
from ..runs import FAILED
from ..settings import Settings
from ..table import TaskTable
from .sender import DELIVERED, post_json

if TYPE_CHECKING:
    from ..scheduler import DailyScheduler

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Beat:
    """One beat due, as the tick saw it: by whom, since when, at what Redis time, and
    until when (this host's monotonic clock) the lease renewed in that tick holds."""

    node: str
    leader_since: str | None
    at: datetime
    valid_until_s: float


def heartbeat_body(node: str, leader_since: str | None, at: datetime,
                   runs: Mapping[str, int] | None) -> dict[str, object]:
    """The JSON POSTed: ``runs`` is state -> today's runs in that state (all tasks);
    None when they could not be counted (``today`` is then null, the beat still goes)."""
    today = None if runs is None else {
        "done": sum(runs.get(state, 0) for state in DONE_STATES),
        "total": sum(runs.values()),
        "failed": runs.get(FAILED, 0),
    }
    return {"event": "heartbeat", "node": node, "leader_since": leader_since, "at": iso(at), "today": today}


def runs_per_state(counts: Mapping[tuple[str, str], int]) -> Counter:
    """(task, state) -> runs, summed over tasks: state -> runs."""
    per_state: Counter = Counter()
    for (_, state), number in counts.items():
        per_state[state] += number
    return per_state


def _since(owner: str) -> str | None:
    """The ``since`` of the lease's owner record (scheduler._new_owner): when this term began."""
    try:
        since = json.loads(owner).get("since")
    except (ValueError, AttributeError):
        return None
    return str(since) if since else None


class HeartbeatPing:
    """The leader's outside heartbeat; ``on_tick`` goes into the scheduler's tick_hooks.

    ``last_beat_s`` (Unix seconds, this host's clock) is what the metrics show as
    ``dailyq_leader_heartbeat_timestamp_seconds``: with a URL, the time of the last
    POST answered with a 2xx; without one, of the last beat the leader would have sent
    (so the gauge also serves those who alert from Prometheus alone). None: none yet."""

    def __init__(self, connection: Redis, settings: Settings, table: TaskTable, wall: Clock = utc_now) -> None:
        self.connection = connection
        self.settings = settings
        self.table = table
        self.url = settings.heartbeat_url
        self.period_s = float(settings.heartbeat_s)
        self._wall = wall
        self.last_beat_s: float | None = None
        self._term: str | None = None  # the lease owner of the term last seen leading
        self._next_at = 0.0  # monotonic
        self._waiting: Beat | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failing = False
        self._uncounted = False  # today's records could not be counted (logged once)
        self._outage = OutageLog(log, "the outside heartbeat")

    # -- in the scheduler's tick ------------------------------------------------------

    def on_tick(self, scheduler: "DailyScheduler") -> None:
        """A beat when one is due: a leader's tick, a period after the last (or at once
        in a new term). Never raises, never waits on the network."""
        if not scheduler.is_leader:
            self._term = None
            return
        owner = scheduler.lease.owner
        if owner != self._term:
            self._term = owner
            self._next_at = 0.0
        now_s = time.monotonic()
        if now_s < self._next_at:
            return
        self._next_at = now_s + self.period_s
        beat = Beat(self.settings.node_name, _since(owner), scheduler.redis_clock.estimate(),
                    now_s + self.settings.lease_ttl_s)
        if self.url is None:
            self.last_beat_s = self._wall().timestamp()
            return
        with self._wake:
            self._waiting = beat  # replaces one the thread has not taken yet
            self._wake.notify()

    # -- the sending thread -----------------------------------------------------------

    def start(self) -> None:
        if self.url is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="dailyq-heartbeat-ping", daemon=True)
        self._thread.start()
        log.info("outside heartbeat to %s every %gs while this node leads", self.settings.redacted_heartbeat_url(),
                 self.period_s)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)  # a POST under way ends within its timeouts

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._waiting is None and not self._stopping:
                    self._wake.wait()
                beat, self._waiting = self._waiting, None
            if beat is None or self._stopping:
                return
            try:
                self.send(beat)
            except Exception:  # noqa: BLE001 - the thread must outlive one bad beat
                log.exception("the outside heartbeat failed on node %s; going on", self.settings.node_name)

    def _not_counted(self) -> None:
        if not self._uncounted:
            self._uncounted = True
            log.exception("the outside heartbeat could not count today's runs; it goes on with \"today\": null")

    def send(self, beat: Beat) -> bool:
        """Read today's counts and POST the beat, if the lease of its tick still holds;
        True when the endpoint answered 2xx."""
        if time.monotonic() > beat.valid_until_s:
            return False  # the tick's lease may have lapsed since: this node may no longer lead
        runs: Counter | None
        try:
            counts = count_today(self.connection, self.settings.keys, self.table, beat.at)
            runs = runs_per_state(counts)
            self._uncounted = False
        except ResponseError:  # Redis answered: a record its count cannot read (day_feed.read_counts)
            runs = None
            self._not_counted()
        except RedisError as exc:
            self._outage.failed(exc)
            return False  # Redis does not answer: no ping, the outside service alarms
        except Exception:  # noqa: BLE001 - a record we cannot read: Redis answered and we lead, so ping
            runs = None
            self._not_counted()
        self._outage.recovered()
        if time.monotonic() > beat.valid_until_s:
            return False
        assert self.url is not None
        body = json.dumps(heartbeat_body(beat.node, beat.leader_since, beat.at, runs))
        delivery = post_json(self.url, body)
        if delivery.outcome == DELIVERED:
            self.last_beat_s = self._wall().timestamp()
            if self._failing:
                self._failing = False
                log.info("outside heartbeat to %s delivered again (%s)", self.settings.redacted_heartbeat_url(),
                         delivery.reason)
            return True
        if not self._failing:
            self._failing = True
            log.warning("outside heartbeat to %s not delivered (%s); the next beat is in %gs",
                        self.settings.redacted_heartbeat_url(), delivery.reason, self.period_s)
        return False

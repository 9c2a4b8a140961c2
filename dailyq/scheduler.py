"""The leader loop: one scheduler at a time fans out each slot's runs.

``python scheduler.py`` runs this on every node. ``DailyScheduler`` is our own loop; of
rq-scheduler it uses only the registration of a scheduler process and the moving of
delayed jobs, by composition (rq_seam.DelayedJobs). Its loop, lock and heartbeat are
not used, because with several nodes they break:

* its lock is taken per polling pass, deleted without an owner check, and fails
  over only after interval + 10 s; ours is a lease with an owner token, renewed
  every tick, released by compare-and-delete (lease.py), held across passes;
* its cron runs in the host's local time; our slots come from schedule.py in each
  task's own zone, and fall due by the Redis server's clock (clock.RedisClock), which
  every node shares, not by this host's, which may be minutes off;
* it pickles the jobs it stores; ours are JSON (``DailyJob``).

Delayed jobs stored through the stock API (``enqueue_at``/``enqueue_in``) still
work: the leader moves them each tick, under our prefix and with JSON jobs.

Every fan-out is fenced by the lease (fanout.py), so a leader that was paused
past its lease and wakes up enqueues nothing.

A Redis out of memory refuses the fan-out, the heartbeat and most of the leader's pass,
but not the lease (scripts.allow_oom): every scheduler goes on ticking, the leader keeps
its lease (or one is elected), and a refused pass is tried again with backoff once
Redis takes writes (redis_memory.writes_accepted). A slot whose fan-out Redis refused
is remembered (here, and in the marker other leaders read) and fanned out then, even
past its misfire grace, and says so (a log line, and the day's ``late`` record that
``status`` shows).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from datetime import date, datetime, timedelta
from typing import Callable, cast

from redis import Redis
from redis.exceptions import RedisError

from .alerts.data_lost import GIVE_UP_S as DATA_LOST_ALERT_S
from .alerts.data_lost import DataLostAlerts
from .beats import OFFSET_WARN_S, beat_value, describe_offset, forget_silent_nodes, format_offset, register_node
from .clock import Clock, RedisClock, iso
from .dependencies import WaitingRuns
from .deploys import LeftJobs
from .errors import LeaseLost
from .fanout import FanOutOptions, fan_out, note_day_slot, trim_durations
from .fingerprint import table_fingerprint, task_digest
from .generation import Generation, GenerationWatch, NodeMemory, data_loss_view
from .lease import Lease
from .limits import PermitSweep
from .outage import MEMORY, refused_for_memory
from .params_book import next_retry_at, retried, retry_due, slot_runs
from .pausing import paused_names
from .recovery import AbandonedRuns, StrandedJobs
from .redis_memory import RedisMemory, clear_mark, describer, mark_full, read_mark, read_memory, writes_accepted
from .redis_values import as_text
from .retries import DueRetries
from .rq_seam import DelayedJobs, RQKeys, make_queue
from .runs import DaySlots, Run, runs_of_slot
from .schedule import Slot
from .settings import Settings
from .settle import FailedJobs
from .table import Task, TaskTable
from .table_store import keep_published
from .table_store import publish as publish_table

log = logging.getLogger(__name__)

TICK_S = 1.0
# Short: after a Redis outage the leader is back within this, and with it the slots,
# the recovery and the retries whose backoff passed meanwhile: none waits for long.
MAX_BACKOFF_S = 2.0
# How often each scheduler refreshes its heartbeat keys (they live three times that).
HEARTBEAT_EVERY_S = 5.0
# How often the leader looks for runs whose executing process died (recovery.py),
# at most; shorter claim TTLs are checked more often (every half TTL).
RECOVERY_EVERY_S = 5.0
# Once warned that this host's clock is more than OFFSET_WARN_S off Redis's, say it is
# fine again only below this: an offset hovering about the threshold logs once.
OFFSET_CLEAR_S = OFFSET_WARN_S * 0.75


# How often the leader looks for work that others may have left (runs held for upstream
# runs by a trigger; params callables failed in a trigger) when its last look found none.
LOOK_AGAIN_S = 10.0

# How often the leader forgets the learned durations of series no day has had for the
# retention period (fanout.trim_durations): the hash must not grow without bound.
TRIM_DURATIONS_EVERY_S = 3600.0


class Look:
    """When the leader next looks at something that is usually empty: each tick while it
    has work, at its next known due time, else every LOOK_AGAIN_S. Keeps an idle
    leader's tick to a few commands (bench/run.py's idle cost)."""

    def __init__(self) -> None:
        self.next_at: datetime | None = None  # None: at the next tick

    def due(self, now: datetime) -> bool:
        return self.next_at is None or now >= self.next_at

    def after(self, now: datetime, next_due: datetime | None) -> None:
        again = now + timedelta(seconds=LOOK_AGAIN_S)
        self.next_at = min(again, next_due) if next_due is not None else again

    def now(self) -> None:
        self.next_at = None


class DailyScheduler:
    def __init__(self, connection: Redis, settings: Settings, table: TaskTable, clock: Clock | None = None,
                 tick_s: float = TICK_S) -> None:
        """``clock`` is what slots fall due by: Redis's (the default), or in tests any
        callable returning fixed datetimes. This host's offset from Redis is measured
        either way, for the heartbeat."""
        keys = settings.keys
        self.connection = connection
        self.delayed = DelayedJobs(connection, keys, f"{settings.node_name}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                                   interval_s=tick_s)
        self.settings = settings
        self.keys = keys
        self.table = table
        self.redis_clock = clock if isinstance(clock, RedisClock) else RedisClock(connection)
        self.clock: Clock = clock if clock is not None else self.redis_clock
        self._clock_off = False
        self.tick_s = tick_s
        self.queue = make_queue(connection, keys)
        self.lease = Lease(connection, keys.leader, self._new_owner(), settings.lease_ttl_s * 1000)
        self.is_leader = False
        self._cursors: dict[str, datetime] = {}
        # Each task's definition (fingerprint.task_digest), written to ``keys.fired`` with the
        # cursor: a later leader with another definition fans its fired slots out again.
        self._digests = {task.name: task_digest(task) for task in table.tasks}
        self._fired_digests: dict[str, str] = {}
        self._refire_due = False  # set at the start of each term (_load_cursors)
        self._stop = threading.Event()
        self._redis_down = False
        self._next_recovery = 0.0
        self._next_heartbeat = 0.0
        self._next_durations_trim = 0.0
        self._params_look = Look()
        # This table's fingerprint, named by every heartbeat; its description is published
        # at the first heartbeat and again whenever its key is found gone (fingerprint.py).
        self.table_fingerprint = table_fingerprint(table)
        self._table_published = False
        self._waiting_look = Look()
        self.abandoned = AbandonedRuns(connection, keys, self.queue, table, settings.retention_s, self.clock)
        self.retries = DueRetries(connection, self.queue)
        self.stranded = StrandedJobs(connection, keys, self.queue, stuck_after_s=settings.claim_ttl_s)
        self.waiting = WaitingRuns(connection, keys, self.queue, table, settings.retention_s)
        self.permits = PermitSweep(connection, keys, RQKeys(self.queue).queue, table)
        # Runs of jobs RQ failed outside the guard (settle.py): by Redis's clock, which
        # RQ's scores follow, also when slots fall due by an injected clock.
        self.failed_jobs = FailedJobs(connection, keys, self.queue, settings.retention_s, self.redis_clock)
        self.left = LeftJobs(connection, keys, self.queue, settings.retention_s, settings.removed_grace_s, self.clock)
        # Called at the end of every tick, leader or not (alerts.py's leadership record).
        # A hook must not raise, nor take long: it runs inside the tick.
        self.tick_hooks: list[Callable[[DailyScheduler], None]] = []
        # Redis's data lost (generation.py): the mark this process saw, the paused tasks
        # and cursors it last read, and the leader's direct alert (data_lost_alert.py).
        self.generation = GenerationWatch(connection, keys, settings.node_name, "scheduler")
        self.memory = NodeMemory(connection, keys)
        self.data_lost = DataLostAlerts(connection, settings)
        # Redis out of memory (redis_memory.py): this scheduler saw a write refused and has
        # not seen writes accepted since; when to probe again, and the backoff.
        self.memory_full_since: float | None = None  # monotonic
        self.redis_memory: RedisMemory | None = None  # INFO memory, read at the last refusal
        self.memory_mark: dict[str, object] | None = None  # the marker (since_ms, alerted, node)
        self._probe_at = 0.0
        self._probe_backoff_s = tick_s
        self._marked_at = 0.0
        self._clear_mark = False
        # Slots whose fan-out Redis refused: (task, slot label) -> (slot, Redis time first refused).
        self.refused_slots: dict[tuple[str, str], tuple[Slot, datetime]] = {}
        self._firing: list[tuple[Task, Slot]] = []
        MEMORY.name(f"scheduler on node {settings.node_name}", describer(connection))

    @property
    def _fan_out_options(self) -> FanOutOptions:
        """The leader's fan-outs: fenced by its lease, WAITing for replicas when asked."""
        return FanOutOptions(self.settings.retention_s, fence=self.lease, wait_replicas=self.settings.wait_replicas)

    # -- leadership ------------------------------------------------------------------

    def _new_owner(self) -> str:
        return json.dumps({"node": self.settings.node_name, "pid": os.getpid(), "since": iso(self.clock()),
                           "token": uuid.uuid4().hex}, sort_keys=True)

    def take_lease(self) -> bool:
        """Take or renew the leader lease; log every change of leadership."""
        if not self.is_leader:
            self.lease.owner = self._new_owner()  # fresh token and "since" for each term
        held = self.lease.acquire_or_renew()
        if held and not self.is_leader:
            log.info("node %s is now the leader", self.settings.node_name)
            self._load_cursors()
            self.failed_jobs.forget()  # go on from where the last leader stopped
            self.waiting.forget()  # each day with parked runs gets one full look again
            self._adopt_refused_slots()
        elif not held and self.is_leader:
            log.warning("node %s lost the leader lease (held by %s)", self.settings.node_name,
                        _holder_node(self.lease.holder()))
        self.is_leader = held
        return held

    def release_lease(self) -> None:
        if self.is_leader:
            try:
                if self.lease.release():
                    log.info("node %s released the leader lease", self.settings.node_name)
            except RedisError as exc:
                log.warning("could not release the leader lease (%s); it expires in %ss", exc,
                            self.settings.lease_ttl_s)
        self.is_leader = False

    # -- firing slots ----------------------------------------------------------------

    def _load_cursors(self) -> None:
        # What this process knew stays known: if Redis lost the cursors, the loss is
        # noticed (at the first due slot, or the next beat) and these are written back.
        self.memory.remember_cursors(self._cursors)
        # The client does not decode replies (no decode_responses): keys and values are bytes.
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.cursor)
            pipe.hgetall(self.keys.fired)
            stored, fired = cast("tuple[dict[bytes, bytes], dict[bytes, bytes]]", pipe.execute())
        self._cursors = {as_text(k): datetime.fromisoformat(as_text(v)) for k, v in stored.items()}
        self._fired_digests = {as_text(k): as_text(v) for k, v in fired.items()}
        self._refire_due = True  # done in the term's first fan-out pass (fire_due_slots), fenced

    def _window_start(self, task: Task, now: datetime) -> datetime:
        """Fire slots after the task's cursor, but none older than its misfire grace."""
        oldest_allowed = now - timedelta(seconds=task.misfire_grace_s)
        cursor = self._cursors.get(task.name)
        return max(cursor, oldest_allowed) if cursor else oldest_allowed

    def refire_changed_tasks(self, now: datetime) -> int:
        """At the start of a term: fan out again, for each task whose definition differs
        from the one of the leader that last fired it (``keys.fired``; a task with no digest
        stored is left alone), its slots within
        the misfire grace that are at or before its cursor (fired already). fan_out is
        idempotent per job id, so only the runs this table has and the day lacks are
        added: new params of a slot an old leader fired during a rolling deploy. Then
        the task's digest is ours. A task never fired (no cursor) needs none of this: its
        slots within the grace fire as usual. Computed params are settled once per slot
        (params_book.py), so a computed task's slots add nothing: left as they are."""
        # Only a digest stored and different: none stored (a first term of this version, or
        # Redis lost its data, generation.py) says nothing about the table that fired, and
        # fanning the slots out again then could run a day whose enqueued set is gone.
        changed = [task for task in self.table.tasks
                   if self._fired_digests.get(task.name) not in (None, self._digests[task.name])
                   and task.name in self._cursors]
        if not changed:
            return 0
        fired: list[tuple[Task, list[Run]]] = []
        for task in changed:
            cursor = self._cursors[task.name]
            slots = [] if task.params_computed else task.schedule.slots_between(
                now - timedelta(seconds=task.misfire_grace_s), min(cursor, now))
            fired.append((task, [run for slot in slots for run in runs_of_slot(task, slot)]))
        day_slots = DaySlots.read_days(self.connection, self.keys,
                                       {run.day for _, runs in fired for run in runs if run.task.at is not None})
        fired = [(task, [_mapped(run, day_slots) for run in runs]) for task, runs in fired]
        result = fan_out(self.connection, self.keys, self.queue, [run for _, runs in fired for run in runs],
                         self._fan_out_options)
        if result.waiting:
            self._waiting_look.now()
        pushed = set(result.enqueued)
        for task, runs in fired:
            if runs:
                added = sum(run.job_id() in pushed for run in runs)
                log.info("node %s leads with another definition of task %s than the leader that fired its slots: "
                         "%d run%s of its slots within the misfire grace added, %d there already",
                         self.settings.node_name, task.name, added, "" if added == 1 else "s", len(runs) - added)
        self.connection.hset(self.keys.fired, mapping={task.name: self._digests[task.name] for task in changed})
        self._fired_digests.update({task.name: self._digests[task.name] for task in changed})
        return len(result.enqueued)

    def _with_refused(self, task: Task, slots: list[Slot]) -> list[Slot]:
        """``slots``, plus the task's slots whose fan-out Redis refused (any age)."""
        refused = [slot for (name, _), (slot, _) in self.refused_slots.items() if name == task.name]
        if not refused:
            return slots
        by_label = {slot.label: slot for slot in [*refused, *slots]}
        return sorted(by_label.values(), key=lambda slot: slot.fires_at)

    def fire_due_slots(self, now: datetime) -> int:
        """Fan out every due slot of every task; returns the number of runs enqueued."""
        enqueued = 0
        if self._refire_due:
            enqueued += self.refire_changed_tasks(now)
            self._refire_due = False
        if self._params_look.due(now):
            # Computed params whose callable failed earlier and is due again (params_book.py).
            # (Of a paused task too: its runs are then held by the workers, shown paused.)
            next_retry = next_retry_at(self.connection, self.keys)
            if next_retry is not None and next_retry <= now:
                retried_runs = retry_due(self.connection, self.keys, self.table, now, self.settings.retention_s,
                                         fence=self.lease)
                if retried_runs:
                    result = fan_out(self.connection, self.keys, self.queue, retried_runs,
                                     self._fan_out_options)
                    enqueued += len(result.enqueued)
                    if result.waiting:
                        self._waiting_look.now()
                    retried(self.connection, self.keys, runs=retried_runs)
                next_retry = next_retry_at(self.connection, self.keys)
            self._params_look.after(now, next_retry)
        due = [(task, slots) for task in self.table.tasks
               if (slots := self._with_refused(task, task.schedule.slots_between(self._window_start(task, now), now)))]
        # Read only when some slot is due: an idle leader's tick asks nothing about pauses.
        paused, lost = self._paused_checked() if due else (set(), False)
        if lost:  # cursors written back after a loss: due is only what fires after them
            due = [(task, slots) for task, _ in due
                   if (slots := task.schedule.slots_between(self._window_start(task, now), now))]
        # Remembered should Redis refuse this fan-out for memory (_writes_refused).
        self._firing = [(task, slot) for task, slots in due if task.name not in paused for slot in slots]
        # Every slot due now in one fan-out: the queue's order is then decided over all of
        # them (longest first, a limited task's backlog first; fanout.longest_first), not
        # task by task in table order.
        # A once-a-day task's runs of a day use the slot first fanned out that day (runs.DaySlots):
        # an ``at`` or ``tz`` edited after it ran fans out under the stored slot (a no-op).
        day_slots = DaySlots.read_days(self.connection, self.keys, {
            slot.day for task, slots in due if task.at is not None and task.name not in paused for slot in slots})
        fired: list[tuple[Task, Slot, Slot, list[Run]]] = []  # (task, its slot due now, the slot fanned out, runs)
        for task, slots in due:
            if task.name in paused:
                # Neither fanned out nor its cursor moved: on resume, the slots that fell due
                # meanwhile fire if within misfire_grace_s, older ones are missed (pausing.py).
                continue
            for due_slot in slots:
                slot = day_slots[due_slot.day].slot_of(task, due_slot) if due_slot.day in day_slots else due_slot
                if slot != due_slot:
                    log.info("task %s already ran today at slot %s and its schedule changed (its slot now: %s): "
                             "the day's runs stay those of %s", task.name, slot.isoformat(), due_slot.isoformat(),
                             slot.isoformat())
                # A computed task's list is made here, once per slot, and stored (params_book.py).
                runs = slot_runs(self.connection, self.keys, task, slot, now, self.settings.retention_s,
                                 fence=self.lease)
                if task.params_computed and not runs:
                    self._params_look.now()  # it may have failed: its retry is due in backoff seconds
                    if task.at is not None:  # no fan-out records the slot its params entry is of
                        note_day_slot(self.connection, self.keys, slot, task.name, self.settings.retention_s)
                fired.append((task, due_slot, slot, runs))
        if not fired:
            return enqueued
        result = fan_out(self.connection, self.keys, self.queue, [run for *_, runs in fired for run in runs],
                         self._fan_out_options)
        self._firing = []  # fanned out: what follows is bookkeeping a refusal does not undo
        enqueued += len(result.enqueued)
        if result.waiting:
            self._waiting_look.now()  # released in this very tick if upstream is done
        pushed = set(result.enqueued)
        for task, due_slot, slot, runs in fired:
            new = sum(run.job_id() in pushed for run in runs)
            log.info("node %s fanned out %s slot %s: %d enqueued, %d already enqueued",
                     self.settings.node_name, task.name, slot.isoformat(), new, len(runs) - new)
            # The cursor follows the table's slot (the one due now), so it is not due again.
            self._cursors[task.name] = max(self._cursors.get(task.name, due_slot.fires_at), due_slot.fires_at)
        names = {task.name for task, *_ in fired}
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.cursor, mapping={name: self._cursors[name].isoformat() for name in names})
            pipe.hset(self.keys.fired, mapping={name: self._digests[name] for name in names})
            pipe.execute()
        self._fired_digests.update({name: self._digests[name] for name in names})
        self._fanned_out_late([(task, due_slot) for task, due_slot, _, runs in fired
                               if any(run.job_id() in pushed for run in runs)], now)
        for task, due_slot, _, _ in fired:  # refused, but (a day of an earlier transaction) in before the refusal
            self.refused_slots.pop((task.name, due_slot.label), None)
        return enqueued

    def seconds_until_next_slot(self, now: datetime) -> float:
        """From ``now`` by our clock (Redis's), which runs at the pace of the loop's
        waits: waiting this long wakes the loop at the slot, not before or after."""
        upcoming = [s.fires_at for t in self.table.tasks if (s := t.schedule.next_slot(now))]
        return (min(upcoming) - now).total_seconds() if upcoming else float("inf")

    def recover_abandoned_runs(self) -> None:
        now = self.clock().timestamp()
        if now < self._next_recovery:
            return
        self._next_recovery = now + max(0.5, min(RECOVERY_EVERY_S, self.settings.claim_ttl_s / 2))
        self.abandoned.requeue(fence=self.lease)
        self.waiting.ended(self.abandoned.failed)
        self.stranded.requeue()

    def leader_pass(self) -> None:
        """The leader's pass: slots, recovery, runs held for upstream runs that finished
        (dependencies.py; also those this pass held), retries, and rq-scheduler's delayed
        jobs, each "due" by our clock (Redis's), not the host's."""
        now = self.clock()
        self.fire_due_slots(now)
        self.permits.sweep()  # every tick: a dead holder's permit serves set-aside runs within a tick of lapsing
        self.recover_abandoned_runs()
        settled = self.failed_jobs.settle()  # one command every few seconds when RQ failed nothing
        self.waiting.ended([(s.day, s.run_id) for s in settled if s.day is not None])
        if self._waiting_look.due(now):
            self.waiting.release_all()
            self.left.settle_waiting(self.waiting.unknown)  # parked runs no live table has (deploys.py)
            # Every tick while some day has parked runs (the backstop for a worker that died
            # between an upstream FINISH and its release); else a look for days that others
            # (trigger, rerun) parked runs on, every LOOK_AGAIN_S.
            self._waiting_look.after(now, now if self.waiting.days_held else None)
        self.retries.move_due(self.clock())
        self.delayed.move_due(self.clock())
        self.left.look_if_due()  # jobs workers left for another table (deploys.py)
        if now.timestamp() >= self._next_durations_trim:
            self._next_durations_trim = now.timestamp() + TRIM_DURATIONS_EVERY_S
            trim_durations(self.connection, self.keys, now.date(), self.settings.retention_days)

    # -- the loop --------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def heartbeat(self) -> None:
        """Our rq-scheduler registration key and our health key, every HEARTBEAT_EVERY_S
        (not every tick: three idle nodes should cost Redis next to nothing). The health
        key carries this host's clock offset from Redis, for status and health."""
        now = self.clock()
        if now.timestamp() < self._next_heartbeat:
            return
        self._next_heartbeat = now.timestamp() + HEARTBEAT_EVERY_S
        self.redis_clock.refresh_if_due()  # the default clock just did; an injected one does not
        offset_s = self.redis_clock.offset_s
        self._note_offset(offset_s)
        node = self.settings.node_name
        if not self._table_published:
            publish_table(self.connection, self.keys, self.table)
            self._table_published = True
        with self.connection.pipeline(transaction=False) as pipe:
            keep_published(pipe, self.keys, self.table_fingerprint)
            self.delayed.keep_registered(pipe, int(self.tick_s + 3 * HEARTBEAT_EVERY_S))
            pipe.set(self.keys.heartbeat("scheduler", node),
                     beat_value(now, os.getpid(), offset_s, table=self.table_fingerprint),
                     ex=int(3 * HEARTBEAT_EVERY_S))
            register_node(pipe, self.keys, node, now)
            forget_silent_nodes(pipe, self.keys, now, self.settings.retention_s)
            reads = self.memory.queue_reads(pipe, cursors=not self.is_leader)
            self.generation.queue_read(pipe)  # last: a loss before it is seen in it (generation.py)
            kept, *replies = pipe.execute()
        self._note_generation(replies[-1], replies[-1 - reads:-1])
        # The description's key was gone (Redis lost it): published again at the next beat.
        self._table_published = bool(kept)

    # -- Redis's data lost (generation.py) ----------------------------------------------

    def _paused_checked(self) -> tuple[set[str], bool]:
        """The paused tasks, read with the generation mark in one round trip, so that no
        slot is fanned out by a leader that has not seen Redis keep its data; and whether
        this read found a loss (cursors and pauses were then written back)."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hkeys(self.keys.paused)
            self.generation.queue_read(pipe)
            names, raw = pipe.execute()
        lost = self.generation.observe(raw, self.redis_clock.estimate())
        if lost is None:
            self._alert_loss_if_leader()
            return {as_text(name) for name in names}, False
        self._after_loss(lost)
        return paused_names(self.connection, self.keys), True

    def _note_generation(self, raw: bytes | None, reads: list[object]) -> None:
        lost = self.generation.observe(raw, self.redis_clock.estimate())
        if lost is None:
            self.memory.take(reads)  # same generation: what Redis holds now is what to remember
            self._alert_loss_if_leader()
        else:
            self._after_loss(lost)  # the reads came from the emptied Redis: keep what we knew

    def _after_loss(self, lost: Generation) -> None:
        """Write back the cursors (the leader's own, else the last read) and the pauses
        this process remembers; go on from the highest cursors any node wrote back."""
        self._cursors, restored = self.memory.restore(self._cursors)
        log.warning("scheduler on node %s wrote back after the loss: cursors of %s; pauses of %s",
                    self.settings.node_name, ", ".join(sorted(self._cursors)) or "no task",
                    ", ".join(restored) or "no task")
        self._alert_loss_if_leader()

    def _alert_loss_if_leader(self) -> None:
        """The leader sends ``redis_data_lost`` for a mark written after a loss, once
        (data_lost_alert.py dedups across leaders), while the loss is under an hour old."""
        seen = self.generation.seen
        if not self.is_leader or seen is None or seen.lost_since_ms is None:
            return
        if self.redis_clock.estimate().timestamp() * 1000 - seen.lost_since_ms > DATA_LOST_ALERT_S * 1000:
            return
        view = data_loss_view(seen)
        if view is not None:
            self.data_lost.raise_for(view)

    def _note_offset(self, offset_s: float | None) -> None:
        """Log once when this host's clock goes more than OFFSET_WARN_S off Redis's, and
        once when it is back (below OFFSET_CLEAR_S)."""
        if offset_s is None:
            return
        node = self.settings.node_name
        if not self._clock_off and abs(offset_s) > OFFSET_WARN_S:
            self._clock_off = True
            log.warning("the clock of node %s is %s Redis's (more than %gs); slots still fire by Redis's clock, "
                        "but fix this node's time sync (NTP)", node, describe_offset(offset_s), OFFSET_WARN_S)
        elif self._clock_off and abs(offset_s) < OFFSET_CLEAR_S:
            self._clock_off = False
            log.info("the clock of node %s is back within %gs of Redis's (%s)", node, OFFSET_CLEAR_S,
                     format_offset(offset_s))

    def run_once(self) -> None:
        self._refusable(self.heartbeat)
        if self.take_lease():
            try:
                if not self._writes_work():
                    self._hold_due_slots()
                else:
                    self.leader_pass()
                    if self._clear_mark:
                        # Only now: a leader that died before the refused slots went out left
                        # them in the marker for the next one.
                        clear_mark(self.connection, self.keys)
                        self._clear_mark = False
            except LeaseLost:
                log.warning("node %s: lease lost during fan-out; enqueued nothing as leader", self.settings.node_name)
                self.is_leader = False
            except RedisError as exc:
                if not refused_for_memory(exc):
                    raise
                # The pass is tried again after a backoff, once a probe finds writes accepted.
                self._probe_at = time.monotonic() + self._probe_backoff_s
                self._writes_refused()
        else:
            self._writes_work()  # a follower ends its episode too (its own log line)
        for hook in self.tick_hooks:
            hook(self)

    # -- Redis out of memory (redis_memory.py) -------------------------------------------

    def _refusable(self, step: Callable[[], object]) -> bool:
        """``step()``; False when Redis refused it for memory (noted; the tick goes on)."""
        try:
            step()
        except RedisError as exc:
            if not refused_for_memory(exc):
                raise
            self._writes_refused()
            return False
        return True

    def _writes_refused(self) -> None:
        """Redis refused one of our writes for memory: log it (once per episode, for the
        process), probe again after a backoff, and keep the marker other processes read."""
        now_s = time.monotonic()
        if self.memory_full_since is None:
            self.memory_full_since = now_s
            self._probe_backoff_s = self.tick_s
            self._probe_at = now_s + self._probe_backoff_s
            self._clear_mark = False
        MEMORY.refused("the scheduler pass")
        new_slots = bool(self._firing)
        if self._firing:
            now = self.clock()
            for task, slot in self._firing:
                self.refused_slots.setdefault((task.name, slot.label), (slot, now))
            self._firing = []
        if not new_slots and now_s - self._marked_at < self.tick_s / 2:
            return  # one marker write per tick is plenty
        self._marked_at = now_s
        try:
            self.redis_memory = read_memory(self.connection)
            mark = mark_full(self.connection, self.keys, self.settings.node_name, self.redis_memory,
                             slots=self._slot_list() if self.is_leader else None)
            self.memory_mark = {"since_ms": mark.since_ms, "alerted": mark.alerted, "node": mark.node}
            if self.is_leader:
                self._adopt(mark.slots)
        except RedisError as exc:  # Redis 6 refuses the marker too; status then goes by INFO alone
            log.debug("could not keep the memory-full marker: %s", exc)

    def _writes_work(self) -> bool:
        """True unless Redis refused a write and still does: while it does, one probe per
        backoff (redis_memory.writes_accepted) and False. A probe that passes ends the
        episode and the pass goes on at once (after it, the leader drops the marker)."""
        if self.memory_full_since is None:
            return True
        if time.monotonic() < self._probe_at:
            return False
        if not writes_accepted(self.connection, self.keys):
            self._probe_at = time.monotonic() + self._probe_backoff_s
            self._probe_backoff_s = min(MAX_BACKOFF_S, self._probe_backoff_s * 2)
            self._writes_refused()
            return False
        MEMORY.accepted()
        self.memory_full_since = None
        self._probe_at = 0.0
        self._clear_mark = True  # by the leader, once its pass went through (run_once)
        self.memory_mark = None
        return True

    def _hold_due_slots(self) -> None:
        """While Redis refuses writes the pass is not even tried; the slots that fall due
        meanwhile count as refused, so that they are fanned out once writes work, however
        long that takes (reads still work: the schedule and the paused tasks)."""
        now = self.clock()
        due = [(task, slot) for task in self.table.tasks
               for slot in task.schedule.slots_between(self._window_start(task, now), now)
               if (task.name, slot.label) not in self.refused_slots]
        if not due:
            return
        paused = paused_names(self.connection, self.keys)
        self._firing = [(task, slot) for task, slot in due if task.name not in paused]
        if self._firing:
            self._writes_refused()

    def _slot_list(self) -> list[dict[str, str]]:
        return [{"task": name, "slot": slot.isoformat(), "tz": slot.zone}
                for (name, _), (slot, _) in sorted(self.refused_slots.items())]

    def _adopt(self, stored: list[dict[str, str]]) -> None:
        """Refused slots another leader left in the marker: ours to fan out too."""
        now = self.clock()
        for entry in stored:
            task = self.table.by_name.get(entry.get("task", ""))
            if task is None:
                continue
            try:
                slot = Slot.from_iso(entry["slot"], entry.get("tz") or task.tz)
            except (KeyError, ValueError):
                continue
            self.refused_slots.setdefault((task.name, slot.label), (slot, now))

    def _adopt_refused_slots(self) -> None:
        """A new term: the slots whose fan-out Redis refused an earlier leader (its marker)."""
        try:
            mark = read_mark(self.connection, self.keys)
        except RedisError:
            return
        if mark and isinstance(mark.get("slots"), list):
            self._adopt([{k: str(v) for k, v in item.items()} for item in mark["slots"] if isinstance(item, dict)])

    def _fanned_out_late(self, fired: list[tuple[Task, Slot]], now: datetime) -> None:
        """The refused slots among ``fired`` (those with runs enqueued now) went out now:
        say so (a WARNING line and the day's ``late`` record, which status shows)."""
        late = [(task, slot, self.refused_slots.pop((task.name, slot.label))[1]) for task, slot in fired
                if (task.name, slot.label) in self.refused_slots]
        for task, slot, refused_at in late:
            after_s = (now - slot.fires_at).total_seconds()
            past = after_s > task.misfire_grace_s
            log.warning("node %s fanned out %s slot %s late, %.0fs after it fell due%s: Redis had refused its "
                        "fan-out for memory (from %s)", self.settings.node_name, task.name, slot.isoformat(), after_s,
                        f", past its misfire grace of {task.misfire_grace_s}s" if past else "", iso(refused_at))
            try:
                self.connection.hset(self.keys.day_late(slot.day), f"{task.name}|{slot.label}", json.dumps(
                    {"task": task.name, "slot": slot.isoformat(), "due_at": iso(slot.fires_at),
                     "refused_since": iso(refused_at), "fanned_out_at": iso(now), "past_grace": past,
                     "why": "Redis refused its fan-out: out of memory"}))
                self.connection.expire(self.keys.day_late(slot.day), self.settings.retention_s)
            except RedisError as exc:  # the log line says it; status just lacks the note
                log.warning("could not record that slot %s of %s went out late: %s", slot.isoformat(), task.name, exc)

    def run(self, burst: bool = False) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("scheduler on node %s started (%d tasks, queue %r)", self.settings.node_name,
                 len(self.table.tasks), self.keys.queue_name)
        backoff_s = self.tick_s
        registered = False
        try:
            while not self._stop.is_set():
                try:
                    if not registered:
                        # Refused for memory: registered at a later tick; the tick goes on (the lease).
                        registered = self._refusable(self.delayed.register_birth)
                    self.run_once()
                    if self._redis_down:
                        log.info("Redis reachable again; scheduler on node %s resumes", self.settings.node_name)
                        self._redis_down = False
                    backoff_s = self.tick_s
                    wait_s = min(self.tick_s, max(0.0, self.seconds_until_next_slot(self.clock())))
                except RedisError as exc:
                    if not self._redis_down:
                        log.error("Redis unavailable (%s); scheduler on node %s retrying with backoff",
                                  exc, self.settings.node_name)
                        self._redis_down = True
                    # We cannot renew while Redis is away: assume the lease is gone.
                    self.is_leader = False
                    wait_s = backoff_s
                    backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
                except Exception:  # noqa: BLE001 - one bad pass must not stop the node's scheduler
                    log.exception("scheduler pass failed on node %s; going on", self.settings.node_name)
                    wait_s = self.tick_s
                if burst:
                    break
                self._stop.wait(wait_s)
        finally:
            self.release_lease()
            self.data_lost.stop()
            try:
                self.delayed.register_death()
            except RedisError:
                pass
            log.info("scheduler on node %s stopped", self.settings.node_name)


def _mapped(run: Run, day_slots: dict[date, DaySlots]) -> Run:
    """``run`` on the slot its day's runs use (runs.DaySlots.slot_of)."""
    found = day_slots.get(run.day)
    slot = found.slot_of(run.task, run.slot) if found is not None else run.slot
    return run if slot == run.slot else Run(run.task, run.param, slot)


def _holder_node(holder: str | None) -> str:
    if not holder:
        return "nobody"
    try:
        return str(json.loads(holder).get("node"))
    except ValueError:
        return holder

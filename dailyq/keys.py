"""Every Redis key dailyq writes, built here from one prefix.

The prefix comes from ``DAILYQ_PREFIX`` (default ``dailyq``) and is passed in, never
read at import, so two deployments (or a test and a developer) can share a server.
RQ's own keys (``rq:job:*``, ``rq:queue:*``) belong to RQ; our queue is named after
the prefix so that separate deployments do not pull each other's jobs.
"""

from dataclasses import dataclass
from datetime import date

# A day's counts and change feed are named after its runs hash: the Lua helpers that write
# a record (scripts.RECORD_LUA) derive them from the runs key they are given, so every
# script that writes a record keeps them without taking more keys.
DAY_COUNTS_SUFFIX = ":counts"
DAY_CHANGES_SUFFIX = ":changes"

@dataclass(frozen=True)
class Keys:
    prefix: str = "dailyq"

    @property
    def queue_name(self) -> str:
        """The RQ queue every node's worker listens on."""
        return self.prefix

    @property
    def leader(self) -> str:
        """String: the leader lease (JSON with owner token, node, since)."""
        return f"{self.prefix}:leader"

    @property
    def cursor(self) -> str:
        """Hash task name -> ISO time up to which the leader has fired that task's slots."""
        return f"{self.prefix}:cursor"

    @property
    def durations(self) -> str:
        """Hash run key (task + param hash) -> last observed duration in seconds."""
        return f"{self.prefix}:durations"

    @property
    def durations_seen(self) -> str:
        """Zset series -> ordinal of the last day a fan-out had it: what bounds ``durations``."""
        return f"{self.prefix}:durations:seen"

    @property
    def scheduled_jobs(self) -> str:
        """Sorted set of delayed jobs (rq-scheduler's store, under our prefix)."""
        return f"{self.prefix}:scheduler:scheduled_jobs"

    @property
    def scheduler_instance_prefix(self) -> str:
        return f"{self.prefix}:scheduler:instance:"

    @property
    def running(self) -> str:
        """Hash run id -> day of every run some process has claimed and not yet ended:
        where the leader looks for copies that died mid-run."""
        return f"{self.prefix}:running"

    @property
    def fence(self) -> str:
        """String of digits (never expires): the last fencing token handed to an execution
        that took a run's claim. One for all runs, so a token is never reused; BEGIN draws
        the next from it and the server's clock (see scripts.BEGIN)."""
        return f"{self.prefix}:fence"

    @property
    def replica_mark(self) -> str:
        """String (expires by itself): written just before each WAIT of DAILYQ_WAIT_REPLICAS,
        so the WAIT covers every earlier write, whichever connection made it (replicas.py)."""
        return f"{self.prefix}:replica-mark"

    @property
    def stranded(self) -> str:
        """Hash job id -> Redis server time it was first seen in RQ's intermediate queue
        (taken off the queue by a worker, not yet started): see recovery.StrandedJobs."""
        return f"{self.prefix}:stranded"

    @property
    def leadership(self) -> str:
        """Hash: ``first_ms`` and ``last_ms``, Redis-clock milliseconds of the first and the
        latest scheduler tick under a held lease (the ``no_leader`` alert, slot_missed's start)."""
        return f"{self.prefix}:leadership"

    @property
    def alert_outbox(self) -> str:
        """Sorted set alert id -> when its next delivery attempt is due (ms, Redis clock)."""
        return f"{self.prefix}:alerts:outbox"

    @property
    def alert_in_flight(self) -> str:
        """Sorted set alert id -> until when a sender's claim on it holds (ms, Redis clock)."""
        return f"{self.prefix}:alerts:in_flight"

    @property
    def alert_entries(self) -> str:
        """Hash alert id -> JSON: the payload to POST, created_ms, attempts, owner of the claim."""
        return f"{self.prefix}:alerts:entries"

    @property
    def alert_failures(self) -> str:
        """List of JSON failure events (run id, day, task, param, node, error, attempts), one
        pushed by every script that records a run ``failed``, in that same step; the
        leader's alerts take them from the front (alert_digest.py)."""
        return f"{self.prefix}:alerts:failures"

    @property
    def alert_groups(self) -> str:
        """Hash task -> JSON of its open grouping window (start_ms, until_ms, runs so far):
        failures within it go into one ``runs_failed`` digest (alert_digest.py)."""
        return f"{self.prefix}:alerts:groups"

    def day_alerts(self, day: date) -> str:
        """Set of alert ids ever raised for that day: each alert enters the outbox once."""
        return f"{self.prefix}:day:{day.isoformat()}:alerts"

    def day_runs(self, day: date) -> str:
        """Hash run id -> JSON run record (state, node, times, attempts, error)."""
        return f"{self.prefix}:day:{day.isoformat()}:runs"

    def day_counts(self, day: date) -> str:
        """Hash of the day's counts (day_feed.py): ``s|state|task`` -> runs, ``r|slot|task`` ->
        records, ``_seq`` -> the day's last change, ``_counted`` while they cover every record."""
        return self.day_runs(day) + DAY_COUNTS_SUFFIX

    def day_changes(self, day: date) -> str:
        """Sorted set run id -> the day's ``_seq`` at its record's last change (day_feed.py)."""
        return self.day_runs(day) + DAY_CHANGES_SUFFIX

    def day_enqueued(self, day: date) -> str:
        """Set of job ids ever enqueued for that day: makes fan-out idempotent."""
        return f"{self.prefix}:day:{day.isoformat()}:enqueued"

    def day_finished(self, day: date) -> str:
        """Set of run ids that finished that day: the worker-side dedup guard."""
        return f"{self.prefix}:day:{day.isoformat()}:finished"

    def day_waiting(self, day: date) -> str:
        """Hash run id -> JSON of a run held back until its upstream runs have finished
        (fanout.Parked: what enqueueing it later needs). Not in any RQ queue meanwhile."""
        return f"{self.prefix}:day:{day.isoformat()}:waiting"

    def day_deps(self, day: date) -> str:
        """Hash, the day's dependency counts (dependency_counts.py): ``done:{task}`` -> how
        many of the task's run ids are in ``day_finished`` (kept by the scripts that add
        them), ``held:{task}`` -> at least how many of its runs ``day_waiting`` holds (a
        hint, made exact at each release), ``blocked:{task}`` -> the upstream run its held
        runs were last marked blocked by, ``~counted`` once the counts were made from the
        whole day. What lets a release look at one task's counts, not the whole day."""
        return f"{self.prefix}:day:{day.isoformat()}:deps"

    @property
    def waiting_days(self) -> str:
        """Set of ISO days whose ``day_waiting`` hash may hold runs: where the leader looks
        each tick (dependencies.py)."""
        return f"{self.prefix}:waiting-days"

    def day_reruns(self, day: date) -> str:
        """Hash run id -> number of reruns asked for (gives each rerun its own job id)."""
        return f"{self.prefix}:day:{day.isoformat()}:reruns"

    def day_params(self, day: date) -> str:
        """Hash '{task}|{slot label}' -> JSON: the params list a computed task's slot got,
        or why it has none yet (error, attempts, next try); see params_book.py."""
        return f"{self.prefix}:day:{day.isoformat()}:params"

    @property
    def params_retries(self) -> str:
        """Sorted set '{day}|{task}|{slot label}' -> when (ms, the leader's clock) a failed
        params callable is to be called again (params_book.retry_due)."""
        return f"{self.prefix}:params:retries"

    def claim(self, run_id: str) -> str:
        """String: owner token of the one copy of a run executing now."""
        return f"{self.prefix}:claim:{run_id}"

    def series_claim(self, series: str) -> str:
        """String: owner token of the copy executing any slot of one (task, param)."""
        return f"{self.prefix}:series:{series}"

    @property
    def paused(self) -> str:
        """Hash task name -> JSON {since (ISO, Redis clock), by (node)} of every paused task
        (pausing.py)."""
        return f"{self.prefix}:paused"

    def limit_permits(self, task: str) -> str:
        """Sorted set: claim owner token -> until when (ms, Redis clock) that execution holds
        one of the task's slots (limits.py); lapsed members are dropped at every check."""
        return f"{self.prefix}:limit:{task}:slots"

    def limit_permit_nodes(self, task: str) -> str:
        """Hash claim owner token -> node of each member of ``limit_permits(task)``."""
        return f"{self.prefix}:limit:{task}:nodes"

    def set_aside(self, task: str) -> str:
        """List of job ids of the task's runs a worker took off the queue but held back
        (over a limit, or the task paused), oldest first; put back at the queue's front."""
        return f"{self.prefix}:held:{task}"

    def set_aside_index(self, task: str) -> str:
        """Set of the job ids in ``held(task)``: holding a run checks it here, not by a
        scan of the list (scripts.PERMITS_LUA's ``hold``). The list is what backs a held run
        (doctor reads it); the set only spares the scan. Both expire ``retention_s`` after
        the last hold, and the set goes when a promote empties the list."""
        return f"{self.prefix}:held:{task}:ids"

    def table(self, fingerprint: str) -> str:
        """String JSON: the description of one task table (fingerprint.describe), named by
        its fingerprint, so it never changes once written. Each process publishes its own
        at start and its heartbeats keep it alive; heartbeats name it (``"table"``)."""
        return f"{self.prefix}:table:{fingerprint}"

    @property
    def left(self) -> str:
        """Sorted set job id -> when (ms, Redis clock) it goes back to the queue: jobs a
        worker left for a node whose table has their run (its table lacks the task, the
        param or the function; see deploys.py)."""
        return f"{self.prefix}:left"

    @property
    def left_info(self) -> str:
        """Hash job id -> JSON: the left job's run (run_id, day, task, param_json, func), the
        tables that left it, how often, since when (ms), why: what the leader decides
        ``removed`` from (deploys.py)."""
        return f"{self.prefix}:left:info"

    @property
    def absent(self) -> str:
        """Hash ``left:{job id}`` (or ``waiting:{day}:{run id}``) -> Redis-clock seconds since
        which the leader has found that run in no live node's table (deploys.py): kept in
        Redis so that a change of leader does not restart the grace before ``removed``."""
        return f"{self.prefix}:absent"

    def day_slots(self, day: date) -> str:
        """Hash task -> JSON {slot, tz}: the slot of a once-a-day task (``at``) fanned out
        for that day. A schedule edit maps the day's runs of the task onto it, so moving
        ``at`` after the slot ran does not run the day again (runs.py)."""
        return f"{self.prefix}:day:{day.isoformat()}:slots"

    @property
    def fired(self) -> str:
        """Hash task -> the task's digest (fingerprint.task_digest) in the table of the
        leader that last fired its slots: a leader whose table differs fans the slots
        within the grace out again, adding the runs its table has and the day lacks."""
        return f"{self.prefix}:fired"

    @property
    def table_skew(self) -> str:
        """Hash difference id (table_skew.difference_id: the two tables' fingerprints) ->
        when (ms, Redis clock) the leader first saw live processes run both: ``since`` in
        ``status``'s ``tables``, and what ``tables_differ`` is raised from (table_watch.py).
        Kept by the leader; a difference no longer seen is dropped."""
        return f"{self.prefix}:table-skew"

    @property
    def rq_failed_seen(self) -> str:
        """String: the score up to which the leader has read RQ's failed job registry
        (settle.py): runs of jobs RQ failed outside the guard are settled from there."""
        return f"{self.prefix}:rq-failed-seen"

    @property
    def nodes(self) -> str:
        """Sorted set node name -> Redis time of its last heartbeat (any role): where
        ``status`` finds the live nodes' heartbeat keys without a SCAN."""
        return f"{self.prefix}:nodes"

    def heartbeat(self, role: str, node: str) -> str:
        """String with TTL: proof that ``role`` (scheduler|worker) on ``node`` is alive."""
        return f"{self.prefix}:heartbeat:{role}:{node}"

    def node_workers(self, node: str) -> str:
        """Sorted set worker process (``beats.worker_member``) -> Redis time (s) until which
        its last heartbeat promises it is alive: counts a node's workers without a SCAN."""
        return f"{self.prefix}:workers:{node}"

    @property
    def generation(self) -> str:
        """String JSON, never expires: dailyq's mark in this Redis (generation.py). ``token``
        and ``created_ms`` (Redis clock) of the first process that found none; after a loss
        also ``previous`` (the token the noticing process remembered), ``lost_since_ms``,
        ``noticed_by`` and ``last_seen_ms``: what ``status`` shows as ``redis_data_lost``."""
        return f"{self.prefix}:generation"

    @property
    def generation_alert(self) -> str:
        """String JSON {generation, state, owner}: the ``redis_data_lost`` alert of one
        generation, claimed (``sending``, with a PX) by the one leader POSTing it, then
        ``delivered``, ``refused`` or ``given-up`` for good (data_lost_alert.py)."""
        return f"{self.prefix}:generation:alert"

    @property
    def memory_full(self) -> str:
        """String JSON with a short TTL, while Redis refuses dailyq's writes for memory
        (redis_memory.py): since when (Redis clock), the node that saw it first, the slots
        whose fan-out it refused, whether ``redis_full`` was sent. Written by schedulers
        with an allow-oom script (it is one small key), dropped by the leader once writes
        are accepted again."""
        return f"{self.prefix}:memory-full"

    @property
    def memory_probe(self) -> str:
        """Never created: ``SETRANGE`` of an empty string on it is a write that Redis
        refuses when out of memory and that changes nothing when it does not
        (redis_memory.probe_writes)."""
        return f"{self.prefix}:memory-probe"

    def day_late(self, day: date) -> str:
        """Hash '{task}|{slot label}' -> JSON {task, slot, due_at, refused_since,
        fanned_out_at, why}: slots of that day fanned out late because Redis had refused
        their fan-out (memory full), even past their misfire grace (scheduler.py)."""
        return f"{self.prefix}:day:{day.isoformat()}:late"

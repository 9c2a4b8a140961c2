"""Per-task limits: ``Task(max_running=K)``, at most K runs of the task execute at the
same moment across all nodes; ``Task(max_per_node=K)``, at most K on any one node;
``Task(pool=P)`` with the table's ``POOLS = {P: K}``, at most K runs of all the tasks
in pool P at once, across all nodes.

Permits
-----
A task with limits has one sorted set of permits, ``keys.limit_permits(task)``: member the
claim owner token of an admitted execution (guard.Attempt.owner, unique per execution),
score the moment (ms, Redis's clock) the permit lapses; and a hash owner -> node
(``keys.limit_permit_nodes``), from which the per-node count is taken. One set per task
rather than one per (task, node): the leader's sweep then sees every node's permits with
keys it can name without first listing the nodes (one round trip per tick, not two).

A permit lapses with the claim: it is taken for the claim TTL and extended by the same
RENEW_CLAIM that extends the claim (ClaimKeeper, every second, no extra round trip). So
the permit of a holder that died or was cut off from Redis lapses when its claim would,
and every check (ADMIT, RELEASE_PERMIT, SWEEP_PERMITS) first drops lapsed members.

Pools
-----
A pool has no permits of its own: a run of a pool's task takes a permit of its task, as a
run of a task with ``max_running`` does, and the pool's use is the number of live permits
of all its tasks. So a run needs room in both its task and its pool, and holds one permit
that counts for both: the two permits are taken, renewed, freed and lapse together, and
neither can leak without the other. ADMIT checks the pool's room beside the task's (it
is given the permit keys of every task of the pool); a run held by a full pool waits on
its own task's set-aside list like any set-aside run. When a permit of a pool's task frees,
RELEASE_PERMIT moves set-aside runs of *every* task of the pool while there is room, dealt in
turn starting with the task after the one that freed the permit, so that one task's
backlog does not keep the pool from the others; SWEEP_PERMITS does the same for each pool.
The pool's members and size come from the table of the process that asks: during a
rolling deploy that changes a pool, nodes count by their own table (the fingerprint
names the pool and its size, so table_skew shows the difference).

Who holds and who releases
--------------------------
* ``ADMIT`` (scripts/permits.py), by the worker in ``execute_job``, before it forks or sends
  BEGIN, only for runs of tasks with limits and of tasks it believes paused
  (pause.PausedCache): a run of any other task costs no round trip more. Over a limit
  (or paused) the job is *held*: taken off RQ's intermediate queue and put on the
  task's set-aside list, its RQ job left ``queued``; the worker does not execute it and
  goes on with the next job. Else the run takes its permit, atomically with the check.
* ``RELEASE_PERMIT``, when an admitted execution ends: in RQ's success transaction with
  FINISH; after FAIL or any BEGIN outcome but "claimed" (finished, superseded,
  exhausted, skipped), from the executing process; from the worker parent when its
  work-horse died. It frees the permit and moves set-aside runs to the queue's front while
  there is room, in one script: a hold and a release are serialized by Redis, so a
  set-aside run never misses the wake-up of the permit that frees after it was held.
* ``SWEEP_PERMITS``, by the leader every tick (``PermitSweep``): drops lapsed permits and
  moves set-aside runs while there is room. It is what frees the permit of a dead holder
  (within a tick of its claim lapsing), and what moves a run held by a node that was
  full while another node had room (per-node room is counted over the nodes that beat).

A copy that BEGIN answers "busy" (another copy of the run, or with overlap='wait' the
previous slot's run, is executing) keeps its permit while it waits, renewed each poll
(TOUCH_PERMIT): releasing it and executing later without one could exceed the limit.

Set-aside lists
----------
A set-aside run is a job id on its task's set-aside list (``keys.set_aside``, oldest first), which is
what backs it (doctor reads the list). Beside the list, a set of the same ids
(``keys.set_aside_index``) lets ADMIT hold a run with an SADD instead of an LREM scan of the
list for it, so a hold's cost does not grow with the list (BENCHMARKS.md). RELEASE_PERMIT,
SWEEP_PERMITS and RESUME take the ids off both. An older dailyq during a rolling deploy
holds and promotes without the set: scripts.permits.PERMITS_LUA's ``hold`` says how each
difference is taken (nothing lost; a run listed twice is moved once per promote, and
executed once, by its claim). Both keys expire ``DAILYQ_RETENTION_DAYS`` after the last
hold (ADMIT refreshes it), with the run records they back, so the list of a task nothing
promotes any more does not stay forever; the set goes when a promote empties the list.

Latency: a set-aside run goes back to the queue's front the moment a permit frees by a run's
end, or within a leader tick (1 s) of a dead holder's permit lapsing, and starts as soon
as a worker is free. A run moved to the queue can still be held again (a run dequeued
meanwhile took the room, or a full node's worker dequeued it): it is then moved again
by the next release or sweep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis import Redis
from redis.exceptions import RedisError

from .keys import Keys
from .pausing import PausedCache
from .scripts import ScriptCall, scripts_for
from .scripts.permits import AdmitOutcome
from .table import Task, TaskTable

if TYPE_CHECKING:
    from .runs import RunJob

log = logging.getLogger(__name__)

# SWEEP_PERMITS counts per-node room on nodes that beat this recently: an idle worker beats
# only once per RQ dequeue timeout, minutes apart (worker.WorkerContext.beat), so this is "alive", not "busy".
LIVE_NODE_S = 600


@dataclass(frozen=True)
class LimitedTask:
    """One task's limits and keys, for SWEEP_PERMITS (and, for the tasks of a pool, ADMIT
    and RELEASE_PERMIT); ``pool`` and ``pool_size`` (0: in no pool) from the table's POOLS."""

    name: str
    max_running: int | None
    max_per_node: int | None
    permits_key: str
    permit_nodes_key: str
    set_aside_key: str
    set_aside_index_key: str
    pool: str | None = None
    pool_size: int = 0


def limited_task(keys: Keys, table: TaskTable, task: Task) -> LimitedTask:
    """A task's limits, pool and keys as the scripts take them."""
    return LimitedTask(task.name, task.max_running, task.max_per_node, keys.limit_permits(task.name),
                       keys.limit_permit_nodes(task.name), keys.set_aside(task.name), keys.set_aside_index(task.name),
                       task.pool, table.pools.get(task.pool, 0) if task.pool else 0)


def pool_of(keys: Keys, table: TaskTable, task: Task) -> list[LimitedTask]:
    """Every task of ``task``'s pool (itself included), in the table's order; [] when in none."""
    return [limited_task(keys, table, member) for member in table.pool_tasks(task.pool)] if task.pool else []


class PermitHold:
    """The permit one admitted execution holds (owner = its claim owner token)."""

    def __init__(self, connection: Redis, keys: Keys, task: Task, owner: str, node: str, queue_key: str,
                 ttl_ms: int, pool: list[LimitedTask] | None = None) -> None:
        self.keys = keys
        self.task = task
        self.owner = owner
        self.node = node
        self.queue_key = queue_key
        self.ttl_ms = ttl_ms
        # Every task of the task's pool ([]: in none): a freed permit wakes set-aside runs of them all.
        self.pool = pool or []
        self.released = False
        self._scripts = scripts_for(connection)

    @property
    def permits_key(self) -> str:
        return self.keys.limit_permits(self.task.name)

    def touch(self) -> None:
        """Keep the permit while the run waits for another copy (no claim to renew it with)."""
        try:
            self._scripts.touch_permit(permits_key=self.permits_key, owner=self.owner, ttl_ms=self.ttl_ms).run()
        except RedisError as exc:
            log.warning("could not extend the permit of a waiting run of %s (%s)", self.task.name, exc)

    def release_call(self) -> ScriptCall[list[str]]:
        task = self.task
        return self._scripts.release_permit(
            paused_key=self.keys.paused, permits_key=self.permits_key,
            permit_nodes_key=self.keys.limit_permit_nodes(task.name),
            set_aside_key=self.keys.set_aside(task.name), set_aside_index_key=self.keys.set_aside_index(task.name),
            queue_key=self.queue_key, task=task.name, owner=self.owner,
            node=self.node, max_running=task.max_running, max_per_node=task.max_per_node,
            pool_size=self.pool[0].pool_size if self.pool else 0, pool=self.pool)

    def release(self) -> None:
        """Free the permit now (idempotent). Redis failing: the permit lapses with its TTL
        instead, and the leader's sweep moves the set-aside runs then."""
        if self.released:
            return
        try:
            moved = self.release_call().run()
        except RedisError as exc:
            log.warning("could not release a permit of %s (%s); it lapses within %gs", self.task.name, exc,
                        self.ttl_ms / 1000)
            return
        self.released = True
        if moved:
            log.info("%s: a permit freed; %d set-aside run(s)%s back at the front of the queue", self.task.name,
                     len(moved), f" of pool {self.task.pool}" if self.task.pool else "")


class Admissions:
    """The worker's side: whether a run may start now (see the module docstring)."""

    def __init__(self, connection: Redis, keys: Keys, node: str, claim_ttl_s: float, paused: PausedCache,
                 table: TaskTable, *, set_aside_ttl_s: int) -> None:
        self.connection = connection
        self.keys = keys
        # The worker's table: which tasks share a pool, and the pool's size.
        self.table = table
        self.node = node
        self.ttl_ms = int(claim_ttl_s * 1000)
        # A set-aside list (and its index) lives this long after its last hold: a list nothing
        # promotes any more (its task gone from the table, or its limits) does not stay forever.
        self.set_aside_ttl_s = set_aside_ttl_s
        self.paused = paused
        self._scripts = scripts_for(connection)

    def admit(self, run: RunJob, owner: str, intermediate_queue_key: str,
              queue_key: str) -> tuple[AdmitOutcome, PermitHold | None]:
        """'admitted' (with the permit taken, for a task with limits), 'set_aside' or 'paused'."""
        task = run.task  # the worker's table's (RunJob.from_job)
        if not task.has_limits and not self.paused.contains(task.name):
            return "admitted", None  # no round trip: the common case
        keys = self.keys
        pool = pool_of(keys, self.table, task)
        outcome = self._scripts.admit(
            paused_key=keys.paused, permits_key=keys.limit_permits(task.name),
            permit_nodes_key=keys.limit_permit_nodes(task.name), set_aside_key=keys.set_aside(task.name),
            set_aside_index_key=keys.set_aside_index(task.name), intermediate_queue_key=intermediate_queue_key,
            task=task.name, owner=owner, node=self.node, job_id=run.job_id, ttl_ms=self.ttl_ms,
            max_running=task.max_running, max_per_node=task.max_per_node, set_aside_ttl_s=self.set_aside_ttl_s,
            pool_size=pool[0].pool_size if pool else 0, pool=pool).run()
        if outcome == "paused":
            self.paused.saw(task.name)
        if outcome != "admitted" or not task.has_limits:
            return outcome, None
        return outcome, PermitHold(self.connection, keys, task, owner, self.node, queue_key, self.ttl_ms, pool)


class PermitSweep:
    """The leader's side: every tick, lapsed permits go and set-aside runs move while there is room."""

    def __init__(self, connection: Redis, keys: Keys, queue_key: str, table: TaskTable) -> None:
        self.keys = keys
        self.queue_key = queue_key
        self.tasks = [limited_task(keys, table, task) for task in table.tasks if task.has_limits]
        self._scripts = scripts_for(connection)

    def sweep(self) -> list[str]:
        if not self.tasks:
            return []  # no task with limits: no round trip
        moved = self._scripts.sweep_permits(paused_key=self.keys.paused, queue_key=self.queue_key,
                                          nodes_key=self.keys.nodes, live_s=LIVE_NODE_S, tasks=self.tasks).run()
        if moved:
            log.info("%d set-aside run(s) back at the front of the queue (permits free)", len(moved))
        return moved


def pool_use(connection: Redis, keys: Keys, table: TaskTable, now_ms: int) -> dict[str, dict[str, int]]:
    """Per pool of the table: ``{"size", "running", "set_aside"}``, ``running`` the live
    permits of its tasks (lapsed ones not counted) and ``set_aside`` the runs on their held
    lists (over a limit, or paused). One round trip; none without pools."""
    if not table.pools:
        return {}
    members = {pool: table.pool_tasks(pool) for pool in table.pools}
    with connection.pipeline(transaction=False) as pipe:
        for tasks in members.values():
            for task in tasks:
                pipe.zcount(keys.limit_permits(task.name), f"({now_ms}", "+inf")
                pipe.llen(keys.set_aside(task.name))
        replies = iter(pipe.execute())
    use = {}
    for pool, tasks in members.items():
        running = set_aside = 0
        for _ in tasks:
            running += int(next(replies))
            set_aside += int(next(replies))
        use[pool] = {"size": table.pools[pool], "running": running, "set_aside": set_aside}
    return use

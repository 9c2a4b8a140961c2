"""The worker-side dedup guard: a run executes at most once at a time, not again once
finished, and only the copy that holds the run's claim may record it.

It wraps the call of a task function inside the process that executes it (RQ's
work-horse, or the worker itself for a non-forking worker):

1. ``BEGIN`` (one Lua script, scripts/lifecycle.py): if the run is in the day's finished set, skip it; if a
   newer job of the same run was enqueued since this one (a recovery, a rerun),
   skip this stale one; else take the run's claim (an owner-token lease), draw a
   fencing token and mark the record running. On a dailyq worker it rides in RQ's
   own transaction that marks the job started (rq_seam.py), so it costs no round
   trip. A claim held by another live copy means "wait": the other copy may finish
   (then we skip) or stop (then we run). A *series* claim, held for any slot of the
   same (task, param), applies the task's ``overlap`` policy.
2. While the function runs, ``ClaimKeeper`` renews the claim (and, for a task with
   limits, the run's permit: limits.py) from a thread of the executing process, and a
   second thread -- which never touches the network --
   stops the function if the claim could not be confirmed for ``claim_ttl_s -
   claim_margin_s`` seconds (before it can lapse on the server), or was found
   held by another copy (after a freeze). Stopping ends a forked work-horse at once
   and interrupts the call in a non-forking worker; that copy records nothing.
   So a copy cut off from Redis stops before any other copy can take its run over.
   A task holding the GIL (a long C call) stops both threads; in the forking worker the
   parent process, which the task cannot block, reads the horse's claim deadline from
   shared memory and kills the horse once it passed (claim_watch.py). A non-forking
   worker has no such process: there a task that holds the GIL past ``claim_ttl_s -
   claim_margin_s`` can run beside the copy that takes its run over.
   A ``cancel`` (cancelling.py) renames the claim: the renewal answers 'cancelled', the copy
   stops the same way, and releases the renamed claim once its task has stopped (the
   worker parent does, for a work-horse that exited with ``CANCELLED_EXIT_CODE``).
3. ``FINISH`` adds the run to the finished set and releases the claim atomically (on
   a worker, inside RQ's transaction that records the job's success); ``FAIL``
   releases the claim and records the error, or queues the run for its retry. Both
   are refused, touching nothing, when the claim is no longer this copy's.

The task sees its run through ``dailyq.current_run()`` (context.py).

With ``DAILYQ_WAIT_REPLICAS=N`` (replicas.py) a claim, each renewal and a finish count
only once N replicas acknowledged them (Redis WAIT): a copy does not start its task
before its claim is on N replicas, a renewal they did not acknowledge does not push the
watchdog's deadline, and a finish is sent again until they have it.

What the guard cannot prevent: a process that dies after the task's side effect but
before FINISH leaves the run unfinished, and it runs again; a copy frozen in the
middle of its own external write may finish that write on resuming. Tasks must be
idempotent, and the ``fence`` token is for the second case.
"""

from __future__ import annotations

import _thread
import ctypes
import functools
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq.timeouts import BaseTimeoutException

from ..clock import Clock, iso, utc_now
from ..context import RunContext, running_as
from ..keys import Keys
from ..outage import OutageLog, through_outage
from ..replicas import ReplicaAcks
from ..runs import CLAIM_LOST_RESULT, RunJob
from ..scripts import ScriptCall, scripts_for
from ..scripts.lifecycle import BeginReply, FailOutcome, RenewOutcome, parse_begin
from .claim_watch import ClaimDeadline

log = logging.getLogger(__name__)

# How often a copy waiting for another live copy of the same run looks again.
WAIT_POLL_S = 1.0
# How long the executing process waits for Redis to come back to record a run
# before giving up (the run then shows as running until the leader requeues it).
RECORD_OUTAGE_LIMIT_S = 900.0
# A forked work-horse that lost its claim exits with this code; its worker parent then
# knows the run was not this copy's any more (worker.py) and records nothing for it.
CLAIM_LOST_EXIT_CODE = 87
# A forked work-horse stopped by ``cancel`` (cancelling.py) exits with this code; its worker
# parent then releases the claim the cancel renamed (worker.py), records nothing else.
CANCELLED_EXIT_CODE = 88
# The watchdog's period: how late, at most, it notices a missed deadline or a resume
# after a freeze. It only compares clock readings; it never waits on the network.
WATCHDOG_EVERY_S = 0.2
# A non-forking worker's running task is interrupted with this signal (handled in the
# main thread); a task in C code that ignores it is logged about, not killed.
INTERRUPT_SIGNAL = signal.SIGUSR2


class RunStopped(BaseException):
    """Raised inside a running task whose copy lost its claim (non-forking workers).
    A BaseException, so that a task's ``except Exception`` does not swallow it."""


class PendingFinish:
    """The FINISH of a run whose function returned: idempotent, so it may be queued in
    a transaction and, should that transaction not happen, applied again on its own.
    The claim stays renewed until FINISH is done: a FINISH delayed by a short outage
    must still find the claim ours."""

    def __init__(self, finish: ScriptCall[bool], run_id: str, done: Callable[[], None],
                 recorded: Callable[[], None] = lambda: None, acks: ReplicaAcks | None = None) -> None:
        self.finish = finish
        self.run_id = run_id
        self._done = done
        self._recorded = recorded
        self.acks = acks

    def queue_in(self, pipeline: Pipeline, by_sha: bool = True) -> None:
        """FINISH in a transaction that ``rq_seam.queue_keeping_reply`` watches (by SHA: a
        NOSCRIPT reply is not kept, and FINISH is then applied on its own; ``by_sha`` False
        when what rides with it must not commit without it)."""
        self.finish.queue_in(pipeline, by_sha=by_sha)

    def apply(self) -> None:
        try:
            recorded = through_outage(self.finish.run, OutageLog(log, f"recording run {self.run_id} as finished"),
                                      RECORD_OUTAGE_LIMIT_S)
        except BaseException:
            self._done()
            raise
        self._ended(recorded)

    def replied(self, reply: Any) -> None:
        """FINISH's raw reply, from the transaction it was queued in."""
        self._ended(self.finish.parse(reply))

    def _ended(self, recorded: bool) -> None:
        # The claim is no longer renewed, whichever way FINISH was sent.
        self._done()
        if recorded and self.acks is not None and self.acks.on and not self._acknowledged():
            return  # the finish was lost with a failover (logged): not recorded after all
        if recorded:
            self._recorded()
        else:
            log.error("run %s: its function returned but this copy no longer held the claim; "
                      "not recorded as finished by this copy (another copy owns the run)", self.run_id,
                      extra={"run_id": self.run_id})

    def _acknowledged(self) -> bool:
        """FINISH counts once DAILYQ_WAIT_REPLICAS replicas have it. Until they do it is
        sent again and waited for again. Every try sends FINISH with the WAIT, also the
        first: it proves the server that answers has the finish (a reconnect may reach a
        new primary), and there it either answers as the first call did, writing nothing
        (the mark makes the WAIT cover the first call), or, on a new primary that lost
        it, applies afresh while the claim there is still this copy's. False (logged)
        when it cannot any more: the finish was lost, and the claim with it; the run will
        execute again."""
        acks = self.acks
        assert acks is not None
        outage = OutageLog(log, f"confirming that run {self.run_id} is recorded finished")
        give_up_at = time.monotonic() + RECORD_OUTAGE_LIMIT_S
        told = False
        try:
            while True:
                replies, count = through_outage(functools.partial(acks.after, self.finish), outage,
                                                RECORD_OUTAGE_LIMIT_S)
                if not replies[0]:
                    log.error("run %s: its finish was lost before %d replica(s) acknowledged it (a failover to a "
                              "replica that lacked it?), and its claim with it: not recorded as finished by this "
                              "copy; the run will execute again", self.run_id, acks.replicas,
                              extra={"run_id": self.run_id})
                    return False
                if acks.acknowledged(count):
                    if told:
                        log.info("run %s: its finish is acknowledged by %d replica(s) now", self.run_id, count,
                                 extra={"run_id": self.run_id})
                    return True
                if not told:
                    log.warning("run %s: its finish was not acknowledged by %d replica(s) within %d ms (%d did); "
                                "sending it again until they acknowledge it", self.run_id, acks.replicas,
                                acks.timeout_ms, count, extra={"run_id": self.run_id})
                    told = True
                if time.monotonic() > give_up_at:
                    log.error("run %s: its finish is still not acknowledged by %d replica(s) after %.0f s; it "
                              "counts as recorded on the primary alone", self.run_id, acks.replicas,
                              RECORD_OUTAGE_LIMIT_S, extra={"run_id": self.run_id})
                    return True
        except RedisError as exc:
            log.error("run %s: could not confirm its finish with the replicas (%s); it counts as recorded on the "
                      "primary alone", self.run_id, exc, extra={"run_id": self.run_id})
            return True


@dataclass
class Attempt:
    """This process's attempt at executing one run: the owner token its claim carries,
    and what BEGIN answered (when it rode in the worker's own preparation transaction,
    the worker hands the reply over with ``keep_begin_reply``)."""

    run: RunJob
    owner: str
    begin_reply: str | None = None
    number: int = 0  # which execution of the run this is (BEGIN counts them), from 1
    fence: int = 0
    # time.monotonic() just before BEGIN was sent: the claim's TTL on the server starts
    # no earlier, so the local deadline computed from it is never later than the server's.
    begin_sent_at: float = 0.0
    # A run of a task with limits (limits.py): the permits key its claim renewals also
    # extend, and what keeps its permit while BEGIN says busy (it has no claim yet).
    permits_key: str | None = None
    while_waiting: Callable[[], None] | None = None
    # BEGIN said busy at least once: this copy waited for another one (guard._gave_up_waiting).
    waited_busy: bool = False
    # In a forked work-horse: where its claim's deadline is shared with the worker parent,
    # which kills the horse once it passed (claim_watch.py).
    shared_deadline: ClaimDeadline | None = None

    def keep_begin_reply(self, reply: Any) -> None:
        """BEGIN's raw reply, from the transaction it was queued in."""
        self.keep_begin(parse_begin(reply))

    def keep_begin(self, reply: BeginReply) -> None:
        # Anything but one of BEGIN's own answers is ignored: the guard then asks again.
        self.begin_reply = reply.outcome
        if reply.outcome == "claimed":
            self.number, self.fence = reply.attempt, reply.fence


class Guard:
    """Runs one call under the run's claim; see the module docstring."""

    def __init__(self, connection: Redis, keys: Keys, node: str, claim_ttl_s: int, retention_s: int,
                 clock: Clock = utc_now, claim_margin_s: float | None = None, stop_by_exit: bool = False,
                 wait_replicas: int = 0) -> None:
        self.connection = connection
        self.keys = keys
        self.node = node
        self.claim_ttl_s = claim_ttl_s
        self.retention_s = retention_s
        self.clock = clock
        self.scripts = scripts_for(connection)
        # DAILYQ_WAIT_REPLICAS (replicas.py): claims, renewals and finishes count once acknowledged.
        self.acks = ReplicaAcks(connection, keys, wait_replicas)
        self.keeper = ClaimKeeper(connection, claim_ttl_s,
                                  default_claim_margin_s(claim_ttl_s) if claim_margin_s is None else claim_margin_s,
                                  stop_by_exit=stop_by_exit, acks=self.acks)
        # Called in the executing process once a run is recorded finished or failed for
        # good (the worker releases or blocks the runs waiting for it: dependencies.py).
        self.on_ended: Callable[[RunJob], None] | None = None

    def attempt(self, run: RunJob) -> Attempt:
        return Attempt(run, owner=f"{self.node}:{os.getpid()}:{uuid.uuid4().hex}")

    def claim_in(self, attempt: Attempt, pipeline: Pipeline) -> None:
        """Queue the attempt's first BEGIN in ``pipeline`` (RQ's preparation transaction),
        so claiming costs no round trip of its own. The caller hands the reply back via
        ``attempt.keep_begin_reply``; if it never arrives, ``execute`` sends BEGIN
        again, which answers as the first one did when it had claimed for this owner.
        Queued by SHA: ``rq_seam.queue_keeping_reply`` drops a NOSCRIPT reply, which then
        counts as no reply."""
        attempt.begin_sent_at = time.monotonic()
        self._begin_call(attempt).queue_in(pipeline, by_sha=True)

    def execute(self, run: RunJob, call: Callable[[], Any], will_retry: Callable[[], bool],
                defer_finish: Callable[["PendingFinish"], None] | None = None,
                attempt: Attempt | None = None, cancel_retry: Callable[[], None] = lambda: None) -> Any:
        """Run ``call`` under the run's claim. ``will_retry`` says whether RQ would retry
        the job after a failure; ``cancel_retry`` stops it from doing so (the run is
        failed by its attempt budget, or is no longer this copy's). With
        ``defer_finish``, recording the run as finished is handed to the caller (the
        worker adds it to RQ's own success transaction) instead of done here."""
        attempt = attempt or self.attempt(run)
        waiting_since = time.monotonic()
        try:
            outcome = self._wait_for_claim(attempt)
        except Exception as exc:  # RQ's timeout (its death penalty) while waiting for a busy claim, mostly
            self._gave_up_waiting(run, attempt, exc, time.monotonic() - waiting_since, will_retry(), cancel_retry)
            raise
        if outcome != "claimed":
            log.info("run %s not executed: %s (job %s, node %s)", run.run_id, outcome, run.job_id, self.node,
                     extra={"run_id": run.run_id})
            return {"skipped": outcome}
        # DEBUG: RQ already logs each job's start at INFO (the job's description names the
        # task, param and slot; its id is the run id).
        log.debug("run %s started on node %s (job %s, attempt %d, fence %d)", run.run_id, self.node, run.job_id,
                  attempt.number, attempt.fence, extra={"run_id": run.run_id})
        started = time.monotonic()
        ttl_ms = self.claim_ttl_s * 1000
        held = self.keeper.hold(run.run_id, self.keys.claim(run.run_id), self.keys.series_claim(run.series),
                                attempt.owner, ttl_ms, confirmed_at=attempt.begin_sent_at,
                                permits_key=attempt.permits_key, shared_deadline=attempt.shared_deadline)
        context = RunContext(task=run.task.name, param=run.param, day=run.day, slot=run.slot.in_zone,
                             run_id=run.context_run_id, attempt=attempt.number, node=self.node,
                             fence=attempt.fence, _lost_because=held.lost_because)
        try:
            with held.executing(), running_as(context):
                result = call()
        except BaseException as exc:  # timeouts arrive as exceptions too; record, then let RQ handle it
            if held.lost_because() is not None:
                # Whatever it raised (RunStopped, ClaimLost from check(), or what the task
                # made of them): this copy is no longer the run's owner and records nothing.
                return self._stopped(run, held, cancel_retry)
            self.keeper.release(run.run_id)
            error = f"{type(exc).__name__}: {exc}"
            decision = self._record_failure(run, attempt, error, will_retry())
            if decision != "retry":
                cancel_retry()
            if decision == "failed":
                self.run_ended(run)
            log.warning("run %s %s on node %s: %s", run.run_id,
                        {"retry": "will retry", "failed": "failed"}.get(decision, "failed (not recorded: claim lost)"),
                        self.node, error, extra={"run_id": run.run_id})
            raise
        if held.stop_requested():
            # The claim was lost while the call was returning: it is another copy's run now.
            return self._stopped(run, held, cancel_retry)
        duration_s = time.monotonic() - started
        pending = PendingFinish(self._finish_call(attempt, duration_s), run.run_id,
                                done=lambda: self.keeper.release(run.run_id), recorded=lambda: self.run_ended(run),
                                acks=self.acks)
        if defer_finish is not None:
            defer_finish(pending)
        else:
            pending.apply()
        log.debug("run %s finished on node %s in %.1fs", run.run_id, self.node, duration_s,
                  extra={"run_id": run.run_id})
        return result

    def run_ended(self, run: RunJob) -> None:
        """``on_ended``, which must not break the recording around it: its errors are logged."""
        if self.on_ended is None:
            return
        try:
            self.on_ended(run)
        except Exception:  # noqa: BLE001 - the leader's next tick does the same (dependencies.py)
            log.exception("run %s: could not look at the runs waiting for it; the leader will",
                          run.run_id, extra={"run_id": run.run_id})

    def _stopped(self, run: RunJob, held: "KeptClaim", cancel_retry: Callable[[], None]) -> dict[str, str]:
        self.keeper.release(run.run_id)
        cancel_retry()
        if held.cancelled:
            self.release_cancelled(run, held.owner)
            return {"skipped": "cancelled"}
        log.error("run %s stopped on node %s: %s; this copy records nothing (another copy may own the run)",
                  run.run_id, self.node, held.lost_because(), extra={"run_id": run.run_id})
        return CLAIM_LOST_RESULT

    def release_cancelled(self, run: RunJob, owner: str) -> None:
        """After ``owner``'s copy of ``run`` stopped for a cancel: release the claim the
        cancel renamed, so that a rerun starts at once (else it lapses by its TTL)."""
        call = self.scripts.release_cancelled(claim_key=self.keys.claim(run.run_id),
                                              series_key=self.keys.series_claim(run.series), owner=owner)
        try:
            why = through_outage(call.run, OutageLog(log, f"releasing the claim of cancelled run {run.run_id}"),
                                 RECORD_OUTAGE_LIMIT_S)
        except RedisError as exc:
            log.error("run %s: stopped for a cancel; could not release its claim (%s): it lapses by itself",
                      run.run_id, exc, extra={"run_id": run.run_id})
            return
        log.warning("run %s stopped on node %s: %s; claim released", run.run_id, self.node,
                    why or "cancelled (its claim had lapsed already)", extra={"run_id": run.run_id})

    def _finish_call(self, attempt: Attempt, duration_s: float) -> ScriptCall[bool]:
        run = attempt.run
        return self.scripts.finish(
            finished_key=self.keys.day_finished(run.day), claim_key=self.keys.claim(run.run_id),
            runs_key=self.keys.day_runs(run.day), durations_key=self.keys.durations, running_key=self.keys.running,
            series_key=self.keys.series_claim(run.series), deps_key=self.keys.day_deps(run.day), run_id=run.run_id,
            owner=attempt.owner, base_json=run.base_record, retention_s=self.retention_s, series=run.series,
            duration_s=duration_s, node=self.node, now_iso=iso(self.clock()))

    def _begin_call(self, attempt: Attempt) -> ScriptCall[BeginReply]:
        run = attempt.run
        return self.scripts.begin(
            finished_key=self.keys.day_finished(run.day), claim_key=self.keys.claim(run.run_id),
            runs_key=self.keys.day_runs(run.day), running_key=self.keys.running,
            series_key=self.keys.series_claim(run.series), fence_key=self.keys.fence, run_id=run.run_id,
            owner=attempt.owner, claim_ttl_ms=self.claim_ttl_s * 1000, force=run.force, base_json=run.base_record,
            retention_s=self.retention_s, day=run.day.isoformat(), overlap=run.task.overlap, node=self.node,
            now_iso=iso(self.clock()), job_id=run.job_id, max_attempts=run.max_attempts)

    def _wait_for_claim(self, attempt: Attempt) -> str:
        """'claimed' once we hold the claim, or why not: 'finished' (already done),
        'superseded' (a later job of the run exists) or 'skipped' (overlap='skip')."""
        run = attempt.run
        outcome = attempt.begin_reply  # None unless BEGIN already ran in RQ's preparation transaction
        told = False
        while True:
            if outcome is None:
                sent_at = time.monotonic()
                reply = through_outage(self._begin_call(attempt).run, OutageLog(log, f"claiming run {run.run_id}"),
                                       RECORD_OUTAGE_LIMIT_S)
                attempt.begin_sent_at = sent_at
                attempt.keep_begin(reply)
                outcome = attempt.begin_reply
            if outcome == "claimed" and not self._claim_acknowledged(attempt):
                outcome = None  # the claim was lost before the replicas had it (a failover): claim again
                continue
            if outcome != "busy":
                return outcome or "unreadable BEGIN reply"
            attempt.waited_busy = True
            if not told:
                # Another live copy holds the claim (an orphaned work-horse, a rerun beside
                # the original, or with overlap='wait' the previous slot's run): never run
                # beside it; wait for it to end or stop.
                log.info("run %s: another copy of it (or of its task and param) is executing; waiting (job %s)",
                         run.run_id, run.job_id, extra={"run_id": run.run_id})
                told = True
            time.sleep(WAIT_POLL_S)
            if attempt.while_waiting is not None:
                attempt.while_waiting()
            outcome = None

    def _claim_acknowledged(self, attempt: Attempt) -> bool:
        """True once DAILYQ_WAIT_REPLICAS replicas have this copy's claim, and with it its
        fencing token: only then may the task start, since a failover to a replica that
        lacks the claim lets another copy start beside it. Each try renews the claim and
        WAITs in one round trip (the renewal is the write the WAIT covers, and it proves
        the claim is still ours on the server that answers). False when the claim is gone
        or taken: lost with a failover, or lapsed; the caller then claims the run again."""
        acks = self.acks
        if not acks.on:
            return True
        run = attempt.run
        renew = self.scripts.renew_claim(claim_key=self.keys.claim(run.run_id),
                                         series_key=self.keys.series_claim(run.series), owner=attempt.owner,
                                         ttl_ms=self.claim_ttl_s * 1000, permits_key=attempt.permits_key)
        outage = OutageLog(log, f"confirming the claim of run {run.run_id}")
        told = False
        while True:
            sent_at = time.monotonic()
            (reply,), count = through_outage(functools.partial(acks.after, renew, mark=False), outage,
                                             RECORD_OUTAGE_LIMIT_S)
            if reply != "ok":
                log.warning("run %s: its claim is %s before %d replica(s) acknowledged it (a failover?); claiming "
                            "the run again (job %s)", run.run_id, "taken" if reply == "taken" else "gone",
                            acks.replicas, run.job_id, extra={"run_id": run.run_id})
                return False
            if acks.acknowledged(count):
                # The replicas' copy of the claim lasts at least a TTL from this renewal.
                attempt.begin_sent_at = sent_at
                if told:
                    log.info("run %s: its claim is acknowledged by %d replica(s) now; starting it", run.run_id, count,
                             extra={"run_id": run.run_id})
                return True
            if not told:
                log.warning("run %s: claimed, but the claim was not acknowledged by %d replica(s) within %d ms "
                            "(%d did); not starting it until they acknowledge it (job %s)", run.run_id,
                            acks.replicas, acks.timeout_ms, count, run.job_id, extra={"run_id": run.run_id})
                told = True
            if attempt.while_waiting is not None:
                attempt.while_waiting()

    def _gave_up_waiting(self, run: RunJob, attempt: Attempt, exc: Exception, waited_s: float, rq_can_retry: bool,
                         cancel_retry: Callable[[], None]) -> None:
        """The wait for the claim ended in an exception, the claim never ours: RQ's timeout
        for the job (RQ then retries or fails the job itself, outside the guard). The
        record, still queued for this job, says so at once (END_WAIT): queued for RQ's
        retry, else failed with the reason; RQ's retry is cancelled when the record does
        not say it retries."""
        if attempt.waited_busy:
            how = f"timed out after {waited_s:.0f} s" if isinstance(exc, BaseTimeoutException) else \
                f"{exc} after {waited_s:.0f} s"
            why = f"{type(exc).__name__}: {how} waiting for "
            run_busy = why + "another copy of the run"
            series_busy = why + "the previous slot's run of its task and param"
        else:
            run_busy = series_busy = f"{type(exc).__name__}: {exc} (while claiming the run)"
        call = self.scripts.end_wait(
            runs_key=self.keys.day_runs(run.day), claim_key=self.keys.claim(run.run_id),
            failures_key=self.keys.alert_failures, run_id=run.run_id, job_id=run.job_id, base_json=run.base_record,
            retention_s=self.retention_s, rq_will_retry=rq_can_retry, node=self.node, now_iso=iso(self.clock()),
            error_if_run_busy=run_busy, error_if_series_busy=series_busy, day=run.day.isoformat())
        try:
            decision = through_outage(call.run, OutageLog(log, f"recording that run {run.run_id} stopped waiting"),
                                      RECORD_OUTAGE_LIMIT_S)
        except RedisError as error:
            # RQ fails the job; the leader settles the run from RQ's failed jobs (settle.py).
            log.error("run %s: could not record that it stopped waiting (%s)", run.run_id, error,
                      extra={"run_id": run.run_id})
            decision = "not-ours"
        if decision != "retry":
            cancel_retry()
        if decision == "failed":
            self.run_ended(run)
        log.warning("run %s stopped waiting for its claim on node %s: %s; %s", run.run_id, self.node, run_busy,
                    {"retry": "will retry", "failed": "failed"}.get(decision, "its record had moved on"),
                    extra={"run_id": run.run_id})

    def _record_failure(self, run: RunJob, attempt: Attempt, error: str, rq_can_retry: bool) -> FailOutcome:
        """FAIL; returns 'retry', 'failed' or 'not-ours'."""
        call = self.fail_call(run, attempt.owner, error, rq_can_retry)
        try:
            return through_outage(call.run, OutageLog(log, f"recording the failure of run {run.run_id}"),
                                  RECORD_OUTAGE_LIMIT_S)
        except RedisError as exc:
            # The claim then expires by itself and the leader's recovery takes the run over.
            log.error("run %s: could not record its failure (%s)", run.run_id, exc, extra={"run_id": run.run_id})
            return "not-ours"

    def fail_call(self, run: RunJob, owner: str, error: str, rq_can_retry: bool) -> ScriptCall[FailOutcome]:
        """FAIL for ``owner``'s execution of ``run``: also used by a worker parent whose
        work-horse died, with the owner token it gave that work-horse."""
        return self.scripts.fail(
            claim_key=self.keys.claim(run.run_id), runs_key=self.keys.day_runs(run.day),
            running_key=self.keys.running, series_key=self.keys.series_claim(run.series),
            failures_key=self.keys.alert_failures, run_id=run.run_id, owner=owner, base_json=run.base_record,
            retention_s=self.retention_s, rq_can_retry=rq_can_retry, max_attempts=run.max_attempts, node=self.node,
            now_iso=iso(self.clock()), error=error, day=run.day.isoformat())



def default_claim_margin_s(claim_ttl_s: float) -> float:
    """How long before a claim could lapse on the server its copy stops, if it could not
    confirm the claim meanwhile: a fifth of the TTL, at least 2 s (a renewal's round
    trip, the watchdog's period, clock-rate differences), never more than half."""
    return min(max(2.0, claim_ttl_s / 5), claim_ttl_s / 2)


class KeptClaim:
    """One run executing in this process under a claim, as the keeper sees it."""

    def __init__(self, keeper: "ClaimKeeper", run_id: str, claim_key: str, series_key: str, owner: str,
                 ttl_ms: int, confirmed_at: float, permits_key: str | None = None,
                 shared_deadline: ClaimDeadline | None = None) -> None:
        self.keeper = keeper
        self.shared_deadline = shared_deadline
        self.permits_key = permits_key
        self.run_id = run_id
        self.claim_key = claim_key
        self.series_key = series_key
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.confirmed_at = confirmed_at
        self.lost: str | None = None
        # The claim was renamed by ``cancel``: this copy stops and then releases it.
        self.cancelled = False
        self.calling = False  # the task function is executing now
        self.thread_id = threading.get_ident()
        self.stop_sent = False

    @property
    def confirmed_at(self) -> float:
        """The monotonic time the last confirmed renewal (or BEGIN) was sent."""
        return self._confirmed_at

    @confirmed_at.setter
    def confirmed_at(self, at: float) -> None:
        self._confirmed_at = at
        if self.shared_deadline is not None:  # the worker parent's copy of the deadline
            self.shared_deadline.set(at + self.keeper.stop_after_s)

    def lost_because(self) -> str | None:
        """Why this copy no longer holds its claim, or None while it does."""
        if self.lost is None:
            unconfirmed_s = time.monotonic() - self.confirmed_at
            if unconfirmed_s > self.keeper.stop_after_s:
                self.lost = (f"could not confirm its claim with Redis for {unconfirmed_s:.1f}s (claim TTL "
                             f"{self.ttl_ms / 1000:g}s; it stops {self.keeper.margin_s:g}s before the claim can lapse)")
        return self.lost

    def stop_requested(self) -> bool:
        return self.stop_sent

    def executing(self) -> "_Calling":
        return _Calling(self)


class _Calling:
    """Marks the span in which the task function runs: only then is it stopped."""

    def __init__(self, held: KeptClaim) -> None:
        self.held = held

    def __enter__(self) -> None:
        self.held.keeper.enter_call(self.held)

    def __exit__(self, *exc: object) -> None:
        self.held.keeper.leave_call(self.held)


class ClaimKeeper:
    """Keeps the claims of the runs executing in this process, and stops a run whose
    claim is no longer certain.

    Two background threads per process, started on first use (a forked work-horse
    inherits the keeper but not its threads, so it starts afresh in each process):

    * the renewer extends each claim every ``renew_every_s`` (RENEW: only while ours);
      a reply that the claim is gone or taken marks the run lost at once;
    * the watchdog compares clock readings only, so a renewal stuck on a dead network
      cannot delay it: a run whose claim was last confirmed more than ``claim_ttl_s -
      margin_s`` ago -- before the server could let the claim lapse and the leader
      hand the run to another copy -- is lost, and its task is stopped.

    After a freeze (SIGSTOP, a VM pause) both threads wake up late; the watchdog's
    first look, within ``WATCHDOG_EVERY_S`` of resuming, finds the deadline passed.
    """

    def __init__(self, connection: Redis, claim_ttl_s: float, margin_s: float, stop_by_exit: bool = False,
                 acks: ReplicaAcks | None = None) -> None:
        self.renew_every_s = min(1.0, claim_ttl_s / 4)
        # DAILYQ_WAIT_REPLICAS: a renewal counts as a confirmation once the replicas have it.
        self.acks = acks
        self._lagging = False
        self.margin_s = margin_s
        self.stop_after_s = claim_ttl_s - margin_s
        # A forked work-horse ends itself (os._exit) to stop its task; anything else
        # interrupts the task's thread.
        self.stop_by_exit = stop_by_exit
        self._scripts = scripts_for(connection)
        self._outage = OutageLog(log, "renewing run claims")
        self._start_afresh()

    def _start_afresh(self) -> None:
        self._pid = os.getpid()
        self._held: dict[str, KeptClaim] = {}
        # Reentrant: the interrupt handler runs in the main thread between any two
        # bytecodes, possibly while that thread already holds the lock.
        self._lock = threading.RLock()
        self._threads_started = False

    def hold(self, run_id: str, claim_key: str, series_key: str, owner: str, ttl_ms: int,
             confirmed_at: float, permits_key: str | None = None,
             shared_deadline: ClaimDeadline | None = None) -> KeptClaim:
        if self._pid != os.getpid():
            # A fork: the parent's runs, lock state and threads are not this process's.
            self._start_afresh()
        held = KeptClaim(self, run_id, claim_key, series_key, owner, ttl_ms, confirmed_at, permits_key,
                       shared_deadline)
        with self._lock:
            self._held[run_id] = held
            if not self._threads_started:
                # _thread, not threading.Thread: Thread.start() waits until the new thread
                # has run, a handshake that cost a freshly forked work-horse about 1 ms per
                # run. Like daemon threads, they never hold up the process's exit.
                _thread.start_new_thread(self._renew_forever, ())
                _thread.start_new_thread(self._watch_forever, ())
                self._threads_started = True
        if not self.stop_by_exit:
            _install_interrupt_handler(self)
        return held

    def release(self, run_id: str) -> None:
        with self._lock:
            held = self._held.pop(run_id, None)
        if held is not None and held.shared_deadline is not None:
            held.shared_deadline.clear()  # no claim held: the worker parent stops watching

    def held_in_thread(self, thread_id: int) -> KeptClaim | None:
        with self._lock:
            return next((h for h in self._held.values() if h.thread_id == thread_id and h.calling), None)

    def enter_call(self, held: KeptClaim) -> None:
        with self._lock:
            held.calling = True
        if held.lost_because() is not None:  # lost before the call began (a freeze right after BEGIN)
            self._stop(held)

    def leave_call(self, held: KeptClaim) -> None:
        with self._lock:
            held.calling = False
            if held.stop_sent and not self.stop_by_exit and held.thread_id != threading.main_thread().ident:
                # An interruption sent but not yet delivered must not land in the guard's own code.
                _set_async_exc(held.thread_id, None)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.renew_every_s)
            with self._lock:
                runs = [h for h in self._held.values() if h.lost is None]
            try:
                if self.acks is not None and self.acks.on:
                    if runs:
                        self._renew_acknowledged(runs)
                else:
                    for held in runs:
                        sent_at = time.monotonic()
                        self._renewed(held, self._renew_call(held).run(), sent_at)
            except RedisError as exc:
                self._outage.failed(exc)
                continue
            self._outage.recovered()

    def _renew_call(self, held: KeptClaim) -> ScriptCall[RenewOutcome]:
        return self._scripts.renew_claim(claim_key=held.claim_key, series_key=held.series_key, owner=held.owner,
                                         ttl_ms=held.ttl_ms, permits_key=held.permits_key)

    @staticmethod
    def _renewed(held: KeptClaim, reply: str, confirmed_at: float | None) -> None:
        """One renewal's reply; ``confirmed_at`` (when it was sent) if it counts as a
        confirmation, None if the replicas did not acknowledge it."""
        if reply == "ok":
            if confirmed_at is not None:
                held.confirmed_at = max(held.confirmed_at, confirmed_at)
        elif reply == "cancelled" and held.lost is None:
            held.cancelled = True  # before ``lost``: the watchdog reads both (cancelling.py)
            held.lost = "cancelled (scheduler.py cancel)"
        elif held.lost is None:
            held.lost = "another copy holds its claim now" if reply == "taken" else "its claim lapsed in Redis"

    def _renew_acknowledged(self, runs: list[KeptClaim]) -> None:
        """Every claim renewed, then WAIT, in one round trip: a renewal the replicas did not
        acknowledge leaves the watchdog's deadline where it was, so a copy stops before the
        claim the replicas hold could lapse (a failover to one of them must not find it
        gone while the copy still runs)."""
        acks = self.acks
        assert acks is not None
        sent_at = time.monotonic()
        replies, count = acks.after(*(self._renew_call(held) for held in runs), mark=False)
        acknowledged = acks.acknowledged(count)
        for held, reply in zip(runs, replies):
            self._renewed(held, reply, sent_at if acknowledged else None)
        if not acknowledged and not self._lagging and "ok" in replies:
            log.warning("claim renewals not acknowledged by %d replica(s) within %d ms (%d did): runs %s stop %gs "
                        "after their last acknowledged renewal unless the replicas catch up", acks.replicas,
                        acks.timeout_ms, count, ", ".join(h.run_id for h in runs), self.stop_after_s)
            self._lagging = True
        elif acknowledged and self._lagging:
            log.info("claim renewals acknowledged by %d replica(s) again", count)
            self._lagging = False

    def _watch_forever(self) -> None:
        while True:
            time.sleep(WATCHDOG_EVERY_S)
            with self._lock:
                runs = list(self._held.values())
            for held in runs:
                if held.calling and not held.stop_sent and held.lost_because() is not None:
                    self._stop(held)

    def _stop(self, held: KeptClaim) -> None:
        with self._lock:
            if held.stop_sent or not held.calling:
                return
            held.stop_sent = True
            reason = held.lost_because()
            if self.stop_by_exit:
                if held.cancelled:
                    log.warning("run %s: stopping this work-horse: %s", held.run_id, reason,
                                extra={"run_id": held.run_id})
                else:
                    log.error("run %s: stopping this work-horse: %s; it records nothing (another copy may own the "
                              "run)", held.run_id, reason, extra={"run_id": held.run_id})
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(CANCELLED_EXIT_CODE if held.cancelled else CLAIM_LOST_EXIT_CODE)
            log.error("run %s: interrupting its task: %s", held.run_id, reason, extra={"run_id": held.run_id})
            if held.thread_id == threading.main_thread().ident and _interrupt_handler_installed():
                signal.pthread_kill(held.thread_id, INTERRUPT_SIGNAL)
            else:
                _set_async_exc(held.thread_id, RunStopped)


_handler_state: dict[str, Any] = {"pid": None, "keeper": None}


def _install_interrupt_handler(keeper: ClaimKeeper) -> None:
    """SIGUSR2 -> RunStopped in the task, when it arrives while a stopped run executes in
    the main thread. A signal (rather than only an asynchronous exception) also breaks
    a blocking call such as ``time.sleep`` or a socket read."""
    if _handler_state["pid"] == os.getpid() and _handler_state["keeper"] is keeper:
        return
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread

    def on_interrupt(signum: int, frame: object) -> None:
        held = keeper.held_in_thread(threading.get_ident())
        if held is not None and held.stop_sent:
            raise RunStopped(held.lost_because())

    signal.signal(INTERRUPT_SIGNAL, on_interrupt)
    _handler_state.update(pid=os.getpid(), keeper=keeper)


def _interrupt_handler_installed() -> bool:
    return _handler_state["pid"] == os.getpid()


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in another thread at its next bytecode (None: cancel a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)

"""The guard in-process against a real Redis: finished runs skip, one copy at a time,
and the overlap policy between slots of the same task and param."""

import json
import logging
import threading
import time
from contextlib import contextmanager
from datetime import date, datetime, timezone
from typing import Iterator

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from dailyq.runs import Run, RunJob, decode_record
from dailyq.schedule import Slot
from dailyq.scripts import scripts_for
from dailyq.table import Task, TaskTable
from dailyq.worker.guard import Guard
from tests.helpers import wait_for
from tests.sample_tasks import record as sample_record

DAY = date(2026, 11, 26)
# Bounds on waits for events that take milliseconds; reached only when something is broken.
EVENT_TIMEOUT_S = 30


# Each named run is task t's param "p" at its own slot of DAY: distinct runs, one series
# (the same task and param), as two days' runs of one series would be.
SLOT_MINUTE = {"r1": 0, "r2": 1, "monday": 2, "tuesday": 3}


def identity(name: str, overlap: str = "wait", force: bool = False, max_attempts: int = 0,
             rerun: int = 0) -> RunJob:
    task = TaskTable([Task(name="t", func=sample_record, params=["p"], at="09:00", overlap=overlap)]).get("t")
    local = datetime(DAY.year, DAY.month, DAY.day, 9, SLOT_MINUTE[name])
    run = Run(task, "p", Slot(local=local, zone="UTC", fires_at=local.replace(tzinfo=timezone.utc)))
    return RunJob(run, run.job_id(rerun), force=force, max_attempts=max_attempts)


def rid(name: str) -> str:
    """The run id of a named run of these tests."""
    return identity(name).run_id


def slot_of(name: str) -> str:
    return identity(name).run.slot.isoformat()


def guard(connection, settings) -> Guard:
    return Guard(connection, settings.keys, "node-x", claim_ttl_s=3, retention_s=600)


def record(connection, settings, run_id):
    return decode_record(connection.hget(settings.keys.day_runs(DAY), run_id))


def run_in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def start_first_copy(connection, settings, run_id: str, task) -> threading.Thread:
    """Execute ``run_id`` in a thread; return once its claim is in Redis (the first copy
    is then executing for sure, whatever the machine's load), not after a guessed head start."""
    thread = run_in_thread(lambda: guard(connection, settings).execute(identity(run_id), task, lambda: False))
    wait_for(lambda: connection.exists(settings.keys.claim(rid(run_id))), timeout=EVENT_TIMEOUT_S,
             what=f"the first copy of {run_id} to hold its claim", every=0.01)
    return thread


class _WaitingSeen(logging.Handler):
    def __init__(self, run_id: str) -> None:
        super().__init__(logging.INFO)
        self.run_id = run_id
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "run_id", None) == rid(self.run_id) and "waiting" in record.getMessage():
            self.event.set()


@contextmanager
def when_waiting(run_id: str) -> Iterator[threading.Event]:
    """An event set once a copy of ``run_id`` says it waits for another copy (the guard's
    INFO line): the moment a test can let the other copy end, with no sleep."""
    logger = logging.getLogger("dailyq.worker.guard")
    handler = _WaitingSeen(run_id)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.event
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_finished_run_is_not_executed_again_unless_forced(connection, settings):
    calls = []
    g = guard(connection, settings)
    g.execute(identity("r1"), lambda: calls.append(1), will_retry=lambda: False)
    assert g.execute(identity("r1"), lambda: calls.append(2), will_retry=lambda: False) == {"skipped": "finished"}
    # A forced rerun is a new job of the run, which fan-out names in the record (queued).
    forced = identity("r1", force=True, rerun=1)
    stored = record(connection, settings, rid("r1"))
    stored.pop("param")
    connection.hset(settings.keys.day_runs(DAY), rid("r1"),
                    json.dumps(dict(stored, job_id=forced.job_id, state="queued")))
    g.execute(forced, lambda: calls.append(3), will_retry=lambda: False)
    # A second queue entry of that job (two movers of one retry): not executed again.
    assert g.execute(forced, lambda: calls.append(4), will_retry=lambda: False) == {"skipped": "finished"}
    assert calls == [1, 3]
    assert record(connection, settings, rid("r1"))["attempts"] == 2


def test_a_second_copy_waits_for_the_first_and_then_skips(connection, settings):
    calls = []
    with when_waiting("r1") as second_waits:
        def first_copy():
            calls.append("first")
            # Still executing when the second copy looks, and until it says it waits.
            assert second_waits.wait(EVENT_TIMEOUT_S)

        first = start_first_copy(connection, settings, "r1", first_copy)
        result = guard(connection, settings).execute(identity("r1"), lambda: calls.append("second"), lambda: False)
        first.join(EVENT_TIMEOUT_S)
    assert second_waits.is_set() and not first.is_alive()
    assert result == {"skipped": "finished"} and calls == ["first"]


def test_overlap_skip_skips_a_slot_while_the_previous_slot_runs(connection, settings):
    tuesday_done = threading.Event()
    # Monday executes until Tuesday has been dealt with: no race with Monday's end.
    first = start_first_copy(connection, settings, "monday", lambda: tuesday_done.wait(EVENT_TIMEOUT_S))
    calls = []
    try:
        result = guard(connection, settings).execute(identity("tuesday", overlap="skip"), lambda: calls.append(1),
                                                     lambda: False)
    finally:
        tuesday_done.set()
    first.join(EVENT_TIMEOUT_S)
    assert result == {"skipped": "skipped"} and calls == []
    tuesday = record(connection, settings, rid("tuesday"))
    assert tuesday["state"] == "skipped" and "overlap" in tuesday["error"]


def test_overlap_wait_runs_the_next_slot_after_the_previous_one(connection, settings):
    order = []
    with when_waiting("tuesday") as tuesday_waits:
        def monday():
            order.append("monday started")
            assert tuesday_waits.wait(EVENT_TIMEOUT_S)  # Tuesday came while Monday executed
            order.append("monday ended")

        first = start_first_copy(connection, settings, "monday", monday)
        guard(connection, settings).execute(identity("tuesday", overlap="wait"), lambda: order.append("tuesday"),
                                            lambda: False)
        first.join(EVENT_TIMEOUT_S)
    assert order == ["monday started", "monday ended", "tuesday"]
    assert record(connection, settings, rid("tuesday"))["state"] == "finished"


def timing_out_after(seconds: int):
    """RQ's own timeout of a job (the death penalty its work-horse runs the job under)."""
    return UnixSignalDeathPenalty(seconds, JobTimeoutException, job_id="test")


def test_a_job_that_times_out_waiting_for_the_previous_slots_run_is_recorded_retrying_or_failed(connection,
                                                                                                  settings):
    monday_may_end = threading.Event()
    first = start_first_copy(connection, settings, "monday", lambda: monday_may_end.wait(EVENT_TIMEOUT_S))
    calls = []
    try:
        for rq_retries, state, cancels in ((True, "queued", []), (False, "failed", [1])):
            cancelled = []
            with pytest.raises(JobTimeoutException), timing_out_after(1):
                guard(connection, settings).execute(identity("tuesday", overlap="wait"), lambda: calls.append(1),
                                                    will_retry=lambda retries=rq_retries: retries,
                                                    cancel_retry=lambda seen=cancelled: seen.append(1))
            tuesday = record(connection, settings, rid("tuesday"))
            assert tuesday["state"] == state and tuesday["node"] == "node-x" and tuesday["attempts"] == 0
            assert tuesday["error"] == ("JobTimeoutException: timed out after 1 s waiting for the previous slot's "
                                        "run of its task and param")
            assert cancelled == cancels  # RQ retries exactly when the record says queued
    finally:
        monday_may_end.set()
        first.join(EVENT_TIMEOUT_S)
    assert calls == [] and record(connection, settings, rid("monday"))["state"] == "finished"


def test_a_job_that_times_out_waiting_for_another_copy_of_its_run_says_so(connection, settings):
    # A later job of the run (a rerun) is queued while an earlier copy still holds the run's claim.
    connection.set(settings.keys.claim(rid("r1")), "earlier-copy", px=60_000)
    with pytest.raises(JobTimeoutException), timing_out_after(1):
        guard(connection, settings).execute(identity("r1"), lambda: None, will_retry=lambda: False)
    r1 = record(connection, settings, rid("r1"))
    assert r1["state"] == "failed"
    assert r1["error"] == "JobTimeoutException: timed out after 1 s waiting for another copy of the run"


def test_a_timed_out_wait_leaves_a_record_another_copy_moved_on_as_it_is(connection, settings):
    # The run's record says running: the copy holding the claim records it, not this one.
    first_may_end = threading.Event()
    first = start_first_copy(connection, settings, "r1", lambda: first_may_end.wait(EVENT_TIMEOUT_S))
    try:
        with pytest.raises(JobTimeoutException), timing_out_after(1):
            guard(connection, settings).execute(identity("r1"), lambda: None, will_retry=lambda: True)
        assert record(connection, settings, rid("r1"))["state"] == "running"
    finally:
        first_may_end.set()
        first.join(EVENT_TIMEOUT_S)
    assert record(connection, settings, rid("r1"))["state"] == "finished"


def test_a_failure_releases_the_claims_and_records_the_error(connection, settings):
    def boom():
        raise ValueError("bad input")

    g = guard(connection, settings)
    try:
        g.execute(identity("r1"), boom, will_retry=lambda: False)
    except ValueError:
        pass
    failed = record(connection, settings, rid("r1"))
    assert failed["state"] == "failed" and failed["error"] == "ValueError: bad input"
    assert not connection.exists(settings.keys.claim(rid("r1")))
    assert not connection.exists(settings.keys.series_claim("t-series"))
    assert not connection.hexists(settings.keys.running, rid("r1"))


def test_the_record_through_a_failure_a_retry_and_a_finish(connection, settings):
    # The guard reads its clock at each BEGIN and at each end (failure or finish).
    moments = iter([datetime(2026, 11, 26, 3, m, s, tzinfo=timezone.utc) for m, s in ((0, 5), (0, 9), (1, 0), (1, 7))])
    g = Guard(connection, settings.keys, "node-x", claim_ttl_s=3, retention_s=600, clock=lambda: next(moments))

    def boom():
        raise ValueError("bad input")

    try:  # no record stored yet: the guard starts from the run's base record
        g.execute(identity("r1"), boom, will_retry=lambda: True)
    except ValueError:
        pass
    first = record(connection, settings, rid("r1"))
    assert first.pop("owner").startswith("node-x:")  # the claim's owner token: internal
    first_fence = int(first.pop("fence"))  # from the server's clock (scripts.BEGIN): only its order matters
    assert first == {
        "task": "t", "param_json": '"p"', "param": "p", "slot": slot_of("r1"), "state": "queued", "node": "node-x",
        "started_at": "2026-11-26T03:00:05+00:00", "ended_at": "2026-11-26T03:00:09+00:00", "attempts": 1,
        "error": "ValueError: bad input", "job_id": rid("r1")}
    attempt = g.attempt(identity("r1"))
    with connection.pipeline() as pipe:  # the retry claims in the worker's own transaction
        g.claim_in(attempt, pipe)
        attempt.keep_begin_reply(pipe.execute()[-1])
    retry = record(connection, settings, rid("r1"))
    assert retry.pop("owner") == attempt.owner
    retry_fence = int(retry.pop("fence"))
    assert retry_fence > first_fence
    assert retry == {
        "task": "t", "param_json": '"p"', "param": "p", "slot": slot_of("r1"), "state": "running", "node": "node-x",
        "started_at": "2026-11-26T03:01:00+00:00", "ended_at": None, "attempts": 2, "error": None, "job_id": rid("r1")}
    g.execute(identity("r1"), lambda: None, will_retry=lambda: False, attempt=attempt)
    finished = record(connection, settings, rid("r1"))
    assert isinstance(finished.pop("duration_s"), (int, float))
    assert finished.pop("owner") == attempt.owner
    assert int(finished.pop("fence")) == retry_fence
    assert finished == {
        "task": "t", "param_json": '"p"', "param": "p", "slot": slot_of("r1"), "state": "finished", "node": "node-x",
        "started_at": "2026-11-26T03:01:00+00:00", "ended_at": "2026-11-26T03:01:07+00:00", "attempts": 2,
        "error": None, "job_id": rid("r1")}
    stored = connection.hget(settings.keys.day_runs(DAY), rid("r1")).decode()
    assert stored.count('"error":null') == 1  # null, not absent


def test_a_claim_taken_inside_another_transaction_is_used_without_a_second_begin(connection, settings):
    g = guard(connection, settings)
    attempt = g.attempt(identity("r1"))
    with connection.pipeline() as pipe:  # as RQ's preparation transaction would be
        pipe.set(f"{settings.prefix}:rq-own-write", 1)
        g.claim_in(attempt, pipe)
        attempt.keep_begin_reply(pipe.execute()[-1])
    assert attempt.begin_reply == "claimed"
    assert record(connection, settings, rid("r1"))["state"] == "running"
    # The claim is held: another copy's BEGIN finds the run busy.
    other = g.attempt(identity("r1"))
    with connection.pipeline() as pipe:
        g.claim_in(other, pipe)
        other.keep_begin_reply(pipe.execute()[-1])
    assert other.begin_reply == "busy"
    assert g.execute(identity("r1"), lambda: "ran", will_retry=lambda: False, attempt=attempt) == "ran"
    assert record(connection, settings, rid("r1"))["state"] == "finished"
    assert record(connection, settings, rid("r1"))["attempts"] == 1  # one BEGIN counted, not two


def test_a_lost_begin_reply_is_recovered_by_sending_begin_again_as_the_same_owner(connection, settings):
    g = guard(connection, settings)
    attempt = g.attempt(identity("r1"))
    with connection.pipeline() as pipe:
        g.claim_in(attempt, pipe)
        pipe.execute()  # the reply never reaches the attempt
    assert attempt.begin_reply is None
    assert g.execute(identity("r1"), lambda: "ran", will_retry=lambda: False, attempt=attempt) == "ran"
    assert record(connection, settings, rid("r1"))["state"] == "finished"
    assert record(connection, settings, rid("r1"))["attempts"] == 1


def test_a_begin_reply_of_finished_skips_the_run_without_calling_it(connection, settings):
    g = guard(connection, settings)
    g.execute(identity("r1"), lambda: None, will_retry=lambda: False)
    attempt = g.attempt(identity("r1"))
    with connection.pipeline() as pipe:
        g.claim_in(attempt, pipe)
        attempt.keep_begin_reply(pipe.execute()[-1])
    calls = []
    assert g.execute(identity("r1"), lambda: calls.append(1), will_retry=lambda: False,
                     attempt=attempt) == {"skipped": "finished"}
    assert calls == []


# -- ownership: run context, fencing tokens, a copy that lost its claim ---------------------

def test_the_task_sees_its_run_and_each_execution_a_greater_fence(connection, settings):
    from dailyq import current_run

    seen = []
    g = guard(connection, settings)
    zoned = Task(name="t", func=sample_record, params=[{"k": "値"}], at="09:00", tz="Asia/Shanghai")
    task = TaskTable([zoned]).get("t")
    slot = task.schedule.permits_on(DAY)[0]
    run = RunJob(Run(task, {"k": "値"}, slot), "job-1", force=True, max_attempts=3)
    def task() -> None:  # fails twice, then succeeds: three executions of one job
        seen.append(current_run())
        if len(seen) < 3:
            raise ValueError("not yet")

    for _ in range(3):
        try:
            g.execute(run, task, will_retry=lambda: True)
        except ValueError:
            pass
    assert current_run() is None  # outside a run
    assert [c.attempt for c in seen] == [1, 2, 3]
    assert seen[0].fence < seen[1].fence < seen[2].fence
    first = seen[0]
    assert (first.task, first.param, first.day, first.run_id, first.node) == (
        "t", {"k": "値"}, DAY, run.run_id, "node-x")
    assert first.slot.isoformat() == "2026-11-26T09:00:00+08:00" and str(first.slot.tzinfo) == "Asia/Shanghai"
    assert int(record(connection, settings, run.run_id)["fence"]) == seen[2].fence


def test_a_copy_whose_claim_another_copy_took_is_interrupted_and_records_nothing(connection, settings):
    from dailyq import ClaimLost, current_run

    g = guard(connection, settings)
    checks = []
    checked = threading.Event()

    def long_task():
        current_run().check()  # holds the claim: no error
        checks.append("ok")
        checked.set()
        time.sleep(30)

    def take_over():  # once the task runs, however long it took to start
        if checked.wait(EVENT_TIMEOUT_S):
            connection.set(settings.keys.claim(rid("r1")), "another-copy", px=60_000)

    run_in_thread(take_over)
    started = time.monotonic()
    result = g.execute(identity("r1"), long_task, will_retry=lambda: False)  # in the main thread: a signal stops it
    assert result == {"skipped": "claim lost"} and checks == ["ok"]
    assert time.monotonic() - started < 10  # renewal (every 1 s) saw it taken; not the task's 30 s
    assert not connection.sismember(settings.keys.day_finished(DAY), rid("r1"))
    assert record(connection, settings, rid("r1"))["state"] == "running"  # the new owner's to record
    assert connection.get(settings.keys.claim(rid("r1"))) == b"another-copy"  # not released by the old copy

    # check() in a copy that lost its claim raises ClaimLost (a DailyqError).
    errors = []

    def checking_task():
        connection.set(settings.keys.claim(rid("r2")), "another-copy", px=60_000)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                current_run().check()
            except ClaimLost as exc:
                errors.append(exc)
                raise
            time.sleep(0.05)

    thread_result = {}
    worker = run_in_thread(lambda: thread_result.update(r=g.execute(identity("r2"), checking_task, lambda: False)))
    worker.join(timeout=15)
    assert thread_result["r"] == {"skipped": "claim lost"} and len(errors) == 1
    assert "another copy holds its claim" in str(errors[0])


def test_finish_and_fail_from_a_copy_that_no_longer_holds_the_claim_are_refused(connection, settings):
    g = guard(connection, settings)
    deferred = []
    g.execute(identity("r1"), lambda: None, will_retry=lambda: False, defer_finish=deferred.append)
    connection.set(settings.keys.claim(rid("r1")), "another-copy", px=60_000)  # the claim passed on meanwhile
    before = record(connection, settings, rid("r1"))
    deferred[0].apply()
    assert not connection.sismember(settings.keys.day_finished(DAY), rid("r1"))
    assert not connection.hexists(settings.keys.durations, "t-series")
    assert record(connection, settings, rid("r1")) == before
    assert connection.get(settings.keys.claim(rid("r1"))) == b"another-copy"

    fail = g.fail_call(identity("r1"), before["owner"], "late failure", rq_can_retry=True)
    assert fail.run() == "not-ours"
    assert record(connection, settings, rid("r1")) == before


def test_a_failure_with_no_attempts_left_is_final_even_if_rq_would_retry(connection, settings):
    g = guard(connection, settings)
    run = identity("r1", max_attempts=2)
    cancelled = []

    def boom():
        raise ValueError("no")

    for expected_state in ("queued", "failed"):
        try:
            g.execute(run, boom, will_retry=lambda: True, cancel_retry=lambda: cancelled.append(1))
        except ValueError:
            pass
        assert record(connection, settings, rid("r1"))["state"] == expected_state
    assert cancelled == [1]  # RQ told not to retry after the second (last allowed) attempt


def test_a_stale_job_of_a_run_is_skipped_as_superseded(connection, settings):
    g = guard(connection, settings)
    g.execute(identity("r1"), lambda: None, will_retry=lambda: False)
    stored = record(connection, settings, rid("r1"))
    stored["job_id"] = rid("r1") + "-r1"  # a later job of the run was enqueued (a recovery, a rerun)
    connection.hset(settings.keys.day_runs(DAY), rid("r1"), json.dumps(stored))
    calls = []
    assert g.execute(identity("r1", force=True), lambda: calls.append(1), will_retry=lambda: False) == {
        "skipped": "superseded"}
    assert calls == []


def test_a_run_with_every_attempt_used_is_not_executed_again_by_a_second_queue_entry(connection, settings):
    # Two movers of one retry can push the same job twice; the second entry must not run a failed run.
    g = guard(connection, settings)
    run = identity("r1", max_attempts=1)

    def boom():
        raise ValueError("no")

    try:
        g.execute(run, boom, will_retry=lambda: False)
    except ValueError:
        pass
    calls = []
    assert g.execute(run, lambda: calls.append(1), will_retry=lambda: False) == {"skipped": "exhausted"}
    assert calls == [] and record(connection, settings, rid("r1"))["state"] == "failed"


# -- replies lost on the way back ---------------------------------------------------------

class LosesAReply(Redis):
    """A client whose first call of one script (by its SHA) runs on the server, but whose
    reply never arrives: what a connection dropped after the command leaves behind."""

    lose_sha: str = ""
    lost = False

    def execute_command(self, *args, **options):
        reply = super().execute_command(*args, **options)
        if not self.lost and args[:2] == ("EVALSHA", self.lose_sha):
            self.lost = True
            raise RedisConnectionError("connection dropped before the reply")
        return reply


def losing_the_reply_of(settings, script: str) -> LosesAReply:
    client = LosesAReply.from_url(settings.redis_url)
    client.lose_sha = getattr(scripts_for(client), script).sha
    return client


def test_a_failure_whose_reply_was_lost_is_recorded_once_and_rq_still_retries(settings):
    client = losing_the_reply_of(settings, "_fail")
    cancelled = []

    def boom():
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        guard(client, settings).execute(identity("r1", max_attempts=2), boom, will_retry=lambda: True,
                                        cancel_retry=lambda: cancelled.append(1))
    assert client.lost
    assert cancelled == []  # the record says queued for RQ's retry, and RQ does retry it
    stored = record(client, settings, rid("r1"))
    assert stored["state"] == "queued" and stored["error"] == "ValueError: bad input" and stored["attempts"] == 1
    client.close()


def test_a_finish_whose_reply_was_lost_is_recorded_and_releases_its_downstream(settings):
    client = losing_the_reply_of(settings, "_finish")
    g = guard(client, settings)
    ended = []
    g.on_ended = ended.append
    run = identity("r1")
    assert g.execute(run, lambda: "ran", will_retry=lambda: False) == "ran"
    assert client.lost
    assert ended == [run]  # recorded finished by this copy: its downstream runs are looked at
    assert record(client, settings, rid("r1"))["state"] == "finished"
    client.close()


def test_the_claim_deadline_shared_with_a_worker_parent_follows_the_claim_from_begin_to_release(connection,
                                                                                               settings):
    """What a forking worker's parent reads (claim_watch.py): nothing while the copy waits
    for a busy claim, then the keeper's own deadline (the last confirmation + TTL - margin),
    moved on by each renewal, and nothing again once FINISH released the claim."""
    from dailyq.worker.claim_watch import ClaimDeadline

    g = guard(connection, settings)
    deadline = ClaimDeadline(g.keeper.margin_s)
    attempt = g.attempt(identity("r1"))
    attempt.shared_deadline = deadline
    connection.set(settings.keys.claim(rid("r1")), "another-copy", px=1500)  # busy at first
    seen_while_waiting: list[float] = []
    calling = threading.Event()

    def sample_until_called() -> None:
        while not calling.is_set():
            seen_while_waiting.append(deadline.get())
            time.sleep(0.05)

    sampler = run_in_thread(sample_until_called)
    readings: list[tuple[float, float]] = []

    def task() -> str:
        calling.set()
        for _ in range(2):
            readings.append((time.monotonic(), deadline.get()))
            time.sleep(g.keeper.renew_every_s + 0.3)
        return "done"

    with when_waiting("r1") as waiting:
        begun = time.monotonic()
        assert g.execute(identity("r1"), task, lambda: False, attempt=attempt) == "done"
    sampler.join(EVENT_TIMEOUT_S)
    assert waiting.is_set() and seen_while_waiting and set(seen_while_waiting) == {0.0}
    (first_at, first), (later_at, later) = readings
    stop_after_s = g.keeper.stop_after_s
    assert begun + stop_after_s < first <= first_at + stop_after_s  # from the BEGIN that claimed
    assert first < later <= later_at + stop_after_s  # a renewal moved it on
    assert deadline.get() == 0.0  # released with FINISH: the parent stops watching

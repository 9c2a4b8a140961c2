"""Every Lua script through its wrapper, against the tests' own redis-server: each
branch of each script, without workers or schedulers around it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import date
from typing import Any

import pytest
from redis import Redis

from dailyq.alerts.outbox import Claimed, Idle, OutboxAlert, parse_claim
from dailyq.fanout import Requeued
from dailyq.keys import Keys
from dailyq.runs import new_record
from dailyq.scripts import ScriptCall, Scripts, scripts_for
from dailyq.scripts.lifecycle import OVERLAP_SKIPPED, BeginReply, FailOutcome, RenewOutcome, parse_begin

DAY = "2026-11-26"
RETENTION_S = 600
TTL_MS = 5000


def base_json(run_id: str, job_id: str | None = None) -> str:
    return json.dumps(new_record("t", '"p"', "slot", job_id or run_id))


def rerun(attempts_before: int, rerun_id: str) -> Requeued:
    """How a user's rerun enqueues a run once more: a new run, its attempts counted afresh."""
    return Requeued(1, rerun_id=rerun_id, new_run=True, attempts_before=attempts_before)


def runs_key(keys: Keys) -> str:
    return keys.day_runs(date.fromisoformat(DAY))


def finished_key(keys: Keys) -> str:
    return keys.day_finished(date.fromisoformat(DAY))


def stored(connection: Redis, keys: Keys, run_id: str) -> dict[str, Any]:
    raw = connection.hget(runs_key(keys), run_id)
    assert isinstance(raw, bytes)
    return dict(json.loads(raw))


def test_scripts_are_registered_once_per_connection(connection: Redis, settings) -> None:
    assert scripts_for(connection) is scripts_for(connection)
    other = Redis.from_url(settings.redis_url)
    try:
        assert scripts_for(other) is not scripts_for(connection)
    finally:
        other.close()


# -- leases ---------------------------------------------------------------------------------

def test_lease_acquire_renew_and_release_by_the_owner_only(scripts: Scripts, connection: Redis, prefix: str) -> None:
    lease = f"{prefix}:lease"
    assert scripts.lease_acquire_or_renew(lease_key=lease, owner="a", ttl_ms=TTL_MS).run() is True
    assert scripts.lease_acquire_or_renew(lease_key=lease, owner="b", ttl_ms=TTL_MS).run() is False
    connection.pexpire(lease, 1000)
    assert scripts.lease_acquire_or_renew(lease_key=lease, owner="a", ttl_ms=TTL_MS).run() is True  # renews own
    assert connection.pttl(lease) > 1000
    connection.pexpire(lease, 1000)
    assert scripts.lease_renew(lease_key=lease, owner="b", ttl_ms=TTL_MS).run() is False
    assert connection.pttl(lease) <= 1000
    assert scripts.lease_renew(lease_key=lease, owner="a", ttl_ms=TTL_MS).run() is True
    assert connection.pttl(lease) > 1000
    assert scripts.lease_release(lease_key=lease, owner="b").run() is False
    assert connection.get(lease) == b"a"
    assert scripts.lease_release(lease_key=lease, owner="a").run() is True
    assert not connection.exists(lease)
    # Renew never takes a free lease.
    assert scripts.lease_renew(lease_key=lease, owner="a", ttl_ms=TTL_MS).run() is False
    assert not connection.exists(lease)


# -- the guard: BEGIN, FINISH, FAIL, RENEW_CLAIM -----------------------------------------------

@dataclass
class RunKeys:
    """The keys and fixed arguments of one run (run id ``r1``, series ``s1``)."""

    keys: Keys
    run_id: str = "r1"
    series: str = "s1"

    def begin(self, scripts: Scripts, owner: str, *, job_id: str = "r1", force: bool = False,
              overlap: str = "wait", max_attempts: int = 0) -> ScriptCall[BeginReply]:
        return scripts.begin(finished_key=finished_key(self.keys), claim_key=self.keys.claim(self.run_id),
                             runs_key=runs_key(self.keys), running_key=self.keys.running,
                             series_key=self.keys.series_claim(self.series), fence_key=self.keys.fence,
                             run_id=self.run_id, owner=owner, claim_ttl_ms=TTL_MS, force=force,
                             base_json=base_json(self.run_id, job_id), retention_s=RETENTION_S, day=DAY,
                             overlap=overlap, node="node-x", now_iso="2026-11-26T10:00:00+00:00", job_id=job_id,
                             max_attempts=max_attempts)

    def finish(self, scripts: Scripts, owner: str) -> ScriptCall[bool]:
        return scripts.finish(finished_key=finished_key(self.keys), claim_key=self.keys.claim(self.run_id),
                              runs_key=runs_key(self.keys), durations_key=self.keys.durations,
                              running_key=self.keys.running, series_key=self.keys.series_claim(self.series),
                              deps_key=self.keys.day_deps(date.fromisoformat(DAY)), run_id=self.run_id, owner=owner,
                              base_json=base_json(self.run_id),
                              retention_s=RETENTION_S, series=self.series, duration_s=1.25, node="node-x",
                              now_iso="2026-11-26T10:01:00+00:00")

    def fail(self, scripts: Scripts, owner: str, *, rq_can_retry: bool = True,
             max_attempts: int = 0) -> ScriptCall[FailOutcome]:
        return scripts.fail(claim_key=self.keys.claim(self.run_id), runs_key=runs_key(self.keys),
                            running_key=self.keys.running, series_key=self.keys.series_claim(self.series),
                            failures_key=self.keys.alert_failures, run_id=self.run_id, owner=owner,
                            base_json=base_json(self.run_id), retention_s=RETENTION_S, rq_can_retry=rq_can_retry,
                            max_attempts=max_attempts, node="node-y", now_iso="2026-11-26T10:02:00+00:00",
                            error="ValueError: boom", day=DAY)

    def renew(self, scripts: Scripts, owner: str) -> ScriptCall[RenewOutcome]:
        return scripts.renew_claim(claim_key=self.keys.claim(self.run_id),
                                   series_key=self.keys.series_claim(self.series), owner=owner, ttl_ms=TTL_MS)


@pytest.fixture
def run(keys: Keys) -> RunKeys:
    return RunKeys(keys)


def test_begin_claims_a_free_run_and_marks_it_running(scripts, connection, keys, run) -> None:
    reply = run.begin(scripts, "a").run()
    assert reply.outcome == "claimed" and reply.attempt == 1 and reply.fence > 0
    assert connection.get(keys.claim("r1")) == b"a" and connection.get(keys.series_claim("s1")) == b"a"
    assert 0 < connection.pttl(keys.claim("r1")) <= TTL_MS
    assert connection.hget(keys.running, "r1") == DAY.encode()
    record = stored(connection, keys, "r1")
    assert record["state"] == "running" and record["node"] == "node-x" and record["attempts"] == 1
    # The fence is stored as digits: exact, where a JSON number from Redis's cjson keeps 14.
    assert record["owner"] == "a" and record["fence"] == str(reply.fence) and record["ended_at"] is None
    assert 0 < connection.ttl(runs_key(keys)) <= RETENTION_S


def test_begin_again_by_the_holder_answers_as_the_first_time(scripts, run) -> None:
    first = run.begin(scripts, "a").run()
    assert run.begin(scripts, "a").run() == first  # a retry after a lost reply: no second attempt, same fence


def server_time_us(connection: Redis) -> int:
    seconds, micros = connection.time()
    return seconds * 1_000_000 + micros


def test_fences_grow_by_the_counter_and_never_fall_below_the_server_clock(scripts, connection, keys, run) -> None:
    before = server_time_us(connection)
    first = run.begin(scripts, "a").run().fence
    assert first >= before  # at least the server's clock, in microseconds
    assert connection.get(keys.fence) == str(first).encode()
    # A counter ahead of the clock (tokens drawn faster than one per microsecond, or a
    # clock that stepped back) goes on from itself: + 1, never back to the clock.
    connection.set(keys.fence, first + 10**9)
    second = RunKeys(keys, "r2", "s2").begin(scripts, "b", job_id="r2").run().fence
    assert second == first + 10**9 + 1 and connection.get(keys.fence) == str(second).encode()


def test_a_fence_counter_lost_with_a_failover_restarts_above_every_earlier_token(scripts, connection, keys) -> None:
    # One counter for every run: each claim (of any run) gets a greater token.
    handed_out = [RunKeys(keys, f"r{i}", f"s{i}").begin(scripts, "a", job_id=f"r{i}").run().fence
                  for i in range(5)]
    assert handed_out == sorted(set(handed_out))
    # The new primary lacks the last tokens (a replica that lagged; here the counter as
    # it was long before, or as the old INCR counter left it): the next token is still
    # greater than every one handed out.
    connection.set(keys.fence, 7)
    after = RunKeys(keys, "r5", "s5").begin(scripts, "a", job_id="r5").run().fence
    assert after > max(handed_out)
    connection.delete(keys.fence)  # lost altogether (a restart without data)
    assert RunKeys(keys, "r6", "s6").begin(scripts, "a", job_id="r6").run().fence > after


def test_begin_skips_a_finished_run_unless_forced(scripts, connection, keys, run) -> None:
    connection.sadd(finished_key(keys), "r1")
    assert run.begin(scripts, "a").run() == BeginReply("finished")
    assert not connection.exists(keys.claim("r1"))
    assert run.begin(scripts, "a", force=True).run().outcome == "claimed"


def test_a_second_queue_entry_of_a_forced_job_does_not_run_it_again(scripts, connection, keys, run) -> None:
    # Force skips the finished set (the run finished before the rerun), never the rerun
    # job's own outcome: two movers of one retry may push the same job twice.
    connection.sadd(finished_key(keys), "r1")
    claimed = run.begin(scripts, "a", job_id="r1-r1", force=True).run()
    assert claimed.outcome == "claimed"
    assert run.finish(scripts, "a").run()
    assert run.begin(scripts, "b", job_id="r1-r1", force=True).run() == BeginReply("finished")
    record = dict(stored(connection, keys, "r1"), state="failed", attempts=3, attempts_before=1)
    record.pop("param", None)
    connection.hset(runs_key(keys), "r1", json.dumps(record))
    assert run.begin(scripts, "b", job_id="r1-r1", force=True, max_attempts=2).run() == BeginReply("exhausted")


def test_begin_skips_a_job_superseded_by_a_later_one(scripts, connection, keys, run) -> None:
    connection.hset(runs_key(keys), "r1", base_json("r1", job_id="r1-r1"))
    assert run.begin(scripts, "a", job_id="r1").run() == BeginReply("superseded")
    assert run.begin(scripts, "a", job_id="r1-r1").run().outcome == "claimed"


def test_begin_refuses_a_run_with_every_attempt_used(scripts, connection, keys, run) -> None:
    record = dict(json.loads(base_json("r1")), attempts=2, state="failed")
    connection.hset(runs_key(keys), "r1", json.dumps(record))
    assert run.begin(scripts, "a", max_attempts=2).run() == BeginReply("exhausted")
    assert stored(connection, keys, "r1")["state"] == "failed"
    assert run.begin(scripts, "a", max_attempts=3).run().outcome == "claimed"


def test_begin_waits_while_another_copy_holds_the_run_or_its_series(scripts, connection, keys, run) -> None:
    connection.set(keys.claim("r1"), "other")
    assert run.begin(scripts, "a").run() == BeginReply("busy")
    connection.delete(keys.claim("r1"))
    connection.set(keys.series_claim("s1"), "previous-slot")
    assert run.begin(scripts, "a", overlap="wait").run() == BeginReply("busy")
    assert not connection.exists(keys.claim("r1"))


def test_begin_with_overlap_skip_records_the_run_skipped(scripts, connection, keys, run) -> None:
    connection.set(keys.series_claim("s1"), "previous-slot")
    assert run.begin(scripts, "a", overlap="skip").run() == BeginReply("skipped")
    record = stored(connection, keys, "r1")
    assert record["state"] == "skipped" and record["error"] == OVERLAP_SKIPPED and record["attempts"] == 0
    assert not connection.exists(keys.claim("r1"))


def test_begin_queued_in_a_transaction_someone_else_executes(scripts, connection, run) -> None:
    with connection.pipeline(transaction=True) as pipe:
        pipe.ping()
        run.begin(scripts, "a").queue_in(pipe)
        replies = pipe.execute()
    assert parse_begin(replies[-1]).outcome == "claimed"
    assert parse_begin(None) == BeginReply(None)  # anything else: the guard asks again
    assert parse_begin([b"nonsense"]) == BeginReply(None)


def test_finish_by_the_holder_records_the_run_and_releases_what_begin_took(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    assert run.finish(scripts, "a").run() is True
    assert not connection.exists(keys.claim("r1"), keys.series_claim("s1"))
    assert connection.hget(keys.running, "r1") is None
    assert connection.sismember(finished_key(keys), "r1")
    assert connection.hget(keys.durations, "s1") == b"1.250"
    record = stored(connection, keys, "r1")
    assert record["state"] == "finished" and record["duration_s"] == 1.25 and record["error"] is None
    assert record["attempts"] == 1  # what BEGIN set stays


def test_finish_is_refused_when_the_claim_is_not_ours(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    connection.set(keys.claim("r1"), "b")  # our claim lapsed and another copy took it
    before = stored(connection, keys, "r1")
    assert run.finish(scripts, "a").run() is False
    assert connection.get(keys.claim("r1")) == b"b" and connection.get(keys.series_claim("s1")) == b"a"
    assert not connection.sismember(finished_key(keys), "r1")
    assert stored(connection, keys, "r1") == before
    connection.delete(keys.claim("r1"))
    assert run.finish(scripts, "a").run() is False  # gone altogether


def test_finish_keeps_a_series_claim_another_copy_holds(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    connection.set(keys.series_claim("s1"), "next-slot")
    assert run.finish(scripts, "a").run() is True
    assert connection.get(keys.series_claim("s1")) == b"next-slot"


def test_finish_queued_in_a_transaction_reads_its_reply(scripts, connection, run) -> None:
    run.begin(scripts, "a").run()
    call = run.finish(scripts, "a")
    with connection.pipeline(transaction=True) as pipe:
        call.queue_in(pipe)
        (reply,) = pipe.execute()
    assert call.parse(reply) is True
    assert call.parse(0) is False


def test_fail_queues_a_run_with_attempts_left_for_its_retry(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    assert run.fail(scripts, "a", max_attempts=2).run() == "retry"
    assert connection.llen(keys.alert_failures) == 0
    record = stored(connection, keys, "r1")
    assert record["state"] == "queued" and record["error"] == "ValueError: boom" and record["node"] == "node-y"
    assert not connection.exists(keys.claim("r1"), keys.series_claim("s1"))
    assert connection.hget(keys.running, "r1") is None


def test_fail_records_failed_when_attempts_are_used_or_rq_will_not_retry(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    assert run.fail(scripts, "a", max_attempts=1).run() == "failed"
    assert stored(connection, keys, "r1")["state"] == "failed"
    # The alerts hear of it in the same step (alert_digest.py); a retry is no failure yet.
    (event,) = [json.loads(raw) for raw in connection.lrange(keys.alert_failures, 0, -1)]
    assert event == {"run_id": "r1", "day": DAY, "task": "t", "param_json": "\"p\"", "node": "node-y",
                     "error": "ValueError: boom", "ended_at": "2026-11-26T10:02:00+00:00", "attempts": 1}
    assert run.fail(scripts, "a", max_attempts=1).run() == "failed"  # a replay pushes nothing more
    assert connection.llen(keys.alert_failures) == 1
    run.begin(scripts, "b", force=True).run()
    assert run.fail(scripts, "b", rq_can_retry=False).run() == "failed"


def test_fail_is_refused_when_the_claim_is_not_ours(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    connection.set(keys.claim("r1"), "b")
    assert run.fail(scripts, "a").run() == "not-ours"
    assert stored(connection, keys, "r1")["state"] == "running"
    assert connection.hget(keys.running, "r1") == DAY.encode()


def test_fail_sent_again_after_a_lost_reply_answers_as_the_first_call(scripts, connection, keys, run) -> None:
    # The guard sends the very same call again (through_outage) when its reply was lost.
    run.begin(scripts, "a").run()
    fail = run.fail(scripts, "a", max_attempts=2)
    assert fail.run() == "retry"
    assert fail.run() == "retry"  # not 'not-ours': RQ's retry must not be cancelled
    assert stored(connection, keys, "r1")["state"] == "queued"
    run.begin(scripts, "b").run()
    fail = run.fail(scripts, "b", max_attempts=2)
    assert fail.run() == "failed"
    assert fail.run() == "failed"
    assert stored(connection, keys, "r1")["state"] == "failed"


def test_a_late_fail_of_an_execution_someone_else_ended_is_still_not_ours(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    first = run.fail(scripts, "a", max_attempts=3)
    assert first.run() == "retry"
    # Recovery or a rerun enqueued the run again: its record is queued, ended_at cleared.
    scripts.queue_records(runs_key=runs_key(keys), retention_s=RETENTION_S, fresh=[],
                          again=[("r1", base_json("r1", "r1-r1"), "r1-r1", Requeued(1))]).run()
    assert first.run() == "not-ours"
    # The leader failed a run whose copy it found dead: its own end time and error.
    run.begin(scripts, "c", job_id="r1-r1").run()
    connection.delete(keys.claim("r1"))
    assert scripts.take_if_abandoned(running_key=keys.running, claim_key=keys.claim("r1"), runs_key=runs_key(keys),
                                     failures_key=keys.alert_failures, day=DAY,
                                     run_id="r1", max_attempts=2, now_iso="2026-11-26T10:05:00+00:00",
                                     retention_s=RETENTION_S).run() == "failed"
    assert run.fail(scripts, "c").run() == "not-ours"
    assert stored(connection, keys, "r1")["state"] == "failed"


def test_finish_sent_again_after_a_lost_reply_answers_1(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    finish = run.finish(scripts, "a")
    assert finish.run() is True
    assert finish.run() is True  # a replay of this owner's finish, not "no longer held the claim"
    # A forced rerun executes the run again: the old owner's FINISH is refused.
    scripts.queue_records(runs_key=runs_key(keys), retention_s=RETENTION_S, fresh=[], again=[
        ("r1", base_json("r1", "r1-r1"), "r1-r1", rerun(1, "r1-r1"))]).run()
    assert run.finish(scripts, "a").run() is False  # the rerun cleared ended_at: not a replay
    assert run.begin(scripts, "b", job_id="r1-r1", force=True).run().outcome == "claimed"
    assert finish.run() is False


def test_renew_claim_ok_taken_gone(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    connection.pexpire(keys.claim("r1"), 1000)
    connection.pexpire(keys.series_claim("s1"), 1000)
    assert run.renew(scripts, "a").run() == "ok"
    assert connection.pttl(keys.claim("r1")) > 1000 and connection.pttl(keys.series_claim("s1")) > 1000
    connection.set(keys.series_claim("s1"), "next-slot", px=1000)
    assert run.renew(scripts, "a").run() == "ok"
    assert connection.pttl(keys.series_claim("s1")) <= 1000  # not ours: left alone
    connection.set(keys.claim("r1"), "b", px=1000)
    assert run.renew(scripts, "a").run() == "taken"
    assert connection.pttl(keys.claim("r1")) <= 1000
    connection.delete(keys.claim("r1"))
    assert run.renew(scripts, "a").run() == "gone"
    assert not connection.exists(keys.claim("r1"))  # never re-taken


# -- fan-out records and the rerun path ----------------------------------------------------------

def test_queue_records_stores_a_first_record_whole(scripts, connection, keys) -> None:
    text = json.dumps(new_record("t", '"é"', "slot", "r1"), ensure_ascii=False)
    connection.hset(runs_key(keys), "r1", json.dumps({"state": "finished", "attempts": 3}))
    scripts.queue_records(runs_key=runs_key(keys), retention_s=RETENTION_S, fresh=[("r1", text)], again=[]).run()
    assert connection.hget(runs_key(keys), "r1").decode() == text  # the writer's JSON, byte for byte
    assert 0 < connection.ttl(runs_key(keys)) <= RETENTION_S


def test_queue_records_requeues_a_recovered_run_keeping_its_history(scripts, connection, keys) -> None:
    record = dict(json.loads(base_json("r1")), state="running", attempts=1, node="node-a", owner="a", fence=7,
                  error=None, ended_at=None, started_at="2026-11-26T10:00:00+00:00")
    connection.hset(runs_key(keys), "r1", json.dumps(record))
    scripts.queue_records(runs_key=runs_key(keys), retention_s=RETENTION_S, fresh=[],
                          again=[("r1", base_json("r1", "r1-r1"), "r1-r1", Requeued(1))]).run()
    after = stored(connection, keys, "r1")
    assert after == dict(record, state="queued", job_id="r1-r1")
    assert "attempts_before" not in after and "rerun_id" not in after


def test_queue_records_starts_a_rerun_from_the_record_or_its_base(scripts, connection, keys) -> None:
    record = dict(json.loads(base_json("r1")), state="failed", attempts=2, error="ValueError: boom",
                  ended_at="2026-11-26T10:02:00+00:00")
    connection.hset(runs_key(keys), "r1", json.dumps(record))
    scripts.queue_records(runs_key=runs_key(keys), retention_s=RETENTION_S, fresh=[], again=[
        ("r1", base_json("r1", "r1-r1"), "r1-r1", rerun(2, "r1-r1")),
        ("r2", base_json("r2", "r2-r1"), "r2-r1", rerun(0, "r2-r1")),
    ]).run()
    assert stored(connection, keys, "r1") == dict(record, state="queued", job_id="r1-r1", error=None, ended_at=None,
                                                  attempts_before=2, rerun_id="r1-r1")
    assert stored(connection, keys, "r2") == dict(json.loads(base_json("r2", "r2-r1")), attempts_before=0,
                                                  rerun_id="r2-r1")


def test_a_rerun_supersedes_the_old_job_and_gets_a_new_attempt_budget(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a", max_attempts=1).run()
    assert run.fail(scripts, "a", max_attempts=1).run() == "failed"
    assert run.begin(scripts, "b", max_attempts=1).run() == BeginReply("exhausted")
    with connection.pipeline(transaction=True) as pipe:  # as fan-out does: inside its MULTI/EXEC
        scripts.queue_records(runs_key=runs_key(keys), retention_s=RETENTION_S, fresh=[], again=[
            ("r1", base_json("r1", "r1-r1"), "r1-r1", rerun(1, "r1-r1"))]).queue_in(pipe)
        pipe.execute()
    assert run.begin(scripts, "c", job_id="r1", max_attempts=1).run() == BeginReply("superseded")
    reply = run.begin(scripts, "c", job_id="r1-r1", max_attempts=1).run()
    assert reply.outcome == "claimed" and reply.attempt == 1
    assert stored(connection, keys, "r1")["attempts"] == 2  # ``status`` goes on counting


# -- runs held for their upstream runs (dependencies.py) ------------------------------------------

def put_record(connection: Redis, keys: Keys, run_id: str, state: str, **fields: Any) -> dict[str, Any]:
    record = dict(json.loads(base_json(run_id)), state=state, **fields)
    connection.hset(runs_key(keys), run_id, json.dumps(record))
    return record


def test_set_run_state_sets_the_state_of_recorded_runs_and_clears_their_error(scripts, connection, keys) -> None:
    before = put_record(connection, keys, "d1", "blocked", error="upstream run ...", attempts=2)
    put_record(connection, keys, "d2", "queued")
    changed = scripts.set_run_state(runs_key=runs_key(keys), retention_s=RETENTION_S, state="waiting",
                                    run_ids=["d1", "d2", "no-record"]).run()
    assert changed == 2
    assert stored(connection, keys, "d1") == dict(before, state="waiting", error=None)  # history kept
    assert stored(connection, keys, "d2")["state"] == "waiting"
    assert connection.hget(runs_key(keys), "no-record") is None  # not made up
    assert 0 < connection.ttl(runs_key(keys)) <= RETENTION_S


def hold(scripts: Scripts, keys: Keys, unfinished: list[str], held: list[str]) -> tuple[str | None, int]:
    return scripts.hold_waiting(runs_key=runs_key(keys), retention_s=RETENTION_S, unfinished_upstream=unfinished,
                                held=held).run()


def test_hold_waiting_blocks_while_an_upstream_run_failed_naming_it(scripts, connection, keys) -> None:
    put_record(connection, keys, "u1", "running")
    connection.hset(runs_key(keys), "u2", json.dumps(dict(new_record("ingest", '"東"', "slot", "u2"),
                                                         state="failed", error="ValueError: boom")))
    put_record(connection, keys, "d1", "waiting")
    put_record(connection, keys, "d2", "blocked", error="upstream run old: x")
    assert hold(scripts, keys, ["u1", "u2", "u-missing"], ["d1", "d2"]) == ("u2", 2)
    for run_id in ("d1", "d2"):
        record = stored(connection, keys, run_id)
        assert record["state"] == "blocked"
        assert record["error"] == 'upstream run ingest("東") failed: u2'
    # Already right: nothing rewritten.
    assert hold(scripts, keys, ["u1", "u2"], ["d1", "d2"]) == ("u2", 0)


def test_hold_waiting_counts_a_skipped_or_blocked_upstream_run_as_blocking(scripts, connection, keys) -> None:
    put_record(connection, keys, "u1", "skipped")
    put_record(connection, keys, "m1", "blocked", error="upstream run ...")  # further up a chain
    put_record(connection, keys, "d1", "waiting")
    assert hold(scripts, keys, ["u1"], ["d1"])[0] == "u1"
    assert stored(connection, keys, "d1")["error"] == 'upstream run t("p") skipped: u1'
    assert hold(scripts, keys, ["m1"], ["d1"])[0] == "m1"
    assert stored(connection, keys, "d1")["error"] == 'upstream run t("p") blocked: m1'


def test_hold_waiting_blocks_on_a_blocker_the_caller_names(scripts, connection, keys) -> None:
    # A computed upstream slot whose params callable failed for good has no run record.
    put_record(connection, keys, "u1", "running")
    put_record(connection, keys, "d1", "waiting")
    reason = "upstream ingest slot s: its params callable failed after 3 attempts (boom)"
    assert scripts.hold_waiting(runs_key=runs_key(keys), retention_s=RETENTION_S, unfinished_upstream=["u1"],
                                held=["d1"], given_blocker=("ingest-s-params", reason)).run() == ("ingest-s-params", 1)
    assert stored(connection, keys, "d1")["state"] == "blocked" and stored(connection, keys, "d1")["error"] == reason


def test_hold_waiting_unblocks_once_no_upstream_run_is_failed(scripts, connection, keys) -> None:
    put_record(connection, keys, "u1", "queued")  # a rerun queued the failed upstream run
    put_record(connection, keys, "d1", "blocked", error="upstream run t(\"p\") failed: u1")
    assert hold(scripts, keys, ["u1"], ["d1"]) == (None, 1)
    assert stored(connection, keys, "d1")["state"] == "waiting" and stored(connection, keys, "d1")["error"] is None


def test_hold_waiting_leaves_runs_no_longer_held_alone(scripts, connection, keys) -> None:
    put_record(connection, keys, "u1", "failed")
    released = put_record(connection, keys, "d1", "queued")  # released (or begun) meanwhile
    done = put_record(connection, keys, "d2", "finished")
    assert hold(scripts, keys, ["u1"], ["d1", "d2", "d-missing"]) == ("u1", 0)
    assert stored(connection, keys, "d1") == released and stored(connection, keys, "d2") == done
    assert connection.hget(runs_key(keys), "d-missing") is None


# -- recovery ------------------------------------------------------------------------------------

def take(scripts: Scripts, keys: Keys, max_attempts: int) -> str:
    return scripts.take_if_abandoned(running_key=keys.running, claim_key=keys.claim("r1"), runs_key=runs_key(keys),
                                     failures_key=keys.alert_failures, day=DAY,
                                     run_id="r1", max_attempts=max_attempts, now_iso="2026-11-26T11:00:00+00:00",
                                     retention_s=RETENTION_S).run()


def test_take_if_abandoned_leaves_a_run_whose_claim_is_alive(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    assert take(scripts, keys, 3) == "alive"
    assert connection.hget(keys.running, "r1") == DAY.encode()


def test_take_if_abandoned_leaves_a_dead_run_with_attempts_left_listed_for_its_requeue(scripts, connection, keys,
                                                                                        run) -> None:
    run.begin(scripts, "a").run()
    connection.delete(keys.claim("r1"))  # its process died: the claim lapsed
    assert take(scripts, keys, 3) == "requeue"
    # Still listed: the requeue's own transaction removes it with enqueueing the new job
    # (recovery.py), so a leader that dies in between leaves it to the next look.
    assert connection.hget(keys.running, "r1") == DAY.encode()
    assert stored(connection, keys, "r1")["state"] == "running"
    assert take(scripts, keys, 3) == "requeue"
    connection.hdel(keys.running, "r1")  # what the requeue does
    assert take(scripts, keys, 3) == "gone"  # another leader took it first


def test_take_if_abandoned_fails_a_dead_run_the_caller_cannot_requeue(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    connection.delete(keys.claim("r1"))
    assert scripts.take_if_abandoned(running_key=keys.running, claim_key=keys.claim("r1"), runs_key=runs_key(keys),
                                     failures_key=keys.alert_failures, day=DAY,
                                     run_id="r1", max_attempts=3, now_iso="2026-11-26T11:00:00+00:00",
                                     retention_s=RETENTION_S, cannot_requeue="its job is gone").run() == "failed"
    record = stored(connection, keys, "r1")
    assert record["state"] == "failed" and record["ended_at"] == "2026-11-26T11:00:00+00:00"
    assert record["error"] == ("executing process lost on node node-x (node died, killed, or cut off from Redis); "
                               "not requeued: its job is gone")
    assert connection.hget(keys.running, "r1") is None


def test_take_if_abandoned_fails_a_dead_run_without_attempts_left(scripts, connection, keys, run) -> None:
    run.begin(scripts, "a").run()
    connection.delete(keys.claim("r1"))
    assert take(scripts, keys, 1) == "failed"
    record = stored(connection, keys, "r1")
    assert record["state"] == "failed" and record["ended_at"] == "2026-11-26T11:00:00+00:00"
    assert record["error"] == ("executing process lost on node node-x (node died, killed, or cut off from Redis); "
                               "1 of 1 attempts used")
    assert connection.hget(keys.running, "r1") is None  # failed and unlisted in one step


def test_take_if_abandoned_without_a_record_forgets_the_run(scripts, connection, keys) -> None:
    connection.hset(keys.running, "r1", DAY)  # its day's records expired: nothing to requeue or show
    assert take(scripts, keys, 1) == "gone"
    assert connection.hget(keys.running, "r1") is None


def test_take_if_abandoned_forgets_a_stale_entry_of_a_run_not_running(scripts, connection, keys) -> None:
    """A running entry whose record finished (or failed, or was requeued) is stale: dropped,
    not requeued -- a new job would be skipped by BEGIN and leave the record queued."""
    record = json.loads(base_json("r1"))
    record["state"] = "finished"
    connection.hset(runs_key(keys), "r1", json.dumps(record))
    connection.hset(keys.running, "r1", DAY)
    assert take(scripts, keys, 3) == "gone"
    assert connection.hget(keys.running, "r1") is None
    assert stored(connection, keys, "r1")["state"] == "finished"


def requeue_stranded(scripts: Scripts, keys: Keys, prefix: str, job_id: str = "r1") -> bool:
    return scripts.requeue_stranded(intermediate_queue_key=f"{prefix}:intermediate", queue_key=f"{prefix}:queue",
                                    runs_key=runs_key(keys), job_id=job_id, run_id="r1").run()


def test_requeue_stranded_puts_a_waiting_job_back_at_the_front_once(scripts, connection, keys, prefix) -> None:
    connection.rpush(f"{prefix}:queue", "other")
    connection.rpush(f"{prefix}:intermediate", "r1")
    connection.hset(runs_key(keys), "r1", base_json("r1"))
    assert requeue_stranded(scripts, keys, prefix) is True
    assert connection.lrange(f"{prefix}:queue", 0, -1) == [b"r1", b"other"]
    assert connection.llen(f"{prefix}:intermediate") == 0
    assert requeue_stranded(scripts, keys, prefix) is False  # no longer stranded


def test_requeue_stranded_leaves_a_job_whose_run_moved_on(scripts, connection, keys, run, prefix) -> None:
    connection.rpush(f"{prefix}:intermediate", "r1")
    connection.hset(runs_key(keys), "r1", base_json("r1", job_id="r1-r1"))
    assert requeue_stranded(scripts, keys, prefix) is False  # a later job of the run
    connection.hset(runs_key(keys), "r1", base_json("r1"))
    run.begin(scripts, "a").run()
    assert requeue_stranded(scripts, keys, prefix) is False  # begun by some copy since
    assert connection.lrange(f"{prefix}:intermediate", 0, -1) == [b"r1"]
    assert not connection.exists(f"{prefix}:queue")


def test_requeue_stranded_without_a_record_requeues(scripts, connection, keys, prefix) -> None:
    connection.rpush(f"{prefix}:intermediate", "r1")
    assert requeue_stranded(scripts, keys, prefix) is True


# -- the alert outbox ------------------------------------------------------------------------------

@dataclass
class OutboxKeys:
    keys: Keys

    def named(self) -> dict[str, str]:
        return {"outbox_key": self.keys.alert_outbox, "in_flight_key": self.keys.alert_in_flight,
                "entries_key": self.keys.alert_entries}


def enqueue(scripts: Scripts, keys: Keys, *alerts: OutboxAlert) -> list[str]:
    return scripts.outbox_enqueue(outbox_key=keys.alert_outbox, entries_key=keys.alert_entries, day_set_ttl_s=100,
                                  alerts=list(alerts)).run()


def test_outbox_enqueue_takes_each_alert_once(scripts, connection, keys, prefix) -> None:
    one, two = OutboxAlert(f"{prefix}:day1", "a1", '{"n": 1}'), OutboxAlert(f"{prefix}:day2", "a2", '{"n": 2}')
    assert enqueue(scripts, keys, one, two) == ["a1", "a2"]
    assert enqueue(scripts, keys, one, OutboxAlert(f"{prefix}:day1", "a3", "{}")) == ["a3"]
    assert connection.smembers(f"{prefix}:day1") == {b"a1", b"a3"} and 0 < connection.ttl(f"{prefix}:day1") <= 100
    assert connection.zcard(keys.alert_outbox) == 3
    entry = json.loads(connection.hget(keys.alert_entries, "a2"))
    assert entry["payload"] == '{"n": 2}' and entry["attempts"] == 0 and int(entry["created_ms"]) > 0


def test_outbox_claim_ack_retry_drop_by_the_holder(scripts, connection, keys, prefix) -> None:
    named = OutboxKeys(keys).named()
    empty = scripts.outbox_claim(**named, claim_ms=30_000, owner="s1", read=parse_claim).run()
    assert isinstance(empty, Idle) and empty.next_ms is None
    enqueue(scripts, keys, OutboxAlert(f"{prefix}:day", "a1", '{"n": 1}'))
    claimed = scripts.outbox_claim(**named, claim_ms=30_000, owner="s1", read=parse_claim).run()
    assert isinstance(claimed, Claimed) and claimed.alert_id == "a1" and claimed.payload == {"n": 1}
    idle = scripts.outbox_claim(**named, claim_ms=30_000, owner="s2", read=parse_claim).run()
    assert isinstance(idle, Idle) and idle.next_ms is not None and 29_000 <= idle.next_ms - idle.now_ms <= 30_000

    assert scripts.outbox_retry(**named, alert_id="a1", owner="s2", wait_ms=0).run() is False
    assert scripts.outbox_drop(**named, alert_id="a1", owner="s2").run() is False
    assert scripts.outbox_retry(**named, alert_id="a1", owner="s1", wait_ms=0).run() is True
    again = scripts.outbox_claim(**named, claim_ms=30_000, owner="s2", read=parse_claim).run()
    assert isinstance(again, Claimed) and again.attempts == 1
    assert scripts.outbox_retry(**named, alert_id="a1", owner="s1", wait_ms=0).run() is False  # s2's now
    assert scripts.outbox_ack(**named, alert_id="a1", owner="s1").run() == "taken"  # delivered all the same
    assert connection.hget(keys.alert_entries, "a1") is None and connection.zcard(keys.alert_in_flight) == 0
    assert scripts.outbox_ack(**named, alert_id="a1", owner="s2").run() == "gone"

    enqueue(scripts, keys, OutboxAlert(f"{prefix}:day", "a2", "{}"))
    scripts.outbox_claim(**named, claim_ms=30_000, owner="s1", read=parse_claim).run()
    assert scripts.outbox_ack(**named, alert_id="a2", owner="s1").run() == "ours"
    enqueue(scripts, keys, OutboxAlert(f"{prefix}:day", "a3", "{}"))
    scripts.outbox_claim(**named, claim_ms=30_000, owner="s1", read=parse_claim).run()
    assert scripts.outbox_drop(**named, alert_id="a3", owner="s1").run() is True
    assert connection.hget(keys.alert_entries, "a3") is None


def test_outbox_claim_takes_back_an_entry_whose_sender_lapsed(scripts, connection, keys, prefix) -> None:
    named = OutboxKeys(keys).named()
    enqueue(scripts, keys, OutboxAlert(f"{prefix}:day", "a1", "{}"))
    assert isinstance(scripts.outbox_claim(**named, claim_ms=0, owner="dead", read=parse_claim).run(), Claimed)
    taken = scripts.outbox_claim(**named, claim_ms=30_000, owner="s2", read=parse_claim).run()
    assert isinstance(taken, Claimed) and taken.alert_id == "a1"
    assert scripts.outbox_retry(**named, alert_id="a1", owner="dead", wait_ms=0).run() is False


def test_outbox_claim_removes_an_id_without_its_entry(scripts, connection, keys) -> None:
    named = OutboxKeys(keys).named()
    connection.zadd(keys.alert_outbox, {"orphan": 0})
    idle = scripts.outbox_claim(**named, claim_ms=30_000, owner="s1", read=parse_claim).run()
    assert isinstance(idle, Idle) and idle.next_ms is None and connection.zcard(keys.alert_outbox) == 0


def test_mark_held_only_under_our_lease_and_reports_a_gap(scripts, connection, keys) -> None:
    def mark(owner: str, gap_ms: int) -> tuple[str, int | None, int | None]:
        return scripts.mark_leadership(lease_key=keys.leader, leadership_key=keys.leadership, owner=owner,
                                 gap_ms=gap_ms).run()

    assert mark("a", 0) == ("not-leader", None, None)
    connection.set(keys.leader, "a")
    outcome, last, now = mark("a", 10_000)
    assert outcome == "ok" and last is None and now is not None
    assert connection.hget(keys.leadership, "first_ms") == connection.hget(keys.leadership, "last_ms")
    connection.hset(keys.leadership, "last_ms", now - 60_000)
    outcome, last, _ = mark("a", 10_000)
    assert outcome == "gap" and last == now - 60_000
    assert int(connection.hget(keys.leadership, "last_ms")) == now - 60_000  # left as is until the alert is in
    outcome, _, later = mark("a", 0)
    assert outcome == "ok" and int(connection.hget(keys.leadership, "last_ms")) == later
    assert int(connection.hget(keys.leadership, "first_ms")) == now  # the first held tick stays


# -- limits and pause (limits.py, pausing.py) ------------------------------------------------

@dataclass
class LimitKeys:
    keys: Keys
    task: str = "lim"

    @property
    def queue(self) -> str:
        return f"{self.keys.prefix}:q"

    @property
    def intermediate(self) -> str:
        return f"{self.keys.prefix}:q:intermediate"

    @property
    def index(self) -> str:
        return self.keys.set_aside_index(self.task)

    def admit(self, scripts: Scripts, owner: str, node: str = "n1", job_id: str | None = None,
              max_running: int | None = 2, max_per_node: int | None = None, ttl_ms: int = TTL_MS) -> str:
        return scripts.admit(paused_key=self.keys.paused, permits_key=self.keys.limit_permits(self.task),
                             permit_nodes_key=self.keys.limit_permit_nodes(self.task),
                             set_aside_key=self.keys.set_aside(self.task),
                             set_aside_index_key=self.index, intermediate_queue_key=self.intermediate, task=self.task,
                             owner=owner, node=node, job_id=job_id or f"job-{owner}", ttl_ms=ttl_ms,
                             max_running=max_running, max_per_node=max_per_node, set_aside_ttl_s=RETENTION_S).run()

    def release(self, scripts: Scripts, owner: str, node: str = "n1", max_running: int | None = 2,
                max_per_node: int | None = None) -> list[str]:
        return scripts.release_permit(paused_key=self.keys.paused, permits_key=self.keys.limit_permits(self.task),
                                    permit_nodes_key=self.keys.limit_permit_nodes(self.task),
                                    set_aside_key=self.keys.set_aside(self.task), set_aside_index_key=self.index,
                                    queue_key=self.queue, task=self.task,
                                    owner=owner, node=node, max_running=max_running,
                                    max_per_node=max_per_node).run()

    def held(self, connection: Redis) -> list[str]:
        return [j.decode() for j in connection.lrange(self.keys.set_aside(self.task), 0, -1)]

    def indexed(self, connection: Redis) -> set[str]:
        return {j.decode() for j in connection.smembers(self.index)}

    def resume(self, scripts: Scripts) -> tuple[bool, int]:
        return scripts.resume(paused_key=self.keys.paused, set_aside_key=self.keys.set_aside(self.task),
                              set_aside_index_key=self.index, queue_key=self.queue, task=self.task).run()

    def queued(self, connection: Redis) -> list[str]:
        return [j.decode() for j in connection.lrange(self.queue, 0, -1)]

    def slots(self, connection: Redis) -> set[str]:
        return {m.decode() for m in connection.zrange(self.keys.limit_permits(self.task), 0, -1)}


@pytest.fixture
def lim(keys: Keys) -> LimitKeys:
    return LimitKeys(keys)


def test_admit_takes_slots_up_to_max_running_then_holds_off_the_intermediate_queue(scripts, connection, lim) -> None:
    connection.rpush(lim.intermediate, "job-c", "other")
    assert lim.admit(scripts, "a") == "admitted"
    assert lim.admit(scripts, "b", node="n2") == "admitted"
    assert lim.slots(connection) == {"a", "b"}
    assert lim.admit(scripts, "c") == "set_aside"
    assert lim.admit(scripts, "c") == "set_aside"  # held twice (queued twice): listed once
    assert lim.held(connection) == ["job-c"]
    assert connection.lrange(lim.intermediate, 0, -1) == [b"other"]  # never seen as stranded
    assert lim.slots(connection) == {"a", "b"}


def calls_of(connection: Redis, command: str) -> int:
    return int(connection.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


# What an older version (before keys.set_aside_index) does to a set-aside list, command for command:
# its ADMIT held with LREM + RPUSH, its promote took the head with LPOP; neither touches the index.
def older_hold(connection: Redis, lim: LimitKeys, job_id: str) -> None:
    connection.lrem(lim.keys.set_aside(lim.task), 0, job_id)
    connection.rpush(lim.keys.set_aside(lim.task), job_id)


def older_promote(connection: Redis, lim: LimitKeys) -> None:
    job_id = connection.lpop(lim.keys.set_aside(lim.task))
    connection.lpush(lim.queue, job_id)


def test_a_hold_checks_the_held_lists_index_not_the_list(scripts, connection, lim) -> None:
    connection.hset(lim.keys.paused, lim.task, "{}")
    for owner in range(200):
        assert lim.admit(scripts, str(owner), max_running=None) == "paused"
    lrem, lpos, lrange = calls_of(connection, "lrem"), calls_of(connection, "lpos"), calls_of(connection, "lrange")
    assert lim.admit(scripts, "new", max_running=None) == "paused"
    # One LREM: of RQ's intermediate queue (a job per worker), none of the set-aside list.
    assert (calls_of(connection, "lrem") - lrem, calls_of(connection, "lpos") - lpos,
            calls_of(connection, "lrange") - lrange) == (1, 0, 0)
    assert lim.held(connection)[-1] == "job-new" and len(lim.held(connection)) == 201
    assert len(lim.indexed(connection)) == 201


def test_a_held_list_an_older_version_kept_is_indexed_at_the_first_hold(scripts, connection, lim) -> None:
    connection.rpush(lim.keys.set_aside(lim.task), "job-x", "job-y")  # no index: an older version's holds
    assert lim.admit(scripts, "a", max_running=1) == "admitted"
    assert lim.admit(scripts, "y", max_running=1) == "set_aside"
    assert lim.held(connection) == ["job-x", "job-y"]  # listed once
    older_promote(connection, lim)  # the index still names job-x
    assert lim.admit(scripts, "x", max_running=1) == "set_aside"
    assert lim.held(connection) == ["job-y", "job-x"]  # not lost behind a stale index
    assert lim.release(scripts, "a", max_running=1) == ["job-y"]
    assert lim.indexed(connection) == {"job-x"}


def test_an_older_versions_hold_beside_the_index_is_moved_once(scripts, connection, lim) -> None:
    assert lim.admit(scripts, "a", max_running=1) == "admitted"
    assert lim.admit(scripts, "b", max_running=1) == "set_aside"  # the index exists: {job-b}
    older_hold(connection, lim, "job-c")  # listed, not indexed
    older_hold(connection, lim, "job-d")
    assert lim.admit(scripts, "c", max_running=1) == "set_aside"  # job-c queued twice, held again while listed
    assert lim.held(connection) == ["job-b", "job-c", "job-d", "job-c"]
    connection.hset(lim.keys.paused, lim.task, "{}")
    assert lim.resume(scripts) == (True, 3)  # each once, none lost
    assert lim.queued(connection) == ["job-b", "job-c", "job-d"]
    assert connection.exists(lim.keys.set_aside(lim.task), lim.index) == 0


def test_held_lists_expire_after_the_last_hold_and_go_when_drained(scripts, connection, lim) -> None:
    set_aside_key = lim.keys.set_aside(lim.task)
    assert lim.admit(scripts, "a", max_running=1) == "admitted"
    assert lim.admit(scripts, "b", max_running=1) == "set_aside"
    for key in (set_aside_key, lim.index):
        assert 0 < connection.ttl(key) <= RETENTION_S, key
        connection.expire(key, 5)
    assert lim.admit(scripts, "c", max_running=1) == "set_aside"
    assert all(connection.ttl(key) > 5 for key in (set_aside_key, lim.index))  # refreshed by the hold
    older_promote(connection, lim)  # job-b: off the list, still in the index
    assert lim.release(scripts, "a", max_running=1) == ["job-c"]
    assert connection.exists(set_aside_key, lim.index) == 0  # the stale id went with the drained list


def test_admit_counts_per_node(scripts, connection, lim) -> None:
    assert lim.admit(scripts, "a", node="n1", max_running=None, max_per_node=1) == "admitted"
    assert lim.admit(scripts, "b", node="n1", max_running=None, max_per_node=1) == "set_aside"
    assert lim.admit(scripts, "c", node="n2", max_running=None, max_per_node=1) == "admitted"


def test_admit_holds_a_paused_task_and_takes_no_slot_without_limits(scripts, connection, lim, keys) -> None:
    assert lim.admit(scripts, "a", max_running=None) == "admitted"
    assert lim.slots(connection) == set()  # no limits: nothing to count
    connection.hset(keys.paused, lim.task, "{}")
    assert lim.admit(scripts, "b", max_running=None) == "paused"
    assert lim.admit(scripts, "c", max_running=5) == "paused"
    assert lim.held(connection) == ["job-b", "job-c"]


def test_a_lapsed_slot_frees_at_the_next_check(scripts, connection, lim) -> None:
    # A TTL of 1 s, not less: the next admit must come before it ends, on a loaded machine too.
    assert lim.admit(scripts, "dead", max_running=1, ttl_ms=1000) == "admitted"
    assert lim.admit(scripts, "b", max_running=1) == "set_aside"
    time.sleep(1.1)  # the holder's claim TTL passes
    assert lim.admit(scripts, "c", max_running=1) == "admitted"
    assert lim.slots(connection) == {"c"}


def test_release_frees_the_slot_and_moves_held_runs_to_the_front_in_order(scripts, connection, lim) -> None:
    for owner in ("a", "b"):
        assert lim.admit(scripts, owner) == "admitted"
    for owner in ("c", "d", "e"):
        assert lim.admit(scripts, owner) == "set_aside"
    connection.rpush(lim.queue, "later")
    assert lim.release(scripts, "a") == ["job-c"]
    assert lim.queued(connection) == ["job-c", "later"]
    assert lim.slots(connection) == {"b"}
    assert lim.release(scripts, "b") == ["job-d", "job-e"]  # two free now
    assert lim.queued(connection) == ["job-d", "job-e", "job-c", "later"]
    assert lim.held(connection) == [] and connection.exists(lim.index) == 0
    assert lim.release(scripts, "b") == []  # idempotent


def test_release_moves_nothing_while_the_task_is_paused(scripts, connection, lim, keys) -> None:
    assert lim.admit(scripts, "a", max_running=1) == "admitted"
    assert lim.admit(scripts, "b", max_running=1) == "set_aside"
    connection.hset(keys.paused, lim.task, "{}")
    assert lim.release(scripts, "a", max_running=1) == []
    assert lim.held(connection) == ["job-b"]


def test_renew_claim_extends_a_live_slot_only(scripts, connection, keys, run, lim) -> None:
    slots = keys.limit_permits(lim.task)
    assert lim.admit(scripts, "a", ttl_ms=1000) == "admitted"
    connection.set(keys.claim(run.run_id), "a")
    before = connection.zscore(slots, "a")
    assert scripts.renew_claim(claim_key=keys.claim(run.run_id), series_key=keys.series_claim(run.series),
                               owner="a", ttl_ms=60_000, permits_key=slots).run() == "ok"
    assert connection.zscore(slots, "a") > before + 50_000
    lim.release(scripts, "a")
    assert scripts.renew_claim(claim_key=keys.claim(run.run_id), series_key=keys.series_claim(run.series),
                               owner="a", ttl_ms=60_000, permits_key=slots).run() == "ok"
    assert connection.zscore(slots, "a") is None  # a released slot is not taken back
    assert scripts.touch_permit(permits_key=slots, owner="a", ttl_ms=1000).run() is False
    assert lim.admit(scripts, "b", ttl_ms=1000) == "admitted"
    assert scripts.touch_permit(permits_key=slots, owner="b", ttl_ms=60_000).run() is True


def test_sweep_frees_lapsed_slots_and_counts_room_on_live_nodes(scripts, connection, keys, lim) -> None:
    from dailyq.limits import LimitedTask

    task = LimitedTask(lim.task, None, 1, keys.limit_permits(lim.task), keys.limit_permit_nodes(lim.task),
                       keys.set_aside(lim.task), lim.index)

    def sweep() -> list[str]:
        return scripts.sweep_permits(paused_key=keys.paused, queue_key=lim.queue, nodes_key=keys.nodes, live_s=600,
                                   tasks=[task]).run()

    seconds, _ = connection.time()
    connection.zadd(keys.nodes, {"n1": seconds, "n2": seconds, "gone": seconds - 3600})
    assert lim.admit(scripts, "a", node="n1", max_running=None, max_per_node=1) == "admitted"
    # A TTL of 1 s, not less: the first sweep must come before it ends, on a loaded machine too.
    assert lim.admit(scripts, "b", node="n2", max_running=None, max_per_node=1, ttl_ms=1000) == "admitted"
    assert lim.admit(scripts, "c", node="n1", max_running=None, max_per_node=1) == "set_aside"
    assert sweep() == []  # both live nodes full ("gone" beat an hour ago: not counted)
    time.sleep(1.1)  # b's holder died: its slot lapses
    assert sweep() == ["job-c"]
    assert lim.queued(connection) == ["job-c"] and lim.slots(connection) == {"a"}
    assert connection.exists(keys.set_aside(lim.task), lim.index) == 0
    connection.hset(keys.paused, lim.task, "{}")
    assert lim.admit(scripts, "d", node="n2", max_running=None, max_per_node=1) == "paused"
    assert sweep() == []  # paused: held runs stay


def test_resume_unpauses_and_puts_every_held_run_back_at_the_front(scripts, connection, keys, lim) -> None:
    connection.hset(keys.paused, lim.task, "{}")
    for owner in ("a", "b"):
        assert lim.admit(scripts, owner) == "paused"
    connection.rpush(lim.queue, "later")
    assert lim.resume(scripts) == (True, 2)
    assert lim.queued(connection) == ["job-a", "job-b", "later"]
    assert connection.hexists(keys.paused, lim.task) == 0
    assert connection.exists(keys.set_aside(lim.task), lim.index) == 0  # drained: the index went with the list
    assert lim.resume(scripts) == (False, 0)


# -- the package's own rules ------------------------------------------------------------------

def script_modules() -> list[Any]:
    import importlib
    import pkgutil

    import dailyq.scripts

    return [importlib.import_module(f"dailyq.scripts.{info.name}")
            for info in pkgutil.iter_modules(dailyq.scripts.__path__)]


def rule_breakers(modules: list[Any]) -> tuple[list[str], list[str]]:
    """(scripts whose own body uses KEYS or ARGV without a ``-- KEYS[`` / ``-- ARGV[``
    header, scripts not called by exactly one ``self.script(NAME)`` wrapper) of ``modules``."""
    import inspect

    texts = {name: (module, value) for module in modules for name, value in vars(module).items()
             if name.isupper() and isinstance(value, str) and "redis.call" in value}
    helpers = [value for name, (_, value) in texts.items() if name.endswith("_LUA")]
    undocumented, unwrapped = [], []
    for name, (module, lua) in texts.items():
        if name.endswith("_LUA"):
            continue
        body = lua
        for helper in helpers:
            body = body.replace(helper, "")
        if ("KEYS[" in body and "-- KEYS[" not in body) or ("ARGV[" in body and "-- ARGV[" not in body):
            undocumented.append(name)
        if inspect.getsource(module).count(f"self.script({name})") != 1:
            unwrapped.append(name)
    return undocumented, unwrapped


def test_every_script_documents_its_keys_and_argv_and_has_one_typed_wrapper() -> None:
    modules = script_modules()
    assert len(modules) >= 10
    assert rule_breakers(modules) == ([], [])


def test_the_rule_check_catches_an_undocumented_unwrapped_script() -> None:
    import types

    planted = types.ModuleType("planted")
    planted.LOST = "return redis.call('GET', KEYS[1])"  # type: ignore[attr-defined]
    planted.__file__ = __file__  # getsource reads this file, which wraps no LOST
    assert rule_breakers([planted]) == (["LOST"], ["LOST"])


def test_a_worker_registers_the_execution_scripts_before_it_forks_so_work_horses_inherit_them(connection) -> None:
    # A forked work-horse shares its parent's Scripts (the same connection object): once
    # registered there, BEGIN and FINISH cost a horse no compacting or hashing of their own.
    from dailyq.scripts.lifecycle import BEGIN, END_WAIT, FAIL, FINISH, RENEW_CLAIM
    from dailyq.scripts.shared import compact

    scripts = Scripts(connection)
    scripts.register_execution_scripts()
    registered = dict(scripts._registered)
    assert set(registered) == {BEGIN, FINISH, FAIL, END_WAIT, RENEW_CLAIM}
    # BEGIN and FINISH, which ride in RQ's transactions, are in Redis's script cache too,
    # under the SHA their calls then carry instead of their body (ScriptCall.queue_in).
    loaded = [scripts.loaded_sha(BEGIN), scripts.loaded_sha(FINISH)]
    assert None not in loaded and connection.script_exists(*loaded) == [True, True]
    assert scripts.loaded_sha(FAIL) is None
    before = compact.cache_info()
    for lua in registered:
        assert scripts.script(lua) is registered[lua]  # the same objects: nothing registered again
    assert compact.cache_info() == before
    # And a fresh connection's set (a horse of a worker that did not register) compacts from the cache.
    compact(BEGIN)
    hits = compact.cache_info().hits
    Scripts(connection).script(BEGIN)
    assert compact.cache_info().hits == hits + 1

"""The day's dependency counts (dependency_counts.py, keys.day_deps): a release after an
upstream run ended, and each leader tick, read a few counts, not the day. Against the
tests' redis-server, with the real FINISH and BEGIN scripts; command counts from the
server's INFO commandstats (counts, not timings)."""

from __future__ import annotations

import json

from redis import Redis

from dailyq.commands import rerun
from dailyq.dependencies import WaitingRuns, release_after
from dailyq.fanout import FanOutOptions, fan_out
from dailyq.keys import Keys
from dailyq.rq_seam import make_queue
from dailyq.runs import Run, runs_on
from dailyq.scripts import scripts_for
from dailyq.table import Task, TaskTable
from tests.test_dependencies import DAY, RECORD, RETENTION_S, chain_table, fail, ids, records
from tests.test_dependencies import finish as finish_as_an_older_version

NOW = "2026-11-20T03:00:00+00:00"


def chain(n: int) -> TaskTable:
    return TaskTable([Task(name="up", func=RECORD, params=list(range(n)), at="03:00", retries=0),
                      Task(name="down", func=RECORD, params=list(range(n)), at="03:00", after=["up"])])


def finish(connection: Redis, keys: Keys, runs: list[Run]) -> None:
    """Each run begun and finished by the guard's own scripts (what a worker does)."""
    scripts = scripts_for(connection)
    for run in runs:
        raw = connection.hget(keys.day_runs(run.day), run.run_id)
        job_id = json.loads(raw).get("job_id") if raw else None  # a rerun's job has its own id
        job, owner = run.job(job_id or run.job_id()), f"test:{run.run_id}"
        reply = scripts.begin(
            finished_key=keys.day_finished(run.day), claim_key=keys.claim(run.run_id), runs_key=keys.day_runs(run.day),
            running_key=keys.running, series_key=keys.series_claim(run.series_id), fence_key=keys.fence,
            run_id=run.run_id, owner=owner, claim_ttl_ms=60_000, force=False, base_json=job.base_record,
            retention_s=RETENTION_S, day=run.day.isoformat(), overlap=run.task.overlap, node="t", now_iso=NOW,
            job_id=job.job_id, max_attempts=0).run()
        assert reply.outcome == "claimed", reply
        assert scripts.finish(
            finished_key=keys.day_finished(run.day), claim_key=keys.claim(run.run_id), runs_key=keys.day_runs(run.day),
            durations_key=keys.durations, running_key=keys.running, series_key=keys.series_claim(run.series_id),
            deps_key=keys.day_deps(run.day), run_id=run.run_id, owner=owner, base_json=job.base_record,
            retention_s=RETENTION_S, series=run.series_id, duration_s=0.1, node="t", now_iso=NOW).run()


def calls(connection: Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in connection.info("commandstats").items()}


def commands_of(connection: Redis, action) -> tuple[int, object]:
    """Redis commands (Lua's own calls included) that ``action`` made, and its result."""
    before = calls(connection)
    result = action()
    after = calls(connection)
    # INFO itself is counted once between the two reads.
    return sum(after.values()) - sum(before.values()) - 1, result


def test_a_look_after_an_upstream_run_ended_costs_the_same_whatever_the_days_size(connection, keys):
    costs = {}
    for n in (10, 300):
        day_keys = Keys(f"{keys.prefix}-{n}")
        table = chain(n)
        queue = make_queue(connection, day_keys)
        fan_out(connection, day_keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
        up = runs_on(table, DAY, ["up"])
        finish(connection, day_keys, up[:-1])
        release_after(connection, day_keys, queue, table, DAY, retention_s=RETENTION_S, tasks=["down"])  # counted
        worker_look, result = commands_of(connection, lambda k=day_keys, q=queue, t=table, e=up[-2].run_id: (
            release_after(connection, k, q, t, DAY, retention_s=RETENTION_S, tasks=["down"], ended=e)))
        assert result.released == []  # one upstream run unfinished
        leader = WaitingRuns(connection, day_keys, queue, table, RETENTION_S)
        assert leader.release_all() == []  # its first look at the day reads it all, once
        leader_tick, released = commands_of(connection, leader.release_all)
        assert released == []
        costs[n] = (worker_look, leader_tick)
        # The last upstream run finishing releases every parked run, once.
        finish(connection, day_keys, up[-1:])
        assert sorted(release_after(connection, day_keys, queue, table, DAY, retention_s=RETENTION_S,
                                    tasks=["down"], ended=up[-1].run_id).released) == sorted(ids(table, "down"))
        assert leader.release_all() == []
        assert connection.hget(day_keys.day_deps(DAY), "held:down") == b"0"
    assert costs[10] == costs[300], costs  # a few reads of counts, not the day's runs


def test_the_leader_releases_from_the_counts_what_a_worker_that_died_after_its_finish_left(connection, keys):
    table = chain_table()
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
    leader = WaitingRuns(connection, keys, queue, table, RETENTION_S)
    assert leader.release_all() == []
    # The workers recorded every upstream run finished, and died before their own look.
    finish(connection, keys, runs_on(table, DAY, ["up", "other"]))
    assert leader.release_all() == ids(table, "mid")
    finish(connection, keys, runs_on(table, DAY, ["mid"]))
    assert sorted(leader.release_all()) == sorted(ids(table, "down"))
    assert not connection.smembers(keys.waiting_days)


def test_a_day_an_older_version_wrote_is_counted_once_and_then_released_from_its_counts(connection, keys):
    table = chain_table()
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
    connection.delete(keys.day_deps(DAY))  # the older version kept no counts, no held hints
    finish_as_an_older_version(connection, keys, ids(table, "up")[:2])  # its FINISH counted nothing
    first = release_after(connection, keys, queue, table, DAY, retention_s=RETENTION_S)
    assert first.released == []
    deps = {k.decode(): v.decode() for k, v in connection.hgetall(keys.day_deps(DAY)).items()}
    assert deps == {"~counted": "1", "done:up": "2", "held:mid": "1", "held:down": "2"}
    # A worker of the older version, still running during the deploy, finishes the last one.
    finish_as_an_older_version(connection, keys, ids(table, "up")[2:])
    assert release_after(connection, keys, queue, table, DAY, retention_s=RETENTION_S,
                         tasks=["mid"]).released == ids(table, "mid")
    smembers_before = calls(connection).get("smembers", 0)
    finish(connection, keys, runs_on(table, DAY, ["mid"]))  # this version's FINISH counts
    assert sorted(release_after(connection, keys, queue, table, DAY, retention_s=RETENTION_S,
                                tasks=["down"]).released) == sorted(ids(table, "down"))
    assert calls(connection).get("smembers", 0) == smembers_before  # not counted again


def test_a_failed_upstream_run_blocks_the_chain_below_it_once_and_its_rerun_makes_it_waiting(connection, keys):
    table = TaskTable([Task(name="up", func=RECORD, params=["a", "b", "c"], at="03:00", retries=0),
                       Task(name="mid", func=RECORD, params=["m"], at="03:00", after=["up"]),
                       Task(name="down", func=RECORD, params=["x"], at="03:00", after=["mid"])])
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
    a, b, c = runs_on(table, DAY, ["up"])
    finish(connection, keys, [a])
    fail(connection, keys, b.run_id)  # recorded failed for good, as FAIL does
    result = release_after(connection, keys, queue, table, DAY, retention_s=RETENTION_S, tasks=["mid"],
                           ended=b.run_id)
    (mid,), (down,) = ids(table, "mid"), ids(table, "down")
    assert result.blocked == {mid: b.run_id, down: mid}
    assert {records(connection, keys)[run_id]["state"] for run_id in (mid, down)} == {"blocked"}
    assert records(connection, keys)[down]["error"] == f'upstream run mid("m") blocked: {mid}'
    # A second failure upstream: mid is blocked already by a run that still blocks.
    fail(connection, keys, c.run_id)
    again = release_after(connection, keys, queue, table, DAY, retention_s=RETENTION_S, tasks=["mid"],
                          ended=c.run_id)
    assert again.blocked == {} and records(connection, keys)[mid]["error"].endswith(b.run_id)

    rerun(connection, keys, queue, table, "up", ["b", "c"], DAY, force=False, retention_s=RETENTION_S)
    assert {records(connection, keys)[run_id]["state"] for run_id in (mid, down)} == {"waiting"}
    assert connection.hget(keys.day_deps(DAY), "blocked:mid") is None
    finish(connection, keys, [b, c])
    assert release_after(connection, keys, queue, table, DAY, retention_s=RETENTION_S, tasks=["mid"],
                         ended=c.run_id).released == [mid]


def test_counts_that_disagree_with_the_finished_set_are_counted_again(connection, keys):
    # A removed upstream run (in the finished set) rerun: the rerun takes it out of the set.
    table = TaskTable([Task(name="up", func=RECORD, params=["a", "b"], at="03:00", retries=0),
                       Task(name="down", func=RECORD, params=["x"], at="03:00", after=["up"])])
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
    a, b = runs_on(table, DAY, ["up"])
    finish(connection, keys, [a, b])
    runs_key = keys.day_runs(DAY)
    connection.hset(runs_key, b.run_id, json.dumps(dict(json.loads(connection.hget(runs_key, b.run_id)),
                                                        state="removed")))
    connection.hset(keys.day_waiting(DAY), "never-released", json.dumps(
        {"task": "gone", "param_json": "1", "slot": "x", "job_id": "j"}))  # parked by a table without hints
    rerun(connection, keys, queue, table, "up", ["b"], DAY, force=False, retention_s=RETENTION_S)
    assert not connection.sismember(keys.day_finished(DAY), b.run_id)
    result = release_after(connection, keys, queue, table, DAY, retention_s=RETENTION_S, tasks=["down"])
    assert result.released == []  # b runs again: down waits for it
    assert connection.hget(keys.day_deps(DAY), "done:up") == b"1"
    assert connection.hget(keys.day_deps(DAY), "held:gone") == b"1"


def test_runs_the_leader_records_failed_block_the_runs_held_for_them_at_once(connection, keys):
    # RQ failed the job outside the guard (settle.py) or its process was lost with no
    # attempt left (recovery.py): no worker looks after those; the leader does.
    table = chain_table()
    queue = make_queue(connection, keys)
    fan_out(connection, keys, queue, runs_on(table, DAY), FanOutOptions(RETENTION_S))
    leader = WaitingRuns(connection, keys, queue, table, RETENTION_S)
    assert leader.release_all() == []  # its first, full look: every parked run waiting
    bad = ids(table, "up")[0]
    fail(connection, keys, bad)
    leader.release_all()
    assert records(connection, keys)[ids(table, "mid")[0]]["state"] == "waiting"  # a tick reads only counts
    leader.ended([(DAY, bad)])
    assert {records(connection, keys)[run_id]["state"] for run_id in ids(table, "mid") + ids(table, "down")} == \
        {"blocked"}
    assert records(connection, keys)[ids(table, "other")[0]]["state"] == "queued"  # not downstream of up

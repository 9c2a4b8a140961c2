"""A day's counts and change feed (day_feed.py), kept by the record-writing Lua helpers.

Each step drives real scripts against the tests' own redis-server; after it, the counts
hash must equal what the records say, and the feed must name exactly the runs the step
wrote."""

from __future__ import annotations

import json
from collections import Counter
from datetime import date
from typing import Any, Callable

from redis import Redis

from dailyq.day_feed import DayView, parse_counts, read_counts
from dailyq.fanout import Requeued
from dailyq.keys import Keys
from dailyq.runs import new_record
from dailyq.scripts import Scripts

DAY = date(2026, 11, 26)
RETENTION_S = 600
TTL_MS = 5000
NOW = "2026-11-26T10:00:00+00:00"


def rerun(attempts_before: int, rerun_id: str) -> Requeued:
    """How a user's rerun enqueues a run once more: a new run, its attempts counted afresh."""
    return Requeued(1, rerun_id=rerun_id, new_run=True, attempts_before=attempts_before)


def record_json(run_id: str, task: str = "t", slot: str = "2026-11-26T09:00:00+00:00") -> str:
    return json.dumps(new_record(task, json.dumps(run_id), slot, run_id))


def from_records(connection: Redis, keys: Keys) -> tuple[Counter, Counter]:
    """(task, state) and (task, slot) counts as the day's records say."""
    states: Counter = Counter()
    slots: Counter = Counter()
    for raw in connection.hvals(keys.day_runs(DAY)):
        record = json.loads(raw)
        states[(record["task"], record["state"])] += 1
        slots[(record["task"], record["slot"])] += 1
    return states, slots


def kept(connection: Redis, keys: Keys) -> tuple[Counter, Counter]:
    counts, counted = parse_counts(connection.hgetall(keys.day_counts(DAY)))
    assert counted
    return counts.states, counts.slots


def changed_since(connection: Redis, keys: Keys, seq: int) -> set[str]:
    return {raw.decode() for raw in connection.zrangebyscore(keys.day_changes(DAY), f"({seq}", "+inf")}


def seq_of(connection: Redis, keys: Keys) -> int:
    return int(connection.hget(keys.day_counts(DAY), "_seq") or 0)


def state_of(connection: Redis, keys: Keys, run_id: str) -> str:
    return str(json.loads(connection.hget(keys.day_runs(DAY), run_id))["state"])


def test_counts_and_feed_follow_every_state_change(connection: Redis, keys: Keys, scripts: Scripts) -> None:
    runs_key = keys.day_runs(DAY)
    finished_key = keys.day_finished(DAY)

    def begin(run_id: str, owner: str, job_id: str | None = None) -> Any:
        return scripts.begin(finished_key=finished_key, claim_key=keys.claim(run_id), runs_key=runs_key,
                             running_key=keys.running, series_key=keys.series_claim(run_id), fence_key=keys.fence,
                             run_id=run_id, owner=owner, claim_ttl_ms=TTL_MS, force=job_id is not None,
                             base_json=record_json(run_id), retention_s=RETENTION_S, day=DAY.isoformat(),
                             overlap="wait", node="n", now_iso=NOW, job_id=job_id or run_id, max_attempts=0).run()

    def finish(run_id: str, owner: str) -> Any:
        return scripts.finish(finished_key=finished_key, claim_key=keys.claim(run_id), runs_key=runs_key,
                              durations_key=keys.durations, running_key=keys.running, deps_key=keys.day_deps(DAY),
                              series_key=keys.series_claim(run_id), run_id=run_id, owner=owner,
                              base_json=record_json(run_id), retention_s=RETENTION_S, series=run_id,
                              duration_s=1.0, node="n", now_iso=NOW).run()

    def fail(run_id: str, owner: str, retry: bool) -> Any:
        return scripts.fail(claim_key=keys.claim(run_id), runs_key=runs_key, running_key=keys.running,
                            series_key=keys.series_claim(run_id), failures_key=keys.alert_failures, run_id=run_id,
                            owner=owner, base_json=record_json(run_id), retention_s=RETENTION_S,
                            rq_can_retry=retry, max_attempts=0, node="n", now_iso=NOW, error="boom",
                            day=DAY.isoformat()).run()

    steps: list[tuple[str, Callable[[], Any], set[str]]] = [
        ("fan-out", lambda: scripts.queue_records(
            runs_key=runs_key, retention_s=RETENTION_S, again=[],
            fresh=[(r, record_json(r, task="u" if r == "d" else "t")) for r in "abcd"]).run(), set("abcd")),
        ("held waiting", lambda: scripts.set_run_state(runs_key=runs_key, retention_s=RETENTION_S, state="waiting",
                                                       run_ids=["d"]).run(), {"d"}),
        ("begin", lambda: begin("a", "o1"), {"a"}),
        ("fail, retried", lambda: fail("a", "o1", retry=True), {"a"}),
        ("begin again", lambda: begin("a", "o2"), {"a"}),
        ("finish", lambda: finish("a", "o2"), {"a"}),
        ("begin b", lambda: begin("b", "o3"), {"b"}),
        ("fail for good", lambda: fail("b", "o3", retry=False), {"b"}),
        ("blocked", lambda: scripts.hold_waiting(runs_key=runs_key, retention_s=RETENTION_S,
                                                 unfinished_upstream=["b"], held=["d"]).run(), {"d"}),
        ("cancel", lambda: scripts.cancel(runs_key=runs_key, claim_key=keys.claim("c"), running_key=keys.running,
                                          waiting_key=keys.day_waiting(DAY), run_id="c", why="by hand",
                                          now_iso=NOW, retention_s=RETENTION_S).run(), {"c"}),
        ("rerun", lambda: scripts.queue_records(
            runs_key=runs_key, retention_s=RETENTION_S, fresh=[],
            again=[("b", record_json("b"), "b-again", rerun(1, "rr"))]).run(), {"b"}),
        ("rerun begins", lambda: begin("b", "o4", job_id="b-again"), {"b"}),
        ("rerun finishes", lambda: finish("b", "o4"), {"b"}),
        ("removed", lambda: (connection.hset(keys.day_waiting(DAY), "d", "{}"), scripts.remove_waiting(
            waiting_key=keys.day_waiting(DAY), runs_key=runs_key, finished_key=finished_key,
            deps_key=keys.day_deps(DAY), run_id="d", now_iso=NOW, why="gone", retention_s=RETENTION_S).run()), {"d"}),
        ("rerun of a removed run", lambda: scripts.queue_records(
            runs_key=runs_key, retention_s=RETENTION_S, fresh=[],
            again=[("d", record_json("d"), "d-again", rerun(0, "rd"))]).run(), {"d"}),
        ("waiting again, then released", lambda: [scripts.set_run_state(
            runs_key=runs_key, retention_s=RETENTION_S, state=state, run_ids=["d"]).run()
            for state in ("waiting", "queued")], {"d"}),
    ]
    seen_states = set()
    for name, step, written in steps:
        before = seq_of(connection, keys)
        step()
        assert kept(connection, keys) == from_records(connection, keys), name
        assert changed_since(connection, keys, before) == written, name
        seen_states |= {state for _, state in from_records(connection, keys)[0]}
    # Every state the steps meant to reach was reached (a step that changed nothing would
    # pass the checks above vacuously).
    assert {"queued", "waiting", "running", "finished", "failed", "blocked", "cancelled", "removed"} <= seen_states
    assert state_of(connection, keys, "b") == "finished" and state_of(connection, keys, "a") == "finished"
    # Counts and feed expire with the records.
    assert 0 < connection.ttl(keys.day_counts(DAY)) <= RETENTION_S
    assert 0 < connection.ttl(keys.day_changes(DAY)) <= RETENTION_S


def test_a_day_an_older_version_began_is_counted_once_then_kept(connection: Redis, keys: Keys,
                                                               scripts: Scripts) -> None:
    runs_key = keys.day_runs(DAY)
    # Records as an older version wrote them: no counts, no feed.
    connection.hset(runs_key, mapping={f"old{i}": record_json(f"old{i}") for i in range(5)})
    connection.expire(runs_key, RETENTION_S)
    # A write by this version does not start counting a day it did not begin...
    scripts.set_run_state(runs_key=runs_key, retention_s=RETENTION_S, state="waiting", run_ids=["old0"]).run()
    assert not parse_counts(connection.hgetall(keys.day_counts(DAY)))[1]
    # ...its first read counts it, and the counts are kept from then on.
    counts = read_counts(connection, keys, DAY)
    assert counts.states == Counter({("t", "queued"): 4, ("t", "waiting"): 1})
    assert counts.slots == Counter({("t", "2026-11-26T09:00:00+00:00"): 5})
    assert 0 < connection.ttl(keys.day_counts(DAY)) <= RETENTION_S
    scripts.set_run_state(runs_key=runs_key, retention_s=RETENTION_S, state="queued", run_ids=["old0"]).run()
    assert kept(connection, keys) == from_records(connection, keys)
    # Records an older version adds meanwhile make the counts disagree with HLEN: counted again.
    connection.hset(runs_key, "old9", record_json("old9", task="v"))
    assert read_counts(connection, keys, DAY).per_state() == Counter({"queued": 6})


def test_a_view_fetches_exactly_the_changed_runs_and_nothing_when_nothing_changed(
        connection: Redis, keys: Keys, scripts: Scripts, settings) -> None:
    runs_key = keys.day_runs(DAY)
    scripts.queue_records(runs_key=runs_key, retention_s=RETENTION_S, again=[],
                          fresh=[(f"r{i}", record_json(f"r{i}")) for i in range(200)]).run()
    watcher = Redis.from_url(settings.redis_url)
    try:
        view = DayView(watcher, keys, DAY)
        assert len(view.refresh()) == 200 and view.full_reads == 1
        scripts.set_run_state(runs_key=runs_key, retention_s=RETENTION_S, state="waiting", run_ids=["r3", "r7"]).run()
        scripts.queue_records(runs_key=runs_key, retention_s=RETENTION_S, again=[],
                              fresh=[("r200", record_json("r200"))]).run()
        sent_before = watcher.info("stats")["total_net_output_bytes"]
        records = view.refresh()
        assert view.full_reads == 1
        assert {run_id for run_id, r in records.items() if r["state"] == "waiting"} == {"r3", "r7"}
        assert len(records) == 201
        assert records == {k.decode(): {**json.loads(v), "param": json.loads(json.loads(v)["param_json"])}
                           for k, v in connection.hgetall(runs_key).items()}
        # Nothing changed since: one MULTI of four O(1) reads, whatever the day's size.
        calls_before = _calls(watcher)
        view.refresh()
        calls = _calls(watcher) - calls_before
        assert calls == Counter({"multi": 1, "hget": 1, "hlen": 1, "zrangebyscore": 1, "zcard": 1, "exec": 1,
                                 "info": 1})
        assert view.full_reads == 1
        assert sent_before > 0
    finally:
        watcher.close()


def test_a_view_reads_the_day_again_when_the_feed_cannot_tell(connection: Redis, keys: Keys, scripts: Scripts) -> None:
    runs_key = keys.day_runs(DAY)
    scripts.queue_records(runs_key=runs_key, retention_s=RETENTION_S, again=[],
                          fresh=[("r1", record_json("r1"))]).run()
    view = DayView(connection, keys, DAY)
    view.refresh()
    connection.hset(runs_key, "older", record_json("older"))  # an older version's write: no feed entry
    assert set(view.refresh()) == {"r1", "older"} and view.full_reads == 2
    connection.delete(runs_key, keys.day_counts(DAY), keys.day_changes(DAY))  # the day lost
    scripts.queue_records(runs_key=runs_key, retention_s=RETENTION_S, again=[],
                          fresh=[("r2", record_json("r2"))]).run()
    assert set(view.refresh()) == {"r2"} and view.full_reads == 3


def test_the_feed_lives_a_day_after_its_last_new_run_and_a_view_reads_past_its_end(
        connection: Redis, keys: Keys, scripts: Scripts) -> None:
    from dailyq.scripts.shared import CHANGES_KEPT_S  # noqa: PLC0415

    runs_key, changes_key = keys.day_runs(DAY), keys.day_changes(DAY)
    long_retention_s = 7 * 86400
    scripts.queue_records(runs_key=runs_key, retention_s=long_retention_s, again=[],
                          fresh=[(f"r{i}", record_json(f"r{i}")) for i in range(3)]).run()
    assert CHANGES_KEPT_S - 5 < connection.ttl(changes_key) <= CHANGES_KEPT_S  # not the records' week
    assert connection.ttl(runs_key) > CHANGES_KEPT_S
    view = DayView(connection, keys, DAY)
    assert len(view.refresh()) == 3 and view.full_reads == 1
    connection.delete(changes_key)  # as it expires, a day after its last new run
    scripts.set_run_state(runs_key=runs_key, retention_s=long_retention_s, state="waiting", run_ids=["r1"]).run()
    # Taken in again, with its TTL: it now names one run of three, and the view reads the day whole.
    assert connection.zcard(changes_key) == 1 and 0 < connection.ttl(changes_key) <= CHANGES_KEPT_S
    records = view.refresh()
    assert records["r1"]["state"] == "waiting" and len(records) == 3 and view.full_reads == 2


def _calls(connection: Redis) -> Counter:
    """Commands the server ran, by name (INFO commandstats; counts every client, so a test
    reads it with nothing else talking to its server)."""
    stats = connection.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()})


def test_a_run_entrys_series_is_read_off_its_run_id_as_its_param_would_give_it() -> None:
    from dailyq.ops.eta import run_series, series_id  # noqa: PLC0415
    from dailyq.params_book import params_run_id  # noqa: PLC0415
    from dailyq.runs import runs_on  # noqa: PLC0415
    from dailyq.table import Task, TaskTable  # noqa: PLC0415

    params = [1, "two", {"b": [3, 4], "a": None}, [5.5, True], "x-0123456789ab"]
    task = Task(name="task-with-dashes", func="bench.noop.noop", params=params, at="03:00")
    for run in runs_on(TaskTable([task]), DAY):
        assert run_series(task.name, run.run_id, run.param) == run.series_id == series_id(task.name, run.param)
    # A computed slot's placeholder has no digest in its id: its series comes from its param.
    slot = runs_on(TaskTable([task]), DAY)[0].slot
    assert run_series(task.name, params_run_id(task, slot), None) == series_id(task.name, None)

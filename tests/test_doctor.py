"""``doctor``: an inconsistency of each kind planted in a real Redis is found (exit 1, text
and --json), ``--repair`` settles each, and the day is clean afterwards; the pure core
on plain data; a repair leaves a record that changed since it was read alone."""

from __future__ import annotations

import json
from datetime import date

import dailyq
from dailyq.dependencies import release_ready
from dailyq.fanout import Parked
from dailyq.ops import consistency as doctor
from dailyq.recovery import AbandonedRuns
from dailyq.rq_seam import DailyJob
from dailyq.runs import new_record, runs_on
from dailyq.worker.workers import DailySimpleWorker, make_queue
from tests.support.helpers import executions, run_cli, starts_per_param
from tests.test_cli import assert_clean_error

DAY = "2026-11-26"
GONE = "gone-20261126T030000-000000000000"  # a run of a task no table has any more


def record_of(connection, keys, run_id: str) -> dict:
    raw = connection.hget(keys.day_runs(date.fromisoformat(DAY)), run_id)
    return json.loads(raw) if raw else {}


def edit(connection, keys, run_id: str, **fields) -> None:
    connection.hset(keys.day_runs(date.fromisoformat(DAY)), run_id,
                    json.dumps({**record_of(connection, keys, run_id), **fields}))


def doctor_json(env, *extra: str) -> tuple[int, dict]:
    result = run_cli(["doctor", "--date", DAY, "--json", *extra], env)
    assert not result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def kinds_of(report: dict) -> dict[tuple[str, str], dict]:
    return {(p["run_id"], p["kind"]): p for p in report["problems"]}


def test_doctor_finds_a_planted_inconsistency_of_each_kind_and_repair_settles_each(node_env, connection, settings,
                                                                                    table, prefix):
    keys, day = settings.keys, date.fromisoformat(DAY)
    dailyq.trigger(connection, DAY, settings=settings, table=table)
    queue = make_queue(connection, keys)
    sample = runs_on(table, day, ["sample"])
    numbers = runs_on(table, day, ["numbers"])
    (broken,) = runs_on(table, day, ["broken"])
    lost, jobless, dead, listed_by_mistake = (run.run_id for run in sample)
    unparked, left_behind, alive, in_left = (run.run_id for run in numbers)

    def unqueue(job_id: str) -> None:
        assert connection.lrem(queue.key, 0, job_id) == 1

    # queued_unbacked: a job taken out of the queue (RQ still has it) ...
    unqueue(lost)
    # ... and one RQ no longer has at all.
    unqueue(jobless)
    connection.delete(DailyJob.key_for(jobless))
    # running_unclaimed: recorded running, no claim, not in the running hash.
    unqueue(dead)
    edit(connection, keys, dead, state="running", node="ghost", owner="ghost:1:x", attempts=1)
    # running_unlisted: a live copy's claim, but not in the running hash.
    unqueue(alive)
    edit(connection, keys, alive, state="running", node="n1", owner="n1:2:y", attempts=1)
    connection.set(keys.claim(alive), "n1:2:y", px=60_000)
    # waiting_unbacked: held for upstream runs with no waiting entry: one the table can
    # park again, one of a task no table has.
    unqueue(unparked)
    edit(connection, keys, unparked, state="waiting")
    connection.hset(keys.day_runs(day), GONE, json.dumps(new_record("gone", '"p"', "2026-11-26T03:00:00+00:00",
                                                                    GONE, state="blocked")))
    # Stale entries: running (a queued run), waiting (a queued run whose job is queued),
    # left (a job its run's record no longer names).
    connection.hset(keys.running, listed_by_mistake, DAY)
    connection.hset(keys.day_waiting(day), broken.run_id, Parked("broken", '"x"', broken.slot.isoformat(),
                                                                broken.run_id).to_json())
    stale_left = f"{left_behind}-r5"
    connection.zadd(keys.left, {stale_left: 0})
    connection.hset(keys.left_info, stale_left, json.dumps({"run_id": left_behind, "day": DAY, "task": "numbers"}))
    # queued_finished: the same run is in the day's finished set (BEGIN will skip its job).
    connection.sadd(keys.day_finished(day), left_behind)
    # Not a problem: a queued run whose job a worker left for another table (due later).
    unqueue(in_left)
    connection.zadd(keys.left, {in_left: 10 ** 13})
    connection.hset(keys.left_info, in_left, json.dumps({"run_id": in_left, "day": DAY, "task": "numbers"}))

    expected = {(lost, "queued_unbacked"), (jobless, "queued_unbacked"), (dead, "running_unclaimed"),
                (alive, "running_unlisted"), (unparked, "waiting_unbacked"), (GONE, "waiting_unbacked"),
                (listed_by_mistake, "running_entry_stale"), (broken.run_id, "waiting_entry_stale"),
                (left_behind, "left_stale"), (left_behind, "queued_finished")}
    text = run_cli(["doctor", "--date", DAY], node_env)
    assert text.returncode == 1, text.stdout + text.stderr
    assert f"{DAY}: {len(expected)} problems" in text.stdout
    for run_id, kind in expected:
        assert any(line.startswith(f"{kind}  {run_id} ") for line in text.stdout.splitlines()), (kind, run_id)
    assert "run doctor --repair" in text.stdout and in_left not in text.stdout

    code, report = doctor_json(node_env)
    assert code == 1 and report["date"] == DAY and report["repaired"] is False
    found = kinds_of(report)
    assert set(found) == expected, (text.stdout, report["problems"])  # both calls' findings, should this fail
    assert all(set(p) == {"run_id", "kind", "state", "job_id", "detail", "repair"} for p in report["problems"])
    assert found[(lost, "queued_unbacked")]["repair"] == f"push job {lost} back to the front of the queue"
    assert "RQ's job hash is gone" in found[(jobless, "queued_unbacked")]["repair"]
    assert found[(dead, "running_unclaimed")]["state"] == "running"
    assert found[(left_behind, "left_stale")]["job_id"] == stale_left

    code, repaired = doctor_json(node_env, "--repair")
    assert code == 1 and repaired["repaired"] is True
    outcomes = {key: p["outcome"] for key, p in kinds_of(repaired).items()}
    assert outcomes == {(lost, "queued_unbacked"): "requeued", (jobless, "queued_unbacked"): "failed",
                        (dead, "running_unclaimed"): "listed", (alive, "running_unlisted"): "listed",
                        (unparked, "waiting_unbacked"): "parked", (GONE, "waiting_unbacked"): "failed",
                        (listed_by_mistake, "running_entry_stale"): "removed",
                        (broken.run_id, "waiting_entry_stale"): "removed", (left_behind, "left_stale"): "removed",
                        (left_behind, "queued_finished"): "finished"}

    # What each repair left behind.
    assert queue.job_ids[0] == lost
    failed = record_of(connection, keys, jobless)
    assert failed["state"] == "failed" and "RQ's job hash is gone" in failed["error"]
    assert "no task gone" in record_of(connection, keys, GONE)["error"]
    assert connection.hget(keys.running, alive) == DAY.encode()
    assert not connection.hexists(keys.running, listed_by_mistake)
    assert not connection.hexists(keys.day_waiting(day), broken.run_id)
    assert connection.zscore(keys.left, stale_left) is None and not connection.hexists(keys.left_info, stale_left)
    assert connection.zscore(keys.left, in_left) is not None
    # The leader's recovery takes the listed dead run over (its one attempt used: failed);
    # its release sends the parked run.
    assert AbandonedRuns(connection, keys, queue, table, settings.retention_s).requeue(None) == []
    assert "executing process lost on node ghost" in record_of(connection, keys, dead)["error"]
    assert release_ready(connection, keys, queue, table, day, retention_s=settings.retention_s).released == [unparked]
    DailySimpleWorker(connection=connection, settings=settings, table=table).work(burst=True)
    for run_id in (lost, listed_by_mistake, unparked, left_behind):  # the last one by doctor: its job is skipped
        assert record_of(connection, keys, run_id)["state"] == "finished", run_id
    assert record_of(connection, keys, broken.run_id)["state"] == "failed"  # it raises; run once, not twice
    assert record_of(connection, keys, dead)["state"] == "failed"
    starts = starts_per_param(executions(connection, prefix))
    assert (starts['"任务参数0"'], starts['"任务参数2"'], starts["2.5"]) == (1, 0, 0)

    again = run_cli(["doctor", "--date", DAY], node_env)
    assert again.returncode == 0, again.stdout
    assert "no problems" in again.stdout


def test_a_clean_day_exits_0_and_bad_input_is_one_line(node_env, connection, settings, table):
    dailyq.trigger(connection, DAY, settings=settings, table=table)
    code, report = doctor_json(node_env)
    assert (code, report) == (0, {"date": DAY, "problems": [], "repaired": False})
    assert dailyq.doctor(connection, DAY, settings=settings, table=table)["problems"] == []
    assert dailyq.doctor is dailyq.api.doctor  # still the function once its module is imported
    assert_clean_error(run_cli(["doctor", "--date", "garbage"], node_env), 2, "bad date 'garbage'", "YYYY-MM-DD")


def test_a_repair_leaves_a_record_that_changed_since_it_was_read_alone(connection, settings, table):
    keys, day = settings.keys, date.fromisoformat(DAY)
    dailyq.trigger(connection, DAY, "sample", settings=settings, table=table)
    queue = make_queue(connection, keys)
    first, second = (run.run_id for run in runs_on(table, day, ["sample"])[:2])
    connection.lrem(queue.key, 0, first)
    connection.hset(keys.running, second, DAY)
    problems = doctor.find_problems(doctor.read(connection, keys, queue, day, ["sample"]))
    assert [(p.run_id, p.kind) for p in problems] == [(first, "queued_unbacked"), (second, "running_entry_stale")]
    # Meanwhile both runs move on: the first begins elsewhere, the second is claimed for real.
    edit(connection, keys, first, state="running", owner="other")
    edit(connection, keys, second, state="running", owner="other")
    for problem in problems:
        outcome = doctor.repair(connection, keys, queue, day, problem, retention_s=60, now_iso="2026-11-26T05:00:00Z")
        assert outcome == doctor.CHANGED
    assert first not in queue.job_ids and record_of(connection, keys, first)["state"] == "running"
    assert connection.hget(keys.running, second) == DAY.encode()


# -- the pure core ------------------------------------------------------------------------------

def rec(state: str, job: str | None, task: str = "t", **extra) -> dict:
    return {**new_record(task, '"p"', "2026-11-26T03:00:00+00:00", job, state=state), **extra}


def entry(job: str) -> str:
    return Parked("t", '"p"', "2026-11-26T03:00:00+00:00", job).to_json()


def test_the_core_names_each_kind_from_plain_data_and_leaves_backed_runs_alone():
    day = date.fromisoformat(DAY)
    backed = {name: rec("queued", name) for name in ("q-queue", "q-inter", "q-started", "q-retry", "q-delayed",
                                                     "q-held", "q-left", "q-waits")}
    records = {
        **backed,
        "f-in-queue": rec("finished", "f-in-queue"),  # a finished run's job still queued: BEGIN skips it
        "q-lost": rec("queued", "q-lost"), "q-paused": rec("queued", "q-paused", task="p"),
        "q-gone": rec("queued", "q-gone"), "q-nojob": rec("queued", None),
        "r-listed": rec("running", "r-listed"), "r-lost": rec("running", "r-lost", owner="o"),
        "r-unlisted": rec("running", "r-unlisted", owner="o"),
        "w-ok": rec("waiting", "w-ok"), "w-park": rec("waiting", "w-park"), "w-fail": rec("blocked", "w-fail"),
        "w-pushed": rec("waiting", "w-pushed"), "w-other": rec("waiting", "w-other"),
        "r-stale": rec("finished", "r-stale"), "w-stale": rec("failed", "w-stale"),
        "l-done": rec("finished", "l-done"), "l-moved": rec("queued", "l-moved-r2"),
        "q-finished": rec("queued", "q-finished"), "q-forced": rec("queued", "q-forced-r1"),
    }
    in_queue = {"q-queue", "q-gone", "f-in-queue", "w-pushed", "l-moved-r2", "q-finished", "q-forced-r1"}
    snap = doctor.Snapshot(
        day=day, records=records, queue=in_queue, intermediate={"q-inter"}, started={"q-started"},
        scheduled={"q-retry"}, delayed={"q-delayed"}, held={"t": {"q-held"}}, paused={"p"},
        left={"q-left", "l-done", "l-moved", "elsewhere"},
        left_info={"q-left": json.dumps({"run_id": "q-left", "day": DAY}),
                   "l-done": json.dumps({"run_id": "l-done", "day": DAY}),
                   "l-moved": json.dumps({"run_id": "l-moved", "day": DAY}),
                   "elsewhere": json.dumps({"run_id": "x", "day": "2026-11-25"})},
        claims={"r-unlisted"},
        running={"r-listed": DAY, "r-stale": DAY, "r-norecord": DAY, "other-day": "2026-11-25"},
        waiting={"q-waits": entry("q-waits"), "w-ok": entry("w-ok"), "w-other": entry("w-other-r1"),
                 "w-stale": entry("w-stale"), "no-record": entry("no-record")},
        jobs={job for job in (*backed, *in_queue, "q-lost", "q-paused", "w-park") if job != "q-gone"},
        finished_runs={"q-finished", "q-forced", "f-in-queue"}, forced={"q-forced-r1"})
    problems = doctor.find_problems(snap, lambda run_id, record: "PARKED" if run_id in ("w-park", "w-other") else None)
    found = {(p.run_id, p.kind): p for p in problems}
    assert set(found) == {
        ("q-lost", "queued_unbacked"), ("q-paused", "queued_unbacked"), ("q-gone", "queued_unbacked"),
        ("q-nojob", "queued_unbacked"), ("q-finished", "queued_finished"), ("r-lost", "running_unclaimed"),
        ("r-unlisted", "running_unlisted"),
        ("w-park", "waiting_unbacked"), ("w-fail", "waiting_unbacked"), ("w-pushed", "waiting_unbacked"),
        ("w-other", "waiting_unbacked"), ("r-stale", "running_entry_stale"), ("r-norecord", "running_entry_stale"),
        ("w-stale", "waiting_entry_stale"), ("l-done", "left_stale"), ("l-moved", "left_stale")}
    requeue = found[("q-lost", "queued_unbacked")].fix
    assert isinstance(requeue, doctor.Requeue) and requeue.job_id == "q-lost"
    assert found[("q-paused", "queued_unbacked")].state == "paused"
    assert "RQ's job hash is gone" in found[("q-gone", "queued_unbacked")].detail
    assert isinstance(found[("q-nojob", "queued_unbacked")].fix, doctor.Settle)
    assert found[("q-finished", "queued_finished")].fix == doctor.Settle("finished")
    assert found[("r-lost", "running_unclaimed")].fix == doctor.ListRunning("o")
    assert found[("w-park", "waiting_unbacked")].fix == doctor.Park("PARKED")
    assert found[("w-other", "waiting_unbacked")].fix == doctor.Park("PARKED", old=entry("w-other-r1"))
    assert found[("w-fail", "waiting_unbacked")].fix.state == "failed"  # type: ignore[union-attr]
    assert found[("w-pushed", "waiting_unbacked")].fix == doctor.Settle("queued")
    assert found[("r-norecord", "running_entry_stale")].state is None
    assert found[("l-moved", "left_stale")].job_id == "l-moved"
    assert [p.kind for p in problems] == sorted((p.kind for p in problems), key=doctor.KINDS.index)


def test_a_problem_is_kept_only_when_a_second_look_sees_it_too():
    def problem(run_id: str) -> doctor.Problem:
        return doctor.Problem(run_id, "queued_unbacked", "queued", run_id, "", "", doctor.Requeue(run_id, ""),
                              read_state="queued", read_job=run_id)

    looks = iter([[problem("a"), problem("b")], [problem("b"), problem("c")]])
    assert [p.run_id for p in doctor.confirmed(lambda: next(looks))] == ["b"]  # "a" was a job between two places
    assert doctor.confirmed(lambda: []) == []

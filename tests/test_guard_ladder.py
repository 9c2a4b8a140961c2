"""bench/guard_ladder.py: every rung's BEGIN and FINISH run on a real Redis with the
worker's own arguments and answer as the real scripts do, so bench/guard_cost.py measures
what it says (a rung that errored would look cheap)."""

import pytest

from bench.guard_ladder import RUNGS, scripts
from dailyq.runs import Run
from dailyq.schedule import Slot
from dailyq.scripts import Scripts, lifecycle
from dailyq.table import Task
from dailyq.worker.guard import Guard


@pytest.mark.parametrize("rung", RUNGS)
def test_each_rung_claims_finishes_and_refuses_a_second_copy(rung, connection, keys, monkeypatch) -> None:
    begin_lua, finish_lua = scripts(rung)
    monkeypatch.setattr(lifecycle, "BEGIN", begin_lua)
    monkeypatch.setattr(lifecycle, "FINISH", finish_lua)
    guard = Guard(connection, keys, "n1", claim_ttl_s=30, retention_s=3600)
    guard.scripts = Scripts(connection)  # registered afresh with the rung's bodies
    task = Task(name="noop", func="bench.noop.noop", params=[7], at="03:00", retries=2)
    run = Run(task, 7, Slot.from_iso("2026-01-05T03:00:00+00:00", "UTC")).job("job-1")
    first, second = guard.attempt(run), guard.attempt(run)
    assert guard._begin_call(first).run().outcome == "claimed"
    assert guard._begin_call(second).run().outcome == "busy"  # one copy at a time, on every rung
    assert guard._finish_call(first, 0.01).run() is True
    assert connection.exists(keys.claim(run.run_id)) == 0
    again = guard._begin_call(guard.attempt(run)).run().outcome
    assert again == ("claimed" if rung == "claim" else "finished")  # dedup from the second rung on
    recorded = connection.hexists(keys.day_runs(run.day), run.run_id)
    assert recorded == (rung in ("record", "full"))

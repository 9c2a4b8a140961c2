"""The one run identity (Run, RunJob) and the one record schema (RunRecord)."""

import importlib
import pkgutil
import re
from datetime import date
from types import ModuleType

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

import dailyq.scripts
from dailyq.runs import (
    PUBLIC_RUN_FIELDS,
    RECORD_FIELDS,
    RunJob,
    StaleJob,
    decode_records,
    new_record,
    runs_on,
    slot_runs_on,
)
from dailyq.table import Task, TaskTable
from tests.tables.sample_tasks import record

DAY = date(2026, 3, 29)  # Europe/Berlin springs forward: slot offsets differ within the day


def table(params=("a", {"k": "値"}), at="01:30", tz="Europe/Berlin") -> TaskTable:
    return TaskTable([Task(name="t", func=record, params=list(params), at=at, tz=tz, retries=3)])


def job_of(connection, run_job: RunJob) -> Job:
    """A real RQ job as fan-out makes it, saved and read back as a worker would."""
    job = Job.create(run_job.run.task.func_path, args=(run_job.run.param,), id=run_job.job_id,
                     meta=run_job.meta(), connection=connection, serializer=JSONSerializer)
    job.save()
    return Job.fetch(run_job.job_id, connection=connection, serializer=JSONSerializer)


def test_a_job_carries_its_run_and_the_worker_rebuilds_the_same_run(connection):
    for run in runs_on(table(), DAY):
        sent = run.job(run.job_id(2), force=True, rerun_id=run.job_id(2))
        received = RunJob.from_job(job_of(connection, sent), table())
        assert received == sent
        assert (received.run_id, received.series, received.day, received.param_json) == (
            run.run_id, run.series_id, DAY, run.param_json)
        assert received.max_attempts == 4 and received.context_run_id == run.job_id(2)


def test_a_job_the_table_no_longer_describes_is_refused_by_name(connection):
    run = runs_on(table(), DAY)[0]
    job = job_of(connection, run.job(run.job_id()))
    with pytest.raises(StaleJob, match=f"job {run.run_id}: its run is not one of the task table's"):
        RunJob.from_job(job, TaskTable([Task(name="other", func=record, params=["a"], at="01:30")]))
    job.meta["dailyq"]["run_id"] = "t-20260329T013000-000000000000"  # written by hand, say
    with pytest.raises(StaleJob, match="does not match its task, slot and param"):
        RunJob.from_job(job, table())


def test_an_ad_hoc_job_has_no_run(connection):
    job = Job.create("tests.tables.sample_tasks.record", args=("a",), connection=connection, serializer=JSONSerializer)
    assert RunJob.from_job(job, table()) is None


def script_modules() -> list[ModuleType]:
    """Every module of the dailyq.scripts package: the Lua of each concern lives in its own."""
    return [importlib.import_module(f"dailyq.scripts.{info.name}")
            for info in pkgutil.iter_modules(dailyq.scripts.__path__)]


def test_every_field_the_scripts_set_is_in_the_record_schema():
    lua = "\n".join(value for module in script_modules() for name, value in vars(module).items()
                    if name.isupper() and isinstance(value, str))
    set_in_lua = set(re.findall(r"\brecord\.([a-z_]+)", lua))
    assert set_in_lua, "no record fields found: did the scripts change how they name records?"
    assert set_in_lua <= set(RECORD_FIELDS), set_in_lua - set(RECORD_FIELDS)


def test_new_records_and_the_public_view_use_the_schema():
    assert set(new_record("t", '"a"', "2026-03-29T01:30:00+01:00", None)) <= set(RECORD_FIELDS)
    assert set(PUBLIC_RUN_FIELDS) <= set(RECORD_FIELDS)


def mixed_table() -> TaskTable:
    return TaskTable([Task(name="t", func=record, params=["a", {"k": "値"}, 3, [1, 2]], at="01:30",
                           tz="Europe/Berlin"),
                      Task(name="c", func=record, params=list(range(5)), cron="0 */6 * * *", tz="UTC"),
                      Task(name="u", func=record, params=[None, True, 2.5], at="00:00", tz="UTC")])


def test_slot_runs_name_the_same_runs_in_the_same_order_as_runs_on():
    table_ = mixed_table()
    grouped = [(group.task.name, group.slot, param, encoded, run_id) for group in slot_runs_on(table_, DAY)
               for param, encoded, run_id in zip(group.params, group.params_json, group.run_ids)]
    assert grouped == [(run.task.name, run.slot, run.param, run.param_json, run.run_id)
                       for run in runs_on(table_, DAY)]
    assert len(grouped) == 4 + 5 * 4 + 3


def test_status_shows_a_run_without_a_record_as_its_new_record_with_its_param():
    from datetime import datetime, timezone

    from dailyq.ops.status import _public, shown_runs

    table_ = mixed_table()
    now = datetime(2026, 3, 29, 12, 0, tzinfo=timezone.utc)
    shown = shown_runs(table_, DAY, now, {}, (), None, None)
    expected = []
    for run in runs_on(table_, DAY):
        state = "missed" if (now - run.slot.fires_at).total_seconds() > run.task.misfire_grace_s else "scheduled"
        entry = dict(run.new_record(job_id=None, state=state), param=run.param)
        expected.append(_public(run.run_id, entry))  # type: ignore[arg-type]
    assert shown == expected
    assert {state for state in (entry["state"] for entry in shown)} == {"missed", "scheduled"}
    assert all(list(entry) == [*PUBLIC_RUN_FIELDS, "run_id"] for entry in shown)


def test_a_days_records_decode_as_one_array_as_they_would_one_by_one():
    import json

    records = {f"t-{i}".encode(): json.dumps(new_record("t", json.dumps(i), "2026-03-29T01:30:00+02:00", None),
                                             ensure_ascii=False).encode()
               for i in range(5)}
    records[b"t-k"] = json.dumps({"task": "t", "param_json": '{"k":"値"}', "note": "a,b]"}, ensure_ascii=False).encode()
    one_by_one = {key.decode(): json.loads(value) for key, value in records.items()}
    assert decode_records(records) == one_by_one and decode_records({}) == {}
    # A field that is not one JSON object is decoded on its own: what parses stays, what does not raises.
    assert decode_records({**records, b"odd": b"[1, 2]"}) == {**one_by_one, "odd": [1, 2]}
    with pytest.raises(ValueError):
        decode_records({**records, b"bad": b'{"x": 1}, {"y": 2}'})


def test_status_shows_a_recorded_run_as_the_public_fields_of_its_record():
    import json
    from datetime import datetime, timezone

    from dailyq.ops.status import _public, shown_runs

    table_ = mixed_table()
    runs = runs_on(table_, DAY)
    records = {}
    for index, run in enumerate(runs):
        stored = dict(run.new_record(job_id=run.run_id, state="finished" if index % 2 else "queued"))
        stored.update(attempts=None if index % 3 == 0 else index, duration_s=index / 4, extra="not shown")
        records[run.run_id] = json.loads(json.dumps(stored))  # as status reads them: no param yet
    records["gone-20260329T013000-0123456789ab"] = {**records[runs[0].run_id], "task": "gone"}
    expected = [_public(run.run_id, dict(records[run.run_id], param=run.param)) for run in runs]
    expected.append(_public("gone-20260329T013000-0123456789ab",
                            dict(records["gone-20260329T013000-0123456789ab"], param=runs[0].param)))
    shown = shown_runs(table_, DAY, datetime(2026, 3, 29, 12, 0, tzinfo=timezone.utc), records, (), None, None)
    assert shown == expected
    assert {type(entry["param"]) for entry in shown} == {str, dict, int, list, bool, float, type(None)}


def test_run_ids_that_do_not_join_are_decoded_one_by_one():
    assert decode_records({b"a\nb": b'{"x": 1}', b"c": b'{"y": 2}'}) == {"a\nb": {"x": 1}, "c": {"y": 2}}
    assert decode_records({"a": '{"x": 1}'}) == {"a": {"x": 1}}

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
from dailyq.runs import PUBLIC_RUN_FIELDS, RECORD_FIELDS, RunJob, StaleJob, new_record, runs_on
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

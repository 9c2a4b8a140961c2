"""Task table validation: each bad entry gives one error naming the task."""

import pytest

from dailyq.errors import ConfigError
from dailyq.table import Task, TaskTable, load_table
from tests.tables.sample_tasks import record


def table_of(**overrides) -> TaskTable:
    fields = dict(name="t", func=record, params=["a"], at="09:00")
    fields.update(overrides)
    return TaskTable([Task(**fields)])


def test_a_valid_table_loads_and_lists_its_functions():
    table = load_table("tests.tables.sample_tasks")
    assert "tests.tables.sample_tasks.record" in table.allowed_functions
    assert table.get("sample").func_path == "tests.tables.sample_tasks.record"


def test_func_may_be_a_dotted_path():
    assert table_of(func="tests.tables.sample_tasks.record").get("t").resolve() is record


@pytest.mark.parametrize("overrides, message", [
    (dict(name="bad name"), "name must match"),
    (dict(at="25:00"), "bad at"),
    (dict(at=None, cron="0 9 * *"), "bad cron"),
    (dict(at=None), "exactly one of"),
    (dict(tz="Nowhere/City"), "unknown time zone"),
    (dict(params=[object()]), "not JSON-serializable"),
    (dict(params=[(1, 2)]), "JSON round trip"),
    (dict(params=[{1: "a"}]), "JSON round trip"),
    (dict(params=["a", "a"]), "listed twice"),
    (dict(params="abc"), "cannot import params 'abc'"),
    (dict(params="tests.tables.sample_tasks.missing_params"), "has no attribute"),
    (dict(params=42), "params must be a list or a callable"),
    (dict(after="ingest"), "after must be a list of task names"),
    (dict(after=["t"]), "after names the task itself"),
    (dict(after=["nope"]), "after names unknown task 'nope'"),
    (dict(max_running=0), "max_running must be a positive integer"),
    (dict(max_per_node=True), "max_per_node must be a positive integer"),
    (dict(func="no_such_module.fn"), "cannot import func"),
    (dict(func="tests.tables.sample_tasks.missing"), "has no attribute"),
    (dict(timeout_s=0), "timeout_s"),
    (dict(retries=-1), "retries"),
    (dict(overlap="sometimes"), "overlap"),
    (dict(deadline="24:00"), "bad deadline='24:00'"),
    (dict(deadline=930), "bad deadline=930"),
])
def test_bad_entries_name_the_task_and_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        table_of(**overrides)
    assert "task " in str(error.value)


def test_a_deadline_is_read_like_at():
    assert table_of(deadline="17:30").get("t").deadline == "17:30"
    assert table_of(deadline="17:30:15").get("t").deadline == "17:30:15"
    assert table_of().get("t").deadline is None


def test_duplicate_names_are_refused():
    task = dict(func=record, params=["a"], at="09:00")
    with pytest.raises(ConfigError, match="'t': name is used twice"):
        TaskTable([Task(name="t", **task), Task(name="t", **task)])


def test_non_ascii_params_are_fine():
    assert table_of(params=["任务参数1", {"キー": "値"}]).get("t").params == ["任务参数1", {"キー": "値"}]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'nope' \\(known: t\\)"):
        table_of().get("nope")


def test_missing_module_or_tasks_attribute():
    with pytest.raises(ConfigError, match="cannot import task table module"):
        load_table("no_such_tasks_module")
    with pytest.raises(ConfigError, match="has no list TASKS"):
        load_table("tests.support.helpers")


def test_after_names_tasks_of_the_table_without_cycles():
    ok = dict(func=record, params=["a"], at="09:00")
    table = TaskTable([Task(name="ingest", **ok), Task(name="report", after=["ingest"], **ok)])
    assert table.get("report").after == ["ingest"]
    with pytest.raises(ConfigError, match="tasks 'a' -> 'b' -> 'a': a cycle in after"):
        TaskTable([Task(name="a", after=["b"], **ok), Task(name="b", after=["a"], **ok)])


def days_params(day):
    return [day.isoformat(), "all"]


def test_params_may_be_a_callable_or_its_dotted_path_computed_per_day():
    from datetime import date
    by_callable = table_of(params=days_params).get("t")
    by_path = table_of(params="tests.test_table.days_params").get("t")
    for task in (by_callable, by_path):
        assert task.params_computed
        assert task.compute_params(date(2026, 3, 1)) == ["2026-03-01", "all"]
    assert not table_of().get("t").params_computed
    assert table_of().get("t").compute_params(date(2026, 3, 1)) == ["a"]


@pytest.mark.parametrize("produce, message", [
    (lambda day: 1 / 0, "raised ZeroDivisionError: division by zero"),
    (lambda day: "a,b", "returned str, not a list"),
    (lambda day: [object()], "not JSON-serializable"),
    (lambda day: ["x", "x"], "listed twice"),
])
def test_a_params_callable_that_fails_or_returns_a_bad_list_is_a_clear_error(produce, message):
    from datetime import date
    with pytest.raises(ValueError, match=message):
        table_of(params=produce).get("t").compute_params(date(2026, 3, 1))

"""Task table validation: each bad entry gives one error naming the task."""

import pytest

from dailyq.errors import ConfigError
from dailyq.table import Task, TaskTable, load_table
from tests.sample_tasks import record


def table_of(**overrides) -> TaskTable:
    fields = dict(name="t", func=record, params=["a"], at="09:00")
    fields.update(overrides)
    return TaskTable([Task(**fields)])


def test_a_valid_table_loads_and_lists_its_functions():
    table = load_table("tests.sample_tasks")
    assert "tests.sample_tasks.record" in table.allowed_functions
    assert table.get("sample").func_path == "tests.sample_tasks.record"


def test_func_may_be_a_dotted_path():
    assert table_of(func="tests.sample_tasks.record").get("t").resolve() is record


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
    (dict(params="abc"), "params must be a list"),
    (dict(func="no_such_module.fn"), "cannot import func"),
    (dict(func="tests.sample_tasks.missing"), "has no attribute"),
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
        load_table("tests.helpers")

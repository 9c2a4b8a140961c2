"""fingerprint.py: tables described, fingerprinted and compared (pure)."""

from __future__ import annotations

from dailyq.fingerprint import describe, diff, diff_text, fingerprint, has_run, is_empty, task_digest
from dailyq.table import Task, TaskTable

FUNC = "tests.tables.sample_tasks.record"


def table(*tasks: Task) -> TaskTable:
    return TaskTable(list(tasks))


def test_equal_tables_have_equal_fingerprints_and_any_change_changes_it():
    a = table(Task("hb", FUNC, ["p1", "p2"], at="03:00"))
    b = table(Task("hb", FUNC, ["p1", "p2"], at="03:00"))
    assert fingerprint(describe(a)) == fingerprint(describe(b))
    assert len(fingerprint(describe(a))) == 12
    for changed in (Task("hb", FUNC, ["p1", "p3"], at="03:00"), Task("hb", FUNC, ["p1", "p2"], at="04:00"),
                    Task("hb", FUNC, ["p1", "p2"], at="03:00", tz="Europe/Berlin"),
                    Task("hb", FUNC, ["p1", "p2"], at="03:00", max_running=2)):
        assert fingerprint(describe(table(changed))) != fingerprint(describe(a))
        assert task_digest(changed) != task_digest(a.tasks[0])


def test_has_run_names_what_the_table_lacks():
    description = describe(table(Task("hb", FUNC, ["p1"], at="03:00"),
                                 Task("computed", FUNC, "tests.tables.computed_tasks.day_params", at="03:00")))
    assert has_run(description, "hb", '"p1"', FUNC) is None
    assert has_run(description, "hb", '"p1"', None) is None
    assert has_run(description, "nt", '"n1"', FUNC) == "no task 'nt'"
    assert has_run(description, "hb", '"p7"', FUNC) == "task 'hb' has no param \"p7\""
    assert has_run(description, "hb", '"p1"', "os.system") == f"task 'hb' runs {FUNC}, not os.system"
    assert has_run(description, "computed", '"anything"', FUNC) is None  # computed params: any


def test_diff_names_tasks_params_schedules_and_other_fields():
    v1 = describe(table(Task("hb", FUNC, ["p1", "p2"], at="03:00"), Task("gone", FUNC, ["x"], at="03:00")))
    v2 = describe(table(Task("hb", FUNC, ["p1", "p3"], at="05:00", max_running=1), Task("nt", FUNC, ["n"], at="03:00")))
    found = diff(v1, v2)
    assert found["tasks_added"] == ["nt"] and found["tasks_removed"] == ["gone"]
    assert found["params"] == {"hb": {"added": ['"p3"'], "removed": ['"p2"']}}
    assert found["schedules"] == {"hb": {"from": "at 03:00:00 UTC", "to": "at 05:00:00 UTC"}}
    assert found["other"] == {"hb": ["max_running"]}
    assert diff_text(found) == ('task nt added; task gone removed; hb: params +"p3" -"p2"; '
                                'hb: at 03:00:00 UTC -> at 05:00:00 UTC; hb: max_running changed')
    assert is_empty(diff(v1, v1)) and diff_text(diff(v1, v1)) == "no difference"

"""The ``tables`` view and its texts (table_skew.py, render.py, watch.py, report.py,
health.py, the tables_differ alert): pure, fixed tables and times."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from dailyq.alerts.events import PAYLOAD_KEYS, TABLES_DIFFER, encode_payload, tables_differ_alert
from dailyq.fingerprint import describe, fingerprint
from dailyq.ops.health import judge
from dailyq.ops.render import render_table, render_tables
from dailyq.ops.report import render_report
from dailyq.ops.table_skew import LEADER, THIS_PROCESS, difference_id, differing_tables, lease_node, tables_view, who
from dailyq.ops.watch import progress, render_line
from dailyq.table import Task, TaskTable

NOW = datetime(2026, 11, 27, 1, 0, tzinfo=timezone.utc)
NOW_MS = int(NOW.timestamp() * 1000)
FUNC = "tests.tables.sample_tasks.record"


def described(*tasks: Task):
    description = describe(TaskTable(tasks))
    return fingerprint(description), description


V1 = described(Task(name="hb", func=FUNC, params=["p1", "p2"], at="03:00"),
               Task(name="old", func=FUNC, params=["x"], at="05:00"))
V2 = described(Task(name="hb", func=FUNC, params=["p1", "p2", "p7", "p8"], at="03:30"),
               Task(name="nt", func=FUNC, params=["y"], at="04:00"))
DESCRIPTIONS = {V1[0]: V1[1], V2[0]: V2[1]}


def process(node: str, role: str, table: str | None) -> dict:
    return {"node": node, "role": role, "table": table}


MIXED = [process("new", "scheduler", V2[0]), process("new", "worker", V2[0]),
         process("old", "scheduler", V1[0]), process("old", "worker", V1[0])]


def test_a_node_on_another_table_is_a_difference_from_the_leaders_with_what_differs():
    first_ms = NOW_MS - 60_000
    view = tables_view(MIXED, leader_node="new", own_table=V1[0], descriptions=DESCRIPTIONS,
                       first_seen_ms={difference_id(V2[0], V1[0]): first_ms})
    assert view["same"] is False
    assert (view["reference"], view["reference_from"]) == (V2[0], LEADER)  # the leader's, not ours (V1)
    assert view["by_table"] == {V1[0]: ["old/scheduler", "old/worker"], V2[0]: ["new/scheduler", "new/worker"]}
    assert view["unknown"] == []
    [difference] = view["differences"]
    # What the other table changes from the reference: old lacks nt and p7/p8, has "old", fires hb earlier.
    assert difference["table"] == V1[0] and difference["nodes"] == ["old"]
    assert difference["processes"] == ["old/scheduler", "old/worker"]
    assert difference["tasks_added"] == ["old"] and difference["tasks_removed"] == ["nt"]
    assert difference["params"] == {"hb": {"added": [], "removed": ['"p7"', '"p8"']}}
    assert difference["schedules"] == {"hb": {"from": "at 03:30:00 UTC", "to": "at 03:00:00 UTC"}}
    assert difference["other"] == {}
    assert difference["text"] == ('task old added; task nt removed; hb: params -"p7" -"p8"; '
                                  "hb: at 03:30:00 UTC -> at 03:00:00 UTC")
    assert difference["since"] == "2026-11-27T00:59:00+00:00"
    assert difference["id"] == difference_id(V1[0], V2[0])  # one id, whichever table is the reference


def test_one_table_everywhere_is_same_and_without_a_leader_the_reference_is_ours():
    alike = [process("a", "scheduler", V1[0]), process("b", "worker", V1[0])]
    view = tables_view(alike, leader_node=None, own_table=V1[0], descriptions={})
    assert view == {"same": True, "reference": V1[0], "reference_from": THIS_PROCESS,
                    "by_table": {V1[0]: ["a/scheduler", "b/worker"]}, "differences": [], "unknown": []}
    # A leader whose scheduler has no live heartbeat: still this process's table.
    assert tables_view(alike, leader_node="gone", own_table=V2[0], descriptions=DESCRIPTIONS)["reference_from"] \
        == THIS_PROCESS


def test_processes_of_older_versions_and_unpublished_tables_are_unknown_not_differences():
    live = [process("new", "scheduler", V2[0]), process("v0", "worker", None),
            process("odd", "worker", "0123456789ab")]
    view = tables_view(live, leader_node="new", own_table=V2[0], descriptions=DESCRIPTIONS)
    assert view["differences"] == []
    assert view["unknown"] == ["odd/worker", "v0/worker"]
    assert view["same"] is False  # a live process names another table, even if nothing more is known
    without_old_ones = tables_view(live[:2], leader_node="new", own_table=V2[0], descriptions=DESCRIPTIONS)
    assert without_old_ones["same"] is True and without_old_ones["unknown"] == ["v0/worker"]


def test_differing_tables_and_the_lease_node():
    assert differing_tables(MIXED, V2[0]) == {difference_id(V1[0], V2[0]): V1[0]}
    assert differing_tables(MIXED[:2], V2[0]) == {}
    assert lease_node(b'{"node": "n1", "token": "x"}') == "n1"
    assert lease_node(None) is None and lease_node(b"junk") is None
    assert who(["a/scheduler", "a/worker", "b/worker"]) == "a (scheduler, worker), b (worker)"


def view_with_since(age_s: float) -> dict:
    return tables_view(MIXED, leader_node="new", own_table=V2[0], descriptions=DESCRIPTIONS,
                       first_seen_ms={difference_id(V1[0], V2[0]): NOW_MS - int(age_s * 1000)})


def test_status_text_watch_line_and_report_name_the_node_and_the_difference():
    view = view_with_since(30)
    line = (f"tables differ: old (scheduler, worker) runs table {V1[0]}, not the leader's {V2[0]} since "
            f"2026-11-27T00:59:30+00:00: task old added; task nt removed; hb: params -\"p7\" -\"p8\"; "
            "hb: at 03:30:00 UTC -> at 03:00:00 UTC")
    assert render_tables({"tables": view}) == [line]
    status = {"date": "2026-11-27", "leader": None, "runs": [], "generated_at": NOW.isoformat(), "tables": view}
    assert line in render_table(status).splitlines()
    assert render_tables({"tables": tables_view(MIXED[:2], leader_node="new", own_table=V2[0],
                                                descriptions=DESCRIPTIONS)}) == []
    watch = render_line(progress(status, {}, NOW))
    assert "| tables differ: old |" in watch, watch
    page = render_report(status)
    assert '<section class="tables-differ">' in page and "old (scheduler, worker) runs table" in page
    assert "task nt removed" in page and "&quot;p7&quot;" in page  # escaped
    assert '<section class="tables-differ">' not in render_report({**status, "tables": None})


BEATS = {"scheduler": '{"at": "2026-11-27T01:00:00+00:00", "pid": 1, "offset_s": 0.0}',
         "worker": '{"at": "2026-11-27T01:00:00+00:00", "pid": 2, "offset_s": 0.0}'}


def test_health_names_a_young_difference_and_fails_the_odd_node_only_once_it_is_old():
    young = judge("old", BEATS, NOW, tables=view_with_since(30), table_skew_alert_s=900)
    assert young.healthy, young.line
    assert f"; warning: tables differ: old (scheduler, worker) runs table {V1[0]}, not the leader's {V2[0]} for 30s: " \
        "task old added" in young.line
    old = judge("old", BEATS, NOW, tables=view_with_since(1000), table_skew_alert_s=900)
    assert not old.healthy
    assert old.line.startswith(f"unhealthy: tables differ: old (scheduler, worker) runs table {V1[0]}, not the "
                               f"leader's {V2[0]} for 1000s: task old added"), old.line
    assert "(longer than DAILYQ_TABLE_SKEW_ALERT_S=900s)" in old.line
    # The leader's node runs the reference: named, but a restart of it would not help.
    leader = judge("new", BEATS, NOW, tables=view_with_since(1000), table_skew_alert_s=900)
    assert leader.healthy and "warning: tables differ: old (scheduler, worker)" in leader.line
    # Not recorded by a leader yet: young, whatever the threshold.
    unrecorded = tables_view(MIXED, leader_node="new", own_table=V2[0], descriptions=DESCRIPTIONS)
    assert judge("old", BEATS, NOW, tables=unrecorded, table_skew_alert_s=1).healthy


def test_the_tables_differ_alert_names_nodes_tables_and_what_differs():
    view = view_with_since(1000)
    [difference] = view["differences"]
    alert = tables_differ_alert(view, difference, NOW_MS - 1_000_000, 900)
    assert alert.event == TABLES_DIFFER
    assert alert.alert_id == f"tables_differ:{difference['id']}:{NOW_MS - 1_000_000}"
    assert list(alert.payload) == list(PAYLOAD_KEYS)
    payload = alert.payload
    assert payload["text"].startswith(f"dailyq: tables differ for more than 15m00s (since 2026-11-27T00:43:20+00:00): "
                                      f"old (scheduler, worker) runs table {V1[0]}, not the leader's {V2[0]}: ")
    assert payload["at"] == "2026-11-27T00:58:20+00:00"  # since + the threshold
    tables = payload["tables"]
    assert tables["nodes"] == ["old"] and tables["reference"] == V2[0] and tables["table"] == V1[0]
    assert tables["diff"]["params"] == {"hb": {"added": [], "removed": ['"p7"', '"p8"']}}
    assert tables["since"] == "2026-11-27T00:43:20+00:00" and tables["text"] == difference["text"]
    assert '"tables": {' in encode_payload(payload)
    assert alert.day == (NOW - timedelta(seconds=1000)).date()

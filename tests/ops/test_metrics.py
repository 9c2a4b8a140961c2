"""The schedulers' /metrics as Prometheus scrapes it: separate scheduler processes with
their own ports, a real redis-server, the text parsed by prometheus_client's parser."""

from __future__ import annotations

import json
import urllib.request
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

from prometheus_client.parser import text_string_to_metric_families

from dailyq.keys import Keys
from dailyq.ops.metrics import runs_by_state
from dailyq.ops.render import summary
from dailyq.ops.status import day_status
from dailyq.redis_server import free_port
from dailyq.runs import STATES
from tests.support.helpers import noon_zone, run_cli, today_in, wait_for, wall_time_in


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """metric sample name -> {sorted label items: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def runs_of(samples: dict, task: str) -> dict[str, float]:
    return {dict(labels)["state"]: value for labels, value in samples.get("dailyq_runs", {}).items()
            if dict(labels)["task"] == task}


def settled(connection, prefix: str, day: str) -> bool:
    raw = connection.hvals(Keys(prefix).day_runs(date.fromisoformat(day)))
    return len(raw) == 3 and all(json.loads(r)["state"] in ("finished", "failed") for r in raw)


def test_two_schedulers_serve_the_same_cluster_figures_and_one_leader(node_env, processes, connection, prefix):
    zone = noon_zone()
    # Both schedulers up and scraped before the slot: a second on an idle machine, several
    # on one that runs other tests beside this one.
    slot = wall_time_in(zone, 12)
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_FUNC="fail_some", SAMPLE_FAIL="任务参数0", SAMPLE_PARAMS="3",
               SAMPLE_TZ=zone, SAMPLE_AT=slot, SAMPLE_SLEEP_S="0.3")
    ports = {"node-1": free_port(), "node-2": free_port()}
    for node, port in ports.items():
        processes.start("scheduler.py", dict(env, NODE_NAME=node, DAILYQ_METRICS_PORT=str(port)))
    day = today_in(zone)

    def leaders() -> list[float]:
        try:
            return [scrape(port)["dailyq_leader"][()] for port in ports.values()]
        except OSError:  # not listening yet
            return []

    wait_for(lambda: sorted(leaders()) == [0.0, 1.0], timeout=20, what="one leader among the two")
    before = scrape(ports["node-1"])
    assert wall_time_in(zone, 0) < slot, "starting two schedulers took until their slot: this machine was too slow"
    assert runs_of(before, "sample") == {**{s: 0.0 for s in STATES}, "scheduled": 3.0}

    processes.start("worker_entry.py", dict(env, NODE_NAME="worker"))
    wait_for(lambda: settled(connection, prefix, day), timeout=40, what="the slot's three runs to end")
    expected = {**{s: 0.0 for s in STATES}, "finished": 2.0, "failed": 1.0}
    for port in ports.values():  # cached for 5 s at most: wait for a fresh view
        wait_for(lambda port=port: runs_of(scrape(port), "sample") == expected, timeout=15, what="the runs by state")
    for port in ports.values():
        samples = scrape(port)
        assert samples["dailyq_redis_up"][()] == 1.0
        assert samples["dailyq_queue_jobs"][()] == 0.0
        fired_at = datetime.combine(date.fromisoformat(day), datetime.strptime(slot, "%H:%M:%S").time(),
                                    tzinfo=ZoneInfo(zone)).timestamp()
        assert samples["dailyq_slot_last_fired_timestamp_seconds"][(("task", "sample"),)] == fired_at
        assert samples["dailyq_run_duration_seconds_count"][(("task", "sample"),)] == 2.0
        assert 0.3 <= samples["dailyq_run_duration_seconds_sum"][(("task", "sample"),)] < 10
        buckets = {dict(k)["le"]: v for k, v in samples["dailyq_run_duration_seconds_bucket"].items()}
        assert buckets["1.0"] == 2.0 and buckets["+Inf"] == 2.0
        assert samples["dailyq_alert_outbox"] == {(("state", "pending"),): 0.0, (("state", "in_flight"),): 0.0}
        assert "process_resident_memory_bytes" in samples
        assert "dailyq_day_eta_timestamp_seconds" not in samples  # nothing pending: no estimate
    assert sorted(leaders()) == [0.0, 1.0]


def test_a_port_already_taken_is_one_line_and_exit_2(node_env):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli([], dict(node_env, DAILYQ_METRICS_PORT=str(port)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_runs_by_state_counts_as_status_does(connection, settings, table):
    from dailyq.commands import trigger
    from dailyq.worker.workers import make_queue

    day = date(2026, 11, 26)
    trigger(connection, settings.keys, make_queue(connection, settings.keys), table, day, ["sample"],
            settings.retention_s)
    now = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)  # numbers and broken: past their grace, missed
    status = day_status(connection, settings.keys, table, day, now)
    records = {k.decode(): json.loads(v) for k, v in connection.hgetall(settings.keys.day_runs(day)).items()}
    counted = runs_by_state(table.tasks, records, now)
    totals: dict[str, int] = {}
    for (_, state), n in counted.items():
        totals[state] = totals.get(state, 0) + n
    assert {state: n for state, n in totals.items() if n} == summary(status)
    assert counted[("sample", "queued")] == 4 and counted[("broken", "missed")] == 1


def test_the_grafana_dashboard_is_json_and_queries_only_metrics_we_serve():
    import re

    from dailyq.ops.metrics import Collector
    from tests.support.helpers import ROOT

    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name.removesuffix("_bucket") for e in exprs for name in re.findall(r"\b(dailyq_[a-z_]+)", e)}
    served = {family.name for family in Collector.describe(None)}  # type: ignore[arg-type]
    assert used <= served
    assert {"dailyq_leader", "dailyq_runs", "dailyq_queue_jobs", "dailyq_run_duration_seconds",
            "dailyq_slot_last_fired_timestamp_seconds"} <= used
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])

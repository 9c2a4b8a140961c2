"""Tables compared, end to end: two nodes as separate processes running different task
tables (tests/tables/sample_tasks.py with 6 params on node-new, 4 on node-old), a real
redis-server, a real webhook endpoint. ``status`` (text and --json), ``health``,
``/metrics`` and the ``tables_differ`` alert name node-old and what its table lacks."""

from __future__ import annotations

import json
import time

import pytest

from dailyq.redis_server import free_port
from tests.alerts.test_alerts import FAST_RETRIES
from tests.ops.test_metrics import scrape
from tests.support.helpers import quiet_sample_at, run_cli, wait_for
from tests.support.webhook_receiver import WebhookReceiver

MISSING = ['"任务参数4"', '"任务参数5"']  # node-old's table lacks these params of "sample"


def status_json(env: dict) -> dict:
    result = run_cli(["status", "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_two_nodes_on_different_tables_are_named_by_status_health_metrics_and_one_alert(node_env, processes):
    webhook = WebhookReceiver().start()
    try:
        port = free_port()
        # A threshold of 2 s: the leader checks the tables every second or so (a quarter of it, at least 1 s).
        common = dict(node_env, SAMPLE_ONLY="1", SAMPLE_AT=quiet_sample_at(), DAILYQ_ALERT_URL=webhook.url,
                      DAILYQ_TABLE_SKEW_ALERT_S="2", **FAST_RETRIES)
        new = dict(common, NODE_NAME="node-new", SAMPLE_PARAMS="6", DAILYQ_METRICS_PORT=str(port))
        old = dict(common, NODE_NAME="node-old", SAMPLE_PARAMS="4")
        processes.start("scheduler.py", new)
        wait_for(lambda: (status_json(new)["leader"] or {}).get("node") == "node-new", timeout=20,
                 what="node-new to lead")  # so the reference is node-new's table
        processes.start("scheduler.py", old)
        processes.start("worker_entry.py", old)

        def recorded() -> dict | None:
            differences = status_json(new)["tables"]["differences"]
            ready = differences and differences[0]["processes"] == ["node-old/scheduler", "node-old/worker"] \
                and differences[0]["since"]
            return differences[0] if ready else None

        wait_for(lambda: recorded() is not None, timeout=30, what="the leader to record node-old's difference")
        tables = status_json(old)["tables"]  # from node-old too: the reference is the leader's, not its own
        assert tables["same"] is False and tables["reference_from"] == "leader"
        [difference] = tables["differences"]
        assert difference["nodes"] == ["node-old"] and difference["table"] != tables["reference"]
        assert difference["params"] == {"sample": {"added": [], "removed": MISSING}}
        assert difference["tasks_added"] == difference["tasks_removed"] == [] and difference["schedules"] == {}
        assert tables["by_table"] == {tables["reference"]: ["node-new/scheduler"],
                                      difference["table"]: ["node-old/scheduler", "node-old/worker"]}

        text = run_cli(["status"], new)
        assert (f"tables differ: node-old (scheduler, worker) runs table {difference['table']}, not the leader's "
                f"{tables['reference']} since {difference['since']}: sample: params -{MISSING[0]} -{MISSING[1]}"
                ) in text.stdout.splitlines(), text.stdout

        # health: young (under the default 900 s) is named and healthy; past the threshold, node-old fails.
        young = run_cli(["health"], dict(old, DAILYQ_TABLE_SKEW_ALERT_S="900"))
        assert young.returncode == 0, young.stdout
        assert young.stdout.startswith("ok: scheduler and worker of node-old alive")
        assert "; warning: tables differ: node-old (scheduler, worker) runs table" in young.stdout
        wait_for(lambda: run_cli(["health"], dict(old, DAILYQ_TABLE_SKEW_ALERT_S="1")).returncode == 1,
                 timeout=10, what="node-old's difference to pass 1 s")
        stale = run_cli(["health"], dict(old, DAILYQ_TABLE_SKEW_ALERT_S="1"))
        assert stale.stdout.count("\n") == 1
        assert stale.stdout.startswith(f"unhealthy: tables differ: node-old (scheduler, worker) runs table "
                                       f"{difference['table']}, not the leader's {tables['reference']} for "), stale
        assert "(longer than DAILYQ_TABLE_SKEW_ALERT_S=1s)" in stale.stdout
        leader = run_cli(["health", "--role", "scheduler"], dict(new, DAILYQ_TABLE_SKEW_ALERT_S="1"))
        assert leader.returncode == 0, leader.stdout  # the leader's node runs the reference

        samples = scrape(port)
        assert samples["dailyq_tables"][()] == 2.0
        differs = {(dict(k)["node"], dict(k)["role"], dict(k)["table"]): v
                   for k, v in samples["dailyq_table_differs"].items()}
        assert differs == {("node-new", "scheduler", tables["reference"]): 0.0,
                           ("node-old", "scheduler", difference["table"]): 1.0,
                           ("node-old", "worker", difference["table"]): 1.0}

        wait_for(lambda: webhook.events("tables_differ"), timeout=15, what="the tables_differ alert")
        time.sleep(3)  # several more checks of the leader: none sends it again
        [alert] = webhook.received
        assert alert["event"] == "tables_differ"
        assert alert["tables"]["nodes"] == ["node-old"] and alert["tables"]["table"] == difference["table"]
        assert alert["tables"]["reference"] == tables["reference"]
        assert alert["tables"]["diff"]["params"] == {"sample": {"added": [], "removed": MISSING}}
        assert alert["tables"]["since"] == difference["since"]
        assert alert["text"].startswith(f"dailyq: tables differ for more than 2s (since {difference['since']}): "
                                        "node-old (scheduler, worker) runs table"), alert["text"]
    finally:
        webhook.stop()

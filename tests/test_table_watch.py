"""The leader's record of table differences (table_watch.TableWatch, keys.table_skew) and
``read_tables``, against a real redis-server with planted heartbeats (the processes of
tests/test_tables.py take seconds; this takes milliseconds)."""

from __future__ import annotations

import dataclasses
import json

from dailyq.alerts.outbox import Outbox
from dailyq.beats import beat_value, register_node
from dailyq.clock import server_now
from dailyq.fingerprint import describe
from dailyq.lease import Lease
from dailyq.ops.table_skew import difference_id
from dailyq.table import Task, TaskTable
from dailyq.table_store import publish
from dailyq.table_watch import TableWatch, read_tables

FUNC = "tests.tables.sample_tasks.record"
NEW = TaskTable([Task(name="hb", func=FUNC, params=["p1", "p2", "p7"], at="03:00")])
OLD = TaskTable([Task(name="hb", func=FUNC, params=["p1", "p2"], at="03:00")])


def plant(connection, keys, node: str, role: str, table: TaskTable | None) -> str | None:
    """A live process's heartbeat (and its published table), as the processes write them."""
    fp = publish(connection, keys, table) if table is not None else None
    now = server_now(connection)
    with connection.pipeline(transaction=False) as pipe:
        pipe.set(keys.heartbeat(role, node), beat_value(now, 1, 0.0, table=fp), ex=60)
        register_node(pipe, keys, node, now)
        pipe.execute()
    return fp


def commands(connection) -> int:
    return sum(v["calls"] for v in connection.info("commandstats").values())


def test_the_leader_records_each_difference_once_alerts_it_once_and_drops_it_when_gone(connection, settings):
    keys = settings.keys
    lease = Lease(connection, keys.leader, json.dumps({"node": "new"}), 10_000)
    assert lease.acquire_or_renew()
    new_fp = plant(connection, keys, "new", "scheduler", NEW)
    old_fp = plant(connection, keys, "old", "worker", OLD)
    assert new_fp and old_fp
    outbox = Outbox(connection, keys, settings.retention_s)
    raised: list[list[str]] = []
    watch = TableWatch(connection, dataclasses.replace(settings, node_name="new", table_skew_alert_s=60), NEW,
                       raise_alerts=lambda alerts: raised.append(outbox.enqueue(alerts)))
    pair = difference_id(new_fp, old_fp)

    assert watch.check(lease.key, lease.owner) == []  # young: recorded, not alerted
    first_ms = int(connection.hget(keys.table_skew, pair))
    watch.check(lease.key, lease.owner)
    assert int(connection.hget(keys.table_skew, pair)) == first_ms  # the first sighting is kept

    # status reads the same record: its "since" is the leader's first sighting.
    view = read_tables(connection, keys, [{"node": "new", "role": "scheduler", "table": new_fp},
                                          {"node": "old", "role": "worker", "table": old_fp}],
                       leader_node="new", own_table=old_fp, own_description=describe(OLD))
    [difference] = view["differences"]
    assert difference["nodes"] == ["old"] and difference["params"] == {"hb": {"added": [], "removed": ['"p7"']}}
    assert difference["since"] is not None

    # As if first seen more than the threshold ago: one alert, handed over once.
    connection.hset(keys.table_skew, pair, first_ms - 61_000)
    assert watch.check(lease.key, lease.owner) == [f"tables_differ:{pair}:{first_ms - 61_000}"]
    assert watch.check(lease.key, lease.owner) == []
    # A new term (or another leader) hands it over again; the outbox takes it once.
    again = TableWatch(connection, dataclasses.replace(settings, node_name="new", table_skew_alert_s=60), NEW,
                       raise_alerts=lambda alerts: raised.append(outbox.enqueue(alerts)))
    assert again.check(lease.key, lease.owner) != []
    assert raised == [[f"tables_differ:{pair}:{first_ms - 61_000}"], []]
    assert outbox.counts() == (1, 0)

    # A scheduler that does not hold the lease changes nothing.
    assert TableWatch(connection, settings, OLD).check(lease.key, "someone else") == []
    assert connection.hexists(keys.table_skew, pair)

    # The old node is gone: its difference is dropped, and an idle check then writes nothing.
    connection.delete(keys.heartbeat("worker", "old"))
    watch.check(lease.key, lease.owner)
    assert not connection.exists(keys.table_skew)
    before = commands(connection)
    watch.check(lease.key, lease.owner)
    assert commands(connection) - before - 1 <= 2  # ZRANGE + MGET (the INFO itself aside)

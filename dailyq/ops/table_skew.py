"""Which live process runs which task table, and what differs: the ``tables`` view.

During a rolling deploy the nodes run different tables for a while (fingerprint.py:
each heartbeat names its process's table, whose description is published under
``keys.table(fingerprint)``). ``tables_view`` turns the live processes
(``beats.live_processes`` entries) into the ``tables`` object of ``status --json`` (a
public contract: keys are added, never renamed)::

    {"same": bool,                      # every process naming a table names the reference
     "reference": "<fp>",               # the table the others are compared with
     "reference_from": "leader" | "this process",
     "by_table": {"<fp>": ["node-1/scheduler", "node-1/worker", ...]},
     "differences": [{"id", "table", "nodes", "processes", "tasks_added", "tasks_removed",
                      "params", "schedules", "other", "text", "since"}, ...],
     "unknown": ["node/role", ...]}     # no table in its beat, or its description unpublished

The reference is the table of the leader's scheduler when the leader's node has a live
scheduler heartbeat naming one, else the caller's own table. A difference says what the
other table changes from the reference (``fingerprint.diff``: a task the other node
lacks is in ``tasks_removed``) and since when the leader has seen it (``since``, from
``keys.table_skew``; None when the leader has not recorded it). Processes of versions
before fingerprints (no ``table`` in their beat) are ``unknown``, never a difference.

Pure: descriptions and first-seen times are read by the caller (table_watch.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from ..fingerprint import Description, diff, diff_text
from ..timestamps import iso

LEADER, THIS_PROCESS = "leader", "this process"


def process_name(process: Mapping[str, Any]) -> str:
    return f"{process['node']}/{process['role']}"


def difference_id(table: str, other: str) -> str:
    """Names the difference between two tables, whichever is the reference: the pair,
    sorted. So a difference keeps its id (and its ``since``, and its alert) when the
    lease moves, mid-deploy, from a node of one table to a node of the other."""
    return "-".join(sorted((table, other)))


def reference_of(processes: Iterable[Mapping[str, Any]], leader_node: str | None,
                 own_table: str | None) -> tuple[str | None, str]:
    """(the reference table, where it comes from): the leader's scheduler's table when
    its heartbeat lives and names one, else ``own_table``."""
    if leader_node is not None:
        for process in processes:
            if process["node"] == leader_node and process["role"] == "scheduler" and process.get("table"):
                return str(process["table"]), LEADER
    return own_table, THIS_PROCESS


def lease_node(raw: bytes | str | None) -> str | None:
    """The node named by the leader lease's value (JSON with ``node``), None when there is
    no lease or it names none."""
    if raw is None:
        return None
    try:
        node = json.loads(raw).get("node")
    except (ValueError, AttributeError):
        return None
    return None if node is None else str(node)


def differing_tables(processes: Iterable[Mapping[str, Any]], reference: str | None) -> dict[str, str]:
    """difference id -> the other table, for every table other than ``reference`` that a
    live process names (what the leader records in ``keys.table_skew``)."""
    if reference is None:
        return {}
    others = {str(p["table"]) for p in processes if p.get("table") and p["table"] != reference}
    return {difference_id(reference, table): table for table in sorted(others)}


def tables_view(processes: Iterable[Mapping[str, Any]], *, leader_node: str | None, own_table: str | None,
                descriptions: Mapping[str, Description], first_seen_ms: Mapping[str, int] | None = None
                ) -> dict[str, Any]:
    """The ``tables`` object (see the module's docstring). ``descriptions``: table ->
    its description, for those the caller could read (others count as unknown);
    ``first_seen_ms``: difference id -> when the leader first saw it (ms, Redis clock)."""
    live = list(processes)
    reference, reference_from = reference_of(live, leader_node, own_table)
    by_table: dict[str, list[str]] = {}
    unknown: list[str] = []
    for process in live:
        if process.get("table"):
            by_table.setdefault(str(process["table"]), []).append(process_name(process))
        else:
            unknown.append(process_name(process))
    base = descriptions.get(reference) if reference is not None else None
    differences = []
    for table, names in sorted(by_table.items(), key=lambda item: item[1]):
        if table == reference:
            continue
        other = descriptions.get(table)
        if base is None or other is None or reference is None:
            unknown += names  # nothing to compare with: said, not guessed
            continue
        found = diff(base, other)
        first_ms = (first_seen_ms or {}).get(difference_id(reference, table))
        differences.append({"id": difference_id(reference, table), "table": table,
                            "nodes": sorted({name.split("/", 1)[0] for name in names}), "processes": names,
                            **found, "text": diff_text(found),
                            "since": None if first_ms is None else iso(_from_ms(first_ms))})
    same = all(table == reference for table in by_table) if reference is not None else len(by_table) <= 1
    return {"same": same, "reference": reference, "reference_from": reference_from,
            "by_table": {table: names for table, names in sorted(by_table.items())},
            "differences": differences, "unknown": sorted(unknown)}


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


# -- as text (status, health, the report, the alert) -------------------------------------

def who(processes: Iterable[str]) -> str:
    """``["node-old/scheduler", "node-old/worker", "n2/worker"]`` -> ``node-old
    (scheduler, worker), n2 (worker)``."""
    roles: dict[str, list[str]] = {}
    for name in processes:
        node, _, role = name.partition("/")
        roles.setdefault(node, []).append(role)
    return ", ".join(f"{node} ({', '.join(sorted(found))})" for node, found in roles.items())


def reference_text(view: Mapping[str, Any]) -> str:
    whose = "the leader's" if view.get("reference_from") == LEADER else "this process's"
    return f"{whose} {view.get('reference')}"


def difference_text(view: Mapping[str, Any], difference: Mapping[str, Any], when: str = "") -> str:
    """``node-old (scheduler, worker) runs table 1a2b3c4d5e6f, not the leader's
    9f8e7d6c5b4a: task nt removed; hb: params -"p7" -"p8"``; ``when`` (" since ...")
    goes before the colon."""
    return (f"{who(difference['processes'])} runs table {difference['table']}, not {reference_text(view)}{when}: "
            f"{difference['text']}")


def differing_nodes(view: Mapping[str, Any] | None) -> list[str]:
    """The nodes with a process whose table differs from the reference."""
    if not view:
        return []
    return sorted({node for difference in view.get("differences", []) for node in difference["nodes"]})

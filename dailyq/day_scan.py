"""A day's run records read for background work (alerts, metrics), gently.

``status`` reads a day with one HGETALL. The leader's alert detection and every
scrape of the metrics do so again and again, so they read with HSCAN instead: on a
100,000-run day one HGETALL holds Redis for tens of milliseconds (every worker's
BEGIN and FINISH wait behind it), while HSCAN hands it over in slices.

Records are decoded only when asked for, and ``containing`` decodes only those whose
raw JSON holds a word: finding the failed runs of a day does not decode the
finished ones.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from redis import Redis

from .redis_values import as_text

SCAN_COUNT = 1000


class DayRecords:
    def __init__(self, raw: dict[str, bytes]) -> None:
        self.raw = raw

    @classmethod
    def read(cls, connection: Redis, key: str) -> "DayRecords":
        raw: dict[str, bytes] = {}
        for field, value in connection.hscan_iter(key, count=SCAN_COUNT):
            raw[as_text(field)] = value
        return cls(raw)

    def __len__(self) -> int:
        return len(self.raw)

    @cached_property
    def all(self) -> dict[str, dict[str, Any]]:
        """Run id -> record, with ``param`` decoded from ``param_json``."""
        return {run_id: _decode(value) for run_id, value in self.raw.items()}

    def containing(self, word: bytes) -> dict[str, dict[str, Any]]:
        """The records whose JSON contains ``word`` (a superset of those with a field
        equal to it), decoded."""
        if "all" in self.__dict__:
            return {run_id: record for run_id, record in self.all.items() if word in self.raw[run_id]}
        return {run_id: _decode(value) for run_id, value in self.raw.items() if word in value}


def _decode(raw: bytes | str) -> dict[str, Any]:
    record = json.loads(raw)
    record["param"] = json.loads(record.get("param_json", "null"))
    return record


# Fields per HMGET: a judgment of a task of many runs reads them in slices.
HMGET_CHUNK = 1000


def read_records(connection: Redis, key: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The records of ``run_ids`` that exist (decoded, with ``param``): the runs one
    judgment needs, not the day."""
    found: dict[str, dict[str, Any]] = {}
    unique = list(dict.fromkeys(run_ids))
    for at in range(0, len(unique), HMGET_CHUNK):
        chunk = unique[at:at + HMGET_CHUNK]
        for run_id, raw in zip(chunk, connection.hmget(key, chunk)):
            if raw is not None:
                found[run_id] = _decode(raw)
    return found

"""Stored times as text and back: ISO 8601, UTC, second precision.

Apart from clock.py, which reads Redis's TIME, so that the pure modules (watch,
report, alert_events) can read and write times without importing a Redis client.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, overload


@overload
def iso(moment: datetime) -> str: ...
@overload
def iso(moment: None) -> None: ...
def iso(moment: datetime | None) -> str | None:
    """ISO 8601 with offset, second precision: the form every stored time uses."""
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def parse_iso(value: Any) -> datetime | None:
    """A stored time read back: aware, or None when absent or unreadable. Every time we
    store carries its offset; a naive one can only have come from UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

"""The one place dailyq reads the wall clock.

Everything that needs "now" takes a ``Clock`` argument defaulting to ``utc_now``,
so tests pass fixed datetimes instead of sleeping or patching the world.
"""

from datetime import datetime, timezone
from typing import Any, Callable

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Aware UTC now."""
    return datetime.now(timezone.utc)


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

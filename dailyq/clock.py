"""The one place dailyq reads the wall clock.

Everything that needs "now" takes a ``Clock`` argument defaulting to ``utc_now``,
so tests pass fixed datetimes instead of sleeping or patching the world.
"""

from datetime import datetime, timezone
from typing import Callable

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Aware UTC now."""
    return datetime.now(timezone.utc)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 with offset, second precision: the form every stored time uses."""
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")

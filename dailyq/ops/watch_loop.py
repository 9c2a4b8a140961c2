"""``status --watch``'s refresh loop: the day's changes read from Redis about every second,
turned into watch.py's progress line.

watch.py stays pure (the line from fixed values); this is the part that reads Redis
and keeps state between readings. cli.py prints the frames (redrawn in place on a
terminal, a line per change otherwise) and decides when to stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date
from typing import Callable, Iterator

from redis import Redis

from ..clock import RedisClock
from ..day_feed import DayView
from ..settings import Settings
from ..table import TaskTable
from .status import day_status
from .watch import is_settled, progress, render_line, running_nodes

WATCH_EVERY_S = 1.0


@dataclass(frozen=True)
class Frame:
    line: str  # the progress line, cut to the width asked for
    settled: bool  # no run is scheduled, queued or running (what --until-done waits for)


def watch_frames(connection: Redis, settings: Settings, table: TaskTable, day: date, *, colour: bool,
                 width: Callable[[], int | None], every_s: float = WATCH_EVERY_S,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[Frame]:
    """A frame now, then one every ``every_s`` for as long as the caller iterates.

    ``width`` is asked on every frame: a terminal may be resized during the watch.
    """
    nodes_seen: set[str] = set()  # a node seen running once is counted among the nodes shown
    # Redis's clock, not this host's: the one the leader fires slots by and heartbeats carry.
    clock = RedisClock(connection)
    # The day read whole once, then only what changed since the last frame (day_feed.py).
    view = DayView(connection, settings.keys, day)
    while True:
        now = clock()
        status = day_status(connection, settings.keys, table, day, now, view=view)
        nodes_seen |= running_nodes(status)
        # status' ``eta`` is the ETA shown: no durations to pass (nor the whole hash to read).
        line = render_line(progress(status, {}, now, nodes_seen), colour=colour, width=width())
        yield Frame(line, is_settled(status))
        sleep(every_s)

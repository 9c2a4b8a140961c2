"""Logging set-up for the entry points: one line per event, with the node name."""

from __future__ import annotations

import logging
import sys


class OncePerOutage(logging.Filter):
    """RQ's worker logs "could not connect to Redis" every two seconds of an outage;
    keep the first of a run of them, like our own loops do."""

    def __init__(self) -> None:
        super().__init__()
        self.in_outage = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("rq."):
            return True
        if "could not connect to Redis" in record.getMessage():
            if self.in_outage:
                return False
            self.in_outage = True
        elif record.levelno < logging.WARNING:
            self.in_outage = False
        return True


def setup_logging(node: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{node}] %(name)s: %(message)s"))
    handler.addFilter(OncePerOutage())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

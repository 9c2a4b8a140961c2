"""Logging set-up for the entry points: one line per event, with the node name.

``DAILYQ_LOG_FORMAT`` picks the line: ``text`` (default, for people) or ``json`` (one
object per line, for log collectors: ts, level, logger, node, message, and run_id
when the record carries one, as the guard's and recovery's records do).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Mapping

from .errors import ConfigError

LOG_FORMATS = ("text", "json")


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


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            # The record's own creation time: formatting a log line is not a clock read.
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "node": self.node,
            "message": record.getMessage(),
        }
        run_id = getattr(record, "run_id", None)
        if run_id is not None:
            entry["run_id"] = run_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format(environ: Mapping[str, str] | None = None) -> str:
    """``DAILYQ_LOG_FORMAT`` checked: ``text`` when unset."""
    env = os.environ if environ is None else environ
    value = (env.get("DAILYQ_LOG_FORMAT") or "text").strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"DAILYQ_LOG_FORMAT={env.get('DAILYQ_LOG_FORMAT')!r} is not a log format: "
                          f"use {' or '.join(LOG_FORMATS)}")
    return value


def make_formatter(node: str, fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(node)
    return logging.Formatter(f"%(asctime)s %(levelname)s [{node}] %(name)s: %(message)s")


def setup_logging(node: str, level: int = logging.INFO, fmt: str | None = None) -> None:
    """Log to stderr in ``fmt`` (default: from ``DAILYQ_LOG_FORMAT``; ConfigError if unknown)."""
    formatter = make_formatter(node, fmt or log_format())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(OncePerOutage())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

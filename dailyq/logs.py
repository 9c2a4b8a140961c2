"""Logging set-up for the entry points: one line per event, with the node name.

``DAILYQ_LOG_FORMAT`` picks the line: ``text`` (default, for people) or ``json`` (one
object per line, for log collectors: ts, level, logger, node, message, and run_id
when the record is about one run: the guard's and recovery's records name it, and a
worker tags every record logged while it handles a run, RQ's own included).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Mapping

from .errors import ConfigError

LOG_FORMATS = ("text", "json")

# The run this thread's worker is handling (set around RQ's handling of each job, in
# rq_seam.py): records logged meanwhile, RQ's own included, carry its id in JSON logs.
current_run_id: ContextVar[str | None] = ContextVar("dailyq_current_run_id", default=None)


class TagWithCurrentRun(logging.Filter):
    """Adds ``run_id`` to a record logged while a run is handled, unless it names one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "run_id" not in record.__dict__:
            run_id = current_run_id.get()
            if run_id is not None:
                record.run_id = run_id
        return True


class OncePerOutage(logging.Filter):
    """RQ's worker logs "could not connect to Redis" every two seconds of an outage;
    keep the first of a run of them, like our own loops do."""

    def __init__(self) -> None:
        super().__init__()
        self.in_outage = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("rq."):
            return True
        # The template, not getMessage(): formatting each of RQ's few lines per run twice
        # (here and in the formatter) is CPU every run pays for a rare message.
        if isinstance(record.msg, str) and "could not connect to Redis" in record.msg:
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
    if isinstance(formatter, JsonFormatter):  # the text line has no place for it
        handler.addFilter(TagWithCurrentRun())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Neither format shows where a record was logged from, its thread or its process, so
    # don't collect them for every record (the logging HOWTO's "Optimization" section):
    # a worker logs several lines per run, and each cost ~8 us less without them.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False

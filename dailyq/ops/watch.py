"""``status --watch``: one progress line for a day, from the status dict.

Pure: everything here takes the status dict (status.day_status), the learned
durations (the guard's ``keys.durations`` hash, already read) and ``now``, so the
line can be tested with fixed values; the refresh loop lives in watch_loop.py.

ETA: status' ``eta`` (eta.py simulates the queue on the live workers). For a status
dict without it, expected work left / workers: a run's expected duration is the last one the
guard recorded for its (task, param) series; a run never seen before counts as the
mean of the known ones. Workers = distinct nodes seen running (during the watch),
at least 1: a node that ran something is taken to be able to run the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from ..redis_values import as_text
from ..runs import (
    BLOCKED,
    CANCELLED,
    FAILED,
    FINISHED,
    MISSED,
    REMOVED,
    RUNNING,
    SCHEDULED,
    SKIPPED,
    param_digest,
)
from ..table import encode_param
from ..timestamps import parse_iso
from . import text_width
from .eta import PENDING
from .render import STATE_COLOURS, paint
from .table_skew import differing_nodes

# Blocked runs wait for a rerun of a failed upstream run: like a failed (or cancelled)
# run, nothing more happens to them by itself. Waiting runs will run once their upstream runs finish;
# a paused run is still to do: --until-done waits for it (resume it, or stop watching).
DONE_STATES = (FINISHED, FAILED, SKIPPED, BLOCKED, REMOVED, CANCELLED)
PENDING_STATES = PENDING  # eta.py's: a run in one of these states has still to end
BAR_WIDTH = 24


@dataclass(frozen=True)
class Progress:
    """What the progress line shows, computed once so it can be checked without text."""

    day: str
    total: int
    done: int  # finished + failed + skipped + blocked + cancelled: nothing more happens to them by itself
    failed: int
    missed: int  # past the misfire grace: only ``trigger`` runs them, so not waited for
    pending: int  # scheduled + queued + running + waiting
    running_per_node: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    eta_s: float | None = None  # None when pending work has no duration to go by
    blocked: int = 0  # waiting for a rerun of a failed upstream run (dependencies.py)
    # Nodes running a task table other than the leader's (status' ``tables``): a deploy
    # under way, or one stuck.
    tables_differ: tuple[str, ...] = ()
    cancelled: int = 0  # stopped or kept from starting by ``cancel``: like failed, until a rerun
    eta_at: str | None = None  # status' ``eta``: when every run is expected to have ended


def series_of(run: Mapping[str, Any]) -> str:
    """The run's (task, param) series id, as runs.Run.series_id builds it."""
    return f"{run['task']}-{param_digest(encode_param(run['param']))}"


def parse_durations(raw: Mapping[bytes | str, bytes | str]) -> dict[str, float]:
    """The durations hash as read from Redis (bytes) -> {series: seconds}; junk is skipped."""
    durations: dict[str, float] = {}
    for key, value in raw.items():
        name = as_text(key)
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            continue
        if seconds >= 0:
            durations[name] = seconds
    return durations


def is_settled(status: Mapping[str, Any]) -> bool:
    """True when no run of the day is scheduled, queued, running or waiting (what --until-done waits for)."""
    return not any(run["state"] in PENDING_STATES for run in status["runs"])


def running_nodes(status: Mapping[str, Any]) -> set[str]:
    return {run["node"] or "?" for run in status["runs"] if run["state"] == RUNNING}


def progress(status: Mapping[str, Any], durations: Mapping[str, float], now: datetime,
             nodes_seen: Iterable[str] = ()) -> Progress:
    runs = status["runs"]
    per_node: dict[str, int] = {}
    for run in runs:
        if run["state"] == RUNNING:
            node = run["node"] or "?"
            per_node[node] = per_node.get(node, 0) + 1
    workers = max(1, len(set(nodes_seen) | set(per_node)))
    pending = [run for run in runs if run["state"] in PENDING_STATES]
    return Progress(
        day=status["date"], total=len(runs), done=sum(run["state"] in DONE_STATES for run in runs),
        failed=sum(run["state"] == FAILED for run in runs), missed=sum(run["state"] == MISSED for run in runs),
        pending=len(pending), running_per_node=dict(sorted(per_node.items())), workers=workers,
        eta_s=_eta_s(status, durations, now, workers), blocked=sum(run["state"] == BLOCKED for run in runs),
        tables_differ=tuple(differing_nodes(status.get("tables"))),
        cancelled=sum(run["state"] == CANCELLED for run in runs), eta_at=status.get("eta"))


def _eta_s(status: Mapping[str, Any], durations: Mapping[str, float], now: datetime, workers: int) -> float | None:
    """From status' ``eta`` (eta.py's simulation) when it has one; ``eta_seconds`` for a
    status dict without that key."""
    if "eta" not in status:
        return eta_seconds(status["runs"], durations, now, workers)
    if not any(run["state"] in PENDING_STATES for run in status["runs"]):
        return 0.0
    at = parse_iso(status["eta"])
    return None if at is None else max(0.0, (at - now).total_seconds())


def eta_seconds(runs: list[Mapping[str, Any]], durations: Mapping[str, float], now: datetime,
                workers: int) -> float | None:
    """Seconds until the day's pending runs should be done; None when nothing is known."""
    pending = [run for run in runs if run["state"] in PENDING_STATES]
    if not pending:
        return 0.0
    # The mean of what is known for this day's runs only: durations of series not
    # run today (old params, other tasks) say little about these.
    known = [durations[s] for s in {series_of(run) for run in runs} if s in durations]
    if not known:
        return None
    mean = sum(known) / len(known)
    work = 0.0
    not_before = 0.0  # a run scheduled for later cannot end before its slot plus its duration
    for run in pending:
        expected = durations.get(series_of(run), mean)
        if run["state"] == RUNNING:
            started = parse_iso(run.get("started_at"))
            elapsed = (now - started).total_seconds() if started else 0.0
            work += max(expected - elapsed, 0.0)
            continue
        work += expected
        slot = parse_iso(run.get("slot")) if run["state"] == SCHEDULED else None
        if slot is not None and slot > now:
            not_before = max(not_before, (slot - now).total_seconds() + expected)
    return max(work / workers, not_before)


def render_line(p: Progress, colour: bool = False, width: int | None = None) -> str:
    """``2026-11-27 12/40 done [#####-----] 30% | ETA 3m12s on 2 nodes | running node-1:2 node-2:1``.

    ``width`` (a terminal's columns) cuts the line so that redrawing it in place
    with a carriage return never wraps; it counts display columns (a node named
    ``节点一`` takes six), and colour codes do not count.
    """
    filled = BAR_WIDTH if p.total == 0 else round(BAR_WIDTH * p.done / p.total)
    percent = 100 if p.total == 0 else int(100 * p.done / p.total)
    segments: list[tuple[str, str | None]] = [
        (f"{p.day} {p.done}/{p.total} done [", None),
        ("#" * filled, STATE_COLOURS[FINISHED]), ("-" * (BAR_WIDTH - filled), None),
        (f"] {percent:3d}%", None)]
    if p.failed:
        segments.append((f" {p.failed} failed", STATE_COLOURS[FAILED]))
    if p.cancelled:
        segments.append((f" {p.cancelled} cancelled", STATE_COLOURS[CANCELLED]))
    if p.blocked:
        segments.append((f" {p.blocked} blocked", STATE_COLOURS[BLOCKED]))
    if p.missed:
        segments.append((f" {p.missed} missed", STATE_COLOURS[MISSED]))
    if p.pending == 0:
        segments.append((" | all done", None))
    else:
        eta = "?" if p.eta_s is None else format_duration(p.eta_s)
        if p.eta_at and p.eta_s is not None:
            eta += f" (at {p.eta_at[11:19]})"
        plural = "s" if p.workers != 1 else ""
        segments.append((f" | ETA {eta} on {p.workers} node{plural}", None))
    if p.tables_differ:
        shown = " ".join(text_width.one_line(node) for node in p.tables_differ)
        segments.append((f" | tables differ: {shown}", "1;33"))
    # The per-node list goes last: with many nodes it is what a narrow terminal cuts.
    # Node names are any string: one line each, so a newline cannot break the redraw.
    running = " ".join(f"{text_width.one_line(node)}:{n}" for node, n in p.running_per_node.items()) or "none"
    segments.append((" | running ", None))
    segments.append((running, STATE_COLOURS[RUNNING] if p.running_per_node else None))
    if width is not None:
        segments = _cut(segments, max(width - 1, 10))  # the last column would wrap on some terminals
    return "".join(paint(text, sgr, colour) for text, sgr in segments if text)


def format_duration(seconds: float) -> str:
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _cut(segments: list[tuple[str, str | None]], limit: int) -> list[tuple[str, str | None]]:
    """The segments cut to ``limit`` display columns, the last one kept ending in "…"."""
    if sum(text_width.width(text) for text, _ in segments) <= limit:
        return segments
    kept: list[tuple[str, str | None]] = []
    room = limit - 1  # for the ellipsis
    for text, sgr in segments:
        if room <= 0:
            break
        part = text_width.clip(text, room)
        kept.append((part, sgr))
        room -= text_width.width(part)
        if part != text:
            break  # a wide character that did not fit must not let a narrow one after it in
    kept.append(("…", None))
    return kept

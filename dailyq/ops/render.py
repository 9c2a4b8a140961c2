"""``status`` as text: the day's table, the clock offsets, colour on a terminal.

Pure: the status dict (status.day_status) in, text out. status.py reads Redis;
this renders what it read, so the table can be tested with fixed values and
imported by pure modules (watch.py takes its colours from here).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..alerts.events import loss_text, span_text
from ..runs import STATES
from ..timestamps import parse_iso
from .eta import PENDING
from .offsets import OFFSET_WARN_S, format_offset
from .table_skew import difference_text
from .text_width import clip, one_line, pad, width

ERROR_COLUMNS = 60  # the table shows the start of an error; --json has all of it


def summary(status: dict[str, Any]) -> dict[str, int]:
    counts = {state: 0 for state in STATES}
    for run in status["runs"]:
        counts[run["state"]] = counts.get(run["state"], 0) + 1
    return {state: n for state, n in counts.items() if n}


# ANSI SGR codes per state, for terminals only (see ``colour_wanted``).
STATE_COLOURS = {"scheduled": "2", "queued": "33", "running": "1;36", "finished": "32", "failed": "1;31",
                 "skipped": "35", "missed": "31", "waiting": "34", "blocked": "1;35", "paused": "36",
                 "removed": "2;37", "cancelled": "1;33"}


def colour_wanted(is_tty: bool, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return is_tty and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


def paint(text: str, sgr: str | None, colour: bool) -> str:
    return f"\x1b[{sgr}m{text}\x1b[0m" if colour and sgr else text


def render_table(status: dict[str, Any], colour: bool = False) -> str:
    """Plain-text table for a terminal; ``colour`` paints the STATE column by state.

    Columns are padded by display width (text_width), so a row whose param is
    ``"任务参数1"`` (7 characters, 11 columns) lines up with the others."""
    header = ("TASK", "PARAM", "STATE", "NODE", "STARTED", "ENDED", "ATT", "ERROR")
    rows = [header]
    for run in status["runs"]:
        rows.append((run["task"], json.dumps(run["param"], ensure_ascii=False), run["state"], run["node"] or "-",
                     _clock_time(run["started_at"]), _clock_time(run["ended_at"]), str(run["attempts"]),
                     clip(one_line(run["error"] or ""), ERROR_COLUMNS)))
    cells = [[one_line(str(cell)) for cell in row] for row in rows]
    widths = [max(width(row[i]) for row in cells) for i in range(len(header))]
    state_column = header.index("STATE")

    def cell_text(row_number: int, column: int, cell: str, columns: int) -> str:
        padded = pad(cell, columns)
        if not colour or row_number == 0 or column != state_column:
            return padded
        # Paint the word only, so the padding (and the widths) stay as without colour.
        return paint(cell, STATE_COLOURS.get(cell), colour) + padded[len(cell):]

    lines = ["  ".join(cell_text(n, i, cell, columns) for i, (cell, columns) in enumerate(zip(row, widths))).rstrip()
             for n, row in enumerate(cells)]
    leader = status["leader"]
    leader_line = f"leader: {one_line(str(leader['node']))} (since {leader.get('since')})" if leader else "leader: none"
    counts = ", ".join(f"{n} {state}" for state, n in summary(status).items()) or "no runs"
    return "\n".join([f"date: {status['date']}   {leader_line}", *lines, f"total {len(status['runs'])}: {counts}",
                      *render_eta(status), *render_paused(status), *render_pools(status),
                      *render_tables(status, colour), *render_redis(status, colour), *render_nodes(status, colour),
                      *render_data_loss(status)])


def render_eta(status: dict[str, Any]) -> list[str]:
    """When the day is expected to end (status's ``eta``), and how long from the status's
    time; nothing for a status dict without ``eta`` or a day with nothing pending."""
    if "eta" not in status or not any(run["state"] in PENDING for run in status["runs"]):
        return []
    if status["eta"] is None:
        return ["eta: unknown (no duration learned for the day's runs, no live worker, or a paused task)"]
    at, generated = parse_iso(status["eta"]), parse_iso(status.get("generated_at"))
    left = f" (in {span_text((at - generated).total_seconds())})" if at is not None and generated is not None else ""
    return [f"eta: {status['eta']}{left}"]


def render_data_loss(status: dict[str, Any]) -> list[str]:
    """One line when Redis lost dailyq's data (status's ``redis_data_lost``), else none."""
    view = status.get("redis_data_lost")
    return [f"warning: {loss_text(view)}"] if view else []


def render_paused(status: dict[str, Any]) -> list[str]:
    """One line naming the paused tasks, since when and by which node (none: no line)."""
    paused = status.get("paused") or {}
    if not paused:
        return []
    shown = [f"{one_line(task)} (since {info.get('since') or '?'} by {one_line(str(info.get('by') or '?'))})"
             for task, info in sorted(paused.items())]
    return ["paused: " + ", ".join(shown)]


def render_pools(status: dict[str, Any]) -> list[str]:
    """One line with each pool's use: ``pools: warehouse 2/3 running, 5 set aside`` (none: no line)."""
    pools = status.get("pools") or {}
    if not pools:
        return []
    shown = [f"{one_line(name)} {use['running']}/{use['size']} running, {use['set_aside']} set aside"
             for name, use in sorted(pools.items())]
    return ["pools: " + "; ".join(shown)]


def render_tables(status: dict[str, Any], colour: bool = False) -> list[str]:
    """A line per table that differs from the reference (the leader's), naming the nodes
    and what differs, and one naming the processes whose table is unknown; nothing while
    every process runs one table (or for a status dict without ``tables``)."""
    view = status.get("tables")
    if not view or view.get("same"):
        return []
    lines = []
    for difference in view["differences"]:
        when = f" since {difference['since']}" if difference.get("since") else ""
        lines.append(paint(one_line(f"tables differ: {difference_text(view, difference, when)}"), "1;33", colour))
    if view.get("unknown"):
        lines.append(one_line(f"tables unknown: {', '.join(view['unknown'])} (a heartbeat of an earlier version "
                              "names none, or its description is not published)"))
    return lines


def human_bytes(count: int) -> str:
    """``20.1 MiB``: a byte count at a glance."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def render_redis(status: dict[str, Any], colour: bool = False) -> list[str]:
    """Redis's memory on one line (``out of memory`` while it refuses writes), then a line
    per slot fanned out late because Redis had refused its fan-out (nothing for a status
    dict without ``redis``)."""
    view = status.get("redis")
    if not view:
        return []
    if view.get("used_memory") is None:
        memory = "memory figures unreadable (INFO memory)"
    elif view.get("maxmemory"):
        memory = (f"used {human_bytes(view['used_memory'])} of maxmemory {human_bytes(view['maxmemory'])} "
                  f"({100 * view['used_memory'] / view['maxmemory']:.0f}%, maxmemory-policy "
                  f"{view.get('maxmemory_policy')})")
    else:
        memory = f"used {human_bytes(view['used_memory'])}, no maxmemory"
    if view.get("full"):
        since = f" since {view['full_since']} (seen by {view.get('seen_by')})" if view.get("full_since") else ""
        waiting = view.get("refused_slots") or []
        slots = f"; {len(waiting)} slot{'' if len(waiting) == 1 else 's'} wait for their fan-out" if waiting else ""
        lines = [paint(one_line(f"redis: OUT OF MEMORY{since}, {memory}: it refuses writes, no run starts{slots}; "
                                "raise maxmemory or free memory"), "1;31", colour)]
    else:
        lines = [f"redis: memory {memory}"]
    for late in status.get("late_slots") or []:
        grace = ", past its misfire grace" if late.get("past_grace") else ""
        lines.append(one_line(f"late: {late.get('task')} slot {late.get('slot')} fanned out at "
                              f"{late.get('fanned_out_at')}{grace} (due {late.get('due_at')}; Redis had refused its "
                              "fan-out: out of memory)"))
    return lines


def render_nodes(status: dict[str, Any], colour: bool = False) -> list[str]:
    """The live worker processes per node on one line (when any node reports them), the
    live processes' clock offsets on the next, then a warning line per clock more than
    OFFSET_WARN_S off (nothing for a status dict without ``nodes``)."""
    if "nodes" not in status:
        return []
    counted = [f"{one_line(str(p['node']))} {p['workers']}" for p in status["nodes"]
               if p["role"] == "worker" and p.get("workers") is not None]
    workers = [f"workers per node: {', '.join(counted)}"] if counted else []
    shown = [f"{p['node']} {p['role']} {format_offset(p['offset_s'])}" for p in status["nodes"]]
    line = f"clock offsets from Redis (warned beyond {OFFSET_WARN_S:g}s): " + (", ".join(shown) or "no live nodes")
    return [*workers, line, *(paint(f"warning: {text}", "1;33", colour) for text in status.get("clock_warnings", []))]


def _clock_time(value: str | None) -> str:
    return value[11:19] if value else "-"

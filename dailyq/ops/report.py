"""``report``: a day's runs as one self-contained HTML page (a timeline per node).

Pure: status dict (status.day_status) in, HTML text out. The page has no script
and loads nothing (inline CSS only), so it opens from a file, a mail attachment or
an air-gapped machine alike. Every piece of text from Redis (params are any JSON,
node names and errors any string) goes through ``html.escape``.

``live=True`` makes the same page for the dashboard's ``/dailyq/`` (live_timeline.py):
it adds a day picker (a plain GET form and links to the days before and after) and
``LIVE_SCRIPT``, which reloads the page every LIVE_REFRESH_S seconds. Only the live
page has them: ``report --out`` stays a static file with no script.

The numbers under the chart:
- utilization of a node = time it had at least one run going / the day's span
  (first start to last end over all nodes);
- makespan = that span; lower bound = max(total run time / nodes, longest run):
  no schedule on that many nodes can finish sooner, so makespan / bound says how
  much the spreading over nodes left on the table.
Times are the records' ISO times (second precision, each node's own clock).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from html import escape
from typing import Any, Mapping

from ..runs import RUNNING, STATES
from ..timestamps import parse_iso
from .render import render_eta
from .table_skew import difference_text
from .watch import format_duration

# Fill colour and text colour of each state (bars, legend, list).
STATE_STYLE = {"scheduled": ("#9aa0a6", "#111"), "queued": ("#f2c94c", "#111"), "running": ("#2d9cdb", "#fff"),
               "finished": ("#27ae60", "#fff"), "failed": ("#eb5757", "#fff"), "skipped": ("#bb6bd9", "#fff"),
               "missed": ("#8d3b38", "#fff"), "waiting": ("#c9d6e3", "#111"), "blocked": ("#6d2c91", "#fff"),
               "paused": ("#56ccf2", "#111"), "removed": ("#d9d9d9", "#555"), "cancelled": ("#f2994a", "#111")}
TICK_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_TICKS = 10
ROW_HEIGHT_PX = 26
LANE_MIN_HEIGHT_PX = 44  # room for the lane label's two lines
LIVE_REFRESH_S = 5
# The live page's one script, inline (the dashboard's Content-Security-Policy allows
# exactly this text by its hash). A reload, not a fetch-and-patch: the page is
# rendered by the server in one piece. Not while the day field is being edited: a
# reload would throw away the half-typed date (a <meta> refresh could not wait).
LIVE_SCRIPT = ("setInterval(function () { var active = document.activeElement;"
               " if (!active || active.name !== 'date') { location.reload(); } }, "
               f"{LIVE_REFRESH_S * 1000});")


@dataclass(frozen=True)
class Bar:
    run: Mapping[str, Any]
    node: str
    start: datetime
    end: datetime
    row: int  # sub-row inside the node's lane: runs that overlap on one node stack


@dataclass(frozen=True)
class NodeUse:
    node: str
    runs: int
    busy_s: float
    utilization: float | None  # None when the day's span is zero
    rows: int


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]
    unstarted: list[Mapping[str, Any]]
    nodes: list[NodeUse]
    start: datetime | None
    end: datetime | None
    span_s: float  # the makespan
    total_run_s: float
    longest_run_s: float
    lower_bound_s: float


def timeline(status: Mapping[str, Any]) -> Timeline:
    """Place every started run on its node's lane and compute the numbers shown."""
    now = parse_iso(status.get("generated_at"))
    placed: list[tuple[Mapping[str, Any], str, datetime, datetime]] = []
    unstarted: list[Mapping[str, Any]] = []
    for run in status["runs"]:
        start = parse_iso(run.get("started_at"))
        if start is None:
            unstarted.append(run)
            continue
        end = parse_iso(run.get("ended_at"))
        if run["state"] == RUNNING:
            end = now  # still going: up to when the status was read
        # Nodes' clocks differ: never let a bar run backwards.
        end = start if end is None or end < start else end
        placed.append((run, run.get("node") or "?", start, end))

    placed.sort(key=lambda item: (item[1], item[2], item[3]))
    bars: list[Bar] = []
    rows_end: dict[str, list[datetime]] = {}
    for run, node, start, end in placed:
        rows = rows_end.setdefault(node, [])
        row = next((i for i, row_end in enumerate(rows) if row_end <= start), len(rows))
        if row == len(rows):
            rows.append(end)
        else:
            rows[row] = end
        bars.append(Bar(run, node, start, end, row))

    first = min((b.start for b in bars), default=None)
    last = max((b.end for b in bars), default=None)
    span_s = (last - first).total_seconds() if first and last else 0.0
    durations = [(b.end - b.start).total_seconds() for b in bars]
    total_s = sum(durations)
    longest_s = max(durations, default=0.0)
    nodes = []
    for node, rows in sorted(rows_end.items()):
        mine = [b for b in bars if b.node == node]
        busy = _union_seconds([(b.start, b.end) for b in mine])
        nodes.append(NodeUse(node, len(mine), busy, busy / span_s if span_s > 0 else None, len(rows)))
    lower_bound = max(total_s / len(nodes), longest_s) if nodes else 0.0
    return Timeline(bars, unstarted, nodes, first, last, span_s, total_s, longest_s, lower_bound)


def render_report(status: Mapping[str, Any], live: bool = False) -> str:
    """The whole HTML page for one day; ``live`` adds the day picker and the reload
    every LIVE_REFRESH_S seconds (the dashboard's page), else it is a static file."""
    line = timeline(status)
    day = escape(str(status.get("date", "")))
    counts = _state_counts(status["runs"])
    leader = status.get("leader")
    leader_text = f"leader {leader.get('node')}" if leader else "no leader"
    refresh_text = f" · refreshes every {LIVE_REFRESH_S} s" if live else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dailyq {day}</title>",
        f"<style>{_css()}</style></head><body>",
        f"<h1>dailyq — {day}</h1>",
        *([_day_picker(str(status.get("date", "")))] if live else []),
        f'<p class="meta">{len(status["runs"])} runs: {escape(counts or "none")} · {escape(leader_text)}'
        f' · generated {escape(str(status.get("generated_at") or "-"))} · times in UTC{refresh_text}</p>',
        _eta(status),
        _tables_banner(status.get("tables")),
        _legend(),
        _chart(line),
        _numbers(line),
        _unstarted(line.unstarted),
        *([f"<script>{LIVE_SCRIPT}</script>"] if live else []),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _eta(status: Mapping[str, Any]) -> str:
    """status's ``eta`` (when every run is expected to have ended) as ``status`` prints it;
    nothing once no run is pending."""
    shown = render_eta(dict(status))
    return f'<p class="eta">{escape(shown[0])}</p>' if shown else ""


def _tables_banner(view: Mapping[str, Any] | None) -> str:
    """A banner naming each node whose task table differs from the reference (the
    leader's) and what differs (a rolling deploy under way, or stuck); nothing while
    every process runs one table."""
    if not view or view.get("same"):
        return ""
    items = []
    for difference in view.get("differences", []):
        when = f" since {difference['since']}" if difference.get("since") else ""
        items.append(f'<li data-table="{escape(str(difference["table"]))}">'
                     f"{escape(difference_text(view, difference, when))}</li>")
    if view.get("unknown"):
        items.append(f"<li>table unknown: {escape(', '.join(view['unknown']))}</li>")
    return f'<section class="tables-differ"><b>Task tables differ</b><ul>{"".join(items)}</ul></section>'


def _day_picker(day_text: str) -> str:
    """A GET form for ``?date=YYYY-MM-DD`` (the browser's own date field, no script),
    between links to the day before and the day after, and one to today (no ``date``)."""
    before_link = after_link = ""
    try:
        day = date.fromisoformat(day_text)
        before, after = (day - timedelta(days=1)).isoformat(), (day + timedelta(days=1)).isoformat()
    except (ValueError, OverflowError):
        pass  # no neighbours to link to (not a date, or year 1 / 9999); the form still works
    else:
        before_link = f'<a class="before" href="?date={before}">← {before}</a>'
        after_link = f'<a class="after" href="?date={after}">{after} →</a>'
    return (f'<form class="pick" method="get">{before_link}'
            f'<label>Day <input type="date" name="date" value="{escape(day_text)}" required></label>'
            f'<button type="submit">Show</button>{after_link}<a class="today" href="./">today</a></form>')


def _chart(line: Timeline) -> str:
    if not line.bars or line.start is None:
        return '<section class="chart empty"><p>No run of this day has started yet.</p></section>'
    # A zero span (everything within one second) still needs a scale.
    span = max(line.span_s, 1.0)
    out = ['<section class="chart" id="timeline">', '<div class="axis-label"></div>',
           f'<div class="axis">{_ticks(line.start, span, labels=True)}</div>']
    for use in line.nodes:
        height = max(use.rows * ROW_HEIGHT_PX + 6, LANE_MIN_HEIGHT_PX)
        utilization = "–" if use.utilization is None else f"{use.utilization:.1%}"
        out.append(f'<div class="lane-label" style="height:{height}px"><b>{escape(use.node)}</b>'
                   f'<small>{use.runs} runs · {utilization} busy</small></div>')
        out.append(f'<div class="lane" data-node="{escape(use.node)}" style="height:{height}px">'
                   f'{_ticks(line.start, span, labels=False)}')
        top = (height - use.rows * ROW_HEIGHT_PX) // 2  # bars centred in the lane, beside its label
        for bar in (b for b in line.bars if b.node == use.node):
            out.append(_bar(bar, line.start, span, top))
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def _bar(bar: Bar, origin: datetime, span: float, top: int) -> str:
    run = bar.run
    state = str(run["state"])
    left = (bar.start - origin).total_seconds() / span * 100
    width = (bar.end - bar.start).total_seconds() / span * 100
    label = f"{run['task']} {_param_text(run.get('param'))}"
    took = run.get("duration_s")
    took_text = f"{took} s" if took is not None else format_duration((bar.end - bar.start).total_seconds())
    tooltip = [label, f"{state} on {bar.node}", f"{_hms(bar.start)} – {_hms(bar.end)} UTC ({took_text})",
               f"attempts {run.get('attempts', 0)}"]
    if run.get("error"):
        tooltip.append(f"error: {run['error']}")
    return (f'<div class="run" data-state="{escape(state)}" data-run-id="{escape(str(run.get("run_id") or ""))}"'
            f' style="left:{left:.4f}%;width:{width:.4f}%;top:{top + bar.row * ROW_HEIGHT_PX + 3}px;'
            f'{_state_colours(state)}" title="{escape(chr(10).join(tooltip))}">'
            f'<span>{escape(label)}</span></div>')


def _ticks(origin: datetime, span: float, labels: bool) -> str:
    step = next((s for s in TICK_STEPS_S if span / s <= MAX_TICKS), TICK_STEPS_S[-1])
    first = math.ceil(origin.timestamp() / step) * step
    out = []
    moment = first
    while moment <= origin.timestamp() + span:
        left = (moment - origin.timestamp()) / span * 100
        text = _hms(datetime.fromtimestamp(moment, timezone.utc)) if labels else ""
        # A label near the right edge goes left of its line, so the page never scrolls sideways.
        side = ' class="end"' if left > 90 else ""
        out.append(f'<div class="tick" style="left:{left:.4f}%"><span{side}>{text}</span></div>')
        moment += step
    return "".join(out)


def _numbers(line: Timeline) -> str:
    if not line.nodes:
        return ""
    rows = "".join(
        f"<tr><td>{escape(use.node)}</td><td>{use.runs}</td><td>{format_duration(use.busy_s)}</td>"
        f"<td>{'–' if use.utilization is None else f'{use.utilization:.1%}'}</td></tr>" for use in line.nodes)
    ratio = (f"{line.span_s / line.lower_bound_s:.2f}× the lower bound" if line.lower_bound_s > 0
             else "lower bound is zero")
    return (
        '<section class="numbers"><h2>Nodes</h2>'
        f'<table class="nodes"><tr><th>node</th><th>runs</th><th>busy</th><th>utilization</th></tr>{rows}</table>'
        f'<p class="makespan">Makespan <b>{format_duration(line.span_s)}</b> '
        f'({_hms(line.start)} – {_hms(line.end)} UTC); lower bound <b>{format_duration(line.lower_bound_s)}</b> '
        f'= max(total run time {format_duration(line.total_run_s)} / {len(line.nodes)} nodes, '
        f'longest run {format_duration(line.longest_run_s)}); {ratio}.</p></section>')


def _unstarted(runs: list[Mapping[str, Any]]) -> str:
    if not runs:
        return '<section class="unstarted"><h2>Not started</h2><p>Every run of the day has started.</p></section>'
    rows = "".join(
        f'<tr data-state="{escape(str(run["state"]))}"><td>{escape(str(run["task"]))}</td>'
        f"<td>{escape(_param_text(run.get('param')))}</td>"
        f'<td><span class="pill" style="{_state_colours(str(run["state"]))}">{escape(str(run["state"]))}</span></td>'
        f"<td>{escape(str(run.get('slot') or '-'))}</td><td>{escape(str(run.get('node') or '-'))}</td>"
        f"<td>{escape(str(run.get('error') or ''))}</td></tr>" for run in runs)
    return (f'<section class="unstarted"><h2>Not started ({len(runs)})</h2><table>'
            f"<tr><th>task</th><th>param</th><th>state</th><th>slot</th><th>node</th><th>error</th></tr>"
            f"{rows}</table></section>")


def _legend() -> str:
    return '<p class="legend">' + "".join(
        f'<span class="pill" style="{_state_colours(state)}">{state}</span>' for state in STATES) + "</p>"


def _state_colours(state: str) -> str:
    fill, text = STATE_STYLE.get(state, ("#666", "#fff"))
    return f"background:{fill};color:{text}"


def _state_counts(runs: list[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[str(run["state"])] = counts.get(str(run["state"]), 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def _param_text(param: Any) -> str:
    return json.dumps(param, ensure_ascii=False)


def _hms(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%H:%M:%S") if moment else "-"


def _union_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    total = 0.0
    current_start: datetime | None = None
    current_end: datetime | None = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_start is not None and current_end is not None:
                total += (current_end - current_start).total_seconds()
            current_start, current_end = start, end
        elif end > current_end:
            current_end = end
    if current_start is not None and current_end is not None:
        total += (current_end - current_start).total_seconds()
    return total



def _css() -> str:
    return """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans CJK SC","Noto Sans",sans-serif;
  margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#555;margin:0 0 12px}
.legend .pill{margin-right:6px}
.pill{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px}
.chart{display:grid;grid-template-columns:180px 1fr;border:1px solid #ddd;border-radius:6px;padding:8px 16px 8px 8px}
.chart.empty{display:block;color:#555}
.axis{position:relative;height:22px;border-bottom:1px solid #ccc}
.axis .tick span{position:absolute;top:2px;left:3px;font-size:11px;color:#666;white-space:nowrap}
.axis .tick span.end{left:auto;right:3px}
.lane-label{display:flex;flex-direction:column;justify-content:center;padding-right:8px;border-bottom:1px solid #eee;
  overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.lane-label small{color:#666}
.lane{position:relative;border-bottom:1px solid #eee}
.tick{position:absolute;top:0;bottom:0;border-left:1px dashed #e3e3e3}
.run{position:absolute;height:20px;min-width:6px;border-radius:3px;box-sizing:border-box;padding:0 4px;
  font-size:12px;line-height:20px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;
  box-shadow:inset 0 0 0 1px rgba(0,0,0,.15)}
.run span{pointer-events:none}
table{border-collapse:collapse}th,td{text-align:left;padding:3px 10px;border-bottom:1px solid #eee;
  vertical-align:top;word-break:break-word}
th{font-weight:600;color:#444}
.makespan{margin-top:10px}
.pick{display:flex;gap:10px;align-items:center;margin:0 0 8px}
.tables-differ{background:#fff4d6;border:1px solid #e0b84c;border-radius:6px;padding:8px 12px;margin:0 0 12px}
.tables-differ ul{margin:4px 0 0;padding-left:20px}
"""

"""What is worth an alert, and what it says: pure functions of run records and times.

The events (``EVENTS``); each alert is one JSON object with exactly ``PAYLOAD_KEYS``
(null where a key does not apply), whose ``text`` is one human line, so a Slack- or
Mattermost-style incoming webhook shows it as it is.

Each alert has an id that names the event itself, not the moment it was seen
(``run_failed:<run id>:<attempts>``, ``day_late:<task>:<day>``, ``day_late:<task>:<day>:predicted``,
``slot_missed:<task>:<slot>``, ``no_leader:<last held ms>``,
``tables_differ:<difference id>:<first seen ms>``, ``redis_full:<first refused ms>``,
``runs_failed:<task>:<window start ms>``): whichever leader sees
it, however often, the outbox takes it once (alert_outbox.py).

No Redis and no clock here: alerts.py reads the records and the Redis server's time
and passes them in.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Mapping
from zoneinfo import ZoneInfo

from ..ops.table_skew import difference_text
from ..ops.text_width import one_line
from ..runs import FINISHED, REMOVED, DaySlots, ParamsLookup, runs_of_slot, task_slots_on
from ..schedule import Slot, parse_at
from ..table import Task, TaskTable, encode_param
from ..timestamps import iso, parse_iso

RUN_FAILED, DAY_LATE, SLOT_MISSED, NO_LEADER = "run_failed", "day_late", "slot_missed", "no_leader"
TABLES_DIFFER = "tables_differ"
# A task's failures after its run_failed, one digest per DAILYQ_ALERT_GROUP_S (alert_digest.py).
RUNS_FAILED = "runs_failed"
# Sent directly by the leader, not through the outbox (alerts.AlertService.send_direct).
REDIS_FULL = "redis_full"
EVENTS: tuple[str, ...] = (RUN_FAILED, DAY_LATE, SLOT_MISSED, NO_LEADER, TABLES_DIFFER, REDIS_FULL, RUNS_FAILED)
# The payload's keys: a public contract (receivers parse them), exactly these. Added to
# at the end, never renamed: ``tables`` (null but for tables_differ) came with it,
# ``runs`` and ``count`` (null but for runs_failed) with the digest, and ``predicted``
# (true for a day_late raised before the deadline from the ETA, false for one raised at
# the deadline, null for the other events) with the ETA.
PAYLOAD_KEYS = ("event", "task", "param", "day", "run_id", "node", "error", "at", "text", "tables", "runs", "count",
                "predicted")
# A digest's runs: each with these keys (``error`` cut to DIGEST_ERROR_CHARS).
DIGEST_RUN_KEYS = ("run_id", "param", "node", "error", "day", "at", "attempts")

# A Slack message is meant to be read at a glance: the line shows the start of a long
# error; the payload's ``error`` carries more of it (but not a whole log).
TEXT_ERROR_CHARS = 300
TEXT_PARAM_CHARS = 120
PAYLOAD_ERROR_CHARS = 4000
# A digest names every run; each run's error is cut shorter than a single alert's, so a
# storm of a thousand failures stays one POST of a few hundred KB at most.
DIGEST_ERROR_CHARS = 500
# The runs a digest's text names before "and N more".
DIGEST_TEXT_RUNS = 3


@dataclass(frozen=True)
class Alert:
    alert_id: str  # names the event; the outbox takes each id once
    day: date  # the day whose alert set remembers the id (kept as long as the day's runs)
    payload: dict[str, Any]

    @property
    def event(self) -> str:
        return str(self.payload["event"])


def _payload(event: str, text: str, at: datetime | str | None, *, task: str | None = None, param: Any = None,
             day: date | None = None, run_id: str | None = None, node: str | None = None,
             error: str | None = None, tables: dict[str, Any] | None = None, runs: list[dict[str, Any]] | None = None,
             predicted: bool | None = None) -> dict[str, Any]:
    return {"event": event, "task": task, "param": param, "day": day.isoformat() if day else None,
            "run_id": run_id, "node": node, "error": _cut(error, PAYLOAD_ERROR_CHARS) if error is not None else None,
            "at": at if isinstance(at, str) or at is None else iso(at), "text": _line(text), "tables": tables,
            "runs": runs, "count": None if runs is None else len(runs), "predicted": predicted}


def _line(text: str) -> str:
    """One line: control characters (newlines in a traceback) become spaces, runs of
    spaces one."""
    return " ".join(one_line(text).split())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def span_text(seconds: float) -> str:
    """``45s``, ``2m05s``, ``3h07m``: how long, at a glance."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# -- run_failed ------------------------------------------------------------------------

def run_failed_alert(day: date, run_id: str, record: Mapping[str, Any], now: datetime) -> Alert:
    """A run recorded ``failed`` (it has used its retries), from the fields of its record
    (alert_digest.Failure.record). A run failed again after a ``rerun`` has more attempts,
    hence a new id."""
    attempts = int(record.get("attempts") or 0)
    task = str(record.get("task"))
    param = record.get("param")
    node = record.get("node")
    error = record.get("error")
    call = _call(task, param)
    reason = _cut(_line(str(error or "no error recorded")), TEXT_ERROR_CHARS)
    text = (f"dailyq: run failed: {call} of {day.isoformat()} on {node or 'unknown node'} after "
            f"{attempts} attempt{'s' if attempts != 1 else ''}: {reason}")
    return Alert(f"{RUN_FAILED}:{run_id}:{attempts}", day,
                 _payload(RUN_FAILED, text, record.get("ended_at") or now, task=task, param=param, day=day,
                          run_id=run_id, node=node, error=None if error is None else str(error)))


def runs_failed_alert(task: str, start_ms: int, until_ms: int, runs: list[Mapping[str, Any]]) -> Alert:
    """The digest of ``task``'s failures in the window [start_ms, until_ms) (alert_digest.py):
    ``runs`` each with DIGEST_RUN_KEYS. Its id names the task and the window, so however
    often it grows before it is sent, it is sent once; ``at`` is the window's end."""
    start = datetime.fromtimestamp(start_ms / 1000, timezone.utc)
    until = datetime.fromtimestamp(until_ms / 1000, timezone.utc)
    listed = [{key: run.get(key) for key in DIGEST_RUN_KEYS} for run in runs]
    for run in listed:
        if run["error"] is not None:
            run["error"] = _cut(str(run["error"]), DIGEST_ERROR_CHARS)
    days = sorted({str(run["day"]) for run in listed if run["day"]})
    named = "; ".join(
        f"{_call(task, run['param'])} of {run['day']} on {run['node'] or 'unknown node'}: "
        f"{_cut(_line(str(run['error'] or 'no error recorded')), TEXT_ERROR_CHARS // DIGEST_TEXT_RUNS)}"
        for run in listed[:DIGEST_TEXT_RUNS])
    more = f"; and {len(listed) - DIGEST_TEXT_RUNS} more (see runs)" if len(listed) > DIGEST_TEXT_RUNS else ""
    text = (f"dailyq: {len(listed)} more run{'s' if len(listed) != 1 else ''} of {task} failed within "
            f"{span_text((until_ms - start_ms) / 1000)} (from {iso(start)} to {iso(until)}): {named}{more}")
    day = date.fromisoformat(days[0]) if len(days) == 1 else None
    return Alert(f"{RUNS_FAILED}:{task}:{start_ms}", start.date(),
                 _payload(RUNS_FAILED, text, until, task=task, day=day, runs=listed))


def _call(task: str, param: Any) -> str:
    return _cut(f"{task}({encode_param(param)})", TEXT_PARAM_CHARS) if _is_json(param) else task


def _is_json(value: Any) -> bool:
    try:
        encode_param(value)
        return True
    except (TypeError, ValueError):
        return False


# -- day_late --------------------------------------------------------------------------

def deadline_at(task: Task, day: date) -> datetime | None:
    """When ``task``'s runs of ``day`` should all be finished: its ``deadline`` on that
    day in its zone, or on the next day when that is not after the day's first slot
    (``at="23:00", deadline="01:00"`` means 01:00 the next morning). None without a
    deadline or without slots that day."""
    if task.deadline is None:
        return None
    slots = task.schedule.permits_on(day)
    if not slots:
        return None
    zone = ZoneInfo(task.tz)
    wall = parse_at(task.deadline)
    moment = _resolve(datetime.combine(day, wall), zone)
    if moment <= slots[0].fires_at:
        moment = _resolve(datetime.combine(day + timedelta(days=1), wall), zone)
    return moment


def _resolve(local: datetime, zone: ZoneInfo) -> datetime:
    # The same rule as schedule.py: a wall time in a spring-forward gap comes the gap's
    # length later, a repeated one at its first occurrence.
    return local.replace(tzinfo=zone, fold=0).astimezone(timezone.utc)


@dataclass(frozen=True)
class Lateness:
    """The runs of a task's day due by its deadline, and those not finished by then."""

    deadline: datetime
    due: int
    late: Counter  # state (or "finished late") -> runs


def lateness(task: Task, day: date, records: Mapping[str, Mapping[str, Any]], deadline: datetime,
             book: ParamsLookup | None = None, slots: DaySlots | None = None) -> Lateness:
    """Runs whose slot is at or before ``deadline`` and that had not finished by it. Only
    records decide, never when we looked: a run that finished after the deadline is
    late even if it was finished when we looked, so every leader judges alike. A
    computed task's slot with no stored list (``book``) counts as one run not started.
    ``slots``: the day's stored once-a-day slots (runs.DaySlots): a task whose ``at``
    moved after it ran is judged by the runs it ran."""
    late: Counter = Counter()
    due = 0
    for slot in task_slots_on(task, day, slots):
        if slot.fires_at > deadline:
            continue
        if task.params_computed and (book is None or book.params_of(task, slot) is None):
            due += 1
            late["without params"] += 1
            continue
        for run in runs_of_slot(task, slot, book):
            due += 1
            record = records.get(run.run_id)
            if record is None:
                late["not started"] += 1
                continue
            ended = parse_iso(record.get("ended_at"))
            if record.get("state") == REMOVED:
                continue  # a deploy took it away: it will never run, and is not late
            if record.get("state") != FINISHED:
                late[str(record.get("state"))] += 1
            elif ended is None or ended > deadline:
                late["finished late"] += 1
    return Lateness(deadline, due, late)


def day_late_alert(task: Task, day: date, found: Lateness) -> Alert:
    late = sum(found.late.values())
    local = found.deadline.astimezone(ZoneInfo(task.tz))
    shown = local.strftime("%H:%M:%S" if local.second else "%H:%M")
    if local.date() != day:
        shown += f" on {local.date().isoformat()}"
    states = ", ".join(f"{n} {state}" for state, n in sorted(found.late.items(), key=lambda item: (-item[1], item[0])))
    text = (f"dailyq: {task.name} is late for {day.isoformat()}: {late} of {found.due} "
            f"run{'s' if found.due != 1 else ''} not finished by its deadline {shown} {task.tz} ({states})")
    return Alert(f"{DAY_LATE}:{task.name}:{day.isoformat()}", day,
                 _payload(DAY_LATE, text, found.deadline, task=task.name, day=day, predicted=False))


# A day_late is predicted only when the ETA is past the deadline by more than this: an
# estimate a few seconds over is within its own error, not news worth a page.
PREDICTED_LATE_MARGIN_S = 300


def predicted_late(deadline: datetime, expected_end: datetime | None, now: datetime) -> bool:
    """Whether to predict a day_late: before the deadline, the ETA of the task's runs due
    by it is more than PREDICTED_LATE_MARGIN_S past it."""
    return (expected_end is not None and now < deadline
            and (expected_end - deadline).total_seconds() > PREDICTED_LATE_MARGIN_S)


def predicted_day_late_alert(task: Task, day: date, deadline: datetime, expected_end: datetime,
                             now: datetime) -> Alert:
    """``day_late`` before the deadline, from the ETA (eta.py): once per task and day (its
    own id, so the day_late at the deadline, if it comes to that, is still sent)."""
    zone = ZoneInfo(task.tz)
    local = deadline.astimezone(zone)
    shown = local.strftime("%H:%M:%S" if local.second else "%H:%M")
    if local.date() != day:
        shown += f" on {local.date().isoformat()}"
    end = expected_end.astimezone(zone)
    text = (f"dailyq: {task.name} is expected to be late for {day.isoformat()}: its runs are expected to end at "
            f"{end.strftime('%H:%M:%S')}{'' if end.date() == day else ' on ' + end.date().isoformat()} {task.tz}, "
            f"{span_text((expected_end - deadline).total_seconds())} after its deadline {shown} (ETA from the learned "
            "durations and the live workers)")
    return Alert(f"{DAY_LATE}:{task.name}:{day.isoformat()}:predicted", day,
                 _payload(DAY_LATE, text, now, task=task.name, day=day, predicted=True))


# -- slot_missed -----------------------------------------------------------------------

def fired_slots(records: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(task, slot) of every run recorded: a slot with any record was fired (or triggered)."""
    return {(str(r.get("task")), str(r.get("slot"))) for r in records}


def overdue_slots(task: Task, day: date, now: datetime, slots: DaySlots | None = None) -> list[Slot]:
    """The task's slots of ``day`` past their misfire grace: fired by now, or never. A
    once-a-day task's slot is the one its day was fanned out under, when ``slots`` (the
    day's stored slots) has one: a slot moved after it ran was not missed."""
    grace = timedelta(seconds=task.misfire_grace_s)
    return [slot for slot in task_slots_on(task, day, slots) if now - slot.fires_at > grace]


def missed_slot_alerts(task: Task, overdue: Iterable[Slot], fired: set[tuple[str, str]],
                       watched_since: datetime | None) -> list[Alert]:
    """Alerts for the ``overdue`` slots with no run recorded (``fired_slots``).

    Slots before ``watched_since`` (the first tick any dailyq leader ever made with
    this prefix) are not reported: a fresh deployment did not miss them."""
    if watched_since is None:
        return []
    return [slot_missed_alert(task, slot) for slot in overdue
            if slot.fires_at >= watched_since and (task.name, slot.isoformat()) not in fired]


def slot_missed_alert(task: Task, slot: Slot) -> Alert:
    missed_at = slot.fires_at + timedelta(seconds=task.misfire_grace_s)
    day = slot.day.isoformat()
    text = (f"dailyq: {task.name} slot {slot.isoformat()} never fired (no leader within its misfire grace of "
            f"{span_text(task.misfire_grace_s)}); run it with: scheduler.py trigger --date {day} --task {task.name}")
    return Alert(f"{SLOT_MISSED}:{task.name}:{slot.label}", slot.day,
                 _payload(SLOT_MISSED, text, missed_at, task=task.name, day=slot.day))


# -- no_leader -------------------------------------------------------------------------

def no_leader_alert(last_held_ms: int, back_ms: int, node: str) -> Alert:
    last = datetime.fromtimestamp(last_held_ms / 1000, timezone.utc)
    back = datetime.fromtimestamp(back_ms / 1000, timezone.utc)
    text = (f"dailyq: no scheduler held the leader lease for {span_text((back_ms - last_held_ms) / 1000)} "
            f"(from {iso(last)} to {iso(back)}); {node} leads again")
    return Alert(f"{NO_LEADER}:{last_held_ms}", back.date(), _payload(NO_LEADER, text, back, node=node))


# -- tables_differ ---------------------------------------------------------------------

def tables_differ_alert(view: Mapping[str, Any], difference: Mapping[str, Any], first_ms: int,
                        alert_s: float) -> Alert:
    """A difference of ``view`` (table_skew.tables_view) first seen at ``first_ms`` that
    lasted ``alert_s``. Its id names the difference and when it began, so it is sent
    once however long it lasts, and again only for a difference that went and came back."""
    since = datetime.fromtimestamp(first_ms / 1000, timezone.utc)
    text = (f"dailyq: tables differ for more than {span_text(alert_s)} (since {iso(since)}): "
            f"{difference_text(view, difference)}")
    tables = {"id": difference["id"], "nodes": list(difference["nodes"]), "processes": list(difference["processes"]),
              "reference": view.get("reference"), "reference_from": view.get("reference_from"),
              "table": difference["table"],
              "diff": {key: difference[key] for key in ("tasks_added", "tasks_removed", "params", "schedules",
                                                         "other")},
              "text": difference["text"], "since": iso(since)}
    return Alert(f"{TABLES_DIFFER}:{difference['id']}:{first_ms}", since.date(),
                 _payload(TABLES_DIFFER, text, since + timedelta(seconds=alert_s), tables=tables))


# -- redis_full ------------------------------------------------------------------------

def redis_full_alert(since_ms: int, node: str, memory: str) -> Alert:
    """Redis refuses writes for memory since ``since_ms`` (the episode's first sighting,
    Redis clock: also the id, so an episode is told once whichever node leads);
    ``memory``: its figures in words (redis_memory.RedisMemory.describe)."""
    since = datetime.fromtimestamp(since_ms / 1000, timezone.utc)
    error = f"Redis is out of memory ({memory}) and refuses writes"
    text = (f"dailyq: Redis is out of memory since {iso(since)} ({memory}) and refuses writes: no slot is fanned "
            f"out and no run starts until maxmemory is raised or memory freed (runs executing now finish and are "
            f"recorded; refused slots are fanned out then); {node} leads")
    return Alert(f"{REDIS_FULL}:{since_ms}", since.date(), _payload(REDIS_FULL, text, since, node=node, error=error))


# -- which days to look at -------------------------------------------------------------

def watched_days(table: TaskTable, now: datetime) -> dict[date, list[Task]]:
    """Today and yesterday in each task's zone, with the tasks whose day it is: a run
    that failed a second before midnight, or a deadline past midnight, is still seen."""
    days: dict[date, list[Task]] = {}
    for task in table.tasks:
        today = now.astimezone(ZoneInfo(task.tz)).date()
        for day in (today - timedelta(days=1), today):
            days.setdefault(day, []).append(task)
    return dict(sorted(days.items()))


def encode_payload(payload: Mapping[str, Any]) -> str:
    """The body POSTed: the keys in their documented order, non-ASCII as is."""
    return json.dumps({key: payload.get(key) for key in PAYLOAD_KEYS}, ensure_ascii=False)


# -- redis_data_lost -------------------------------------------------------------------

REDIS_DATA_LOST = "redis_data_lost"
# Appended here rather than in the tuple above: each event's section adds its own.
EVENTS = EVENTS + (REDIS_DATA_LOST,)



def loss_text(view: Mapping[str, Any]) -> str:
    """One line for people about a loss of Redis's data (``view``: status's
    ``redis_data_lost``): the alert's text, ``status``'s line and the log's."""
    seen = f", last seen before that at {view['last_seen']}" if view.get("last_seen") else ""
    return (f"Redis lost dailyq's data: noticed at {view['since']} by {view.get('node') or 'a node'} "
            f"(generation {view['previous']} gone{seen}; now {view['generation']}); runs recorded, queued or "
            f"paused before then may be gone, and finished runs are not known as finished: rerun deliberately "
            f"(scheduler.py trigger/rerun), see docs/operations.md 'When Redis loses its data'")


def redis_data_lost_alert(view: Mapping[str, Any]) -> Alert:
    """The mark of Redis's data changed (generation.py): ``view`` is status's
    ``redis_data_lost`` (since, generation, previous, node, last_seen). Its id names the
    new generation: one alert per loss, whichever leader sends it. Sent directly, not
    through the outbox, which the loss emptied (data_lost_alert.py)."""
    since = parse_iso(view["since"])
    assert since is not None  # the view exists only for a mark with lost_since_ms
    return Alert(f"{REDIS_DATA_LOST}:{view['generation']}", since.date(),
                 _payload(REDIS_DATA_LOST, f"dailyq: {loss_text(view)}", since, day=since.date(),
                          node=view.get("node")))

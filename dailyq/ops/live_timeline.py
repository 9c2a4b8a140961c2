"""``/dailyq/``: the day's timeline, live, served by the dashboard process.

The page is report.py's, rendered with ``live=True`` (a day picker, a reload every
few seconds): one renderer for ``report --out`` and for this. ``/dailyq/`` shows
today (in the tasks' zone, as ``status`` does), ``/dailyq/?date=YYYY-MM-DD`` another
day; a bad date is a 400 with one line.

The view is added to rq-dashboard's own blueprint (see dashboard.py), so the basic
auth rq-dashboard puts in front of every view of that blueprint guards this one too:
one login, checked in one place, for the whole dashboard.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, Callable, Mapping

from redis import Redis
from redis.exceptions import RedisError

from ..clock import utc_now
from ..day_feed import DayViews
from ..errors import DailyqError
from ..settings import Settings
from ..table import TaskTable, default_day
from .report import LIVE_SCRIPT, render_report
from .status import day_status

if TYPE_CHECKING:
    from flask import Blueprint

PATH = "/dailyq/"
HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
# What the form's date field sends; stricter than date.fromisoformat, which since
# Python 3.11 also takes 20261127 or 2026-W48-5, so one day has one address.
DAY_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}")
# The page runs exactly one script, LIVE_SCRIPT, and loads nothing: say so to the
# browser, so that text from Redis that escaped escaping still could not run or load.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(LIVE_SCRIPT.encode()).digest()).decode()}'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Page:
    code: int
    body: str
    content_type: str


def parse_day(text: str) -> date | None:
    if not DAY_FORMAT.fullmatch(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:  # 2026-02-30
        return None


def timeline_page(date_text: str | None, read_status: Callable[[date], Mapping[str, Any]],
                  today: Callable[[], date], redis_shown: str) -> Page:
    """The answer to ``/dailyq/?date=<date_text>``; no web framework here, so it is
    checked on its own. ``redis_shown`` is REDIS_URL with its password hidden."""
    if date_text:  # an empty field (?date=) means today, like no field
        day = parse_day(date_text)
        if day is None:
            # repr: one line whatever was sent (a newline in it shows as \n); the start only.
            return Page(400, f"bad date {date_text[:40]!r}: use YYYY-MM-DD, "
                             f"e.g. {PATH}?date={today().isoformat()}\n", TEXT)
    else:
        day = today()
    try:
        status = read_status(day)
    except (RedisError, DailyqError) as exc:
        return Page(503, f"Redis at {redis_shown} failed: {' '.join(str(exc).split())}\n", TEXT)
    return Page(200, render_report(status, live=True), HTML)


def add_timeline(blueprint: Blueprint, settings: Settings, table: TaskTable, connection: Redis) -> None:
    """Serve ``/dailyq/`` from ``blueprint`` (before it is registered on the app)."""
    from flask import Response, request  # noqa: PLC0415 - the dashboard extra

    # The days shown lately, kept here for every tab: a reload reads what changed since the
    # last one (day_feed.py), not the whole day.
    views = DayViews(connection, settings.keys)

    def view() -> Response:
        page = timeline_page(
            request.args.get("date"),
            read_status=lambda day: day_status(connection, settings.keys, table, day, utc_now(), view=views.of(day)),
            today=lambda: default_day(table, utc_now()),
            redis_shown=settings.redacted_url())
        response = Response(page.body, status=page.code, content_type=page.content_type)
        response.headers["Cache-Control"] = "no-store"  # a reload must ask again, as rq-dashboard's pages do
        response.headers["X-Content-Type-Options"] = "nosniff"  # the 400's echo stays text
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response

    blueprint.add_url_rule(PATH, endpoint="dailyq_timeline", view_func=view)

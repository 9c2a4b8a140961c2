"""Command line: ``python scheduler.py [status|trigger|rerun|cancel|pause|resume|doctor|demo]`` (also installed as
the ``dailyq`` console script) and the worker.

The commands' work is done by dailyq/api.py (over commands.py), which scripts call
too; the watch loop is watch_loop.py's and the worker's restart loop
worker_supervisor.py's. Here they are parsed and printed. Every failure the user can
fix prints one line on stderr and exits non-zero, with no traceback: bad arguments and
bad tables exit 2, Redis problems 3, others 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from datetime import date
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import orjson
from redis import Redis
from redis.exceptions import RedisError

from . import api
from .backfill import MAX_RANGE_DAYS, render_days
from .clock import server_now
from .connection import connect
from .errors import ConfigError, DailyqError, RedisUnavailable
from .logs import setup_logging
from .ops.render import colour_wanted, render_table
from .redact import redact_url
from .server_checks import warn_about_server
from .settings import Settings
from .table import TaskTable, default_day, encode_param, load_table

log = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """argparse with dailyq's usage errors: one line naming --help, exit code 2 (every
    entry point's parser: these commands, the worker's, the dashboard's)."""

    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad date {text!r}: use YYYY-MM-DD") from None


def _context() -> tuple[Settings, TaskTable]:
    settings = Settings.from_env()
    return settings, load_table(settings.tasks_module)


def cmd_scheduler(args: argparse.Namespace) -> int:
    from .alerts.alerter import AlertService  # noqa: PLC0415 - keeps status/trigger start-up light
    from .alerts.heartbeat_ping import HeartbeatPing  # noqa: PLC0415
    from .scheduler import DailyScheduler  # noqa: PLC0415
    from .table_watch import TableWatch  # noqa: PLC0415

    settings, table = _context()
    connection = connect(settings)
    scheduler = DailyScheduler(connection, settings, table)
    alerts = AlertService(connection, settings, table)
    scheduler.tick_hooks.append(alerts.on_tick)
    # The record of table differences is kept with alerts off too: status and health read it.
    tables = TableWatch(connection, settings, table, raise_alerts=alerts.raise_alerts if alerts.enabled else None)
    scheduler.tick_hooks.append(tables.on_tick)
    # The outside heartbeat (dead-man's switch): due in the leader's tick, sent from its thread.
    ping = HeartbeatPing(connection, settings, table)
    scheduler.tick_hooks.append(ping.on_tick)
    metrics = None
    if settings.metrics_port is not None and not args.burst:
        from .ops.metrics import serve_metrics  # noqa: PLC0415 - imports prometheus_client

        # Before logging starts: a port already taken is one line on stderr, like any bad setting.
        metrics = serve_metrics(settings, connection, table, lambda: scheduler.is_leader,
                                last_heartbeat=lambda: ping.last_beat_s)
    setup_logging(settings.node_name)
    log.info("connected to %s as node %s", settings.redacted_url(), settings.node_name)
    if metrics is not None:
        log.info("metrics at %s", metrics.where)
    warn_about_server(connection, settings)
    if not args.burst:
        alerts.start()
        ping.start()
    try:
        scheduler.run(burst=args.burst)
    finally:
        ping.stop()
        alerts.stop()  # after run() released the lease: a POST under way may finish and be acked
        if metrics is not None:
            metrics.stop()
    return 0


def _range_asked(args: argparse.Namespace) -> bool:
    """True for --from/--to (a range of days), checked against --date: one or the other."""
    if args.from_day is None and args.to_day is None:
        return False
    if args.date is not None:
        raise ConfigError("--date and --from/--to cannot go together: give one day or a range")
    if args.from_day is None or args.to_day is None:
        raise ConfigError("a range needs both --from YYYY-MM-DD and --to YYYY-MM-DD")
    return True


def print_json(value: Any) -> None:
    """``--json`` output: indented for a person at a terminal, one compact line for a pipe or
    a file. The compact form goes through the json module's C encoder, which indenting
    turns off: a 100k-run day's status is about 30 MB of JSON."""
    if sys.stdout.isatty():
        print(json.dumps(value, ensure_ascii=False, indent=2))
        return
    try:
        # orjson: about a tenth of the json module's time for a big day (0.9 s of a 100k-run
        # status). The same JSON: compact, UTF-8, keys in order; floats round-trip as with
        # json, though a few tiny ones are spelt otherwise (1e-05 as 0.00001: the same number).
        text = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        # What orjson does not take and json does (an int beyond 64 bits in a param).
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    out = getattr(sys.stdout, "buffer", None)  # None for a text-only stream (io.StringIO)
    if out is None:
        print(text.decode("utf-8"))
        return
    sys.stdout.flush()  # anything printed before stays before
    out.write(text + b"\n")
    out.flush()


def cmd_status(args: argparse.Namespace) -> int:
    if args.json and (args.watch or args.until_done):
        raise ConfigError("--json prints one snapshot and cannot be watched; drop --json or --watch/--until-done")
    if _range_asked(args):
        if args.watch or args.until_done:
            raise ConfigError("--from/--to prints one line per day and cannot be watched; drop --watch/--until-done")
        settings, table = _context()
        days = api.days_status(settings.redis_url, args.from_day, args.to_day, settings=settings, table=table)
        print_json(days) if args.json else print(render_days(days))
        return 0
    settings, table = _context()
    if args.watch or args.until_done:
        connection = connect(settings)
        # Redis's clock, not this host's: the one the leader fires slots by and heartbeats carry.
        day = args.date or default_day(table, server_now(connection))
        return _watch_status(connection, settings, table, day, args.until_done)
    status = api.day_status(settings.redis_url, args.date, settings=settings, table=table)
    alerts = status["alerts"]
    if args.json:
        print_json(status)
    else:
        print(render_table(status, colour=colour_wanted(sys.stdout.isatty(), os.environ)))
        if alerts["url"] or alerts["pending"] or alerts["in_flight"]:
            print(f"alerts: to {alerts['url'] or 'nowhere (DAILYQ_ALERT_URL is not set)'}, "
                  f"{alerts['pending']} pending, {alerts['in_flight']} in flight")
    return 0


def _watch_status(connection: Redis, settings: Settings, table: TaskTable, day: date, until_done: bool) -> int:
    """Redraw the day's progress line about every second until Ctrl-C, or with
    ``until_done`` until no run is scheduled, queued, running or waiting."""
    from .ops.watch_loop import watch_frames  # noqa: PLC0415

    tty = sys.stdout.isatty()
    last_line = ""
    frames = watch_frames(connection, settings, table, day, colour=colour_wanted(tty, os.environ),
                          width=lambda: shutil.get_terminal_size().columns if tty else None)
    try:
        for frame in frames:
            if tty:  # redraw in place: carriage return, the line, clear to the end of the line
                sys.stdout.write(f"\r{frame.line}\x1b[K")
                sys.stdout.flush()
            elif frame.line != last_line:  # a pipe or a file gets a line per change
                print(frame.line, flush=True)
            last_line = frame.line
            if until_done and frame.settled:
                if tty:
                    sys.stdout.write("\n")
                return 0
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")  # leave the prompt below the last line drawn
        return 130
    return 0  # not reached: the frames never end


def cmd_report(args: argparse.Namespace) -> int:
    from .ops.report import render_report  # noqa: PLC0415

    out: Path = args.out
    # Checked before Redis is asked anything: a typo in --out should not cost a query.
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write --out {str(out)!r}: directory {str(out.parent)!r} does not exist; "
                          "create it or choose another path")
    if out.is_dir():
        raise ConfigError(f"cannot write --out {str(out)!r}: it is a directory; give a file name like report.html")
    settings, table = _context()
    status = api.day_status(settings.redis_url, args.date, settings=settings, table=table)
    try:
        out.write_text(render_report(status), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write --out {str(out)!r}: {exc.strerror or exc}") from None
    print(f"{status['date']}: wrote {out} ({len(status['runs'])} runs)")
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    tasks = [args.task] if args.task else None
    if _range_asked(args):
        settings, table = _context()
        days = api.trigger_range(settings.redis_url, args.from_day, args.to_day, tasks, settings=settings,
                                 table=table)["days"]
    else:
        settings, table = _context()
        days = [api.trigger(settings.redis_url, args.date, tasks, settings=settings, table=table)]
    for result in days:
        print(f"{result['date']}: enqueued {len(result['enqueued'])} runs, "
              f"{len(result['already'])} were already enqueued")
        for failed in result["params_failed"]:
            retry = f"retried at {failed['next_try_at']}" if failed["next_try_at"] else "no retries left"
            print(f"{result['date']}: params of {failed['task']} slot {failed['slot']} failed "
                  f"(attempt {failed['attempts']}, {retry}): {failed['error']}")
    if len(days) > 1:
        print(f"{len(days)} days: enqueued {sum(len(d['enqueued']) for d in days)} runs, "
              f"{sum(len(d['already']) for d in days)} were already enqueued")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    settings, table = _context()
    report = api.rerun(settings.redis_url, args.task, args.param or [], args.date, args.force,
                       refresh_params=args.refresh_params, settings=settings, table=table)
    for label, key in (("enqueued", "enqueued"), ("skipped, already finished (use --force)", "finished"),
                       ("skipped, queued, running or waiting now", "in_progress")):
        for run in report[key]:
            print(f"{label}: {run['task']} {encode_param(run['param'])} slot {run['slot']}")
    print(f"{report['date']}: {len(report['enqueued'])} enqueued, {len(report['finished'])} finished skipped, "
          f"{len(report['in_progress'])} in progress skipped")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    settings, table = _context()
    # Each cancel is logged (who, which run, what it was), in the format the nodes log in.
    setup_logging(settings.node_name, level=logging.WARNING)
    result = api.cancel(settings.redis_url, args.date, args.task, args.param or [], args.run or None,
                        settings=settings, table=table)
    for run in result["cancelled"]:
        how = f"was running on {run['node']}: its copy stops" if run["executing"] else f"was {run['state']}"
        print(f"cancelled: {run['task']} {encode_param(run['param'])} slot {run['slot']} ({how})")
    for run in result["ended"]:
        print(f"not cancelled, already {run['state']}: {run['task']} {encode_param(run['param'])} slot {run['slot']}")
    executing = sum(run["executing"] for run in result["cancelled"])
    print(f"{result['date']}: {len(result['cancelled'])} cancelled ({executing} executing) by {result['by']}, "
          f"{len(result['ended'])} had ended already; rerun runs a cancelled run again")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    settings, table = _context()
    result = api.pause(settings.redis_url, args.task, all_tasks=args.all, settings=settings, table=table)
    for entry in result["paused"]:
        print(f"{entry['task']}: {'already paused' if entry['already'] else 'paused'} "
              f"since {entry['since']} by {entry['by']}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    settings, table = _context()
    result = api.resume(settings.redis_url, args.task, all_tasks=args.all, settings=settings, table=table)
    for entry in result["resumed"]:
        print(f"{entry['task']}: {'resumed' if entry['was_paused'] else 'was not paused'}, "
              f"{entry['requeued']} set-aside runs back in the queue")
    if not result["resumed"]:
        print("no task was paused")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 1 when any inconsistency was found (also when --repair repaired it), else 0."""
    from .ops.consistency import render  # noqa: PLC0415

    settings, table = _context()
    report = api.doctor(settings.redis_url, args.date, repair=args.repair, settings=settings, table=table)
    print_json(report) if args.json else print(render(report))
    return 1 if report["problems"] else 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when this node's heartbeats are fresh and Redis answers, else 1; one line
    either way. Redis problems are 1 too (not 3): probes understand only 0 and 1."""
    from .ops.health import judge, read_beats, read_worker_count, redis_down, roles_of  # noqa: PLC0415
    from .redis_memory import redis_view  # noqa: PLC0415
    from .table_watch import read_node_tables  # noqa: PLC0415

    settings = Settings.from_env()
    roles = roles_of(args.role)
    if args.min_workers is not None and "worker" not in roles:
        raise ConfigError("--min-workers counts workers: drop --role scheduler")
    workers = None
    try:
        connection = connect(settings)
        beats = read_beats(connection, settings.keys, settings.node_name, roles)
        # Beats are stamped by Redis's clock: their age is measured on it too, not on ours.
        now = server_now(connection)
        if "worker" in roles:
            workers = read_worker_count(connection, settings.keys, settings.node_name, now)
        tables = read_node_tables(connection, settings.keys, settings.node_name, now)
        redis = redis_view(connection, settings.keys)
    except RedisUnavailable as exc:
        verdict = redis_down(str(exc))
    except RedisError as exc:
        verdict = redis_down(f"Redis at {settings.redacted_url()} failed: {exc}")
    else:
        verdict = judge(settings.node_name, beats, now, args.max_age_s, workers, args.min_workers, tables,
                        settings.table_skew_alert_s, redis)
    print(verdict.line)
    return verdict.exit_code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"bad count {text!r}: use a whole number of at least 1")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"bad number of seconds {text!r}: use a positive number")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from .ops.demo import run_demo  # noqa: PLC0415

    return run_demo(timeout_s=args.timeout)


def _add_range(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--from", dest="from_day", type=_parse_date, metavar="D1",
                        help=f"with --to: the days D1 to D2, both included, at most {MAX_RANGE_DAYS}: {what}")
    parser.add_argument("--to", dest="to_day", type=_parse_date, metavar="D2", help="the range's last day")


def build_parser(prog: str = "scheduler.py") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description="dailyq: each day's runs once, over every node. "
                     "With no command, run this node's scheduler (one node at a time leads).")
    parser.add_argument("--burst", action="store_true", help="one scheduler pass, then exit")
    parser.set_defaults(handler=cmd_scheduler)
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    status = sub.add_parser("status", help="every run of a day and the current leader")
    status.add_argument("--date", type=_parse_date, help="YYYY-MM-DD (default: today in the tasks' zone)")
    _add_range(status, "one summary line per day (done/total, failed); with --json a list of day objects")
    status.add_argument("--json", action="store_true", help="one JSON object (stable keys)")
    status.add_argument("--watch", action="store_true",
                        help="a live progress line (done/total, running per node, ETA), redrawn every second "
                             "until Ctrl-C")
    status.add_argument("--until-done", action="store_true",
                        help="with --watch (implied): stop, exit 0, once no run is scheduled, queued, running "
                             "or waiting")
    status.set_defaults(handler=cmd_status)

    report = sub.add_parser("report", help="a day's runs as one self-contained HTML timeline (a lane per node)")
    report.add_argument("--date", type=_parse_date, help="YYYY-MM-DD (default: today in the tasks' zone)")
    report.add_argument("--out", type=Path, required=True, help="HTML file to write, e.g. day.html")
    report.set_defaults(handler=cmd_report)

    trig = sub.add_parser("trigger", help="fan out a day's runs now (ad-hoc or backfill); idempotent")
    trig.add_argument("--date", type=_parse_date)
    _add_range(trig, "every day's runs, each with its own day (a backfill)")
    trig.add_argument("--task")
    trig.set_defaults(handler=cmd_trigger)

    again = sub.add_parser("rerun", help="run a task again for a day")
    again.add_argument("task")
    again.add_argument("--param", action="append", help="only this param (repeatable); JSON text for non-strings")
    again.add_argument("--date", type=_parse_date)
    again.add_argument("--force", action="store_true", help="also rerun runs that finished")
    again.add_argument("--refresh-params", action="store_true",
                       help="a task with computed params: call its params callable again and use the new list "
                            "(default: the list stored when the slot fired)")
    again.set_defaults(handler=cmd_rerun)

    stop = sub.add_parser("cancel", help="stop a day's runs: executing ones stop within seconds, queued or "
                          "waiting ones never start; they show cancelled until a rerun")
    stop.add_argument("--date", type=_parse_date, required=True)
    stop.add_argument("--task", help="only this task's runs")
    chosen = stop.add_mutually_exclusive_group()
    chosen.add_argument("--param", action="append", help="with --task: only this param (repeatable); JSON text for "
                        "non-strings")
    chosen.add_argument("--run", action="append", metavar="RUN_ID",
                        help="only this run (its run_id in status --json; repeatable)")
    stop.set_defaults(handler=cmd_cancel)

    for name, handler, text in (
            ("pause", cmd_pause, "pause a task: its slots are not fanned out and its queued runs not started "
                                 "(runs executing now finish)"),
            ("resume", cmd_resume, "resume a paused task: slots within misfire_grace_s fire, its set-aside runs "
                                   "go back to the queue")):
        hold = sub.add_parser(name, help=text)
        hold.add_argument("task", nargs="?", help="the task's name")
        hold.add_argument("--all", action="store_true", help="every task")
        hold.set_defaults(handler=handler)

    doctor = sub.add_parser("doctor", help="list every run record of a day that its queue, registries, claims, "
                            "waiting and set-aside lists do not back (exit 1 if any), and what --repair does")
    doctor.add_argument("--date", type=_parse_date, help="YYYY-MM-DD (default: today in the tasks' zone)")
    doctor.add_argument("--repair", action="store_true",
                        help="apply each repair (a check-and-set: a record changed since it was read is left alone)")
    doctor.add_argument("--json", action="store_true", help="one JSON object: date, problems, repaired")
    doctor.set_defaults(handler=cmd_doctor)

    demo = sub.add_parser("demo", help="private Redis + three local workers run today's example batch")
    demo.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    demo.set_defaults(handler=cmd_demo)

    health = sub.add_parser("health", help="exit 0 if this node's (NODE_NAME) processes beat and Redis answers, "
                            "else 1; one line (for probes)")
    health.add_argument("--role", choices=("scheduler", "worker", "both"), default="both",
                        help="which process of this node to check (default: both)")
    health.add_argument("--max-age-s", type=_positive_seconds, default=None,
                        help="also require a heartbeat at most this old (default: any unexpired one; an idle "
                             "worker beats only every few minutes (RQ's worker_ttl - 15 s), the scheduler every 5 s)")
    health.add_argument("--min-workers", type=_positive_int, default=None, metavar="N",
                        help="also require at least N live worker processes on this node (with --concurrency N "
                             "or N worker units; default: any live worker)")
    health.set_defaults(handler=cmd_health)
    return parser


def guarded(action: Callable[[], int]) -> int:
    """Run ``action``; turn the errors a user can fix into one stderr line and an exit code."""
    try:
        return action()
    except DailyqError as exc:
        print(f"dailyq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RedisError as exc:
        settings_url = redact_url(Settings.from_env().redis_url) if _env_ok() else "REDIS_URL"
        print(f"dailyq: error: Redis at {settings_url} failed: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


def _env_ok() -> bool:
    try:
        Settings.from_env()
        return True
    except ConfigError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    console_script = Path(sys.argv[0]).name == "dailyq"
    if console_script and "" not in sys.path and os.getcwd() not in sys.path:
        # `python scheduler.py` finds the task table (DAILYQ_TASKS) next to the script;
        # the installed `dailyq` finds it in the current directory, as `python -m` would.
        sys.path.insert(0, os.getcwd())
    # Usage and argument errors name the command as it was typed.
    args = build_parser("dailyq" if console_script else "scheduler.py").parse_args(argv)
    return guarded(lambda: args.handler(args))


def worker_main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="worker_entry.py", description="Run this node's dailyq worker (an RQ worker).")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--simple", action="store_true",
                        help="non-forking worker: faster for short tasks, but a crashing task takes the worker down")
    parser.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                        help="run N workers in this process group, restarting any that dies (default: 1)")
    args = parser.parse_args(argv)

    def run() -> int:
        from .worker.supervisor import supervise_worker  # noqa: PLC0415 - RQ's worker only in the worker

        settings = Settings.from_env()
        table = load_table(settings.tasks_module)
        connection = connect(settings)
        setup_logging(settings.node_name)
        warn_about_server(connection, settings)
        if args.concurrency == 1:
            return supervise_worker(connection, settings, table, simple=args.simple, burst=args.burst)
        from .worker.pool import supervise_pool  # noqa: PLC0415

        def child() -> int:  # in a forked child: a connection of its own
            return guarded(lambda: supervise_worker(connect(settings), settings, table, simple=args.simple,
                                                    burst=args.burst))

        return supervise_pool(connection, settings, args.concurrency, child, burst=args.burst)

    return guarded(run)

"""``status`` on a terminal: the watch line (dailyq/ops/watch.py, pure, with fixed values),
state colours in the table, and the CLI in a pipe and in a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

from dailyq.keys import Keys
from dailyq.ops.render import colour_wanted, render_table
from dailyq.ops.watch import (
    Progress,
    eta_seconds,
    format_duration,
    is_settled,
    parse_durations,
    progress,
    render_line,
    running_nodes,
    series_of,
)
from dailyq.runs import runs_on
from tests.support.helpers import ROOT, run_cli

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=timezone.utc)
DAY = "2024-06-03"  # long past: runs nobody triggered are "missed", so the day can settle
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def run(task: str, param, state: str, node: str | None = None, started_at: str | None = None,
        slot: str = "2026-11-27T03:00:00+00:00") -> dict:
    return {"task": task, "param": param, "state": state, "node": node, "started_at": started_at, "ended_at": None,
            "attempts": 1 if started_at else 0, "error": None, "run_id": f"{task}-{param}", "slot": slot,
            "job_id": None, "duration_s": None}


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def day(*runs: dict) -> dict:
    return {"date": "2026-11-27", "leader": None, "runs": list(runs), "generated_at": iso(NOW)}


# --- watch.py, pure -------------------------------------------------------------------------

def test_progress_counts_states_and_running_per_node():
    status = day(run("a", 1, "finished", "n1"), run("a", 2, "failed", "n2"), run("a", 3, "skipped", "n1"),
                 run("a", 4, "missed"), run("a", 5, "running", "n2", iso(NOW)),
                 run("a", 6, "running", "n2", iso(NOW)), run("a", 7, "running", "n1", iso(NOW)),
                 run("a", 8, "queued"), run("a", 9, "scheduled"))
    p = progress(status, {}, NOW)
    assert (p.total, p.done, p.failed, p.missed, p.pending) == (9, 3, 1, 1, 5)
    assert p.running_per_node == {"n1": 1, "n2": 2}
    assert p.workers == 2
    assert p.eta_s is None  # no duration known for anything: no guess
    assert not is_settled(status)
    assert running_nodes(status) == {"n1", "n2"}


def test_waiting_runs_are_pending_and_blocked_runs_settle_like_failed_ones():
    status = day(run("up", 1, "failed", "n1"), run("down", 1, "blocked"), run("down", 2, "waiting"))
    p = progress(status, {}, NOW)
    assert (p.total, p.done, p.failed, p.blocked, p.pending) == (3, 2, 1, 1, 1)
    assert not is_settled(status)  # a waiting run will still run
    assert " 1 failed 1 blocked | ETA" in render_line(p)
    assert is_settled(day(run("up", 1, "failed", "n1"), run("down", 1, "blocked")))  # --until-done ends
    coloured = render_table(dict(day(run("down", 1, "blocked"), run("down", 2, "waiting")), nodes=[]), colour=True)
    assert "\x1b[1;35mblocked\x1b[0m" in coloured and "\x1b[34mwaiting\x1b[0m" in coloured


def test_eta_is_remaining_expected_work_over_nodes_seen_with_unknowns_at_the_mean():
    a, b, c = run("t", "a", "queued"), run("t", "b", "running", "n1", iso(NOW - timedelta(seconds=30))), \
        run("t", "c", "queued")
    durations = {series_of(a): 60.0, series_of(b): 120.0}
    # a: 60; b: 120 expected - 30 elapsed = 90; c unknown: mean(60, 120) = 90 -> 240 s of work.
    status = day(a, b, c, run("t", "done", "finished", "n2"))
    assert eta_seconds(status["runs"], durations, NOW, workers=1) == 240
    # n2 ran something earlier in the watch: two workers share the work.
    p = progress(status, durations, NOW, nodes_seen={"n2"})
    assert p.workers == 2 and p.eta_s == 120
    assert "ETA 2m00s on 2 nodes" in render_line(p)


def test_eta_edge_cases():
    overdue = run("t", "x", "running", "n1", iso(NOW - timedelta(seconds=500)))
    assert eta_seconds([overdue], {series_of(overdue): 60.0}, NOW, 1) == 0  # past its expected time: nothing left
    assert eta_seconds([run("t", "y", "finished", "n1")], {}, NOW, 3) == 0  # nothing pending
    later = run("t", "z", "scheduled", slot=iso(NOW + timedelta(hours=1)))
    # A run scheduled for later cannot end before its slot plus its duration, however many nodes.
    assert eta_seconds([later], {series_of(later): 60.0}, NOW, 5) == 3660
    assert progress(day(), {}, NOW).workers == 1  # at least one worker


def test_series_of_matches_the_guards_series_ids(table):
    for planned in runs_on(table, datetime(2026, 11, 27).date()):
        assert series_of({"task": planned.task.name, "param": planned.param}) == planned.series_id


def test_parse_durations_reads_redis_bytes_and_skips_junk():
    raw = {b"a-1": b"1.500", b"b-2": b"not a number", "c-3": "2", b"d-4": b"-1"}
    assert parse_durations(raw) == {"a-1": 1.5, "c-3": 2.0}


def test_render_line_plain_coloured_and_cut_to_the_terminal_width():
    p = Progress(day="2026-11-27", total=8, done=2, failed=1, missed=1, pending=5,
                 running_per_node={"node-1": 2, "node-2": 1}, workers=2, eta_s=195)
    plain = render_line(p)
    assert plain == ("2026-11-27 2/8 done [######------------------]  25% 1 failed 1 missed"
                     " | ETA 3m15s on 2 nodes | running node-1:2 node-2:1")
    coloured = render_line(p, colour=True)
    assert "\x1b[32m######\x1b[0m" in coloured and "\x1b[1;31m 1 failed\x1b[0m" in coloured
    assert ANSI.sub("", coloured) == plain  # colour adds codes, never text
    cut = render_line(p, colour=True, width=40)
    assert len(ANSI.sub("", cut)) == 39 and ANSI.sub("", cut).endswith("…")
    finished = Progress(day="2026-11-27", total=3, done=3, failed=0, missed=0, pending=0, eta_s=0)
    assert render_line(finished).endswith("] 100% | all done | running none")
    assert "\x1b[32m\x1b[0m" not in render_line(Progress(day="d", total=1, done=0, failed=0, missed=0, pending=1),
                                                 colour=True)  # nothing painted when there is nothing to paint
    assert "ETA ?" in render_line(Progress(day="d", total=1, done=0, failed=0, missed=0, pending=1))
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 * 5 + 61)] == ["0s", "1m00s", "1m01s", "5h01m"]


# --- status table colour ------------------------------------------------------------------

def test_table_colours_only_the_state_and_keeps_the_layout():
    status = day(run("t", "任务参数1", "finished", "n1", iso(NOW)), run("t", 2, "failed", "n2"),
                 run("t", 3, "missed"))
    plain = render_table(status)
    coloured = render_table(status, colour=True)
    assert "\x1b" not in plain and plain == render_table(status, colour=False)
    assert "\x1b[32mfinished\x1b[0m" in coloured and "\x1b[1;31mfailed\x1b[0m" in coloured
    assert ANSI.sub("", coloured) == plain


def test_colour_is_wanted_only_on_a_terminal_without_no_color():
    assert colour_wanted(True, {"TERM": "xterm"})
    assert not colour_wanted(False, {"TERM": "xterm"})
    assert not colour_wanted(True, {"TERM": "xterm", "NO_COLOR": "1"})
    assert not colour_wanted(True, {"TERM": "dumb"})
    assert colour_wanted(True, {"NO_COLOR": ""})  # no-color.org: only a non-empty value counts


# --- the CLI, as users run it ------------------------------------------------------------

def finished_day(env: dict) -> None:
    """Trigger the sample task on DAY and run it with a burst worker (the real guard)."""
    result = run_cli(["trigger", "--date", DAY, "--task", "sample"], env)
    assert result.returncode == 0, result.stderr
    subprocess.run([sys.executable, "worker_entry.py", "--burst"], cwd=ROOT, env=dict(env, NODE_NAME="n1"),
                   check=True, capture_output=True, timeout=120)


def run_in_pty(args: list[str], env: dict, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with its stdout on a pseudo-terminal (isatty() is true), as in a shell.
    Every read waits at most until ``timeout`` after the start: a CLI that never ends
    (a --watch that does not stop) fails the test with what it printed, instead of
    blocking it forever."""
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "scheduler.py", *args], cwd=ROOT, env=env, stdout=slave,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"scheduler.py {' '.join(args)} still running after {timeout}s; "
                                     f"it printed {b''.join(chunks)[-500:]!r}")
            readable, _, _ = select.select([master], [], [], left)
            if not readable:
                continue
            try:
                data = os.read(master, 65536)  # what is there; EIO once the child closed its end
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def test_watch_until_done_on_a_finished_day_returns_0(node_env, connection, prefix):
    env = dict(node_env, SAMPLE_ONLY="1")
    finished_day(env)

    result = run_cli(["status", "--date", DAY, "--watch", "--until-done"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"{DAY} 4/4 done [########################] 100%")
    assert "all done" in result.stdout
    assert "\x1b" not in result.stdout  # a pipe gets no colour and no redrawing

    # The guard learned a duration for every run it finished, under the ids watch.py looks up.
    status = json.loads(run_cli(["status", "--date", DAY, "--json"], env).stdout)
    learned = parse_durations(connection.hgetall(Keys(prefix).durations))
    assert {series_of(r) for r in status["runs"]} <= set(learned)


def test_on_a_terminal_status_is_coloured_and_watch_redraws_in_place(node_env):
    env = dict(node_env, SAMPLE_ONLY="1", TERM="xterm")
    env.pop("NO_COLOR", None)
    finished_day(env)

    code, table = run_in_pty(["status", "--date", DAY], env)
    assert code == 0
    assert "\x1b[32mfinished\x1b[0m" in table

    code, watched = run_in_pty(["status", "--date", DAY, "--watch", "--until-done"], env)
    assert code == 0
    assert "\r" in watched and "\x1b[K" in watched  # carriage return + clear line: redrawn in place
    assert "\x1b[32m########################\x1b[0m" in watched
    assert "4/4 done" in ANSI.sub("", watched)

    code, no_colour = run_in_pty(["status", "--date", DAY], dict(env, NO_COLOR="1"))
    assert code == 0 and "\x1b" not in no_colour and "finished" in no_colour


def test_watch_cannot_be_combined_with_json(node_env):
    result = run_cli(["status", "--watch", "--json"], node_env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "--json" in result.stderr and "--watch" in result.stderr


def test_status_in_a_pipe_has_no_colour(node_env):
    result = run_cli(["status", "--date", DAY], node_env)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "missed" in result.stdout

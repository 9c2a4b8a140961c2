"""Test helpers: start dailyq entry points as separate OS processes (one per node),
wait for conditions, and read what the sample task recorded."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo

from redis import Redis

from dailyq.clock import utc_now

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/support/helpers.py is 2 deep


def base_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAILYQ_", "SAMPLE_")) and k != "REDIS_URL"}
    env.update(REDIS_URL=redis_url, DAILYQ_PREFIX=prefix, DAILYQ_TASKS="tests.tables.sample_tasks",
               PYTHONUNBUFFERED="1", DAILYQ_LEASE_TTL_S="2", DAILYQ_CLAIM_TTL_S="6")
    env.update(extra)
    return env


def quiet_sample_at() -> str:
    """A SAMPLE_AT 12 h away from now: a live scheduler then fires no slot of the sample
    task by itself during a test (the default 03:00 would, from 03:00 to 04:00 UTC, the
    task's misfire grace), so a test's triggered batch is the only work there is."""
    return (utc_now() + timedelta(hours=12)).strftime("%H:%M")


# Where Debian's libfaketime package (a dependency of `faketime`) puts the library.
FAKETIME_LIBRARIES = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                      "/usr/local/lib/faketime/libfaketime.so.1")


def faketime_library() -> str | None:
    """libfaketime's path, or None when it is not installed."""
    for pattern in FAKETIME_LIBRARIES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def with_clock_off(env: dict[str, str], offset_s: int, library: str) -> dict[str, str]:
    """``env`` for a process whose wall clock (time.time(), datetime.now()) is
    ``offset_s`` off, through libfaketime, while Redis and the test keep the real time.

    The monotonic clock is left alone (FAKETIME_DONT_FAKE_MONOTONIC): libfaketime 0.9.10
    fakes it as a wall-clock-like value that Python 3.11's timed waits (sem_clockwait,
    used by threading.Event.wait) hand to the kernel unchanged, so they never return.
    The other way round has a flaw too (wolfcw/libfaketime#426): time.sleep() raises
    EINVAL; a scheduler sleeps only through redis-py's retry of a failed command, which
    these tests do not cause."""
    return dict(env, LD_PRELOAD=library, FAKETIME=f"{offset_s:+d}s", FAKETIME_DONT_FAKE_MONOTONIC="1")


def noon_zone() -> str:
    """A fixed-offset zone (``Etc/GMT±N``) in which it is now between 12:00 and 13:00:
    a test that fires a slot a few seconds ahead, or sets a deadline a minute ahead,
    in it, never crosses midnight, whatever the time of day it runs at."""
    offset = 12 - utc_now().hour  # hours east of UTC; from -11 to +12, all of which exist
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"  # POSIX signs: Etc/GMT-3 is UTC+3


def wall_time_in(zone: str, seconds: float) -> str:
    """HH:MM:SS in ``zone``, ``seconds`` from now: a slot or a deadline for SAMPLE_AT/SAMPLE_DEADLINE."""
    return (utc_now() + timedelta(seconds=seconds)).astimezone(ZoneInfo(zone)).strftime("%H:%M:%S")


def today_in(zone: str) -> str:
    return utc_now().astimezone(ZoneInfo(zone)).date().isoformat()


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scheduler.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


class ProcessGroup:
    """Processes a test started; all are killed at teardown, whatever happened."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.logs: dict[int, Path] = {}

    def start(self, script: str, env: dict[str, str], *args: str, log_dir: Path | None = None) -> subprocess.Popen[str]:
        log_dir = log_dir or Path(os.environ.get("DAILYQ_TEST_LOG_DIR", "/tmp"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{env.get('NODE_NAME', 'proc')}-{script}-{time.time_ns()}.log"
        log_file = open(log_path, "w")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.processes.append(process)
        self.logs[process.pid] = log_path
        return process

    def log_of(self, process: subprocess.Popen[str]) -> str:
        return self.logs[process.pid].read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # also orphaned work-horses in its group
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(process: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    """Polls ``predicate`` until it holds, ``every`` seconds, or as long as the last try
    took when that was longer: a predicate that runs a command (``status --json``, a
    fresh interpreter of about 0.3 s CPU) then keeps at most half a core busy instead of
    most of one, which the processes under test (and the other tests of a parallel
    run) need more."""
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        if predicate():
            return
        now = time.monotonic()
        if now >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(max(every, now - began), deadline - now))  # a last try at the deadline


def executions(connection: Redis, prefix: str) -> list[dict]:
    """What tests.tables.sample_tasks.record wrote: one 'start' and one 'end' event per execution."""
    return [json.loads(raw) for raw in connection.lrange(f"{prefix}:test:executions", 0, -1)]


def param_key(param: object) -> str:
    """Params can be lists or dicts: compare them by canonical JSON."""
    return json.dumps(param, sort_keys=True, ensure_ascii=False)


def starts_per_param(events: list[dict]) -> Counter:
    """Executions per param (keyed by param_key)."""
    return Counter(param_key(e["param"]) for e in events if e["event"] == "start")


def max_concurrent_copies(events: list[dict]) -> int:
    """Most copies of one param executing at the same moment."""
    live: Counter = Counter()
    worst = 0
    for event in sorted((e for e in events if e["event"] in ("start", "end")),
                        key=lambda e: (e["t"], e["event"] == "start")):
        key = param_key(event["param"])
        live[key] += 1 if event["event"] == "start" else -1
        worst = max(worst, live[key])
    return worst


def activity(events: list[dict], gap_s: float = 0.5) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """When each copy was seen working, per (param, pid): spans of its events (start,
    ticks, end) that follow each other within ``gap_s``. A copy frozen or stopped
    between two events is not counted as working in between."""
    by_copy: dict[tuple[str, int], list[float]] = {}
    for event in events:
        by_copy.setdefault((param_key(event["param"]), event["pid"]), []).append(event["t"])
    spans: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for copy, times in by_copy.items():
        times.sort()
        copy_spans = [[times[0], times[0]]]
        for t in times[1:]:
            if t - copy_spans[-1][1] <= gap_s:
                copy_spans[-1][1] = t
            else:
                copy_spans.append([t, t])
        spans[copy] = [(a, b) for a, b in copy_spans]
    return spans


def overlaps(events: list[dict], gap_s: float = 0.5) -> list[tuple[int, int, float, float]]:
    """Every moment two copies of one param were both seen working (tasks that tick,
    like tests.tables.sample_tasks.progress), as (pid, other pid, from, seconds)."""
    spans = activity(events, gap_s)
    found = []
    copies = sorted(spans)
    for i, first in enumerate(copies):
        for second in copies[i + 1:]:
            if first[0] != second[0]:
                continue
            for a_start, a_end in spans[first]:
                for b_start, b_end in spans[second]:
                    begin = max(a_start, b_start)
                    if min(a_end, b_end) > begin:
                        found.append((first[1], second[1], begin, min(a_end, b_end) - begin))
    return found


def longest_overlap(events: list[dict], gap_s: float = 0.5) -> float:
    """The longest time two copies of one param were both seen working; 0.0 when they
    never overlapped."""
    return max((seconds for *_, seconds in overlaps(events, gap_s)), default=0.0)


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (an RQ worker's work-horse), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found

"""The worker parent's watch of its work-horse's claim deadline (dailyq/worker/claim_watch.py),
against real child processes: a horse that holds no claim, or keeps confirming it, is
left alone; one whose deadline passed and stayed passed is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from dailyq.worker.claim_watch import ClaimDeadline, wait_watching


def child(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_horse_that_holds_no_claim_is_waited_for_not_killed():
    deadline = ClaimDeadline(margin_s=2)
    kills: list[float] = []
    process = child(0.5)
    try:
        pid, status, _ = wait_watching(process.pid, deadline, kills.append)
    finally:
        process.kill()
    assert pid == process.pid and status == 0 and kills == []
    deadline.set(time.monotonic() - 60)  # a deadline long passed, but the horse ended first
    assert wait_watching(process.pid, deadline, kills.append) == (None, None, None) and kills == []


def test_a_horse_is_killed_once_its_deadline_stays_passed_and_not_while_it_confirms():
    deadline = ClaimDeadline(margin_s=2)
    assert deadline.grace_s == 0.5 and ClaimDeadline(margin_s=1).grace_s == 0.25
    stopped_at: list[float] = []

    def confirm_for(seconds: float) -> None:  # what the horse's renewer does, every 0.1 s
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            deadline.set(time.monotonic() + 0.3)
            time.sleep(0.1)
        stopped_at.append(time.monotonic())

    kills: list[tuple[float, float]] = []
    process = child(30)

    def kill(overdue_s: float) -> None:
        kills.append((time.monotonic(), overdue_s))
        process.send_signal(signal.SIGKILL)

    thread = threading.Thread(target=confirm_for, args=(1.5,), daemon=True)
    thread.start()
    try:
        pid, status, _ = wait_watching(process.pid, deadline, kill)
    finally:
        process.kill()
    assert pid == process.pid and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ((killed_at, overdue_s),) = kills
    # Not while it confirmed; then once its last deadline (0.2 s to 0.3 s after the last
    # confirmation) had stayed passed for the grace (0.5 s).
    assert killed_at >= stopped_at[0] + 0.2 + 0.5 and overdue_s >= 0.5

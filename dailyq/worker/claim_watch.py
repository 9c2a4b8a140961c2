"""The forking worker's parent watches its work-horse's claim: a task that holds the GIL
(a long C call: a regular expression backtracking, a C extension that never releases
it) stops both threads of the horse's ClaimKeeper (guard.py), the renewer and the
watchdog, so the horse can neither confirm its claim nor stop itself before the claim
lapses. The parent, which the task cannot block, then kills it.

The two processes share one double in anonymous shared memory (``ClaimDeadline``),
mapped before RQ forks the horse: the horse's keeper writes, at each confirmed
renewal, the CLOCK_MONOTONIC time by which the next confirmation must come (the last
confirmation's send time + claim TTL - margin: the same deadline its own watchdog
keeps), and 0 while it holds no claim (before BEGIN claimed, and once FINISH or FAIL
released it). CLOCK_MONOTONIC is system-wide on Linux, so the parent compares it with
its own reading; reading it costs no Redis round trip and nothing the horse's GIL can
block. The horse's renewer is a Python thread: while the task holds the GIL it cannot
write either, which is exactly what the parent sees.

Only a leaf of dailyq: rq_seam.py (which the leader imports) uses it.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from typing import Any, Callable

# How often the parent looks at the deadline while a horse runs.
CHECK_EVERY_S = 0.2
# How long a passed deadline must stay passed before the parent kills: a horse that can
# still run Python (its watchdog looks every 0.2 s: guard.WATCHDOG_EVERY_S) stops itself
# first, with its own exit code and log line (after a freeze of both processes, say).
# Never more than a quarter of the margin, so the kill still lands before the claim can lapse.
GRACE_S = 0.5

WaitResult = tuple[Any, Any, Any]  # os.wait4's (pid, wait status, rusage), or Nones


class ClaimDeadline:
    """One monotonic deadline in shared memory: written by the horse, read by its parent."""

    def __init__(self, margin_s: float) -> None:
        # fileno -1: anonymous; MAP_SHARED: the fork shares the page instead of copying it.
        self._map = mmap.mmap(-1, 8, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.grace_s = min(GRACE_S, margin_s / 4)

    def set(self, deadline: float) -> None:
        """The horse: confirm by this monotonic time, or be killed (0: no claim held)."""
        # An aligned 8-byte store; a torn read would have to repeat across the grace to kill.
        struct.pack_into("d", self._map, 0, deadline)

    def clear(self) -> None:
        self.set(0.0)

    def get(self) -> float:
        return float(struct.unpack_from("d", self._map, 0)[0])

    def close(self) -> None:
        self._map.close()


def wait_watching(horse_pid: int, deadline: ClaimDeadline, kill: Callable[[float], None],
                  clock: Callable[[], float] = time.monotonic) -> WaitResult:
    """Wait for the horse to end, like RQ's blocking ``wait4``, looking at its claim's
    deadline every ``CHECK_EVERY_S``. Once the deadline has passed and stayed passed for
    the grace, ``kill(seconds overdue)`` is called (it must SIGKILL the horse), then the
    horse is reaped. RQ's monitor alarm may interrupt the sleep: RQ then beats and calls
    again, which starts this afresh (the grace too: it is short beside the alarm's 30 s)."""
    ended = _ExitWatch(horse_pid)
    try:
        overdue_since: float | None = None
        while True:
            try:
                pid, status, rusage = os.wait4(horse_pid, os.WNOHANG)
            except ChildProcessError:
                return None, None, None
            if pid:
                return pid, status, rusage
            now = clock()
            due = deadline.get()
            if due and now > due:  # 0: the horse holds no claim, nothing to keep
                if overdue_since is None:
                    overdue_since = now
                elif now - overdue_since >= deadline.grace_s:
                    kill(now - due)
                    try:
                        return os.wait4(horse_pid, 0)
                    except ChildProcessError:
                        return None, None, None
            else:
                overdue_since = None
            ended.wait(CHECK_EVERY_S)
    finally:
        ended.close()


class _ExitWatch:
    """Sleeps until the horse ends or ``timeout_s`` passed, whichever comes first: a
    run of a few milliseconds is reaped at once, as by RQ's blocking wait, not up to
    ``CHECK_EVERY_S`` later. A pidfd (Linux 5.3) becomes readable when its process
    ends; without one, the sleep starts at 1 ms and doubles up to ``CHECK_EVERY_S``."""

    def __init__(self, pid: int) -> None:
        self._poll: select.poll | None = None
        self._fd: int | None = None
        self._backoff_s = 0.001
        try:
            self._fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def wait(self, timeout_s: float) -> None:
        if self._poll is not None:
            self._poll.poll(timeout_s * 1000)
            return
        time.sleep(min(self._backoff_s, timeout_s))
        self._backoff_s *= 2

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

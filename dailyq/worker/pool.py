"""``worker_entry.py --concurrency N``: N dailyq workers on one node, under one process.

The supervisor forks N children; each runs exactly what ``worker_entry.py`` runs alone
(``worker_supervisor.supervise_worker``: its own RQ worker, named after the node and its
pid, with its own restart-after-outage loop and its own heartbeat). The supervisor only
keeps N of them alive:

* a child that ends while no stop was asked (killed, crashed, stopped on its own) is
  started again, after RESTART_DELAY_S, doubled for each child of that slot that died
  within STEADY_S of starting, up to MAX_RESTART_DELAY_S; the dead one's entry in the
  node's worker set is removed at once, so ``health``/``status`` count N, not N + 1;
* SIGTERM/SIGINT are forwarded to every child (RQ's warm stop: finish the run under
  way, then exit) and the supervisor returns once all have ended. The children stay in
  the supervisor's process group, so ``kill -- -PGID``, honcho and systemd reach all of
  them; a child then gets the signal twice (from the group and from us) and RQ ignores a
  second one within a second (``BaseWorker.request_force_stop``). A second signal later
  is forwarded too: RQ's cold stop, as for a single worker;
* with ``burst`` nothing is restarted: it returns once every child has ended, 0 when
  all ended with 0.

Why not RQ's ``WorkerPool`` (rq/worker_pool.py): it names workers with uuids (ours start
with the node), builds its workers from queue and connection classes rather than our
settings and task table, and respawns a dead worker at once -- during a Redis outage, in
a tight loop -- while each of our children already waits out an outage itself. Why fork
rather than start ``python worker_entry.py`` again: the children inherit the parsed
settings, the loaded task table, ``sys.path`` and logging as they are, with no command
line to rebuild. The supervisor starts no thread, so forking it is safe.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Callable, NoReturn

from redis import Redis
from redis.exceptions import RedisError

from ..beats import forget_worker, worker_member
from ..settings import Settings
from .workers import describe_exit

log = logging.getLogger(__name__)

RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
# A child that ran at least this long was not failing at start-up: its slot's delay resets.
STEADY_S = 10.0
# How often the supervisor looks for ended children and due restarts.
POLL_S = 0.2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Slot:
    """One of the N places a child worker fills."""

    number: int
    pid: int | None = None
    started_s: float = 0.0
    restart_at_s: float | None = None
    quick_deaths: int = 0


def supervise_pool(connection: Redis, settings: Settings, size: int, run_child: Callable[[], int], *,
                   burst: bool) -> int:
    """Keep ``size`` children running ``run_child`` (a whole worker; returns its exit
    code) until SIGTERM/SIGINT, or with ``burst`` until all have ended; return the exit code."""
    slots = [_Slot(number) for number in range(1, size + 1)]
    stop_signals: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stop_signals.append(signum)
        for slot in slots:
            if slot.pid is not None:
                _send(slot.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    all_clean = True
    try:
        for slot in slots:
            _start(slot, run_child)
        log.info("supervising %d workers on node %s: pids %s", size, settings.node_name,
                 ", ".join(str(slot.pid) for slot in slots))
        while True:
            for slot, status in _reap(slots):
                clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                all_clean = all_clean and clean
                if not clean:  # a clean stop removed itself
                    _forget(connection, settings, slot.pid)
                if stop_signals or burst:
                    log.info("worker %d (pid %s) ended: %s", slot.number, slot.pid, describe_exit(status))
                else:
                    _plan_restart(slot, status)
                slot.pid = None
            if all(slot.pid is None for slot in slots) and (stop_signals or burst):
                return 0 if stop_signals or all_clean else 1
            if not stop_signals:
                for slot in slots:
                    if slot.pid is None and slot.restart_at_s is not None and time.monotonic() >= slot.restart_at_s:
                        _start(slot, run_child)
                        log.info("worker %d restarted: pid %d", slot.number, slot.pid)
            time.sleep(POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(slot: _Slot, run_child: Callable[[], int]) -> None:
    # Blocked around the fork: a stop signal arriving now is handled once slot.pid is
    # set, so the new child is told too, and a child never runs the supervisor's handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _child(run_child)
        slot.pid, slot.started_s, slot.restart_at_s = pid, time.monotonic(), None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _child(run_child: Callable[[], int]) -> NoReturn:
    code = 1
    try:
        # Until RQ installs its own handlers, a stop signal simply ends a child that has no job yet.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        code = run_child()
    except SystemExit as exc:  # RQ's cold stop raises SystemExit()
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must never return into the supervisor's loop
        log.exception("worker process failed")
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: the supervisor's atexit handlers and finally blocks are not the child's.
        os._exit(code)


def _reap(slots: list[_Slot]) -> list[tuple[_Slot, int]]:
    """The children that ended since the last look, with their wait statuses."""
    ended = []
    by_pid = {slot.pid: slot for slot in slots if slot.pid is not None}
    while by_pid:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in by_pid:
            ended.append((by_pid.pop(pid), status))
    return ended


def _plan_restart(slot: _Slot, status: int) -> None:
    lived_s = time.monotonic() - slot.started_s
    slot.quick_deaths = slot.quick_deaths + 1 if lived_s < STEADY_S else 0
    delay_s = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** slot.quick_deaths)
    slot.restart_at_s = time.monotonic() + delay_s
    log.warning("worker %d (pid %s) ended after %.0fs: %s; starting another in %.1fs", slot.number, slot.pid,
                lived_s, describe_exit(status), delay_s)


def _forget(connection: Redis, settings: Settings, pid: int | None) -> None:
    """A dead child cannot remove itself from the node's live workers: do it for it."""
    if pid is None:
        return
    try:
        forget_worker(connection, settings.keys, settings.node_name, worker_member(pid))
    except RedisError as exc:  # its entry then expires with its last beat's promise
        log.warning("could not remove dead worker pid %d from node %s's live workers: %s", pid,
                    settings.node_name, exc)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # ended already; reaped on the next look

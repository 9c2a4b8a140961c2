"""``python scheduler.py demo``: see a day's batch spread over three nodes, locally.

With ``REDIS_URL`` unset it starts a private redis-server; with it set, it uses that
server under a fresh ``dailyq-demo-*`` prefix so it never touches real data. It
starts three worker processes named like nodes, triggers today's batch of the task
table, shows progress, prints the status table and stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from ..clock import utc_now
from ..commands import trigger
from ..connection import connect
from ..errors import DailyqError
from ..redis_server import PrivateRedis
from ..settings import Settings
from ..table import default_day, load_table
from .render import render_table, summary
from .status import day_status

NODES = ("node-1", "node-2", "node-3")



def project_root() -> Path:
    """The folder holding scheduler.py, worker_entry.py and jobs/ (where a node's
    processes start)."""
    return Path(__file__).resolve().parents[2]

def run_demo(timeout_s: float = 120.0) -> int:
    from ..rq_seam import make_queue  # noqa: PLC0415

    with ExitStack() as stack:
        env = dict(os.environ)
        if not env.get("REDIS_URL"):
            server = stack.enter_context(PrivateRedis(appendonly=False))
            env["REDIS_URL"] = server.url
            print(f"started a private redis-server on {server.url}")
        else:
            env["DAILYQ_PREFIX"] = f"dailyq-demo-{uuid.uuid4().hex[:8]}"
            print(f"using REDIS_URL with the throw-away prefix {env['DAILYQ_PREFIX']}")
        env.setdefault("DAILYQ_TASKS", "jobs")
        settings = Settings.from_env(env)
        table = load_table(settings.tasks_module)
        connection = connect(settings)

        workers = [_start_worker(env, node) for node in NODES]
        stack.callback(_stop_all, workers)
        print(f"started workers {', '.join(NODES)}")

        now = utc_now()
        day = default_day(table, now)
        result = trigger(connection, settings.keys, make_queue(connection, settings.keys), table, day, None,
                         settings.retention_s)
        print(f"triggered {day.isoformat()}: {len(result.enqueued)} runs enqueued")

        deadline = time.monotonic() + timeout_s
        last_line = ""
        while True:
            status = day_status(connection, settings.keys, table, day, utc_now())
            line = _progress_line(status)
            if line != last_line:
                print(line, flush=True)
                last_line = line
            states = summary(status)
            if not any(states.get(s) for s in ("queued", "running", "scheduled")):
                break
            if time.monotonic() > deadline:
                print(render_table(status))
                raise DailyqError(f"demo did not finish within {timeout_s:.0f}s")
            for worker in workers:
                if worker.poll() is not None:
                    raise DailyqError(f"a demo worker exited early with code {worker.returncode}")
            time.sleep(0.5)
        print()
        print(render_table(status))
        failed = summary(status).get("failed", 0)
        return 1 if failed else 0


def _progress_line(status: dict) -> str:
    runs = status["runs"]
    done = sum(r["state"] in ("finished", "failed", "skipped") for r in runs)
    running = sorted(r["node"] for r in runs if r["state"] == "running")
    per_node = ", ".join(f"{node}: {running.count(node)}" for node in sorted(set(running))) or "none"
    return f"{done}/{len(runs)} done; running on {per_node}"


def _start_worker(env: dict[str, str], node: str) -> subprocess.Popen[bytes]:
    worker_env = dict(env, NODE_NAME=node, PYTHONUNBUFFERED="1")
    log_path = Path(os.environ.get("DAILYQ_DEMO_LOG_DIR", "/tmp")) / f"dailyq-demo-{node}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "worker_entry.py"], cwd=project_root(), env=worker_env,
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()

"""``python -m dailyq.dashboard``: rq-dashboard for this deployment, safely bound.

A thin launcher (the Procfile's ``dashboard:`` line) that reads

* ``DASHBOARD_BIND`` (default 127.0.0.1) and ``DASHBOARD_PORT`` (default 9181),
* ``DASHBOARD_USER`` / ``DASHBOARD_PASSWORD`` (HTTP basic auth, both or neither),
* ``REDIS_URL``, ``DAILYQ_PREFIX`` and ``DAILYQ_TASKS`` (as every dailyq process),

and starts rq-dashboard in JSON mode (``--json``: our jobs are JSON-serialized, and
with RQ's default pickle serializer the dashboard cannot show them). It refuses to
start, one line and exit 2, when bound beyond loopback without credentials: the
dashboard can delete and requeue jobs.

rq-dashboard runs in this process (not exec'd) so that the password and the Redis
URL are handed over as arguments in memory, never on a command line that ``ps``
shows. rq-dashboard's own ``RQ_DASHBOARD_*`` variables are not read: these are.

Running in this process also lets us fix what ``--json`` leaves out (``read_jobs_as_json``:
rq-dashboard 0.9.0 still reads a worker's current job, and a job's page, with RQ's
pickle serializer) and add the day's timeline at ``/dailyq/`` (live_timeline.py)
behind the same login.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping, NoReturn, Sequence

from redis import Redis
from rq import Queue, Worker
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.serializers import DefaultSerializer, JSONSerializer

from .connection import connect
from .errors import ConfigError
from .rq_seam import DailyJob
from .runs import META_KEY
from .settings import Settings
from .table import load_table

DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 9181


@dataclass(frozen=True)
class DashboardConfig:
    bind: str
    port: int
    user: str | None
    password: str | None
    redis_url: str


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0-like wildcard: assume it is reachable from outside


def config_from_env(environ: Mapping[str, str], redis_url: str) -> DashboardConfig:
    """The dashboard's settings, checked; ConfigError (one line) says what to fix."""
    bind = (environ.get("DASHBOARD_BIND") or DEFAULT_BIND).strip()
    raw_port = environ.get("DASHBOARD_PORT") or str(DEFAULT_PORT)
    try:
        port = int(raw_port)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConfigError(f"DASHBOARD_PORT={raw_port!r} is not a port: use a number from 1 to 65535")
    user = environ.get("DASHBOARD_USER") or None
    password = environ.get("DASHBOARD_PASSWORD") or None
    if (user is None) != (password is None):
        missing = "DASHBOARD_PASSWORD" if password is None else "DASHBOARD_USER"
        raise ConfigError(f"{missing} is not set: set both DASHBOARD_USER and DASHBOARD_PASSWORD, or neither")
    if user is None and not is_loopback(bind):
        raise ConfigError(f"refusing to serve the dashboard on DASHBOARD_BIND={bind} without a login: "
                          "set DASHBOARD_USER and DASHBOARD_PASSWORD, or bind 127.0.0.1")
    return DashboardConfig(bind=bind, port=port, user=user, password=password, redis_url=redis_url)


def rq_dashboard_args(config: DashboardConfig) -> list[str]:
    """rq-dashboard's command-line arguments for ``config``."""
    args = ["--bind", config.bind, "--port", str(config.port), "--redis-url", config.redis_url,
            # JSON mode: rq.serializers.JSONSerializer where rq-dashboard passes a
            # serializer; read_jobs_as_json covers where it does not.
            "--json"]
    if config.user is not None and config.password is not None:
        args += ["--username", config.user, "--password", config.password]
    return args


# -- rq-dashboard reads every job as JSON, never with pickle ------------------------------
# rq-dashboard's --json sets only ``rq_dashboard.web.config.serializer``, which 0.9.0
# passes to some of its RQ calls and not to others. Left out, RQ falls back to pickle:
#
# * ``list_workers`` (/0/data/workers.json, the Workers page): ``Worker.all(connection=...)``
#   builds workers with the default serializer and job class, and ``get_current_job()``
#   then fetches a busy worker's job with pickle. Our JSON job data fails to unpickle
#   (DeserializationError in ``get_call_string``): a 500 for as long as any run executes,
#   and the page stays on "Loading...".
# * ``job_view``, ``delete_job_view`` (``Job.fetch`` without a serializer) and
#   ``requeue_job_view``/``requeue_all`` (``rq.requeue_job`` without one): RQ's
#   ``Job.restore`` unpickles the job's ``meta`` there; it fails on our JSON, is caught
#   and ignored, but a job written by anyone able to write to Redis would run code here.
#
# The seam: the names rq_dashboard.web looks these up by at request time, pointed at
# JSON-only classes of ours (DailyJob ignores any serializer handed to it). And, as a
# tripwire for a place missed here or added by a later rq-dashboard, RQ's pickle
# serializer refuses to load anything in this process: such a place answers an error,
# never unpickles.


class DashboardJob(DailyJob):
    """A job as the dashboard reads it: always JSON (DailyJob), and named by its run."""

    def get_call_string(self) -> str | None:
        # The Workers page shows a busy worker's job by its call string, which names
        # the function (``jobs.example.crunch('任务参数1')``), and one function may
        # serve several tasks. Our runs' description names the run itself:
        # ``daily_report("任务参数1") slot 2026-11-27T09:00:00+08:00``.
        if isinstance(self.meta.get(META_KEY), dict) and self.description:
            return self.description
        return super().get_call_string()


class DashboardQueue(Queue):
    job_class = DashboardJob

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(job_class=DashboardJob, serializer=JSONSerializer)
        super().__init__(*args, **kwargs)


class DashboardWorker(Worker):
    """A registered worker as the dashboard reads it (``Worker.all``/``find_by_key``
    build it with ``cls``): its current job and queues through the JSON classes."""

    job_class = DashboardJob
    queue_class = DashboardQueue

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(job_class=DashboardJob, queue_class=DashboardQueue, serializer=JSONSerializer)
        super().__init__(*args, **kwargs)


def _requeue_job(job_id: str, connection: Redis, serializer: object = None) -> Job:
    """``rq.requeue_job`` with the JSON job class (rq-dashboard passes no serializer)."""
    return DashboardJob.fetch(job_id, connection=connection).requeue()


def _refuse_to_unpickle(data: bytes, *args: Any, **kwargs: Any) -> NoReturn:
    raise DeserializationError("the dailyq dashboard never unpickles data from Redis (dailyq jobs are JSON)")


def read_jobs_as_json(web: ModuleType) -> None:
    """Make rq-dashboard's module ``web`` read jobs, queues and workers as JSON only, and
    make RQ's pickle serializer refuse to load in this process (see above)."""
    web.config.serializer = JSONSerializer
    ours = {"Job": DashboardJob, "Queue": DashboardQueue, "Worker": DashboardWorker, "requeue_job": _requeue_job}
    for name, replacement in ours.items():
        setattr(web, name, replacement)
    # DefaultSerializer (also named PickleSerializer) is what RQ resolves a missing
    # serializer to; this process has no business loading pickles.
    DefaultSerializer.loads = staticmethod(_refuse_to_unpickle)


def run_dashboard(environ: Mapping[str, str]) -> int:
    from .ops.live_timeline import PATH, add_timeline  # noqa: PLC0415 - imports Flask

    settings = Settings.from_env(environ)
    # A malformed REDIS_URL: one line now, not a 500 on every page. This client serves
    # /dailyq/ (rq-dashboard keeps its own).
    connection = connect(settings, check=False)
    config = config_from_env(environ, settings.redis_url)
    table = load_table(settings.tasks_module)  # /dailyq/ lists the table's runs; a bad table is one line here
    try:
        from rq_dashboard import web  # noqa: PLC0415 - an optional extra
        from rq_dashboard.cli import run  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"rq-dashboard cannot be imported ({exc}): install it with "
                          "pip install 'dailyq[dashboard]'") from None
    read_jobs_as_json(web)
    # On rq-dashboard's blueprint, before run() registers it: behind the same login.
    add_timeline(web.blueprint, settings, table, connection)
    base = f"http://{config.bind}:{config.port}"
    print(f"dailyq dashboard: queue {settings.keys.queue_name!r} of {settings.redacted_url()} on {base}/, "
          f"the day's timeline on {base}{PATH} ({'basic auth' if config.user else 'no login, loopback only'})",
          file=sys.stderr, flush=True)
    # No auto_envvar_prefix: rq-dashboard's RQ_DASHBOARD_* variables must not override ours.
    run.main(args=rq_dashboard_args(config), prog_name="rq-dashboard", standalone_mode=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import OneLineParser, guarded  # noqa: PLC0415 - the CLI's one-line errors and exit codes

    OneLineParser(prog="python -m dailyq.dashboard",
                  description="rq-dashboard for this deployment's queue; configured by DASHBOARD_BIND, DASHBOARD_PORT, "
                              "DASHBOARD_USER, DASHBOARD_PASSWORD and REDIS_URL.").parse_args(argv)
    return guarded(lambda: run_dashboard(os.environ))


if __name__ == "__main__":
    sys.exit(main())

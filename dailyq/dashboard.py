"""``python -m dailyq.dashboard``: rq-dashboard for this deployment, safely bound.

A thin launcher (the Procfile's ``dashboard:`` line) that reads

* ``DASHBOARD_BIND`` (default 127.0.0.1) and ``DASHBOARD_PORT`` (default 9181),
* ``DASHBOARD_USER`` / ``DASHBOARD_PASSWORD`` (HTTP basic auth, both or neither),
* ``REDIS_URL`` (as every dailyq process),

and starts rq-dashboard in JSON mode (``--json``: our jobs are JSON-serialized, and
with RQ's default pickle serializer the dashboard cannot show them). It refuses to
start, one line and exit 2, when bound beyond loopback without credentials: the
dashboard can delete and requeue jobs.

rq-dashboard runs in this process (not exec'd) so that the password and the Redis
URL are handed over as arguments in memory, never on a command line that ``ps``
shows. rq-dashboard's own ``RQ_DASHBOARD_*`` variables are not read: these are.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import ConfigError
from .connection import connect
from .settings import Settings

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
            # JSON mode: rq.serializers.JSONSerializer for every job it reads.
            "--json"]
    if config.user is not None and config.password is not None:
        args += ["--username", config.user, "--password", config.password]
    return args


def run_dashboard(environ: Mapping[str, str]) -> int:
    settings = Settings.from_env(environ)
    connect(settings, check=False)  # a malformed REDIS_URL: one line now, not a 500 on every page
    config = config_from_env(environ, settings.redis_url)
    try:
        from rq_dashboard.cli import run  # noqa: PLC0415 - an optional extra
    except ImportError as exc:
        raise ConfigError(f"rq-dashboard cannot be imported ({exc}): install it with "
                          "pip install 'dailyq[dashboard]'") from None
    print(f"dailyq dashboard: queue {settings.keys.queue_name!r} of {settings.redacted_url()} on "
          f"http://{config.bind}:{config.port}/ ({'basic auth' if config.user else 'no login, loopback only'})",
          file=sys.stderr, flush=True)
    # No auto_envvar_prefix: rq-dashboard's RQ_DASHBOARD_* variables must not override ours.
    run.main(args=rq_dashboard_args(config), prog_name="rq-dashboard", standalone_mode=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import _Parser, guarded  # noqa: PLC0415 - the CLI's one-line errors and exit codes

    _Parser(prog="python -m dailyq.dashboard",
            description="rq-dashboard for this deployment's queue; configured by DASHBOARD_BIND, DASHBOARD_PORT, "
                        "DASHBOARD_USER, DASHBOARD_PASSWORD and REDIS_URL.").parse_args(argv)
    return guarded(lambda: run_dashboard(os.environ))


if __name__ == "__main__":
    sys.exit(main())

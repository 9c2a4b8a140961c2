"""Settings read once from the environment.

Only the entry points call ``Settings.from_env``; everything below them takes a
``Settings`` and a connection (made by connection.py) as arguments.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Mapping

from .alerts.webhook_url import check_alert_url, check_heartbeat_url, redact_webhook_url
from .errors import ConfigError
from .keys import Keys
from .redact import redact_url

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_METRICS_BIND = "127.0.0.1"


def _int_env(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _margin_env(environ: Mapping[str, str], claim_ttl_s: int) -> float | None:
    raw = environ.get("DAILYQ_CLAIM_MARGIN_S")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"DAILYQ_CLAIM_MARGIN_S={raw!r} is not a number of seconds") from None
    if not 1 <= value <= claim_ttl_s / 2:
        raise ConfigError(f"DAILYQ_CLAIM_MARGIN_S={raw!r} must be between 1 and half of DAILYQ_CLAIM_TTL_S "
                          f"({claim_ttl_s / 2:g})")
    return value


def _port_env(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}={raw!r} is not a port: use a number from 1 to 65535, or leave it unset")
    return port


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = "dailyq"
    node_name: str = "node"
    tasks_module: str = "jobs"
    retention_days: int = 7
    # Leader lease: renewed every second, so a dead leader is replaced within this TTL
    # plus one tick. Short is safe: every fan-out is fenced by the lease.
    lease_ttl_s: int = 3
    # Run claim: renewed by the executing process every second (at most); the leader takes
    # a run over once its claim expired. A copy that could not confirm its claim for
    # claim_ttl_s - claim_margin_s stops its task, so it never runs beside its successor.
    # See docs/failure-semantics.md for the trade-off (outages ridden out vs. recovery time).
    claim_ttl_s: int = 30
    claim_margin_s: float | None = None  # None: guard.default_claim_margin_s(claim_ttl_s)
    # Alerts (alerts.py): POSTed to this URL, a secret (see webhook_url.py); None: off.
    # Left out of repr(): a Settings that ends up in a log must not carry the token.
    alert_url: str | None = field(default=None, repr=False)
    # A leaderless stretch longer than this is reported (no_leader) when a leader is back.
    alert_no_leader_s: int = 60
    # A failed delivery is retried after alert_retry_s, then twice that, ... at most
    # alert_retry_max_s apart, until the alert is an hour old.
    alert_retry_s: int = 5
    alert_retry_max_s: int = 300
    # Failures of one task within this long after its run_failed are sent as one
    # runs_failed digest per window (alert_digest.py); 0: each failure its own run_failed.
    alert_group_s: int = 60
    # Prometheus metrics of the scheduler process (metrics.py); None: not served.
    metrics_port: int | None = None
    metrics_bind: str = DEFAULT_METRICS_BIND
    # Rolling deploys (deploys.py): a run that no live node's table has had for this long
    # ends ``removed``; nodes whose tables differ for longer than table_skew_alert_s raise
    # ``tables_differ``.
    removed_grace_s: int = 600
    table_skew_alert_s: int = 900
    # Claims (with their fencing tokens), finishes and fan-out chunks count only once this
    # many replicas acknowledged them (Redis WAIT, replicas.py); 0: no waiting.
    wait_replicas: int = 0
    # How long RQ keeps a finished run's job hash and its result (the worker's RQ
    # ``default_result_ttl``), for rq-dashboard and Job.return_value(); dailyq's own day
    # record keeps the outcome for retention_days. A result in RQ is a Redis stream per run
    # (about 5 KB), most of a run's memory, and nothing of dailyq reads it. 0 deletes the
    # job as it finishes, which costs RQ more commands per run than letting it expire.
    job_ttl_s: int = 60
    # How often each RQ worker does its maintenance (RQ's ``maintenance_interval``: cleans
    # its registries, restarts its retry scheduler after an outage). RQ's default is 600 s,
    # too long for retries with backoff (rq_seam.py).
    worker_maintenance_s: int = 60
    # The outside heartbeat (heartbeat_ping.py): the leader POSTs to this URL every
    # heartbeat_s while it leads and Redis answers; a secret like alert_url. None: off.
    heartbeat_url: str | None = field(default=None, repr=False)
    heartbeat_s: int = 60

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        prefix = env.get("DAILYQ_PREFIX") or "dailyq"
        if any(c.isspace() for c in prefix) or ":" in prefix:
            raise ConfigError(f"DAILYQ_PREFIX={prefix!r} must not contain spaces or ':'")
        claim_ttl_s = _int_env(env, "DAILYQ_CLAIM_TTL_S", 30, minimum=3)
        raw_alert_url = env.get("DAILYQ_ALERT_URL") or ""
        retry_s = _int_env(env, "DAILYQ_ALERT_RETRY_S", 5)
        raw_heartbeat_url = env.get("DAILYQ_HEARTBEAT_URL") or ""
        return cls(
            redis_url=env.get("REDIS_URL") or DEFAULT_REDIS_URL,
            prefix=prefix,
            node_name=env.get("NODE_NAME") or socket.gethostname(),
            tasks_module=env.get("DAILYQ_TASKS") or "jobs",
            retention_days=_int_env(env, "DAILYQ_RETENTION_DAYS", 7),
            lease_ttl_s=_int_env(env, "DAILYQ_LEASE_TTL_S", 3, minimum=2),
            claim_ttl_s=claim_ttl_s,
            claim_margin_s=_margin_env(env, claim_ttl_s),
            alert_url=check_alert_url(raw_alert_url) if raw_alert_url.strip() else None,
            alert_no_leader_s=_int_env(env, "DAILYQ_ALERT_NO_LEADER_S", 60),
            alert_retry_s=retry_s,
            alert_retry_max_s=_int_env(env, "DAILYQ_ALERT_RETRY_MAX_S", max(300, retry_s), minimum=retry_s),
            alert_group_s=_int_env(env, "DAILYQ_ALERT_GROUP_S", 60, minimum=0),
            metrics_port=_port_env(env, "DAILYQ_METRICS_PORT"),
            metrics_bind=(env.get("DAILYQ_METRICS_BIND") or DEFAULT_METRICS_BIND).strip(),
            removed_grace_s=_int_env(env, "DAILYQ_REMOVED_GRACE_S", 600),
            table_skew_alert_s=_int_env(env, "DAILYQ_TABLE_SKEW_ALERT_S", 900),
            wait_replicas=_int_env(env, "DAILYQ_WAIT_REPLICAS", 0, minimum=0),
            job_ttl_s=_int_env(env, "DAILYQ_JOB_TTL_S", 60, minimum=0),
            worker_maintenance_s=_int_env(env, "DAILYQ_WORKER_MAINTENANCE_S", 60),
            heartbeat_url=check_heartbeat_url(raw_heartbeat_url) if raw_heartbeat_url.strip() else None,
            heartbeat_s=_int_env(env, "DAILYQ_HEARTBEAT_S", 60),
        )

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def retention_s(self) -> int:
        return self.retention_days * 86400

    def redacted_url(self) -> str:
        return redact_url(self.redis_url)

    def redacted_alert_url(self) -> str | None:
        """The alert URL as it may be shown: ``scheme://host/…``."""
        return redact_webhook_url(self.alert_url) if self.alert_url else None

    def redacted_heartbeat_url(self) -> str | None:
        """The outside heartbeat's URL as it may be shown: ``scheme://host/…``."""
        return redact_webhook_url(self.heartbeat_url) if self.heartbeat_url else None

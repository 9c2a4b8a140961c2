"""Settings read once from the environment.

Only the entry points call ``Settings.from_env``; everything below them takes a
``Settings`` and a connection (made by connection.py) as arguments.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

from .connection import redact_url
from .errors import ConfigError
from .keys import Keys

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        prefix = env.get("DAILYQ_PREFIX") or "dailyq"
        if any(c.isspace() for c in prefix) or ":" in prefix:
            raise ConfigError(f"DAILYQ_PREFIX={prefix!r} must not contain spaces or ':'")
        claim_ttl_s = _int_env(env, "DAILYQ_CLAIM_TTL_S", 30, minimum=3)
        return cls(
            redis_url=env.get("REDIS_URL") or DEFAULT_REDIS_URL,
            prefix=prefix,
            node_name=env.get("NODE_NAME") or socket.gethostname(),
            tasks_module=env.get("DAILYQ_TASKS") or "jobs",
            retention_days=_int_env(env, "DAILYQ_RETENTION_DAYS", 7),
            lease_ttl_s=_int_env(env, "DAILYQ_LEASE_TTL_S", 3, minimum=2),
            claim_ttl_s=claim_ttl_s,
            claim_margin_s=_margin_env(env, claim_ttl_s),
        )

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def retention_s(self) -> int:
        return self.retention_days * 86400

    def redacted_url(self) -> str:
        return redact_url(self.redis_url)

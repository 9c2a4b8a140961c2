"""Start-up checks of the Redis server: warn when it may lose our keys.

dailyq's keys carry TTLs (records, finished sets, claims, the lease); a
``volatile-*`` or ``allkeys-*`` eviction policy may drop them under memory pressure,
which can re-run finished work. A server that persists nothing forgets everything
on restart. Like RedBeat, we check at start; unlike it, we warn and go on, since
managed Redis services often hide CONFIG.
"""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import RedisError

from .settings import Settings

log = logging.getLogger(__name__)


def server_warnings(connection: Redis) -> list[str]:
    warnings = []
    try:
        policy = str(connection.config_get("maxmemory-policy").get("maxmemory-policy") or "")
        save = str(connection.config_get("save").get("save") or "")
        aof = str(connection.config_get("appendonly").get("appendonly", "no"))
    except RedisError as exc:  # CONFIG is often disabled on managed services
        return [f"could not read the server's config ({exc}); make sure maxmemory-policy is noeviction "
                "and persistence (AOF) is on"]
    if policy.startswith(("allkeys-", "volatile-")):
        warnings.append(f"maxmemory-policy is {policy}: Redis may evict dailyq's keys (finished sets, claims) "
                        "and re-run finished work; set it to noeviction")
    if aof != "yes" and not save:
        warnings.append("Redis persists nothing (no AOF, no RDB save): a Redis restart forgets the day's "
                        "progress; turn on appendonly")
    return warnings


def warn_about_server(connection: Redis, settings: Settings) -> None:
    for warning in server_warnings(connection):
        log.warning("node %s: %s", settings.node_name, warning)

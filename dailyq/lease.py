"""Owner-token leases in Redis: the leader lock and the per-run claims.

A lease is a key whose value names its owner and which expires unless the owner
renews it. Every check-and-set is one Lua script (scripts/lease.py), so a holder that
paused past its TTL can neither renew nor delete a lease that has since passed to
someone else (rq-scheduler's stock lock deletes without checking, which is what we
replace).
"""

from __future__ import annotations

from redis import Redis

from .redis_values import as_optional_text
from .scripts import scripts_for


class Lease:
    """One owner's handle on a lease key. ``owner`` must be unique per holder."""

    def __init__(self, connection: Redis, key: str, owner: str, ttl_ms: int) -> None:
        self.connection = connection
        self.key = key
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._scripts = scripts_for(connection)

    def acquire_or_renew(self) -> bool:
        return self._scripts.lease_acquire_or_renew(lease_key=self.key, owner=self.owner, ttl_ms=self.ttl_ms).run()

    def renew(self) -> bool:
        return self._scripts.lease_renew(lease_key=self.key, owner=self.owner, ttl_ms=self.ttl_ms).run()

    def release(self) -> bool:
        return self._scripts.lease_release(lease_key=self.key, owner=self.owner).run()

    def holder(self) -> str | None:
        value = self.connection.get(self.key)
        return as_optional_text(value)

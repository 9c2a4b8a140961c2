"""Owner-token leases in Redis: the leader lock and the per-run claims.

A lease is a key whose value names its owner and which expires unless the owner
renews it. Every check-and-set is one Lua script, so a holder that paused past its
TTL can neither renew nor delete a lease that has since passed to someone else
(rq-scheduler's stock lock deletes without checking, which is what we replace).
"""

from __future__ import annotations

from redis import Redis

# KEYS[1] = lease key; ARGV[1] = owner value; ARGV[2] = ttl in ms.
# Takes a free lease or extends our own; returns 1 when we hold it afterwards.
ACQUIRE_OR_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] = lease key; ARGV[1] = owner value; ARGV[2] = ttl in ms.
# Extends the lease only while we still own it; never takes a free one.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS[1] = lease key; ARGV[1] = owner value. Compare-and-delete.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """One owner's handle on a lease key. ``owner`` must be unique per holder."""

    def __init__(self, connection: Redis, key: str, owner: str, ttl_ms: int) -> None:
        self.connection = connection
        self.key = key
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._acquire_or_renew = connection.register_script(ACQUIRE_OR_RENEW)
        self._renew = connection.register_script(RENEW)
        self._release = connection.register_script(RELEASE)

    def acquire_or_renew(self) -> bool:
        return bool(self._acquire_or_renew(keys=[self.key], args=[self.owner, self.ttl_ms]))

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]))

    def release(self) -> bool:
        return bool(self._release(keys=[self.key], args=[self.owner]))

    def holder(self) -> str | None:
        value = self.connection.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

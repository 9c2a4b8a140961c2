"""``DAILYQ_WAIT_REPLICAS=N``: writes that count only once N replicas have them.

Redis replicates asynchronously: the primary answers a write before any replica has it.
A failover to a replica that lagged (promoted by Sentinel or by a managed Redis) loses
the writes it had not received, and for dailyq those are claims (a second copy of a
run then starts beside the first), fencing tokens, finishes (the run executes again)
and fan-out chunks. With N > 0 each of them is followed by Redis's ``WAIT N timeout``,
which blocks until N replicas acknowledged every write the connection made, and counts
only when they did:

* a claim (BEGIN, and with it the fencing token) not acknowledged: the copy does not
  start its task; it confirms the claim again (guard.Guard) until N replicas have it, or
  until it finds the claim gone (lost with a failover) and claims the run afresh;
* a claim renewal not acknowledged does not count as a confirmation: a copy whose
  replicas stop acknowledging stops its task before the claim they hold could lapse
  (guard.ClaimKeeper), as a copy cut off from Redis does;
* a finish (FINISH) not acknowledged is sent again, and waited for again, before the
  run counts as done (guard.PendingFinish): after a failover that lost it, it applies
  afresh on the new primary while the claim there is still this copy's;
* a fan-out chunk not acknowledged raises ``ReplicasBehind`` (fanout.py): the leader
  retries the slot (idempotently) instead of moving its cursor past it.

Each confirmation also proves that the server answering it has the write (a renewal
that finds the claim ours, FINISH's replay, the chunk's job ids in the enqueued set),
in the same round trip as the WAIT: a reconnect between the write and the WAIT may reach
a new primary, whose replicas acknowledging its own writes says nothing of the lost one.

``WAIT`` counts the replicas that acknowledged the *connection's* writes, and redis-py
hands each command a connection from a pool: the write it must cover may have gone out
on another one (RQ's own transactions). So the WAIT rides in one pipeline with a write
of its own (``mark``, one small key; or the caller's own write, a claim renewal): a
replica that acknowledged that later write has every earlier one too, as replication is
one ordered stream.

What it cannot do: a failover that promotes a replica which did not acknowledge (with
two replicas and N = 1, the other one) still loses the write. Sentinel promotes the
replica with the most data, which has it; otherwise set N to the number of replicas.
After a failover, the new primary needs N replicas of its own before any run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from .keys import Keys

# How long one WAIT blocks at most (ms). A replica that keeps up answers within a round
# trip; this bounds each confirmation, which callers repeat while replicas lag.
WAIT_TIMEOUT_MS = 1000
# The mark expires by itself: it carries nothing, it only has to be a write.
MARK_TTL_MS = 60_000


class ReplicasBehind(RedisError):
    """Fewer than DAILYQ_WAIT_REPLICAS replicas acknowledged a write in time. A RedisError:
    callers ride it out as they ride out Redis being away (retry, then go on)."""


class Queueable(Protocol):
    """A call sent in a pipeline someone else executes: a ScriptCall, or a ``Command``."""

    def queue_in(self, pipeline: Pipeline) -> None: ...

    def parse(self, reply: Any) -> Any: ...


@dataclass(frozen=True)
class Command:
    """One plain Redis command for ``ReplicaAcks.after``, and how to read its reply."""

    args: Sequence[Any]
    parse: Callable[[Any], Any]

    def queue_in(self, pipeline: Pipeline) -> None:
        pipeline.execute_command(*self.args)


def all_members(key: str, members: Sequence[str]) -> Command:
    """True when every one of ``members`` is in the set ``key``."""
    return Command(("SMISMEMBER", key, *members), lambda reply: all(int(flag) for flag in reply))


@dataclass(frozen=True)
class ReplicaAcks:
    """WAIT for ``replicas`` replicas on ``connection``; with 0 (the default) nothing waits."""

    connection: Redis
    keys: Keys
    replicas: int = 0
    timeout_ms: int = WAIT_TIMEOUT_MS

    @property
    def on(self) -> bool:
        return self.replicas > 0

    def after(self, *calls: Queueable, mark: bool = True) -> tuple[list[Any], int]:
        """Send ``calls``, then (with ``mark``) a write of our own, then WAIT, in one round
        trip on one connection: the calls' parsed replies, and how many replicas
        acknowledged every write made before the WAIT (by this process or any other).
        ``mark=False`` when the calls themselves always write when it matters."""
        with self.connection.pipeline(transaction=False) as pipe:
            for call in calls:
                call.queue_in(pipe)
            if mark:
                pipe.set(self.keys.replica_mark, "1", px=MARK_TTL_MS)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            replies = pipe.execute()
        return [call.parse(reply) for call, reply in zip(calls, replies)], int(replies[-1])

    def acknowledged(self, count: int) -> bool:
        return count >= self.replicas

    def confirm(self, what: str, *checks: Queueable) -> None:
        """Return once ``replicas`` replicas have every write made so far and each of
        ``checks`` (reads proving the server that answers has ``what``) is true; else
        raise ReplicasBehind naming ``what``."""
        if not self.on:
            return
        found, count = self.after(*checks)
        if not all(found):
            raise ReplicasBehind(f"{what} is not on the Redis that answers now (lost with a failover?)")
        if not self.acknowledged(count):
            raise ReplicasBehind(f"only {count} of {self.replicas} replicas acknowledged {what} within "
                                 f"{self.timeout_ms} ms (DAILYQ_WAIT_REPLICAS={self.replicas})")

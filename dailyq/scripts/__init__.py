"""Every Lua script dailyq runs, grouped by concern, and one typed wrapper per script.

| module | its scripts |
| --- | --- |
| shared.py | the Lua helpers scripts are built from, ``ScriptCall``, ``ScriptSet`` |
| lease.py | the leader lease and the leadership mark |
| lifecycle.py | a run queued, begun (claim and fence), renewed, finished, failed, cancelled |
| recovery.py | runs taken over from dead copies, RQ's dropped jobs settled or requeued |
| dependencies.py | runs parked for upstream runs, the day's dependency counts |
| permits.py | permits of tasks with limits, runs set aside by a limit or a pause |
| deploys.py | runs left by a node whose table lacks their task |
| outbox.py | the alert outbox |
| params.py | stored computed params, table differences between nodes |
| redis_faults.py | the generation mark of a Redis that lost its data, Redis out of memory |
| doctor.py | ``doctor --repair`` |

Each script documents its ``KEYS`` and ``ARGV`` in a header inside the Lua, and binds
them to named locals at its top; Redis runs no includes, so the shared helpers a script
uses are prepended to it (shared.py says which there are).

A few scripts run on a Redis out of memory (``allow_oom``): the lease, the leadership
mark, and what lets a run that executes now renew its claim and record its end. Each
writes a handful of small keys that exist already or go away with it, so a full Redis
grows by a few hundred bytes per executing run at most, while everything that adds a
run's worth of data (fan-out, BEGIN, the outbox) stays refused.

A wrapper method takes named, typed arguments and returns a ``ScriptCall``: ``run()``
sends it now and returns the parsed reply; ``queue_in(pipeline)`` adds it to a
pipeline someone else executes (RQ's own MULTI/EXEC), and ``parse`` reads the reply
taken from there. ``scripts_for(connection)`` gives the one ``Scripts`` of a connection:
every concern's wrappers on one object, each script registered at its first call.
"""

from __future__ import annotations

import weakref

from redis import Redis

from .dependencies import DependencyScripts
from .deploys import DeployScripts
from .doctor import DoctorScripts
from .lease import LeaseScripts
from .lifecycle import RunScripts
from .outbox import OutboxScripts
from .params import ParamScripts
from .permits import PermitScripts
from .recovery import RecoveryScripts
from .redis_faults import RedisFaultScripts
from .shared import ScriptCall

__all__ = ["ScriptCall", "Scripts", "scripts_for"]


class Scripts(LeaseScripts, RunScripts, RecoveryScripts, DependencyScripts, PermitScripts, DeployScripts,
              OutboxScripts, ParamScripts, RedisFaultScripts, DoctorScripts):
    """Every script, registered on one connection: get it with ``scripts_for``."""


# One Scripts per connection object, dropped with it. A cache, not shared state: building
# one twice is harmless, so no lock.
_registered: "weakref.WeakKeyDictionary[Redis, Scripts]" = weakref.WeakKeyDictionary()


def scripts_for(connection: Redis) -> Scripts:
    """The scripts registered on ``connection`` (once per connection object)."""
    scripts = _registered.get(connection)
    if scripts is None:
        scripts = _registered[connection] = Scripts(connection)
    return scripts

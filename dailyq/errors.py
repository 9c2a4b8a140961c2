"""The one exception type a user sees.

Anything raised as ``DailyqError`` is printed by the CLI as a single line on stderr
(no traceback) and turns into a non-zero exit; running loops log it and go on.
"""


class DailyqError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 1


class ConfigError(DailyqError):
    """Bad input: environment, arguments or the task table (exit 2, like argparse)."""

    exit_code = 2


class RedisUnavailable(DailyqError):
    """Redis cannot be reached or refused us."""

    exit_code = 3


class LeaseLost(DailyqError):
    """The caller's leader lease is gone: it must not write as leader any more."""


class ClaimLost(DailyqError):
    """This copy of a run no longer holds the run's claim: another copy may be executing
    it (after a network partition or a freeze), so this one must not write anything more.
    Raised by ``current_run().check()``; a task that lets it propagate ends quietly
    (the run is neither finished nor failed by this copy)."""

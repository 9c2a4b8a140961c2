"""An example task: stands in for a long job so a newcomer sees the work spread."""

import os
import time

from dailyq import current_run


def crunch(param: str) -> str:
    # The run's day, not today's date: a backfill (trigger/rerun --date) computes its own day.
    run = current_run()
    day = run.day.isoformat() if run else "today"
    # A few seconds of "work"; DAILYQ_EXAMPLE_SLEEP_S shortens it for quick checks.
    time.sleep(float(os.environ.get("DAILYQ_EXAMPLE_SLEEP_S", "3")))
    return f"{param} for {day} done on {os.environ.get('NODE_NAME', 'this node')}"

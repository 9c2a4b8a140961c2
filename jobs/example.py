"""An example task: stands in for a long job so a newcomer sees the work spread."""

import os
import time


def crunch(param: str) -> str:
    # A few seconds of "work"; DAILYQ_EXAMPLE_SLEEP_S shortens it for quick checks.
    time.sleep(float(os.environ.get("DAILYQ_EXAMPLE_SLEEP_S", "3")))
    return f"done {param} on {os.environ.get('NODE_NAME', 'this node')}"

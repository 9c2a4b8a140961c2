"""Entry point for this node's worker, and an RQ config module.

* ``python worker_entry.py [--burst] [--simple] [--concurrency N]`` starts a dailyq
  worker (N of them, supervised by this process: dailyq/worker/pool.py).
* ``rq worker -c worker_entry -w dailyq.worker.DailyWorker -S rq.serializers.JSONSerializer --with-scheduler``
  does the same through RQ's own CLI, which reads the settings below.
"""

import os
import socket
import sys

# Read by ``rq worker -c worker_entry``; the dailyq code itself reads the environment
# through dailyq.settings.Settings.
REDIS_URL = os.environ.get("REDIS_URL") or "redis://localhost:6379/0"
QUEUES = [os.environ.get("DAILYQ_PREFIX") or "dailyq"]
NAME = f"{os.environ.get('NODE_NAME') or socket.gethostname()}.{os.getpid()}"

if __name__ == "__main__":
    from dailyq.cli import worker_main

    sys.exit(worker_main())

"""Entry point: ``python scheduler.py`` runs this node's scheduler; see ``--help``
for ``status``, ``trigger``, ``rerun`` and ``demo``. The machinery is in dailyq/."""

import sys

from dailyq.cli import main

if __name__ == "__main__":
    sys.exit(main())

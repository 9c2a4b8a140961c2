"""Where the entry points live, for code that starts them as processes."""

from pathlib import Path


def project_root() -> Path:
    """The folder holding scheduler.py, worker_entry.py and jobs/."""
    return Path(__file__).resolve().parent.parent

"""ruff and mypy, as configured in pyproject.toml, run as part of the test command:
a lint or type error fails the suite like any other test."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=400)


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


# mypy's incremental cache outside the checkout, as the floors test keeps its wheels: a clean
# clone (CI) then checks in about a second what took 5-50 s cold. mypy validates each cached
# module by its content's hash, so a cache from another clone or venv is only a speed-up.
MYPY_CACHE = Path(tempfile.gettempdir()) / "dailyq-mypy-cache"


@pytest.mark.slow
def test_mypy_finds_nothing():
    result = run_tool("mypy", "--cache-dir", str(MYPY_CACHE))
    assert result.returncode == 0, result.stdout + result.stderr

"""The declared floors of the runtime dependencies are true (issue 19, item 5): the
lowest version pyproject.toml allows of each one installs together with the others
(pip's resolver decides, with their own requirements), and dailyq runs a short day on
them: a trigger, a burst worker, a leader with its /metrics, ``status`` as text and JSON.

Fast on purpose: a venv without pip (pip runs from the test's venv, ``--python``) and a
wheel cache in /tmp that later runs install from offline; only a first run on a machine
downloads (from the registry, through pip's own configuration)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

import pytest

from dailyq.redis_server import free_port
from tests.support.helpers import ROOT, base_env, quiet_sample_at, wait_for

WHEELS = Path("/tmp/dailyq-floor-wheels")
DAY = "2026-11-26"


def declared_floors() -> list[str]:
    """``name==floor`` for each runtime dependency declared as ``name>=floor[,...]``."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert block is not None
    pins = []
    for requirement in re.findall(r'^\s*"([^"]+)"', block.group(1), re.M):
        found = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        assert found, f"dependency without a floor: {requirement}"
        pins.append(f"{found.group(1)}=={found.group(2)}")
    return pins


def _canonical(pin: str) -> tuple[str, tuple[int, ...]]:
    """``rq==3.0`` and ``rq==3.0.0`` alike (name as PyPI normalizes it, zeros at the end dropped)."""
    name, version = pin.split("==")
    numbers = [int(part) for part in re.findall(r"\d+", version)]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return re.sub(r"[-_.]+", "-", name).lower(), tuple(numbers)


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_lowest_declared_dependencies_install_together_and_run_a_day(tmp_path, redis_server, prefix, processes):
    pins = declared_floors()
    assert any(pin.startswith("redis==") for pin in pins) and any(pin.startswith("rq==") for pin in pins)
    started = time.monotonic()
    env_dir = tmp_path / "floors"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    install = ["--python", python, "install", "--quiet", "--no-index", "--find-links", str(WHEELS), *pins]
    if WHEELS.is_dir() and pip(*install).returncode == 0:
        how = "from the wheel cache"
    else:  # first run here (or a floor moved): fetch the pins and what they need, then install offline
        # Wheels of everything (crontab, which rq-scheduler needs, is a source release: built once).
        fetched = pip("wheel", "--quiet", "--wheel-dir", str(WHEELS), *pins)
        assert fetched.returncode == 0, fetched.stderr[-2000:]
        how = "after downloading"
        installed = pip(*install)
        assert installed.returncode == 0, installed.stderr[-2000:]  # ResolutionImpossible: floors that conflict
    listed = pip("--python", python, "list", "--format=freeze")
    assert listed.returncode == 0, listed.stderr
    installed = {_canonical(line) for line in listed.stdout.split()}
    assert {_canonical(pin) for pin in pins} <= installed, listed.stdout  # the floors themselves, not newer
    print(f"floors installed {how} in {time.monotonic() - started:.1f}s: {' '.join(pins)}")

    env = base_env(redis_server.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="3", SAMPLE_AT=quiet_sample_at(),
                   NODE_NAME="floors")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([python, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    # The floors are what the day runs on, not this venv's newer packages; dailyq from this tree.
    floors = dict(_canonical(pin) for pin in pins)
    redis_version, rq_version, dailyq_file = run(
        "-c", "import dailyq, redis, rq; print(redis.__version__, rq.__version__, dailyq.__file__)").stdout.split()
    assert _canonical(f"redis=={redis_version}")[1] == floors["redis"]
    assert _canonical(f"rq=={rq_version}")[1] == floors["rq"]
    assert dailyq_file.startswith(str(ROOT)), dailyq_file
    run("scheduler.py", "trigger", "--date", DAY)
    run("worker_entry.py", "--burst")
    port = free_port()
    # Not processes.start (it runs this venv's python): the leader runs on the floors too.
    scheduler = subprocess.Popen([python, "scheduler.py"], cwd=ROOT, env=dict(env, DAILYQ_METRICS_PORT=str(port)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    processes.processes.append(scheduler)  # stopped at teardown with the others
    metrics: list[str] = []

    def scraped() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                metrics.append(response.read().decode())
        except OSError:
            return False
        return "dailyq_leader 1.0" in metrics[-1]

    wait_for(scraped, timeout=30, what="the leader's /metrics")
    status = json.loads(run("scheduler.py", "status", "--date", DAY, "--json").stdout)
    assert [r["state"] for r in status["runs"]] == ["finished"] * 3
    assert "任务参数0" in run("scheduler.py", "status", "--date", DAY).stdout  # the table, measured by wcwidth
    print(f"floors: install and day in {time.monotonic() - started:.1f}s")

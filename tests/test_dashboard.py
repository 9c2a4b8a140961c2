"""The Procfile's ``dashboard:`` line, run as written: rq-dashboard on loopback, basic
auth, JSON mode (it can read our jobs), and a refusal to serve beyond loopback
without a login."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path
from typing import Iterator

import pytest

from dailyq.fanout import trigger
from dailyq.runs import META_KEY
from dailyq.worker import make_queue
from tests.helpers import ROOT, wait_for

USER, PASSWORD = "ops", "s3cret-ä"
DAY = date(2026, 11, 26)


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, sep, command = line.partition(":")
        if sep and process.strip() == name:
            return command.strip()
    raise AssertionError(f"no {name}: line in the Procfile")


def shell_env(node_env: dict[str, str], **extra: str) -> dict[str, str]:
    """The test's environment with this venv's bin first on PATH, so the Procfile's
    ``python`` is the one the tests run with (as under an activated venv)."""
    env = {k: v for k, v in node_env.items() if not k.startswith(("DASHBOARD_", "RQ_DASHBOARD_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def dashboard(node_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The Procfile's dashboard line running on a free loopback port; yields its base URL."""
    port = free_port()
    env = shell_env(node_env, DASHBOARD_PORT=str(port), DASHBOARD_USER=USER, DASHBOARD_PASSWORD=PASSWORD)
    log_path = tmp_path / "dashboard.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(procfile_command("dashboard"), shell=True, cwd=ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert process.poll() is None, f"the dashboard exited: {log_path.read_text()}"
        try:
            return get(f"{base}/0/data/queues.json", (USER, PASSWORD))[0] == 200
        except OSError:
            return False

    try:
        wait_for(answers, timeout=60, what="the dashboard to answer", every=0.25)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def test_the_procfile_dashboard_lists_our_queue_and_reads_our_json_jobs(dashboard, connection, settings, table):
    result = trigger(connection, settings.keys, make_queue(connection, settings.keys), table, DAY, ["sample"],
                     settings.retention_s)
    job_ids = sorted(result.enqueued)
    assert job_ids

    status, body = get(f"{dashboard}/0/data/queues.json", (USER, PASSWORD))
    assert status == 200
    queues = {q["name"]: q["count"] for q in json.loads(body)["queues"]}
    assert queues[settings.keys.queue_name] == len(job_ids)

    queued = f"{dashboard}/0/data/jobs/{settings.keys.queue_name}/queued/100/asc/1.json"
    status, body = get(queued, (USER, PASSWORD))
    assert status == 200
    assert sorted(j["id"] for j in json.loads(body)["jobs"]) == job_ids

    # A job's page decodes its meta (our run identity) with the dashboard's serializer:
    # with rq-dashboard's default, pickle, this page is a 500 for our JSON jobs.
    status, body = get(f"{dashboard}/0/data/job/{job_ids[0]}.json", (USER, PASSWORD))
    assert status == 200, body[:300]
    assert json.loads(json.loads(body)["metadata"])[META_KEY]["task"] == "sample"


def test_the_dashboard_wants_its_login(dashboard):
    assert get(f"{dashboard}/0/data/queues.json")[0] == 401
    assert get(f"{dashboard}/0/data/queues.json", (USER, "wrong"))[0] == 401
    assert get(f"{dashboard}/", (USER, PASSWORD))[0] == 200


def test_binding_beyond_loopback_without_a_login_is_refused_in_one_line(node_env):
    env = shell_env(node_env, DASHBOARD_BIND="0.0.0.0", DASHBOARD_PORT=str(free_port()))
    refused = subprocess.run(procfile_command("dashboard"), shell=True, cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "DASHBOARD_USER" in lines[0] and "0.0.0.0" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("extra, expected", [
    ({"DASHBOARD_PORT": "nine"}, "DASHBOARD_PORT='nine'"),
    ({"DASHBOARD_USER": "ops"}, "DASHBOARD_PASSWORD is not set"),
])
def test_bad_dashboard_settings_are_one_line_errors(node_env, extra, expected):
    refused = subprocess.run([sys.executable, "-m", "dailyq.dashboard"], cwd=ROOT, env=shell_env(node_env, **extra),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and expected in refused.stderr, refused.stderr

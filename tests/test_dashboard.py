"""The Procfile's ``dashboard:`` line, run as written: rq-dashboard on loopback, basic
auth, JSON mode (it can read our jobs, also a busy worker's, and never unpickles),
the day's timeline at /dailyq/ behind the same login, and a refusal to serve beyond
loopback without a login. The browser tests drive headless Chromium (tests/support/browser.py)
and keep screenshots in test-artifacts/."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Iterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from rq.registry import FailedJobRegistry, StartedJobRegistry

from dailyq.clock import utc_now
from dailyq.commands import trigger
from dailyq.ops.live_timeline import timeline_page
from dailyq.runs import META_KEY
from dailyq.table import default_day
from dailyq.worker.workers import make_queue
from tests.support.browser import Browser, chromium
from tests.support.helpers import ROOT, children_of, run_cli, wait_for

USER, PASSWORD = "ops", "s3cret-ä"
AUTH = (USER, PASSWORD)
DAY = date(2026, 11, 26)
ARTIFACTS = ROOT / "test-artifacts"


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


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(url: str, auth: tuple[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    return get_response(url, auth, method)[:2]  # type: ignore[return-value]


def get_response(url: str, auth: tuple[str, str] | None = None,
                 method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers; ``method`` POST sends an empty body."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if auth:
        request.add_header("Authorization", basic_auth(*auth))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


@pytest.fixture
def dashboard(node_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The Procfile's dashboard line running on a free loopback port; yields its base URL."""
    with running_dashboard(node_env, tmp_path) as base:
        yield base


@contextmanager
def running_dashboard(node_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """The Procfile's dashboard line with ``node_env`` (the task table the workers
    use), with a login, on a free loopback port; yields its base URL."""
    port = free_port()
    env = shell_env(node_env, DASHBOARD_PORT=str(port), DASHBOARD_USER=USER, DASHBOARD_PASSWORD=PASSWORD)
    log_path = log_dir / f"dashboard-{port}.log"
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


# --- a busy worker, as rq-dashboard shows it ------------------------------------------------

def slow_batch(node_env: dict[str, str], params: int, sleep_s: float) -> dict[str, str]:
    """The sample task alone, ``params`` runs of ``sleep_s`` each, triggered for DAY; its env."""
    env = dict(node_env, SAMPLE_ONLY="1", SAMPLE_PARAMS=str(params), SAMPLE_SLEEP_S=str(sleep_s))
    result = run_cli(["trigger", "--date", DAY.isoformat(), "--task", "sample"], env)
    assert result.returncode == 0, result.stderr
    return env


def busy_workers(base: str, queue: str) -> dict[str, dict]:
    """workers.json, which must answer 200 (rq-dashboard 0.9.0 alone answers 500 while a
    worker executes one of our JSON jobs): {worker name: its current job} of busy ones on
    ``queue`` (the test's prefix). RQ's worker registry is not prefixed: the session's
    Redis may still list a worker an earlier test killed mid-run until its key expires."""
    status, body = get(f"{base}/0/data/workers.json", AUTH)
    assert status == 200, body[:500]
    return {w["name"]: w["current_job"] for w in json.loads(body)["workers"]
            if w["current_job"] != "idle" and queue in w["queues"]}


def test_workers_json_shows_each_busy_workers_run_while_runs_execute(node_env, processes, tmp_path):
    env = slow_batch(node_env, params=2, sleep_s=3)
    with running_dashboard(env, tmp_path) as base:
        assert busy_workers(base, env["DAILYQ_PREFIX"]) == {}
        for node in ("node-a", "node-b"):
            processes.start("worker_entry.py", dict(env, NODE_NAME=node), "--burst", log_dir=tmp_path)
        seen: dict[str, dict] = {}

        def both_busy() -> bool:
            busy = busy_workers(base, env["DAILYQ_PREFIX"])
            seen.update(busy)
            return len(busy) == 2

        wait_for(both_busy, timeout=60, what="both workers executing a run at once", every=0.2)

    assert {name.split(".")[0] for name in seen} == {"node-a", "node-b"}
    runs = sorted(job["call_string"] for job in seen.values())
    # Each worker's run, by task and param (and slot), as our jobs describe themselves.
    assert runs == [f'sample("任务参数{i}") slot {DAY.isoformat()}T03:00:00+00:00' for i in range(2)]
    for job in seen.values():
        assert job["description"] == job["call_string"] and job["job_id"].startswith("sample-")


def test_the_workers_page_shows_the_busy_worker_in_chromium(node_env, processes, tmp_path):
    chromium()  # skip (or fail on CI) before doing any work
    # Long enough to be still running when a slow (loaded) machine has started Chromium and
    # the page asks; the test ends as soon as the row shows.
    env = slow_batch(node_env, params=1, sleep_s=60)
    with running_dashboard(env, tmp_path) as base:
        worker = processes.start("worker_entry.py", dict(env, NODE_NAME="node-a"), "--burst", log_dir=tmp_path)
        wait_for(lambda: bool(busy_workers(base, env["DAILYQ_PREFIX"])), timeout=60, what="the worker to start its run")
        try:
            with Browser(tmp_path / "profile", tmp_path / "chromium.log") as browser:
                page = browser.open(f"{base}/0/view/workers", headers={"Authorization": basic_auth(*AUTH)})
                # This test's worker: its queue is the test's prefix (RQ's worker registry is
                # shared by every test on this Redis, and another test's worker may be listed).
                mine = json.dumps(env["DAILYQ_PREFIX"])
                row = page.wait_for(
                    bool, "([...document.querySelectorAll('#workers tr[data-role=worker]')]"
                          f".find(tr => tr.innerText.includes({mine})) || {{}}).innerText",
                    timeout=30, what="the Workers page to list the worker")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(ARTIFACTS / "dashboard-workers.png")
                table_text = page.evaluate("document.querySelector('#workers').innerText")
        finally:
            # The long run's work-horse (a process group of its own): end it, so the
            # worker's warm shutdown at teardown does not wait out the run.
            for horse in children_of(worker.pid):
                os.kill(horse, signal.SIGKILL)
    assert row.startswith("node-a.")
    assert f'sample("任务参数0") slot {DAY.isoformat()}' in row  # its current run, not "idle"
    assert "Loading..." not in table_text


# --- never unpickling -------------------------------------------------------------------------

class Planted:
    """Unpickling this creates a file: a stand-in for code someone able to write to
    Redis could make the dashboard run, if it ever unpickled a job."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_the_dashboard_never_unpickles_a_job(dashboard, connection, settings, tmp_path):
    marker = tmp_path / "unpickled"
    planted = pickle.dumps(Planted(marker))
    queue = make_queue(connection, settings.keys)
    job = queue.enqueue("tests.tables.sample_tasks.noop", 1, job_id=f"planted-{queue.name}")
    # The job's data and meta replaced by pickles, as RQ would store them (data compressed).
    connection.hset(job.key, mapping={"data": zlib.compress(planted), "meta": planted})
    for registry in (StartedJobRegistry, FailedJobRegistry):  # listed there too, as if it had run
        connection.zadd(registry(queue.name, connection=connection).key, {job.id: 9999999999})
    name = queue.name
    pages = [f"/0/data/job/{job.id}.json", f"/0/view/job/{job.id}", f"/0/data/jobs/{name}/queued/10/asc/1.json",
             f"/0/data/jobs/{name}/started/10/asc/1.json", f"/0/data/jobs/{name}/failed/10/asc/1.json",
             "/0/data/workers.json", "/0/data/queues.json"]
    for page in pages:
        status, body = get(f"{dashboard}{page}", AUTH)
        assert status in (200, 500), (page, status, body[:300])
    for action in (f"/job/{job.id}/requeue", f"/requeue/{name}"):
        get(f"{dashboard}{action}", AUTH, method="POST")
    assert not marker.exists(), "the dashboard unpickled a job"
    assert get(f"{dashboard}/0/data/queues.json", AUTH)[0] == 200

    # Where rq-dashboard does not pass our classes, RQ falls back to its pickle serializer:
    # in the dashboard's set-up that refuses to load (an error, never an unpickle).
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, rq_dashboard.web as web, redis, rq.job\n"
        "from dailyq.dashboard import read_jobs_as_json\n"
        "read_jobs_as_json(web)\n"
        "job = rq.job.Job.fetch(sys.argv[2], connection=redis.Redis.from_url(sys.argv[1]))\n"
        "print(sorted(job.meta))\n"
        "try:\n    job.func_name\nexcept rq.exceptions.DeserializationError as exc:\n"
        "    print('refused:', exc.__cause__)\n"), settings.redis_url, job.id], cwd=ROOT, capture_output=True,
        text=True,
        timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == [
        "['unserialized']", "refused: the dailyq dashboard never unpickles data from Redis (dailyq jobs are JSON)"]
    assert not marker.exists()


# --- the day's timeline at /dailyq/ ---------------------------------------------------------------

def test_the_timeline_wants_the_dashboards_login_and_a_good_date(dashboard, table):
    day = DAY.isoformat()
    for url in (f"{dashboard}/dailyq/", f"{dashboard}/dailyq/?date={day}", f"{dashboard}/dailyq/?date=bad"):
        assert get(url)[0] == 401
        assert get(url, (USER, "wrong"))[0] == 401

    before = default_day(table, utc_now())
    status, body, headers = get_response(f"{dashboard}/dailyq/", AUTH)
    after = default_day(table, utc_now())
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    page = body.decode()
    # Today by default, in the tasks' zone like `status` (read twice: midnight may pass).
    assert any(f'name="date" value="{d.isoformat()}"' in page for d in (before, after))
    assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"

    status, body = get(f"{dashboard}/dailyq/?date={day}", AUTH)
    assert status == 200 and f"<h1>dailyq — {day}</h1>" in body.decode()
    assert 'data-state="missed"' in body.decode()  # the table's runs of a day long gone, never triggered

    for bad in ("2026-02-30", "20261127", "yesterday", "2026-11-27%0Ax"):
        status, body, headers = get_response(f"{dashboard}/dailyq/?date={bad}", AUTH)
        text = body.decode()
        assert status == 400 and headers["Content-Type"].startswith("text/plain"), (bad, status)
        assert text.count("\n") == 1 and text.startswith("bad date ") and "YYYY-MM-DD" in text, text


def test_the_timeline_page_without_redis_is_a_503_in_one_line():
    def redis_is_down(day: date) -> dict:
        raise RedisConnectionError("Error 111 connecting to\nlocalhost:6379. Connection refused.")

    page = timeline_page("2026-11-27", redis_is_down, today=lambda: DAY, redis_shown="redis://:***@db:6379/0")
    assert (page.code, page.content_type) == (503, "text/plain; charset=utf-8")
    assert page.body == ("Redis at redis://:***@db:6379/0 failed: Error 111 connecting to localhost:6379. "
                         "Connection refused.\n")
    asked: list[date] = []
    page = timeline_page("", lambda day: asked.append(day) or {"date": day.isoformat(), "leader": None, "runs": []},
                         today=lambda: DAY, redis_shown="-")
    assert page.code == 200 and asked == [DAY] and "<form" in page.body  # ?date= (empty) is today


def test_the_live_timeline_grows_bars_by_itself_in_chromium(node_env, processes, tmp_path):
    chromium()
    # Runs long enough that the first reload (5 s) finds the batch still going (see the screenshots).
    env = slow_batch(node_env, params=4, sleep_s=2.5)
    read = ("({origin: performance.timeOrigin, bars: document.querySelectorAll('#timeline .run').length,"
            " picker: (document.querySelector('input[name=date]') || {}).value || null})")
    with running_dashboard(env, tmp_path) as base:
        with Browser(tmp_path / "profile", tmp_path / "chromium.log") as browser:
            page = browser.open(f"{base}/dailyq/?date={DAY.isoformat()}",
                                headers={"Authorization": basic_auth(*AUTH)})
            first = page.wait_for(lambda r: r.get("picker") == DAY.isoformat(), read, timeout=30,
                                  what="the timeline page")
            assert first["bars"] == 0  # triggered, but no worker yet: nothing has started
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(ARTIFACTS / "dashboard-timeline-before.png")

            for node in ("node-a", "node-b"):
                processes.start("worker_entry.py", dict(env, NODE_NAME=node), "--burst", log_dir=tmp_path)
            # The page reloads itself (a new document: a new timeOrigin); we never navigate again.
            later = page.wait_for(lambda r: r.get("origin") != first["origin"] and r.get("bars", 0) > 0, read,
                                  timeout=30,
                                  what="the page to reload itself with bars")
            page.screenshot(ARTIFACTS / "dashboard-timeline-after.png")
            lanes = page.evaluate("[...document.querySelectorAll('#timeline .lane')].map(l => l.dataset.node)")
    assert later["picker"] == DAY.isoformat() and later["bars"] >= 1
    assert set(lanes) <= {"node-a", "node-b"} and lanes


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

"""``report``: the day's timeline as one self-contained HTML page.

Unit tests check the maths and the escaping on fixed status dicts; the browser tests
build a real day (trigger + burst workers on two nodes), write the page with the CLI
and open it in headless Chromium, keeping a screenshot in test-artifacts/.
"""

from __future__ import annotations

import json

import pytest

from dailyq.ops.report import LIVE_REFRESH_S, LIVE_SCRIPT, render_report, timeline
from tests.support.browser import chromium, open_in_chromium
from tests.support.helpers import ROOT, run_cli

DAY = "2024-06-03"  # long past: runs nobody triggered show as "missed"
ARTIFACTS = ROOT / "test-artifacts"


def run(task: str, param, state: str, node: str | None, start: str | None, end: str | None = None,
        error: str | None = None) -> dict:
    def t(hms: str | None) -> str | None:
        return f"2026-11-27T{hms}+00:00" if hms else None

    return {"task": task, "param": param, "state": state, "node": node, "started_at": t(start), "ended_at": t(end),
            "attempts": 1 if start else 0, "error": error, "run_id": f"{task}-{json.dumps(param)}",
            "slot": "2026-11-27T00:00:00+00:00", "job_id": None, "duration_s": None}


def fixed_day() -> dict:
    return {"date": "2026-11-27", "leader": {"node": "node-1", "since": "2026-11-27T00:00:00+00:00"},
            "generated_at": "2026-11-27T01:00:00+00:00", "runs": [
                run("a", "任务参数1", "finished", "node-1", "00:00:00", "00:10:00"),
                run("a", "任务参数2", "finished", "node-1", "00:10:00", "00:30:00"),
                run("b", 1, "finished", "node-2", "00:00:00", "00:20:00"),
                run("b", 2, "failed", "node-2", "00:05:00", "00:10:00", error="RuntimeError: boom"),
                run("c", "later", "scheduled", None, None),
                run("c", "gone", "missed", None, None),
                run("c", "waiting", "queued", None, None)]}


# --- pure: maths and HTML ------------------------------------------------------------------

def test_utilization_makespan_and_lower_bound_on_a_fixed_day():
    line = timeline(fixed_day())
    uses = {u.node: u for u in line.nodes}
    # node-1 busy 00:00-00:30 of a 30 min span; node-2 busy 00:00-00:20 (the overlap counts once).
    assert (uses["node-1"].busy_s, uses["node-1"].utilization) == (1800, 1.0)
    assert uses["node-2"].busy_s == 1200 and round(uses["node-2"].utilization, 4) == 0.6667
    assert uses["node-2"].rows == 2  # two runs at once on node-2 stack in its lane
    assert line.span_s == 1800
    # total run time 10 + 20 + 20 + 5 = 55 min; / 2 nodes = 27.5 min > longest run 20 min.
    assert (line.total_run_s, line.longest_run_s, line.lower_bound_s) == (3300, 1200, 1650)
    assert [r["state"] for r in line.unstarted] == ["scheduled", "missed", "queued"]

    page = render_report(fixed_day())
    assert "100.0% busy" in page and "66.7% busy" in page
    assert "Makespan <b>30m00s</b>" in page and "lower bound <b>27m30s</b>" in page
    assert "1.09× the lower bound" in page
    assert page.count('class="run"') == 4


def test_the_longest_run_bounds_a_day_with_one_long_run():
    status = fixed_day()
    status["runs"] = [run("a", 1, "finished", "n1", "00:00:00", "01:00:00"),
                      run("a", 2, "finished", "n2", "00:00:00", "00:06:00"),
                      run("a", 3, "finished", "n3", "00:06:00", "00:12:00")]
    line = timeline(status)
    assert line.lower_bound_s == 3600 and line.span_s == 3600  # max(72 min / 3 = 24 min, 60 min)


def test_a_running_run_reaches_the_time_the_status_was_read():
    status = fixed_day()
    status["runs"] = [run("a", 1, "running", "n1", "00:30:00")]
    (bar,) = timeline(status).bars
    assert bar.end.isoformat() == "2026-11-27T01:00:00+00:00"


def test_every_text_is_escaped():
    status = fixed_day()
    status["runs"] = [
        run("a", "<script>alert('p')</script>", "finished", "<img src=x onerror=alert(1)>", "00:00:00", "00:01:00",
            error='"quoted" & <b>bold</b>'),
        run("a", {"k": "</div><script>x()</script>"}, "missed", None, None, error="<i>never</i>"),
        run("a", "任务参数1", "finished", "node-1", "00:00:00", "00:02:00")]
    page = render_report(status)
    assert "<script" not in page and "<img" not in page and "<b>bold" not in page and "<i>never" not in page
    assert "&lt;script&gt;alert(&#x27;p&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;" in page  # inside a title="..." attribute
    assert "任务参数1" in page  # non-ASCII kept as text, page declared utf-8
    assert '<meta charset="utf-8">' in page


def test_the_page_is_self_contained():
    page = render_report(fixed_day())
    for outside in ("://", "<script", "<link", "@import", "url(", "src="):
        assert outside not in page, outside


def test_runs_without_a_start_are_listed_below_the_chart():
    page = render_report(fixed_day())
    chart, below = page.index('id="timeline"'), page.index("Not started (3)")
    assert chart < below
    for state in ("scheduled", "missed", "queued"):
        assert f'<tr data-state="{state}">' in page[below:]
    assert "&quot;waiting&quot;" in page[below:]


def test_a_day_with_nothing_started():
    status = fixed_day()
    status["runs"] = [r for r in status["runs"] if not r["started_at"]]
    page = render_report(status)
    assert "No run of this day has started yet." in page and "Not started (3)" in page
    assert 'class="run"' not in page


def test_bad_out_path_is_one_line_and_exit_2(node_env, tmp_path):
    for out, fragment in ((tmp_path / "missing" / "day.html", "does not exist"), (tmp_path, "is a directory")):
        result = run_cli(["report", "--date", DAY, "--out", str(out)], node_env)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert fragment in result.stderr and "--out" in result.stderr


# --- in a real browser -------------------------------------------------------------------

@pytest.mark.slow
def test_a_real_day_renders_in_chromium(node_env, processes, tmp_path):
    browser = chromium()  # skip (or fail on CI) before doing any work
    assert browser
    env = dict(node_env, SAMPLE_SLEEP_S="1", SAMPLE_PARAMS="6")
    for task in ("sample", "broken"):
        assert run_cli(["trigger", "--date", DAY, "--task", task], env).returncode == 0
    workers = [processes.start("worker_entry.py", dict(env, NODE_NAME=node), "--burst", log_dir=tmp_path)
               for node in ("node-a", "node-b")]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, processes.log_of(worker)

    page = tmp_path / "day.html"
    result = run_cli(["report", "--date", DAY, "--out", str(page)], env)
    assert result.returncode == 0, result.stderr
    assert f"{DAY}: wrote {page}" in result.stdout
    status = json.loads(run_cli(["status", "--date", DAY, "--json"], env).stdout)
    started = [r for r in status["runs"] if r["started_at"]]
    assert len(started) == 7 and {r["state"] for r in started} == {"finished", "failed"}

    dom = open_in_chromium(page, tmp_path / "profile", "--dump-dom").stdout
    # Every started run is a bar in the DOM, in its node's lane; the others are listed below.
    for r in started:
        assert f'data-run-id="{r["run_id"]}"' in dom, r
    for node in {r["node"] for r in started}:
        assert f'class="lane" data-node="{node}"' in dom
    assert dom.count('class="run"') == len(started)
    assert "任务参数5" in dom and "RuntimeError: boom for x" in dom
    assert "Not started (4)" in dom  # the "numbers" task was never triggered: missed
    assert "Makespan" in dom and "% busy" in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-day.png"
    shot.unlink(missing_ok=True)
    open_in_chromium(page, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hostile_text_stays_text_in_chromium(tmp_path):
    chromium()
    status = {"date": "2026-11-27", "leader": None, "generated_at": "2026-11-27T00:05:00+00:00", "runs": [
        run("a", "<script>document.title='pwned'</script>", "finished", "<img id=injected src=x>", "00:00:00",
            "00:01:00"),
        run("a", "<b id=bolded>x</b>", "missed", None, None)]}
    page = tmp_path / "hostile.html"
    page.write_text(render_report(status), encoding="utf-8")
    dom = open_in_chromium(page, tmp_path / "profile", "--dump-dom").stdout
    assert "<title>dailyq 2026-11-27</title>" in dom  # the param's script never ran
    assert 'id="injected"' not in dom and 'id="bolded"' not in dom  # no element made from a param or node
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom


def test_the_live_page_adds_a_day_picker_and_a_reload_and_the_static_page_has_neither():
    static, live = render_report(fixed_day()), render_report(fixed_day(), live=True)
    for extra in ("<form", "<script", 'name="date"', "refreshes every"):
        assert extra not in static and extra in live, extra
    assert '<input type="date" name="date" value="2026-11-27" required>' in live
    assert 'href="?date=2026-11-26"' in live and 'href="?date=2026-11-28"' in live and 'href="./"' in live
    assert live.count("<script") == 1 and f"<script>{LIVE_SCRIPT}</script>" in live
    assert f"{LIVE_REFRESH_S * 1000}" in LIVE_SCRIPT
    # Everything else is the same page: one renderer, a flag.
    assert static.split('<p class="meta">')[1].split("</p>")[0] in live.replace(
        f" · refreshes every {LIVE_REFRESH_S} s", "")
    assert static.split('<p class="legend">')[1] == live.split('<p class="legend">')[1].replace(
        f"\n<script>{LIVE_SCRIPT}</script>", "")
    for outside in ("://", "<link", "@import", "url(", "src="):  # live or not, nothing loaded from elsewhere
        assert outside not in live, outside

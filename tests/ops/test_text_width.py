"""Tables and the progress line line up by display width: wide CJK characters and emoji
take two terminal columns, combining marks none (dailyq/ops/text_width.py, with wcwidth).

Column positions are measured here with wcwidth itself, on the text as printed."""

from __future__ import annotations

import json
import re

from wcwidth import wcswidth

from dailyq.ops.render import render_table
from dailyq.ops.text_width import clip, one_line, pad, width
from dailyq.ops.watch import Progress, render_line

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Chinese, Japanese (kana, kanji, full-width and half-width forms), emoji alone, with a
# skin tone, a ZWJ family, a flag, a combining accent, and plain ASCII.
PARAMS = ["任务参数1", "パラメータ", "東京ｶﾀｶﾅＡＢＣ", "🚀", "👍🏽 ok", "👨‍👩‍👧", "🇯🇵", "cafe\u0301", "plain", 42]
STATES = ["finished", "failed", "running", "queued", "missed", "scheduled", "skipped", "finished", "failed", "missed"]
NODES = ["节点-1", "ノード2", None, "node-3", "n🚀", None, "node-3", "节点-1", "ノード2", None]


def day_with_wide_params() -> dict:
    runs = []
    for i, (param, state, node) in enumerate(zip(PARAMS, STATES, NODES)):
        started = f"2026-11-27T01:00:0{i}+00:00" if node else None
        runs.append({"task": "任务" if i % 2 else "daily_report", "param": param, "state": state, "node": node,
                     "started_at": started, "ended_at": started, "attempts": 1 if node else 0,
                     "error": "错误：失败了\n第二行" if state == "failed" else None, "run_id": f"r{i}",
                     "slot": "2026-11-27T01:00:00+00:00", "job_id": None, "duration_s": None})
    return {"date": "2026-11-27", "leader": {"node": "节点-1", "since": "2026-11-27T00:00:00+00:00"}, "runs": runs,
            "generated_at": "2026-11-27T02:00:00+00:00"}


def column_starts(line: str, cells: list[str]) -> list[int]:
    """The display column at which each of ``cells`` starts in ``line`` (found in order)."""
    starts, position = [], 0
    for cell in cells:
        index = line.index(cell, position)
        starts.append(wcswidth(line[:index]))
        position = index + len(cell)
    return starts


def test_every_column_starts_at_the_same_display_column_on_every_row():
    status = day_with_wide_params()
    for colour in (False, True):
        printed = render_table(status, colour=colour)
        lines = ANSI.sub("", printed).splitlines()
        header, rows = lines[1], lines[2:-1]
        assert len(rows) == len(PARAMS)
        expected = column_starts(header, ["TASK", "PARAM", "STATE", "NODE", "STARTED", "ENDED", "ATT", "ERROR"])
        for line, run in zip(rows, status["runs"]):
            time = run["started_at"][11:19] if run["started_at"] else "-"
            error = one_line(run["error"] or "")
            cells = [run["task"], json.dumps(run["param"], ensure_ascii=False), run["state"], run["node"] or "-",
                     time, time, str(run["attempts"])] + ([error] if error else [])
            assert column_starts(line, cells) == expected[:len(cells)], line
        # The STATE column in particular: the symptom was rows drifting right under it.
        state_at = expected[2]
        for line, run in zip(rows, status["runs"]):
            assert wcswidth(line[:line.index(run["state"], line.index("  "))]) == state_at


def test_a_newline_in_an_error_stays_on_its_row():
    printed = render_table(day_with_wide_params())
    assert "第二行" in printed
    assert len(printed.splitlines()) == 1 + 1 + len(PARAMS) + 1  # date line, header, runs, total


def test_width_pad_and_clip():
    samples = ("abc", "任务参数1", "パラメータ", "🚀", "👨‍👩‍👧", "cafe\u0301", "")
    assert [width(t) for t in samples] == [3, 9, 10, 2, 2, 4, 0]
    assert pad("任务", 6) == "任务  " and width(pad("任务", 6)) == 6
    assert pad("toolong", 3) == "toolong"  # never cut by padding
    assert clip("任务参数", 5) == "任务"  # a wide character is never cut in half
    assert clip("cafe\u0301!", 4) == "cafe\u0301"  # the accent stays with its letter
    assert clip("abc", 10) == "abc" and clip("abc", 0) == ""
    assert one_line("a\tb\nc\x1b[31md") == "a b c\ufffd[31md"  # no control character reaches the terminal
    assert width("a\nb") == 3


def test_the_watch_line_is_cut_by_display_columns():
    p = Progress(day="2026-11-27", total=8, done=2, failed=0, missed=0, pending=5,
                 running_per_node={"节点一": 2, "ノード二": 1, "🚀node": 1}, workers=3, eta_s=60)
    full = render_line(p)
    assert full.endswith("running 节点一:2 ノード二:1 🚀node:1")
    for columns in range(20, wcswidth(full) + 3):
        for colour in (False, True):
            plain = ANSI.sub("", render_line(p, colour=colour, width=columns))
            shown = wcswidth(plain)
            if wcswidth(full) <= columns - 1:
                assert plain == full
            else:  # cut: it fits the terminal (minus its last column) and says so
                assert plain.endswith("…") and columns - 2 <= shown <= columns - 1, (columns, plain)
                assert full.startswith(plain[:-1])

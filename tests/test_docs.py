"""The docs agree with the tree: the architecture page lists every module (and marks pure
exactly the modules tests/test_boundaries.py holds pure), every relative link and anchor
resolves, every test a doc cites exists, every environment variable is in the settings table,
the README names every run state, and CI runs the README's test command."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from dailyq.runs import STATES
from tests.test_boundaries import PURE_MODULES

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A table row of docs/architecture.md: | [dailyq/x.py](../dailyq/x.py) | pure or nothing | what |
MODULE_ROW = re.compile(r"^\| \[[^]]+\]\(\.\./dailyq/([\w/]+)\.py\) \| (pure)? *\|")


def outside_code(text: str) -> list[str]:
    """The lines of a markdown text that are not in a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (a repeated one gets -1, -2, ...)."""
    seen: Counter[str] = Counter()
    found = set()
    for line in outside_code(path.read_text(encoding="utf-8")):
        heading = re.match(r"^#+ (.*)$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return found


def test_the_anchor_rule_is_githubs() -> None:
    page = ROOT / "docs" / "tasks.md"
    assert {"limits-max_running-max_per_node", "pools-pool-and-pools", "dst-days"} <= anchors(page)


def architecture_rows() -> list[tuple[str, bool]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    return [(match.group(1), match.group(2) == "pure")
            for match in map(MODULE_ROW.match, text.splitlines()) if match]


def test_the_architecture_page_lists_every_module_once() -> None:
    listed = Counter(name for name, _ in architecture_rows())
    tree = {str(path.relative_to(ROOT / "dailyq").with_suffix("")) for path in (ROOT / "dailyq").rglob("*.py")}
    assert sorted(set(listed) - tree) == [], "listed in docs/architecture.md, not in dailyq/"
    assert sorted(tree - set(listed)) == [], "in dailyq/, missing from docs/architecture.md"
    assert [name for name, count in listed.items() if count > 1] == []


def test_the_architecture_page_marks_pure_exactly_the_pure_modules() -> None:
    marked = {"dailyq" if name == "__init__" else f"dailyq.{name.replace('/', '.')}".removesuffix(".__init__")
              for name, pure in architecture_rows() if pure}
    assert sorted(marked - PURE_MODULES) == [], "marked pure, not pure in tests/test_boundaries.py"
    assert sorted(PURE_MODULES - marked) == [], "pure in tests/test_boundaries.py, not marked pure"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    broken = []
    for line in outside_code(doc.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{target}: no file {linked}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert broken == []


# A test a doc cites: `test_x.py::test_name` (its path under tests/; "…" stands for the
# rest of a long name, a trailing [id] for one parametrization), or `::test_name` for
# another test of the file cited before it on the same line.
CITED_TEST = re.compile(r"`((?:tests/)?(?:\w+/)*test_\w+\.py)?::([\w…]+)(?:\[[^\]`]*\])?`")


def cited_tests(text: str) -> list[tuple[str | None, str]]:
    """(path under tests/ or None, name pattern) of each test the text cites."""
    cited = []
    for line in outside_code(text):
        path = None  # a `::name` follows a file cited earlier on its own line (a table row)
        for named_path, name in CITED_TEST.findall(line):
            path = named_path.removeprefix("tests/") or path
            cited.append((path, name))
    return cited


def test_a_cited_test_is_read_with_its_file_and_its_ellipsis() -> None:
    line = "| x | `test_a.py::test_one_…`, `::test_two`, `worker/test_b.py::test_three[fork]` |"
    assert cited_tests(line) == [("test_a.py", "test_one_…"), ("test_a.py", "test_two"),
                                 ("worker/test_b.py", "test_three")]
    assert cited_tests("`::test_alone`") == [(None, "test_alone")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_cited_test_exists(doc: Path) -> None:
    missing = []
    for path, name in cited_tests(doc.read_text(encoding="utf-8")):
        source = ROOT / "tests" / path if path else None
        if source is None or not source.is_file():
            missing.append(f"{path}::{name}: no file tests/{path}")
            continue
        pattern = r"\w*".join(map(re.escape, name.split("…")))
        if not re.search(rf"^(?:async )?def {pattern}\(", source.read_text(encoding="utf-8"), re.MULTILINE):
            missing.append(f"{path}::{name}: no such test in tests/{path}")
    assert missing == []


def test_every_environment_variable_is_in_the_settings_table() -> None:
    read = set()
    for path in (ROOT / "dailyq").rglob("*.py"):
        read |= set(re.findall(r"\"((?:DAILYQ|DASHBOARD)_[A-Z_]+|REDIS_URL|NODE_NAME)\"", path.read_text()))
    deploy = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    table = deploy.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)`(?:, `([A-Z_]+)`)?", table, re.MULTILINE))
    names = {name for row in documented for name in row if name}
    assert len(read) > 20  # the pattern finds them
    assert sorted(read - names) == []


def test_the_readme_names_every_run_state() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    concepts = readme.split("\n## Concepts\n", 1)[1].split("\n## ", 1)[0]
    shown = set(re.findall(r"^\| `([a-z]+)` \|", concepts, re.MULTILINE))
    assert shown == set(STATES)


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("\n## Two commands on a fresh machine\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quickstart, re.DOTALL)
    assert len(commands) == 2 and "scheduler.py demo" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]

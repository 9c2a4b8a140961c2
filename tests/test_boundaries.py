"""Module boundaries: no import cycles among dailyq's modules, and the pure modules
import nothing that talks to Redis.

Imports are read from the source with ``ast`` (every ``import`` and ``from ... import``,
also those inside functions and under ``TYPE_CHECKING``), so a lazy import made to
dodge a cycle still counts. The pure modules are also imported for real, each in a
fresh interpreter, and what ends up in ``sys.modules`` is checked: that catches what
the source alone cannot (an import hidden in a third module).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dailyq"
PACKAGE_DIR = ROOT / PACKAGE
REDIS_PACKAGES = frozenset({"redis", "rq", "rq_scheduler"})

# Pure: computed from values passed in, tested with fixed values, importable where no
# Redis client should be (a task module importing ``dailyq``). Each may import only
# modules of this list, and never a Redis client, directly or through another module.
PURE_MODULES = frozenset({
    "dailyq",  # the package: task modules import it on every worker; commands load lazily
    # The subpackages' __init__: docstrings, and dailyq.worker's lazy re-exports.
    "dailyq.alerts",
    "dailyq.ops",
    "dailyq.worker",
    "dailyq.alerts.events",
    "dailyq.backfill",
    "dailyq.worker.claim_watch",
    "dailyq.context",
    "dailyq.errors",
    "dailyq.ops.eta",
    "dailyq.fingerprint",
    "dailyq.keys",
    "dailyq.logs",
    "dailyq.ops.offsets",
    "dailyq.redact",
    "dailyq.ops.render",
    "dailyq.ops.report",
    "dailyq.redis_values",
    "dailyq.runs",
    "dailyq.schedule",
    "dailyq.settings",
    "dailyq.table",
    "dailyq.ops.table_skew",
    "dailyq.ops.text_width",
    "dailyq.timestamps",
    "dailyq.ops.watch",
    "dailyq.alerts.webhook_url",
})
# Read statically, not imported: the package's module __getattr__ imports api.py on
# first use of a command function, by design (see dailyq/__init__.py).
LAZY_BY_DESIGN = {"dailyq": {"dailyq.api"},
                  # ``rq worker -w dailyq.worker.DailyWorker``: the classes load on first use.
                  "dailyq.worker": {"dailyq.worker.workers"}}


def module_name(path: Path) -> str:
    """dailyq/worker/guard.py -> dailyq.worker.guard; a package's __init__ -> the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    return name if path.stem == "__init__" else name.rsplit(".", 1)[0]


def imports_of(tree: ast.AST, known: set[str], package: str = PACKAGE) -> tuple[set[str], set[str]]:
    """(dailyq modules, other top-level packages) that a module's source imports;
    ``package``: the one its relative imports start from."""
    ours: set[str] = set()
    others: set[str] = set()

    def add(dotted: str, names: list[str]) -> None:
        if dotted != PACKAGE and not dotted.startswith(f"{PACKAGE}."):
            others.add(dotted.split(".")[0])
            return
        # ``from . import x`` imports the module dailyq.x when there is one, else a
        # name of the package's __init__.
        submodules = [f"{dotted}.{name}" for name in names if f"{dotted}.{name}" in known]
        ours.update(submodules or [dotted])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")
                if node.level - 1 >= len(up):
                    raise AssertionError(f"a relative import above {PACKAGE}: level {node.level} in {package}")
                base = ".".join(up[:len(up) - (node.level - 1)])
            else:
                base = ""
            dotted = ".".join(part for part in (base, node.module or "") if part)
            add(dotted, [alias.name for alias in node.names])
    return ours, others


def import_graph(package_dir: Path = PACKAGE_DIR) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """{module: dailyq modules it imports}, {module: other packages it imports}."""
    paths = {module_name(path): path for path in sorted(package_dir.rglob("*.py"))}
    known = set(paths)
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in paths.items():
        ours, others = imports_of(ast.parse(path.read_text(encoding="utf-8"), str(path)), known,
                                  package_of(name, path))
        graph[name] = {dep for dep in ours if dep in known and dep != name}
        external[name] = others
    return graph, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep in on_path:
                return path[path.index(dep):] + [dep]
            if dep not in done:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def loaded_after_import(module: str) -> list[str]:
    """Every module in sys.modules after importing ``module`` in a fresh interpreter."""
    code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def impurities(loaded: list[str]) -> list[str]:
    """What a pure module must not have pulled in: a Redis client, or a dailyq module
    not declared pure."""
    bad = {name.split(".")[0] if name.split(".")[0] in REDIS_PACKAGES else name for name in loaded
           if name.split(".")[0] in REDIS_PACKAGES or (name.startswith(f"{PACKAGE}.") and name not in PURE_MODULES)}
    return sorted(bad)  # redis itself, not its fifty submodules


# -- the checks ---------------------------------------------------------------------------


def test_dailyq_has_no_import_cycles() -> None:
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(PURE_MODULES - {PACKAGE}))
def test_pure_modules_import_only_pure_modules_even_in_functions(module: str) -> None:
    graph, external = import_graph()
    assert module in graph, f"{module} is declared pure but does not exist"
    impure = sorted(dep for dep in graph[module] - LAZY_BY_DESIGN.get(module, set()) if dep not in PURE_MODULES)
    assert not impure, f"pure module {module} imports {', '.join(impure)}, which may talk to Redis"
    clients = sorted(external[module] & REDIS_PACKAGES)
    assert not clients, f"pure module {module} imports {', '.join(clients)}"


@pytest.mark.parametrize("module", sorted(PURE_MODULES))
def test_importing_a_pure_module_loads_no_redis_client(module: str) -> None:
    bad = impurities(loaded_after_import(module))
    assert not bad, f"importing {module} loads {', '.join(bad)}"


# -- the checks can fail -----------------------------------------------------------------


@pytest.mark.parametrize("module", ["scheduler", "dailyq.scheduler", "dailyq.api", "dailyq.cli"])
def test_the_leader_and_the_commands_load_no_worker_code(module: str) -> None:
    """The workers' subpackage is theirs: the scheduler (the leader), the commands and
    their API load none of it; what both sides share (rq_seam, limits, beats) is on top."""
    assert [name for name in loaded_after_import(module) if name.startswith("dailyq.worker.")] == []


def test_the_worker_classes_load_on_first_use_through_the_package() -> None:
    """``rq worker -w dailyq.worker.DailyWorker``: RQ imports the package and takes the
    attribute, which loads the worker classes then, not before."""
    code = ("import sys, dailyq.worker as w; before = 'dailyq.worker.workers' in sys.modules; "
            "print(before, w.DailyWorker.__module__, w.DailySimpleWorker.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "dailyq.worker.workers", "DailySimpleWorker"], done.stderr


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph, external = import_graph()
    assert "dailyq.ops.demo" in graph["dailyq.cli"]  # cmd_demo's import inside the function
    assert "dailyq.api" in graph["dailyq"]  # ``from . import api`` in the package's __getattr__
    assert "dailyq.ops.text_width" in graph["dailyq.ops.watch"]  # ``from . import text_width``
    assert "redis" in external["dailyq.ops.status"]


def test_the_runtime_check_sees_a_redis_client() -> None:
    bad = impurities(loaded_after_import("dailyq.ops.status"))
    assert "redis" in bad and "dailyq.beats" in bad

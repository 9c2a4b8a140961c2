"""Module boundaries: no import cycles among dailyq's modules, the pure modules import
nothing that talks to Redis, and RQ's internals and data layout are used in
dailyq/rq_seam.py only (or named in its docstring).

Imports are read from the source with ``ast`` (every ``import`` and ``from ... import``,
also those inside functions and under ``TYPE_CHECKING``), so a lazy import made to
dodge a cycle still counts. The pure modules are also imported for real, each in a
fresh interpreter, and what ends up in ``sys.modules`` is checked: that catches what
the source alone cannot (an import hidden in a third module).
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
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


# -- RQ's seam ----------------------------------------------------------------------------
RQ_SEAM = "dailyq.rq_seam"
# What a module outside the seam may import from RQ: its public classes and errors.
# Anything else (rq.worker, rq.executions, rq.registry, rq.utils, rq-scheduler, a
# private name) is the seam's; so is ``import rq`` (it reaches everything).
RQ_PUBLIC: dict[str, frozenset[str] | None] = {
    "rq": frozenset({"Queue", "Retry", "Worker", "SimpleWorker"}),
    "rq.exceptions": None,  # any of its errors
    "rq.job": frozenset({"Job"}),
    "rq.serializers": frozenset({"JSONSerializer", "DefaultSerializer"}),
    "rq.timeouts": frozenset({"BaseTimeoutException"}),
}
# RQ's data layout, as attributes: where a module would ask RQ for a key or build its data.
RQ_LAYOUT_ATTRIBUTES = frozenset({
    "intermediate_queue_key", "key_for", "prepare_data", "redis_queue_namespace_prefix",
    "redis_job_namespace_prefix", "started_job_registry", "scheduled_job_registry", "failed_job_registry",
    "finished_job_registry", "deferred_job_registry", "canceled_job_registry",
})
RQ_PACKAGES = ("rq", "rq_scheduler")


def rq_outside_the_seam(tree: ast.AST) -> list[str]:
    """What a module's source uses of RQ that only the seam may: private imports, layout
    attributes, ``rq:...`` key names (also in f-strings). Cheap: names, not types."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in RQ_PACKAGES]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and node.module.split(".")[0] in RQ_PACKAGES:
            allowed = RQ_PUBLIC.get(node.module, frozenset())
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") or (allowed is not None and a.name not in allowed)]
        elif isinstance(node, ast.Attribute) and node.attr in RQ_LAYOUT_ATTRIBUTES:
            found.append(f".{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("rq:"):
            found.append(f"{node.value!r} (line {node.lineno})")
    return found


def lua_scripts() -> dict[str, str]:
    """Every Lua script of dailyq.scripts (a package's submodules too, should it be split),
    by name, without the shared helpers prepended to it (``*_LUA``)."""
    package = importlib.import_module(f"{PACKAGE}.scripts")
    modules = [package] + [importlib.import_module(info.name) for info in
                           pkgutil.walk_packages(getattr(package, "__path__", []), f"{package.__name__}.")]
    texts = {name: value for module in modules for name, value in vars(module).items()
             if isinstance(value, str) and name.isupper() and "redis.call" in value}
    helpers = [text for name, text in texts.items() if name.endswith("_LUA")]
    scripts = {}
    for name, text in texts.items():
        if not name.endswith("_LUA"):
            for helper in helpers:
                text = text.replace(helper, "")
            scripts[name] = text
    return scripts


# A script's Lua locals for RQ's keys (RQKeys), and the helpers that push onto RQ's queue.
RQ_KEYS_IN_LUA = re.compile(r"\b(queue_key|intermediate_key|job_key|failed_key)\b|\bpromote(_pool)?\(")


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


def test_only_the_seam_uses_rqs_internals_and_data_layout() -> None:
    used = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name = module_name(path)
        if name != RQ_SEAM:
            found = rq_outside_the_seam(ast.parse(path.read_text(encoding="utf-8"), str(path)))
            if found:
                used[name] = found
    assert not used, f"RQ's internals or data layout outside {RQ_SEAM} (go through it): {used}"


def test_every_lua_script_that_touches_rqs_keys_is_named_in_the_seams_docstring() -> None:
    doc = importlib.import_module(RQ_SEAM).__doc__ or ""
    touching = sorted(name for name, text in lua_scripts().items() if RQ_KEYS_IN_LUA.search(text))
    assert "REQUEUE_STRANDED" in touching, "found no script that touches RQ's keys: does lua_scripts see them?"
    missing = [name for name in touching if not re.search(rf"\b{name}\b", doc)]
    assert not missing, f"scripts that read or write RQ's keys, not named in {RQ_SEAM}'s docstring: {missing}"


def test_the_rq_check_sees_private_imports_layout_and_key_names() -> None:
    source = ("import rq\nfrom rq.worker import BaseWorker\nfrom rq.job import Job, _private\n"
              "from rq import Queue\nfrom rq.exceptions import NoSuchJobError\nfrom rq_scheduler import Scheduler\n"
              "def f(q, i):\n    return q.intermediate_queue_key, Job.key_for(i), f'rq:queue:{i}', 'rq:job:' + i\n")
    found = rq_outside_the_seam(ast.parse(source))
    assert found == ["import rq", "from rq.worker import BaseWorker", "from rq.job import _private",
                     "from rq_scheduler import Scheduler", ".intermediate_queue_key (line 8)", ".key_for (line 8)",
                     "'rq:queue:' (line 8)", "'rq:job:' (line 8)"]
    assert RQ_KEYS_IN_LUA.search("redis.call('LPUSH', queue_key, id)")
    assert not RQ_KEYS_IN_LUA.search("redis.call('LPUSH', set_aside_key, id)")

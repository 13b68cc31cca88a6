"""The package's import structure: light commands load no Ray, and no module imports itself
back through others (imports inside functions count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qvl_batch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                stem = ".".join([*base, node.module] if node.module else base)
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            for target in targets:
                # the longest package module the target names (a module, or a name in one)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "qvl_batch.run.driver" in graph["qvl_batch.cli"]  # cmd_run imports it when it runs


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_light_commands_import_no_ray():
    code = (
        "import sys, qvl_batch.cli as cli\n"
        "cli.build_parser()\n"
        "from qvl_batch.commands import doctor, plan, status, verify\n"
        "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_job_run_imports_the_benchmarks_or_the_tooling():
    graph = import_graph()
    assert "qvl_batch.tooling.synth" in reachable(graph, "qvl_batch.commands.demo")  # can see
    job_run = ("qvl_batch.run.driver", "qvl_batch.run.actor", "qvl_batch.commands.retry")
    for start in job_run:
        extra = sorted(
            m
            for m in reachable(graph, start)
            if m.startswith(("qvl_batch.bench", "qvl_batch.tooling"))
        )
        assert extra == [], f"{start} imports {extra}"


# Floors, bottom up: a module imports only from its own wing or from floors below it.
FLOORS = (
    ("errors", "tooling", ""),  # "": the package's own __init__ (its version)
    ("config", "storage"),
    ("rows",),
    ("output",),
    ("engines", "report"),
    ("run",),
    ("commands",),
    ("bench",),
    ("cli",),
)


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def floor(module: str) -> int:
    return next(i for i, wings in enumerate(FLOORS) if wing(module) in wings)


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports that reach a higher floor, or a sibling wing on the same floor."""
    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if wing(a) != wing(b) and floor(b) >= floor(a)
    )


def test_the_layering_check_sees_an_upward_import():
    graph = {"qvl_batch.rows.reader": {"qvl_batch.run.actor", "qvl_batch.config"}}
    assert upward(graph) == ["qvl_batch.rows.reader -> qvl_batch.run.actor"]
    assert upward({"qvl_batch.engines.fake": {"qvl_batch.report.html"}}) != []  # siblings


def test_every_wing_has_a_floor_and_no_import_runs_upward():
    graph = import_graph()
    assert {wing(m) for m in graph} <= {w for wings in FLOORS for w in wings}
    assert upward(graph) == []


def test_config_is_a_leaf():
    assert import_graph()["qvl_batch.config"] <= {"qvl_batch.errors"}

"""No two artrt modules import each other, directly or through others (imports inside functions
count too: a lazy import still ties the modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import artrt

REPO = Path(__file__).resolve().parents[1]
# Installed name -> source folder (pyproject's package-dir).
FOLDERS = {"artrt": "artrt", "artrt.export": "export", "artrt.runtime": "runtime", "artrt.engines": "engines",
           "artrt.demo": "demo"}


def source_modules() -> dict[str, Path]:
    """Every artrt module name and its file."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            elif parts[-1] == "__main__":
                continue
            if package == "artrt" and parts:  # only artrt/*.py itself, not the other folders
                modules[".".join([package, *parts])] = path
            elif package != "artrt":
                modules[".".join([package, *parts])] = path
    modules["artrt"] = REPO / "artrt" / "__init__.py"
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The artrt modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # artrt.runtime.package.Manifest -> artrt.runtime.package
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("artrt"):
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def module_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_layout():
    graph = module_graph()
    assert {"artrt.errors", "artrt.runtime.pipeline", "artrt.runtime.cli", "artrt.runtime.sampling.job",
            "artrt.engines.base", "artrt.export.package_export"} <= set(graph)
    assert "artrt.errors" in graph["artrt.engines.base"]
    assert "artrt.runtime.sampling.ray_pool" in graph["artrt.runtime.sampling.job"]  # lazy imports count


def test_no_import_cycles():
    assert cycles(module_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_engines_do_not_import_the_runtime():
    graph = module_graph()
    assert not {m for e in graph if e.startswith("artrt.engines") for m in graph[e] if m.startswith("artrt.runtime")}


def test_errors_live_in_one_module():
    """Every exception class artrt defines is in artrt/errors.py."""
    defined = []
    for name, path in source_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id == "Exception") for b in node.bases
            ):
                defined.append(name)
    assert set(defined) == {"artrt.errors"}, defined
    assert artrt.__version__

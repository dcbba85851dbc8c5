"""The import rules of the package, checked on the source tree.

* The core (models, training, data, kernels, checkpoint, evaluate, ...) never
  imports the device side (``fer_edge.targets``), the converters or the command
  line: it can be used, tested and shipped without them.
* ``fer_edge.targets`` runs on devices without PyTorch: it imports no torch
  and, from the rest of fer-edge, only the torch-free shared modules.
* Only the command line chains commands: no library module imports it.
* No import cycles.

Every import counts, including those inside functions (they run too).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml, wheel.packages).
PACKAGES = {"fer_edge": "fer_edge", "converters": "fer_edge.converters", "targets": "fer_edge.targets"}
CORE = ("fer_edge.models", "fer_edge.training", "fer_edge.data", "fer_edge.reparam", "fer_edge.kernels",
        "fer_edge.checkpoint", "fer_edge.evaluate", "fer_edge.dispatch", "fer_edge.metrics", "fer_edge.plots",
        "fer_edge.contract", "fer_edge.fileio", "fer_edge.images", "fer_edge.argtypes", "fer_edge.devices", "fer_edge.weights")
CLI_LAYER = ("fer_edge.cli", "fer_edge.commands", "fer_edge.__main__")
# What the device side may use from the rest of fer-edge: torch-free by design.
TARGETS_MAY_USE = ("fer_edge", "fer_edge.contract", "fer_edge.fileio", "fer_edge.images", "fer_edge.info")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for folder in PACKAGES:
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (absolute, resolved against the package), anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            # "from pkg import mod" imports a module when mod is one.
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH = _graph()


def test_the_walk_sees_the_whole_package():
    assert {"fer_edge.cli", "fer_edge.converters.formats", "fer_edge.targets.bundle",
            "fer_edge.training.trainer", "fer_edge.models.macnn"} <= set(GRAPH)
    assert "fer_edge.targets.bundle" in GRAPH["fer_edge.targets"]  # relative and package imports resolve


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _within(m, CORE)))
def test_core_never_imports_the_device_side_converters_or_cli(module):
    bad = sorted(i for i in GRAPH[module]
                 if _within(i, ("fer_edge.targets", "fer_edge.converters") + CLI_LAYER + ("fer_edge.predict",
                                                                                          "fer_edge.info")))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _within(m, ("fer_edge.targets",))))
def test_device_side_imports_no_torch_and_only_torch_free_modules(module):
    bad = sorted(i for i in GRAPH[module]
                 if _within(i, ("torch", "litert_torch", "torchvision"))
                 or (_within(i, ("fer_edge",)) and not _within(i, ("fer_edge.targets",))
                     and i not in TARGETS_MAY_USE))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if not _within(m, CLI_LAYER)))
def test_only_the_command_line_imports_the_command_line(module):
    bad = sorted(i for i in GRAPH[module] if _within(i, CLI_LAYER))
    assert not bad, f"{module} imports {bad}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the package's own modules, or None (iterative DFS).
    A package's import of its own submodules (re-exports in __init__) is not a cycle."""
    edges = {m: sorted(i for i in deps if i in graph and i != m and not i.startswith(m + "."))
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    for root in sorted(edges):
        if state.get(root):
            continue
        stack = [(root, iter(edges[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(edges[nxt])))
                path.append(nxt)
    return None


def test_no_import_cycles():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": {"p"}}) is None

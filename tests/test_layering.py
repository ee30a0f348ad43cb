"""The package's layering, read from the source (`ast`): no import cycle, and no module imports
one of a higher layer, type-only and function-local imports included. docs/architecture.md
explains the layers; this table is their one definition."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hf_cb"

# Bottom to top. A module may import modules of its own layer and of the layers below it.
LAYERS = [
    ("sampling", ("hf_cb.sampling",)),
    ("core", ("hf_cb.core", "hf_cb.manager")),
    ("distributed", ("hf_cb.distributed",)),
    ("attention", ("hf_cb.attention", "hf_cb.attention_interface", "hf_cb.paged_cache")),
    ("model_support", ("hf_cb.model_support",)),
    ("performance", ("hf_cb.performance",)),
    ("worker", ("hf_cb.worker",)),
    ("engine", ("hf_cb.engine",)),
    ("entrypoints", ("hf_cb.entrypoints", "hf_cb.generation_mixin")),
    ("server", ("hf_cb.server",)),
    ("cli", ("hf_cb.cli",)),
    ("package", ("hf_cb", "hf_cb.__main__")),
]


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, wherever in the file (TYPE_CHECKING blocks and
    functions included). ``from pkg import mod`` counts as importing ``pkg.mod``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    found.discard(name)
    return found


def layer_of(name: str) -> int:
    """The layer of a module: that of the longest prefix the table names."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise KeyError(name)
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    missing = [name for name in module_names() if not any(
        name == p or name.startswith(p + ".") for _, prefixes in LAYERS for p in prefixes)]
    assert not missing, f"modules in no layer of {__file__}'s LAYERS: {missing}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for name, deps in sorted(import_graph().items())
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(name)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A type-only upward import and a cycle through a function-local import are both found."""
    pkg = tmp_path / "hf_cb"
    (pkg / "core").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hf_cb.engine.b import B\n")
    (pkg / "engine" / "b.py").write_text("def f():\n    from ..core import a\n")
    graph = import_graph(pkg)
    assert graph["hf_cb.core.a"] == {"hf_cb.engine.b"}
    assert graph["hf_cb.engine.b"] == {"hf_cb.core.a"}
    assert find_cycle(graph) in (["hf_cb.core.a", "hf_cb.engine.b", "hf_cb.core.a"],
                                 ["hf_cb.engine.b", "hf_cb.core.a", "hf_cb.engine.b"])
    assert layer_of("hf_cb.engine.b") > layer_of("hf_cb.core.a")


@pytest.mark.parametrize("name", ["hf_cb.attention_interface", "hf_cb.paged_cache", "hf_cb.manager",
                                  "hf_cb.generation_mixin"])
def test_the_design_cards_modules_stay_at_the_top_level(name):
    assert (ROOT / f"{name.split('.')[1]}.py").is_file()

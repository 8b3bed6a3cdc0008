"""Architecture as a test: what may import what (README "Architecture"). Every import of the
package, at module level or inside a function, is read from the source with ast, so a lazy
import cannot slip an upward arrow or a cycle past the rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sparse_repair"

# Components, lowest layer first. A component may import its own layer's lower neighbours
# only where listed in ALLOWED_SAME_LAYER, and any lower layer.
LAYERS = [
    {"models", "allocation", "assets", "progress", "runtime",    # foundations: import nothing
     "config"},
    {"pruning", "data", "weights", "repair"},                    # use the foundations
    {"evaluate", "regime", "gate", "train"},
    {"run"},                                                     # one configuration
    {"study", "select"},                                         # sweeps and choices on top
    {"cli"},
]
FOUNDATIONS_IMPORT_NOTHING = {"models", "allocation", "config"}
ALLOWED_SAME_LAYER = {("assets", "progress"), ("data", "assets"), ("weights", "assets"),
                      ("data", "progress"), ("pruning", "allocation"), ("gate", "regime"),
                      ("train", "evaluate"),
                      # the study report scores selection with select's own choice rule
                      ("study", "select")}


def _component(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """Components of sparse_repair imported by the file at ``path``."""
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    pkg_parts = parts if path.name == "__init__.py" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from .. import x` at the package root: x is the component
                    out |= {a.name for a in node.names}
                    continue
                out.add(target[0])
            elif node.module and node.module.startswith("sparse_repair."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sparse_repair."):
                    out.add(a.name.split(".")[1])
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts == ("__init__.py",):
            continue
        comp = rel.parts[0].removesuffix(".py")
        graph.setdefault(comp, set()).update(c for c in _imports(path) if c != comp)
    return graph


def _layer(comp: str) -> int:
    for i, layer in enumerate(LAYERS):
        if comp in layer:
            return i
    raise AssertionError(f"component {comp!r} is in no layer: add it to LAYERS in "
                         "tests/test_layering.py and to the README's Architecture section")


GRAPH = _graph()


@pytest.mark.parametrize("comp", sorted(GRAPH))
def test_no_upward_or_sideways_imports(comp):
    for dep in sorted(GRAPH[comp]):
        assert _layer(dep) < _layer(comp) or (comp, dep) in ALLOWED_SAME_LAYER, \
            f"{comp} imports {dep}: an arrow up or sideways in the layering"


def test_models_and_allocation_import_nothing_else_of_the_package():
    for comp in FOUNDATIONS_IMPORT_NOTHING:
        assert not GRAPH.get(comp), f"{comp} imports {GRAPH[comp]}"


def test_repair_never_reaches_the_data_layer():
    """Label-free by construction: the repair package cannot load a data set (or labels)."""
    assert "data" not in GRAPH["repair"] and "evaluate" not in GRAPH["repair"]


def test_no_import_cycles_between_components():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in GRAPH.get(node, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [node, dep])}"
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for comp in GRAPH:
        if comp not in state:
            visit(comp, [])

"""The package's shape, checked from its source: imports run one way (common → kernels → ops → modules → fusion → nn),
no import cycle, triton/ never imports the op layer, one autograd implementation per op, no autograd.Function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "deeplab_ops"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every deeplab_ops module `name` imports, at module level or inside functions (lazy imports count too)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_no_import_cycle():
    # The package __init__ imports everything and nothing imports it back: leave it out, then look for a cycle.
    graph = {k: {t for t in v if t != "deeplab_ops"} for k, v in GRAPH.items() if k != "deeplab_ops"}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert all("deeplab_ops" not in deps for deps in graph.values()), "a submodule imports the package __init__"


LAYERS = [  # a module may import only modules of its own layer or of layers above it in this list
    {"deeplab_ops._extension", "deeplab_ops.common"},
    {"deeplab_ops.reference", "deeplab_ops.backends"},
    {m for m in MODULES if m.startswith("deeplab_ops.triton")},
    {m for m in MODULES if m.startswith("deeplab_ops.ops")},
    {"deeplab_ops.modules"},
    {"deeplab_ops.fusion"},
    {"deeplab_ops.nn"},
    {"deeplab_ops", "deeplab_ops.__main__"},
]


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert placed == set(MODULES), f"unplaced: {set(MODULES) - placed}; unknown: {placed - set(MODULES)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    level = next(i for i, layer in enumerate(LAYERS) if name in layer)
    allowed = set().union(*LAYERS[: level + 1])
    upward = GRAPH[name] - allowed
    assert not upward, f"{name} (layer {level}) imports {sorted(upward)} from a layer below it"


def test_triton_does_not_import_the_op_layer():
    for name in MODULES:
        if name.startswith("deeplab_ops.triton"):
            bad = {t for t in GRAPH[name] if t.startswith(("deeplab_ops.ops", "deeplab_ops.backends",
                                                            "deeplab_ops.nn", "deeplab_ops.fusion",
                                                            "deeplab_ops.modules"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def _calls(name: str, attr: str) -> list[ast.Call]:
    tree = ast.parse(MODULES[name].read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == attr]


def test_one_autograd_per_op():
    """register_autograd is called only in the op files, once per op file for its forward (in a loop over the
    op's backend twins, with one backward implementation) and once for the backward (which refuses double
    backward); no module defines a torch.autograd.Function."""
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not bases & {"torch.autograd.Function", "autograd.Function", "Function"}, (
                    f"{name}.{node.name} is an autograd.Function: autograd belongs to the op's one registration")
        calls = _calls(name, "register_autograd")
        if name in ("deeplab_ops.ops.conv_bn_relu", "deeplab_ops.ops.aspp", "deeplab_ops.ops.upsample_ce"):
            assert len(calls) == 2, f"{name}: {len(calls)} register_autograd calls, expected 2 (forward, backward)"
        else:
            assert not calls, f"{name} registers autograd; only the op files do"

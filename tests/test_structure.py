"""The package's shape, checked from its source: imports run one way (common → kernels → ops → modules → fusion → nn),
no import cycle, triton/ never imports the op layer, one autograd implementation (one autograd.Function) per op."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
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
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Attribute) and n.func.attr == attr) or (isinstance(n.func, ast.Name)
                                                                         and n.func.id == attr))]


def _autograd_functions(name: str) -> list[str]:
    tree = ast.parse(MODULES[name].read_text())
    return [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and {ast.unparse(b) for b in node.bases} & {"torch.autograd.Function", "autograd.Function", "Function"}]


# The ops whose one autograd is C++ (a torch::autograd::Function registered at the Autograd key for both twins),
# and the file that holds it: conv_bn_relu runs once per layer, where a Python Function's host time showed.
CPP_AUTOGRAD = {"deeplab_ops.ops.conv_bn_relu": ("conv_bn_relu", "csrc/composite/conv_bn_relu_autograd.cpp")}


def test_one_autograd_per_op():
    """Each op has exactly one autograd (saving policy and statistics reducer included), the Autograd kernel of both
    backend twins of its forward op: a torch.autograd.Function in its op file, registered once through
    ops/dispatch.py's register_autograd_kernels, or (CPP_AUTOGRAD) one C++ Function in one csrc file, with the op
    file registering only its backward ops' double-backward refusal. No other module defines an autograd.Function
    or registers an Autograd kernel, no other C++ file registers at the Autograd key, and nothing uses
    torch.library.register_autograd."""
    op_files = {n for n in MODULES if n.startswith("deeplab_ops.ops.") and n.rpartition(".")[2] in
                ("conv_bn_relu", "aspp", "upsample_ce")}
    assert len(op_files) == 3, sorted(op_files)
    for name in MODULES:
        functions = _autograd_functions(name)
        registrations = _calls(name, "register_autograd_kernels")
        refusals = _calls(name, "register_double_backward_refusal")
        assert not _calls(name, "register_autograd"), f"{name} calls torch.library.register_autograd"
        autograd_impls = [c for c in _calls(name, "impl") if any(
            isinstance(a, ast.Constant) and a.value == "Autograd" for a in c.args)]
        if name in CPP_AUTOGRAD:
            assert not functions and not registrations, f"{name}'s autograd is C++; it defines {functions}"
            assert len(refusals) == 1, f"{name}: {len(refusals)} register_double_backward_refusal calls"
        elif name in op_files:
            assert len(functions) == 1, f"{name} defines {functions}: expected one autograd.Function"
            assert len(registrations) == 1, f"{name}: {len(registrations)} register_autograd_kernels calls"
        else:
            assert not functions, f"{name} defines {functions}: autograd belongs to the op files"
            assert not registrations, f"{name} registers an op's autograd; only the op files do"
        if name != "deeplab_ops.ops.dispatch":
            assert not autograd_impls, f"{name} registers an Autograd kernel outside ops/dispatch.py"
    cpp_files = {f.relative_to(ROOT).as_posix(): f.read_text() for f in (ROOT / "csrc").rglob("*.c*")}
    at_autograd = {f for f, text in cpp_files.items() if "TORCH_LIBRARY_IMPL(deeplab_ops, Autograd" in text}
    assert at_autograd == {f for _, f in CPP_AUTOGRAD.values()}, at_autograd
    for op, file in CPP_AUTOGRAD.values():
        text = cpp_files[file]
        assert text.count("public torch::autograd::Function<") == 1, f"{file}: expected one C++ autograd Function"
        for twin in ("", "triton_"):
            assert f'm.impl("{twin}{op}_forward"' in text, f"{file} does not register {twin}{op}_forward"


def test_autograd_kernels_registered_for_both_twins():
    """At run time: every forward op, C++ and triton_ twin alike, has an Autograd kernel (the op's Function, in
    Python or, for conv_bn_relu, C++), and the backward ops have one too (it refuses double backward)."""
    import deeplab_ops  # noqa: F401  (registers the kernels)

    for op in ("conv_bn_relu", "aspp", "upsample_cross_entropy"):
        for prefix in ("", "triton_"):
            for stage in ("forward", "backward"):
                qual = f"deeplab_ops::{prefix}{op}_{stage}"
                assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Autograd"), qual


def test_host_code_avoids_tritons_constexpr_functions():
    """triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in Triton 3.8 (about 2 us per host call, a
    dozen per layer): host code uses deeplab_ops.triton.launch's cdiv and next_power_of_2, which compute the same."""
    slow = {"triton.cdiv", "triton.next_power_of_2"}
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in slow:
                offenders.append(f"{name}:{node.lineno} {ast.unparse(node.func)}")
    assert not offenders, offenders
    from deeplab_ops.triton.launch import cdiv, next_power_of_2

    triton = pytest.importorskip("triton")
    for n in [*range(0, 300), 1023, 1024, 1025, 2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)

"""torch.compile(fullgraph=True) of a fused DeepLabV3 on CPU: train (forward + backward, running statistics) and
eval give what eager fused gives; memory_efficient too. And `train.py --compile` runs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

import model


def _tiny(memory_efficient: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return model.deeplabv3_resnet(29, num_classes=3, width=4, output_stride=16, fused=True,
                                  memory_efficient=memory_efficient).double()


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_fused_model_compiles_fullgraph_train_and_eval(memory_efficient):
    torch._dynamo.reset()
    eager = _tiny(memory_efficient)
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    out_e = eager(x)["out"]
    out_c = step(x)["out"]
    torch.testing.assert_close(out_c, out_e, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out_e)
    out_e.backward(g)
    out_c.backward(g)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-8, atol=1e-9, msg=f"grad {name}")
    for (name, be), bc in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(bc, be, rtol=1e-9, atol=1e-9, msg=f"buffer {name}")
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(step(x)["out"], eager(x)["out"], rtol=1e-9, atol=1e-9)


def test_momentum_none_under_fullgraph_says_why_and_compiles_with_a_graph_break_without():
    """BatchNorm momentum=None (factor 1 / num_batches_tracked, read from the counter every step): under
    fullgraph=True the compile failed late, in AOT autograd, with "Expected a value of type 'float' for argument
    'momentum' but instead found type 'SymFloat'"; it now stops while tracing, with the reason. Without fullgraph
    it runs (a graph break), and matches eager."""
    from deeplab_ops.nn import fuse_modules

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8, momentum=None),
                                torch.nn.ReLU()).double()
    fused = fuse_modules(copy.deepcopy(eager))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with pytest.raises(Exception, match=r"momentum=None \(a cumulative average, factor 1 / num_batches_tracked\) "
                                        r"cannot be traced into a graph \(torch.compile, torch.export\)"):
        torch.compile(copy.deepcopy(fused), fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    step = torch.compile(fused, backend="aot_eager")
    for _ in range(3):
        torch.testing.assert_close(step(x), eager(x), rtol=1e-9, atol=1e-9)
    assert int(fused[1].num_batches_tracked) == int(eager[1].num_batches_tracked) == 3
    torch.testing.assert_close(fused[1].running_mean, eager[1].running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused[1].running_var, eager[1].running_var, rtol=1e-9, atol=1e-12)


def test_train_py_compile_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), "--fused-ops", "--compile", "--iterations", "2", "--batch-size", "2",
           "--crop-size", "32", "--backbone-width", "4", "--synthetic-train-size", "4", "--synthetic-val-size", "2",
           "--eval-every", "0", "--preview", "0", "--out-dir", str(tmp_path), "--no-tensorboard", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "last.pt").exists()


def test_compile_caches_are_keyed_by_this_build():
    """torch.compile's on-disk caches key a graph by the graph dynamo traced, where a custom op is only its name: an
    artifact from an earlier build (aspp's branch_out was one tensor before 2026-12-02) would be served after an
    upgrade and fail. Tracing a deeplab_ops op enters this build's key (schemas, Python, extension) in Inductor's
    cache-key table; the key follows the schemas."""
    import torch._inductor.config as inductor_config

    import deeplab_ops
    from deeplab_ops.ops import dispatch

    torch._dynamo.reset()
    w, gamma, beta = torch.randn(4, 3, 3, 3), torch.ones(4), torch.zeros(4)
    step = torch.compile(lambda x: deeplab_ops.conv_bn_relu(x, w, gamma, beta, None, None, padding=1, training=True,
                                                            backend="cpu"), fullgraph=True, backend="eager")
    step(torch.randn(2, 3, 5, 5))
    key = inductor_config.unsafe_marked_cacheable_functions[dispatch.COMPILE_CACHE_NAME]
    assert key == dispatch.compile_cache_key() and len(key) == 32
    schemas = tuple(sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith("deeplab_ops::")))
    assert any("Tensor[] branch_out" in s for s in schemas)
    assert dispatch.compile_cache_key(schemas) == key
    changed = tuple(s.replace("Tensor[] branch_out", "Tensor branch_out") for s in schemas)
    assert dispatch.compile_cache_key(changed) != key


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_aot_autograd_traces_the_ops_autograd_kernel(memory_efficient):
    """AOTAutograd traces through each op's Autograd kernel: the forward graph holds the forward op, the backward
    graph the backward op (and, with memory_efficient, the recomputing convolution), with no graph break."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    import deeplab_ops

    graphs: dict[str, set[str]] = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g, b = torch.rand(4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64,
                                                                                requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def fn(x):
        return deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, backend="cpu",
                                        memory_efficient=memory_efficient)

    rm_e, rv_e = rm.clone(), rv.clone()
    expected = deeplab_ops.conv_bn_relu(x, w, g, b, rm_e, rv_e, padding=1, backend="cpu")
    (gx_e,) = torch.autograd.grad(expected.sum(), x)
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=capture("forward"),
                                                                      bw_compiler=capture("backward")))
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, gx_e)
    torch.testing.assert_close((rm, rv), (rm_e, rv_e))
    assert "deeplab_ops.conv_bn_relu_forward.default" in graphs["forward"], graphs["forward"]
    assert "deeplab_ops.conv_bn_relu_backward.default" in graphs["backward"], graphs["backward"]
    assert ("deeplab_ops.conv_bias_act.default" in graphs["backward"]) == memory_efficient, graphs["backward"]


def _fused_parts():
    from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

    torch.manual_seed(0)
    aspp = FusedASPP(4, (1, 2), 3, backend="cpu").double()
    aspp.project[3].p = 0.0
    return {"conv": (FusedConvBNReLU(3, 4, 3, padding=1, backend="cpu").double(), 3),
            "aspp": (aspp, 4)}


@pytest.mark.parametrize("kind", ["conv", "aspp"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_modules_compile_dynamic_once_and_under_checkpoint(kind, training):
    # Found by a review: dynamic=True traced a module's eps as a symbolic float, whose math.isfinite check failed
    # the compile; tracing read and wrote the modules' Python caches (checked configurations, conv geometry, the
    # ASPP's structure), so a second identical call compiled again and a compiled checkpoint from a cold start
    # failed ("unsafe side effect").
    from torch.utils.checkpoint import checkpoint

    from deeplab_ops import modules
    from deeplab_ops.ops import conv_bn_relu

    def cold_caches():  # as in a new process: no configuration checked, no geometry worked out yet
        conv_bn_relu._CONFIGS.clear()
        modules._GEOMETRY.clear()
        torch._dynamo.reset()

    module, cin = _fused_parts()[kind]
    module.train(training)
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64)
    cold_caches()
    got = torch.compile(copy.deepcopy(module), fullgraph=True, backend="eager", dynamic=True)(x)
    torch.testing.assert_close(got, copy.deepcopy(module)(x))
    cold_caches()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True, backend="eager")
    for _ in range(3):
        compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    cold_caches()
    cold = _fused_parts()[kind][0].train(training)  # never called: no structure cached
    step = torch.compile(lambda t: checkpoint(cold, t, use_reentrant=False), fullgraph=True, backend="eager")
    torch.testing.assert_close(step(x), _fused_parts()[kind][0].train(training)(x))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_reference_aspp_and_empty_batches_compile_fullgraph(channels_last):
    # The reference aspp (backend="reference", and every backend's empty batch) asked whether x was a torch.func
    # wrapped tensor, which dynamo cannot trace ("Attempted to call function marked as skipped"): a review found
    # fullgraph compiles and strict exports of it failing.
    from deeplab_ops.nn import FusedASPP

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = FusedASPP(3, (1, 2), 4, backend="reference").double().eval()
    step = torch.compile(module, fullgraph=True, backend="aot_eager")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for n in (2, 0):
            x = torch.randn(n, 3, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt)
            out = step(x)
            torch.testing.assert_close(out, module(x), rtol=1e-12, atol=1e-12)
            if n:
                assert out.is_contiguous(memory_format=fmt)

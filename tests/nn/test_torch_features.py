"""The fused modules combined with PyTorch's own features compute what the unfused modules compute (outputs,
gradients, running statistics), or refuse clearly: torch.jit.trace (a traced fused model follows its parameters and
running statistics: no cached BatchNorm fold or Python-side call is baked into the graph), torch.export (a training
graph updates the running statistics in every grad mode), torch.jit.script (a clear error), torch.autocast in eval
after the fold was cached, torch.func.functional_call in eval with a cached fold."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, fuse_modules, unfuse_modules, unpack_batchnorms

ATOL, RTOL = 1e-5, 1e-5


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics (eval BatchNorm is then no identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _chain() -> nn.Sequential:
    return _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(4),
                                    nn.ReLU()))


def _trace(module: nn.Module, x: torch.Tensor, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the shape checks, torch.jit.trace's deprecation
        return torch.jit.trace(module, (x,), **kwargs)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "fold_cached"])
def test_jit_trace_eval_follows_parameters(grad, warm):
    # A traced graph serves every grad mode and must read the module's tensors: the eval fold (cached per parameter
    # version outside tracing) recorded as constants would ignore a later load_state_dict; built while tracing it
    # crashed (suggest_memory_format on traced sizes); with grad the sanity check's no_grad retrace differed.
    ref = _chain().eval()
    fused = fuse_modules(copy.deepcopy(ref)).eval()
    x = torch.randn(2, 3, 9, 9)
    if warm:
        with torch.no_grad():
            fused(x)
    with torch.set_grad_enabled(grad):
        traced = _trace(fused, x)  # check_trace on: traced again and compared
        x2 = torch.randn(1, 3, 12, 10)
        assert_close(traced(x2), ref(x2), "traced output", ATOL, RTOL)
        new = _randomize(copy.deepcopy(ref), seed=1).state_dict()
        ref.load_state_dict(new)
        traced.load_state_dict(new)
        assert_close(traced(x2), ref(x2), "traced output after load_state_dict", ATOL, RTOL)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert_close(torch.jit.load(buffer)(x2), ref(x2), "saved and loaded trace", ATOL, RTOL)


class _ChainAndASPP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.chain = _chain()
        self.aspp = _randomize(TorchvisionASPP(4, (1, 2), 4), seed=3)
        self.aspp.project[3].p = 0.0  # (torchvision's dropout)

    def forward(self, x):
        return self.aspp(self.chain(x))


@pytest.mark.parametrize("run_grad", [True, False], ids=["run_grad", "run_no_grad"])
@pytest.mark.parametrize("trace_grad", [True, False], ids=["traced_grad", "traced_no_grad"])
def test_jit_trace_train_updates_running_stats(trace_grad, run_grad):
    # One traced training graph serves every grad mode: traced with a graph to build, the running statistics were
    # written by the op's autograd node, which the trace does not record, so the traced module run under no_grad
    # left them unchanged; the fused ASPP's BatchNorm tensors, packed by an earlier call, went in as a Python
    # autograd.Function call (not saveable) whose replay left them unchanged too; and its first call's packing made
    # the sanity check's second trace differ.
    ref = _ChainAndASPP().train()
    fused = fuse_modules(copy.deepcopy(ref))
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        fused(x)  # packs the ASPP's BatchNorm tensors
    with torch.set_grad_enabled(trace_grad):
        traced = _trace(fused, x)  # check_trace on
    ref.load_state_dict(fused.state_dict())  # tracing ran training forwards
    x2 = torch.randn(3, 3, 6, 9)
    with torch.set_grad_enabled(run_grad):
        out_r, out_t = ref(x2), traced(x2)
    assert_close(out_t, out_r, "traced training output", ATOL, RTOL)
    for (name, b_r), b_f in zip(ref.named_buffers(), fused.buffers(), strict=True):
        assert_close(b_f, b_r, f"buffer {name} after a traced training call", ATOL, RTOL)
    if run_grad:
        out_r.square().sum().backward()
        out_t.square().sum().backward()
        for (name, p_r), p_f in zip(ref.named_parameters(), fused.parameters(), strict=True):
            assert_close(p_f.grad, p_r.grad, f"grad {name}", 1e-4, 1e-4)
    torch.jit.save(traced, io.BytesIO())


def test_jit_trace_fused_aspp_packs_nothing():
    # A fused ASPP traced before its first call: the first trace packed its BatchNorm tensors and the sanity check's
    # second trace did not (graphs differed); traced packed, the graph counted the batches with one add over the
    # packed counters (an as_strided view of the first), which fails (or writes out of bounds) once they are no
    # longer packed (unpack_batchnorms, load_state_dict(assign=True)).
    ref = _randomize(TorchvisionASPP(4, (1, 2), 4))
    ref.project[3].p = 0.0
    fused = fuse_modules(copy.deepcopy(ref))
    x = torch.randn(2, 4, 7, 7)
    traced = _trace(fused, x)  # check_trace on
    with torch.no_grad():
        fused(x)  # packs them
    traced = _trace(fused, x, check_trace=False)
    unpack_batchnorms(fused)
    ref.load_state_dict(fused.state_dict())  # tracing ran training forwards
    x2 = torch.randn(3, 4, 6, 5)
    assert_close(traced(x2), ref(x2), "traced output", ATOL, RTOL)
    for (name, b_r), b_f in zip(ref.named_buffers(), fused.buffers(), strict=True):
        assert_close(b_f, b_r, f"buffer {name}", ATOL, RTOL)


@pytest.mark.parametrize("what", ["fused_model", "FusedConvBNReLU", "FusedASPP", "fused_conv"])
def test_jit_script_refuses_clearly(what):
    # TorchScript cannot compile the fused forwards; its own error pointed into torch.fx's source.
    model = {"fused_model": lambda: fuse_modules(nn.Sequential(_chain())),
             "FusedConvBNReLU": lambda: FusedConvBNReLU(3, 4, 3),
             "FusedASPP": lambda: FusedASPP(4, (1, 2), 4),
             "fused_conv": lambda: fuse_modules(_chain())[0]}[what]()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .*torch\.compile or torch\.export"):
        torch.jit.script(model)
    if what == "fused_model":
        torch.jit.script(unfuse_modules(model))  # the unfused model scripts as before


def test_autocast_eval_after_fold_cached():
    # The eval fast path of a fused conv reused the fold cached outside autocast (float32): under
    # torch.autocast('cpu', bfloat16) the output came back float32, computed in float32, unlike eager's bfloat16.
    ref = _chain().eval()
    fused = fuse_modules(copy.deepcopy(ref)).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        fused(x)  # caches the fold
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_r, out_f = ref(x), fused(x)
    assert out_f.dtype == out_r.dtype == torch.bfloat16
    assert_close(out_f, out_r, "autocast eval output", 2e-2, 2e-2)


def test_autocast_of_another_device_keeps_the_eval_fast_path(monkeypatch):
    # The check added for the test above skipped the modules' cached-fold fast path under torch.autocast for any
    # device: autocast for another device than x's casts nothing, so the fast path must stay (it cost ~10 us per
    # layer per call). Another device's autocast, on any machine: CPU tensors while torch reports an autocast enabled
    # (as under torch.autocast("cuda") or "xpu") and CPU autocast off.
    import deeplab_ops.modules as modules

    ref = _chain().eval()
    fused = fuse_modules(copy.deepcopy(ref)).eval()
    x = torch.randn(2, 3, 9, 9)
    calls = []
    real = modules.eval_fast
    monkeypatch.setattr(modules, "eval_fast", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fused(x)  # caches the fold
        calls.clear()
        monkeypatch.setattr(torch._C, "_is_any_autocast_enabled", lambda: True)
        assert not torch.is_autocast_enabled("cpu")
        out_r, out_f = ref(x), fused(x)
    assert calls, "the module's eval fast path was skipped under an autocast that casts nothing here"
    assert out_f.dtype == out_r.dtype == torch.float32
    assert_close(out_f, out_r, "eval output under another device's autocast", ATOL, RTOL)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_functional_call_uses_substituted_tensors(train):
    ref = _chain().train(train)
    fused = fuse_modules(copy.deepcopy(ref)).train(train)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        fused(x)  # caches the fold (eval)
        ref.load_state_dict(fused.state_dict())
    new = {k: v.clone() for k, v in _randomize(copy.deepcopy(ref), seed=2).state_dict().items()}
    new_f = {k: v.clone() for k, v in new.items()}
    with torch.no_grad():
        out_r = torch.func.functional_call(ref, new, (x,))
        out_f = torch.func.functional_call(fused, new_f, (x,))
    assert_close(out_f, out_r, "functional_call output", ATOL, RTOL)
    for k in new:
        assert_close(new_f[k], new[k], f"substituted {k}", ATOL, RTOL)


class _FunctionalASPP(nn.Module):
    """deeplab_ops.aspp with one concatenated tensor per BatchNorm argument."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.convs = nn.ParameterList([nn.Parameter(torch.randn(4, 4, k, k, generator=g)) for k in (1, 3, 3)])
        self.pool = nn.Parameter(torch.randn(4, 4, 1, 1, generator=g))
        self.project = nn.Parameter(torch.randn(4, 16, 1, 1, generator=g))
        self.bn_weight = nn.Parameter(torch.rand(20, generator=g) + 0.5)
        self.bn_bias = nn.Parameter(torch.rand(20, generator=g) - 0.5)
        self.register_buffer("running_mean", torch.zeros(20))
        self.register_buffer("running_var", torch.ones(20))

    def forward(self, x):
        import deeplab_ops

        return deeplab_ops.aspp(x, list(self.convs), self.pool, self.project, self.bn_weight, self.bn_bias,
                                self.running_mean, self.running_var, rates=(1, 2), training=True)


def test_jit_trace_functional_aspp_updates_running_stats():
    # Traced with a graph to build: the running statistics were written by the autograd node only, so the traced
    # function run under no_grad left them unchanged.
    module = _FunctionalASPP()
    traced = _trace(module, torch.randn(2, 4, 7, 7))  # with grad (parameters), checked under no_grad
    expected = copy.deepcopy(module)
    x = torch.randn(3, 4, 6, 5)
    with torch.no_grad():
        assert_close(traced(x), expected(x), "traced output", ATOL, RTOL)
    assert_close(module.running_mean, expected.running_mean, "running_mean", ATOL, RTOL)
    assert_close(module.running_var, expected.running_var, "running_var", ATOL, RTOL)


@pytest.mark.parametrize("run_grad", [True, False], ids=["run_grad", "run_no_grad"])
@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_export_train_updates_running_stats(strict, run_grad):
    # torch.export of a training model: exported with parameters that need grad, the running statistics were written
    # by the op's autograd node only, which the exported graph does not hold, so the exported module run under
    # no_grad (or with nothing needing grad) left them unchanged while eager BatchNorm's updated them.
    ref = _ChainAndASPP().train()
    fused = fuse_modules(copy.deepcopy(ref))
    x = torch.randn(2, 3, 7, 7)
    program = torch.export.export(copy.deepcopy(fused), (x,), strict=strict)
    # saved and loaded as users deploy it (the statistics' write under no_grad was saved as a set_grad_enabled node
    # whose loader check failed: "Node.meta wrap_with_set_grad_enabled is missing val field")
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    program = torch.export.load(saved)
    mutated = set(program.run_decompositions().graph_signature.buffers_to_mutate.values())
    for name, _ in ref.named_buffers():
        assert name in mutated, f"{name} is not updated by the exported graph (mutates {sorted(mutated)})"
    exported = program.module()
    for name, b_r in ref.named_buffers():
        assert torch.equal(exported.get_buffer(name), b_r), name  # exported with the state before any call
    x2 = torch.randn(2, 3, 7, 7)  # (exported for one shape)
    with torch.set_grad_enabled(run_grad):
        out_r, out_e = ref(x2), exported(x2)
    assert_close(out_e, out_r, "exported training output", ATOL, RTOL)
    for name, b_r in ref.named_buffers():
        assert_close(exported.get_buffer(name), b_r, f"buffer {name} after an exported training call", ATOL, RTOL)
    if run_grad:
        out_r.square().sum().backward()
        out_e.square().sum().backward()
        for name, p_r in ref.named_parameters():
            assert_close(exported.get_parameter(name).grad, p_r.grad, f"grad {name}", 1e-4, 1e-4)

    functional = _FunctionalASPP()
    program = torch.export.export(functional, (torch.randn(2, 4, 7, 7),), strict=strict)
    expected = copy.deepcopy(functional)
    exported = program.module()
    x = torch.randn(2, 4, 7, 7)
    with torch.set_grad_enabled(run_grad):
        assert_close(exported(x), expected(x), "exported functional aspp", ATOL, RTOL)
    for name in ("running_mean", "running_var"):
        assert_close(exported.get_buffer(name), getattr(expected, name), f"functional aspp {name}", ATOL, RTOL)


@pytest.mark.parametrize("kind", ["FusedConvBNReLU", "FusedASPP"])
def test_a_model_made_under_inference_mode_recalibrates_its_batchnorms_outside_it(kind):
    # Statistics and num_batches_tracked made under torch.inference_mode() (a model built or loaded there) and
    # updated outside it with no graph (training mode under no_grad): the op writes the statistics as eager's kernel
    # does, and the module counts the batch (once wrong: the statistics were updated, then the count raised
    # PyTorch's in-place refusal, leaving the BatchNorm half updated). Oracle: the unfused module run inside
    # inference mode, where eager's count may be written.
    torch.manual_seed(0)
    if kind == "FusedConvBNReLU":
        plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).double()
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    else:
        plain = TorchvisionASPP(5, [2, 3], 4).double()
        x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    state = copy.deepcopy(plain.state_dict())
    with torch.inference_mode():
        want = copy.deepcopy(plain)
        want.load_state_dict(state)
        want.train()
        want(x)
        made = FusedConvBNReLU(3, 4, 3, padding=1) if kind == "FusedConvBNReLU" else FusedASPP(5, [2, 3], 4)
        made = made.double()
        made.load_state_dict(state)
    made.train()
    with torch.no_grad():
        made(x)
    for (name, got), (_, exp) in zip(made.state_dict().items(), want.state_dict().items(), strict=True):
        same = torch.equal(got, exp) if got.dtype == torch.int64 else torch.allclose(got, exp, rtol=1e-12, atol=1e-12)
        assert same, (name, got, exp)


# ---- torch.utils.flop_counter ----------------------------------------------------------------------------------------

def _flops(fn, net, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        fn(net, x)
    return mode.get_total_flops()


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def _train(net, x):
    net.train()(x)


def _fwd_bwd(net, x):
    _out(net.train()(x)).sum().backward()


def _eval(net, x):
    net.eval()(x)


def test_flop_counter_counts_a_fused_network_as_the_unfused_one():
    """FlopCounterMode had no formula for the deeplab_ops ops: a fused DeepLabV3 counted 3,200 FLOPs against the
    unfused network's 598,432 (only what ran outside the fused ops). Each op counts the convolutions it computes as
    the mode counts the eager layers: forward, eval, forward+backward with and without an input gradient, strided
    and dilated layers, residual blocks and the ASPP; memory_efficient=True adds the convolutions its backward
    recomputes (FLOPs that run, as activation checkpointing's recomputation counts)."""
    import model

    for memory_efficient in (False, True):
        torch.manual_seed(0)
        plain = model.deeplabv3_resnet(29, num_classes=3, width=4, output_stride=8)
        fused = fuse_modules(copy.deepcopy(plain), memory_efficient=memory_efficient)
        x = torch.randn(2, 3, 33, 29)
        counts = []
        for net in (plain, fused):
            counts.append((_flops(_train, net, x), _flops(_fwd_bwd, net, x),
                           _flops(_fwd_bwd, net, x.clone().requires_grad_()), _flops(_eval, net, x)))
        plain_counts, fused_counts = counts
        assert plain_counts[0] > 10 ** 6
        if not memory_efficient:
            assert fused_counts == plain_counts
        else:  # the backward recomputes the fused convolutions' outputs: those FLOPs run, and count, on top
            assert (fused_counts[0], fused_counts[3]) == (plain_counts[0], plain_counts[3])
            for i in (1, 2):
                assert plain_counts[i] < fused_counts[i] <= plain_counts[i] + plain_counts[0], counts
    blocks = [(FusedConvBNReLU(8, 16, 3, stride=2, padding=2, dilation=2),
               nn.Sequential(nn.Conv2d(8, 16, 3, 2, 2, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU())),
              (FusedASPP(8, (2, 3), 4), TorchvisionASPP(8, (2, 3), 4))]
    for fused, eager in blocks:
        for x in (torch.randn(3, 8, 9, 10), torch.randn(3, 8, 9, 10, requires_grad=True)):
            for fn in (_train, _fwd_bwd, _eval):
                assert _flops(fn, fused, x) == _flops(fn, eager, x)


def test_importing_deeplab_ops_leaves_the_flop_counter_unimported_and_either_order_registers_the_formulas():
    """torch.utils.flop_counter imports triton (0.15 s): `import deeplab_ops` does not import it, and the formulas
    are registered when it is imported later, or at once where it was imported first."""
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import sys, torch{first}\nimport deeplab_ops\nassert ('torch.utils.flop_counter' in sys.modules) == "
            "{imported}\nfrom torch.utils.flop_counter import flop_registry\n"
            "ops = [p for p in flop_registry if 'deeplab_ops' in str(p)]\nprint(len(ops))\n")
    for first, imported in (("", False), ("\nimport torch.utils.flop_counter", True)):
        out = subprocess.run([sys.executable, "-c", code.format(first=first, imported=imported)], cwd=str(ROOT),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["12"], out.stdout


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("recorder", ["jit.trace", "export"])
def test_onnx_export_records_only_aten_ops(recorder, channels_last, monkeypatch):
    # torch.onnx.export failed on every fused model: its TorchScript exporter (which records with torch.jit.trace) and
    # its dynamo one (torch.export, non-strict) met deeplab_ops' ops, which have no ONNX translation ("unrecognized
    # namespace deeplab_ops", "No ONNX function found"). While it records, the fused ops run the reference's aten
    # ops. Simulated here as both exporters signal it (is_in_onnx_export), without the onnx package (not a
    # dependency); the real exports, both exporters, were run under onnxruntime by hand (docs/ops.md).
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    ref = _ChainAndASPP().eval()
    fused = fuse_modules(copy.deepcopy(ref))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 7, 7).contiguous(memory_format=fmt)
    with torch.no_grad():
        if recorder == "jit.trace":
            recorded = _trace(fused, x)
            ops = {n.kind() for n in recorded.inlined_graph.nodes()}  # (the submodules' calls inlined)
        else:
            recorded = torch.export.export(fused, (x,), strict=False).module()
            ops = {str(n.target) for n in recorded.graph.nodes if n.op == "call_function"}
        assert not {op for op in ops if "deeplab_ops" in op}, sorted(ops)
        assert_close(recorded(x), ref(x), f"recorded by {recorder}", ATOL, RTOL)
    monkeypatch.undo()
    with torch.no_grad():  # outside an ONNX export, a recording holds the fused ops as before
        ops = {str(n.target) for n in torch.export.export(fused, (x,), strict=False).graph.nodes}
    assert any("deeplab_ops" in op for op in ops), sorted(ops)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_vmap_over_a_fused_model_in_eval_batches_without_the_fallback(channels_last, capfd):
    # In eval with nothing to differentiate a fused conv runs its BatchNorm folded (conv_bias_act), which had no
    # batching rule: PyTorch's per-sample fallback ran it and warned on every call. Inputs vmapped over one model,
    # and an ensemble (stacked parameters and buffers), against the models one by one; no warning.
    torch.manual_seed(0)
    models = [fuse_modules(_ChainAndASPP().eval()) for _ in range(3)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = torch.randn(3, 2, 3, 7, 7)
    xs = torch.stack([x.contiguous(memory_format=fmt) for x in xs])
    params, buffers = torch.func.stack_module_state(models)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shared = torch.vmap(models[0])(xs)
        ensemble = torch.vmap(lambda p, b, x: torch.func.functional_call(models[0], (p, b), (x,)))(params, buffers,
                                                                                                  xs)
        # (PyTorch's own aten ops may fall back too, as unfused: adaptive_avg_pool2d's as_strided_ on channels_last;
        # the fallback's warning reaches Python's warnings or, from a call below the bindings, only stderr)
        fallbacks = [str(w.message) for w in caught if "deeplab_ops" in str(w.message)]
        fallbacks += [line for line in capfd.readouterr().err.splitlines() if "deeplab_ops::" in line]
        assert not fallbacks, fallbacks
        for i, m in enumerate(models):
            assert_close(shared[i], models[0](xs[i]), f"shared model, input {i}", ATOL, RTOL)
            assert_close(ensemble[i], m(xs[i]), f"ensemble member {i}", ATOL, RTOL)


def test_vmap_over_a_fused_ensemble_in_training_batches_without_the_fallback(capfd):
    # The training forward and backward ops ran under PyTorch's per-sample fallback, which warned on every call:
    # their batching rule runs one call per member (each its own batch statistics). Outputs, updated running
    # statistics and every parameter gradient against the members run one by one.
    torch.manual_seed(0)
    models = [fuse_modules(_ChainAndASPP().double().train()) for _ in range(2)]
    copies = [copy.deepcopy(m) for m in models]
    xs = torch.randn(2, 2, 3, 7, 7, dtype=torch.float64)
    params, buffers = torch.func.stack_module_state(models)
    out = torch.vmap(lambda p, b, x: torch.func.functional_call(models[0], (p, b), (x,)))(params, buffers, xs)
    out.square().sum().backward()
    fallbacks = [line for line in capfd.readouterr().err.splitlines() if "deeplab_ops::" in line]
    assert not fallbacks, fallbacks
    for i, m in enumerate(copies):
        out_i = m(xs[i])
        out_i.square().sum().backward()
        assert_close(out[i], out_i, f"member {i}", 1e-10, 1e-10)
        for name, b in m.named_buffers():
            assert_close(buffers[name][i], b, f"member {i} buffer {name}", 1e-10, 1e-10)
        for name, p in m.named_parameters():
            assert_close(params[name].grad[i], p.grad, f"member {i} grad {name}", 1e-10, 1e-10)


def test_onnx_export_of_a_strided_conv_keeps_dynamic_sizes_and_records_tiny_maps(monkeypatch):
    # While an ONNX export recorded, the reference's guard for oneDNN's unsafe CPU geometries looped in Python over
    # every output position of a stride-2 conv: the non-strict export fixed a dynamic height and width to the example's
    # (torch.onnx.export then narrowed them to constants without a word), and torch.jit.trace of a map whose strided
    # output is one pixel failed inside suggest_memory_format ("Expected bool, got Tensor"). The file runs on another
    # runtime than oneDNN: no guard while it records.
    from torch.export import Dim

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()).eval()
    _randomize(ref)
    fused = FusedConvBNReLU(4, 6, 3, stride=2, padding=1).eval()
    fused.load_state_dict(ref.state_dict())
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    x = torch.randn(2, 4, 48, 48)
    dims = ({2: Dim("h", min=32, max=96), 3: Dim("w", min=32, max=96)},)
    with torch.no_grad():
        recorded = torch.export.export(fused, (x,), dynamic_shapes=dims, strict=False).module()
        other = torch.randn(2, 4, 64, 41)
        assert_close(recorded(other), ref(other), "recorded at 48x48, run at 64x41", ATOL, RTOL)
        for fmt in (torch.contiguous_format, torch.channels_last):
            tiny = torch.randn(1, 4, 2, 2).contiguous(memory_format=fmt)  # a one-pixel strided output
            traced = _trace(fused, tiny, check_trace=False)
            assert_close(traced(tiny), ref(tiny), f"traced on a 2x2 map ({fmt})", ATOL, RTOL)
    monkeypatch.undo()
    with torch.no_grad():  # the reference traced on its own (no ONNX export): its guard runs, traced too
        lone = FusedConvBNReLU(4, 6, 3, stride=2, padding=1, backend="reference").eval()
        lone.load_state_dict(ref.state_dict())
        tiny = torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last)
        assert_close(_trace(lone, tiny, check_trace=False)(tiny), ref(tiny), "reference traced on 2x2", ATOL, RTOL)


def test_onnx_export_records_the_loss_as_aten_ops(monkeypatch):
    # upsample_cross_entropy was left out of the ONNX rerouting (only conv_bn_relu's and aspp's front doors had it);
    # the backends' resolver now reroutes every op while an ONNX export records.
    import deeplab_ops

    class Loss(nn.Module):
        def forward(self, logits, target):
            return deeplab_ops.upsample_cross_entropy(logits, target)

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 9, 11))
    recorded = torch.export.export(Loss(), (logits, target), strict=False).module()
    ops = {str(n.target) for n in recorded.graph.nodes if n.op == "call_function"}
    assert not {op for op in ops if "deeplab_ops" in op}, sorted(ops)
    want = F.cross_entropy(F.interpolate(logits, (9, 11), mode="bilinear", align_corners=False), target)
    assert_close(recorded(logits, target), want, "recorded loss", ATOL, RTOL)


@pytest.mark.parametrize("kind", ["FusedASPP", "fuse_modules", "converted", "deepcopy", "assigned", "assigned fused"])
def test_what_a_user_takes_of_a_fused_aspp_before_its_first_call_keeps_following_it(kind):
    # A fused ASPP moved its BatchNorms' tensors into one storage per kind at its first call (t.data = row): a
    # state_dict(), a .detach() or a numpy view taken before that call silently stopped following the module. They
    # are laid out where the module is built, fused, converted or copied, so the aliases stay the module's, as
    # torchvision's.
    if kind == "FusedASPP":
        module = _randomize(FusedASPP(4, (1, 2), 4))
    elif kind == "deepcopy":  # (each parameter deep-copied into a storage of its own)
        module = copy.deepcopy(_randomize(FusedASPP(4, (1, 2), 4)))
    elif kind.startswith("assigned"):  # load_state_dict(assign=True): the module takes the state_dict's tensors
        module = FusedASPP(4, (1, 2), 4) if kind == "assigned" else fuse_modules(TorchvisionASPP(4, (1, 2), 4))
        source = _randomize(FusedASPP(4, (1, 2), 4))
        module.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    else:
        module = fuse_modules(_randomize(TorchvisionASPP(4, (1, 2), 4)))
        if kind == "converted":
            module = module.double()  # every tensor given a storage of its own, then laid out again
    dtype = next(module.parameters()).dtype
    aliases = module.state_dict()
    view = module.project[1].running_mean.numpy()
    weight = module.convs[0][1].weight.detach()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.randn(2, 4, 6, 6, dtype=dtype)).square().mean().backward()
    optimizer.step()
    for name, value in module.state_dict().items():
        assert torch.equal(aliases[name], value), f"{name}: the state_dict taken before the first call went stale"
    assert torch.equal(torch.from_numpy(view), module.project[1].running_mean)
    assert torch.equal(weight, module.convs[0][1].weight)
    assert not torch.equal(aliases["project.1.running_mean"], torch.zeros(4, dtype=dtype))  # the step did update


@pytest.mark.parametrize("built_in_mode", [False, True])
@pytest.mark.parametrize("kind", ["FusedConvBNReLU", "FusedASPP", "fuse_modules"])
def test_fake_tensor_mode_runs_the_fused_modules_and_leaves_real_ones_as_they_were(kind, built_in_mode):
    # Under FakeTensorMode (shape propagation, memory estimation) the training check of the running statistics
    # compared data pointers (all 0 there) and then ran a data-dependent isin: DataDependentOutputException. A real
    # fused ASPP called there packed its tensors with the mode's data-less stack (a meta tensor), losing their values;
    # an eval call could cache a fake BatchNorm fold for the real calls after it.
    from torch._subclasses.fake_tensor import FakeTensorMode

    def make():
        torch.manual_seed(0)
        if kind == "fuse_modules":
            module = _randomize(TorchvisionASPP(4, (1, 2), 4))
            module.project[3].p = 0.0  # (no dropout: the two calls compared below)
            return fuse_modules(module)
        return {"FusedConvBNReLU": lambda: FusedConvBNReLU(4, 4, 3, padding=1),
                "FusedASPP": lambda: FusedASPP(4, (1, 2), 4)}[kind]()

    for train in (True, False):
        if built_in_mode:
            with FakeTensorMode(allow_non_fake_inputs=True):
                module = make().train(train)
                out = module(torch.randn(2, 4, 6, 6))
                if train:
                    out.sum().backward()
            assert out.shape == (2, 4, 6, 6)
            continue
        module, ref = make().train(train), make().train(train)
        unfuse_modules(ref)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = module(torch.randn(2, 4, 6, 6))
            if train:
                out.sum().backward()
        assert out.shape == (2, 4, 6, 6)
        module.zero_grad(set_to_none=True)
        for name, value in module.state_dict().items():
            assert type(value) is torch.Tensor and not value.is_meta, name
            if not name.endswith("num_batches_tracked"):  # (eager's add_(1) reaches the real counter there too)
                assert torch.equal(value, before[name]), f"{name} changed by a fake call"
        ref.load_state_dict(module.state_dict())
        x = torch.randn(2, 4, 6, 6)
        assert_close(module(x), ref(x), f"a real call after the fake one (train={train})", ATOL, RTOL)


def test_a_fused_aspp_leaves_batchnorm_tensors_that_are_rows_of_a_users_buffer_there():
    # The pack test took any contiguous row of a storage of len(bns) rows for an earlier pack of its own: BatchNorm
    # tensors that were rows of a user's (B, C) buffer in another order than the BatchNorms' were moved out of it at
    # the first call, and the buffer stopped receiving running-statistic updates and optimizer steps.
    from deeplab_ops.modules import aspp_parts, back_to_back

    def with_buffers(module):
        bns = aspp_parts(module)[1]
        means = torch.zeros(len(bns), 4)
        weights = torch.rand(len(bns), 4, generator=torch.Generator().manual_seed(1)) + 0.5
        for i, bn in enumerate(bns):  # rows in reverse order
            bn.running_mean = means[len(bns) - 1 - i]
            bn.weight = nn.Parameter(weights[len(bns) - 1 - i])
        return module, means, weights

    torch.manual_seed(0)
    ref, ref_means, ref_weights = with_buffers(_randomize(TorchvisionASPP(4, (1, 2), 4)))
    ref.project[3].p = 0.0
    fused, means, weights = with_buffers(fuse_modules(copy.deepcopy(ref)))
    x = torch.randn(2, 4, 6, 6)
    for module in (ref, fused):
        module(x).square().mean().backward()
        with torch.no_grad():
            for p in module.parameters():
                p.sub_(0.1 * p.grad)
    assert means.abs().sum() > 0, "the running-mean buffer stopped following the module"
    assert_close(means, ref_means, "the running-mean buffer", ATOL, RTOL)
    assert_close(weights, ref_weights, "the weight buffer after a step", ATOL, RTOL)
    bns = aspp_parts(fused)[1]
    assert all(bn.running_mean.untyped_storage().data_ptr() == means.untyped_storage().data_ptr() for bn in bns)

    assert not back_to_back([bn.running_mean for bn in bns])  # (concatenated per call: nothing moved)


@pytest.mark.parametrize("before", ["none", "to", "load_state_dict", "deepcopy"])
@pytest.mark.parametrize("how", ["replaced", "tied"])
def test_a_replaced_or_tied_batchnorm_moves_none_of_the_others(before, how):
    # A BatchNorm replaced (or a Parameter tied between two of them) left its kind not back to back, and the next call
    # stacked every BatchNorm's tensor of that kind anew: aliases of the untouched ones (a state_dict(), a numpy view)
    # stopped following them; a tied Parameter was moved twice, so this happened on every call. The kind is now
    # concatenated per call and nothing moves; results stay the unfused module's.
    from deeplab_ops.modules import aspp_parts

    torch.manual_seed(0)
    module = _randomize(FusedASPP(4, (1, 2), 4))
    x = torch.randn(2, 4, 6, 6)
    module(x)
    if before == "to":
        module.to("cpu")
    elif before == "load_state_dict":
        module.load_state_dict(module.state_dict())
    elif before == "deepcopy":
        module = copy.deepcopy(module)
    if how == "replaced":
        module.project[1] = nn.BatchNorm2d(4)
    else:
        module.convs[2][1].weight = module.convs[1][1].weight
    ref = unfuse_modules(copy.deepcopy(module))
    aliases = module.state_dict()
    view = module.convs[0][1].running_mean.numpy()
    for _ in range(2):
        assert_close(module(x), ref(x), f"output ({how}, {before})", ATOL, RTOL)
    for name, value in module.state_dict().items():
        assert torch.equal(aliases[name], value), f"{name}: the state_dict taken before the calls went stale"
    assert torch.equal(torch.from_numpy(view), module.convs[0][1].running_mean)
    for (name, b_r), b_f in zip(ref.named_buffers(), module.buffers(), strict=True):
        assert_close(b_f, b_r, f"buffer {name}", ATOL, RTOL)
    assert len(aspp_parts(module)[1]) == 5


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["FusedASPP", "fuse_modules"])
def test_an_in_place_write_to_any_batchnorm_between_forward_and_backward_is_refused_as_eager(kind, train):
    # The op takes each kind of BatchNorm tensor as one view of the pack, which shares only the first BatchNorm's
    # version counter: a write to another BatchNorm's weight between forward and backward (another optimizer or
    # param group stepping it) raised nothing, and the backward read the new values (a silently wrong gradient).
    torch.manual_seed(0)
    module = FusedASPP(4, (1, 2), 4) if kind == "FusedASPP" else fuse_modules(TorchvisionASPP(4, (1, 2), 4))
    module.train(train)
    x = torch.randn(2, 4, 6, 6)
    for bn in (module.convs[0][1], module.convs[2][1], module.project[1]):
        out = module(x)
        with torch.no_grad():
            bn.weight.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.square().sum().backward()


# ---- found by an audit of deployment uses (2026-12-07) ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["block", "fused chain"])
def test_a_fold_of_parameters_in_shared_memory_is_never_kept(kind):
    """Hogwild: model.share_memory(), another process trains, this one evaluates. The other process's writes move
    no version counter here, so the eval fold kept from before went on giving the old weights' outputs (0.33 off on
    a layer, 3.4 on a DeepLabV3). A write through `.data` here stands for them."""
    from deeplab_ops.nn import FusedConvBNReLU, fuse_modules

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    fused = FusedConvBNReLU(4, 6, 3, padding=1) if kind == "block" else fuse_modules(copy.deepcopy(plain))
    fused.load_state_dict(plain.state_dict())
    fused.share_memory().eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        fused(x)
        fused[0].weight.data.mul_(-1.5)  # (what another process's optimizer step looks like from here)
        plain.load_state_dict(fused.state_dict())
        assert_close(fused(x), plain.eval()(x), "after the shared weights changed", 1e-5, 1e-5)


def test_eager_quantization_of_a_fused_model_is_refused_saying_what_to_do():
    """prepare_qat left fuse_modules' fused convolutions in place (it swaps modules by exact class): QAT trained no
    fake-quantization without a word, and convert then failed on a quint8 input with a dtype error."""
    import torch.ao.quantization as Q

    from deeplab_ops.nn import fuse_modules, unfuse_modules

    plain = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    model = nn.Sequential(Q.QuantStub(), fuse_modules(copy.deepcopy(plain)), Q.DeQuantStub()).train()
    model.qconfig = Q.get_default_qat_qconfig("x86")
    prepared = Q.prepare_qat(model)
    with pytest.raises(RuntimeError, match=r"a fused convolution \(fuse_modules\) has a torch.ao.quantization "
                                           r"qconfig.*call deeplab_ops.nn.unfuse_modules\(model\) before"):
        prepared(torch.randn(2, 4, 9, 9))
    with pytest.raises(RuntimeError, match="has a torch.ao.quantization qconfig"):
        prepared[1][0](torch.randn(2, 4, 9, 9))  # the conv called on its own
    # following the advice: unfused first, QAT fake-quantizes the convolution
    model = nn.Sequential(Q.QuantStub(), unfuse_modules(fuse_modules(copy.deepcopy(plain))), Q.DeQuantStub())
    model.train().qconfig = Q.get_default_qat_qconfig("x86")
    prepared = Q.prepare_qat(model)
    prepared(torch.randn(2, 4, 9, 9))
    assert sum(isinstance(m, Q.FakeQuantize) for m in prepared.modules()) > 1

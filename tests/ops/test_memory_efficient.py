"""conv_bn_relu(memory_efficient=True): same forward, gradients and running statistics as the path that saves the
pre-BN activation, on every backend; what autograd saves; small-|gamma| channels; no sync; fused models."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import (
    TRITON_DEVICE,
    TRITON_MARKS,
    Case,
    assert_close,
    assert_same_training_step,
    backend_param,
    cuda_test,
    device_for,
    make_inputs,
    tolerances,
    triton_test,
)
from torch import nn

import deeplab_ops
from deeplab_ops.fusion import fused_config

NAMES = ["x", "weight", "bn_weight", "bn_bias", "residual"]


def _leaves(tensors, dtype=None):
    out = []
    for t in tensors:
        if t is not None:
            t = t.detach().clone(memory_format=torch.preserve_format)
            t = (t.to(dtype) if dtype is not None else t).requires_grad_()
        out.append(t)
    return out


def _run(case: Case, backend: str, memory_efficient: bool, inputs, grad_out=None, dtype=None):
    """(out, [grads of x, weight, bn_weight, bn_bias, residual], running_mean, running_var) of one call."""
    x, w, gamma, beta, rm, rv, res = inputs
    leaves = _leaves((x, w, gamma, beta, res), dtype)
    rm, rv = (rm.clone(), rv.clone()) if dtype is None else (rm.to(dtype), rv.to(dtype))
    out = deeplab_ops.conv_bn_relu(
        leaves[0], leaves[1], leaves[2], leaves[3], rm, rv, stride=case.stride, padding=case.pad,
        dilation=case.dilation, training=case.training, residual=leaves[4], relu=case.relu, backend=backend,
        memory_efficient=memory_efficient,
    )
    if grad_out is None:
        grad_out = torch.randn_like(out)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype)))
    return out, [next(grads) if t is not None else None for t in leaves], rm, rv, grad_out


def _compare(case: Case, backend: str, atol: float, rtol: float, dtype=torch.float32, device="cpu") -> None:
    """memory_efficient=True against False (tight) and against the float64 reference (the usual tolerance)."""
    inputs = make_inputs(case, dtype, device)
    lean = _run(case, backend, True, inputs)
    grad_out = lean[4]
    full = _run(case, backend, False, inputs, grad_out)
    ref = _run(case, "reference", False, inputs, grad_out, dtype=torch.float64)
    ratol, rrtol = tolerances(dtype)
    assert lean[0].is_contiguous(memory_format=torch.channels_last if case.channels_last else torch.contiguous_format)
    for what, a, b, r in [("output", lean[0], full[0], ref[0]), ("running_mean", lean[2], full[2], ref[2]),
                          ("running_var", lean[3], full[3], ref[3])]:
        assert_close(a, b, f"[{case}] {backend} lean vs saving {what}", atol, rtol)
        assert_close(a, r, f"[{case}] {backend} lean vs reference {what}", ratol, rrtol)
    for name, a, b, r in zip(NAMES, lean[1], full[1], ref[1], strict=True):
        if a is None:
            continue
        assert_close(a, b, f"[{case}] {backend} lean vs saving grad {name}", atol, rtol)
        assert_close(a, r, f"[{case}] {backend} lean vs reference grad {name}", ratol * 10, rrtol * 10)


_MATRIX = [
    Case(2, 3, 7, 6, 5, training=t, residual=r, relu=a, channels_last=cl)
    for t in (True, False) for r in (False, True) for a in (True, False) for cl in (False, True)
]


@pytest.mark.parametrize("case", _MATRIX, ids=str)
def test_cpu_matches_saving_path(case):
    # The recomputed y is the saved one (same convolution): gradients agree to float32 rounding.
    _compare(case, "cpu", 1e-5, 1e-5)


@pytest.mark.parametrize("case", [
    Case(2, 3, 5, 6, 4, training=True, channels_last=True),
    Case(2, 3, 5, 6, 4, training=True, residual=True, relu=False),
    Case(2, 3, 5, 6, 4, training=False, residual=True),
    Case(2, 3, 6, 5, 4, training=False, relu=False, channels_last=True),
    Case(2, 3, 6, 6, 4, stride=2, dilation=2, training=True, residual=True),
], ids=str)
@pytest.mark.usefixtures("no_tf32")
@triton_test
def test_triton_matches_saving_path(case):
    _compare(case, "triton", 1e-5, 1e-5, device=TRITON_DEVICE)


@pytest.mark.usefixtures("no_tf32")
@cuda_test
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    Case(4, 16, 17, 19, 32, training=True, channels_last=True),
    Case(4, 16, 17, 19, 32, training=True, residual=True, relu=False),
    Case(4, 16, 17, 19, 32, training=False, residual=True),
    Case(4, 16, 17, 19, 32, stride=2, dilation=2, training=False, channels_last=True),
], ids=str)
def test_gpu_matches_saving_path(backend, dtype, case):
    # The lean backward recomputes y by the backend's own convolution: lean and saving results agree to the
    # dtype's tolerance (cuDNN / autotuned Triton may pick another algorithm the second time).
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else tolerances(dtype)
    _compare(case, backend, atol, rtol, dtype, "cuda")


@pytest.mark.parametrize("case", [
    Case(2, 3, 7, 6, 5, training=False, residual=True),
    Case(2, 3, 7, 6, 5, training=True, relu=False, residual=True, channels_last=True),
], ids=str)
def test_cpu_bfloat16(case):
    atol, rtol = tolerances(torch.bfloat16)
    _compare(case, "cpu", atol, rtol, torch.bfloat16)


def test_eval_without_dgamma_reads_no_y():
    # Frozen BN with a frozen gamma: no gradient reads xhat, so nothing is recomputed; the others match exactly.
    case = Case(2, 3, 6, 6, 4, training=False, residual=True)
    x, w, gamma, beta, rm, rv, res = make_inputs(case)
    got = []
    for lean in (False, True):
        leaves = _leaves((x, w, beta, res))
        out = deeplab_ops.conv_bn_relu(leaves[0], leaves[1], gamma, leaves[2], rm, rv, padding=1, training=False,
                                       residual=leaves[3], backend="cpu", memory_efficient=lean)
        got.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for name, a, b in zip(["x", "weight", "bn_bias", "residual"], *got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"grad {name}")


def test_reference_ignores_flag():
    # The reference is the oracle: autograd through F.conv2d/F.batch_norm, whatever memory_efficient says.
    case = Case(2, 3, 5, 5, 4, residual=True)
    inputs = make_inputs(case)
    lean = _run(case, "reference", True, inputs)
    full = _run(case, "reference", False, inputs, lean[4])
    torch.testing.assert_close(lean[0], full[0], rtol=0, atol=0)
    for a, b in zip(lean[1], full[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend,training,relu", [
    ("cpu", True, True), ("cpu", False, True), ("cpu", True, False),
    pytest.param("triton", True, True, marks=TRITON_MARKS),  # y recomputed by the triton conv
    pytest.param("triton", False, True, marks=TRITON_MARKS),  # eval with a gamma gradient: y recomputed too
])
def test_gradcheck_float64(backend, training, relu):
    case = Case(2, 2, 4, 4, 3, training=training, relu=relu, residual=True)
    x, w, gamma, beta, rm, rv, res = (t.double() if t is not None else None
                                      for t in make_inputs(case, device=device_for(backend)))
    leaves = _leaves((x, w, gamma, beta, res))

    def f(x, w, gamma, beta, res):
        return deeplab_ops.conv_bn_relu(x, w, gamma, beta, None if training else rm, None if training else rv,
                                        padding=1, training=training, residual=res, relu=relu, backend=backend,
                                        memory_efficient=True)

    assert torch.autograd.gradcheck(f, tuple(leaves), fast_mode=True)


# ---- small |gamma| ------------------------------------------------------------------------------------------------

_SMALL_GAMMA = [0.0, -1e-7, 1e-5, -1e-3, 3e-2, -0.7, 1.3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training,relu,residual", [(False, True, True), (False, False, False),
                                                     (True, False, True), (True, True, False)])
def test_small_gamma_exact(dtype, training, relu, residual):
    """Channels with gamma = 0, tiny of either sign, small and ordinary: the lean backward never divides by gamma
    (it recomputes y by the same convolution), so its gradients are bitwise those of the saving path."""
    c = len(_SMALL_GAMMA)
    case = Case(3, 4, 6, 7, c, training=training, relu=relu, residual=residual)
    x, w, _, beta, rm, rv, res = (t.to(dtype) if t is not None else None for t in make_inputs(case))
    gamma = torch.tensor(_SMALL_GAMMA, dtype=dtype)
    inputs = (x, w, gamma, beta, rm, rv, res)
    lean = _run(case, "cpu", True, inputs)
    full = _run(case, "cpu", False, inputs, lean[4])
    torch.testing.assert_close(lean[0], full[0], rtol=0, atol=0)
    for name, a, b in zip(NAMES, lean[1], full[1], strict=True):
        if a is not None:
            assert a.isfinite().all(), f"grad {name} is not finite: {a}"
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"grad {name}")


def test_lean_backward_never_synchronizes():
    """No host synchronization in the lean backward (the channel choice of the old rebuild needed one per layer)."""
    case = Case(2, 3, 6, 6, 4, training=False, residual=True)
    x, w, gamma, beta, rm, rv, res = make_inputs(case)
    leaves = _leaves((x, w, gamma, beta, res))
    out = deeplab_ops.conv_bn_relu(*leaves[:4], rm, rv, padding=1, training=False, residual=leaves[4],
                                   backend="cpu", memory_efficient=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(torch.randn_like(out))
    names = {e.name for e in prof.events()}
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}, sorted(names)


# ---- what autograd saves ------------------------------------------------------------------------------------------


def _saved_bytes(fn, exclude) -> tuple[int, int]:
    """(bytes, count) of the unique storages autograd saves while running fn(), other than those of `exclude`."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {t.untyped_storage().data_ptr() for t in [*exclude, out] if t is not None}
    extra = {k: v for k, v in seen.items() if k not in skip}
    return sum(extra.values()), len(extra)


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton")])
@pytest.mark.parametrize("training,residual", [(True, False), (False, True)])
def test_saved_bytes(backend, training, residual):
    """The saving path keeps the pre-BN activation (N*C*H*W elements) plus mean and invstd; the lean one keeps only
    mean and invstd (2*C statistics) beyond the op's own inputs and output."""
    case = Case(2, 3, 8, 8, 6, training=training, residual=residual)
    x, w, gamma, beta, rm, rv, res = make_inputs(case, device=device_for(backend))
    leaves = _leaves((x, w, gamma, beta, res))

    def call(lean):
        return lambda: deeplab_ops.conv_bn_relu(*leaves[:4], rm, rv, padding=1, training=training,
                                                residual=leaves[4], backend=backend, memory_efficient=lean)

    full_bytes, _ = _saved_bytes(call(False), leaves)
    lean_bytes, lean_count = _saved_bytes(call(True), leaves)
    y_bytes = 2 * 6 * 8 * 8 * 4
    stats_bytes = 2 * 6 * 4
    assert full_bytes == y_bytes + stats_bytes, (full_bytes, y_bytes)
    assert (lean_bytes, lean_count) == (stats_bytes, 2)


# ---- modules and fused models -------------------------------------------------------------------------------------


class _Block(nn.Module):
    # torchvision's BasicBlock shape: conv1/bn1/relu/conv2/bn2 (+ downsample), what fuse_modules recognises.
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def _small_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), _Block(4, 6, 2),
                          nn.Conv2d(6, 2, 1))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5)  # either sign, some small
                m.bias.normal_()
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_fused_model_matches_unfused(frozen_bn):
    model = _small_model()
    fused = deeplab_ops.nn.fuse_modules(copy.deepcopy(model), backend="cpu", memory_efficient=True)
    cfgs = [fused_config(m) for m in fused.modules() if fused_config(m) is not None]
    assert len(cfgs) == 3 and all(c.memory_efficient for c in cfgs)  # stem conv, block, its downsample
    for m in (model, fused):
        m.train()
        if frozen_bn:
            for bn in m.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.eval()
    x = torch.randn(2, 3, 9, 9)
    target = torch.randn(2, 2, 5, 5)
    assert_same_training_step(model, fused, x, target)


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_fused_model_saves_no_pre_bn_activations(frozen_bn):
    # Exactly the four fused layers' y (stem 2x4x9x9, block conv1, conv2 and downsample 2x6x5x5) are no longer kept.
    model = _small_model().train()
    if frozen_bn:
        model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    kept = []
    for lean in (False, True):
        deeplab_ops.nn.fuse_modules(model, backend="cpu", memory_efficient=lean)
        kept.append(_saved_bytes(lambda: model(x), [x, *model.parameters(), *model.buffers()])[0])
    assert kept[0] - kept[1] == 4 * (2 * 4 * 9 * 9 + 3 * 2 * 6 * 5 * 5), kept


def test_fused_config_copies_and_module():
    model = deeplab_ops.nn.fuse_modules(_small_model(), backend="cpu", memory_efficient=True)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        cfgs = [fused_config(m) for m in clone.modules() if fused_config(m) is not None]
        assert len(cfgs) == 3 and all(c.memory_efficient for c in cfgs)
    plain = deeplab_ops.nn.fuse_modules(model, backend="cpu")
    assert not any(fused_config(m).memory_efficient for m in plain.modules() if fused_config(m) is not None)
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        deeplab_ops.nn.fuse_modules(model, memory_efficient="yes")

    mod = deeplab_ops.nn.FusedConvBNReLU(3, 4, 3, padding=1, backend="cpu", memory_efficient=True)
    assert "memory_efficient=True" in repr(mod)
    seq = nn.Sequential(copy.deepcopy(mod[0]), copy.deepcopy(mod[1]), nn.ReLU())
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    a, b = mod(x), seq(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a.sum(), [x, *mod.parameters()])
    gb = torch.autograd.grad(b.sum(), [x, *seq.parameters()])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_flag_must_be_bool():
    x, w, gamma, beta, rm, rv, _ = make_inputs(Case(2, 3, 5, 5, 4))
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        deeplab_ops.conv_bn_relu(x, w, gamma, beta, rm, rv, memory_efficient=1)

"""memory_efficient=True as a demanding user checks it: odd shapes and BatchNorm values (stride 2, dilation, padding 0,
1x1, N = 1, H or W = 1, channels_last and non-contiguous inputs, gamma 0 / tiny / negative, large beta, tiny eps,
eval, frozen BatchNorm, momentum 0 / 1 / None, some inputs without gradient) against the path that saves the pre-BN
activation (bitwise) and eager PyTorch in float64; gradcheck of the ASPP; what stays alive after a forward (not only
what autograd is handed); no host synchronization; checkpointing, torch.compile, switching the flag after a model
is built; synchronized BatchNorm; a fused DeepLabV3 trained both ways."""

from __future__ import annotations

import collections
import copy
import gc
import os
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TRITON_DEVICE, TRITON_MARKS, run_two_processes, triton_test
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import deeplab_ops
import model as models
from deeplab_ops import reference
from deeplab_ops.fusion import fused_config
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, fuse_modules

F64 = torch.float64
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}


# ---- conv_bn_relu: odd shapes and values --------------------------------------------------------------------------


def _leaf(t: torch.Tensor, grad: bool, dtype=None) -> torch.Tensor:
    """A fresh leaf with t's values and strides (a non-contiguous view stays non-contiguous), in `dtype`."""
    c = torch.empty_strided(t.size(), t.stride(), dtype=dtype or t.dtype, device=t.device)
    with torch.no_grad():
        c.copy_(t)
    return c.requires_grad_(grad)


def _seed(spec) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(spec).encode()))


def _gamma(kind: str, c: int, g: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(c, dtype=F64)
    if kind == "tiny":
        return torch.randn(c, generator=g, dtype=F64) * 1e-30
    if kind == "negative":
        return -torch.rand(c, generator=g, dtype=F64) - 0.1
    if kind == "mixed":  # exactly 0, -0, tiny of either sign, ordinary of either sign
        return torch.tensor([0.0, -0.0, 1e-300, -1e-8, 2.0, -3.0, 0.5], dtype=F64)[:c]
    return torch.randn(c, generator=g, dtype=F64)


# (n, cin, h, w, cout, kernel, stride, padding, dilation, training, relu, residual, layout, gamma, beta scale, eps,
#  momentum, inputs with a gradient)
_CONV_CASES = {
    "stride2-pad0": (2, 3, 9, 8, 4, 3, 2, 0, 1, True, True, False, "nchw", "normal", 1, 1e-5, 0.1, "all"),
    "stride2x1-dil1x3-cl": (3, 2, 8, 7, 5, 3, (2, 1), (1, 3), (1, 3), True, True, True, "cl", "mixed", 1, 1e-5, 0.1,
                            "all"),
    "1x1-stride3-n1": (1, 5, 7, 7, 3, 1, 3, 0, 1, True, False, True, "nchw", "negative", 1, 1e-5, 1.0, "all"),
    "h1-train": (2, 3, 1, 9, 4, (1, 3), 1, (0, 1), 1, True, True, False, "cl", "normal", 1e4, 1e-12, 0.0, "all"),
    "w1-eval-n1": (1, 3, 6, 1, 4, (3, 1), 1, (1, 0), (2, 1), False, True, True, "nchw", "mixed", 1, 1e-5, 0.1,
                   "all"),
    "eval-gamma0": (2, 3, 5, 6, 4, 3, 1, 1, 1, False, False, False, "cl", "zeros", 1, 1e-5, 0.1, "all"),
    "eval-tiny-gamma": (2, 3, 5, 6, 4, 3, 1, 2, 2, False, True, False, "nchw", "tiny", 1, 1e-5, 0.1, "all"),
    "train-gamma0-bigbeta": (2, 3, 6, 5, 4, 3, 1, 1, 1, True, True, True, "nchw", "zeros", 1e4, 1e-5, 0.1, "all"),
    "train-no-affine": (2, 3, 6, 5, 4, 3, 1, 1, 1, True, True, False, "cl", "none", 0, 0.5, 0.37, "all"),
    "noncontig": (2, 3, 7, 6, 4, 3, 2, 1, 1, True, True, True, "strided", "normal", 1, 1e-5, 0.1, "all"),
    "noncontig-eval": (2, 3, 7, 6, 4, (2, 3), 1, (1, 0), 1, False, True, False, "strided", "negative", 1, 1e-5, 0.1,
                       "all"),
    "even-kernel": (2, 2, 6, 6, 3, 2, 1, 0, 2, True, True, False, "nchw", "normal", 1, 1e-5, 0.1, "all"),
    "weight-only": (2, 3, 6, 5, 4, 3, 1, 1, 1, True, True, False, "cl", "normal", 1, 1e-5, 0.1, "weight"),
    "frozen-bn-x-only": (2, 3, 6, 5, 4, 3, 1, 1, 1, False, True, True, "nchw", "normal", 1, 1e-5, 0.1, "x"),
    "eval-gamma-only": (2, 3, 6, 5, 4, 3, 2, 1, 1, False, False, False, "cl", "mixed", 1, 1e-5, 0.1, "bn_weight"),
    "train-bn-only": (2, 3, 6, 5, 4, 3, 1, 1, 1, True, True, True, "nchw", "negative", 1, 1e-5, 0.1, "bn"),
    "relu-boundary": (2, 3, 6, 5, 4, 3, 1, 1, 1, True, True, False, "nchw", "zeros", 0, 1e-5, 0.1, "all"),
}
_NAMES = ("x", "weight", "bn_weight", "bn_bias", "residual")
_WANT = {"all": _NAMES, "weight": ("weight",), "x": ("x",), "bn_weight": ("bn_weight",),
         "bn": ("bn_weight", "bn_bias")}


def _conv_inputs(spec, device="cpu"):
    (n, cin, h, w, cout, k, stride, padding, dilation, _training, _relu, residual, layout, gamma, beta_scale,
     *_rest) = spec
    g = _seed(spec)
    k = k if isinstance(k, tuple) else (k, k)
    if layout == "strided":  # every second column of a wider tensor
        x = torch.randn(n, cin, h, 2 * w, generator=g, dtype=F64)  # sliced after the move (`to` would compact it)
    else:
        x = torch.randn(n, cin, h, w, generator=g, dtype=F64) * 3 + 1
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, *k, generator=g, dtype=F64)
    pair = [v if isinstance(v, tuple) else (v, v) for v in (stride, padding, dilation)]
    ho = (h + 2 * pair[1][0] - pair[2][0] * (k[0] - 1) - 1) // pair[0][0] + 1
    wo = (w + 2 * pair[1][1] - pair[2][1] * (k[1] - 1) - 1) // pair[0][1] + 1
    bn_weight = _gamma(gamma, cout, g)
    bn_bias = None if beta_scale == 0 else torch.randn(cout, generator=g, dtype=F64) * beta_scale
    rm, rv = torch.randn(cout, generator=g, dtype=F64), torch.rand(cout, generator=g, dtype=F64) + 0.2
    res = torch.randn(n, cout, ho, wo, generator=g, dtype=F64) if residual else None
    if res is not None and layout == "cl":
        res = res.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, cout, ho, wo, generator=g, dtype=F64)
    if layout == "cl":  # the gradient arrives in the output's layout, as in a channels_last network
        grad = grad.contiguous(memory_format=torch.channels_last)
    moved = [t if t is None else t.to(device) for t in (x, weight, bn_weight, bn_bias, rm, rv, res, grad)]
    if layout == "strided":
        moved[0] = moved[0][..., ::2]
    return moved


def _conv_run(spec, inputs, backend, lean, dtype=F64):
    """(out, {name: grad}, running_mean, running_var) of one call on fresh copies of `inputs` in `dtype`."""
    *_, training, relu, _res, _layout, _gamma, _beta, eps, momentum, want = spec[:18]
    stride, padding, dilation = spec[6:9]
    x, w, gamma, beta, rm, rv, res, grad = inputs
    leaves = {k: None if v is None else _leaf(v, k in _WANT[want], dtype)
              for k, v in zip(_NAMES, (x, w, gamma, beta, res), strict=True)}
    # copies: each run updates its own running statistics (with .to() a same-dtype, same-device run would update the
    # caller's tensors, shared by every run of the comparison: on a GPU the runs' results all aliased one tensor)
    rm, rv = rm.to(dtype, copy=True), rv.to(dtype, copy=True)
    if backend == "eager":
        y = F.conv2d(leaves["x"], leaves["weight"], None, stride, padding, dilation)
        out = F.batch_norm(y, rm, rv, leaves["bn_weight"], leaves["bn_bias"], training, momentum, eps)
        out = out + leaves["residual"] if leaves["residual"] is not None else out
        out = F.relu(out) if relu else out
    else:
        out = deeplab_ops.conv_bn_relu(
            leaves["x"], leaves["weight"], leaves["bn_weight"], leaves["bn_bias"], rm, rv, stride=stride,
            padding=padding, dilation=dilation, training=training, momentum=momentum, eps=eps,
            residual=leaves["residual"], relu=relu, backend=backend, memory_efficient=lean)
    named = [(k, v) for k, v in leaves.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, [v for _, v in named], grad.to(out.dtype))
    return out, dict(zip([k for k, _ in named], grads, strict=True)), rm, rv


def _assert_lean_exact(spec, backend, dtype, device="cpu"):
    inputs = _conv_inputs(spec, device)
    if spec[12] == "strided":
        assert not inputs[0].is_contiguous() and not inputs[0].is_contiguous(memory_format=torch.channels_last)
    lean = _conv_run(spec, inputs, backend, True, dtype)
    full = _conv_run(spec, inputs, backend, False, dtype)
    eager = _conv_run(spec, [t if t is None else t.cpu() for t in inputs], "eager", False, F64)
    pairs = [("output", lean[0], full[0], eager[0]), ("running_mean", lean[2], full[2], eager[2]),
             ("running_var", lean[3], full[3], eager[3])]
    assert lean[1].keys() == full[1].keys() == eager[1].keys()
    pairs += [(f"grad {k}", lean[1][k], full[1][k], eager[1][k]) for k in lean[1]]
    tol = 1e-9 if dtype == F64 else 2e-4
    for what, a, b, e in pairs:
        # the recomputed y is the saved one (same convolution): bitwise the saving path's
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, w=what: f"{backend} lean vs saving {w}: {m}")
        assert a.isfinite().all(), f"{what}: not finite"
        scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
        torch.testing.assert_close(a.double().cpu(), e, rtol=tol, atol=tol * scale,
                                   msg=lambda m, w=what: f"{backend} lean vs eager float64 {w}: {m}")
    layout = torch.channels_last if spec[12] == "cl" else torch.contiguous_format
    assert lean[0].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(_CONV_CASES))
def test_conv_lean_odd_cases_cpu(name, dtype):
    _assert_lean_exact(_CONV_CASES[name], "cpu", dtype)


@triton_test
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("name", ["stride2x1-dil1x3-cl", "w1-eval-n1", "eval-gamma-only", "train-gamma0-bigbeta",
                                  "noncontig"])
def test_conv_lean_odd_cases_triton(name):
    _assert_lean_exact(_CONV_CASES[name], "triton", F64, TRITON_DEVICE)


def test_lean_placeholder_keeps_the_output_layout():
    """Where the lean backward reads no y (eval BatchNorm, no bn_weight gradient) and relu=False, grad_out stands in
    for y: the backward took its layout from it, so a channels_last layer given an NCHW gradient summed bn_bias's
    gradient in another order than the saving path (csrc/composite/conv_bn_relu_autograd.cpp converts it once)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=F64).contiguous(memory_format=torch.channels_last)
    w, gamma, beta = (torch.randn(4, 2, 3, 3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64),
                      torch.randn(4, generator=g, dtype=F64))
    rm, rv = torch.randn(4, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64) + 0.5
    grad = torch.randn(3, 4, 4, 5, generator=g, dtype=F64)  # NCHW, for a channels_last output
    got = []
    for lean in (False, True):
        b = beta.clone().requires_grad_()
        out = deeplab_ops.conv_bn_relu(x, w, gamma, b, rm, rv, padding=1, training=False, relu=False, backend="cpu",
                                       memory_efficient=lean)
        got.append(torch.autograd.grad(out, b, grad)[0])
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)


# ---- aspp: odd shapes and values ----------------------------------------------------------------------------------

# (n, cin, c, h, w, rates, training, momentum, eps, layout, gamma, BatchNorm form, inputs with a gradient)
_ASPP_CASES = {
    "h1-w1-eval-n1": (1, 3, 2, 1, 1, (1, 2), False, 0.1, 1e-5, "nchw", "mixed", "list", "all"),
    "rates-beyond-map": (2, 3, 2, 3, 2, (6, 12), True, 1.0, 1e-12, "cl", "normal", "flat", "all"),
    "no-rates": (3, 2, 3, 5, 4, (), True, 0.0, 1e-5, "nchw", "negative", "list", "all"),
    "noncontig-train": (2, 3, 2, 6, 5, (1, 3), True, 0.1, 1e-5, "strided", "zeros", "flat", "all"),
    "eval-bn-only": (2, 3, 2, 5, 6, (2,), False, 0.1, 1e-5, "cl", "negative", "list", "bn"),
    "train-x-only": (2, 4, 3, 4, 7, (1, 2, 3), True, 0.1, 0.5, "nchw", "tiny", "list", "x"),
    "eval-weights-only": (2, 3, 2, 7, 1, (1,), False, 0.1, 1e-5, "strided", "normal", "flat", "weights"),
}
_ASPP_WANT = {"all": ("x", "conv_weights", "pool_weight", "project_weight", "bn_weights", "bn_biases"),
              "bn": ("bn_weights", "bn_biases"), "x": ("x",),
              "weights": ("conv_weights", "pool_weight", "project_weight")}


def _aspp_inputs(spec, device="cpu"):
    n, cin, c, h, w, rates, _training, _m, _eps, layout, gamma, _form, _want = spec
    g = _seed(spec)
    if layout == "strided":
        x = torch.randn(n, cin, h, 2 * w, generator=g, dtype=F64)[..., ::2]
    else:
        x = torch.randn(n, cin, h, w, generator=g, dtype=F64)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    nb = len(rates) + 3
    t = dict(
        x=x, conv_weights=[torch.randn(c, cin, 1, 1, generator=g, dtype=F64)]
        + [torch.randn(c, cin, 3, 3, generator=g, dtype=F64) / 3 for _ in rates],
        pool_weight=torch.randn(c, cin, 1, 1, generator=g, dtype=F64),
        project_weight=torch.randn(c, (len(rates) + 2) * c, 1, 1, generator=g, dtype=F64) / 3,
        bn_weights=[_gamma(gamma, c, g) for _ in range(nb)],
        bn_biases=[torch.randn(c, generator=g, dtype=F64) for _ in range(nb)],
        running_means=[torch.randn(c, generator=g, dtype=F64) * 0.1 for _ in range(nb)],
        running_vars=[torch.rand(c, generator=g, dtype=F64) + 0.5 for _ in range(nb)],
    )
    t = {k: [u.to(device) for u in v] if isinstance(v, list) else v.to(device) for k, v in t.items()}
    return t, torch.randn(n, c, h, w, generator=g, dtype=F64).to(device)


def _aspp_run(spec, t, grad, backend, lean):
    rates, training, momentum, eps, form, want = spec[5], spec[6], spec[7], spec[8], spec[11], spec[12]

    def leaf(k, v):
        return _leaf(v, k in _ASPP_WANT[want])

    a = {k: [leaf(k, u) for u in v] if isinstance(v, list) else leaf(k, v) for k, v in t.items()}
    a["running_means"] = [u.detach() for u in a["running_means"]]
    a["running_vars"] = [u.detach() for u in a["running_vars"]]
    kw = dict(rates=rates, training=training, momentum=momentum, eps=eps)
    if backend == "reference":
        out = reference.aspp(**a, **kw)
        rms, rvs = a["running_means"], a["running_vars"]
    else:
        args = dict(a)
        if form == "flat":  # one tensor per BatchNorm argument: the running statistics updated in it
            args = {k: torch.cat(v) if k.startswith(("bn_", "running_")) else v for k, v in a.items()}
        out = deeplab_ops.aspp(**args, **kw, backend=backend, memory_efficient=lean)
        rms, rvs = (list(args[k].chunk(len(rates) + 3)) if form == "flat" else args[k]
                    for k in ("running_means", "running_vars"))
    named = [(f"{k}[{i}]", u) for k, v in a.items() for i, u in enumerate(v if isinstance(v, list) else [v])
             if u.requires_grad]
    grads = torch.autograd.grad(out, [u for _, u in named], grad)
    return out, dict(zip([k for k, _ in named], grads, strict=True)), rms, rvs


def _assert_aspp_lean_exact(name, backend, device="cpu"):
    spec = _ASPP_CASES[name]
    t, grad = _aspp_inputs(spec, device)
    lean = _aspp_run(spec, t, grad, backend, True)
    full = _aspp_run(spec, t, grad, backend, False)
    ref = _aspp_run(spec, {k: [u.cpu() for u in v] if isinstance(v, list) else v.cpu() for k, v in t.items()},
                    grad.cpu(), "reference", False)
    pairs = [("output", lean[0], full[0], ref[0])]
    pairs += [(f"grad {k}", lean[1][k], full[1][k], ref[1][k]) for k in ref[1]]
    for j, what in ((2, "running_mean"), (3, "running_var")):
        pairs += [(f"{what}[{i}]", a, b, r) for i, (a, b, r) in enumerate(zip(lean[j], full[j], ref[j], strict=True))]
    for what, a, b, r in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, w=what: f"{backend} lean vs saving {w}: {m}")
        scale = max(r.abs().max().item(), 1.0)
        torch.testing.assert_close(a.cpu(), r, rtol=1e-9, atol=1e-9 * scale,
                                   msg=lambda m, w=what: f"{backend} lean vs float64 reference {w}: {m}")


@pytest.mark.parametrize("name", list(_ASPP_CASES))
def test_aspp_lean_odd_cases_cpu(name):
    _assert_aspp_lean_exact(name, "cpu")


@triton_test
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("name", ["h1-w1-eval-n1", "noncontig-train"])
def test_aspp_lean_odd_cases_triton(name):
    _assert_aspp_lean_exact(name, "triton", TRITON_DEVICE)


@pytest.mark.parametrize("backend,training", [("cpu", True), ("cpu", False),
                                              pytest.param("triton", True, marks=TRITON_MARKS)])
def test_aspp_lean_gradcheck(backend, training):
    """Every input's gradient of the lean ASPP (the recompute included) against finite differences, float64."""
    spec = (2, 2, 2, 3, 4, (1, 2), training, 0.1, 1e-5, "nchw", "normal", "flat", "all")
    t, _ = _aspp_inputs(spec, TRITON_DEVICE if backend == "triton" else "cpu")
    nb = len(spec[5]) + 3
    rm, rv = torch.cat(t["running_means"]), torch.cat(t["running_vars"])
    leaves = [t["x"], *t["conv_weights"], t["pool_weight"], t["project_weight"], torch.cat(t["bn_weights"]),
              torch.cat(t["bn_biases"])]
    leaves = [v.detach().clone().requires_grad_() for v in leaves]

    def f(x, c0, c1, c2, pool, proj, bw, bb):
        # training: no running statistics (gradcheck calls f many times); eval: the same ones each time
        return deeplab_ops.aspp(x, [c0, c1, c2], pool, proj, bw, bb, None if training else rm,
                                None if training else rv, rates=spec[5], training=training, backend=backend,
                                memory_efficient=True)

    assert len(leaves) == 8 and leaves[-1].numel() == nb * 2
    assert torch.autograd.gradcheck(f, tuple(leaves), fast_mode=backend == "triton")


# ---- the fused ASPP's forward runs a training step's convolutions -------------------------------------------------


def test_aspp_graph_forward_never_runs_winograd():
    """An eval-mode FusedASPP (frozen BatchNorm) whose BatchNorm parameters are the only tensors that want a gradient
    built a graph on the cpu backend's Winograd branch convolutions (inference only: float32 3x3 with >= 32
    channels), because the op saw only the detached views of its packed BatchNorm tensors: its forward and gradients
    then differed from the same call with x requiring grad (2e-6 where eager's float32 error is 5e-7). The forward
    of a graph, and the lean backward's recompute, run the training convolutions whatever requires grad."""
    torch.manual_seed(0)
    module = FusedASPP(32, (1, 2), 32, backend="cpu").eval()
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_var.uniform_(0.5, 1.5)
    for m in module.modules():
        for p in m.parameters(recurse=False):
            p.requires_grad_(isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 32, 12, 12)
    got = {}
    for lean in (False, True):
        module.memory_efficient = lean
        for x_grad in (False, True):
            module.zero_grad()
            xi = x.clone().requires_grad_(x_grad)
            out = module(xi)
            out.square().sum().backward()
            got[lean, x_grad] = (out.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad])
    base = got[False, True]
    for key, (out, grads) in got.items():
        torch.testing.assert_close(out, base[0], rtol=0, atol=0, msg=f"output, memory_efficient/x grad {key}")
        for a, b in zip(grads, base[1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"grad, memory_efficient/x grad {key}")


# ---- what stays alive after a forward -----------------------------------------------------------------------------


class _Created(TorchDispatchMode):
    """Weak references to the storage of every tensor the ops of a forward return (the kernels' allocations that
    reach Python: activations, statistics, the op's non-differentiable outputs)."""

    def __init__(self):
        super().__init__()
        self.refs = []  # (an address freed during the forward may be given to a later storage: all are kept)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                s = t.untyped_storage()
                self.refs.append((StorageWeakRef(s), s.data_ptr(), s.nbytes(), tuple(t.shape)))
        return out


def _alive(fn, keep) -> list[tuple[int, tuple]]:
    """(bytes, shape) of each storage a forward created that is still alive, fn's result and `keep` aside: what the
    graph holds for the backward, hidden references included."""
    gc.collect()
    mode = _Created()
    with mode:
        out = fn()
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((out, keep))
            if isinstance(t, torch.Tensor)}
    alive = {ptr: (nb, shape) for ref, ptr, nb, shape in mode.refs if not ref.expired() and ptr not in skip}
    del out
    return list(alive.values())


@pytest.fixture
def _older_objects_frozen():
    """A gc.collect() scans every object of the process (0.1-0.2 s alone, more late in a session; _alive runs two
    per forward): the objects from before the test are frozen (gc.freeze: kept, never scanned), so the collections
    scan the test's own. A frozen object can only keep more alive, never less: what a forward leaks is still found."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("_older_objects_frozen")
def test_alive_after_layer_and_aspp_forward():
    """What a forward leaves alive (not only what autograd was handed): the saving layer keeps y and its two
    statistics, the lean one the statistics only; the saving ASPP its branch outputs, pooling vector and projection
    pre-BN output, the lean one its (B + 2) * C statistics only."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    layer = FusedConvBNReLU(4, 6, 3, padding=1, backend="cpu")
    aspp = FusedASPP(4, (1, 2), 3, backend="cpu")
    for training in (True, False):
        # the ASPP's three conv branches each keep their pre-BN output (the cpu composite)
        for module, big in ((layer, [(2, 6, 9, 9)]), (aspp, [(2, 3, 9, 9)] * 3 + [(2, 3), (2, 3, 9, 9)])):
            module.train(training)
            keep = [x, *module.parameters(), *module.buffers()]
            module.memory_efficient = False
            full = _alive(lambda m=module: m(x), keep)
            module.memory_efficient = True
            lean = _alive(lambda m=module: m(x), keep)
            stats = 6 if module is layer else 5 * 3
            assert sorted(shape for _, shape in lean) == [(stats,), (stats,)], lean
            assert sorted(shape for _, shape in full) == sorted(big + [(stats,), (stats,)]), full
            assert sum(nb for nb, _ in full) - sum(nb for nb, _ in lean) == sum(
                4 * torch.Size(s).numel() for s in big)


def _small_deeplab(memory_efficient: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.deeplabv3_resnet50(num_classes=3, width=8, output_stride=8, aux_loss=True, fused=True,
                                     memory_efficient=memory_efficient)


@pytest.mark.usefixtures("_older_objects_frozen")
def test_alive_after_fused_deeplab_forward():
    """A fused DeepLabV3 training forward keeps alive exactly what autograd was handed, storage for storage, both ways
    (no hidden copy: the ops' non-differentiable outputs y, the branch buffer, ... are freed), and the lean model
    keeps less than 60 % of the saving one's (here 0.43: 649 against 1506 KB)."""
    x = torch.randn(2, 3, 33, 33)
    alive = {}
    for lean in (False, True):
        net = _small_deeplab(lean).train()
        keep = [x, *net.parameters(), *net.buffers()]
        kept = _alive(lambda n=net: n(x), keep)
        handed = {}

        def pack(t, handed=handed):
            handed[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        ignore = {t.untyped_storage().data_ptr() for t in [*keep, *out.values()]}
        saved = [v for k, v in handed.items() if k not in ignore]
        del out
        assert collections.Counter(kept) == collections.Counter(saved), lean
        alive[lean] = sum(nb for nb, _ in kept)
    assert alive[True] < 0.6 * alive[False], alive


# ---- no host synchronization --------------------------------------------------------------------------------------


def _syncs(fn) -> dict[str, int]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for e in prof.events():
        if e.name in SYNC_OPS:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def _conv_step(backend, training, gamma_grad, relu, device="cpu"):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    gamma = (torch.rand(4, device=device) + 0.5).requires_grad_(gamma_grad)
    beta = torch.randn(4, device=device, requires_grad=True)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)

    def step():
        out = deeplab_ops.conv_bn_relu(x, w, gamma, beta, rm, rv, padding=1, training=training, relu=relu,
                                       backend=backend, memory_efficient=True)
        out.backward(torch.ones_like(out))

    return step


def _aspp_step(backend, training, device="cpu"):
    module = FusedASPP(3, (1, 2), 2, backend=backend, memory_efficient=True).to(device).train(training)
    x = torch.randn(2, 3, 5, 4, device=device, requires_grad=True)
    return lambda: module(x).sum().backward()


@pytest.mark.parametrize("what", ["conv-train", "conv-train-norelu", "conv-eval-dgamma", "conv-frozen",
                                  "aspp-train", "aspp-eval"])
def test_lean_steps_never_synchronize_cpu(what):
    step = {"conv-train": lambda: _conv_step("cpu", True, True, True),
            "conv-train-norelu": lambda: _conv_step("cpu", True, True, False),
            "conv-eval-dgamma": lambda: _conv_step("cpu", False, True, True),  # the recompute runs
            "conv-frozen": lambda: _conv_step("cpu", False, False, False),  # nothing recomputed
            "aspp-train": lambda: _aspp_step("cpu", True),
            "aspp-eval": lambda: _aspp_step("cpu", False)}[what]()
    assert _syncs(step) == {}


@triton_test
@pytest.mark.parametrize("what", ["conv-train", "conv-eval-dgamma", "aspp-train"])
def test_lean_steps_never_synchronize_triton(what):
    step = {"conv-train": lambda: _conv_step("triton", True, True, True, TRITON_DEVICE),
            "conv-eval-dgamma": lambda: _conv_step("triton", False, True, True, TRITON_DEVICE),
            "aspp-train": lambda: _aspp_step("triton", True, TRITON_DEVICE)}[what]()
    assert _syncs(step) == {}


def test_lean_deeplab_training_step_never_synchronizes():
    net = _small_deeplab(True).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 33, 33).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 3, (2, 33, 33))

    def step():
        out = net(x, upsample=False)
        loss = (deeplab_ops.upsample_cross_entropy(out["out"], target)
                + 0.5 * deeplab_ops.upsample_cross_entropy(out["aux"], target))
        loss.backward()

    assert _syncs(step) == {}


# ---- a fused DeepLabV3 trained both ways --------------------------------------------------------------------------


@pytest.mark.parametrize("frozen_bn", ["train", "eval", "eval-no-grad"],
                         ids=["train-bn", "frozen-bn", "frozen-bn-params"])
def test_fused_deeplab_trains_bitwise_the_same(frozen_bn):
    """Two SGD steps of a fused channels_last DeepLabV3 (aux head, OS 8, float32, cpu): memory_efficient=True gives
    the saving path's losses, parameters and BatchNorm buffers bit for bit; with BatchNorm in training, frozen
    (eval: y recomputed for gamma's gradient) and frozen with its parameters too (nothing recomputed)."""
    x = torch.randn(2, 3, 33, 33).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 3, (2, 33, 33))
    states, losses = [], []
    for lean in (False, True):
        net = _small_deeplab(lean, seed=1).train().to(memory_format=torch.channels_last)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and frozen_bn != "train":
                m.eval()
                m.requires_grad_(frozen_bn == "eval")
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        run = []
        for _ in range(2):
            opt.zero_grad()
            out = net(x, upsample=False)
            loss = (deeplab_ops.upsample_cross_entropy(out["out"], target)
                    + 0.5 * deeplab_ops.upsample_cross_entropy(out["aux"], target))
            loss.backward()
            opt.step()
            run.append(loss.detach())
        losses.append(run)
        states.append(net.state_dict())
    for a, b in zip(*losses, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=0, atol=0, msg=f"state {k}")


@pytest.mark.parametrize("kind", ["chain", "aspp"])
def test_momentum_none_lean_matches_eager(kind):
    """BatchNorm with momentum=None (the cumulative average) in lean fused modules, three steps with an eval step
    between: eager's outputs, gradients, running statistics and num_batches_tracked."""
    from torchvision.models.segmentation.deeplabv3 import ASPP

    torch.manual_seed(0)
    if kind == "chain":
        eager = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                              nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=None))
    else:
        eager = ASPP(3, (1, 2), 4)
        eager.project[3].p = 0.0
        for m in eager.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    eager = eager.double()
    fused = fuse_modules(copy.deepcopy(eager), backend="cpu", memory_efficient=True)
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    got = []
    for module in (eager, fused):
        outs = []
        for step in range(3):
            module.train(step != 1)
            xi = x.clone().requires_grad_()
            out = module(xi)
            out.square().sum().backward()
            outs.append((out.detach(), xi.grad))
        got.append((outs, [p.grad for p in module.parameters()], module.state_dict()))
    for (a, ga), (b, gb) in zip(got[0][0], got[1][0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(gb, ga, rtol=1e-11, atol=1e-11)
    for a, b in zip(got[0][1], got[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)
    for k, v in got[0][2].items():
        torch.testing.assert_close(got[1][2][k], v, rtol=1e-11, atol=1e-11, msg=f"state {k}")
    assert all(v.item() == 2 for k, v in got[1][2].items() if k.endswith("num_batches_tracked"))


# ---- torch.utils.checkpoint ---------------------------------------------------------------------------------------


def _ckpt_module(kind):
    from model.aspp import ASPP
    from model.resnet import Bottleneck

    if kind == "layers":
        module = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                               nn.Conv2d(5, 4, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        return module, 3
    if kind == "block":
        return Bottleneck(4, 2), 4
    return ASPP(4, (1, 2), 3), 4


@pytest.mark.parametrize("mode", ["early_stop", "no_early_stop", "reentrant"])
@pytest.mark.parametrize("kind", ["layers", "block", "aspp"])
@pytest.mark.parametrize("frozen_bn", [False, True], ids=["train-bn", "frozen-bn"])
def test_checkpointed_lean_modules_match_eager(kind, mode, frozen_bn):
    """torch.utils.checkpoint around memory-efficient fused modules: eager's outputs, gradients and BatchNorm state
    (updated twice per step under checkpointing) over two steps."""
    torch.manual_seed(0)
    eager, cin = _ckpt_module(kind)
    eager = eager.double()
    for m in eager.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(-1, 1)
                m.bias.normal_()
            if frozen_bn:
                m.eval()
    fused = fuse_modules(copy.deepcopy(eager), backend="cpu", memory_efficient=True)
    assert all(c.memory_efficient for c in map(fused_config, fused.modules()) if c is not None)
    x = torch.randn(2, cin, 7, 6, dtype=F64)

    def steps(module):
        xi = x.clone().requires_grad_()
        outs = []
        for _ in range(2):
            module.zero_grad()
            if mode == "reentrant":
                out = checkpoint(module, xi, use_reentrant=True)
            else:
                with set_checkpoint_early_stop(mode == "early_stop"):
                    out = checkpoint(module, xi, use_reentrant=False)
            (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
            outs.append(out.detach())
        return outs, xi.grad, [p.grad for p in module.parameters()], module.state_dict()

    a, b = steps(eager), steps(fused)
    for u, v in zip(a[0], b[0], strict=True):
        torch.testing.assert_close(v, u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b[1], a[1], rtol=1e-10, atol=1e-10)
    for u, v in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(v, u, rtol=1e-10, atol=1e-10)
    for k in a[3]:
        torch.testing.assert_close(b[3][k], a[3][k], rtol=1e-10, atol=1e-10, msg=f"state {k}")


# ---- torch.compile, and switching the flag after a model is built -------------------------------------------------


def _saved_by_compiled_forward():
    """An aot_eager-like torch.compile backend that records, per compiled graph, the shapes of the 4-D tensors its
    forward hands to the backward (AOTAutograd's default partitioner; the forward's own output included)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    graphs = []

    def backend(gm, example_inputs):
        def fw(g, _inputs):
            if not any("deeplab_ops" in str(n.target) for n in g.graph.nodes):
                return g.forward  # (a graph of the module call's hooks, not of the fused ops)
            out = next(n for n in g.graph.nodes if n.op == "output").args[0]
            graphs.append(sorted(tuple(a.meta["val"].shape) for a in out
                                 if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
                                 and a.meta["val"].dim() == 4))
            return g.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw, bw_compiler=lambda g, _i: g.forward,
                                     partition_fn=default_partition)

    return backend, graphs


@pytest.mark.parametrize("kind", ["layer", "aspp"])
def test_compiled_lean_module_matches_eager_and_keeps_no_pre_bn_activation(kind):
    """torch.compile(fullgraph=True) of a lean fused module: eager's results, and the compiled forward hands the
    backward no pre-BN activation (AOTAutograd's default partitioner) while the saving module's hands it y."""
    kept = {}
    for lean in (False, True):
        torch.manual_seed(0)
        module = (FusedConvBNReLU(3, 4, 3, padding=1, backend="cpu", memory_efficient=lean) if kind == "layer"
                  else FusedASPP(3, (1, 2), 4, backend="cpu", memory_efficient=lean)).double().train()
        eager = copy.deepcopy(module)
        torch._dynamo.reset()
        backend, graphs = _saved_by_compiled_forward()
        compiled = torch.compile(module, fullgraph=True, backend=backend)
        x = torch.randn(2, 3, 7, 6, dtype=F64)
        results = []
        for m in (eager, compiled):
            xi = x.clone().requires_grad_()
            out = m(xi)
            out.square().sum().backward()
            results.append([out.detach(), xi.grad, *[p.grad for p in m.parameters()], *m.buffers()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        kept[lean] = graphs[-1]
    activation = (2, 4, 7, 6)
    # out (the graph's output, and the ReLU's mask), x and the weights, in both; the saving path adds y (layer) or
    # the three conv branches' pre-BN outputs, the projection's pre-BN output and its pooling vector's
    # (N, C, 1, 1)-free form (aspp)
    extra = [s for s in kept[False] if s not in kept[True] or kept[False].count(s) > kept[True].count(s)]
    assert (2, 3, 7, 6) in kept[True] and activation in kept[True]
    if kind == "layer":
        assert kept[False].count(activation) == kept[True].count(activation) + 1, kept
    else:
        assert kept[False].count(activation) == kept[True].count(activation) + 4, kept
    assert extra, kept


def _saved_bytes(fn, keep) -> int:
    handed = {}

    def pack(t):
        handed[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    ignore = {t.untyped_storage().data_ptr() for t in [*keep, out]}
    return sum(v for k, v in handed.items() if k not in ignore)


def test_switching_the_flag_after_building():
    """A fused model switches mode between calls (docs/memory_efficient.md): the modules' `memory_efficient`
    attribute, or fuse_modules again; each call keeps what its mode keeps, and results do not change."""
    torch.manual_seed(0)
    net = nn.Sequential(FusedConvBNReLU(3, 4, 3, padding=1, backend="cpu"),
                        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                        FusedASPP(5, (1, 2), 3, backend="cpu"))
    fuse_modules(net, backend="cpu")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    keep = [x, *net.parameters(), *net.buffers()]
    y = 2 * 4 * 36 * 4 + 2 * 5 * 36 * 4  # the two layers' pre-BN activations (float32 bytes)
    aspp = (2 * 9 * 36 + 2 * 3 * 36 + 2 * 3) * 4  # the ASPP's branch buffer, projection output, pooling vector

    def modes(layer, chain, aspp_flag):
        net[0].memory_efficient = layer
        fuse_modules(net, backend="cpu", memory_efficient=chain)  # the chain; the deeplab_ops.nn modules keep theirs
        net[4].memory_efficient = aspp_flag

    results = {}
    for flags in [(False, False, False), (True, True, True), (True, False, False), (False, True, True),
                  (False, False, False)]:
        modes(*flags)
        results[flags] = _saved_bytes(lambda: net(x), keep)
    full = results[False, False, False]
    assert full - results[True, True, True] == y + aspp
    assert full - results[True, False, False] == 2 * 4 * 36 * 4
    assert full - results[False, True, True] == 2 * 5 * 36 * 4 + aspp


def test_compiled_model_follows_a_switch():
    """torch.compile guards on the flag: a compiled fused model switched with fuse_modules or the attribute
    recompiles, and its compiled forward keeps what the new mode keeps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    fuse_modules(net, backend="cpu", memory_efficient=False)
    torch._dynamo.reset()
    backend, graphs = _saved_by_compiled_forward()
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    kept = {}
    for lean in (False, True, False):
        fuse_modules(net, backend="cpu", memory_efficient=lean)
        compiled(x).sum().backward()
        kept.setdefault(lean, graphs[-1])
    activation = (2, 6, 8, 8)
    # saving: both layers' y more than lean
    assert kept[False].count(activation) == kept[True].count(activation) + 2, kept


# ---- synchronized BatchNorm ---------------------------------------------------------------------------------------


def _collectives(prof) -> int:
    return sum(1 for e in prof.events() if "all_gather" in e.name or "all_reduce" in e.name)


def _sync_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(7)
        x = torch.randn(4, 3, 6, 5, generator=g, dtype=F64)
        w = torch.randn(4, 3, 3, 3, generator=g, dtype=F64)
        gamma, beta = torch.rand(4, generator=g, dtype=F64) + 0.5, torch.randn(4, generator=g, dtype=F64)
        grad = torch.randn(4, 4, 6, 5, generator=g, dtype=F64)
        mine = slice(0, 3) if rank == 0 else slice(3, 4)  # one image on rank 1
        results = {}
        for lean in (False, True):
            torch.manual_seed(3)
            aspp = FusedASPP(3, (1, 2), 4, backend="cpu", memory_efficient=lean).double()
            deeplab_ops.nn.sync_batchnorm(aspp)
            leaves = [t.clone().requires_grad_() for t in (x[mine], w, gamma, beta)]
            rm, rv = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
            out = deeplab_ops.conv_bn_relu(*leaves, rm, rv, padding=1, backend="cpu", process_group=dist.group.WORLD,
                                           memory_efficient=lean)
            with profile(activities=[ProfilerActivity.CPU]) as conv_bwd:
                out.backward(grad[mine])
            with profile(activities=[ProfilerActivity.CPU]) as aspp_fwd:
                a_out = aspp(leaves[0].detach().requires_grad_())
            with profile(activities=[ProfilerActivity.CPU]) as aspp_bwd:
                a_out.backward(grad[mine])
            results[lean] = ([out.detach().numpy(), a_out.detach().numpy(), rm.numpy(), rv.numpy()]
                             + [t.grad.numpy() for t in leaves] + [p.grad.numpy() for p in aspp.parameters()]
                             + [b.numpy() for b in aspp.buffers()],
                             _collectives(conv_bwd), _collectives(aspp_fwd), _collectives(aspp_bwd))
        queue.put((rank, results))
    except Exception as exc:
        queue.put((rank, f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        dist.destroy_process_group()


def test_synchronized_lean_matches_saving_bitwise():
    """Two gloo processes (3 images and 1): the lean conv_bn_relu and FusedASPP give the saving path's outputs,
    gradients and running statistics bit for bit. conv_bn_relu's recompute is local (its backward runs the saving
    path's collectives); the fused ASPP's recompute runs the forward's statistics collectives once more
    (docs/memory_efficient.md)."""
    results = run_two_processes(_sync_worker)
    for rank in (0, 1):
        (full, conv_full, fwd_full, bwd_full), (lean, conv_lean, fwd_lean, bwd_lean) = (results[rank][0][False],
                                                                                      results[rank][0][True])
        for i, (a, b) in enumerate(zip(full, lean, strict=True)):
            assert (a == b).all(), f"rank {rank}: result {i} differs"
        assert conv_lean == conv_full > 0
        assert fwd_lean == fwd_full > 0
        assert bwd_lean == bwd_full + fwd_full

"""aspp(memory_efficient=True): the same forward, gradients and running statistics as the path that saves the
pre-BN buffers, on every backend (training and eval BN); what autograd saves; FusedASPP and a fused torchvision
ASPP."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    TRITON_DEVICE,
    assert_close,
    assert_same_training_step,
    backend_param,
    cuda_test,
    device_for,
    triton_test,
)
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

import deeplab_ops
from deeplab_ops import reference
from deeplab_ops.fusion import fused_config
from deeplab_ops.nn import FusedASPP


def _inputs(n=2, cin=4, c=3, h=6, w=5, rates=(1, 3), dtype=torch.float32, device="cpu", channels_last=False):
    g = dict(dtype=dtype, device=device)
    x = torch.randn(n, cin, h, w, **g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    nb = len(rates) + 3
    return dict(
        x=x, conv_weights=[torch.randn(c, cin, 1, 1, **g)] + [torch.randn(c, cin, 3, 3, **g) / 3 for _ in rates],
        pool_weight=torch.randn(c, cin, 1, 1, **g), project_weight=torch.randn(c, (len(rates) + 2) * c, 1, 1, **g) / 3,
        bn_weights=[torch.rand(c, **g) + 0.5 for _ in range(nb)], bn_biases=[torch.randn(c, **g) for _ in range(nb)],
        running_means=[torch.randn(c, **g) * 0.1 for _ in range(nb)],
        running_vars=[torch.rand(c, **g) + 0.5 for _ in range(nb)], rates=rates,
    )


_GRAD_KEYS = ("x", "conv_weights", "pool_weight", "project_weight", "bn_weights", "bn_biases")


def _run(t, backend, lean, training, grad_out=None, dtype=None):
    """(out, {name: grad}, running_means, running_vars, grad_out) of one call on copies of `t`."""
    def copy_(v, leaf):
        v = v.detach().clone(memory_format=torch.preserve_format)
        v = v.to(dtype) if dtype is not None else v
        return v.requires_grad_() if leaf else v

    a = {k: [copy_(v, k in _GRAD_KEYS) for v in t[k]] if isinstance(t[k], list) else
         (copy_(t[k], k in _GRAD_KEYS) if isinstance(t[k], torch.Tensor) else t[k]) for k in t}
    kw = dict(rates=a.pop("rates"), training=training)
    if backend == "reference" and dtype is not None:
        out = reference.aspp(**a, **kw)
    else:
        out = deeplab_ops.aspp(**a, **kw, backend=backend, memory_efficient=lean)
    named = [(k, v) for k in _GRAD_KEYS for v in (a[k] if isinstance(a[k], list) else [a[k]])]
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [v for _, v in named], grad_out.to(out.dtype))
    names = [f"{k}[{i}]" if isinstance(a[k], list) else k for k in _GRAD_KEYS
             for i in range(len(a[k]) if isinstance(a[k], list) else 1)]
    return out, dict(zip(names, grads, strict=True)), a["running_means"], a["running_vars"], grad_out


def _compare(backend, training, exact=True, **shape):
    """Lean against saving (bitwise where `exact`: the backward recomputes the very buffers the forward made) and
    against the float64 reference."""
    t = _inputs(**shape)
    lean = _run(t, backend, True, training)
    full = _run(t, backend, False, training, lean[4])
    ref = _run(t, "reference", False, training, lean[4], dtype=torch.float64)
    atol, rtol = (0.0, 0.0) if exact else (1e-5, 1e-5)
    mf = torch.channels_last if shape.get("channels_last") else torch.contiguous_format
    assert lean[0].is_contiguous(memory_format=mf)
    # grad_x in the same layout either way (the lean triton backward converts an NCHW x once for its recompute and
    # weight gradient, and its gradient back)
    assert lean[1]["x"].stride() == full[1]["x"].stride(), (lean[1]["x"].stride(), full[1]["x"].stride())
    pairs = [("output", lean[0], full[0], ref[0])]
    for j, name in ((2, "running_means"), (3, "running_vars")):
        pairs += [(f"{name}[{i}]", *abr) for i, abr in enumerate(zip(lean[j], full[j], ref[j], strict=True))]
    pairs += [(f"grad {k}", lean[1][k], full[1][k], ref[1][k]) for k in lean[1]]
    for what, a, b, r in pairs:
        assert_close(a, b, f"{backend} {'train' if training else 'eval'}: lean vs saving {what}", atol, rtol)
        assert_close(a, r, f"{backend} {'train' if training else 'eval'}: lean vs float64 reference {what}", 1e-4,
                     1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_cpu_matches_saving_path(training, channels_last):
    _compare("cpu", training, channels_last=channels_last)


def test_cpu_without_rates():
    # rates=(): the 1x1 branch and the pooling branch only (torchvision allows it).
    _compare("cpu", True, rates=())


@triton_test
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_triton_matches_saving_path(training, channels_last):
    # Tiny shapes (C_in <= 8, C <= 4, batch 2, <= 9x9): the interpreter where no GPU is visible.
    _compare("triton", training, cin=3, c=2, h=5, w=5, rates=(1, 2), channels_last=channels_last,
             device=TRITON_DEVICE)


def test_reference_ignores_flag():
    t = _inputs()
    lean = _run(t, "reference", True, True)
    full = _run(t, "reference", False, True, lean[4])
    torch.testing.assert_close(lean[0], full[0], rtol=0, atol=0)
    for k in lean[1]:
        torch.testing.assert_close(lean[1][k], full[1][k], rtol=0, atol=0, msg=f"grad {k}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("wanted", [("x",), ("conv_weights", "bn_biases"), ("project_weight",)], ids=str)
def test_some_inputs_need_grad(training, wanted):
    # The backward's output mask follows needs_input_grad (a list per conv weight): the lean path gives what the
    # saving path gives for the inputs that want a gradient, and no gradient for the others.
    t = _inputs(n=2, cin=3, c=2, h=5, w=4, rates=(2,), dtype=torch.float64)
    got = []
    for lean in (False, True):
        a = {k: [v.clone() for v in t[k]] if isinstance(t[k], list) else t[k] for k in t}
        a = {k: ([v.requires_grad_() for v in a[k]] if isinstance(a[k], list) else a[k].clone().requires_grad_())
             if k in wanted else a[k] for k in a}
        out = deeplab_ops.aspp(**a, training=training, backend="cpu", memory_efficient=lean)
        leaves = [v for k in wanted for v in (a[k] if isinstance(a[k], list) else [a[k]])]
        got.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for u, v in zip(*got, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@cuda_test
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_matches_saving_path(backend, training):
    # cuDNN may pick another algorithm for the recompute: equal to rounding, not bitwise.
    _compare(backend, training, exact=False, n=4, cin=16, c=8, h=17, w=19, rates=(2, 5, 7), device="cuda",
             channels_last=True)


# ---- what autograd saves ------------------------------------------------------------------------------------------


def _saved(fn, exclude) -> dict[int, tuple[int, tuple[int, ...]]]:
    """{storage: (bytes, shape)} of what autograd saves while running fn(), other than `exclude`'s storages and
    fn()'s output."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {t.untyped_storage().data_ptr() for t in [*exclude, out]}
    return {k: v for k, v in seen.items() if k not in skip}


def _bytes(saved) -> int:
    return sum(b for b, _ in saved.values())


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_saved_bytes(backend, training):
    """Beyond the op's inputs and output, the saving path keeps the branch outputs (N * B * C * H * W values), the
    projection's pre-BN output (N, C, H, W), the pooling vector (N, C) and (B + 2) * C-vectors (statistics, BN
    parameters); the lean one keeps only the vectors (and in eval the running statistics it normalized with)."""
    n, cin, c, h, w, rates = 2, 3, 2, 5, 6, (1, 2)
    t = _inputs(n=n, cin=cin, c=c, h=h, w=w, rates=rates, device=device_for(backend))
    leaves = [t["x"], *t["conv_weights"], t["pool_weight"], t["project_weight"], *t["bn_weights"], *t["bn_biases"]]
    for v in leaves:
        v.requires_grad_()
    b = len(rates) + 1
    k = (b + 2) * c

    def call(lean):
        running = {key: [v.clone() for v in t[key]] for key in ("running_means", "running_vars")}
        return lambda: deeplab_ops.aspp(**{**t, **running}, training=training, backend=backend,
                                        memory_efficient=lean)

    full = _saved(call(False), leaves)
    lean = _saved(call(True), leaves)
    # Both: the concatenated BN weights and biases, mean, invstd (k values each); lean in eval: running mean, var.
    small = [(k,)] * (4 if training else 6)
    # the branch outputs: one tensor per branch (the cpu composite), one buffer (triton)
    branches = [(n, c, h, w)] * b if backend == "cpu" else [(n, b * c, h, w)]
    big = [(n, c), (n, c, h, w), *branches]
    assert sorted(shape for _, shape in full.values()) == sorted([(k,)] * 4 + big), full
    assert sorted(shape for _, shape in lean.values()) == small, lean
    assert _bytes(lean) == len(small) * k * 4
    big_bytes = sum(nbytes for nbytes, shape in full.values() if shape in big)
    assert big_bytes == (n * b * c * h * w + n * c * h * w + n * c) * 4
    assert _bytes(full) - _bytes(lean) == big_bytes - (0 if training else 2 * k * 4)


# ---- modules and fused models -------------------------------------------------------------------------------------


def _perturb_bns(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("frozen_bn", [False, True], ids=["train-bn", "frozen-bn"])
def test_fused_torchvision_aspp_matches_unfused(frozen_bn):
    model = TorchvisionASPP(5, (1, 3), out_channels=4)
    _perturb_bns(model)
    model.train()
    model.project[3].eval()  # the dropout: deterministic, so the two models can be compared
    if frozen_bn:
        model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
    fused = deeplab_ops.nn.fuse_modules(copy.deepcopy(model), backend="cpu", memory_efficient=True)
    assert fused_config(fused) is not None and fused_config(fused).memory_efficient
    x = torch.randn(2, 5, 7, 7)
    target = torch.randn(2, 4, 7, 7)
    assert_same_training_step(model, fused, x, target)


def test_fused_aspp_keeps_no_branch_buffer():
    # fuse_modules(memory_efficient=True) on a model with an ASPP: its (N, B*C, H, W) branch buffer, projection
    # output and pooling vector are no longer kept (2x(3*4)x6x6 + 2x4x6x6 + 2x4 floats).
    model = nn.Sequential(nn.Conv2d(3, 5, 1), TorchvisionASPP(5, (1, 2), out_channels=4)).train()
    model[1].project[3].eval()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    kept = []
    for lean in (False, True):
        deeplab_ops.nn.fuse_modules(model, backend="cpu", memory_efficient=lean)
        assert fused_config(model[1]).memory_efficient is lean
        kept.append(_bytes(_saved(lambda: model(x), [x, *model.parameters(), *model.buffers()])))
    assert kept[0] - kept[1] == (2 * 12 * 6 * 6 + 2 * 4 * 6 * 6 + 2 * 4) * 4, kept


def test_fused_aspp_module_flag():
    mod = FusedASPP(4, (1, 2), out_channels=3, backend="cpu", memory_efficient=True)
    _perturb_bns(mod)
    assert "memory_efficient=True" in repr(mod)
    plain = copy.deepcopy(mod)
    plain.memory_efficient = False
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    a, b = mod(x), plain(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ga = torch.autograd.grad(a.sum(), [x, *mod.parameters()])
    gb = torch.autograd.grad(b.sum(), [x, *plain.parameters()])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    for u, v in zip(mod.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_flag_must_be_bool():
    t = _inputs()
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        deeplab_ops.aspp(**t, backend="cpu", memory_efficient=1)
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        FusedASPP(4, (1, 2), out_channels=3, memory_efficient="yes")

"""The fake (meta) kernels of every deeplab_ops op predict the strides the real kernels return, whatever the inputs'
layout: NCHW, channels_last, transposed (H and W swapped in memory), channel-major (N innermost), expanded (a zero
stride), a channel slice, and the shapes where layouts coincide (C = 1, H = W = 1, 1x1 weights). opcheck's fake
tensor test compares every output (strides of dimensions longer than 1, as torch.compile's own checks do); a wrong
fake fails torch.compile's backward on a transposed input (inductor asserts the strides it planned for)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import TRITON_DEVICE, triton_param

import deeplab_ops

ops = torch.ops.deeplab_ops


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of the 4-D tensor t (or, for "expand", of its first image or column) in `layout`."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "channel_major":
        return t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    if layout == "expand":
        return t[:1].expand(t.shape) if t.shape[0] > 1 else t[..., :1].expand(t.shape)
    if layout == "slice":
        return torch.cat([t, t], 1)[:, :t.shape[1]]
    raise ValueError(layout)


X_LAYOUTS = ("nchw", "channels_last", "transposed", "channel_major", "expand", "slice")
W_LAYOUTS = ("nchw", "channels_last", "transposed", "channel_major", "expand")
G_LAYOUTS = ("nchw", "channels_last", "transposed", "expand")
# x's and weight's layouts: each of one with the other NCHW, and both alike
PAIRS = sorted({*((x, "nchw") for x in X_LAYOUTS), *(("nchw", w) for w in W_LAYOUTS),
                *((w, w) for w in W_LAYOUTS)})
PAIR_IDS = [f"x={x}-w={w}" for x, w in PAIRS]
# (N, C_in, H, W, C_out): a general shape, one channel in and out, 1x1 maps
SHAPES = [(2, 3, 5, 6, 4), (2, 1, 5, 6, 1), (4, 3, 1, 1, 4)]


def opcheck_fake(op, args) -> None:
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def _cbr(prefix, shape, xl, wl, k, training, device="cpu"):
    n, cin, h, w, cout = shape
    x = laid_out(torch.randn(n, cin, h, w, device=device), xl)
    weight = laid_out(torch.randn(cout, cin, k, k, device=device), wl)
    bn = [torch.rand(cout, device=device) + 0.5, torch.randn(cout, device=device), torch.zeros(cout, device=device),
          torch.ones(cout, device=device)]
    geometry = ([1, 1], [k // 2] * 2, [1, 1])
    fwd_args = (x, weight, *bn, *geometry, training, 0.1, 1e-5, None, True)
    fwd = getattr(ops, f"{prefix}conv_bn_relu_forward").default
    opcheck_fake(fwd, fwd_args)
    out, conv_out, mean, invstd, _, _ = fwd(*fwd_args)
    bwd = getattr(ops, f"{prefix}conv_bn_relu_backward").default
    for gl, relu in zip(G_LAYOUTS, (True, False, True, False), strict=True):
        grad = laid_out(torch.randn(out.shape, device=device), gl)
        opcheck_fake(bwd, (grad, x, weight, bn[0], conv_out, out, mean, invstd, *geometry, training, relu,
                           [True] * 5))
    bias_act = getattr(ops, f"{prefix}conv_bias_act").default
    residual = laid_out(torch.randn(out.shape, device=device), xl if xl != "expand" else "transposed")
    opcheck_fake(bias_act, (x, weight, bn[1], residual, *geometry, True))
    opcheck_fake(bias_act, (x, weight, None, None, *geometry, False))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("xl", "wl"), PAIRS, ids=PAIR_IDS)
def test_conv_bn_relu_fakes_give_the_kernels_strides(xl, wl, shape, training):
    torch.manual_seed(0)
    for k in (3, 1):
        _cbr("", shape, xl, wl, k, training)


# The triton twins share the fakes; the interpreter is slow: the layouts NCHW-or-channels_last rules get wrong.
TRITON_LAYOUTS = [triton_param(w, w, id=f"x=w={w}") for w in ("transposed", "expand")]


@pytest.mark.parametrize(("xl", "wl"), TRITON_LAYOUTS)
def test_triton_conv_bn_relu_fakes_give_the_kernels_strides(xl, wl):
    torch.manual_seed(0)
    for shape, k in itertools.product(SHAPES, (3, 1)):
        _cbr("triton_", shape, xl, wl, k, True, TRITON_DEVICE)


def _aspp(prefix, shape, xl, wl, training, device="cpu"):
    n, cin, h, w, c = shape
    rates = [1, 2]
    x = laid_out(torch.randn(n, cin, h, w, device=device), xl)
    weights = [laid_out(torch.randn(c, cin, k, k, device=device), wl) for k in (1, 3, 3)]
    pool = laid_out(torch.randn(c, cin, 1, 1, device=device), wl)
    project = laid_out(torch.randn(c, (len(rates) + 2) * c, 1, 1, device=device), wl)
    k = (len(rates) + 3) * c
    bn = [torch.rand(k, device=device) + 0.5, torch.randn(k, device=device)]
    fwd_args = (x, weights, pool, project, *bn, torch.zeros(k, device=device), torch.ones(k, device=device), rates,
                training, 0.1, 1e-5)
    fwd = getattr(ops, f"{prefix}aspp_forward").default
    opcheck_fake(fwd, fwd_args)
    out, branch, pool_out, project_out, mean, invstd, _, _ = fwd(*fwd_args)
    bwd = getattr(ops, f"{prefix}aspp_backward").default
    for gl in G_LAYOUTS:
        grad = laid_out(torch.randn(out.shape, device=device), gl)
        opcheck_fake(bwd, (grad, x, weights, pool, project, *bn, branch, pool_out, project_out, out, mean, invstd,
                           rates, training, [True, True, True]))


ASPP_SHAPES = [(2, 3, 5, 6, 4), (2, 1, 5, 6, 1), (4, 3, 1, 1, 4)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("xl", "wl"), PAIRS, ids=PAIR_IDS)
def test_aspp_fakes_give_the_kernels_strides(xl, wl, training):
    torch.manual_seed(0)
    for shape in ASPP_SHAPES:
        _aspp("", shape, xl, wl, training)


@pytest.mark.parametrize(("xl", "wl"), TRITON_LAYOUTS)
def test_triton_aspp_fakes_give_the_kernels_strides(xl, wl):
    torch.manual_seed(0)
    for shape in ASPP_SHAPES[::2]:
        _aspp("triton_", shape, xl, wl, True, TRITON_DEVICE)


@pytest.mark.parametrize("prefix", ["", triton_param("triton_")])
@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_upsample_cross_entropy_fakes_give_the_kernels_strides(layout, prefix):
    torch.manual_seed(0)
    device = TRITON_DEVICE if prefix else "cpu"
    logits = laid_out(torch.randn(2, 3, 4, 5, device=device), layout)
    target = torch.randint(0, 3, (2, 11, 9), device=device).transpose(1, 2)
    fwd = getattr(ops, f"{prefix}upsample_cross_entropy_forward").default
    bwd = getattr(ops, f"{prefix}upsample_cross_entropy_backward").default
    for reduction in ("none", "mean", "sum"):
        opcheck_fake(fwd, (logits, target, 255, False, reduction))
        loss, lse, count = fwd(logits, target, 255, False, reduction)
        grad = torch.ones((), device=device).expand(loss.shape)  # what .sum().backward() hands down
        opcheck_fake(bwd, (grad, logits, target, lse.transpose(1, 2).contiguous().transpose(1, 2), count, 255, True,
                           reduction))


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_batchnorm_stage_fakes_give_the_kernels_strides(layout):
    torch.manual_seed(0)
    for n, c, h, w, _ in SHAPES:
        y = laid_out(torch.randn(n, c, h, w), layout)
        mean, _ = ops.bn_stats(y)
        invstd = torch.rand(c) + 0.5
        opcheck_fake(ops.bn_stats.default, (y,))
        for rl in (None, "nchw", "channels_last", "transposed"):
            residual = None if rl is None else laid_out(torch.randn(n, c, h, w), rl)
            opcheck_fake(ops.bn_apply.default, (y, mean, invstd, torch.randn(c), None, residual, True))
        z = ops.bn_apply(y, mean, invstd, torch.randn(c), None, None, True)
        for gl in G_LAYOUTS:
            dz = laid_out(torch.randn(n, c, h, w), gl)
            opcheck_fake(ops.bn_backward_reduce.default, (dz, z, y, mean, invstd, True))
            sums = ops.bn_backward_reduce(dz, z, y, mean, invstd, True)
            opcheck_fake(ops.bn_backward_dy.default, (dz, z, y, mean, invstd, torch.rand(c), *sums, 24.0, True, True))


def test_compiled_backward_of_a_transposed_input_and_weight():
    """Inductor plans the backward's buffers from the fake kernel's strides and asserts them on the real ones. (Its
    caches do not key on the fake kernels: compiled afresh.)"""
    torch.manual_seed(0)
    torch._dynamo.reset()

    def f(a, w, g, b):
        out = deeplab_ops.conv_bn_relu(a.transpose(2, 3), w.transpose(2, 3), g, b, None, None, padding=1,
                                       backend="cpu")
        return (out * torch.arange(out.numel()).view_as(out)).sum()

    inputs = (torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3), torch.rand(4) + 0.5, torch.randn(4))
    grads = []
    with (torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        for fn in (f, torch.compile(f, backend="inductor")):
            leaves = [t.clone().requires_grad_() for t in inputs]
            fn(*leaves).backward()
            grads.append([t.grad for t in leaves])
    for name, eager, compiled in zip(("x", "weight", "bn_weight", "bn_bias"), *grads, strict=True):
        torch.testing.assert_close(compiled, eager, msg=name)

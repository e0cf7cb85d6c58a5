"""The triton backend's intermediates that only a backward reads (conv_out of conv_bn_relu, branch_out and
project_out of aspp, the plain convolution of triton_conv_bias_act that recomputes conv_out) are channels_last
whatever x's memory format; grad_residual comes in x's memory format; the ASPP backward writes the projection weight
gradient in place; the memory-efficient ASPP backward converts an NCHW x once and gives grad_x back in x's format.

Checked here: the real outputs' layouts against the fake kernels' (FakeTensorMode) for NCHW, channels_last and
non-dense inputs, and the gradients (values against deeplab_ops.reference in float64, and strides) through the public
functions and the nn modules. Tiny shapes: the interpreter where no GPU is visible."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import deeplab_ops
from tests.helpers import TRITON_DEVICE, triton_test

ops = torch.ops.deeplab_ops
CL = torch.channels_last
F64 = torch.float64
DEV = TRITON_DEVICE


def _x(kind: str, n: int, c: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """x in a layout: NCHW, channels_last, or a non-dense slice of either."""
    if kind == "nchw":
        return torch.randn(n, c, h, w, dtype=dtype, device=DEV)
    if kind == "cl":
        return torch.randn(n, c, h, w, dtype=dtype, device=DEV).contiguous(memory_format=CL)
    if kind == "nchw_slice":
        return torch.randn(n, c, h, w + 2, dtype=dtype, device=DEV)[..., 1:w + 1]
    if kind == "cl_slice":
        return torch.randn(n, c, h, w + 2, dtype=dtype, device=DEV).contiguous(memory_format=CL)[..., 1:w + 1]
    raise AssertionError(kind)


def _format(kind: str) -> torch.memory_format:
    return CL if kind.startswith("cl") else torch.contiguous_format


def _significant(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of the dimensions of size > 1 (what a layout is; a size-1 dimension's stride is free)."""
    return tuple(s for s, n in zip(t.stride(), t.shape, strict=True) if n > 1)


def _fake_outputs(op, args):
    mode = FakeTensorMode()

    def fake(a):
        if isinstance(a, torch.Tensor):
            return mode.from_tensor(a)
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [mode.from_tensor(t) for t in a]
        return a

    with mode:
        return op(*[fake(a) for a in args])


def _assert_like_fake(real, fake, what: str) -> None:
    real = real if isinstance(real, (tuple, list)) else (real,)
    fake = fake if isinstance(fake, (tuple, list)) else (fake,)
    assert len(real) == len(fake), what
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        if isinstance(r, (tuple, list)):
            _assert_like_fake(r, f, f"{what}[{i}]")
            continue
        assert (r is None) == (f is None), (what, i)
        if r is None:
            continue
        assert (r.shape, r.dtype) == (f.shape, f.dtype), (what, i, r.shape, f.shape, r.dtype, f.dtype)
        assert _significant(r) == _significant(f), (what, i, r.stride(), f.stride())


# ---- direct calls: real layouts as the fake kernels say --------------------------------------------------------


@triton_test
@pytest.mark.parametrize("kind", ["nchw", "cl", "nchw_slice", "cl_slice"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu_direct_layouts_match_fakes(kind, training):
    torch.manual_seed(0)
    x = _x(kind, 2, 3, 5, 4)
    w = torch.randn(4, 3, 3, 3, device=DEV)
    g, b = torch.rand(4, device=DEV) + 0.5, torch.randn(4, device=DEV)
    residual = torch.randn(2, 4, 5, 4, device=DEV)
    geo = ([1, 1], [1, 1], [1, 1])
    args = [x, w, g, b, torch.zeros(4, device=DEV), torch.ones(4, device=DEV), *geo, training, 0.1, 1e-5, residual,
            True]
    fwd = ops.triton_conv_bn_relu_forward.default
    out, conv_out, mean, invstd, *_ = real = fwd(*args)
    _assert_like_fake(real, _fake_outputs(fwd, args), "forward")
    assert out.is_contiguous(memory_format=_format(kind))
    assert conv_out.is_contiguous(memory_format=CL)  # whatever x's format
    bwd = ops.triton_conv_bn_relu_backward.default
    bargs = [torch.randn_like(out), x, w, g, conv_out, out, mean, invstd, *geo, training, True, [True] * 5]
    grads = bwd(*bargs)
    _assert_like_fake(grads, _fake_outputs(bwd, bargs), "backward")
    assert grads[0].is_contiguous(memory_format=_format(kind))  # grad_x
    assert grads[4].is_contiguous(memory_format=_format(kind))  # grad_residual: x's format, not conv_out's
    # The plain convolution (the memory-efficient recompute) is the forward's conv_out, channels_last, bit for bit;
    # with a bias it is an output in x's format.
    cba = ops.triton_conv_bias_act.default
    plain = [x, w, None, None, *geo, False]
    y = cba(*plain)
    _assert_like_fake(y, _fake_outputs(cba, plain), "conv_bias_act plain")
    assert y.is_contiguous(memory_format=CL)
    if training:
        assert torch.equal(y, conv_out)
    biased = [x, w, b, None, *geo, False]
    yb = cba(*biased)
    _assert_like_fake(yb, _fake_outputs(cba, biased), "conv_bias_act biased")
    assert yb.is_contiguous(memory_format=_format(kind))


@triton_test
@pytest.mark.parametrize("kind", ["nchw", "cl", "nchw_slice"])
def test_aspp_direct_layouts_match_fakes(kind):
    torch.manual_seed(0)
    n, cin, h, w, c, rates = 2, 3, 4, 3, 2, [2]
    x = _x(kind, n, cin, h, w)
    cws = [torch.randn(c, cin, 1, 1, device=DEV), torch.randn(c, cin, 3, 3, device=DEV)]
    pw, prw = torch.randn(c, cin, 1, 1, device=DEV), torch.randn(c, 3 * c, 1, 1, device=DEV)
    k = 4 * c
    bw, bb = torch.rand(k, device=DEV) + 0.5, torch.randn(k, device=DEV)
    args = [x, cws, pw, prw, bw, bb, torch.zeros(k, device=DEV), torch.ones(k, device=DEV), rates, True, 0.1, 1e-5]
    fwd = ops.triton_aspp_forward.default
    real = fwd(*args)
    _assert_like_fake(real, _fake_outputs(fwd, args), "aspp forward")
    out, branch, pool, proj, mean, invstd = real[:6]
    assert out.is_contiguous(memory_format=_format(kind))
    assert branch[0].is_contiguous(memory_format=CL) and proj.is_contiguous(memory_format=CL)
    bwd = ops.triton_aspp_backward.default
    bargs = [torch.randn_like(out), x, cws, pw, prw, bw, bb, branch, pool, proj, out, mean, invstd, rates, True,
             [True] * 3]
    grads = bwd(*bargs)
    _assert_like_fake(grads, _fake_outputs(bwd, bargs), "aspp backward")
    assert grads[0].is_contiguous(memory_format=_format(kind))


# ---- gradients through the public functions: values (float64, against the reference) and strides -----------


def _cbr_grads(backend, x, w, g, b, rm, rv, residual, training, memory_efficient):
    leaves = [x.detach().clone().requires_grad_()] + [t.detach().clone().requires_grad_() for t in (w, g, b)]
    res = residual.detach().clone().requires_grad_()
    kw = {"memory_efficient": memory_efficient} if backend == "triton" else {}
    out = deeplab_ops.conv_bn_relu(*leaves, rm.clone(), rv.clone(), padding=1, training=training, residual=res,
                                   backend=backend, **kw)
    go = torch.arange(out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape).sin()
    return out, torch.autograd.grad(out, [*leaves, res], go)  # as computed (no accumulation's layout contract)


@triton_test
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saving", "lean"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["nchw", "cl"])
def test_conv_bn_relu_gradients(kind, training, memory_efficient):
    torch.manual_seed(1)
    x = _x(kind, 2, 3, 4, 3, F64)
    w = torch.randn(2, 3, 3, 3, dtype=F64, device=DEV)
    g, b = torch.rand(2, dtype=F64, device=DEV) + 0.5, torch.randn(2, dtype=F64, device=DEV)
    rm, rv = torch.randn(2, dtype=F64, device=DEV), torch.rand(2, dtype=F64, device=DEV) + 0.5
    residual = torch.randn(2, 2, 4, 3, dtype=F64, device=DEV)  # NCHW whatever x's format
    out, grads = _cbr_grads("triton", x, w, g, b, rm, rv, residual, training, memory_efficient)
    ref_out, ref_grads = _cbr_grads("reference", x, w, g, b, rm, rv, residual, training, False)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    for name, got, want in zip(("x", "weight", "bn_weight", "bn_bias", "residual"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-8, msg=lambda m, n=name: f"grad {n}: {m}")
    fmt = _format(kind)
    assert out.is_contiguous(memory_format=fmt)
    assert grads[0].is_contiguous(memory_format=fmt), grads[0].stride()  # grad_x in x's format
    assert grads[4].is_contiguous(memory_format=fmt), grads[4].stride()  # grad_residual in x's format
    if ref_out.is_contiguous(memory_format=fmt):
        # as eager's where eager's chain follows x's format: on CUDA float64 convolution has no channels_last kernel,
        # eager's output is NCHW there and so is its grad_residual (an H200); ours follows x on every device
        assert _significant(grads[4]) == _significant(ref_grads[4])


def _aspp_grads(backend, x, cws, pw, prw, bw, bb, rm, rv, rates, training, memory_efficient):
    xl = x.detach().clone().requires_grad_()
    cl = [t.detach().clone().requires_grad_() for t in cws]
    pl = [t.detach().clone().requires_grad_() for t in (pw, prw, bw, bb)]
    kw = {"memory_efficient": memory_efficient} if backend == "triton" else {}
    out = deeplab_ops.aspp(xl, cl, *pl, rm.clone(), rv.clone(), rates=rates, training=training, backend=backend,
                           **kw)
    go = torch.arange(out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape).sin()
    return out, torch.autograd.grad(out, [xl, *cl, *pl], go), pl[1]


@triton_test
@pytest.mark.parametrize("kind,proj_format,training,memory_efficient", [
    ("nchw", "nchw", True, True), ("nchw", "nchw", False, False), ("cl", "cl", True, False),
    ("cl", "cl", False, True), ("nchw_slice", "cl", True, True)])
def test_aspp_gradients(kind, proj_format, training, memory_efficient):
    torch.manual_seed(2)
    n, cin, h, w, c, rates = 2, 3, 4, 3, 2, (1, 2)
    x = _x(kind, n, cin, h, w, F64)
    cws = [torch.randn(c, cin, 1, 1, dtype=F64, device=DEV)] + [
        torch.randn(c, cin, 3, 3, dtype=F64, device=DEV) for _ in rates]
    pw = torch.randn(c, cin, 1, 1, dtype=F64, device=DEV)
    prw = torch.randn(c, (len(rates) + 2) * c, 1, 1, dtype=F64, device=DEV)
    if proj_format == "cl":
        prw = prw.contiguous(memory_format=CL)
    k = (len(rates) + 3) * c
    bw, bb = torch.rand(k, dtype=F64, device=DEV) + 0.5, torch.randn(k, dtype=F64, device=DEV)
    rm, rv = torch.randn(k, dtype=F64, device=DEV), torch.rand(k, dtype=F64, device=DEV) + 0.5
    args = (x, cws, pw, prw, bw, bb, rm, rv, rates, training)
    out, grads, prw_leaf = _aspp_grads("triton", *args, memory_efficient)
    ref_out, ref_grads, _ = _aspp_grads("reference", *args, False)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-8, msg=lambda m, i=i: f"grad {i}: {m}")
    assert grads[0].is_contiguous(memory_format=_format(kind)), grads[0].stride()  # grad_x in x's format
    # The projection weight's gradient, written in place into its (C, (B+1)*C) buffer: the parameter's strides, a
    # storage of its own, exactly its size (no view of a larger buffer kept alive).
    gp = grads[1 + len(cws) + 1]
    assert gp.shape == prw_leaf.shape and gp.stride() == prw_leaf.stride(), (gp.stride(), prw_leaf.stride())
    assert gp.storage_offset() == 0 and gp.untyped_storage().nbytes() == gp.numel() * gp.element_size()
    others = [t for j, t in enumerate(grads) if j != 1 + len(cws) + 1]
    assert all(gp.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in others)


# ---- the nn modules in both memory formats ---------------------------------------------------------------------


@triton_test
@pytest.mark.parametrize("kind,memory_efficient", [("nchw", True), ("cl", False)])
def test_modules_match_reference(kind, memory_efficient):
    torch.manual_seed(3)
    x = _x(kind, 2, 3, 4, 3, F64)
    for make in (lambda be: deeplab_ops.nn.FusedConvBNReLU(3, 2, 3, padding=1, backend=be,
                                                           memory_efficient=memory_efficient),
                 lambda be: deeplab_ops.nn.FusedASPP(3, (1,), out_channels=2, backend=be,
                                                     memory_efficient=memory_efficient)):
        fused = make("triton").to(device=DEV, dtype=F64)
        ref = make("reference").to(device=DEV, dtype=F64)
        ref.load_state_dict(copy.deepcopy(fused.state_dict()))
        xs = []
        outs = []
        for m in (fused, ref):
            xi = x.detach().clone().requires_grad_()
            o = m(xi)
            o.backward(torch.arange(o.numel(), dtype=F64, device=DEV).reshape(o.shape).cos())
            xs.append(xi)
            outs.append(o)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-9, rtol=1e-8)
        assert xs[0].grad.is_contiguous(memory_format=_format(kind))
        for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
            assert p.grad.stride() == p.stride(), name
        for (name, bf), br in zip(fused.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(bf, br, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")

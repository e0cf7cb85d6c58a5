"""The cpu backend's convolutions by routes other than oneDNN's, where those are faster: an NCHW input whose taps
mostly fall in the padding runs channels_last, where oneDNN skips those taps (csrc/cpu/conv_layout_cpu.h); the
weight gradient as one GEMM per tap over the positions inside the image, and for an NCHW input at a large
horizontal dilation the input gradient as a channels_last convolution of dy with the flipped weight
(csrc/cpu/conv_taps_cpu.h).

torch.ops.deeplab_ops.sparse_taps_plan says which path a convolution takes; each case below asserts it, so each
exercises the path it means to. Values are compared with float64 on fresh random inputs; which ops ran is read
from the profiler (counts, never times).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torchvision.models.segmentation.deeplabv3 import ASPP

import deeplab_ops
from deeplab_ops import reference
from deeplab_ops.nn import FusedASPP

_ops = torch.ops.deeplab_ops
CL = torch.channels_last


def _plan(x, weight, padding, dilation, stride=(1, 1)):
    return tuple(_ops.sparse_taps_plan(x, weight, list(stride), list(padding), list(dilation)))


def _ran(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, [e.name for e in prof.events()]


def _close(actual, expected, what, tol=1e-4):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}:\n{m}")


def _taps_inside(size, out, pad, dil, k):
    """Taps along one axis that read the image at one output position at least (brute force)."""
    return sum(any(0 <= o - pad + dil * t < size for o in range(out)) for t in range(k))


def _weight(cout, cin, kh, kw):
    """channels_last, as a channels_last model's weights are: the route's forward then converts no weight per call."""
    return (torch.randn(cout, cin, kh, kw) / (kh * kw * cin) ** 0.5).contiguous(memory_format=CL)


# ---- the plan ----------------------------------------------------------------------------------------

# (x shape, weight shape, padding, dilation, stride, layout, expected (channels_last, input_grad, weight_grad))
PLAN_CASES = {
    # 41 % of the pairs inside: the weight gradient's GEMMs in either layout; the input gradient stays oneDNN's
    "rate18-33": ((1, 256, 33, 33), (256, 256, 3, 3), (18, 18), (18, 18), (1, 1), "nchw", (True, False, True)),
    "rate12-33": ((1, 256, 33, 33), (256, 256, 3, 3), (12, 12), (12, 12), (1, 1), "nchw", (True, False, False)),
    "rate6-33": ((1, 256, 33, 33), (256, 256, 3, 3), (6, 6), (6, 6), (1, 1), "nchw", (False, False, False)),
    # 77 % of the taps inside, but a dilation of 8 or more: oneDNN's NCHW convolution is slow per tap there
    "rate12-65": ((1, 256, 65, 65), (256, 256, 3, 3), (12, 12), (12, 12), (1, 1), "nchw", (True, False, False)),
    "rate6-65": ((1, 256, 65, 65), (256, 256, 3, 3), (6, 6), (6, 6), (1, 1), "nchw", (False, False, False)),
    # a horizontal dilation of 24 or more: oneDNN's NCHW input gradient is slow there
    "rate36-65": ((1, 256, 65, 65), (256, 256, 3, 3), (36, 36), (36, 36), (1, 1), "nchw", (True, True, True)),
    "rate24-65": ((1, 256, 65, 65), (256, 256, 3, 3), (24, 24), (24, 24), (1, 1), "nchw", (True, True, False)),
    "horizontal-24": ((1, 64, 9, 40), (64, 64, 3, 3), (1, 24), (1, 24), (1, 1), "nchw", (False, True, False)),
    "horizontal-23": ((1, 64, 9, 40), (64, 64, 3, 3), (1, 23), (1, 23), (1, 1), "nchw", (False, False, False)),
    "vertical-24": ((1, 64, 40, 9), (64, 64, 3, 3), (24, 1), (24, 1), (1, 1), "nchw", (False, False, False)),
    "dense": ((1, 256, 33, 33), (256, 256, 3, 3), (1, 1), (1, 1), (1, 1), "nchw", (False, False, False)),
    # channels_last input: nothing to convert, and oneDNN's input gradient is the flipped convolution already
    "channels-last": ((1, 256, 33, 33), (256, 256, 3, 3), (18, 18), (18, 18), (1, 1), "nhwc", (False, False, True)),
    "channels-last-36": ((1, 256, 65, 65), (256, 256, 3, 3), (36, 36), (36, 36), (1, 1), "nhwc", (False, False, True)),
    # channels_last with many channels: the weight gradient's GEMMs up to 80 % of the pairs inside
    "wide-rate6": ((1, 512, 33, 33), (256, 512, 3, 3), (6, 6), (6, 6), (1, 1), "nhwc", (False, False, True)),
    "wide-rate6-nchw": ((1, 512, 33, 33), (256, 512, 3, 3), (6, 6), (6, 6), (1, 1), "nchw", (False, False, False)),
    "wide-dense": ((1, 512, 33, 33), (256, 512, 3, 3), (2, 2), (2, 2), (1, 1), "nhwc", (False, False, False)),
    "narrow-rate6": ((1, 256, 33, 33), (256, 256, 3, 3), (6, 6), (6, 6), (1, 1), "nhwc", (False, False, False)),
    "wide-out-128": ((1, 2048, 33, 33), (128, 2048, 3, 3), (6, 6), (6, 6), (1, 1), "nhwc", (False, False, False)),
    "stride-2": ((1, 256, 33, 33), (256, 256, 3, 3), (18, 18), (18, 18), (2, 2), "nchw", (False, False, False)),
    "1x1": ((1, 256, 33, 33), (256, 256, 1, 1), (0, 0), (1, 1), (1, 1), "nchw", (False, False, False)),
    # more padding than dilation * (k - 1): the input gradient's convolution would need a negative padding; the
    # weight gradient's boxes do not care
    "over-padded": ((1, 256, 9, 9), (256, 256, 3, 3), (13, 13), (6, 6), (1, 1), "nchw", (True, False, True)),
    "over-padded-36": ((1, 64, 9, 9), (64, 64, 3, 3), (80, 80), (36, 36), (1, 1), "nchw", (False, False, True)),
    # too few channels: the conversions cost more than the taps save; the GEMMs are too thin
    "thin": ((2, 16, 33, 33), (16, 16, 3, 3), (18, 18), (18, 18), (1, 1), "nchw", (False, False, False)),
    "grouped": ((1, 256, 33, 33), (256, 128, 3, 3), (18, 18), (18, 18), (1, 1), "nchw", (False, False, False)),
}


@pytest.mark.parametrize("case", list(PLAN_CASES), ids=str)
def test_plan(case):
    xs, ws, padding, dilation, stride, layout, expected = PLAN_CASES[case]
    x = torch.empty(xs)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    assert _plan(x, torch.empty(ws).contiguous(memory_format=CL), padding, dilation, stride) == expected


def test_plan_declines_other_dtypes_and_disabled_onednn():
    x, w = torch.empty(1, 256, 65, 65), torch.empty(256, 256, 3, 3).contiguous(memory_format=CL)
    assert _plan(x, w, (36, 36), (36, 36)) == (True, True, True)
    assert _plan(x.double(), w.double(), (36, 36), (36, 36)) == (False, False, False)
    assert _plan(x.bfloat16(), w.bfloat16(), (36, 36), (36, 36)) == (False, False, False)
    torch.backends.mkldnn.enabled = False
    try:
        assert _plan(x, w, (36, 36), (36, 36)) == (False, False, False)
    finally:
        torch.backends.mkldnn.enabled = True


# oneDNN's own float32 matmul precision exists from torch 2.9 (torch.backends.mkldnn.matmul); the global one always.
@pytest.mark.parametrize("setting", ["matmul-precision-medium"] + (
    ["mkldnn-matmul-bf16"] if hasattr(torch.backends.mkldnn, "matmul") else []))
def test_lowered_matmul_precision_keeps_the_backward_float32(setting):
    # The weight gradient's GEMMs go through ATen's mm, which follows the float32 matmul precision; a convolution's
    # gradient is meant to stay float32, so oneDNN's weight gradient runs instead. The forward and the input
    # gradient are convolutions either way.
    x, w = torch.empty(1, 256, 65, 65), torch.empty(256, 256, 3, 3).contiguous(memory_format=CL)
    if setting == "matmul-precision-medium":
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
    else:
        before = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        assert _plan(x, w, (36, 36), (36, 36)) == (True, True, False)
    finally:
        if setting == "matmul-precision-medium":
            torch.set_float32_matmul_precision(before)
        else:
            torch.backends.mkldnn.matmul.fp32_precision = before
    assert _plan(x, w, (36, 36), (36, 36)) == (True, True, True)


# ---- forward: NCHW through channels_last -------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("mode", ["train", "eval-with-grad", "eval-no-grad"])
def test_nchw_forward_runs_channels_last_and_matches_float64(mode, residual):
    torch.manual_seed(0)
    x = torch.randn(2, 256, 9, 11)
    weight = _weight(256, 256, 3, 3)
    kwargs = dict(stride=1, padding=(6, 7), dilation=(6, 7), training=mode == "train")
    assert _plan(x, weight, (6, 7), (6, 7))[0]
    assert _ops.winograd_plan(x, weight, [1, 1], [6, 7], [6, 7]) == 0  # the no-grad eval takes this path too
    bn = [torch.rand(256) + 0.5, torch.randn(256), torch.randn(256) * 0.1, torch.rand(256) + 0.5]
    res = torch.randn(2, 256, 9, 11) if residual else None
    ref = reference.conv_bn_relu(x.double(), weight.double(), *(t.double() for t in bn),
                                 residual=None if res is None else res.double(), **kwargs)
    if mode == "eval-with-grad":
        x.requires_grad_(True)
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        out = deeplab_ops.conv_bn_relu(x, weight, *bn, residual=res, backend="cpu", **kwargs)
    # channels_last, as torch's convolution lays out an NCHW x with a channels_last weight (x converted once at the
    # op's front door, which the route did inside; its output is no longer converted back)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    assert F.conv2d(x, weight, None, 1, (6, 7), (6, 7)).is_contiguous(memory_format=CL)
    _close(out, ref.detach(), mode)


def test_memory_efficient_recompute_gives_the_forward_convolution_bit_for_bit():
    # The recompute (conv_bias_act's plain form) takes the same channels_last route as the training forward.
    x, weight = torch.randn(2, 256, 9, 9), _weight(256, 256, 3, 3)
    args = ((1, 1), (6, 6), (6, 6))
    assert _plan(x, weight, (6, 6), (6, 6))[0]
    conv_out = _ops.conv_bn_relu_forward(x, weight, torch.rand(256), torch.randn(256), None, None, *args, True, 0.1,
                                         1e-5, None, True)[1]
    again = _ops.conv_bias_act(x, weight, None, None, *args, False)
    assert again.is_contiguous()
    assert torch.equal(again, conv_out)


# ---- backward: the weight gradient's GEMMs, the flipped convolution ----------------------------------

# (N, C_in, C_out, H, W, kernel, padding, dilation): square and not, 'same' padding and less and more, a 3 x 5
# kernel, channel counts that are no multiple of anything; the last three with a horizontal dilation of 24 or more
# (the input gradient's route for an NCHW x).
BACKWARD_CASES = [
    (2, 40, 36, 9, 11, (3, 3), (6, 6), (6, 6)),
    (1, 33, 48, 10, 7, (3, 3), (5, 3), (5, 4)),
    (2, 32, 40, 8, 13, (3, 5), (4, 8), (4, 4)),
    (2, 35, 32, 12, 12, (3, 3), (2, 2), (7, 7)),
    (3, 32, 32, 5, 5, (3, 3), (4, 4), (4, 4)),
    (1, 32, 34, 6, 7, (3, 3), (11, 14), (5, 6)),
    (2, 32, 40, 6, 30, (3, 3), (2, 25), (2, 25)),
    (1, 33, 48, 10, 60, (3, 5), (5, 48), (5, 24)),
    (2, 36, 32, 7, 29, (3, 3), (3, 30), (3, 24)),
]


def _expected_ops(plan, h, w, out_shape, kernel, padding, dilation):
    """convolution_backward calls and mm calls the backward runs under `plan` (input_grad, weight_grad)."""
    input_grad, weight_grad = plan
    # One GEMM per tap of the weight gradient that reaches the image at all (the others are zeros).
    mms = _taps_inside(h, out_shape[2], padding[0], dilation[0], kernel[0]) * \
        _taps_inside(w, out_shape[3], padding[1], dilation[1], kernel[1]) if weight_grad else 0
    return (0 if input_grad and weight_grad else 1), mms


@pytest.mark.parametrize("weight_layout", ["same", "other"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saved", "lean"])
def test_backward_routes_match_float64(case, layout, weight_layout, memory_efficient):
    torch.manual_seed(1)
    n, cin, cout, h, w, kernel, padding, dilation = case
    x = torch.randn(n, cin, h, w).contiguous(memory_format=layout).requires_grad_(True)
    w_layout = layout if weight_layout == "same" else (CL if layout != CL else torch.contiguous_format)
    weight = _weight(cout, cin, *kernel).contiguous(memory_format=w_layout).requires_grad_(True)
    bn_w, bn_b = (torch.rand(cout) + 0.5).requires_grad_(True), torch.randn(cout).requires_grad_(True)
    # the x the backend computes with: channels_last where the weight is, as torch's convolution lays it out
    x_layout = CL if CL in (layout, w_layout) else torch.contiguous_format
    plan = _plan(x.contiguous(memory_format=x_layout), weight, padding, dilation)[1:]
    assert plan[1], "every case takes the weight gradient's GEMMs"
    within = all(p <= d * (k - 1) for p, d, k in zip(padding, dilation, kernel, strict=True))
    assert plan[0] == (x_layout != CL and dilation[1] >= 24 and within)
    kwargs = dict(stride=1, padding=padding, dilation=dilation, training=True)
    leaves = [x, weight, bn_w, bn_b]
    out = deeplab_ops.conv_bn_relu(*leaves, None, None, backend="cpu", memory_efficient=memory_efficient, **kwargs)
    dleaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.conv_bn_relu(*dleaves, None, None, **kwargs)
    _close(out, ref.detach(), "forward")
    g = torch.randn(out.shape).contiguous(memory_format=layout)
    grads, names = _ran(lambda: torch.autograd.grad(out, leaves, g))
    backward_calls, mms = _expected_ops(plan, h, w, out.shape, kernel, padding, dilation)
    assert names.count("aten::convolution_backward") == backward_calls, sorted(set(names))
    assert names.count("aten::mm") == mms
    for name, got, want in zip(["x", "weight", "bn_weight", "bn_bias"], grads,
                               torch.autograd.grad(ref, dleaves, g.double()), strict=True):
        _close(got, want, f"grad {name}")
    assert grads[0].is_contiguous(memory_format=x_layout)  # as torch.autograd.grad gives eager's
    assert grads[1].is_contiguous(memory_format=w_layout)


@pytest.mark.parametrize("wanted", ["x", "weight"])
def test_backward_computes_only_the_wanted_gradient(wanted):
    # An NCHW x (and weight: an NCHW model) at a horizontal dilation of 25: both gradients by the cpu backend's
    # routes; only the wanted one runs.
    torch.manual_seed(2)
    x = torch.randn(2, 40, 9, 30).requires_grad_(wanted == "x")
    weight = _weight(36, 40, 3, 3).contiguous().requires_grad_(wanted == "weight")
    assert _plan(x, weight, (6, 25), (6, 25))[1:] == (True, True)
    bn = [torch.rand(36) + 0.5, torch.randn(36)]
    kwargs = dict(padding=(6, 25), dilation=(6, 25), training=True)
    out = deeplab_ops.conv_bn_relu(x, weight, *bn, None, None, backend="cpu", **kwargs)
    g = torch.randn(out.shape)
    (got,), names = _ran(lambda: torch.autograd.grad(out, [x if wanted == "x" else weight], g))
    assert "aten::convolution_backward" not in names
    assert names.count("aten::mm") == (9 if wanted == "weight" else 0)  # every tap reads the image somewhere
    assert names.count("aten::convolution") == (1 if wanted == "x" else 0)
    xd, wd = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref = reference.conv_bn_relu(xd, wd, *(t.double() for t in bn), None, None, **kwargs)
    want = torch.autograd.grad(ref, [xd if wanted == "x" else wd], g.double())[0]
    _close(got, want, f"grad {wanted}")


def test_wide_channels_last_weight_gradient_matches_float64():
    # 512 -> 256 channels_last at dilation 2 on 9 x 9: 73 % of the pairs inside, the GEMMs take the weight gradient,
    # oneDNN the input gradient.
    torch.manual_seed(8)
    x = torch.randn(1, 512, 9, 9).contiguous(memory_format=CL).requires_grad_(True)
    weight = _weight(256, 512, 3, 3).requires_grad_(True)
    assert _plan(x, weight, (2, 2), (2, 2)) == (False, False, True)
    bn = [torch.rand(256) + 0.5, torch.randn(256)]
    kwargs = dict(padding=2, dilation=2, training=True)
    out = deeplab_ops.conv_bn_relu(x, weight, *bn, None, None, backend="cpu", **kwargs)
    g = torch.randn(out.shape).contiguous(memory_format=CL)
    (gx, gw), names = _ran(lambda: torch.autograd.grad(out, [x, weight], g))
    assert names.count("aten::convolution_backward") == 1 and names.count("aten::mm") == 9
    xd, wd = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref = reference.conv_bn_relu(xd, wd, *(t.double() for t in bn), None, None, **kwargs)
    for name, got, want in zip(["x", "weight"], [gx, gw], torch.autograd.grad(ref, [xd, wd], g.double()), strict=True):
        _close(got, want, f"grad {name}")


def test_a_dense_convolution_keeps_onednns_backward():
    x = torch.randn(2, 40, 9, 9, requires_grad=True)
    weight = _weight(36, 40, 3, 3).requires_grad_(True)
    assert not any(_plan(x, weight, (2, 2), (2, 2)))
    out = deeplab_ops.conv_bn_relu(x, weight, torch.ones(36), torch.zeros(36), None, None, padding=2, dilation=2,
                                   training=True, backend="cpu")
    _, names = _ran(lambda: out.sum().backward())
    assert "aten::convolution_backward" in names


def test_non_finite_values_reach_both_gradients():
    torch.manual_seed(3)
    x = torch.randn(2, 40, 9, 9, requires_grad=True)
    weight = _weight(36, 40, 3, 3).requires_grad_(True)
    out = deeplab_ops.conv_bn_relu(x, weight, torch.ones(36), torch.zeros(36), None, None, padding=6, dilation=6,
                                   training=True, backend="cpu")
    g = torch.randn(out.shape)
    g[1, 5, 4, 4] = float("nan")
    gx, gw = torch.autograd.grad(out, [x, weight], g)
    # BatchNorm's backward spreads the NaN over its channel's reductions, so both gradients carry it.
    assert gx.isnan().any() and gw.isnan().any()


def _aspp_pair(cin, rates, cout, weight_scale):
    """torchvision's ASPP in float64 with random parameters (no dropout), and a FusedASPP loaded from it."""
    tv = ASPP(cin, rates, cout).double()
    tv.project[3].p = 0.0
    with torch.no_grad():
        for p in tv.parameters():
            p.copy_(torch.randn_like(p) * (weight_scale if p.dim() == 4 else 1.0))
            if p.dim() == 1:
                p.abs_().add_(0.5)
    fused = FusedASPP(cin, rates, cout, backend="cpu")
    fused.load_state_dict({k: v.float() for k, v in tv.state_dict().items()})
    return tv, fused


def test_fused_aspp_with_sparse_branches_matches_float64_in_training():
    # Rates 6 and 8 on a 9 x 9 map: most of their taps fall in the padding, their weight gradients run as GEMMs;
    # rate 2 keeps oneDNN's backward.
    # Against torchvision's ASPP in float64 with the same parameters.
    torch.manual_seed(4)
    cin, cout, rates = 64, 32, (2, 6, 8)
    tv, fused = _aspp_pair(cin, rates, cout, 0.2)
    x = torch.randn(2, cin, 9, 9)
    for r in rates:
        assert _plan(x, torch.empty(cout, cin, 3, 3), (r, r), (r, r))[1:] == (False, r > 2)
    x_d, x_f = x.double().requires_grad_(True), x.clone().requires_grad_(True)
    expected, out = tv(x_d), fused(x_f)
    _close(out, expected.detach(), "forward")
    g = torch.randn(out.shape)
    expected.backward(g.double())
    _, names = _ran(lambda: out.backward(g))
    # 1x1 branch, rate 2, the projection's per-branch products (4); the input gradients of rates 6 and 8
    assert names.count("aten::convolution_backward") == 1 + 1 + 4 + 2
    _close(x_f.grad, x_d.grad, "grad x")
    for (name, p), q in zip(fused.named_parameters(), tv.parameters(), strict=True):
        _close(p.grad, q.grad, f"grad {name}")
    for (name, b), c in zip(fused.named_buffers(), tv.buffers(), strict=True):
        _close(b, c.double(), f"buffer {name}", 1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_fused_aspp_branch_routes_match_float64(layout):
    # 512 -> 256 at rates 3 and 25 on a 7 x 30 map. NCHW: rate 25 takes both gradients' routes (its x converted to
    # channels_last once for the branches), rate 3 oneDNN's backward; channels_last: both rates' weight gradients as
    # GEMMs (many channels), the input gradients oneDNN's.
    torch.manual_seed(9)
    cin, cout, rates = 512, 256, (3, 25)
    tv, fused = _aspp_pair(cin, rates, cout, 0.05)
    if layout == CL:
        fused = fused.to(memory_format=CL)
    x = torch.randn(2, cin, 7, 30).contiguous(memory_format=layout)
    w = torch.empty(cout, cin, 3, 3).contiguous(memory_format=layout)
    expected_plans = {torch.contiguous_format: [(False, False), (True, True)], CL: [(False, True), (False, True)]}
    assert [_plan(x, w, (r, r), (r, r))[1:] for r in rates] == expected_plans[layout]
    x_d, x_f = x.double().requires_grad_(True), x.clone().requires_grad_(True)
    expected, out = tv(x_d), fused(x_f)
    _close(out, expected.detach(), "forward")
    g = torch.randn(out.shape).contiguous(memory_format=layout)
    expected.backward(g.double())
    _, names = _ran(lambda: out.backward(g))
    # 1x1 branch and the projection's per-branch products (3), and per rate: NCHW rate 3 (both gradients);
    # channels_last each rate's input gradient
    assert names.count("aten::convolution_backward") == 1 + 3 + (1 if layout != CL else 2)
    _close(x_f.grad, x_d.grad, "grad x")
    assert x_f.grad.is_contiguous(memory_format=layout)
    for (name, p), q in zip(fused.named_parameters(), tv.parameters(), strict=True):
        _close(p.grad, q.grad, f"grad {name}")
    for (name, b), c in zip(fused.named_buffers(), tv.buffers(), strict=True):
        _close(b, c.double(), f"buffer {name}", 1e-5)


def test_functional_conv_matches_torch_conv_on_odd_shapes():
    # conv_bias_act (the eval path's convolution) through channels_last against F.conv2d in float64, with a bias and
    # a residual, on several odd shapes.
    torch.manual_seed(5)
    for n, cin, cout, h, w, pad, dil in [(1, 300, 256, 7, 9, (5, 6), (5, 6)), (3, 384, 384, 7, 7, (5, 5), (5, 5))]:
        x, weight, bias = torch.randn(n, cin, h, w), _weight(cout, cin, 3, 3), torch.randn(cout)
        assert _plan(x, weight, pad, dil)[0]
        ho, wo = h + 2 * pad[0] - 2 * dil[0], w + 2 * pad[1] - 2 * dil[1]
        res = torch.randn(n, cout, ho, wo)
        out = _ops.conv_bias_act(x, weight, bias, res, [1, 1], list(pad), list(dil), True)
        want = (F.conv2d(x.double(), weight.double(), bias.double(), 1, pad, dil) + res.double()).relu()
        assert out.is_contiguous()
        _close(out, want, f"{n}x{cin}x{h}x{w}")


def test_plan_counts_a_weight_converted_per_call():
    # An NCHW weight that is not kept is converted on every call: on a small map that costs more than the taps save.
    x, w = torch.empty(2, 2048, 9, 9), torch.empty(256, 2048, 3, 3)
    assert _plan(x, w, (6, 6), (6, 6))[0] is False
    assert _plan(x, w.contiguous(memory_format=CL), (6, 6), (6, 6))[0] is True
    kept = torch.empty(256, 2048, 3, 3)
    _ops.winograd_cache_allow(kept)
    assert _plan(x, kept, (6, 6), (6, 6))[0] is True


def test_training_forward_sees_a_weight_written_through_data():
    # The fused ASPP's branch weights are registered by an eval call; a later training forward must read the weight
    # as it is, also after a write that bumps no version counter (p.data.add_: a manual SGD step).
    torch.manual_seed(6)
    cin, cout = 640, 256
    fused = FusedASPP(cin, (6,), cout, backend="cpu").eval()
    x = torch.randn(2, cin, 9, 9)
    with torch.no_grad():
        fused(x)
    w = fused.convs[1][0].weight
    w.data.mul_(-1)
    fused.train()
    tv = ASPP(cin, (6,), cout).double()
    tv.project[3].p = 0.0
    tv.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    with torch.no_grad():
        _close(fused(x), tv(x.double()), "training forward after w.data.mul_")


def test_eval_keeps_the_folds_channels_last_copy_and_follows_updates():
    # The no-grad eval path's fold (NCHW, like its weight) is registered; its channels_last copy is built once and
    # found again by the next call, and a parameter update (a new fold) brings a new copy.
    torch.manual_seed(7)
    x = torch.randn(2, 256, 9, 11)
    weight = torch.randn(256, 256, 3, 3) / 48
    bn = [torch.rand(256) + 0.5, torch.randn(256), torch.randn(256) * 0.1, torch.rand(256) + 0.5]
    kwargs = dict(stride=1, padding=(6, 7), dilation=(6, 7), training=False)
    assert _ops.winograd_plan(x, weight, [1, 1], [6, 7], [6, 7]) == 0  # the cache's entry is the layout copy
    _ops.winograd_cache_clear()
    deeplab_ops.common.clear_derived()
    with torch.no_grad():
        for step in range(2):
            before = list(_ops.winograd_cache_info())  # entries, bytes, hits, misses
            out = deeplab_ops.conv_bn_relu(x, weight, *bn, backend="cpu", **kwargs)
            after = list(_ops.winograd_cache_info())
            assert after[0] == 1  # one copy, kept by the first call
            assert after[2] - before[2] == step  # the second call finds it
            ref = reference.conv_bn_relu(x.double(), weight.double(), *(t.double() for t in bn), **kwargs)
            _close(out, ref, f"call {step}")
        assert after[1] >= weight.numel() * 4  # the copy counts against the cache's bytes
        weight.mul_(-1)  # an update: a new fold, a new copy
        out = deeplab_ops.conv_bn_relu(x, weight, *bn, backend="cpu", **kwargs)
    ref = reference.conv_bn_relu(x.double(), weight.double(), *(t.double() for t in bn), **kwargs)
    _close(out, ref, "after the update")

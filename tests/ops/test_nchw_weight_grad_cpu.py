"""The cpu backend's weight gradient of a channels_last x from NCHW copies of x and dy (csrc/cpu/conv_taps_cpu.h):
oneDNN's channels_last backward-weights of a float32 strided or dilated convolution larger than 1x1 runs well below
its NCHW (blocked) one where an image carries much work, while its channels_last backward-data keeps pace, so the
input gradient stays channels_last.

Measured to pay on an AMD EPYC and not on an Intel Xeon, the route is taken by default on AMD's CPUs only
(nchw_weight_grad_route "auto"); the cases below run it with the mode "always", so that it is checked on every
machine, and the default is checked against the vendor /proc/cpuinfo names.

torch.ops.deeplab_ops.nchw_weight_grad_plan says where the route is taken; each case below asserts it, so each
exercises the path it means to. Values are compared with float64 on fresh random inputs; which convolution calls
ran is read from the profiler (counts, never times).
"""

from __future__ import annotations

import platform
import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import deeplab_ops
from deeplab_ops import reference

_ops = torch.ops.deeplab_ops
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _route_always(request):
    """Every test here but those of the mode itself runs the route wherever its rules allow, on any CPU."""
    if request.node.name.startswith("test_route_"):  # the tests of the mode set it themselves
        yield
        return
    before = _ops.nchw_weight_grad_route("always")
    try:
        yield
    finally:
        _ops.nchw_weight_grad_route(before)


def _cpu_vendor() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _plan(x, weight, padding, dilation, stride=(1, 1)):
    return _ops.nchw_weight_grad_plan(x, weight, list(stride), list(padding), list(dilation))


# (x shape, weight shape, padding, dilation, stride, layout, expected): the route for strided or dilated weights
# from 2^26 output positions x C_in x C_out per image
PLAN_CASES = {
    "at-the-threshold": ((1, 256, 32, 32), (256, 256, 3, 3), (2, 2), (2, 2), (1, 1), "nhwc", True),
    "below-the-threshold": ((1, 256, 31, 32), (256, 256, 3, 3), (2, 2), (2, 2), (1, 1), "nhwc", False),
    # dense stride 1: the weight gradient alone ran faster NCHW there too, but the layer did not
    "dense": ((1, 256, 64, 64), (256, 256, 3, 3), (1, 1), (1, 1), (1, 1), "nhwc", False),
    "layer4-dilated": ((1, 512, 33, 33), (512, 512, 3, 3), (2, 2), (2, 2), (1, 1), "nhwc", True),
    "stride-2": ((1, 128, 129, 129), (128, 128, 3, 3), (1, 1), (1, 1), (2, 2), "nhwc", True),
    "3x5": ((1, 96, 80, 90), (100, 96, 3, 5), (2, 4), (2, 2), (1, 1), "nhwc", True),
    # per image: a batch of small maps stays oneDNN's channels_last (faster there)
    "batch-of-small-maps": ((8, 128, 17, 17), (128, 128, 3, 3), (2, 2), (2, 2), (1, 1), "nhwc", False),
    # NCHW x: oneDNN runs its NCHW weight gradient already
    "nchw": ((1, 256, 32, 32), (256, 256, 3, 3), (2, 2), (2, 2), (1, 1), "nchw", False),
    # 1x1: neither layout faster, and the copies would cost
    "1x1": ((1, 256, 64, 64), (256, 256, 1, 1), (0, 0), (1, 1), (2, 2), "nhwc", False),
    # grouped (the fused ops never are): not taken
    "grouped": ((1, 256, 32, 32), (256, 128, 3, 3), (2, 2), (2, 2), (1, 1), "nhwc", False),
    # mostly padding: the weight gradient's per-tap GEMMs (sparse_taps_plan) take it
    "taps-first": ((1, 2048, 33, 33), (256, 2048, 3, 3), (18, 18), (18, 18), (1, 1), "nhwc", False),
}


@pytest.mark.parametrize("case", list(PLAN_CASES), ids=str)
def test_plan(case):
    xs, ws, padding, dilation, stride, layout, expected = PLAN_CASES[case]
    x = torch.empty(xs)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    weight = torch.empty(ws).contiguous(memory_format=CL)
    assert _plan(x, weight, padding, dilation, stride) is expected
    if case == "taps-first":
        assert _ops.sparse_taps_plan(x, weight, list(stride), list(padding), list(dilation))[2]


def test_route_mode_by_default_follows_the_cpu_vendor():
    assert _ops.nchw_weight_grad_route() == "auto"  # the default, unchanged by reading it
    x = torch.empty(1, 128, 129, 129).contiguous(memory_format=CL)
    w = torch.empty(128, 128, 3, 3).contiguous(memory_format=CL)
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        vendor = None  # no cpuid: the route stays off
    else:
        vendor = _cpu_vendor()
        assert vendor is not None, "an x86 machine without /proc/cpuinfo's vendor_id: nothing to compare cpuid with"
    assert _plan(x, w, (1, 1), (1, 1), (2, 2)) is (vendor in ("AuthenticAMD", "HygonGenuine")), vendor


def test_route_mode_always_and_never():
    x = torch.empty(1, 128, 129, 129).contiguous(memory_format=CL)
    w = torch.empty(128, 128, 3, 3).contiguous(memory_format=CL)
    small = torch.empty(8, 128, 17, 17).contiguous(memory_format=CL)  # below the threshold: never taken
    before = _ops.nchw_weight_grad_route()
    assert before == "auto"  # the default
    try:
        assert _ops.nchw_weight_grad_route("never") == "auto"
        assert not _plan(x, w, (1, 1), (1, 1), (2, 2))
        assert _ops.nchw_weight_grad_route("always") == "never"
        assert _plan(x, w, (1, 1), (1, 1), (2, 2))
        assert not _plan(small, w, (2, 2), (2, 2))
        with pytest.raises(RuntimeError, match=r"nchw_weight_grad_route: mode must be 'auto', 'always' or 'never', "
                                               r"got 'sometimes'"):
            _ops.nchw_weight_grad_route("sometimes")
        assert _ops.nchw_weight_grad_route() == "always"  # a bad mode changes nothing
    finally:
        _ops.nchw_weight_grad_route(before)


def test_route_never_runs_one_channels_last_backward():
    # the route off: oneDNN's one channels_last backward call computes both gradients, as eager's
    torch.manual_seed(5)
    x = torch.randn(1, 256, 32, 32).contiguous(memory_format=CL).requires_grad_(True)
    weight = (torch.randn(256, 256, 3, 3) / 48).contiguous(memory_format=CL).requires_grad_(True)
    bn_w, bn_b = torch.rand(256) + 0.5, torch.randn(256)
    before = _ops.nchw_weight_grad_route("never")
    try:
        assert not _plan(x, weight, (2, 2), (2, 2))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = deeplab_ops.conv_bn_relu(x, weight, bn_w, bn_b, None, None, stride=1, padding=2, dilation=2,
                                           training=True, backend="cpu")
            _, grad_w = torch.autograd.grad(out, (x, weight), torch.ones_like(out))
    finally:
        _ops.nchw_weight_grad_route(before)
    assert [e.name for e in prof.events()].count("aten::convolution_backward") == 1
    _close(grad_w, _weight_grad_ref(x.detach(), weight, bn_w, bn_b), "grad_weight", tol=3e-4)


def test_plan_declines_other_dtypes_and_disabled_onednn():
    x, w = torch.empty(1, 256, 32, 32).contiguous(memory_format=CL), torch.empty(256, 256, 3, 3)
    assert _plan(x, w, (2, 2), (2, 2))
    assert not _plan(x.double(), w.double(), (2, 2), (2, 2))
    assert not _plan(x.bfloat16(), w.bfloat16(), (2, 2), (2, 2))
    torch.backends.mkldnn.enabled = False
    try:
        assert not _plan(x, w, (2, 2), (2, 2))
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.parametrize("bad,message", [
    (dict(x=torch.empty(256, 32, 32)), "x must be 4-D (N, C, H, W), got shape [256, 32, 32]"),
    (dict(weight=torch.empty(256, 256, 3)), "weight must be 4-D (C_out, C_in, kH, kW), got shape [256, 256, 3]"),
    (dict(stride=[0, 1]), "stride must be positive, got [0, 1]"),
    (dict(dilation=[2, 0]), "dilation must be positive, got [2, 0]"),
    (dict(padding=[-1, 2]), "padding must be non-negative, got [-1, 2]"),
], ids=["x-3d", "weight-3d", "stride-0", "dilation-0", "padding-negative"])
def test_plan_refuses_bad_arguments_by_name(bad, message):
    args = dict(x=torch.empty(1, 256, 32, 32).contiguous(memory_format=CL), weight=torch.empty(256, 256, 3, 3),
                stride=[1, 1], padding=[2, 2], dilation=[2, 2])
    args.update(bad)
    with pytest.raises(RuntimeError, match="nchw_weight_grad_plan: " + re.escape(message)):
        _ops.nchw_weight_grad_plan(args["x"], args["weight"], args["stride"], args["padding"], args["dilation"])


def test_plan_of_an_empty_output_is_false():
    # a kernel larger than the padded map: no output position, nothing to route
    x = torch.empty(1, 256, 2, 2).contiguous(memory_format=CL)
    assert not _plan(x, torch.empty(256, 256, 3, 3), (0, 0), (2, 2))


def _close(actual, expected, what, tol=1e-4):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}:\n{m}")


# (N, C_in, C_out, H, W, kernel, stride, padding, dilation): channel counts and sizes that are no multiple of
# anything, a 3x5 kernel, less padding than 'same', stride 2; each at or above the route's threshold.
CASES = [
    (1, 96, 100, 80, 90, (3, 5), (1, 1), (2, 3), (2, 2)),
    (2, 128, 132, 129, 127, (3, 3), (2, 2), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("weight_layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saved", "lean"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_float64(case, memory_efficient, weight_layout):
    torch.manual_seed(3)
    n, cin, cout, h, w, kernel, stride, padding, dilation = case
    x = torch.randn(n, cin, h, w).contiguous(memory_format=CL).requires_grad_(True)
    w_format = CL if weight_layout == "channels_last" else torch.contiguous_format
    weight = (torch.randn(cout, cin, *kernel) / (cin * kernel[0] * kernel[1]) ** 0.5)
    weight = weight.contiguous(memory_format=w_format).requires_grad_(True)
    bn_w, bn_b = (torch.rand(cout) + 0.5).requires_grad_(True), torch.randn(cout).requires_grad_(True)
    res = torch.randn(n, cout, (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
                      (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1)
    assert _plan(x, weight, padding, dilation, stride)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, training=True)
    leaves = (x, weight, bn_w, bn_b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = deeplab_ops.conv_bn_relu(*leaves, None, None, residual=res, backend="cpu",
                                       memory_efficient=memory_efficient, **kwargs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
    # the input gradient channels_last, the weight gradient from NCHW copies: two calls
    assert [e.name for e in prof.events()].count("aten::convolution_backward") == 2
    dleaves = tuple(t.detach().double().requires_grad_(True) for t in leaves)
    ref = reference.conv_bn_relu(*dleaves, None, None, residual=res.double(), **kwargs)
    ref_grads = torch.autograd.grad(ref, dleaves, grad_out.double())
    _close(out, ref.detach(), "out")
    for name, g, r in zip(("x", "weight", "bn_weight", "bn_bias"), grads, ref_grads, strict=True):
        _close(g, r, f"grad_{name}", tol=3e-4)
    assert grads[0].is_contiguous(memory_format=CL)  # x's format
    assert grads[1].is_contiguous(memory_format=w_format)  # the weight's format


def test_weight_gradient_alone_runs_one_nchw_call():
    # x needs no gradient: one convolution_backward, the weight gradient's, on NCHW copies.
    torch.manual_seed(4)
    x = torch.randn(1, 256, 32, 32).contiguous(memory_format=CL)
    weight = (torch.randn(256, 256, 3, 3) / 48).contiguous(memory_format=CL).requires_grad_(True)
    bn_w, bn_b = torch.rand(256) + 0.5, torch.randn(256)
    assert _plan(x, weight, (2, 2), (2, 2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = deeplab_ops.conv_bn_relu(x, weight, bn_w, bn_b, None, None, stride=1, padding=2, dilation=2,
                                       training=True, backend="cpu")
        (grad_w,) = torch.autograd.grad(out, weight, torch.ones_like(out))
    assert [e.name for e in prof.events()].count("aten::convolution_backward") == 1
    _close(grad_w, _weight_grad_ref(x, weight, bn_w, bn_b), "grad_weight", tol=3e-4)
    assert grad_w.is_contiguous(memory_format=CL)


def _weight_grad_ref(x, weight, bn_w, bn_b):
    wd = weight.detach().double().requires_grad_(True)
    ref = reference.conv_bn_relu(x.double(), wd, bn_w.double(), bn_b.double(), None, None, stride=1, padding=2,
                                 dilation=2, training=True)
    return torch.autograd.grad(ref, wd, torch.ones_like(ref))[0]

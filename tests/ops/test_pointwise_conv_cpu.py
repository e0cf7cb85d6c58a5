"""The cpu backend's NCHW 1x1 eval convolution (csrc/cpu/pointwise_conv_cpu.cpp): float32, stride 1, no padding, at
least as many output channels as input ones, an output of at least 2^18 values, in inference only (conv_bias_act:
BatchNorm folded in): one GEMM per image on the Winograd convolutions' GEMM kernel, with the bias, residual and ReLU
applied per output tile. Which path ran is read from the profiler (deeplab_ops::pointwise_conv_nchw); values are
compared with float64 convolutions on fresh inputs, odd shapes included.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import deeplab_ops

_ops = torch.ops.deeplab_ops
CL = torch.channels_last
POINTWISE = "deeplab_ops::pointwise_conv_nchw"


def _ran(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


def _reference(x, w, bias, residual, relu):
    y = F.conv2d(x.double(), w.double(), None if bias is None else bias.double())
    if residual is not None:
        y = y + residual.double()
    return y.relu() if relu else y


def _close(actual, expected, what):
    # one float32 GEMM: its rounding, relative to the sum of |products| a dot product of C_in terms can reach
    tol = 2e-6 * math.sqrt(expected.shape[1] + 1)
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=1e-5, msg=lambda m: f"{what}:\n{m}")


# (N, C_in, C_out, H, W): planes that are not a multiple of the 32-pixel panel (33 x 33, 33 x 31), channel counts
# that are not a multiple of the row tiles (8, 6, 96) or of the vector width, one image and several.
SHAPES = [(1, 256, 1024, 33, 33), (2, 37, 100, 33, 41), (3, 64, 130, 33, 31), (1, 5, 2048, 11, 13),
          (1, 96, 96, 64, 43)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_matches_float64_and_runs_the_gemm(shape, bias, residual, relu):
    torch.manual_seed(sum(shape) + 2 * bias + residual)
    n, cin, cout, h, w = shape
    x = torch.randn(n, cin, h, w)
    wt = torch.randn(cout, cin, 1, 1) / cin**0.5
    b = torch.randn(cout) if bias else None
    r = torch.randn(n, cout, h, w) if residual else None
    if not (bias or residual or relu):  # the plain form is the training recompute's convolution: ATen's
        b = torch.zeros(cout)
    y, names = _ran(lambda: _ops.conv_bias_act(x, wt, b, r, [1, 1], [0, 0], [1, 1], relu))
    assert POINTWISE in names, sorted(names)
    assert y.shape == (n, cout, h, w) and y.is_contiguous() and y.dtype == torch.float32
    _close(y, _reference(x, wt, b, r, relu), f"{shape} bias={bias} residual={residual} relu={relu}")


def test_same_bits_at_one_and_two_threads():
    """Every output is one FMA chain over C_in whatever the split of rows and panels over threads."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 96, 33, 33), torch.randn(200, 96, 1, 1), torch.randn(200)
    r = torch.randn(2, 200, 33, 33)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.conv_bias_act(x, w, b, r, [1, 1], [0, 0], [1, 1], True)
        torch.set_num_threads(2)
        two = _ops.conv_bias_act(x, w, b, r, [1, 1], [0, 0], [1, 1], True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_special_values_propagate_as_eager():
    """NaN and infinities reach the output as conv -> add -> ReLU gives them (ReLU keeps NaN)."""
    torch.manual_seed(1)
    x, w, b = torch.randn(1, 16, 128, 130), torch.randn(32, 16, 1, 1), torch.randn(32)
    x[0, 3, 5, 7] = math.nan
    x[0, 4, 100, 1] = math.inf
    r = torch.randn(1, 32, 128, 130)
    r[0, 9, 64, 64] = -math.inf
    y, names = _ran(lambda: _ops.conv_bias_act(x, w, b, r, [1, 1], [0, 0], [1, 1], True))
    assert POINTWISE in names
    want = F.conv2d(x, w, b).add(r).relu()
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-4, atol=1e-4)


# What the path leaves to ATen's convolution: (x, weight, stride, padding, why).
def _declined():
    x = torch.randn(1, 64, 64, 64)
    w = torch.randn(128, 64, 1, 1)
    return [
        (x.contiguous(memory_format=CL), w, 1, 0, "channels_last x: oneDNN's fused 1x1 runs it as it is"),
        (x, w, 2, 0, "stride 2"),
        (torch.randn(1, 256, 64, 64), torch.randn(128, 256, 1, 1), 1, 0, "more input channels than output ones"),
        (x, w, 1, 1, "padding"),
        (x.double(), w.double(), 1, 0, "float64"),
        (torch.randn(1, 64, 16, 16), w, 1, 0, "an output below 2^18 values"),
        (x, torch.randn(128, 64, 1, 1).transpose(0, 1).contiguous().transpose(0, 1), 1, 0, "a weight not dense as "
         "(C_out, C_in)"),
        (torch.randn(1, 64, 64, 128)[..., ::2], w, 1, 0, "a strided x"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_declined_calls_run_atens_convolution(case):
    x, w, s, p, why = _declined()[case]
    b = torch.randn(w.shape[0], dtype=x.dtype)
    y, names = _ran(lambda: _ops.conv_bias_act(x, w, b, None, [s, s], [p, p], [1, 1], True))
    assert POINTWISE not in names, why
    torch.testing.assert_close(y.double(), F.conv2d(x.double(), w.double(), b.double(), s, p).relu(), rtol=1e-4,
                               atol=1e-4 * max(1.0, y.abs().max().item()))


def test_training_and_eval_with_gradients_keep_atens_convolution():
    """A training step, and eval where a gradient is computed, run no GEMM path (its rounding would differ from the
    convolution the backward is checked against), as Winograd."""
    torch.manual_seed(2)
    layer = deeplab_ops.nn.FusedConvBNReLU(64, 128, 1, backend="cpu")
    x = torch.randn(2, 64, 48, 48, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        _, names = _ran(lambda: layer(x).sum().backward())
        assert POINTWISE not in names, training


def test_fused_bottleneck_eval_in_nchw_matches_eager():
    """A fused module in eval, NCHW, no gradient: its 1x1 layers take the GEMM path, and the output is eager's
    conv -> BatchNorm -> ReLU within float32 rounding."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(256, 512, 1, bias=False)
    bn = torch.nn.BatchNorm2d(512)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    eager = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    fused = deeplab_ops.nn.FusedConvBNReLU(256, 512, 1, backend="cpu").eval()
    fused.load_state_dict(eager.state_dict())  # nn.Sequential(conv, bn, relu)'s keys
    x = torch.randn(1, 256, 33, 33)
    with torch.no_grad():
        y, names = _ran(lambda: fused(x))
        want = eager.double()(x.double())
    assert POINTWISE in names, sorted(names)
    _close(y, want, "fused 1x1 eval")

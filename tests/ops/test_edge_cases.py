"""Numerical edge cases behave as the reference does, on the reference, cpu and triton backends (triton on CUDA
tensors where a GPU is visible, else in the interpreter): NaN and Inf inputs, huge means with tiny variances,
constant channels (variance 0), a feature map smaller than the dilation, all-negative pre-activations. conv_bn_relu
and aspp; forward, gradients and running statistics."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend_param, device_for
from test_fuzz import compare

import deeplab_ops
from deeplab_ops import reference

pytestmark = pytest.mark.usefixtures("no_tf32")

CONV_BACKENDS = ["reference", "cpu", backend_param("triton")]
ASPP_BACKENDS = CONV_BACKENDS


def _conv(x, w, gamma, beta, rm, rv, backend, grads=True, **kw):
    """Run the op (backend, on the device it runs on) or the reference (None, on CPU) on copies of CPU tensors;
    return (out, rm, rv, grads of x, w, gamma, beta), on CPU."""
    device = device_for(backend) if backend is not None else "cpu"
    leaves = [t.detach().to(device, copy=True).requires_grad_(grads) for t in (x, w, gamma, beta)]
    rm = rm.to(device, copy=True) if rm is not None else None
    rv = rv.to(device, copy=True) if rv is not None else None
    if kw.get("residual") is not None:
        kw["residual"] = kw["residual"].to(device)
    fn = reference.conv_bn_relu if backend is None else deeplab_ops.conv_bn_relu
    extra = {} if backend is None else {"backend": backend}
    out = fn(*leaves, rm, rv, **kw, **extra)
    g = None
    if grads:
        gen = torch.Generator().manual_seed(5)
        g = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=gen, dtype=out.dtype).to(device))
        g = [t.cpu() for t in g]
    return out.detach().cpu(), *(t.cpu() if t is not None else None for t in (rm, rv)), g


def _same_nonfinite(actual, expected, what):
    inf = float("inf")
    for name, f in (("NaN", torch.isnan), ("+Inf", lambda t: t == inf), ("-Inf", lambda t: t == -inf)):
        a, e = f(actual), f(expected)
        assert torch.equal(a, e), (f"{what}: {name} at {a.sum().item()} places, the reference at {e.sum().item()} "
                                   f"(first differing index {tuple((a != e).nonzero()[0].tolist())})")


def _inputs(n=2, cin=3, cout=4, h=5, w=6, k=3, dtype=torch.float32):
    x = torch.randn(n, cin, h, w, dtype=dtype)
    return (x, torch.randn(cout, cin, k, k, dtype=dtype) / (cin * k * k) ** 0.5, torch.rand(cout, dtype=dtype) + 0.5,
            torch.randn(cout, dtype=dtype), torch.randn(cout, dtype=dtype) * 0.1, torch.rand(cout, dtype=dtype) + 0.5)


# ---- NaN and Inf ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("value, relu", [(float("nan"), True), (float("inf"), True), (-float("inf"), False)],
                         ids=["nan-relu", "inf-relu", "-inf-norelu"])
# Inf inputs make the Triton interpreter's numpy arithmetic warn (inf - inf, 0 * inf): expected here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_input_propagates_as_in_the_reference(backend, training, value, relu):
    """A NaN/Inf pixel: the same NaN/Inf pattern as the float32 reference in the output and running statistics
    (training: the whole batch's statistics become non-finite; eval: only the receptive field), finite values
    equal, and the gradients' non-finite pattern too: in eval, dy = gamma * invstd * g does not depend on y, and
    ReLU's backward (threshold_backward) passes the gradient of a NaN output on."""
    x, w, gamma, beta, rm, rv = _inputs()
    x[1, 2, 3, 4] = value
    x[0, 0, 0, 0] = value
    kw = dict(padding=1, training=training, relu=relu)
    out, orm, orv, og = _conv(x, w, gamma, beta, rm, rv, backend, **kw)
    eout, erm, erv, eg = _conv(x, w, gamma, beta, rm, rv, None, **kw)
    _same_nonfinite(out, eout, f"{backend} output")
    assert_close(out, eout, f"{backend} output", 2e-4, 2e-4)
    _same_nonfinite(orm, erm, f"{backend} running_mean")
    _same_nonfinite(orv, erv, f"{backend} running_var")
    for name, a, e in zip(("x", "weight", "bn_weight", "bn_bias"), og, eg, strict=True):
        _same_nonfinite(a, e, f"{backend} grad {name}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_nan_weight_and_residual_as_in_the_reference(backend):
    x, w, gamma, beta, rm, rv = _inputs(cout=3)
    w[1, 0, 1, 1] = float("nan")
    res = torch.randn(2, 3, 5, 6)
    res[0, 2, 1, 1] = float("nan")
    for training in (True, False):
        kw = dict(padding=1, training=training, residual=res)
        out, orm, orv, _ = _conv(x, w, gamma, beta, rm, rv, backend, grads=False, **kw)
        eout, erm, erv, _ = _conv(x, w, gamma, beta, rm, rv, None, grads=False, **kw)
        _same_nonfinite(out, eout, f"{backend} output (training={training})")
        assert_close(out, eout, f"{backend} output", 2e-4, 2e-4)
        _same_nonfinite(orm, erm, f"{backend} running_mean")
        _same_nonfinite(orv, erv, f"{backend} running_var")


# ---- huge mean, tiny variance -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype, mean, std, atol, var_rtol", [
    (torch.float32, 1e4, 0.1, 2e-2, 1e-3),  # float32 holds y to ~5e-4 at 1e4: a few 1e-3 of a standard deviation
    (torch.float64, 1e8, 1e-3, 1e-4, 1e-6),
], ids=["float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_huge_mean_tiny_variance(backend, dtype, mean, std, atol, var_rtol, channels_last):
    """E[y^2] - E[y]^2 would lose the variance entirely; Chan/Welford partials keep it (the conv is an identity,
    so the BatchNorm input is exactly x)."""
    n, c, h, w = 3, 4, 7, 5
    x = mean + std * torch.randn(n, c, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.eye(c, dtype=dtype).view(c, c, 1, 1)
    gamma, beta = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    out, orm, orv, og = _conv(x, weight, gamma, beta, rm, rv, backend, relu=False)
    eout, erm, erv, eg = _conv(x.double(), weight.double(), gamma.double(), beta.double(), rm.double(), rv.double(),
                               None, relu=False)
    assert_close(out, eout, f"{backend} normalized output", atol, 0)
    assert_close(orv, erv, f"{backend} running_var", 0, var_rtol)
    assert_close(orm, erm, f"{backend} running_mean", 0, 1e-6 if dtype == torch.float32 else 1e-12)
    # The gradients: PyTorch's own float32 BatchNorm backward is far off here (its error is the yardstick). The
    # conv weight's gradient sum(x * dy) is left out: sum(dy) = 0 holds only to n * ulp(mean) * invstd, and x ~ mean
    # multiplies that (float64 at 1e8: ~5e4 of error on a true value below 1, in the reference as in any backend).
    _, _, _, sg = _conv(x, weight, gamma, beta, rm, rv, None, relu=False)
    for name, a, e, r in zip(("x", "weight", "bn_weight", "bn_bias"), og, eg, sg, strict=True):
        if name != "weight":
            compare(a, e, r if dtype != torch.float64 else None, f"{backend} grad {name}", atol, 1e-3)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("mean", [2e19, 1e30], ids=["2e19", "1e30"])
def test_a_batch_mean_beyond_the_square_root_of_float32s_range(backend, mean):
    """Found by a review: the triton finalize merged its first block of partials into an empty total with
    delta * delta * 0, inf * 0 = NaN once |mean| > ~1.8e19 in float32: an all-NaN output and running_var where
    eager's are finite (a diverging run's activations). An empty side now takes the other as is, as the C++
    kernels' welford_merge does."""
    torch.manual_seed(0)
    c = 4
    x = mean + torch.randn(2, c, 9, 9) * (mean * 1e-3)
    weight = torch.eye(c).view(c, c, 1, 1)
    gamma, beta = torch.ones(c), torch.zeros(c)
    out, orm, orv, _ = _conv(x, weight, gamma, beta, torch.zeros(c), torch.ones(c), backend, relu=False)
    eout, erm, erv, _ = _conv(x, weight, gamma, beta, torch.zeros(c), torch.ones(c), None, relu=False)
    assert not out.isnan().any() and not orv.isnan().any(), f"{backend}: NaN statistics at mean {mean:g}"
    _same_nonfinite(orv, erv, f"{backend} running_var")
    _same_nonfinite(orm, erm, f"{backend} running_mean")
    assert_close(out, eout.to(out.device), f"{backend} output", 1e-3, 1e-3)
    if mean < 1e30:  # (1e30: the variance itself overflows, inf in eager too)
        assert_close(orv, erv, f"{backend} running_var", 0, 1e-4)


# ---- constant channels (variance 0) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_constant_channels(backend, dtype):
    """Channel 0: zero weights (y = 0 everywhere); channel 1: a 1x1 conv of a constant input plane (y = const).
    var = 0, invstd = 1/sqrt(eps): the output is beta, the gradients finite and as in the reference."""
    x, w, gamma, beta, rm, rv = _inputs(cin=3, cout=3, k=1, dtype=dtype)
    w[0] = 0.0
    w[1] = 0.0
    w[1, 2] = 0.7
    x[:, 2] = 3.25
    atol = 2e-4 if dtype == torch.float32 else 1e-9
    for training in (True, False):
        out, orm, orv, og = _conv(x, w, gamma, beta, rm, rv, backend, training=training, relu=False)
        eout, erm, erv, eg = _conv(x.double(), w.double(), gamma.double(), beta.double(), rm.double(), rv.double(),
                                   None, training=training, relu=False)
        tag = f"{backend} {'train' if training else 'eval'}"
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in og), tag
        assert_close(out, eout, f"{tag} output", atol, atol)
        assert_close(orm, erm, f"{tag} running_mean", atol, atol)
        assert_close(orv, erv, f"{tag} running_var", atol, atol)
        if training:
            assert_close(out[:, :2], beta[:2].view(1, 2, 1, 1).expand(2, 2, 5, 6), f"{tag} constant channels = beta",
                         atol, atol)
        # A zero variance scales the gradient by 1/sqrt(eps) ~ 316, and PyTorch's own float32 backward is far off
        # there: its error is the yardstick.
        _, _, _, sg = _conv(x, w, gamma, beta, rm, rv, None, training=training, relu=False)
        for name, a, e, r in zip(("x", "weight", "bn_weight", "bn_bias"), og, eg, sg, strict=True):
            compare(a, e, r if dtype != torch.float64 else None, f"{tag} grad {name}", atol * 10, atol * 10)


# ---- a feature map smaller than the dilation ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("size, dilation, stride", [((3, 3), 6, 1), ((1, 2), 12, 1), ((4, 5), 5, 2)], ids=str)
def test_map_smaller_than_the_dilation(backend, size, dilation, stride):
    """Only the centre tap lands inside the map (padding = dilation): the result is a 1x1 conv with the centre
    weights, through the reference as through the kernels."""
    x, w, gamma, beta, rm, rv = _inputs(n=2, cin=3, cout=2, h=size[0], w=size[1], dtype=torch.float64)
    for training in (True, False):
        kw = dict(padding=dilation, dilation=dilation, stride=stride, training=training, relu=True)
        out, orm, orv, og = _conv(x, w, gamma, beta, rm, rv, backend, **kw)
        eout, erm, erv, eg = _conv(x, w, gamma, beta, rm, rv, None, **kw)
        centre, *_ = _conv(x, w[:, :, 1:2, 1:2].contiguous(), gamma, beta, rm, rv, None, grads=False,
                           stride=stride, training=training, relu=True)
        assert_close(eout, centre, "reference = centre-tap 1x1 conv", 1e-12, 1e-12)
        assert_close(out, eout, f"{backend} output", 1e-9, 1e-9)
        assert_close(orm, erm, f"{backend} running_mean", 1e-9, 1e-9)
        assert_close(orv, erv, f"{backend} running_var", 1e-9, 1e-9)
        for name, a, e in zip(("x", "weight", "bn_weight", "bn_bias"), og, eg, strict=True):
            assert_close(a, e, f"{backend} grad {name}", 1e-9, 1e-9)
        assert (og[1][:, :, [0, 2]] == 0).all() and (og[1][:, :, :, [0, 2]] == 0).all(), "padding taps got gradient"


@pytest.mark.parametrize("backend", ASPP_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aspp_rates_larger_than_the_map(backend, training):
    from test_aspp import _functional_inputs

    x, cws, pw, prw, bws, bbs, rms, rvs, rates = _functional_inputs(n=2, cin=3, c=2, h=3, w=4, rates=(6, 12, 18),
                                                                    device=device_for(backend))
    leaves = [x, *cws, pw, prw, *bws, *bbs]
    for t in leaves:
        t.requires_grad_()
    rm_ref, rv_ref = [t.clone() for t in rms], [t.clone() for t in rvs]
    out = deeplab_ops.aspp(x, cws, pw, prw, bws, bbs, rms, rvs, rates=rates, training=training, backend=backend)
    exp = reference.aspp(x, cws, pw, prw, bws, bbs, rm_ref, rv_ref, rates=rates, training=training)
    assert_close(out, exp, f"{backend} aspp output", 1e-10, 1e-10)
    for i, (a, b) in enumerate(zip(rms + rvs, rm_ref + rv_ref, strict=True)):
        assert_close(a, b, f"{backend} aspp running stat {i}", 1e-10, 1e-10)
    grad = torch.randn_like(out)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(exp, leaves, grad),
                                   strict=True)):
        assert_close(a, b, f"{backend} aspp grad of input {i}", 1e-9, 1e-9)


# ---- all-negative pre-activations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_all_negative_preactivations(backend, training, residual):
    """beta = -50 (and a negative residual): every pre-activation < 0, the output is exactly 0 and so is every
    gradient; the running statistics still update."""
    x, w, gamma, beta, rm, rv = (t.to(device_for(backend)) for t in _inputs())
    beta = torch.full_like(beta, -50.0)
    res = -torch.rand(2, 4, 5, 6, device=x.device) if residual else None
    kw = dict(padding=1, training=training, residual=res)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gamma, beta)]
    if res is not None:
        leaves.append(res.clone().requires_grad_())
        kw["residual"] = leaves[-1]
    orm, orv = rm.clone(), rv.clone()
    out = deeplab_ops.conv_bn_relu(*leaves[:4], orm, orv, backend=backend, **kw)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    for i, g in enumerate(grads):
        assert torch.equal(g, torch.zeros_like(g)), f"{backend} gradient {i} is not exactly zero"
    erm, erv = rm.double(), rv.double()
    reference.conv_bn_relu(x.double(), w.double(), gamma.double(), beta.double(), erm, erv, padding=1,
                           training=training, residual=res.double() if res is not None else None)
    assert_close(orm, erm, f"{backend} running_mean", 2e-4, 2e-4)
    assert_close(orv, erv, f"{backend} running_var", 2e-4, 2e-4)


@pytest.mark.parametrize("backend", ASPP_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aspp_nan_input_as_in_the_reference(backend, training):
    from test_aspp import _functional_inputs

    x, cws, pw, prw, bws, bbs, rms, rvs, rates = _functional_inputs(dtype=torch.float32, device=device_for(backend))
    x[1, 2, 3, 4] = float("nan")
    rm_ref, rv_ref = [t.clone() for t in rms], [t.clone() for t in rvs]
    out = deeplab_ops.aspp(x, cws, pw, prw, bws, bbs, rms, rvs, rates=rates, training=training, backend=backend)
    exp = reference.aspp(x, cws, pw, prw, bws, bbs, rm_ref, rv_ref, rates=rates, training=training)
    _same_nonfinite(out, exp, f"{backend} aspp output")
    assert_close(out, exp, f"{backend} aspp output", 2e-4, 2e-4)
    for i, (a, b) in enumerate(zip(rms + rvs, rm_ref + rv_ref, strict=True)):
        _same_nonfinite(a, b, f"{backend} aspp running stat {i}")


def test_stage_ops_nan_semantics():
    """Regression (csrc/common/bn_math.h): ReLU's backward passes the gradient of a NaN output, as
    threshold_backward does, and the eval-mode dy = gamma * invstd * g does not read y, so a NaN y gives no NaN."""
    ops = torch.ops.deeplab_ops
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y[0, 1, 2, 3] = float("nan")
    z = torch.relu(y)
    dz = torch.randn_like(y)
    mean, invstd, gamma = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64) * 2, torch.rand(
        3, dtype=torch.float64) + 0.5
    dy = ops.bn_backward_dy(dz, z, y, mean, invstd, gamma, None, None, 40.0, True, False)
    expected = torch.ops.aten.threshold_backward(dz, z, 0) * (gamma * invstd).view(1, 3, 1, 1)
    assert torch.isfinite(dy).all()
    assert_close(dy, expected, "eval dy with a NaN input", 1e-12, 1e-12)
    assert dy[0, 1, 2, 3] == expected[0, 1, 2, 3] != 0


_STRIDED_1X1 = r"""
import torch, deeplab_ops
torch.manual_seed(0)
worst = 0.0
for c, (h, w), stride, padding, cl, need_x in [
        (8, (16, 16), (2, 2), 0, True, False), (8, (16, 21), (2, 3), 0, True, True),
        (3, (20, 20), (2, 1), 1, True, False), (5, (16, 16), (1, 2), 0, False, True),
        (2, (9, 8), (3, 2), 1, True, True)]:
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    wt, gamma, beta = torch.randn(2 * c, c, 1, 1, dtype=torch.float64), torch.rand(2 * c) + 0.5, torch.randn(2 * c)
    grads, g = [], None
    for backend, dtype in (("cpu", torch.float32), ("reference", torch.float64)):
        xx, ww = x.to(dtype).requires_grad_(need_x), wt.to(dtype).requires_grad_()
        y = deeplab_ops.conv_bn_relu(xx, ww, gamma.to(dtype), beta.to(dtype), None, None, stride=stride,
                                     padding=padding, relu=False, backend=backend)
        g = torch.randn(y.shape, dtype=torch.float64) if g is None else g
        y.backward(g.to(dtype))
        grads.append([t.detach().double() for t in (y, ww.grad, xx.grad if need_x else ww.grad)])
    for a, b in zip(*grads):
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
print(worst)
"""


def test_strided_1x1_with_few_input_channels_does_not_corrupt_memory():
    """oneDNN's weight gradient of a strided 1x1 convolution with 2-8 input channels corrupts the heap in PyTorch
    2.14 (eager too); the cpu backend computes it on the subsampled input instead. Run in a child process with
    glibc's heap checks on, so that a corruption fails this test rather than the suite, against the reference."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_CHECK_="3")
    done = subprocess.run([sys.executable, "-c", _STRIDED_1X1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"rc {done.returncode}: {done.stderr[-2000:]}"
    assert float(done.stdout.split()[-1]) < 1e-5, done.stdout


def _eager_cbr(x, w, gamma, beta, rm, rv, training, residual):
    y = torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x, w, padding=1), rm, rv, gamma, beta, training)
    return torch.relu(y if residual is None else y + residual)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_an_empty_batch_computes_what_eager_does(backend, training, residual):
    """N = 0 is a valid batch for conv2d and batch_norm: an empty output, zero gradients for the parameters, the
    running statistics unchanged (what eager computes), in training and eval, on every backend."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(3)
    w, gamma, beta = torch.randn(4, 3, 3, 3, generator=g), torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    results = []
    for fn in ("eager", "op"):
        leaves = [t.to(device, copy=True).requires_grad_() for t in (torch.randn(0, 3, 6, 5), w, gamma, beta)]
        res = torch.randn(0, 4, 6, 5, device=device, requires_grad=True) if residual else None
        stats = [rm.to(device, copy=True), rv.to(device, copy=True)]
        if fn == "eager":
            out = _eager_cbr(*leaves, *stats, training, res)
        else:
            out = deeplab_ops.conv_bn_relu(*leaves, *stats, padding=1, training=training, residual=res,
                                           backend=backend)
        grads = torch.autograd.grad(out.sum(), leaves + ([res] if residual else []))
        results.append((out, stats, grads))
    (out_e, stats_e, grads_e), (out_o, stats_o, grads_o) = results
    assert out_o.shape == out_e.shape == (0, 4, 6, 5)
    for a, b in zip(stats_o + list(grads_o), stats_e + list(grads_e), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(stats_o[0].cpu(), rm, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ASPP_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aspp_of_an_empty_batch_computes_what_eager_does(backend, training):
    """The fused ASPP module on N = 0 against torchvision's ASPP: an empty output, zero parameter gradients,
    running statistics unchanged, num_batches_tracked counted as eager counts it."""
    import copy

    from torchvision.models.segmentation.deeplabv3 import ASPP

    from deeplab_ops.nn import FusedASPP

    device = device_for(backend)
    torch.manual_seed(4)
    eager = ASPP(3, [1, 2], 4).to(device).train(training)
    eager.project[3] = torch.nn.Dropout(0.0)
    fused = FusedASPP(3, (1, 2), 4, backend=backend).to(device).train(training)
    fused.load_state_dict(eager.state_dict())
    fused.project[3] = torch.nn.Dropout(0.0)
    before = copy.deepcopy(eager.state_dict())
    outs = []
    for m in (eager, fused):
        x = torch.randn(0, 3, 5, 6, device=device, requires_grad=True)
        out = m(x)
        out.sum().backward()
        outs.append(out)
    assert outs[0].shape == outs[1].shape == (0, 4, 5, 6)
    for (name, a), b in zip(fused.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    for (name, a), b in zip(fused.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        if "running" in name:
            torch.testing.assert_close(a, before[name], rtol=0, atol=0, msg=name)


def _strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values in a view with other strides: every second element of a larger buffer, or (all equal) an
    expanded scalar."""
    if kind == "expanded":
        return t[:1].expand(t.shape[0])
    buf = torch.empty(2 * t.shape[0], dtype=t.dtype, device=t.device).fill_(float("nan"))
    buf[::2] = t
    return buf[::2]


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["slice", "expanded"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_strided_batchnorm_tensors_as_contiguous_ones(backend, training, kind, layout):
    """BatchNorm weight, bias and running statistics given as strided or expanded views compute what contiguous
    copies compute (forward, gradients, running statistics written back into the views), on every backend.
    (PyTorch's own CPU batch-norm backward gets channels_last with strided weights wrong: the reference works
    around it.)"""
    device = device_for(backend)
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(2, 3, 6, 5, generator=g).to(memory_format=layout), torch.randn(4, 3, 3, 3, generator=g)
    vecs = [torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g), torch.randn(4, generator=g),
            torch.rand(4, generator=g) + 0.5]
    if kind == "expanded":  # expanded views cannot be written: running statistics stay contiguous
        vecs[0].fill_(1.3), vecs[1].fill_(-0.2)
    results = []
    for strided in (False, True):
        leaves = [t.to(device, copy=True).requires_grad_() for t in (x, w)]
        gamma, beta, rm, rv = [t.to(device, copy=True) for t in vecs]
        if strided:
            gamma, beta = _strided(gamma, kind), _strided(beta, kind)
            if kind == "slice":
                rm, rv = _strided(rm, kind), _strided(rv, kind)
        leaves += [gamma.requires_grad_(), beta.requires_grad_()]  # (views of tensors without grad: leaves)
        out = deeplab_ops.conv_bn_relu(*leaves, rm, rv, padding=1, training=training, backend=backend)
        gen = torch.Generator().manual_seed(5)
        grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=gen).to(device))
        results.append((out, *grads, rm, rv))
    for a, b in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ASPP_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aspp_strided_batchnorm_tensors_as_contiguous_ones(backend, training):
    """The aspp op's concatenated BatchNorm tensors as strided views of larger buffers compute what contiguous
    ones compute: forward, gradients (x and the BatchNorm parameters), running statistics."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(8)
    c, rates = 3, (1, 2)
    k = (len(rates) + 3) * c
    x = torch.randn(2, 4, 5, 6, generator=g)
    cws = [torch.randn(c, 4, 1, 1, generator=g)] + [torch.randn(c, 4, 3, 3, generator=g) for _ in rates]
    pw, prw = torch.randn(c, 4, 1, 1, generator=g), torch.randn(c, (len(rates) + 2) * c, 1, 1, generator=g)
    vecs = [torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g), torch.randn(k, generator=g),
            torch.rand(k, generator=g) + 0.5]
    results = []
    for strided in (False, True):
        xs = x.to(device, copy=True).requires_grad_()  # (the pooling branch's 1x1 maps count as channels_last)
        bw, bb, rm, rv = [t.to(device, copy=True) for t in vecs]
        if strided:
            bw, bb, rm, rv = (_strided(t, "slice") for t in (bw, bb, rm, rv))
        bw.requires_grad_(), bb.requires_grad_()
        out = deeplab_ops.aspp(xs, [t.to(device) for t in cws], pw.to(device), prw.to(device), bw, bb, rm, rv,
                               rates=rates, training=training, backend=backend)
        gen = torch.Generator().manual_seed(5)
        grads = torch.autograd.grad(out, [xs, bw, bb], torch.randn(out.shape, generator=gen).to(device))
        results.append((out, *grads, rm, rv))
    for a, b in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

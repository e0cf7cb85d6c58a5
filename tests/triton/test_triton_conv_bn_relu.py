"""The triton backend of conv_bn_relu against the reference: forward, every gradient and the running statistics;
float64 gradcheck; opcheck; the padding-tap schedule; fp16/bf16 and TF32 where a GPU is visible.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) on CPU tensors,
which costs about a millisecond per tile operation: shapes are small and the matrix is chosen, not crossed.
The cases are the foundation's (tests/test_conv_bn_relu.py's MATRIX), so every backend answers the same matrix.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CUDA,
    HALF_PARAMS,
    TRITON_DEVICE,
    Case,
    assert_close,
    make_inputs,
    needs_triton,
    run_and_compare,
    triton_test,
)
from test_conv_bn_relu import MATRIX as FOUNDATION_MATRIX

import deeplab_ops
from deeplab_ops import backends, reference

DEVICE = TRITON_DEVICE  # CUDA tensors where a GPU is visible, else CPU tensors in the interpreter
ops = torch.ops.deeplab_ops
import deeplab_ops.triton.conv_bn_relu as triton_cbr  # noqa: E402  (triton is a requirement: fail, never skip)

pytestmark = [pytest.mark.usefixtures("no_tf32"), pytest.mark.gpu, needs_triton]


# The foundation's matrix (tests/test_conv_bn_relu.py: kernels 1x1 and 3x3, dilation 1-18 with padding =
# dilation, stride 2, 1x1 to 33x33 maps, batch 1-4, channels 1-64, residual, relu, eval, both layouts), in float32
# and float64, plus cases it does not reach: two 16-wide channel blocks in both GEMM dimensions of a 3x3
# conv, stride with dilation, and maps of several 16x16 interpreter tiles where whole tiles skip taps.
EXTRA = [
    Case(1, 1, 1, 2, 1, k=1, residual=True),
    Case(2, 20, 5, 6, 18, residual=True),
    Case(2, 6, 12, 11, 8, stride=2, dilation=2, channels_last=True, residual=True),
    Case(2, 2, 17, 13, 2, dilation=6, stride=2, training=False),
    Case(1, 3, 20, 18, 4, dilation=12, residual=True, channels_last=True),
]


@pytest.mark.parametrize("case", FOUNDATION_MATRIX + EXTRA, ids=str)
def test_triton_matches_reference_float32(case):
    run_and_compare(case, "triton", torch.float32, DEVICE)


@pytest.mark.parametrize("case", FOUNDATION_MATRIX, ids=str)
def test_triton_matches_reference_float64(case):
    run_and_compare(case, "triton", torch.float64, DEVICE)


@pytest.mark.parametrize(
    "case", [Case(2, 2, 4, 3, 2, dilation=2, residual=True), Case(1, 2, 4, 4, 3, stride=2, training=False),
             Case(2, 3, 3, 2, 2, k=1, relu=False, channels_last=True)], ids=str,
)
def test_triton_gradcheck(case):
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64, DEVICE)
    inputs = [t.requires_grad_() for t in (x, w, g, b)] + ([res.requires_grad_()] if res is not None else [])

    def f(x, w, g, b, *res):
        return deeplab_ops.conv_bn_relu(
            x, w, g, b, rm.clone(), rv.clone(), stride=case.stride, padding=case.pad, dilation=case.dilation,
            training=case.training, residual=res[0] if res else None, relu=case.relu, backend="triton",
        )

    # fast_mode: a random projection of the Jacobian, a handful of interpreted launches instead of hundreds.
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_triton_opcheck():
    case = Case(2, 3, 5, 6, 4, dilation=2, residual=True, channels_last=True)
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float32, DEVICE)
    for t in (x, w, g, b, res):
        t.requires_grad_()
    args = (x, w, g, b, rm, rv, [1, 1], [2, 2], [2, 2], True, 0.1, 1e-5, res, True)
    torch.library.opcheck(ops.triton_conv_bn_relu_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_no_output_aliases_an_input():
    case = Case(2, 3, 5, 5, 4, training=False)
    x, w, g, b, rm, rv, _ = make_inputs(case, torch.float32, DEVICE)
    outs = ops.triton_conv_bn_relu_forward(x, w, g, b, rm, rv, [1, 1], [1, 1], [1, 1], False, 0.1, 1e-5, None, True)
    storages = {t.untyped_storage().data_ptr() for t in (x, w, g, b, rm, rv)}
    assert all(o.numel() == 0 or o.untyped_storage().data_ptr() not in storages for o in outs)
    assert_close(outs[2], rm, "eval save_mean", 0, 0)
    assert_close(outs[3], (rv.double() + 1e-5).rsqrt(), "eval save_invstd", 1e-6, 1e-6)


def test_large_mean_small_spread_keeps_its_variance():
    """Conv outputs with mean 1e4 and std 0.1 in float32: the tile partials are centred and merged with Chan's
    formula, so the variance survives (E[y^2] - E[y]^2 would return noise)."""
    n, c, h, w = 3, 4, 9, 11
    x = (1e4 + 0.1 * torch.randn(n, c, h, w, device=DEVICE)).contiguous(memory_format=torch.channels_last)
    weight = torch.eye(c, device=DEVICE).view(c, c, 1, 1)
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    rm64, rv64 = rm.double(), rv.double()
    out = deeplab_ops.conv_bn_relu(x, weight, gamma, beta, rm, rv, relu=False, backend="triton")
    expected = reference.conv_bn_relu(x.double(), weight.double(), gamma.double(), beta.double(), rm64, rv64,
                                      relu=False)
    assert_close(out, expected, "normalized output", atol=2e-2, rtol=0)
    assert_close(rv, rv64, "running_var", atol=0, rtol=1e-3)


def test_tile_statistics_correct_their_rounded_mean():
    """A mean 10^4 times the spread (100 and 0.01, float32): a tile's first-pass mean is off by a sum's rounding
    (~5e-5, half a percent of the spread), and centring on it alone inflated M2 (the variance 1.5e-4 off, relative,
    where eager's CPU BatchNorm is 1e-7 off); the corrected two-pass form (conv_engine._tile_stats; bn_finalize's
    block merge: test_finalize_corrects_its_block_mean) takes that out: within 5e-5 over these seeds (2.2e-5; up to
    5.5e-5 over others), the rest the float32 tile means' own rounding."""
    worst = 0.0
    for seed in range(4):
        torch.manual_seed(seed)
        x = (torch.randn(2, 4, 13, 17) * 0.01 + 100.0).to(DEVICE)
        weight = torch.eye(4, device=DEVICE).view(4, 4, 1, 1)  # the conv output is exactly x
        rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
        deeplab_ops.conv_bn_relu(x, weight, None, None, rm, rv, momentum=1.0, relu=False, backend="triton")
        var = x.double().var(dim=(0, 2, 3))
        worst = max(worst, ((rv.double() - var) / var).abs().max().item())
        assert_close(rm, x.double().mean(dim=(0, 2, 3)), "running_mean", atol=0, rtol=1e-7)
    assert worst < 5e-5, worst


def test_finalize_corrects_its_block_mean():
    """bn_finalize merges a block of partials around their weighted mean, itself a float32 sum's rounding off (32
    partial means of 1000 +- 0.01): centred on it alone, the between-partial term gained nb * (error)^2 (the running
    variance 1e-4 off, relative); the corrected form (bn_kernels._corrected) takes it out (2e-7 here). One block:
    32 partials, the interpreter's BLOCK_P and under a GPU's 64."""
    from deeplab_ops.triton import bn_kernels

    worst = 0.0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        count = torch.full((32,), 64.0)
        pmean = 1e3 + torch.randn(32, 4, generator=g) * 0.01
        pm2 = torch.rand(32, 4, generator=g) * 64 * 0.01**2
        out = bn_kernels.bn_finalize(count.to(DEVICE), pmean.to(DEVICE), pm2.to(DEVICE), None, None,
                                     torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), 1.0, 1e-5)
        mean = pmean.double().mean(0)
        var = (pm2.double().sum(0) + (64 * (pmean.double() - mean) ** 2).sum(0)) / (64 * 32 - 1)
        worst = max(worst, ((out[5].double().cpu() - var) / var).abs().max().item())
    assert worst < 2e-6, worst


def test_relu_propagates_nan():
    case = Case(2, 3, 5, 4, 3, k=1, training=False)
    x, w, g, b, rm, rv, _ = make_inputs(case, torch.float32, DEVICE)
    x[0, :, 1, 2] = float("nan")
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, training=False, backend="triton")
    expected = reference.conv_bn_relu(x, w, g, b, rm, rv, training=False)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()


def test_support_reasons():
    x, w = torch.randn(1, 2, 5, 5, device=DEVICE), torch.randn(3, 2, 3, 3, device=DEVICE)
    call = dict(x=x, weight=w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), training=True, residual=None)
    assert backends.not_supported_reasons("triton", "conv_bn_relu", x.device, **call) == []
    if not CUDA:  # the interpreter: bfloat16 refused (stored as raw bits), float16 runs (Triton >= 3.6)
        half = dict(call, x=x.bfloat16(), weight=w.bfloat16())
        assert any("interpreter" in r for r in backends.not_supported_reasons("triton", "conv_bn_relu", x.device,
                                                                                 **half))
        fp16 = dict(call, x=x.half(), weight=w.half())
        assert backends.not_supported_reasons("triton", "conv_bn_relu", x.device, **fp16) == []


def test_import_is_light():
    """Importing deeplab_ops imports no triton and queries no device; the kernels load on the first call."""
    import subprocess
    import sys

    code = "import sys, deeplab_ops; assert 'triton' not in sys.modules, 'triton imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True)


# The AOT compiles for sm_80 / sm_90 and the configuration lists: tests/test_triton_compile.py.


# ---- padding-tap skipping ---------------------------------------------------------------------------------


def _geometric_pairs(h, w, k, rate, block_h, block_w, dgrad=False):
    """(tile, tap) pairs that touch at least one real input pixel, from every pixel's coordinates (3x3, stride 1,
    padding = dilation = rate, so the output is h x w). dgrad tiles the input and asks whether any output pixel
    reaches the tile through the tap: the same sets, seen from the other side."""
    computed = dense = 0
    for r0 in range(0, h, block_h):
        for c0 in range(0, w, block_w):
            for i in range(k):
                for j in range(k):
                    dense += 1
                    sign = -1 if dgrad else 1
                    rows = any(0 <= r + sign * (i * rate - rate) < h for r in range(r0, min(r0 + block_h, h)))
                    cols = any(0 <= c + sign * (j * rate - rate) < w for c in range(c0, min(c0 + block_w, w)))
                    computed += rows and cols
    return computed, dense


@pytest.mark.parametrize("rate,fraction", [(6, 0.77), (12, 0.57), (18, 0.41)])
def test_padding_tap_schedule_33x33(rate, fraction):
    shape, wshape = (1, 1, 33, 33), (1, 1, 3, 3)
    geo = ((1, 1), (rate, rate), (rate, rate))
    # Per-pixel tiles: the valid-tap fraction (benchmarks/results/README.md), exactly ((33 + 2 (33 - rate)) / 99)^2
    # per axis pair (rate 18: 63^2/99^2 = 0.40496).
    computed, dense = triton_cbr.schedule(shape, wshape, *geo, 1, 1)
    assert dense == 33 * 33 * 9 and computed == (33 + 2 * (33 - rate)) ** 2
    assert abs(computed / dense - fraction) < 0.0051
    for block_h, block_w in ((8, 8), (8, 16), (4, 4)):
        for pass_ in ("forward", "wgrad", "dgrad"):
            got = triton_cbr.schedule(shape, wshape, *geo, block_h, block_w, pass_)
            assert got == _geometric_pairs(33, 33, 3, rate, block_h, block_w, pass_ == "dgrad"), (block_h, block_w)
            assert got[0] / got[1] >= computed / dense  # whole tiles skip less than single pixels can
    # The kernels compute exactly the scheduled pairs (counted by the kernels themselves).
    x, weight = torch.randn(shape, device=DEVICE), torch.randn(wshape, device=DEVICE)
    counted = triton_cbr.count_computed_pairs(x, weight, *geo, 8, 16)
    for pass_, count in counted.items():
        computed, dense = triton_cbr.schedule(shape, wshape, *geo, 8, 16, pass_)
        assert count == computed < dense, (pass_, count, computed, dense)


def test_schedule_stride_2_matches_the_kernels():
    shape, wshape, geo = (2, 1, 13, 11), (1, 1, 3, 3), ((2, 2), (4, 4), (4, 4))
    x, weight = torch.randn(shape, device=DEVICE), torch.randn(wshape, device=DEVICE)
    counted = triton_cbr.count_computed_pairs(x, weight, *geo, 4, 4)
    assert counted == {p: triton_cbr.schedule(shape, wshape, *geo, 4, 4, p)[0] for p in counted}


# ---- half types (float16 in the interpreter too: common.interpreter_dtype_refusal) and TF32 -----------------

GPU_CASES = [Case(2, 32, 17, 15, 48, dilation=2, residual=True), Case(4, 64, 33, 33, 64, dilation=12),
             Case(2, 24, 16, 16, 40, k=1, stride=2, channels_last=True), Case(2, 16, 13, 13, 16, training=False)]


def _run_all(case, dtype, backend, x, w, g, b, rm, rv, res, grad_out, mask=None):
    # Activations and conv weight in `dtype`; BatchNorm parameters and statistics in float32 (fp64 for fp64),
    # as nn.BatchNorm2d keeps them under autocast. `mask` (the float64 reference only): the ReLU passes exactly
    # where it is true, instead of where the float64 output is positive.
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = [t.detach().to(d).requires_grad_() if t is not None else None
              for t, d in zip((x, w, g, b, res), (dtype, dtype, stat, stat, dtype), strict=True)]
    rm, rv = rm.to(stat, copy=True), rv.to(stat, copy=True)  # each run updates its own (float32 inputs: no alias)
    kw = dict(stride=case.stride, padding=case.pad, dilation=case.dilation, training=case.training, relu=case.relu)
    if backend == "reference" and mask is not None:
        z = reference.conv_bn_relu(*inputs[:4], rm, rv, residual=inputs[4], **dict(kw, relu=False))
        out = torch.where(mask, z, 0.0) if case.relu else z
    elif backend == "reference":
        out = reference.conv_bn_relu(*inputs[:4], rm, rv, residual=inputs[4], **kw)
    else:
        out = deeplab_ops.conv_bn_relu(*inputs[:4], rm, rv, residual=inputs[4], backend=backend, **kw)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out.to(dtype))
    return [out.double(), rm.double(), rv.double()] + [gr.double() for gr in grads]


@triton_test
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if not CUDA and c.cin * c.h * c.w > 50_000
                                  else c for c in GPU_CASES], ids=str)  # (the interpreter: 77 s for 4x64x33x33)
@pytest.mark.parametrize("dtype", HALF_PARAMS, ids=str)
def test_half_error_within_twice_the_reference_error(case, dtype):
    """Each half run's error against float64: the output and running statistics against the float64 reference; the
    gradients against the float64 reference whose ReLU passes where that run's half output is positive. A ReLU
    output near zero takes either sign with the rounding of its half inputs, and where a run's sign differs from
    float64's (in a 2x48x17x15 output, in most draws one of the two runs), its gradient there is off by the whole
    upstream gradient: the largest error would measure the draw's near-zero outputs, not the arithmetic. (Checked
    on CPU with float16 under the interpreter, 26 draws: the flips fall on either side alike; compared so, in 14
    draws the fused grad x error is 0.4-0.6x the reference's, every gradient at most 1.12x.) A backward that used
    another mask than its forward's output still fails here, and the output comparison sees a forward whose ReLU is
    wrong."""
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64, TRITON_DEVICE)
    grad_out = torch.randn(_out_shape(case), device=TRITON_DEVICE, dtype=torch.float64)
    exact = _run_all(case, torch.float64, "reference", x, w, g, b, rm, rv, res, grad_out)
    ref_half = _run_all(case, dtype, "reference", x, w, g, b, rm, rv, res, grad_out)
    ours = _run_all(case, dtype, "triton", x, w, g, b, rm, rv, res, grad_out)
    exact_ref, exact_ours = (_run_all(case, torch.float64, "reference", x, w, g, b, rm, rv, res, grad_out,
                                      mask=run[0] > 0) for run in (ref_half, ours))
    names = ["out", "running_mean", "running_var", "grad x", "grad weight", "grad bn_weight", "grad bn_bias",
             "grad residual"]
    for i, (name, r, o) in enumerate(zip(names, ref_half, ours, strict=False)):
        e_r, e_o = (exact[i], exact[i]) if i < 3 else (exact_ref[i], exact_ours[i])
        ref_err = (r - e_r).abs().max().item()
        our_err = (o - e_o).abs().max().item()
        assert our_err <= 2 * ref_err + 1e-6 * e_r.abs().max().item(), (
            f"[{case}] {dtype} {name}: triton error {our_err:.3g} > 2x the reference-in-{dtype} error {ref_err:.3g}"
        )


def _out_shape(case):
    ho = (case.h + 2 * case.pad - case.dilation * (case.k - 1) - 1) // case.stride + 1
    wo = (case.w + 2 * case.pad - case.dilation * (case.k - 1) - 1) // case.stride + 1
    return (case.n, case.cout, ho, wo)


# torch >= 2.9: per-backend float32 precision settings (torch.backends.cudnn.conv.fp32_precision, ...); before it
# only the legacy flag exists (deeplab_ops reads the new one where it exists).
NEW_PRECISION_API = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


@pytest.fixture
def cudnn_precision():
    """Restores cuDNN's float32 settings (legacy flag and, where it exists, the fp32_precision API) after a test
    changes them."""
    cudnn = torch.backends.cudnn
    if not NEW_PRECISION_API:
        saved = cudnn.allow_tf32
        yield
        cudnn.allow_tf32 = saved
        return
    saved = (cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision,
             torch.backends.fp32_precision)
    yield
    torch.backends.fp32_precision = saved[3]
    cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[:3]


def _fp32_dot():
    from deeplab_ops.triton.conv_engine import dot_precision

    return dot_precision(torch.float32, torch.device("cuda"))


def test_dot_precision_follows_cudnns_legacy_flag(cudnn_precision):
    """float32 GEMMs use TF32 exactly where cuDNN's convolutions may: torch.backends.cudnn.allow_tf32."""
    from deeplab_ops.triton.conv_engine import dot_precision

    cuda = torch.device("cuda")
    cudnn = torch.backends.cudnn
    cudnn.allow_tf32 = True
    assert _fp32_dot() == "tf32" and dot_precision(torch.float64, cuda) == "fma"
    assert dot_precision(torch.float32, torch.device("cpu")) == "ieee" == dot_precision(torch.bfloat16, cuda)
    cudnn.allow_tf32 = False
    assert _fp32_dot() == "ieee"


@pytest.mark.skipif(not NEW_PRECISION_API, reason=f"torch {torch.__version__} has no fp32_precision settings "
                    "(torch >= 2.9): only the legacy flag, tested above, can set cuDNN's float32 precision")
def test_dot_precision_follows_cudnns_fp32_precision_settings(cudnn_precision):
    """... and whichever fp32_precision setting set it (conv alone, cuDNN's, the global one), with which reading the
    legacy flag raises."""
    fp32 = _fp32_dot
    cudnn = torch.backends.cudnn
    cudnn.allow_tf32 = True
    cudnn.conv.fp32_precision = "ieee"  # conv and RNN now differ: torch.backends.cudnn.allow_tf32 raises
    assert fp32() == "ieee"
    cudnn.conv.fp32_precision = "tf32"
    assert fp32() == "tf32"
    cudnn.conv.fp32_precision = "none"  # inherits cuDNN's, then the global setting
    cudnn.fp32_precision = "tf32"
    assert fp32() == "tf32"
    cudnn.fp32_precision = "none"
    torch.backends.fp32_precision = "ieee"
    assert fp32() == "ieee"


@pytest.mark.skipif(not CUDA, reason="TF32 needs a GPU")
@pytest.mark.parametrize("case", GPU_CASES[:2], ids=str)
def test_tf32_follows_cudnn_allow_tf32(case, cudnn_precision):
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float32, "cuda")
    grad_out = torch.randn(_out_shape(case), device="cuda", dtype=torch.float64)
    exact = _run_all(case, torch.float64, "reference", x, w, g, b, rm, rv, res, grad_out)
    torch.backends.cudnn.allow_tf32 = True
    ref_tf32 = _run_all(case, torch.float32, "reference", x, w, g, b, rm, rv, res, grad_out)
    ours_tf32 = _run_all(case, torch.float32, "triton", x, w, g, b, rm, rv, res, grad_out)
    if NEW_PRECISION_API:
        torch.backends.cudnn.conv.fp32_precision = "ieee"  # the new API (the legacy flag then raises when read)
    else:
        torch.backends.cudnn.allow_tf32 = False
    ours_ieee = _run_all(case, torch.float32, "triton", x, w, g, b, rm, rv, res, grad_out)
    for i, (e, r, t, f) in enumerate(zip(exact, ref_tf32, ours_tf32, ours_ieee, strict=False)):
        scale = max(e.abs().max().item(), 1.0)
        # TF32's error: at most twice cuDNN's with TF32 allowed, or TF32's own rounding scale where cuDNN's
        # heuristics picked a non-TF32 kernel for some pass (then its error is float32's)
        assert (t - e).abs().max().item() <= max(2 * (r - e).abs().max().item(), 4e-3 * scale), f"tf32 output {i}"
        assert (f - e).abs().max().item() <= 2e-4 * scale, f"fp32_precision='ieee': float32 accuracy, output {i}"


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_auto_picks_triton_on_cuda():
    run_and_compare(Case(2, 3, 5, 5, 4), None, torch.float32, "cuda")
    x, w = torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(3, 2, 3, 3, device="cuda")
    assert backends.resolve(None, "conv_bn_relu", x.device, x=x, weight=w, stride=(1, 1), padding=(1, 1),
                            dilation=(1, 1), training=True, residual=None) == "triton"

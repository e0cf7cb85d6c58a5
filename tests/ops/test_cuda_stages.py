"""The CUDA BatchNorm-stage kernels (csrc/cuda/bn_reductions.cu, bn_finalize.cu, bn_elementwise.cu) against
deeplab_ops.reference and the CPU kernels.

GPU-only: every test is skipped where no CUDA device is visible. Shapes are odd on purpose: planes whose
length is not a multiple of the 128-bit pack (33x33), single values per plane, one channel, tiny and
multi-block reductions, and inputs whose data pointer is not 16-byte aligned (scalar fallback paths).
"""

from __future__ import annotations

import pytest
import torch

import deeplab_ops  # noqa: F401  (loads the extension, which registers the ops)
from deeplab_ops import reference

_ops = torch.ops.deeplab_ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA stage kernels need a CUDA device, and none is visible"
)]

STAGE_OPS = ["bn_stats", "bn_finalize", "bn_apply", "bn_backward_reduce", "bn_backward_dy",
             "conv_bn_relu_forward", "conv_bn_relu_backward", "conv_bn_relu_eval"]

# (dtype, stat_rtol, out_atol, out_rtol). Statistics and sums accumulate in float32 (float64 for float64)
# whatever the input dtype, so their tolerance does not depend on it; 16-bit outputs computed in float32 may
# round differently from the float64 reference by one unit in the last place.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-11, 1e-12, 1e-12, id="fp64"),
    pytest.param(torch.float16, 1e-5, 1e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 8e-3, 1.6e-2, id="bf16"),
]
SHAPES = [(3, 5, 7, 9), (1, 64, 33, 33), (4, 1, 1, 2), (2, 3, 1, 5), (16, 8, 1, 1), (64, 4, 7, 7), (2, 3, 256, 257)]
LAYOUTS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="nhwc")]
CUDA = "cuda"
C4 = (1, -1, 1, 1)


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activation(shape, dtype, layout, mean: float = 0.0, std: float = 1.0, unaligned: bool = False) -> torch.Tensor:
    """Fresh random values, drawn in float64 on the CPU (reproducible), in `layout` on the GPU. `unaligned`:
    a view one element into its storage, so that the data pointer is not 16-byte aligned."""
    n, c, h, w = shape
    v = torch.randn(shape, dtype=torch.float64) * std + mean
    v = v.to(dtype)
    if not unaligned:
        return v.to(CUDA).contiguous(memory_format=layout)
    storage = torch.empty(v.numel() + 1, dtype=dtype, device=CUDA)
    if layout == torch.channels_last:
        t = storage[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        t = storage[1:].view(n, c, h, w)
    t.copy_(v)
    assert t.is_contiguous(memory_format=layout) and t.data_ptr() % 16 != 0
    return t


def channel(c: int, dtype: torch.dtype, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    return (torch.rand(c, dtype=torch.float64) * (high - low) + low).to(dtype).to(CUDA)


def check(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float, scale=None) -> None:
    """assert_close with atol relative to `scale` (default: the largest expected magnitude, at least 1)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is None:
        finite = expected[torch.isfinite(expected)]
        scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, atol=atol * scale, rtol=rtol, equal_nan=True,
        msg=lambda m: f"{what} (atol {atol}*{scale:.3g}, rtol {rtol}):\n{m}",
    )


def finalize(count, mean, m2, rm, rv, momentum, eps):
    """bn_finalize on (P, C) partials into fresh buffers, then the running statistics copied back in place: the
    in-place contract of reference.bn_finalize, to compare with it."""
    c = mean.shape[1]
    save_mean, save_invstd = mean.new_empty(c), mean.new_empty(c)
    new_rm = torch.empty_like(rm) if rm is not None else mean.new_empty(0)
    new_rv = torch.empty_like(rv) if rv is not None else mean.new_empty(0)
    _ops.bn_finalize(mean, m2, count, 0.0, rm, rv, momentum, eps, save_mean, save_invstd, new_rm, new_rv)
    if rm is not None:
        rm.copy_(new_rm)
        rv.copy_(new_rv)
    return save_mean, save_invstd


def assert_layout(t: torch.Tensor, layout, what: str) -> None:
    assert t.is_contiguous(memory_format=layout), f"{what}: expected {layout}, got strides {t.stride()}"


def test_cuda_kernels_registered():
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [op for op in STAGE_OPS if not has_kernel(f"deeplab_ops::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}: the extension was built without its CUDA sources"


# ---- bn_stats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,stat_rtol,out_atol,out_rtol", DTYPES)
def test_bn_stats(shape, layout, dtype, stat_rtol, out_atol, out_rtol):
    y = activation(shape, dtype, layout, mean=0.5)
    mean, m2 = _ops.bn_stats(y)
    assert mean.dtype == m2.dtype == opmath(dtype) and mean.device == y.device
    ref_mean, ref_m2 = reference.bn_stats(y)
    check(mean, ref_mean, f"bn_stats mean {shape}", stat_rtol, stat_rtol)
    check(m2, ref_m2, f"bn_stats m2 {shape}", stat_rtol, stat_rtol)
    cpu_mean, cpu_m2 = _ops.bn_stats(y.cpu())
    check(mean, cpu_mean, f"bn_stats mean vs cpu {shape}", stat_rtol, stat_rtol)
    check(m2, cpu_m2, f"bn_stats m2 vs cpu {shape}", stat_rtol, stat_rtol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_stats_large_mean_small_spread(layout):
    # mean 1e4, std 0.1 in float32: E[y^2] - E[y]^2 would cancel to noise; Welford/Chan keeps the variance.
    y = activation((4, 8, 33, 33), torch.float32, layout, mean=1e4, std=0.1)
    mean, m2 = _ops.bn_stats(y)
    ref_mean, ref_m2 = reference.bn_stats(y)
    n = 4 * 33 * 33
    check(mean, ref_mean, "bn_stats mean (mean 1e4)", 3e-7, 3e-7)
    check(m2 / n, ref_m2 / n, "bn_stats variance (mean 1e4, std 0.1)", 0.0, 1e-3, scale=1.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_stats_deterministic(layout, dtype):
    y = activation((8, 16, 65, 65), dtype, layout)
    first = _ops.bn_stats(y)
    for _ in range(3):
        again = _ops.bn_stats(y)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), "bn_stats is not bitwise reproducible"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 5)], ids=str)
def test_bn_stats_empty(shape, layout):
    y = torch.empty(shape, device=CUDA).contiguous(memory_format=layout)
    mean, m2 = _ops.bn_stats(y)
    assert mean.shape == m2.shape == (3,)
    assert torch.isnan(mean).all() and (m2 == 0).all()
    sum_g, sum_gx = _ops.bn_backward_reduce(y, y, y, torch.zeros(3, device=CUDA), torch.ones(3, device=CUDA), True)
    assert (sum_g == 0).all() and (sum_gx == 0).all()


# ---- bn_finalize ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("running", [True, False], ids=["running", "no-running"])
@pytest.mark.parametrize("parts", [1, 3, 70])
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64])
def test_bn_finalize(stat_dtype, parts, running):
    c, momentum, eps = 37, 0.1, 1e-5
    count = torch.randint(1, 500, (parts,), dtype=torch.float64).to(stat_dtype).to(CUDA)
    mean = (torch.randn(parts, c, dtype=torch.float64) + 2.0).to(stat_dtype).to(CUDA)
    m2 = (torch.rand(parts, c, dtype=torch.float64) * count.double().cpu()[:, None]).to(stat_dtype).to(CUDA)
    rm = channel(c, torch.float32) if running else None
    rv = channel(c, torch.float32, 0.5, 1.5) if running else None
    rm_ref = rm.double() if running else None
    rv_ref = rv.double() if running else None
    rm_cpu = rm.cpu() if running else None
    rv_cpu = rv.cpu() if running else None
    save_mean, save_invstd = finalize(count, mean, m2, rm, rv, momentum, eps)
    assert save_mean.dtype == save_invstd.dtype == stat_dtype
    ref_mean, ref_invstd = reference.bn_finalize(count, mean, m2, rm_ref, rv_ref, momentum, eps)
    tol = 1e-12 if stat_dtype == torch.float64 else 1e-6
    check(save_mean, ref_mean, "bn_finalize mean", tol, tol)
    check(save_invstd, ref_invstd, "bn_finalize invstd", tol, tol)
    cpu_mean, cpu_invstd = finalize(count.cpu(), mean.cpu(), m2.cpu(), rm_cpu, rv_cpu, momentum, eps)
    # Same double-precision math; only the GPU's fused multiply-adds may move the last bit.
    check(save_mean, cpu_mean, "bn_finalize mean vs cpu", tol, tol)
    check(save_invstd, cpu_invstd, "bn_finalize invstd vs cpu", tol, tol)
    if running:
        assert rm.dtype == rv.dtype == torch.float32
        check(rm, rm_ref, "running_mean", 1e-6, 1e-6)
        check(rv, rv_ref, "running_var", 1e-6, 1e-6)
        check(rm, rm_cpu, "running_mean vs cpu", 1e-6, 1e-6)
        check(rv, rv_cpu, "running_var vs cpu", 1e-6, 1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_then_finalize_update_running(layout):
    # The composite's path: bn_stats -> one partial -> bn_finalize updates the buffers like F.batch_norm.
    y = activation((3, 6, 17, 19), torch.float32, layout, mean=3.0, std=2.0)
    n = 3 * 17 * 19
    mean, m2 = _ops.bn_stats(y)
    rm, rv = channel(6, torch.float32), channel(6, torch.float32, 0.5, 1.5)
    rm_bn, rv_bn = rm.double(), rv.double()
    save_mean, save_invstd = torch.empty_like(mean), torch.empty_like(mean)
    new_rm, new_rv = torch.empty_like(rm), torch.empty_like(rv)
    _ops.bn_finalize(mean, m2, None, float(n), rm, rv, 0.1, 1e-5, save_mean, save_invstd, new_rm, new_rv)
    rm, rv = new_rm, new_rv
    torch.nn.functional.batch_norm(y.double(), rm_bn, rv_bn, None, None, True, 0.1, 1e-5)
    check(rm, rm_bn, "running_mean vs F.batch_norm", 1e-5, 1e-5)
    check(rv, rv_bn, "running_var vs F.batch_norm", 1e-5, 1e-5)
    var = y.double().var((0, 2, 3), unbiased=False)
    check(save_invstd, (var + 1e-5).rsqrt(), "invstd", 1e-5, 1e-5)


# ---- bn_apply -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,stat_rtol,out_atol,out_rtol", DTYPES)
def test_bn_apply(shape, layout, residual, relu, dtype, stat_rtol, out_atol, out_rtol):
    c = shape[1]
    y = activation(shape, dtype, layout, mean=0.3)
    r = activation(shape, dtype, layout) if residual else None
    st = opmath(dtype)
    mean, invstd, weight, shift = channel(c, st), channel(c, st, 0.5, 2.0), channel(c, st, 0.5, 1.5), channel(c, st)
    scale = invstd * weight  # the kernel's per-channel scale, in the opmath dtype
    out = _ops.bn_apply(y, mean, invstd, weight, shift, r, relu)
    assert out.dtype == dtype and out.shape == y.shape
    assert_layout(out, layout, "bn_apply output")
    check(out, reference.bn_apply(y, mean, scale, shift, r, relu), f"bn_apply {shape}", out_atol, out_rtol)
    cpu = _ops.bn_apply(y.cpu(), mean.cpu(), invstd.cpu(), weight.cpu(), shift.cpu(), None if r is None else r.cpu(),
                        relu)
    check(out, cpu, f"bn_apply vs cpu {shape}", out_atol, out_rtol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_apply_propagates_nan(layout):
    y = activation((2, 8, 5, 5), torch.float32, layout)
    y[0, 3, 2, 2] = float("nan")
    y[1, 5, 0, 4] = float("nan")
    v = channel(8, torch.float32)
    out = _ops.bn_apply(y, v, v, None, v, None, True)
    assert torch.equal(torch.isnan(out), torch.isnan(y)), "ReLU must propagate NaN, as torch.relu does"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_apply_empty(layout):
    y = torch.empty((0, 4, 3, 3), device=CUDA).contiguous(memory_format=layout)
    v = channel(4, torch.float32)
    out = _ops.bn_apply(y, v, v, v, v, None, True)
    assert out.shape == y.shape


# ---- backward ---------------------------------------------------------------------------------------------


def backward_inputs(shape, dtype, layout, relu, unaligned=False):
    """y, z = act(BN(y)), a random grad_out, and the (mean, invstd) of y in the opmath dtype."""
    c = shape[1]
    y = activation(shape, dtype, layout, mean=0.7, std=1.5, unaligned=unaligned)
    st = opmath(dtype)
    ref_mean, ref_m2 = reference.bn_stats(y)
    count = y.numel() // c
    mean = ref_mean.to(st)
    invstd = (ref_m2 / count + 1e-5).rsqrt().to(st)
    z = reference.bn_apply(y, mean, invstd * channel(c, st, 0.5, 1.5), channel(c, st), None, relu)
    z = z.contiguous(memory_format=layout)
    dz = activation(shape, dtype, layout, unaligned=unaligned)
    return dz, z, y, mean, invstd


def reduce_scales(dz, z, y, mean, invstd, relu):
    g = reference.act_grad(dz, z, relu)
    xhat = (y.double() - mean.double().view(C4)) * invstd.double().view(C4)
    return g.abs().sum((0, 2, 3)).max().item(), (g * xhat).abs().sum((0, 2, 3)).max().item()


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,stat_rtol,out_atol,out_rtol", DTYPES)
def test_bn_backward_reduce(shape, layout, relu, dtype, stat_rtol, out_atol, out_rtol):
    dz, z, y, mean, invstd = backward_inputs(shape, dtype, layout, relu)
    sum_g, sum_gx = _ops.bn_backward_reduce(dz, z, y, mean, invstd, relu)
    assert sum_g.dtype == sum_gx.dtype == opmath(dtype)
    ref_g, ref_gx = reference.bn_backward_reduce(dz, z, y, mean, invstd, relu)
    # Sums cancel: compare against the size of the summed terms, not of the result.
    sg, sgx = reduce_scales(dz, z, y, mean, invstd, relu)
    check(sum_g, ref_g, f"sum_g {shape}", stat_rtol, stat_rtol, scale=max(sg, 1.0))
    check(sum_gx, ref_gx, f"sum_g_xhat {shape}", stat_rtol, stat_rtol, scale=max(sgx, 1.0))
    cpu_g, cpu_gx = _ops.bn_backward_reduce(dz.cpu(), z.cpu(), y.cpu(), mean.cpu(), invstd.cpu(), relu)
    check(sum_g, cpu_g, f"sum_g vs cpu {shape}", stat_rtol, stat_rtol, scale=max(sg, 1.0))
    check(sum_gx, cpu_gx, f"sum_g_xhat vs cpu {shape}", stat_rtol, stat_rtol, scale=max(sgx, 1.0))


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,stat_rtol,out_atol,out_rtol", DTYPES)
def test_bn_backward_dy(shape, layout, relu, training, weight, dtype, stat_rtol, out_atol, out_rtol):
    c = shape[1]
    dz, z, y, mean, invstd = backward_inputs(shape, dtype, layout, relu)
    st = opmath(dtype)
    gamma = channel(c, st, 0.5, 1.5) if weight else None
    sum_g, sum_gx = reference.bn_backward_reduce(dz, z, y, mean, invstd, relu)
    sum_g, sum_gx = (sum_g.to(st), sum_gx.to(st)) if training else (None, None)
    count = float(y.numel() // c)
    dy = _ops.bn_backward_dy(dz, z, y, mean, invstd, gamma, sum_g, sum_gx, count, relu, training)
    assert dy.dtype == dtype and dy.shape == y.shape
    assert_layout(dy, layout, "bn_backward_dy output")
    ref = reference.bn_backward_dy(dz, z, y, mean, invstd, gamma, sum_g, sum_gx, count, relu, training)
    check(dy, ref, f"bn_backward_dy {shape}", out_atol, out_rtol)
    cpu_args = [None if t is None else t.cpu() for t in (dz, z, y, mean, invstd, gamma, sum_g, sum_gx)]
    cpu = _ops.bn_backward_dy(*cpu_args, count, relu, training)
    check(dy, cpu, f"bn_backward_dy vs cpu {shape}", out_atol, out_rtol)


# ---- unaligned data pointers: the scalar fallback of every kernel ---------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 8, 7, 9), (2, 16, 33, 33)], ids=str)
@pytest.mark.parametrize("dtype,stat_rtol,out_atol,out_rtol", [DTYPES[0], DTYPES[2]])
def test_unaligned_inputs(shape, layout, dtype, stat_rtol, out_atol, out_rtol):
    c = shape[1]
    dz, z, y, mean, invstd = backward_inputs(shape, dtype, layout, True, unaligned=True)
    st = opmath(dtype)
    m, m2 = _ops.bn_stats(y)
    ref_m, ref_m2 = reference.bn_stats(y)
    check(m, ref_m, "bn_stats mean (unaligned)", stat_rtol, stat_rtol)
    check(m2, ref_m2, "bn_stats m2 (unaligned)", stat_rtol, stat_rtol)
    scale, shift = channel(c, st, 0.5, 2.0), channel(c, st)
    out = _ops.bn_apply(y, mean, scale, None, shift, dz, True)
    check(out, reference.bn_apply(y, mean, scale, shift, dz, True), "bn_apply (unaligned)", out_atol, out_rtol)
    sum_g, sum_gx = _ops.bn_backward_reduce(dz, z, y, mean, invstd, True)
    ref_g, ref_gx = reference.bn_backward_reduce(dz, z, y, mean, invstd, True)
    sg, sgx = reduce_scales(dz, z, y, mean, invstd, True)
    check(sum_g, ref_g, "sum_g (unaligned)", stat_rtol, stat_rtol, scale=max(sg, 1.0))
    check(sum_gx, ref_gx, "sum_g_xhat (unaligned)", stat_rtol, stat_rtol, scale=max(sgx, 1.0))
    count = float(y.numel() // c)
    dy = _ops.bn_backward_dy(dz, z, y, mean, invstd, scale, ref_g.to(st), ref_gx.to(st), count, True, True)
    ref = reference.bn_backward_dy(dz, z, y, mean, invstd, scale, ref_g.to(st), ref_gx.to(st), count, True, True)
    check(dy, ref, "bn_backward_dy (unaligned)", out_atol, out_rtol)


# ---- the composites, registered for CUDA ----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_composite_forward_backward_match_cpu(layout, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = activation((2, 5, 13, 11), torch.float64, layout)
    w = (torch.randn(7, 5, 3, 3, dtype=torch.float64) / 45**0.5).to(CUDA)
    gamma, beta = channel(7, torch.float64, 0.5, 1.5), channel(7, torch.float64)
    rm, rv = channel(7, torch.float64), channel(7, torch.float64, 0.5, 1.5)
    args = (x, w, gamma, beta, rm, rv, [1, 1], [2, 2], [2, 2], True, 0.1, 1e-5, None, True)
    got = _ops.conv_bn_relu_forward(*args)
    want = _ops.conv_bn_relu_forward(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    for name, a, b in zip(["out", "conv_out", "mean", "invstd", "running_mean", "running_var"], got, want, strict=True):
        check(a, b, f"conv_bn_relu_forward {name}", 1e-10, 1e-10)
    assert_layout(got[0], layout, "conv_bn_relu_forward out")
    out, conv_out, mean, invstd = got[:4]
    dz = torch.randn_like(out)
    bargs = (dz, x, w, gamma, conv_out, out, mean, invstd, [1, 1], [2, 2], [2, 2], True, True,
             [True, True, True, True, False])
    grads = _ops.conv_bn_relu_backward(*bargs)
    cpu_grads = _ops.conv_bn_relu_backward(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in bargs])
    for name, a, b in zip(["x", "weight", "bn_weight", "bn_bias"], grads[:4], cpu_grads[:4], strict=True):
        check(a, b, f"conv_bn_relu_backward grad {name}", 1e-9, 1e-9)


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_bn_finalize_eval_reads_running_statistics(running_dtype):
    c, eps = 21, 1e-5
    rm, rv = channel(c, running_dtype), channel(c, running_dtype, 0.5, 1.5)
    save_mean, save_invstd = torch.empty(c, device=CUDA), torch.empty(c, device=CUDA)
    empty = torch.empty(0, device=CUDA, dtype=running_dtype)
    _ops.bn_finalize(None, None, None, 0.0, rm, rv, 0.1, eps, save_mean, save_invstd, empty, empty)
    check(save_mean, rm.double(), "eval mean", 1e-7, 1e-7)
    check(save_invstd, (rv.double() + eps).rsqrt(), "eval invstd", 1e-6, 1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_aspp_composite_matches_cpu(layout, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    c, cin, rates = 3, 5, [1, 2]
    x = activation((3, cin, 7, 6), torch.float64, layout)
    convs = [channel(c * cin, torch.float64).view(c, cin, 1, 1)] + [
        (torch.randn(c, cin, 3, 3, dtype=torch.float64) / 3).to(CUDA) for _ in rates]
    pool = channel(c * cin, torch.float64).view(c, cin, 1, 1)
    proj = channel(c * (len(rates) + 2) * c, torch.float64).view(c, (len(rates) + 2) * c, 1, 1)
    k = (len(rates) + 3) * c
    gamma, beta = channel(k, torch.float64, 0.5, 1.5), channel(k, torch.float64)
    rm, rv = channel(k, torch.float64), channel(k, torch.float64, 0.5, 1.5)

    def cpu(args):
        return [[t.cpu() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                else a.cpu() if isinstance(a, torch.Tensor) else a for a in args]

    for training in (True, False):
        args = [x, convs, pool, proj, gamma, beta, rm, rv, rates, training, 0.1, 1e-5]
        got, want = _ops.aspp_forward(*args), _ops.aspp_forward(*cpu(args))
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            if isinstance(a, list):  # an output that is a list of tensors (one per branch): each compared
                assert isinstance(b, list) and len(a) == len(b), (i, type(b))
                for j, (aj, bj) in enumerate(zip(a, b, strict=True)):
                    check(aj, bj, f"aspp_forward output {i}[{j}] (training={training})", 1e-10, 1e-10)
            else:
                check(a, b, f"aspp_forward output {i} (training={training})", 1e-10, 1e-10)
        out, branch, pool_out, proj_out, mean, invstd = got[:6]
        bargs = [torch.randn_like(out), x, convs, pool, proj, gamma, beta, branch, pool_out, proj_out, out, mean,
                 invstd, rates, training, [True, True, True]]
        grads, cpu_grads = _ops.aspp_backward(*bargs), _ops.aspp_backward(*cpu(bargs))
        for i, (a, b) in enumerate(zip(grads, cpu_grads, strict=True)):
            for aa, bb in zip(a, b, strict=True) if isinstance(a, list) else [(a, b)]:
                check(aa, bb, f"aspp_backward output {i} (training={training})", 1e-9, 1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
                         ids=str)
@pytest.mark.parametrize("with_bias,with_residual,relu", [(True, True, True), (True, False, True), (False, False, True),
                                                          (True, True, False)], ids=str)
def test_conv_bias_act_matches_float64(layout, dtype, atol, with_bias, with_residual, relu, monkeypatch):
    # relu=True takes cuDNN's fused conv + bias (+ z) + ReLU when it applies; relu=False the generic path.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = activation((2, 8, 13, 11), dtype, layout)
    w = (torch.randn(16, 8, 3, 3, dtype=torch.float64) / 72**0.5).to(dtype).to(CUDA)
    bias = channel(16, dtype) if with_bias else None
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None if bias is None else bias.double(), 1, 2, 2)
    r = activation(tuple(ref.shape), dtype, layout) if with_residual else None
    if r is not None:
        ref = ref + r.double()
    if relu:
        ref = torch.relu(ref)
    out = _ops.conv_bias_act(x, w, bias, r, [1, 1], [2, 2], [2, 2], relu)
    assert out.dtype == dtype
    assert_layout(out, layout, "conv_bias_act output")
    check(out, ref, f"conv_bias_act {dtype}", atol, atol)


# The eval path's geometries in DeepLabV3 (scaled-down channels and maps): (C_in, C_out, kernel, stride, padding,
# dilation, H, W): the 7x7 stem, 1x1 stride 1 and 2 (the downsample), 3x3 stride 2, dilations 2/4/8 and an ASPP rate
# whose taps mostly fall in the padding.
EVAL_GEOMETRIES = [
    pytest.param(3, 16, 7, 2, 3, 1, 37, 29, id="stem7x7s2"),
    pytest.param(32, 64, 1, 1, 0, 1, 17, 17, id="1x1"),
    pytest.param(32, 64, 1, 2, 0, 1, 17, 15, id="1x1s2"),
    pytest.param(16, 16, 3, 2, 1, 1, 33, 33, id="3x3s2"),
    pytest.param(16, 24, 3, 1, 2, 2, 17, 19, id="3x3d2"),
    pytest.param(16, 16, 3, 1, 4, 4, 17, 17, id="3x3d4"),
    pytest.param(16, 16, 3, 1, 8, 8, 33, 33, id="3x3d8"),
    pytest.param(16, 8, 3, 1, 12, 12, 9, 9, id="3x3d12-padding"),
]


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,h,w", EVAL_GEOMETRIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
                         ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["bias-relu", "bias-add-relu"])
def test_conv_bias_act_deeplab_geometries(cin, cout, k, stride, pad, dil, h, w, layout, dtype, atol, with_residual,
                                          monkeypatch):
    # Where cuDNN's fused conv + bias (+ z) + ReLU takes the call, and where it has no engine (then the generic
    # path, remembered per configuration): the result is the same function either way.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = activation((2, cin, h, w), dtype, layout)
    wt = (torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5).to(dtype).to(CUDA)
    bias = channel(cout, dtype)
    ref = torch.nn.functional.conv2d(x.double(), wt.double(), bias.double(), stride, pad, dil)
    r = activation(tuple(ref.shape), dtype, layout) if with_residual else None
    ref = torch.relu(ref + r.double() if r is not None else ref)
    for attempt in range(2):  # the second call: the remembered route
        out = _ops.conv_bias_act(x, wt, bias, r, [stride] * 2, [pad] * 2, [dil] * 2, True)
        assert out.dtype == dtype
        assert_layout(out, layout, f"conv_bias_act output (call {attempt + 1})")
        check(out, ref, f"conv_bias_act {dtype} (call {attempt + 1})", atol, atol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_bias_act_residual_aliasing_input(layout, monkeypatch):
    # conv(x) + x with the residual x itself (pytorch/pytorch#62926: cuDNN's fused add misreads an aliased z).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = activation((2, 8, 9, 11), torch.float32, layout)
    wt = channel(8 * 8, torch.float32).reshape(8, 8, 1, 1) / 8
    bias = channel(8, torch.float32)
    out = _ops.conv_bias_act(x, wt, bias, x, [1, 1], [0, 0], [1, 1], True)
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), wt.double(), bias.double()) + x.double())
    check(out, ref, "conv_bias_act with residual = x", 1e-5, 1e-5)


def test_conv_bias_act_deterministic_mode(monkeypatch):
    # Under cudnn.deterministic the call leaves cuDNN's fused forms (which take no determinism setting): two calls
    # give the same bits, and the result is the function's.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    x = activation((2, 16, 17, 17), torch.float32, torch.channels_last)
    wt = (torch.randn(16, 16, 3, 3, dtype=torch.float64) / 12).float().to(CUDA)
    bias = channel(16, torch.float32)
    a = _ops.conv_bias_act(x, wt, bias, None, [1, 1], [2, 2], [2, 2], True)
    b = _ops.conv_bias_act(x, wt, bias, None, [1, 1], [2, 2], [2, 2], True)
    assert torch.equal(a, b), "conv_bias_act under cudnn.deterministic: two calls differ"
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), wt.double(), bias.double(), 1, 2, 2))
    check(a, ref, "conv_bias_act under cudnn.deterministic", 1e-5, 1e-5)

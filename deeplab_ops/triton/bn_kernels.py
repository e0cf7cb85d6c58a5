"""BatchNorm stages of the Triton engine outside a convolution: finalize, apply, backward reduce and finalize.

Activations are NHWC, viewed as a (M = N*H*W, C) row-major matrix. Per-channel math runs in the opmath
dtype (float32 for fp16/bf16/fp32 activations, float64 for float64), the formulas of csrc/common/bn_math.h:
  finalize  Chan's merge of per-tile (count, mean, M2) partials -> mean, invstd, scale, shift, running update
  eval stats  the running statistics -> mean, invstd, scale, shift (for kernels that read BN as vectors)
  apply     act((y - mean) * scale + shift [+ residual])        centred form, NaN-propagating ReLU
  reduce    partial (sum g, sum g * (y - mean)) per row split, g = dz * 1[!(z <= 0)]
  bwd finalize  the partials summed in order -> (sum g, sum g * xhat) and dy's coefficients
The jit helpers at the top (`_relu`, `_act_grad`, `_bn_dy`) are shared with the conv engine's epilogues.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from deeplab_ops.common import interpreter_active
from deeplab_ops.triton.launch import cdiv, device_constants, jit_unspecialized, launch_kernel, next_power_of_2

# ---- shared per-element math -------------------------------------------------------------------------


@triton.jit
def _relu(z):
    # NaN < 0 is false, so NaN propagates as with torch.relu (tl.maximum would drop it on some targets).
    return tl.where(z < 0, 0.0, z)


@triton.jit
def _act_grad(dz, z, relu):
    # threshold_backward(dz, z, 0) where `relu` (a runtime flag: one compiled kernel with and without ReLU, the
    # callers then loading z masked off; or a constant): zero where the output is <= 0 only, so a NaN output passes
    # its gradient on, as F.relu's backward and csrc/common/bn_math.h's act_grad do.
    return tl.where((z <= 0) & (relu != 0), 0.0, dz)


@triton.jit
def _corrected(m, sq, s, n):
    # The corrected two-pass form of (mean, M2) from values centred on m, a mean with rounding error: sq = sum of
    # squared deviations, s = sum of deviations, n the count. (m + s/n, sq - s^2/n), where s^2/n is finite: data
    # whose deviations are not finite (an inf or NaN value, a spread beyond float32's range) keep the plain form,
    # propagating as eager's statistics do. (Finite as |corr| < inf, NaN comparing false: `corr - corr == 0` would
    # be contracted on a GPU into fma(s, shift, -corr), the product's rounding error, almost never 0.)
    shift = _div(s, n)
    corr = shift * s
    ok = tl.abs(corr) < float("inf")
    return tl.where(ok, m + shift, m), tl.where(ok, tl.maximum(sq - corr, 0.0), sq)


@triton.jit
def _bn_dy(g, y, mean, k, a, b):
    # dy = k * (g - a - (y - mean) * b); k = gamma*invstd, a = sum(g)/n, b = invstd*sum(g*xhat)/n (a = b = 0 in
    # eval). (y - mean) * b rather than xhat * sum/n: one multiply fewer, same centred quantity. b = 0 (eval, or
    # a zero sum): dy does not read y, as torch's eval BatchNorm backward, so a NaN/Inf y gives no NaN * 0
    # (bn_math.h's bn_dy).
    yb = tl.where(b[None, :] == 0, 0.0, (y - mean[None, :]) * b[None, :])
    return k[None, :] * (g - a[None, :] - yb)


@triton.jit
def _invstd(var_eps, ACC_DTYPE: tl.constexpr):
    if ACC_DTYPE == tl.float64:
        return 1.0 / tl.sqrt(var_eps)  # float64 sqrt is correctly rounded
    else:
        # tl.sqrt is an approximation in float32, and so is `/` (div.full.f32, up to 2 ulp): both correctly rounded,
        # as the CUDA C++ kernels' 1 / sqrt is.
        return tl.div_rn(tl.full(var_eps.shape, 1.0, tl.float32), tl.sqrt_rn(var_eps))


@triton.jit
def _div(num, den):
    # num / den correctly rounded, as the CUDA C++ kernels' `/` and the interpreter's: float32 `/` compiles to
    # div.full.f32 on a GPU (up to 2 ulp). float64 `/` is exact. `den` may be a scalar (a count).
    if num.dtype == tl.float64:
        return num / den
    else:
        return tl.div_rn(num, tl.zeros_like(num) + den)


# ---- kernels -----------------------------------------------------------------------------------------


@jit_unspecialized("P")  # the partials' count follows batch and map size
def _bn_finalize_kernel(
    # partials from the conv epilogue: count (P,), mean and M2 (P, C), opmath dtype
    count_ptr, pmean_ptr, pm2_ptr,
    # parameters: gamma, beta (C,) or dummies; running stats (C,) or dummies; [momentum, eps] in opmath dtype
    gamma_ptr, beta_ptr, rm_ptr, rv_ptr, hyper_ptr,
    # outputs (C,): statistics and the affine the apply uses; updated running statistics (copies)
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr, new_rm_ptr, new_rv_ptr,
    # channel c of the partials is channel OFF + c of the parameters and outputs (ASPP: one block of a buffer)
    P, C, OFF,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_RUNNING: tl.constexpr, UNIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # UNIT: every partial is one value (count 1, M2 0: the ASPP pooling branch's (N, C) outputs); count_ptr and
    # pm2_ptr are not read.
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    n_acc = tl.zeros((BLOCK_C,), ACC_DTYPE)
    mean_acc = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2_acc = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        mask = p_mask[:, None] & c_mask[None, :]
        idx = offs_p[:, None] * C + offs_c[None, :]
        mu = tl.load(pmean_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
        if UNIT:
            cnt = tl.where(p_mask, 1.0, 0.0).to(ACC_DTYPE)
            m2 = tl.zeros((BLOCK_P, BLOCK_C), ACC_DTYPE)
        else:
            cnt = tl.load(count_ptr + offs_p, mask=p_mask, other=0).to(ACC_DTYPE)
            m2 = tl.load(pm2_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
        # A block of partials merged at once (Chan's formula for many parts), then merged into the running
        # total pairwise. Only centred quantities are combined: no E[y^2] - E[y]^2 cancellation; the block's
        # mean and M2 corrected by the weighted deviations' sum, as the tiles' own (conv_engine._tile_stats).
        nb = tl.sum(cnt, 0)
        nb1 = tl.maximum(nb, 1.0)
        mub = _div(tl.sum(cnt[:, None] * mu, 0), nb1)
        dev = tl.where(mask, mu - mub[None, :], 0.0)
        mub, m2b = _corrected(mub, tl.sum(m2 + cnt[:, None] * dev * dev, 0), tl.sum(cnt[:, None] * dev, 0), nb1)
        n_tot = n_acc + nb
        delta = mub - mean_acc
        fb = _div(nb, tl.maximum(n_tot, 1.0))
        # An empty side takes the other as is (csrc's welford_merge): delta * delta * 0 is inf * 0 = NaN once |delta|
        # passes ~1.8e19 in float32 (a first block of such a mean: NaN statistics where eager's are finite).
        mean_acc = tl.where(nb == 0, mean_acc, tl.where(n_acc == 0, mub, mean_acc + delta * fb))
        m2_acc = tl.where(nb == 0, m2_acc, tl.where(n_acc == 0, m2b, m2_acc + m2b + delta * delta * n_acc * fb))
        n_acc = n_tot
    invstd = _invstd(_div(m2_acc, n_acc) + tl.load(hyper_ptr + 1), ACC_DTYPE)
    ch = OFF + offs_c
    tl.store(mean_ptr + ch, mean_acc, mask=c_mask)
    tl.store(invstd_ptr + ch, invstd, mask=c_mask)
    scale = invstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + ch, mask=c_mask, other=1).to(ACC_DTYPE) * invstd
    tl.store(scale_ptr + ch, scale, mask=c_mask)
    shift = tl.zeros((BLOCK_C,), ACC_DTYPE)
    if HAS_BETA:
        shift = tl.load(beta_ptr + ch, mask=c_mask, other=0).to(ACC_DTYPE)
    tl.store(shift_ptr + ch, shift, mask=c_mask)
    if HAS_RUNNING:
        momentum = tl.load(hyper_ptr)
        rm = tl.load(rm_ptr + ch, mask=c_mask, other=0).to(ACC_DTYPE)
        rv = tl.load(rv_ptr + ch, mask=c_mask, other=0).to(ACC_DTYPE)
        # Running variance uses the unbiased estimate, as F.batch_norm (n > 1 is checked at the boundary).
        tl.store(new_rm_ptr + ch, (1.0 - momentum) * rm + momentum * mean_acc, mask=c_mask)
        tl.store(new_rv_ptr + ch, (1.0 - momentum) * rv + momentum * _div(m2_acc, n_acc - 1.0), mask=c_mask)


@triton.jit
def _bn_eval_stats_kernel(
    # running statistics, gamma, beta (C,) in the BatchNorm's dtype; [momentum, eps] in opmath dtype
    rm_ptr, rv_ptr, gamma_ptr, beta_ptr, hyper_ptr,
    # outputs (C,) opmath: save_mean, save_invstd and the affine (scale, shift) the kernels apply
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    C,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Eval BatchNorm's statistics for kernels that read them as vectors (the ASPP's): mean = running_mean,
    # invstd = 1/sqrt(running_var + eps) (the conv epilogues' formula), scale = gamma * invstd, shift = beta.
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    invstd = _invstd(tl.load(rv_ptr + offs_c, mask=c_mask, other=1).to(ACC_DTYPE) + tl.load(hyper_ptr + 1),
                     ACC_DTYPE)
    tl.store(mean_ptr + offs_c, tl.load(rm_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE), mask=c_mask)
    tl.store(invstd_ptr + offs_c, invstd, mask=c_mask)
    tl.store(scale_ptr + offs_c, tl.load(gamma_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE) * invstd,
             mask=c_mask)
    tl.store(shift_ptr + offs_c, tl.load(beta_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE), mask=c_mask)


@jit_unspecialized("M", "relu")  # the row count follows batch and map size; ReLU: one select per element
def _bn_apply_kernel(
    y_ptr, res_ptr, out_ptr,          # (M, C) activations
    mean_ptr, scale_ptr, shift_ptr,   # (C,) opmath dtype
    M, C, relu,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_m < M)[:, None] & c_mask[None, :]
    idx = offs_m[:, None] * C + offs_c[None, :]
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0)
    scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0)
    shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0)
    y = tl.load(y_ptr + idx, mask=mask, other=0).to(mean.dtype)
    z = (y - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:
        z += tl.load(res_ptr + idx, mask=mask, other=0).to(mean.dtype)
    z = tl.where((z < 0) & (relu != 0), 0.0, z)  # _relu's NaN rule
    tl.store(out_ptr + idx, z.to(out_ptr.dtype.element_ty), mask=mask)


@jit_unspecialized("M", "relu")  # the row count follows batch and map size; ReLU: a masked load (_act_grad)
def _bn_bwd_reduce_kernel(
    dz_ptr, z_ptr, y_ptr,             # (M, C) grad_out, out, conv_out
    mean_ptr,                         # (C,) opmath
    g_ptr,                            # (M, C) the gradient through the activation (grad_residual), if STORE_G
    part_g_ptr, part_gy_ptr,          # (S, C) partial sums of g and g * (y - mean)
    M, C, rows_per_prog, relu,
    STORE_G: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    sum_g = tl.zeros((BLOCK_C,), ACC_DTYPE)
    sum_gy = tl.zeros((BLOCK_C,), ACC_DTYPE)
    row0 = pid_s * rows_per_prog
    for m0 in range(row0, row0 + tl.minimum(rows_per_prog, M - row0), BLOCK_M):  # (no row0 + rows_per_prog: int32)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & c_mask[None, :]
        idx = offs_m[:, None] * C + offs_c[None, :]
        dz = tl.load(dz_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
        z = tl.load(z_ptr + idx, mask=mask & (relu != 0), other=0).to(ACC_DTYPE)
        y = tl.load(y_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
        g = _act_grad(dz, z, relu)
        if STORE_G:
            tl.store(g_ptr + idx, g.to(g_ptr.dtype.element_ty), mask=mask)
        sum_g += tl.sum(g, 0)
        sum_gy += tl.sum(tl.where(mask, g * (y - mean[None, :]), 0.0), 0)
    tl.store(part_g_ptr + pid_s * C + offs_c, sum_g, mask=c_mask)
    tl.store(part_gy_ptr + pid_s * C + offs_c, sum_gy, mask=c_mask)


@jit_unspecialized("S", "count")  # the partials' count and the pixel count follow batch and map size
def _bn_bwd_finalize_kernel(
    part_g_ptr, part_gy_ptr,          # (S, C) partial sums of g and g * (y - mean), opmath
    mean_ptr, invstd_ptr, gamma_ptr,  # (C,) saved statistics (opmath); gamma or a dummy
    sum_g_ptr, sum_gx_ptr, coef_ptr,  # outputs: (C,) sum g and sum g * xhat; rows (mean, k, a, b) of dy, stride LD
    S, C, LD, OFF, count,
    TRAINING: tl.constexpr, HAS_GAMMA: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Channel c of the partials and coef is channel OFF + c of the statistics, gamma and sums (ASPP: a block).
    # The partials summed in a fixed order (deterministic), then the per-channel coefficients of
    # dy = k*(g - a - (y - mean)*b): k = gamma*invstd, a = sum g/n, b = invstd*sum(g*xhat)/n (a = b = 0 in eval).
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    sum_g = tl.zeros((BLOCK_C,), ACC_DTYPE)
    sum_gy = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for s in range(0, S):
        sum_g += tl.load(part_g_ptr + s * C + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
        sum_gy += tl.load(part_gy_ptr + s * C + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    mean = tl.load(mean_ptr + OFF + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + OFF + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    sum_gx = sum_gy * invstd
    tl.store(sum_g_ptr + OFF + offs_c, sum_g, mask=c_mask)
    tl.store(sum_gx_ptr + OFF + offs_c, sum_gx, mask=c_mask)
    k = invstd
    if HAS_GAMMA:
        k = tl.load(gamma_ptr + OFF + offs_c, mask=c_mask, other=0).to(ACC_DTYPE) * invstd
    a = tl.zeros((BLOCK_C,), ACC_DTYPE)
    b = tl.zeros((BLOCK_C,), ACC_DTYPE)
    if TRAINING:
        a = _div(sum_g, count)
        b = _div(invstd * sum_gx, count)
    tl.store(coef_ptr + offs_c, mean, mask=c_mask)
    tl.store(coef_ptr + LD + offs_c, k, mask=c_mask)
    tl.store(coef_ptr + 2 * LD + offs_c, a, mask=c_mask)
    tl.store(coef_ptr + 3 * LD + offs_c, b, mask=c_mask)


# The kernels by name (what ahead-of-time compile checks iterate over).
KERNELS = {
    "bn_finalize": _bn_finalize_kernel,
    "bn_eval_stats": _bn_eval_stats_kernel,
    "bn_apply": _bn_apply_kernel,
    "bn_bwd_reduce": _bn_bwd_reduce_kernel,
    "bn_bwd_finalize": _bn_bwd_finalize_kernel,
}


# ---- launchers ----------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype):
    """The Triton accumulator dtype for activations of `dtype` (fp32, or fp64 for float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def hyper_tensor(momentum: float, eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(momentum, eps) on the device, read-only in the kernels (launch.device_constants). An eps beyond the dtype's
    range is infinity there, as C++'s conversion gives it (the checks take any finite eps > 0). The cpu and cuda
    backends finalize in float64 and keep invstd = 1/sqrt(var + eps) in the activations' float32: for a channel of
    zero variance it is finite while 1/sqrt(eps) is (eps >= 1/max², about 8.6e-78) and infinite below. Here an eps
    float32 rounds to 0 or to a subnormal (below its smallest normal, 1.2e-38) is that smallest normal down to that
    bound, so such a channel stays finite as there (float32 rounds 1e-50 to 0: 0 · inf = NaN), and 0 below it, where
    their invstd is infinite too."""
    if eps > _LARGEST.get(dtype, math.inf):
        eps = math.inf
    elif dtype == torch.float32 and eps < _F32_SMALLEST:
        eps = _F32_SMALLEST if eps >= _F32_INVSTD_FINITE else 0.0
    return device_constants((momentum, eps), dtype, device)


_LARGEST = {t: torch.finfo(t).max for t in (torch.float32, torch.float64)}  # (no finfo per call)
_F32_SMALLEST = torch.finfo(torch.float32).smallest_normal
_F32_INVSTD_FINITE = 1.0 / float(torch.finfo(torch.float32).max) ** 2  # the smallest eps with a finite 1/sqrt(eps)


def _block_c(c: int) -> int:
    return min(64, next_power_of_2(c))


def launch_blocks(name: str, c: int) -> dict:
    """The block sizes the launcher of KERNELS[name] uses on a GPU for `c` channels (the interpreter's differ)."""
    block_c = _block_c(c)
    return {"bn_finalize": dict(BLOCK_P=64, BLOCK_C=block_c),
            "bn_eval_stats": dict(BLOCK_C=block_c),
            "bn_apply": dict(BLOCK_M=max(16, 4096 // block_c), BLOCK_C=block_c),
            "bn_bwd_reduce": dict(BLOCK_M=max(16, 2048 // block_c), BLOCK_C=block_c),
            "bn_bwd_finalize": dict(BLOCK_C=block_c)}[name]


def bn_finalize(
    count: torch.Tensor, pmean: torch.Tensor, pm2: torch.Tensor, bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    momentum: float, eps: float, out: tuple[torch.Tensor, ...] | None = None, offset: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Merge (P,) counts and (P, C) partials: (mean, invstd, scale, shift, new_running_mean, new_running_var).

    The running statistics are returned updated as copies ((0,) tensors when none are given). `out`: the six
    tensors to write, whose channels offset .. offset + C (like those of the parameters) are this block's.
    count and pm2 None: each partial is one value (count 1, M2 0), the statistics of pmean's P rows.
    """
    p, c = pmean.shape
    unit = count is None
    stat = pmean.dtype
    hyper = hyper_tensor(float(momentum), float(eps), stat, pmean.device)
    has_running = running_mean is not None
    if out is not None:
        outs, (new_rm, new_rv) = list(out[:4]), out[4:]
    else:
        outs = [torch.empty(c, dtype=stat, device=pmean.device) for _ in range(4)]
        if has_running:
            new_rm, new_rv = torch.empty_like(running_mean), torch.empty_like(running_var)
        else:
            new_rm = new_rv = pmean.new_empty((0,))
    dummy = hyper
    blocks = launch_blocks("bn_finalize", c)
    if interpreter_active():
        blocks["BLOCK_P"] = 32
    launch_kernel(_bn_finalize_kernel, (cdiv(c, blocks["BLOCK_C"]),),
        pmean if unit else count, pmean, pmean if unit else pm2,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy,
        running_mean if has_running else dummy, running_var if has_running else dummy, hyper,
        *outs, new_rm if has_running else dummy, new_rv if has_running else dummy,
        p, c, offset,
        HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None, HAS_RUNNING=has_running, UNIT=unit,
        ACC_DTYPE=acc_dtype(stat), **blocks,
    )
    return (*outs, new_rm, new_rv)


def bn_eval_stats(running_mean: torch.Tensor, running_var: torch.Tensor, bn_weight: torch.Tensor,
                  bn_bias: torch.Tensor, eps: float, stat: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Eval BatchNorm's (mean, invstd, scale, shift) in the opmath dtype `stat` from the running statistics and the
    affine parameters (unit-stride (C,) vectors), in one launch."""
    c = running_mean.shape[0]
    device = running_mean.device
    outs = [torch.empty(c, dtype=stat, device=device) for _ in range(4)]
    block_c = launch_blocks("bn_eval_stats", c)["BLOCK_C"]
    launch_kernel(_bn_eval_stats_kernel, (cdiv(c, block_c),),
        running_mean, running_var, bn_weight, bn_bias, hyper_tensor(0.0, float(eps), stat, device), *outs, c,
        ACC_DTYPE=acc_dtype(stat), BLOCK_C=block_c,
    )
    return tuple(outs)


def bn_apply(
    y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """`act((y - mean) * scale + shift [+ residual])` on NHWC-contiguous (..., C) activations."""
    c = y.shape[-1]
    m = y.numel() // c
    out = torch.empty_like(y)
    block_c = _block_c(c)
    block_m = launch_blocks("bn_apply", c)["BLOCK_M"] if not interpreter_active() else 64
    launch_kernel(_bn_apply_kernel, (cdiv(m, block_m), cdiv(c, block_c)),
        y, residual if residual is not None else y, out, mean, scale, shift, m, c, int(relu),
        HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


def bn_backward_reduce(
    grad_out: torch.Tensor, out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, relu: bool, store_g: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(partial sums (S, C) of g and of g * (y - mean), g or None) from NHWC-contiguous activations, in mean's
    dtype: one pass over (grad_out, out, y), fixed row splits (bn_backward_finalize sums them in order)."""
    c = y.shape[-1]
    m = y.numel() // c
    block_c = _block_c(c)
    block_m = 64 if interpreter_active() else launch_blocks("bn_bwd_reduce", c)["BLOCK_M"]
    # Enough row splits to fill the GPU; about 16 row blocks per program keeps the partials small.
    rows_per_prog = block_m * (16 if not interpreter_active() else 64)
    splits = cdiv(m, rows_per_prog)
    part_g = torch.empty(splits, c, dtype=mean.dtype, device=y.device)
    part_gy = torch.empty_like(part_g)
    g = torch.empty_like(y) if store_g else None
    launch_kernel(_bn_bwd_reduce_kernel, (splits, cdiv(c, block_c)),
        grad_out, out, y, mean, g if store_g else y, part_g, part_gy, m, c, rows_per_prog, int(relu),
        STORE_G=store_g, ACC_DTYPE=acc_dtype(mean.dtype), BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return part_g, part_gy, g


def bn_backward_finalize(
    part_g: torch.Tensor, part_gy: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    gamma: torch.Tensor | None, count: int, training: bool, out: tuple[torch.Tensor, ...] | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum g, sum g * xhat, coef): the (S, C) partials summed in order, and coef's rows (mean, k, a, b) of
    dy = k*(g - a - (y - mean)*b). `offset`: the partials' channel c is channel offset + c of mean, invstd, gamma
    and of the sums in `out` = (sum_g, sum_gx, coef); coef: (4, >= C) with unit column stride."""
    s, c = part_g.shape
    stat = mean.dtype
    if out is None:
        out = (torch.empty(c, dtype=stat, device=mean.device), torch.empty(c, dtype=stat, device=mean.device),
               torch.empty(4, c, dtype=stat, device=mean.device))
    sum_g, sum_gx, coef = out
    block_c = _block_c(c)
    launch_kernel(_bn_bwd_finalize_kernel, (cdiv(c, block_c),),
        part_g, part_gy, mean, invstd, gamma if gamma is not None else invstd, sum_g, sum_gx, coef,
        s, c, coef.stride(0), offset, count,
        TRAINING=training, HAS_GAMMA=gamma is not None, ACC_DTYPE=acc_dtype(stat), BLOCK_C=block_c,
    )
    return sum_g, sum_gx, coef

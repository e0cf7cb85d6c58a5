"""The triton backend of the fused ASPP op: kernels and host code of deeplab_ops::triton_aspp_forward / _backward,
and its padding-tap schedule. Every conv branch runs in one launch (packed (T, C_in, C) weights, T = 1 + 9 *
len(rates)) on the engine's tap and epilogue helpers; the image-pooling branch is a per-(image, channel) bias of
the projection; the projection applies the branch BN + ReLU in its prologue. Design notes: docs/kernels.md.

Forward: training 7 launches (branches, branch finalize, pooling finalize, pooling bias, projection, projection
finalize, apply), eval 4 (BN statistics, branches, pooling bias, projection). Backward 8: projection reduce +
finalize, projection dgrad (with the branch ReLU gradient and BN sums), branch finalize, pooling backward,
projection wgrad, branch dgrad, branch wgrad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from deeplab_ops.common import from_nhwc, opmath_dtype, strided_like, to_nhwc
from deeplab_ops.triton.bn_kernels import (
    _bn_dy,
    _div,
    _relu,
    acc_dtype,
    bn_apply,
    bn_backward_finalize,
    bn_backward_reduce,
    bn_eval_stats,
    bn_finalize,
)
from deeplab_ops.triton.conv_bn_relu import check_device, vectors
from deeplab_ops.triton.conv_bn_relu import schedule as conv_schedule
from deeplab_ops.triton.conv_engine import (
    AMPERE_GEMM,
    AMPERE_WGRAD,
    HOPPER_GEMM,
    HOPPER_WGRAD,
    MMA_SHAPE,
    PIPELINE,
    STAGE_BYTES,
    _bn_affine,
    _conv_dgrad_kernel,
    _conv_fwd_kernel,
    _conv_wgrad_kernel,
    _count_split_pairs,
    _dgrad_stage,
    _dgrad_tap,
    _dy_coef,
    _dy_tile,
    _fwd_stage,
    _fwd_tap,
    _gemm_tile,
    _mma,
    _store_tile,
    _tile_stats,
    _wgrad_block,
    _wgrad_stage,
    _wgrad_tile,
    _wgrad_tiles,
    dot_precision,
    fit_pruner,
    fit_sizes,
    split_count,
)
from deeplab_ops.triton.launch import (
    KernelSpec,
    cdiv,
    device_constants,
    jit_unspecialized,
    launch_kernel,
    next_power_of_2,
    prune_by_channels,
    run_tuned,
)
from deeplab_ops.triton.packing import cached

Tensor = torch.Tensor


@triton.jit
def _branch_tap(br, kh, kw, rate):
    # Branch br's tap (kh, kw): whether it exists (the 1x1 branch has only the centre), its row and column
    # offsets (stride 1, padding = dilation = rate), and its index in the packed weights (1x1 first, 9 per rate).
    # (Arithmetic, not `(kh == 1) & (kw == 1)`: the Triton 3.2 interpreter, where the loop indices are Python ints,
    # cannot mix a Python bool into a tensor expression.)
    live = (br > 0) | (br * 0 + (kh - 1) * (kh - 1) + (kw - 1) * (kw - 1) == 0)
    return live, (kh - 1) * rate, (kw - 1) * rate, tl.where(br == 0, 0, 1 + (br - 1) * 9 + kh * 3 + kw)


@triton.jit
def _pixel_tile(pid_t, HW, BLOCK_M: tl.constexpr):
    # Projection tiles: BLOCK_M consecutive pixels of one image (so the pooling bias is one row per program).
    tiles = tl.cdiv(HW, BLOCK_M)
    img = pid_t // tiles
    p0 = pid_t % tiles * BLOCK_M
    offs_p = p0 + tl.arange(0, BLOCK_M)
    p_mask = offs_p < HW
    return img, p0, p_mask, img * HW + offs_p


@triton.jit
def _pixel_gemm_tile(pid_t, pid_n, HW, C_n, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    # A projection GEMM program's tile (see _pixel_tile), its block of the C_n GEMM-N channels, the K offsets
    # and a zero accumulator.
    img, p0, p_mask, rows = _pixel_tile(pid_t, HW, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return (img, p0, p_mask, rows, offs_n, offs_n < C_n, tl.arange(0, BLOCK_K),
            tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE))


# ---- conv branches ------------------------------------------------------------------------------------


@jit_unspecialized("H", "W")  # sizes: see conv_engine's _SIZES_UNSPECIALIZED
def _aspp_branch_fwd_kernel(
    # pointers: x (N, H, W, C_in); w (T, C_in, C) packed; rates (B,) int32 (entry 0 unused); y (N, H, W, B*C)
    x_ptr, w_ptr, rates_ptr, y_ptr,
    # training: per-tile count (P,), mean and M2 (P, B*C) opmath; pair counter (1,) int32
    part_count_ptr, part_mean_ptr, part_m2_ptr, pairs_ptr,
    H, W, C_in, C, BC,
    TRAINING: tl.constexpr, COUNT_PAIRS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bn = tl.program_id(1)
    blocks_n = tl.cdiv(C, BLOCK_N)
    br = pid_bn // blocks_n
    rate = tl.load(rates_ptr + br)
    img, oh0, ow0, oh_last, ow_last, oh, ow, m_mask, offs_n, n_mask, acc = _gemm_tile(
        pid_t, pid_bn % blocks_n, H, W, C, ACC_DTYPE, BLOCK_H, BLOCK_W, BLOCK_N)

    for kh in range(3):
        for kw in range(3):
            live, ih_off, iw_off, tap = _branch_tap(br, kh, kw, rate)
            acc = _fwd_tap(acc, x_ptr, w_ptr + tap * C_in * C, C, img, oh, ow, m_mask, oh0, ow0, oh_last, ow_last,
                           ih_off, iw_off, 1, 1, H, W, C_in, offs_n, n_mask, live, pairs_ptr,
                           pid_bn % blocks_n == 0, COUNT_PAIRS, DOT_PRECISION, BLOCK_K)

    # The epilogue writes this branch's slice of the concatenated channels: no concat.
    o_mask = m_mask[:, None] & n_mask[None, :]
    ch = br * C + offs_n
    o_idx = (((img * H + oh) * W + ow) * BC)[:, None] + ch[None, :]
    y_stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + o_idx, y_stored, mask=o_mask)
    if TRAINING:
        cnt = ((oh_last - oh0 + 1) * (ow_last - ow0 + 1)).to(ACC_DTYPE)
        _tile_stats(y_stored.to(ACC_DTYPE), o_mask, cnt, part_count_ptr, part_mean_ptr, part_m2_ptr, pid_t, BC, ch,
                    n_mask, pid_bn == 0)


@jit_unspecialized("H", "W")  # sizes: see conv_engine's _SIZES_UNSPECIALIZED
def _aspp_branch_dgrad_kernel(
    # pointers: g (N, H, W, B*C) the gradient at the branch BN outputs through their ReLU; y (N, H, W, B*C) the
    # pre-BN branch outputs; coef (4, B*C) opmath; wt (T, C, C_in) packed; rates (B,) int32;
    # dx_pool (N, C_in) opmath, the pooling branch's share of dx; dx (N, H, W, C_in); pair counter
    g_ptr, y_ptr, coef_ptr, wt_ptr, rates_ptr, dxp_ptr, dx_ptr, pairs_ptr,
    H, W, C_in, C, BC, NB,
    COUNT_PAIRS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    img, ih0, iw0, ih_last, iw_last, ih, iw, m_mask, offs_n, n_mask, acc = _gemm_tile(
        tl.program_id(0), pid_n, H, W, C_in, ACC_DTYPE, BLOCK_H, BLOCK_W, BLOCK_N)

    # Every branch's taps accumulate into one dx tile: no per-branch dx, no sum afterwards.
    for br in range(NB):
        rate = tl.load(rates_ptr + br)
        for kh in range(3):
            for kw in range(3):
                live, ih_off, iw_off, tap = _branch_tap(br, kh, kw, rate)
                acc = _dgrad_tap(acc, g_ptr, g_ptr, y_ptr, coef_ptr + br * C, wt_ptr + tap * C * C_in, BC, br * C,
                                 img, ih, iw, m_mask, ih0, iw0, ih_last, iw_last, -ih_off, -iw_off, 1, 1, H, W, C,
                                 C_in, offs_n, n_mask, live, pairs_ptr, pid_n == 0, False, COUNT_PAIRS, ACC_DTYPE,
                                 DOT_PRECISION, BLOCK_K)

    acc += tl.load(dxp_ptr + img * C_in + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)[None, :]
    _store_tile(dx_ptr, acc, img, ih, iw, H, W, C_in, offs_n, n_mask, m_mask)


@jit_unspecialized("N", "H", "W", "SPLITS")  # sizes: see conv_engine's _SIZES_UNSPECIALIZED
def _aspp_branch_wgrad_kernel(
    # pointers: x (N, H, W, C_in); g, y (N, H, W, B*C); coef (4, B*C) opmath; rates (B,) int32;
    # partial dw (SPLITS, T, C_in, C) opmath; pair counter
    x_ptr, g_ptr, y_ptr, coef_ptr, rates_ptr, part_ptr, pairs_ptr,
    N, H, W, C_in, C, BC, T, SPLITS,
    COUNT_PAIRS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one packed (branch, tap), a (C_in, C) block, every SPLITS-th spatial tile (split-K over
    # pixels; the partials are summed on the host in a fixed order: deterministic). Axis 0 is (channel block,
    # packed tap), the tap fastest: the channel blocks alone can pass the 65535 of a grid's y axis.
    t = tl.program_id(0) % T
    br = tl.where(t == 0, 0, 1 + (t - 1) // 9)
    tap = tl.where(t == 0, 4, (t - 1) % 9)
    _, ih_off, iw_off, _ = _branch_tap(br, tap // 3, tap % 3, tl.load(rates_ptr + br))
    pid_mn = tl.program_id(0) // T
    offs_ci, ci_mask, offs_co, acc = _wgrad_block(pid_mn, C_in, C, ACC_DTYPE, BLOCK_M, BLOCK_N)
    mean, k, a, b = _dy_coef(coef_ptr + br * C, offs_co, C, BC, ACC_DTYPE)
    pid_s = tl.program_id(2)
    tiles = _wgrad_tiles(ih_off, iw_off, 1, 1, H, W, H, W, N, BLOCK_H, BLOCK_W)
    for i in range(pid_s, tiles, SPLITS):
        acc = _wgrad_tile(acc, x_ptr, g_ptr, g_ptr, y_ptr, i, ih_off, iw_off, 1, 1, H, W, C_in, H, W, BC, br * C,
                          C, offs_ci, ci_mask, offs_co, mean, k, a, b, False, ACC_DTYPE, DOT_PRECISION, BLOCK_H,
                          BLOCK_W)
    _count_split_pairs(pairs_ptr, pid_mn == 0, tiles, pid_s, SPLITS, COUNT_PAIRS)

    idx = ((pid_s * T + t) * C_in + offs_ci)[:, None] * C + offs_co[None, :]
    tl.store(part_ptr + idx, acc, mask=ci_mask[:, None] & (offs_co < C)[None, :])


# ---- projection -----------------------------------------------------------------------------------------


@triton.jit
def _branch_z(br_ptr, rows, row_mask, offs_c, BC, bmean_ptr, bscale_ptr, bshift_ptr, ACC_DTYPE: tl.constexpr):
    # The projection prologue: relu(BN(branch)) for a (pixels, channels) tile of the pre-BN branch outputs,
    # recomputed from them (never stored); 0 outside the tile, the GEMM's padding.
    c_mask = offs_c < BC
    mask = row_mask[:, None] & c_mask[None, :]
    yb = tl.load(br_ptr + rows[:, None] * BC + offs_c[None, :], mask=mask, other=0).to(ACC_DTYPE)
    return tl.where(mask, _relu(_bn_affine(yb, bmean_ptr, bscale_ptr, bshift_ptr, offs_c, c_mask, ACC_DTYPE)), 0.0)


@jit_unspecialized("HW")  # sizes: see conv_engine's _SIZES_UNSPECIALIZED
def _aspp_project_fwd_kernel(
    # pointers: branch (N, H*W, B*C) pre-BN; w (B*C, C); bias (N, C) opmath (the pooling branch);
    # y, out (N, H*W, C)
    br_ptr, w_ptr, bias_ptr, y_ptr, out_ptr,
    # BN (opmath) mean, scale, shift of every channel: the branches' at 0, the projection's at O_OFF (eval)
    mean_ptr, scale_ptr, shift_ptr,
    # training: per-tile count (P,), mean and M2 (P, C) opmath
    part_count_ptr, part_mean_ptr, part_m2_ptr,
    HW, BC, C, O_OFF,
    TRAINING: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    img, p0, p_mask, rows, offs_n, n_mask, offs_k, acc = _pixel_gemm_tile(pid_t, pid_n, HW, C, ACC_DTYPE, BLOCK_M,
                                                                          BLOCK_N, BLOCK_K)
    for k0 in range(0, BC, BLOCK_K):
        kc = k0 + offs_k
        z = _branch_z(br_ptr, rows, p_mask, kc, BC, mean_ptr, scale_ptr, shift_ptr, ACC_DTYPE)
        b = tl.load(w_ptr + kc[:, None] * C + offs_n[None, :], mask=(kc < BC)[:, None] & n_mask[None, :], other=0)
        # z rounded to the weights' dtype: what a stored normalized branch output would hold
        acc = _mma(z.to(b.dtype), b, acc, DOT_PRECISION)
    acc += tl.load(bias_ptr + img * C + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)[None, :]

    o_mask = p_mask[:, None] & n_mask[None, :]
    o_idx = (rows * C)[:, None] + offs_n[None, :]
    y_stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + o_idx, y_stored, mask=o_mask)
    y = y_stored.to(ACC_DTYPE)
    if TRAINING:
        cnt = (tl.minimum(p0 + BLOCK_M, HW) - p0).to(ACC_DTYPE)
        _tile_stats(y, o_mask, cnt, part_count_ptr, part_mean_ptr, part_m2_ptr, pid_t, C, offs_n, n_mask, pid_n == 0)
    else:
        z = _relu(_bn_affine(y, mean_ptr + O_OFF, scale_ptr + O_OFF, shift_ptr + O_OFF, offs_n, n_mask, ACC_DTYPE))
        tl.store(out_ptr + o_idx, z.to(out_ptr.dtype.element_ty), mask=o_mask)


@jit_unspecialized("HW")  # sizes: see conv_engine's _SIZES_UNSPECIALIZED
def _aspp_project_dgrad_kernel(
    # pointers: grad_out, out, project_out (N, H*W, C); coef (4, C) opmath (projection BN);
    # w (C, B*C) the projection weight's branch columns; branch (N, H*W, B*C) pre-BN and its BN (B*C,) opmath
    dz_ptr, z_ptr, y_ptr, coef_ptr, w_ptr, br_ptr, bmean_ptr, bscale_ptr, bshift_ptr,
    # outputs: g (N, H*W, B*C); per-tile sums (P, B*C) of g and g*(branch - mean); per-tile sums (P, C) of dy
    g_ptr, part_g_ptr, part_gy_ptr, part_dy_ptr,
    HW, BC, C,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    img, p0, p_mask, rows, offs_n, n_mask, offs_k, acc = _pixel_gemm_tile(pid_t, pid_n, HW, BC, ACC_DTYPE, BLOCK_M,
                                                                          BLOCK_N, BLOCK_K)
    for k0 in range(0, C, BLOCK_K):
        co = k0 + offs_k
        mean, k, a, b = _dy_coef(coef_ptr, co, C, C, ACC_DTYPE)
        dy = _dy_tile(dz_ptr, z_ptr, y_ptr, rows * C, p_mask, co, C, mean, k, a, b, True, ACC_DTYPE)
        if pid_n == 0:
            # The pooling bias's gradient: dy summed over the tile's pixels (one image per tile).
            tl.store(part_dy_ptr + pid_t * C + co, tl.sum(dy, 0), mask=co < C)
        wt = tl.load(w_ptr + co[:, None] * BC + offs_n[None, :], mask=(co < C)[:, None] & n_mask[None, :], other=0)
        acc = _mma(dy.to(wt.dtype), wt, acc, DOT_PRECISION)

    # Epilogue: the branch BNs' ReLU gradient, with z_cat's sign recomputed from the pre-BN branch outputs,
    # and the branch BN backward reduction's partial sums.
    mask = p_mask[:, None] & n_mask[None, :]
    idx = (rows * BC)[:, None] + offs_n[None, :]
    yb = tl.load(br_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
    zb = _bn_affine(yb, bmean_ptr, bscale_ptr, bshift_ptr, offs_n, n_mask, ACC_DTYPE)
    # threshold_backward(dz_cat, z_cat, 0): zero where z_cat <= 0 only (a NaN z_cat passes the gradient on)
    g_stored = tl.where(zb <= 0, 0.0, acc).to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + idx, g_stored, mask=mask)
    g = tl.where(mask, g_stored.to(ACC_DTYPE), 0.0)
    mu = tl.load(bmean_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
    tl.store(part_g_ptr + pid_t * BC + offs_n, tl.sum(g, 0), mask=n_mask)
    tl.store(part_gy_ptr + pid_t * BC + offs_n, tl.sum(g * (yb - mu[None, :]), 0), mask=n_mask)


@jit_unspecialized("N", "HW", "SPLITS")  # sizes: see conv_engine's _SIZES_UNSPECIALIZED
def _aspp_project_wgrad_kernel(
    # pointers: branch (N, H*W, B*C) pre-BN and its BN (B*C,) opmath; grad_out, out, project_out (N, H*W, C);
    # coef (4, C) opmath; partial dw (SPLITS, B*C, C) opmath
    br_ptr, bmean_ptr, bscale_ptr, bshift_ptr, dz_ptr, z_ptr, y_ptr, coef_ptr, part_ptr,
    N, HW, BC, C, SPLITS,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dW[c_cat, c] = sum_p z_cat[p, c_cat] dy[p, c]: both operands recomputed in the prologue.
    pid_mn = tl.program_id(0)
    pid_s = tl.program_id(1)
    blocks_n = tl.cdiv(C, BLOCK_N)
    offs_m = pid_mn // blocks_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_mn % blocks_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mean, k, a, b = _dy_coef(coef_ptr, offs_n, C, C, ACC_DTYPE)
    tiles = tl.cdiv(HW, BLOCK_P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for tile in range(pid_s, N * tiles, SPLITS):
        _, _, p_mask, rows = _pixel_tile(tile, HW, BLOCK_P)
        z = _branch_z(br_ptr, rows, p_mask, offs_m, BC, bmean_ptr, bscale_ptr, bshift_ptr, ACC_DTYPE)
        dy = _dy_tile(dz_ptr, z_ptr, y_ptr, rows * C, p_mask, offs_n, C, mean, k, a, b, True, ACC_DTYPE)
        zt = tl.trans(z.to(br_ptr.dtype.element_ty))
        acc = _mma(zt, dy.to(zt.dtype), acc, DOT_PRECISION)

    idx = (pid_s * BC + offs_m)[:, None] * C + offs_n[None, :]
    tl.store(part_ptr + idx, acc, mask=(offs_m < BC)[:, None] & (offs_n < C)[None, :])


# ---- image pooling ----------------------------------------------------------------------------------------


@triton.jit
def _aspp_pool_bias_kernel(
    # pointers: pool (N, C) the pooling branch's pre-BN outputs (x's dtype); its BN's mean, scale, shift (opmath,
    # channels OFF .. OFF + C); w (C, C) opmath, the projection weight's pooling columns; bias (N, C) opmath
    pool_ptr, mean_ptr, scale_ptr, shift_ptr, w_opmath_ptr, bias_ptr,
    C, OFF,
    ACC_DTYPE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # The projection's per-(image, channel) bias from the pooling branch: z = relu(BN(pool)), rounded to x's dtype
    # (what a stored branch output holds), times the pooling columns. One program: one image, BLOCK_O outputs.
    n = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < C
    acc = tl.zeros((BLOCK_O,), ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        p = tl.load(pool_ptr + n * C + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
        z = _relu(_bn_affine(p[None, :], mean_ptr + OFF, scale_ptr + OFF, shift_ptr + OFF, offs_c, c_mask,
                             ACC_DTYPE))
        z = tl.where(c_mask[None, :], z.to(pool_ptr.dtype.element_ty).to(ACC_DTYPE), 0.0)
        w = tl.load(w_opmath_ptr + offs_o[:, None] * C + offs_c[None, :], mask=o_mask[:, None] & c_mask[None, :],
                    other=0).to(ACC_DTYPE)
        acc += tl.sum(w * z, 1)
    tl.store(bias_ptr + n * C + offs_o, acc, mask=o_mask)


@jit_unspecialized("N")  # the batch size: one compiled kernel for every N
def _aspp_pool_bwd_kernel(
    # pointers: dbias (N, C) opmath, the gradient at the projection's pooling bias (dy_o summed over H x W);
    # w (C, C) opmath, the projection weight's pooling columns; pool (N, C) the pooling branch's pre-BN outputs
    # (x's dtype); its BN's mean, invstd, scale (gamma * invstd), shift (opmath, channels OFF .. OFF + C)
    dbias_ptr, w_opmath_ptr, pool_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    # outputs: the BN's sum g and sum g * xhat (opmath, channels OFF ..); dy and z (N, C) opmath
    sum_g_ptr, sum_gx_ptr, dy_opmath_ptr, z_opmath_ptr,
    N, C, OFF,
    TRAINING: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # The pooling branch's BN + ReLU backward for a block of channels over all N images: g = dbias @ w through the
    # ReLU of z = relu(BN(pool)) (rounded to x's dtype, as the forward's), the BN sums, then
    # dy = scale * (g - sum g / N - (pool - mean) * invstd * sum(g * xhat) / N) (eval: scale * g). g waits in dy's
    # buffer between the two passes (a barrier between them: a thread may read back what another wrote).
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    ch = OFF + offs_c
    mean = tl.load(mean_ptr + ch, mask=c_mask, other=0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + ch, mask=c_mask, other=0).to(ACC_DTYPE)
    scale = tl.load(scale_ptr + ch, mask=c_mask, other=0).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + ch, mask=c_mask, other=0).to(ACC_DTYPE)
    sum_g = tl.zeros((BLOCK_C,), ACC_DTYPE)
    sum_gx = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        gz = tl.zeros((BLOCK_N, BLOCK_C), ACC_DTYPE)
        for o0 in range(0, C, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            o_mask = offs_o < C
            db = tl.load(dbias_ptr + offs_n[:, None] * C + offs_o[None, :], mask=n_mask[:, None] & o_mask[None, :],
                         other=0).to(ACC_DTYPE)
            w = tl.load(w_opmath_ptr + offs_o[:, None] * C + offs_c[None, :], mask=o_mask[:, None] & c_mask[None, :],
                        other=0).to(ACC_DTYPE)
            gz += tl.sum(db[:, :, None] * w[None, :, :], 1)
        mask = n_mask[:, None] & c_mask[None, :]
        idx = offs_n[:, None] * C + offs_c[None, :]
        p = tl.load(pool_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
        z = _relu((p - mean[None, :]) * scale[None, :] + shift[None, :])
        z = z.to(pool_ptr.dtype.element_ty).to(ACC_DTYPE)
        # threshold_backward(gz, z, 0): zero where z <= 0 only (a NaN z passes the gradient on)
        g = tl.where(mask & ~(z <= 0), gz, 0.0)
        xhat = (p - mean[None, :]) * invstd[None, :]
        sum_g += tl.sum(g, 0)
        sum_gx += tl.sum(tl.where(mask, g * xhat, 0.0), 0)
        tl.store(z_opmath_ptr + idx, z, mask=mask)
        tl.store(dy_opmath_ptr + idx, g, mask=mask)
    tl.store(sum_g_ptr + ch, sum_g, mask=c_mask)
    tl.store(sum_gx_ptr + ch, sum_gx, mask=c_mask)
    tl.debug_barrier()  # g's stores visible to every thread of the program before the second pass reads them
    # dy's coefficients as every BN backward here has them (_bn_dy; a = b = 0 in eval)
    a = tl.zeros((BLOCK_C,), ACC_DTYPE)
    b = tl.zeros((BLOCK_C,), ACC_DTYPE)
    if TRAINING:
        a = _div(sum_g, N)
        b = _div(invstd * sum_gx, N)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < N)[:, None] & c_mask[None, :]
        idx = offs_n[:, None] * C + offs_c[None, :]
        g = tl.load(dy_opmath_ptr + idx, mask=mask, other=0)
        p = tl.load(pool_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
        tl.store(dy_opmath_ptr + idx, _bn_dy(g, p, mean, scale, a, b), mask=mask)


def pool_bwd_blocks(c: int) -> dict:
    """The pooling backward kernel's blocks for C channels (fixed: not tuned)."""
    return dict(BLOCK_N=16, BLOCK_O=16, BLOCK_C=min(32, max(16, next_power_of_2(c))))


def pool_bias_blocks(c: int) -> dict:
    """The pooling-bias kernel's blocks for C channels (fixed: not tuned)."""
    block = min(64, max(16, next_power_of_2(c)))
    return dict(BLOCK_O=block, BLOCK_C=block)


# ---- configurations ------------------------------------------------------------------------------------

# 1x1 GEMMs over pixels: tiles of BLOCK_M consecutive pixels of one image x BLOCK_N channels, K = BLOCK_K.
def _pixel_cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


HOPPER_PROJ = [
    _pixel_cfg(128, 128, 64, 8, 3), _pixel_cfg(128, 64, 64, 4, 4), _pixel_cfg(64, 128, 32, 8, 3),
    _pixel_cfg(64, 64, 32, 4, 4), _pixel_cfg(64, 32, 32, 4, 3), _pixel_cfg(16, 16, 16, 2, 3),
]
AMPERE_PROJ = [
    _pixel_cfg(128, 128, 32, 8, 3), _pixel_cfg(64, 64, 32, 4, 3), _pixel_cfg(64, 64, 64, 4, 2),
    _pixel_cfg(64, 32, 32, 4, 3), _pixel_cfg(16, 16, 16, 2, 2),
]


def _wgrad_cfg(bp, bm, bn, warps, stages):
    return triton.Config({"BLOCK_P": bp, "BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


HOPPER_PROJ_WGRAD = [_wgrad_cfg(64, 128, 128, 8, 3), _wgrad_cfg(64, 64, 128, 4, 4), _wgrad_cfg(64, 64, 64, 4, 4),
                     _wgrad_cfg(32, 64, 32, 4, 3), _wgrad_cfg(16, 16, 16, 2, 3)]
AMPERE_PROJ_WGRAD = [_wgrad_cfg(64, 128, 64, 8, 3), _wgrad_cfg(64, 64, 64, 4, 3), _wgrad_cfg(32, 32, 32, 4, 2),
                     _wgrad_cfg(16, 16, 16, 2, 2)]

# Under the interpreter (and when counting pairs). Its cost is per tile operation, nearly independent of the
# tile's size, so tiles are large: 32x32 pixels (a 33x33 map is 2x2 tiles, ragged ones included) run the
# branch kernels in half the time of the engine's 16x16; channel blocks are the smallest tl.dot accepts.
INTERPRETER_CONFIGS = {
    "branch_fwd": dict(BLOCK_H=32, BLOCK_W=32, BLOCK_N=16, BLOCK_K=16),
    "branch_dgrad": dict(BLOCK_H=32, BLOCK_W=32, BLOCK_N=16, BLOCK_K=16),
    "branch_wgrad": dict(BLOCK_H=32, BLOCK_W=32, BLOCK_M=16, BLOCK_N=16),
    "project_fwd": dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16),
    "project_dgrad": dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16),
    "project_wgrad": dict(BLOCK_P=64, BLOCK_M=16, BLOCK_N=16),
}

_SPATIAL = ("C_in", "C", "BC", "H", "W")
_PIXELS = ("HW", "BC", "C")


def _spec(name, kernel, hopper, ampere, prune_args, bucketed, exact=()):
    return KernelSpec(kernel, hopper, ampere, INTERPRETER_CONFIGS[name],
                      fit_pruner(kernel, prune_by_channels(*prune_args)), bucketed, exact)


def _proj_stage(b, e, o, loads=1, rows=3):
    # `loads` (pixels x K) activation tiles, `rows` per-channel opmath rows of K, and the (K x N) weight tile.
    return (loads * b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"] * e + rows * b["BLOCK_K"] * o


def _proj_wgrad_stage(b, e, o):
    # The branch tile (pixels x M) with its BN rows, and the three (pixels x N) tiles of dy's prologue.
    return (b["BLOCK_M"] + 3 * b["BLOCK_N"]) * b["BLOCK_P"] * e + 3 * b["BLOCK_M"] * o


STAGE_BYTES.update({
    _aspp_branch_fwd_kernel: _fwd_stage,
    _aspp_branch_dgrad_kernel: lambda b, e, o: _dgrad_stage(b, e, o, loads=2),
    _aspp_branch_wgrad_kernel: lambda b, e, o: _wgrad_stage(b, e, o, loads=2),
    _aspp_project_fwd_kernel: _proj_stage,
    _aspp_project_dgrad_kernel: lambda b, e, o: _proj_stage(b, e, o, loads=3, rows=4),
    _aspp_project_wgrad_kernel: _proj_wgrad_stage,
})
PIPELINE.update({
    _aspp_branch_fwd_kernel: "direct", _aspp_branch_dgrad_kernel: "prologue",
    _aspp_branch_wgrad_kernel: "wgrad", _aspp_project_fwd_kernel: "prologue",
    _aspp_project_dgrad_kernel: "prologue", _aspp_project_wgrad_kernel: "wgrad",
})
MMA_SHAPE.update({
    _aspp_branch_fwd_kernel: MMA_SHAPE[_conv_fwd_kernel],
    _aspp_branch_dgrad_kernel: MMA_SHAPE[_conv_dgrad_kernel],
    _aspp_branch_wgrad_kernel: MMA_SHAPE[_conv_wgrad_kernel],
    _aspp_project_fwd_kernel: lambda b: (b["BLOCK_M"], b["BLOCK_K"], b["BLOCK_N"]),
    _aspp_project_dgrad_kernel: lambda b: (b["BLOCK_M"], b["BLOCK_K"], b["BLOCK_N"]),
    _aspp_project_wgrad_kernel: lambda b: (b["BLOCK_M"], b["BLOCK_P"], b["BLOCK_N"]),
})


KERNELS = {
    "branch_fwd": _spec("branch_fwd", _aspp_branch_fwd_kernel, HOPPER_GEMM, AMPERE_GEMM,
                        ("C", "C_in", "BLOCK_N", "BLOCK_K"), _SPATIAL),
    "branch_dgrad": _spec("branch_dgrad", _aspp_branch_dgrad_kernel, HOPPER_GEMM, AMPERE_GEMM,
                          ("C_in", "C", "BLOCK_N", "BLOCK_K"), _SPATIAL),
    "branch_wgrad": _spec("branch_wgrad", _aspp_branch_wgrad_kernel, HOPPER_WGRAD, AMPERE_WGRAD,
                          ("C", "C_in", "BLOCK_N", "BLOCK_M"), _SPATIAL, ("SPLITS",)),
    "project_fwd": _spec("project_fwd", _aspp_project_fwd_kernel, HOPPER_PROJ, AMPERE_PROJ,
                         ("C", "BC", "BLOCK_N", "BLOCK_K"), _PIXELS),
    "project_dgrad": _spec("project_dgrad", _aspp_project_dgrad_kernel, HOPPER_PROJ, AMPERE_PROJ,
                           ("BC", "C", "BLOCK_N", "BLOCK_K"), _PIXELS),
    "project_wgrad": _spec("project_wgrad", _aspp_project_wgrad_kernel, HOPPER_PROJ_WGRAD, AMPERE_PROJ_WGRAD,
                           ("C", "BC", "BLOCK_N", "BLOCK_M"), _PIXELS, ("SPLITS",)),
}


def _meta(t: Tensor, **flags) -> dict:
    return dict(flags, ACC_DTYPE=acc_dtype(t.dtype), DOT_PRECISION=dot_precision(t.dtype, t.device))


# ---- launchers -----------------------------------------------------------------------------------------


def branch_forward(xh: Tensor, w: Tensor, rates: Tensor, c: int, *, training: bool, stat_dtype: torch.dtype,
                   pairs: Tensor | None = None, config: dict | None = None):
    """Every conv branch in one launch: (y (N, H, W, B*C), partials (count (P,), mean, M2 (P, B*C)) or None).

    w: packed (T, C_in, C); rates: (B,) int32 dilations (entry 0, the 1x1 branch, unused).
    """
    n, h, wd, c_in = xh.shape
    nb = rates.shape[0]
    bc = nb * c
    y = xh.new_empty((n, h, wd, bc))
    meta = _meta(xh, TRAINING=training, COUNT_PAIRS=pairs is not None)

    def run(cfg):
        p = n * cdiv(h, cfg["BLOCK_H"]) * cdiv(wd, cfg["BLOCK_W"])
        parts = None
        if training:
            parts = (torch.empty(p, dtype=stat_dtype, device=xh.device),
                     torch.empty(p, bc, dtype=stat_dtype, device=xh.device),
                     torch.empty(p, bc, dtype=stat_dtype, device=xh.device))
        launch_kernel(_aspp_branch_fwd_kernel, (p, nb * cdiv(c, cfg["BLOCK_N"])),
                      xh, w, rates, y, *(parts if parts is not None else (y, y, y)),
                      pairs if pairs is not None else rates, h, wd, c_in, c, bc, **meta, **cfg)
        return parts

    sizes = dict(C_in=c_in, C=c, BC=bc, N=n, H=h, W=wd, **fit_sizes(xh))
    parts = run_tuned(KERNELS["branch_fwd"], xh.device, xh.dtype, sizes, meta, run, config)
    return y, parts


def branch_dgrad(g: Tensor, y: Tensor, coef: Tensor, wt: Tensor, rates: Tensor, dx_pool: Tensor, *,
                 pairs: Tensor | None = None, config: dict | None = None) -> Tensor:
    """dx (N, H, W, C_in) of every branch at once, plus the per-(image, C_in) `dx_pool` (opmath, (N, C_in)).

    g, y: (N, H, W, B*C); coef: (4, B*C); wt: packed (T, C, C_in).
    """
    n, h, wd, bc = y.shape
    nb = rates.shape[0]
    c = bc // nb
    c_in = wt.shape[2]
    dx = y.new_empty((n, h, wd, c_in))
    meta = _meta(y, COUNT_PAIRS=pairs is not None)

    def run(cfg):
        launch_kernel(_aspp_branch_dgrad_kernel,
                      (n * cdiv(h, cfg["BLOCK_H"]) * cdiv(wd, cfg["BLOCK_W"]),
                       cdiv(c_in, cfg["BLOCK_N"])),
                      g, y, coef, wt, rates, dx_pool, dx, pairs if pairs is not None else rates, h, wd, c_in, c, bc,
                      nb, **meta, **cfg)

    run_tuned(KERNELS["branch_dgrad"], y.device, y.dtype, dict(C_in=c_in, C=c, BC=bc, N=n, H=h, W=wd, **fit_sizes(y)),
              meta, run, config)
    return dx


def branch_wgrad(xh: Tensor, g: Tensor, y: Tensor, coef: Tensor, rates: Tensor, *, pairs: Tensor | None = None,
                 config: dict | None = None, outs: list[Tensor] | None = None) -> Tensor | list[Tensor]:
    """Packed dw (T, C_in, C) of every branch in one launch, in the opmath dtype; or summed straight into `outs`,
    the branches' (C, C_in, KH, KW) gradients (opmath dtype, any memory format)."""
    n, h, wd, c_in = xh.shape
    bc = y.shape[3]
    nb = rates.shape[0]
    c = bc // nb
    t = 1 + 9 * (nb - 1)
    splits = split_count(xh.device, t * cdiv(c_in, 64) * cdiv(c, 64), n * cdiv(h * wd, 64))
    part = torch.empty(splits, t, c_in, c, dtype=coef.dtype, device=xh.device)
    meta = _meta(xh, COUNT_PAIRS=pairs is not None)

    def run(cfg):
        launch_kernel(_aspp_branch_wgrad_kernel,
                      (t * cdiv(c_in, cfg["BLOCK_M"]) * cdiv(c, cfg["BLOCK_N"]), 1, splits),
                      xh, g, y, coef, rates, part, pairs if pairs is not None else rates, n, h, wd, c_in, c, bc, t,
                      splits, **meta, **cfg)

    run_tuned(KERNELS["branch_wgrad"], xh.device, xh.dtype, dict(C_in=c_in, C=c, BC=bc, N=n, H=h, W=wd, SPLITS=splits,
                                                                  **fit_sizes(xh)), meta, run, config)
    if outs is None:
        return part.sum(0)
    torch.sum(part[:, 0, :, :, None, None].transpose(1, 2), 0, out=outs[0])
    for i in range(1, nb):
        taps = part[:, 1 + 9 * (i - 1):1 + 9 * i].view(splits, 3, 3, c_in, c)
        torch.sum(taps.permute(0, 4, 3, 1, 2), 0, out=outs[i])
    return outs


def project_forward(br: Tensor, w: Tensor, bias: Tensor, affine: tuple[Tensor, Tensor, Tensor], *, training: bool,
                    stat_dtype: torch.dtype, out_offset: int = 0):
    """The projection over normalized branches (BN + ReLU in the prologue) plus the pooling bias (N, C).

    affine: (mean, scale, shift) of every BN channel (the branches' first). training: (y, None, partials);
    eval: (y, out, None) with out = relu(BN(y)), the projection's BN at channels out_offset ...
    """
    n, h, wd, bc = br.shape
    c = w.shape[1]
    hw = h * wd
    y = br.new_empty((n, h, wd, c))
    out = br.new_empty((n, h, wd, c)) if not training else None
    meta = _meta(br, TRAINING=training)

    def run(cfg):
        p = n * cdiv(hw, cfg["BLOCK_M"])
        parts = None
        if training:
            parts = (torch.empty(p, dtype=stat_dtype, device=br.device),
                     torch.empty(p, c, dtype=stat_dtype, device=br.device),
                     torch.empty(p, c, dtype=stat_dtype, device=br.device))
        launch_kernel(_aspp_project_fwd_kernel, (p, cdiv(c, cfg["BLOCK_N"])),
                      br, w, bias, y, out if out is not None else y, *affine,
                      *(parts if parts is not None else (y, y, y)), hw, bc, c, out_offset, **meta, **cfg)
        return parts

    parts = run_tuned(KERNELS["project_fwd"], br.device, br.dtype, dict(N=n, HW=hw, BC=bc, C=c, **fit_sizes(br)), meta,
                      run)
    return y, out, parts


def project_dgrad(dz: Tensor, z: Tensor, y: Tensor, coef: Tensor, w: Tensor, br: Tensor,
                  branch_affine: tuple[Tensor, Tensor, Tensor]):
    """(g_b (N, H, W, B*C), partial sums (P, B*C) of g_b and g_b*(branch - mean), sum over H x W of dy (N, C)).

    w: (C, B*C), the projection weight's branch columns.
    """
    n, h, wd, c = y.shape
    bc = br.shape[3]
    hw = h * wd
    stat = coef.dtype
    g = br.new_empty(br.shape)
    meta = _meta(br)

    def run(cfg):
        tiles = cdiv(hw, cfg["BLOCK_M"])
        part_g = torch.empty(n * tiles, bc, dtype=stat, device=br.device)
        part_gy = torch.empty(n * tiles, bc, dtype=stat, device=br.device)
        part_dy = torch.empty(n, tiles, c, dtype=stat, device=br.device)
        launch_kernel(_aspp_project_dgrad_kernel, (n * tiles, cdiv(bc, cfg["BLOCK_N"])),
                      dz, z, y, coef, w, br, *branch_affine, g, part_g, part_gy, part_dy, hw, bc, c, **meta, **cfg)
        return part_g, part_gy, part_dy

    part_g, part_gy, part_dy = run_tuned(KERNELS["project_dgrad"], br.device, br.dtype,
                                         dict(N=n, HW=hw, BC=bc, C=c, **fit_sizes(br)), meta, run)
    return g, part_g, part_gy, part_dy.sum(1)


def project_wgrad(br: Tensor, branch_affine: tuple[Tensor, Tensor, Tensor], dz: Tensor, z: Tensor, y: Tensor,
                  coef: Tensor, out: Tensor | None = None) -> Tensor:
    """dW (B*C, C) of the projection's branch columns, in the opmath dtype; the split partials summed into `out`
    (any strides) when given."""
    n, h, wd, bc = br.shape
    c = y.shape[3]
    hw = h * wd
    splits = split_count(br.device, cdiv(bc, 64) * cdiv(c, 64), n * cdiv(hw, 64))
    part = torch.empty(splits, bc, c, dtype=coef.dtype, device=br.device)
    meta = _meta(br)

    def run(cfg):
        launch_kernel(_aspp_project_wgrad_kernel,
                      (cdiv(bc, cfg["BLOCK_M"]) * cdiv(c, cfg["BLOCK_N"]), splits),
                      br, *branch_affine, dz, z, y, coef, part, n, hw, bc, c, splits, **meta, **cfg)

    run_tuned(KERNELS["project_wgrad"], br.device, br.dtype,
              dict(N=n, HW=hw, BC=bc, C=c, SPLITS=splits, **fit_sizes(br)), meta, run)
    return part.sum(0) if out is None else torch.sum(part, 0, out=out)


def pool_bias(pool: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, w: Tensor, offset: int) -> Tensor:
    """(N, C) opmath: relu(BN(pool)) rounded to pool's dtype, times w^T (the projection's (C, C) pooling columns,
    opmath); the BN's statistics at channels offset .. offset + C of mean, scale and shift."""
    n, c = pool.shape
    bias = torch.empty((n, c), dtype=w.dtype, device=pool.device)
    blocks = pool_bias_blocks(c)
    launch_kernel(_aspp_pool_bias_kernel, (n, cdiv(c, blocks["BLOCK_O"])),
                  pool, mean, scale, shift, w, bias, c, offset, ACC_DTYPE=acc_dtype(w.dtype), **blocks)
    return bias


def pool_backward(dbias: Tensor, w: Tensor, pool: Tensor, stats: tuple[Tensor, Tensor, Tensor, Tensor],
                  sums: tuple[Tensor, Tensor], offset: int, training: bool) -> tuple[Tensor, Tensor]:
    """The pooling branch's BN + ReLU backward: (dy, z), both (N, C) opmath; the BN's sum g and sum g * xhat written
    into `sums` at channels offset .. offset + C. stats: (mean, invstd, scale, shift) of every BN channel."""
    n, c = pool.shape
    dy = torch.empty((n, c), dtype=w.dtype, device=pool.device)
    z = torch.empty((n, c), dtype=w.dtype, device=pool.device)
    blocks = pool_bwd_blocks(c)
    launch_kernel(_aspp_pool_bwd_kernel, (cdiv(c, blocks["BLOCK_C"]),),
                  dbias, w, pool, *stats, *sums, dy, z, n, c, offset, TRAINING=training,
                  ACC_DTYPE=acc_dtype(w.dtype), **blocks)
    return dy, z


# ---- packed weights (cached per parameter version: packing.cached) --------------------------------------


def pack_branch_weights(conv_weights: list[Tensor]) -> Tensor:
    """(T, C_in, C): the 1x1 weight, then each 3x3 weight's taps in (kh, kw) order; K-major B operands."""
    def build():
        c, c_in = conv_weights[0].shape[:2]
        parts = [conv_weights[0].detach().reshape(c, c_in).t()]
        parts += [w.detach().permute(2, 3, 1, 0).reshape(9, c_in, c) for w in conv_weights[1:]]
        return torch.cat([p.reshape(-1, c_in, c) for p in parts])

    return cached("aspp_branch", conv_weights, build)


def _branch_weights_t(conv_weights: list[Tensor]) -> Tensor:
    # (T, C, C_in): the branch dgrad's B operands.
    return cached("aspp_branch_t", conv_weights, lambda: pack_branch_weights(conv_weights).transpose(1, 2).contiguous())


def _project_weights(project_weight: Tensor, bc: int, stat: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    # (B*C, C) K-major forward operand, (C, B*C) dgrad operand, (C, C) pooling columns in the opmath dtype.
    def columns(lo, hi):
        return project_weight.detach().flatten(1)[:, lo:hi]

    return (cached("aspp_proj", (project_weight,), lambda: columns(0, bc).t().contiguous()),
            cached("aspp_proj_t", (project_weight,), lambda: columns(0, bc).contiguous()),
            # row-major whatever the weight's strides (the pooling kernels index it so; .to(copy=True) would keep a
            # column-major weight's strides)
            cached(f"aspp_proj_pool_{stat}", (project_weight,),
                   lambda: columns(bc, None).to(stat, memory_format=torch.contiguous_format, copy=True)))


def _pool_weight(pool_weight: Tensor, stat: torch.dtype) -> Tensor:
    # (C, C_in) in the opmath dtype.
    c = pool_weight.shape[0]
    return cached(f"aspp_pool_{stat}", (pool_weight,), lambda: pool_weight.detach().reshape(c, -1).to(stat, copy=True))


def _pool_weight_t(pool_weight: Tensor, stat: torch.dtype) -> Tensor:
    # (C_in, C) in the opmath dtype: the forward's B operand, a transposed view (no .t() per call).
    return cached(f"aspp_pool_t_{stat}", (pool_weight,), lambda: _pool_weight(pool_weight, stat).t())


def _rate_table(rates: tuple[int, ...], device: torch.device) -> Tensor:
    """The branches' dilations (entry 0: the 1x1 branch) on the device, read-only in the kernels
    (launch.device_constants)."""
    return device_constants((1, *rates), torch.int32, device)


# ---- host side of the op ----------------------------------------------------------------------------------


def forward(
    x: Tensor, conv_weights: list[Tensor], pool_weight: Tensor, project_weight: Tensor, bn_weight: Tensor,
    bn_bias: Tensor, running_mean: Tensor | None, running_var: Tensor | None, rates: list[int], training: bool,
    momentum: float, eps: float,
) -> tuple[Tensor, ...]:
    """(out, branch_out, pool_out, project_out, save_mean, save_invstd, new_running_mean, new_running_var)."""
    check_device(x)
    bn_weight, bn_bias, running_mean, running_var = vectors(bn_weight, bn_bias, running_mean, running_var)
    n, c_in, h, wd = x.shape
    c = conv_weights[0].shape[0]
    bc = len(conv_weights) * c
    nbn = bc + 2 * c
    mf = suggest_memory_format(x)
    stat = opmath_dtype(x.dtype)
    has_running = running_mean is not None
    xh = to_nhwc(x)
    w_main, _, w_pool = _project_weights(project_weight, bc, stat)
    if training:
        # Every BatchNorm's statistics land in their block of these buffers: no concatenation.
        save_mean, save_invstd = x.new_empty(nbn, dtype=stat), x.new_empty(nbn, dtype=stat)
        scale, shift = x.new_empty(nbn, dtype=stat), x.new_empty(nbn, dtype=stat)
        if has_running:
            new_rm, new_rv = torch.empty_like(running_mean), torch.empty_like(running_var)
        else:
            new_rm = new_rv = None
        stats = (save_mean, save_invstd, scale, shift, new_rm, new_rv)

        def finalize(parts, offset):
            bn_finalize(*parts, bn_weight, bn_bias, running_mean, running_var, momentum, eps, out=stats,
                        offset=offset)
    else:
        save_mean, save_invstd, scale, shift = bn_eval_stats(running_mean, running_var, bn_weight, bn_bias, eps, stat)

    # Conv branches: one launch, pre-BN outputs in their channel slices, statistics partials.
    branch, parts_b = branch_forward(xh, pack_branch_weights(conv_weights), _rate_table(tuple(rates), x.device), c,
                                     training=training, stat_dtype=stat)
    if training:
        finalize(parts_b, 0)
    # Image pooling on (N, C) vectors: its BN merges N partials of one image each (count 1, M2 0); its normalized
    # output enters the projection as a per-(image, channel) bias (pool_bias: one launch).
    pool_pre = torch.mm(xh.mean((1, 2), dtype=stat), _pool_weight_t(pool_weight, stat))
    if x.dtype != stat:
        pool_pre = pool_pre.to(x.dtype)
    if training:
        finalize((None, pool_pre if x.dtype == stat else pool_pre.to(stat), None), bc)
    bias = pool_bias(pool_pre, save_mean, scale, shift, w_pool, bc)
    # Projection: branch BN + ReLU in the prologue, the pooling bias and the BN statistics in the epilogue.
    proj, out, parts_o = project_forward(branch, w_main, bias, (save_mean, scale, shift), training=training,
                                         stat_dtype=stat, out_offset=bc + c)
    if training:
        finalize(parts_o, bc + c)
        sl_o = slice(bc + c, nbn)
        out = bn_apply(proj, save_mean[sl_o], scale[sl_o], shift[sl_o], None, True)
    if not (training and has_running):
        rdt = running_mean.dtype if has_running else stat
        new_rm, new_rv = x.new_empty((0,), dtype=rdt), x.new_empty((0,), dtype=rdt)
    # branch_out and project_out only feed the backward, which reads them as NHWC: channels_last whatever x's
    # format (no copies out; the fake kernel says so).
    cl = torch.channels_last
    return (from_nhwc(out, mf), from_nhwc(branch, cl), pool_pre, from_nhwc(proj, cl), save_mean, save_invstd,
            new_rm, new_rv)


def backward(
    grad_out: Tensor, x: Tensor, conv_weights: list[Tensor], pool_weight: Tensor, project_weight: Tensor,
    bn_weight: Tensor, bn_bias: Tensor, branch_out: Tensor, pool_out: Tensor, project_out: Tensor, out: Tensor,
    save_mean: Tensor, save_invstd: Tensor, rates: list[int], training: bool, output_mask: list[bool],
) -> tuple:
    """(grad_x, grad_conv_weights, grad_pool_weight, grad_project_weight, grad_bn_weight, grad_bn_bias)."""
    check_device(x)
    bn_weight, bn_bias, save_mean, save_invstd = vectors(bn_weight, bn_bias, save_mean, save_invstd)
    n, c_in, h, wd = x.shape
    c = conv_weights[0].shape[0]
    nb = len(conv_weights)
    bc = nb * c
    nbn = bc + 2 * c
    count = n * h * wd
    stat = save_mean.dtype
    mean, invstd = save_mean, save_invstd
    dz, z, yo, br = to_nhwc(grad_out), to_nhwc(out), to_nhwc(project_out), to_nhwc(branch_out)
    w_main, w_main_t, w_pool = _project_weights(project_weight, bc, stat)
    # Every BN's (mean, scale, shift) at once; the kernels read the branches' block (channels 0 .. B*C).
    # (a half-precision gamma promotes to stat in the product; no .to() call where the dtypes agree)
    branch_affine = (mean, bn_weight * invstd, bn_bias if bn_bias.dtype == stat else bn_bias.to(stat))
    grad_bb, grad_bw = save_mean.new_empty(nbn), save_mean.new_empty(nbn)
    coef_o, coef_b = save_mean.new_empty(4, c), save_mean.new_empty(4, bc)  # rows (mean, k, a, b) of dy

    # Projection BN: one reduction pass + finalize; dy_o itself lives only in the GEMM prologues below.
    o = bc + c
    part_g, part_gy, _ = bn_backward_reduce(dz, z, yo, mean[o:], True, store_g=False)
    bn_backward_finalize(part_g, part_gy, mean, invstd, bn_weight, count, training, out=(grad_bb, grad_bw, coef_o),
                         offset=o)
    g_b, part_gb, part_gyb, dbias = project_dgrad(dz, z, yo, coef_o, w_main_t, br, branch_affine)
    bn_backward_finalize(part_gb, part_gyb, mean, invstd, bn_weight, count, training,
                         out=(grad_bb, grad_bw, coef_b))

    # Image pooling on (N, C) vectors: its bias's gradient is dy_o summed over H x W (dbias); its BN + ReLU
    # backward one launch. pool_out as the kernel reads it: contiguous, in x's dtype (the forward's; the dtype its
    # ReLU output was rounded to).
    pool_out = (pool_out if pool_out.dtype == x.dtype else pool_out.to(x.dtype)).contiguous()
    dy_p, z_p = pool_backward(dbias, w_pool, pool_out, (mean, invstd, *branch_affine[1:]), (grad_bb, grad_bw), bc,
                              training)

    grad_x, grad_conv, grad_pool, grad_proj = None, [], None, None
    rate_t = _rate_table(tuple(rates), x.device)
    if output_mask[0]:
        # The pooling branch's share of dx is uniform over H x W: a per-(image, C_in) bias of the dgrad epilogue.
        dx_pool = torch.mm(dy_p, _pool_weight(pool_weight, stat)).div_(h * wd)
        dx = branch_dgrad(g_b, br, coef_b, _branch_weights_t(conv_weights), rate_t, dx_pool)
        grad_x = from_nhwc(dx, suggest_memory_format(x))
    if output_mask[1]:
        xh = to_nhwc(x)
        if all(w.dtype == stat for w in conv_weights):
            # The split partials reduced straight into each weight's layout: no permute copies.
            grad_conv = branch_wgrad(xh, g_b, br, coef_b, rate_t, outs=[
                torch.empty_like(w, memory_format=suggest_memory_format(w)) for w in conv_weights])
        else:
            dw = branch_wgrad(xh, g_b, br, coef_b, rate_t)  # (T, C_in, C)
            grad_conv = [dw[0].t().reshape(c, c_in, 1, 1)]
            for i in range(1, nb):
                grad_conv.append(dw[1 + 9 * (i - 1):1 + 9 * i].view(3, 3, c_in, c).permute(3, 2, 0, 1))
            grad_conv = [gw.to(w.dtype).contiguous(memory_format=suggest_memory_format(w))
                         for gw, w in zip(grad_conv, conv_weights, strict=True)]
        grad_pool = torch.mm(dy_p.t(), xh.mean((1, 2), dtype=stat)).view(c, c_in, 1, 1)
        if pool_weight.dtype != stat:
            grad_pool = grad_pool.to(pool_weight.dtype)
        # The projection's gradient: the branch columns summed straight into their block, the pooling columns
        # beside them (no cat).
        grad_proj = dz.new_empty((c, bc + c), dtype=stat)
        project_wgrad(br, branch_affine, dz, z, yo, coef_o, out=grad_proj[:, :bc].t())
        torch.mm(dbias.t(), z_p, out=grad_proj[:, bc:])
        grad_proj = grad_proj.view(c, bc + c, 1, 1)
        if project_weight.dtype != stat:
            grad_proj = grad_proj.to(project_weight.dtype)
        grad_proj = grad_proj.contiguous(memory_format=suggest_memory_format(project_weight))
    if not output_mask[2]:
        grad_bw = grad_bb = None
    grad_conv = [strided_like(g, w) for g, w in zip(grad_conv, conv_weights, strict=False)]
    return grad_x, grad_conv, strided_like(grad_pool, pool_weight), strided_like(grad_proj, project_weight), grad_bw, \
        grad_bb


# ---- the padding-tap schedule ---------------------------------------------------------------------------


def schedule(x_shape: tuple[int, ...], rates: tuple[int, ...], block_h: int, block_w: int,
             pass_: str = "forward") -> tuple[int, int]:
    """(pairs computed, pairs in the dense problem) of (tile, tap, branch) triples over every conv branch.

    The 1x1 branch has one tap that always hits; each 3x3 branch follows conv_bn_relu's schedule.
    """
    n, c_in, h, w = x_shape
    tiles = n * (cdiv(h, block_h) * cdiv(w, block_w))
    computed, dense = tiles, tiles
    for r in rates:
        got, full = conv_schedule(x_shape, (1, c_in, 3, 3), (1, 1), (r, r), (r, r), block_h, block_w, pass_)
        computed, dense = computed + got, dense + full
    return computed, dense


def count_computed_pairs(x: Tensor, conv_weights: list[Tensor], rates: tuple[int, ...], block_h: int,
                         block_w: int) -> dict[str, int]:
    """Run the branch forward, dgrad and wgrad kernels with BLOCK_H x BLOCK_W tiles, each counting the
    (tile, tap, branch) triples it computed: the measured side of `schedule`."""
    check_device(x)
    stat = opmath_dtype(x.dtype)
    xh = to_nhwc(x)
    c = conv_weights[0].shape[0]
    nb = len(conv_weights)
    rate_t = _rate_table(tuple(rates), x.device)
    w = pack_branch_weights(conv_weights)
    pairs = torch.zeros(1, dtype=torch.int32, device=x.device)
    cfg = dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_N=16, BLOCK_K=16)
    y, _ = branch_forward(xh, w, rate_t, c, training=True, stat_dtype=stat, pairs=pairs, config=cfg)
    counts = {"forward": int(pairs.item())}
    coef = torch.randn(4, nb * c, dtype=stat, device=x.device)
    pairs.zero_()
    dx_pool = torch.zeros(x.shape[0], x.shape[1], dtype=stat, device=x.device)
    branch_dgrad(y, y, coef, _branch_weights_t(conv_weights), rate_t, dx_pool, pairs=pairs, config=cfg)
    counts["dgrad"] = int(pairs.item())
    pairs.zero_()
    branch_wgrad(xh, y, y, coef, rate_t, pairs=pairs,
                 config=dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_M=16, BLOCK_N=16))
    counts["wgrad"] = int(pairs.item())
    return counts

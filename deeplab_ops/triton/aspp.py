"""The triton backend of the fused ASPP op: kernels of deeplab_ops::triton_aspp_forward / _backward.

Same contract as the C++ composite (csrc/aspp.cpp): the op returns (out, branch_out, pool_out, project_out,
save_mean, save_invstd, new_running_mean, new_running_var), with branch_out the pre-BN outputs of every conv
branch as one (N, B*C, H, W) tensor. NHWC is native; NCHW tensors are converted once on the way in and out.

Conv branches (B = 1 + len(rates)) run in ONE implicit-GEMM launch. The grid is (spatial tile, (branch, C_out
block)); a program reads its branch's dilation from a small table and its weights from one packed
(T, C_in, C) tensor, T = 1 + 9 * len(rates) (the 1x1 branch is "tap 0", then 9 taps per rate). Every branch of a
tile reads the same x tile (the 1x1 branch and the 3x3 centre taps exactly the same addresses), so the B
programs of a tile hit it in L2. A (tile, tap, branch) triple whose tap reads only zero padding for the whole
tile is skipped (no loads, no MMAs), in forward, dgrad and wgrad alike. The epilogue writes the pre-BN output
into the branch's channel slice of the (N, H, W, B*C) buffer and the tile's per-channel (count, mean, M2): there
is no concat, and one Chan finalize covers every branch's BatchNorm.

Image pooling. Its branch is constant over H x W, so it is a per-(image, channel) bias of the projection,
W_proj[:, pool slice] @ relu(bn(pool_conv(mean_hw(x)))): (N, C) vectors handled on the host (N*C*C_in work),
never broadcast to H x W. Backward: its gradient is the projection's dy summed over H x W (partials from the
projection dgrad prologue) and its share of dx a per-(image, C_in) bias of the branch dgrad epilogue.

Projection (1x1 over the B*C branch channels). Its prologue applies the branches' BN + ReLU to the pre-BN
branch tile as it loads it (normalized branch outputs never exist in memory, in forward or backward); its
epilogue adds the pooling bias and writes the projection BN partials (training) or applies BN + ReLU (eval).

Forward: training 6 launches (branches, branch finalize, pooling finalize, projection, projection finalize,
apply), eval 2 (branches; projection with the BN + ReLU epilogue), plus the pooling branch's (N, C) host math.
Backward, with dy computed in the GEMM prologues (never stored), 5 launches:
  bn_backward_reduce of the projection BN
  projection dgrad  prologue: dy_o from (grad_out, out, project_out); epilogue: g_b = dz_cat * 1[!(z_cat <= 0)]
                    with z_cat recomputed from branch_out, stored with per-tile sums of g_b and g_b * (y - mean)
                    (the branch BNs' backward reduction) and per-tile sums of dy_o (the pooling bias gradient)
  projection wgrad  A = z_cat recomputed in the prologue, B = dy_o recomputed in the prologue
  branch dgrad      one launch: every branch's taps accumulate into one dx (+ the pooling branch's share)
  branch wgrad      one launch over (branch, tap) pairs; dy_b = k*(g_b - a - (y - mean)*b) in the prologue
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from deeplab_ops.backends import interpreter_active
from deeplab_ops.ops.bn_stages import opmath_dtype
from deeplab_ops.triton.bn_kernels import _relu, acc_dtype, bn_apply, bn_backward_reduce, bn_finalize
from deeplab_ops.triton.conv_bn_relu import _check_device, _from_nhwc, _nhwc
from deeplab_ops.triton.conv_bn_relu import schedule as conv_schedule
from deeplab_ops.triton.conv_engine import (
    _AMPERE_GEMM,
    _AMPERE_WGRAD,
    _HOPPER_GEMM,
    _HOPPER_WGRAD,
    _dy_coef,
    _dy_tile,
    _multiples_hit,
    _prune,
    _samples_hit,
    _sm_count,
    _tile_origin,
    _tile_pixels,
    dot_precision,
    launch,
)

Tensor = torch.Tensor


@triton.jit
def _packed_tap(br, kh, kw):
    # Index into the packed (T, ...) branch weights: the 1x1 branch is entry 0, branch br >= 1 has 9 taps.
    return tl.where(br == 0, 0, 1 + (br - 1) * 9 + kh * 3 + kw)


# ---- conv branches ------------------------------------------------------------------------------------


@triton.jit
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
    img, oh0, ow0, oh_last, ow_last = _tile_origin(pid_t, H, W, BLOCK_H, BLOCK_W)
    oh, ow, m_mask = _tile_pixels(oh0, ow0, H, W, BLOCK_H, BLOCK_W)
    offs_n = (pid_bn % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), ACC_DTYPE)
    for kh in range(3):
        ih_off = (kh - 1) * rate  # stride 1, padding = dilation = rate
        rows_hit = _samples_hit(oh0 + ih_off, oh_last + ih_off, 1, H)
        ih = oh + ih_off
        h_ok = m_mask & (ih >= 0) & (ih < H)
        for kw in range(3):
            iw_off = (kw - 1) * rate
            cols_hit = _samples_hit(ow0 + iw_off, ow_last + iw_off, 1, W)
            live = (br > 0) | ((kh == 1) & (kw == 1))  # the 1x1 branch: its one tap sits at the centre
            if live & rows_hit & cols_hit:  # else: the tile reads only zero padding through this tap
                if COUNT_PAIRS:
                    if pid_bn % blocks_n == 0:
                        tl.atomic_add(pairs_ptr, 1)
                iw = ow + iw_off
                a_ok = h_ok & (iw >= 0) & (iw < W)
                x_rows = ((img * H + ih) * W + iw) * C_in
                w_tap = w_ptr + _packed_tap(br, kh, kw) * C_in * C
                for k0 in range(0, C_in, BLOCK_K):
                    k = k0 + offs_k
                    k_mask = k < C_in
                    a = tl.load(x_ptr + x_rows[:, None] + k[None, :], mask=a_ok[:, None] & k_mask[None, :], other=0)
                    b = tl.load(w_tap + k[:, None] * C + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :],
                                other=0)
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    o_mask = m_mask[:, None] & n_mask[None, :]
    ch = br * C + offs_n  # this branch's slice of the concatenated channels
    o_idx = (((img * H + oh) * W + ow) * BC)[:, None] + ch[None, :]
    y_stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + o_idx, y_stored, mask=o_mask)
    if TRAINING:
        # BN statistics of y as stored, centred within the tile (merged by bn_finalize with Chan's formula).
        y = y_stored.to(ACC_DTYPE)
        cnt = ((oh_last - oh0 + 1) * (ow_last - ow0 + 1)).to(ACC_DTYPE)
        mean = tl.sum(tl.where(o_mask, y, 0.0), 0) / cnt
        dev = tl.where(o_mask, y - mean[None, :], 0.0)
        tl.store(part_mean_ptr + pid_t * BC + ch, mean, mask=n_mask)
        tl.store(part_m2_ptr + pid_t * BC + ch, tl.sum(dev * dev, 0), mask=n_mask)
        if pid_bn == 0:
            tl.store(part_count_ptr + pid_t, cnt)


@triton.jit
def _aspp_branch_dgrad_kernel(
    # pointers: g (N, H, W, B*C) the gradient at the branch BN outputs through their ReLU; y (N, H, W, B*C) the
    # pre-BN branch outputs; coef (B, 4, C) opmath; wt (T, C, C_in) packed; rates (B,) int32;
    # dx_pool (N, C_in) opmath, the pooling branch's share of dx; dx (N, H, W, C_in); pair counter
    g_ptr, y_ptr, coef_ptr, wt_ptr, rates_ptr, dxp_ptr, dx_ptr, pairs_ptr,
    H, W, C_in, C, BC, NB,
    COUNT_PAIRS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    img, ih0, iw0, ih_last, iw_last = _tile_origin(pid_t, H, W, BLOCK_H, BLOCK_W)
    ih, iw, m_mask = _tile_pixels(ih0, iw0, H, W, BLOCK_H, BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_in
    offs_k = tl.arange(0, BLOCK_K)

    # Every branch's taps accumulate into one dx tile: no per-branch dx, no sum afterwards.
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), ACC_DTYPE)
    for br in range(NB):
        rate = tl.load(rates_ptr + br)
        coef_br = coef_ptr + br * 4 * C
        for kh in range(3):
            # Output row oh reaches input row ih through tap kh iff oh = ih + rate - kh * rate (stride 1).
            th_off = (1 - kh) * rate
            rows_hit = _multiples_hit(ih0 + th_off, ih_last + th_off, 1, H)
            oh = ih + th_off
            h_ok = m_mask & (oh >= 0) & (oh < H)
            for kw in range(3):
                tw_off = (1 - kw) * rate
                cols_hit = _multiples_hit(iw0 + tw_off, iw_last + tw_off, 1, W)
                live = (br > 0) | ((kh == 1) & (kw == 1))
                if live & rows_hit & cols_hit:  # else: no output pixel reaches this tile through this tap
                    if COUNT_PAIRS:
                        if pid_n == 0:
                            tl.atomic_add(pairs_ptr, 1)
                    ow = iw + tw_off
                    ok = h_ok & (ow >= 0) & (ow < W)
                    dy_rows = ((img * H + oh) * W + ow) * BC + br * C
                    wt_tap = wt_ptr + _packed_tap(br, kh, kw) * C * C_in
                    for k0 in range(0, C, BLOCK_K):
                        co = k0 + offs_k
                        mean, k, a, b = _dy_coef(coef_br, co, C, ACC_DTYPE)
                        dy = _dy_tile(g_ptr, g_ptr, y_ptr, dy_rows, ok, co, C, mean, k, a, b, False, ACC_DTYPE)
                        wt = tl.load(wt_tap + co[:, None] * C_in + offs_n[None, :],
                                     mask=(co < C)[:, None] & n_mask[None, :], other=0)
                        acc = tl.dot(dy.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)

    acc += tl.load(dxp_ptr + img * C_in + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)[None, :]
    dx_idx = (((img * H + ih) * W + iw) * C_in)[:, None] + offs_n[None, :]
    tl.store(dx_ptr + dx_idx, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _aspp_branch_wgrad_kernel(
    # pointers: x (N, H, W, C_in); g, y (N, H, W, B*C); coef (B, 4, C) opmath; rates (B,) int32;
    # partial dw (SPLITS, T, C_in, C) opmath; pair counter
    x_ptr, g_ptr, y_ptr, coef_ptr, rates_ptr, part_ptr, pairs_ptr,
    N, H, W, C_in, C, BC, T, SPLITS,
    COUNT_PAIRS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one packed (branch, tap), a (C_in, C) block, every SPLITS-th spatial tile (split-K over
    # pixels; the partials are summed on the host in a fixed order: deterministic).
    t = tl.program_id(0)
    br = tl.where(t == 0, 0, 1 + (t - 1) // 9)
    tap = tl.where(t == 0, 4, (t - 1) % 9)
    rate = tl.load(rates_ptr + br)
    ih_off = (tap // 3 - 1) * rate
    iw_off = (tap % 3 - 1) * rate
    pid_mn = tl.program_id(1)
    blocks_n = tl.cdiv(C, BLOCK_N)
    offs_ci = pid_mn // blocks_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_mn % blocks_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = offs_ci < C_in
    pid_s = tl.program_id(2)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    mean, k, a, b = _dy_coef(coef_ptr + br * 4 * C, offs_co, C, ACC_DTYPE)

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for tile in range(pid_s, N * tiles, SPLITS):
        img, oh0, ow0, oh_last, ow_last = _tile_origin(tile, H, W, BLOCK_H, BLOCK_W)
        rows_hit = _samples_hit(oh0 + ih_off, oh_last + ih_off, 1, H)
        cols_hit = _samples_hit(ow0 + iw_off, ow_last + iw_off, 1, W)
        if rows_hit & cols_hit:  # else: this tap reads only zero padding for the whole tile
            if COUNT_PAIRS:
                if pid_mn == 0:
                    tl.atomic_add(pairs_ptr, 1)
            oh = oh0 + offs_p // BLOCK_W
            ow = ow0 + offs_p % BLOCK_W
            p_mask = (oh < H) & (ow < W)
            ih = oh + ih_off
            iw = ow + iw_off
            x_ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = ((img * H + ih) * W + iw) * C_in
            xt = tl.load(x_ptr + x_rows[None, :] + offs_ci[:, None], mask=ci_mask[:, None] & x_ok[None, :], other=0)
            dy_rows = ((img * H + oh) * W + ow) * BC + br * C
            dy = _dy_tile(g_ptr, g_ptr, y_ptr, dy_rows, p_mask, offs_co, C, mean, k, a, b, False, ACC_DTYPE)
            acc = tl.dot(xt, dy.to(xt.dtype), acc, input_precision=DOT_PRECISION)

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
    mu = tl.load(bmean_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    sc = tl.load(bscale_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    sh = tl.load(bshift_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    return tl.where(mask, _relu((yb - mu[None, :]) * sc[None, :] + sh[None, :]), 0.0)


@triton.jit
def _aspp_project_fwd_kernel(
    # pointers: branch (N, H*W, B*C) pre-BN; w (B*C, C); bias (N, C) opmath (the pooling branch);
    # y, out (N, H*W, C)
    br_ptr, w_ptr, bias_ptr, y_ptr, out_ptr,
    # branch BN (B*C,) opmath: the prologue's mean, scale, shift; projection BN (C,) for the eval epilogue
    bmean_ptr, bscale_ptr, bshift_ptr, omean_ptr, oscale_ptr, oshift_ptr,
    # training: per-tile count (P,), mean and M2 (P, C) opmath
    part_count_ptr, part_mean_ptr, part_m2_ptr,
    HW, BC, C,
    TRAINING: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tiles are BLOCK_M consecutive pixels of one image, so the pooling bias is one row per program.
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles = tl.cdiv(HW, BLOCK_M)
    img = pid_t // tiles
    p0 = pid_t % tiles * BLOCK_M
    offs_p = p0 + tl.arange(0, BLOCK_M)
    p_mask = offs_p < HW
    rows = img * HW + offs_p
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for k0 in range(0, BC, BLOCK_K):
        kc = k0 + offs_k
        z = _branch_z(br_ptr, rows, p_mask, kc, BC, bmean_ptr, bscale_ptr, bshift_ptr, ACC_DTYPE)
        b = tl.load(w_ptr + kc[:, None] * C + offs_n[None, :], mask=(kc < BC)[:, None] & n_mask[None, :], other=0)
        # z rounded to the weights' dtype: what a stored normalized branch output would hold
        acc = tl.dot(z.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    acc += tl.load(bias_ptr + img * C + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)[None, :]

    o_mask = p_mask[:, None] & n_mask[None, :]
    o_idx = (rows * C)[:, None] + offs_n[None, :]
    y_stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + o_idx, y_stored, mask=o_mask)
    y = y_stored.to(ACC_DTYPE)
    if TRAINING:
        cnt = (tl.minimum(p0 + BLOCK_M, HW) - p0).to(ACC_DTYPE)
        mean = tl.sum(tl.where(o_mask, y, 0.0), 0) / cnt
        dev = tl.where(o_mask, y - mean[None, :], 0.0)
        tl.store(part_mean_ptr + pid_t * C + offs_n, mean, mask=n_mask)
        tl.store(part_m2_ptr + pid_t * C + offs_n, tl.sum(dev * dev, 0), mask=n_mask)
        if pid_n == 0:
            tl.store(part_count_ptr + pid_t, cnt)
    else:
        mean = tl.load(omean_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
        scale = tl.load(oscale_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
        shift = tl.load(oshift_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
        z = _relu((y - mean[None, :]) * scale[None, :] + shift[None, :])
        tl.store(out_ptr + o_idx, z.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
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
    tiles = tl.cdiv(HW, BLOCK_M)
    img = pid_t // tiles
    offs_p = pid_t % tiles * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = offs_p < HW
    rows = img * HW + offs_p
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < BC
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for k0 in range(0, C, BLOCK_K):
        co = k0 + offs_k
        mean, k, a, b = _dy_coef(coef_ptr, co, C, ACC_DTYPE)
        dy = _dy_tile(dz_ptr, z_ptr, y_ptr, rows * C, p_mask, co, C, mean, k, a, b, True, ACC_DTYPE)
        if pid_n == 0:
            # The pooling bias's gradient: dy summed over the tile's pixels (one image per tile).
            tl.store(part_dy_ptr + pid_t * C + co, tl.sum(dy, 0), mask=co < C)
        wt = tl.load(w_ptr + co[:, None] * BC + offs_n[None, :], mask=(co < C)[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(dy.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)

    # Epilogue: the branch BNs' ReLU gradient, with z_cat's sign recomputed from the pre-BN branch outputs,
    # and the branch BN backward reduction's partial sums.
    mask = p_mask[:, None] & n_mask[None, :]
    idx = (rows * BC)[:, None] + offs_n[None, :]
    yb = tl.load(br_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
    mu = tl.load(bmean_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
    sc = tl.load(bscale_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
    sh = tl.load(bshift_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
    zb = (yb - mu[None, :]) * sc[None, :] + sh[None, :]
    # threshold_backward(dz_cat, z_cat, 0): zero where z_cat <= 0 only (a NaN z_cat passes the gradient on)
    g_stored = tl.where(zb <= 0, 0.0, acc).to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + idx, g_stored, mask=mask)
    g = tl.where(mask, g_stored.to(ACC_DTYPE), 0.0)
    tl.store(part_g_ptr + pid_t * BC + offs_n, tl.sum(g, 0), mask=n_mask)
    tl.store(part_gy_ptr + pid_t * BC + offs_n, tl.sum(g * (yb - mu[None, :]), 0), mask=n_mask)


@triton.jit
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
    mean, k, a, b = _dy_coef(coef_ptr, offs_n, C, ACC_DTYPE)
    tiles = tl.cdiv(HW, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for tile in range(pid_s, N * tiles, SPLITS):
        img = tile // tiles
        offs_p = tile % tiles * BLOCK_P + offs_q
        p_mask = offs_p < HW
        rows = img * HW + offs_p
        z = _branch_z(br_ptr, rows, p_mask, offs_m, BC, bmean_ptr, bscale_ptr, bshift_ptr, ACC_DTYPE)
        dy = _dy_tile(dz_ptr, z_ptr, y_ptr, rows * C, p_mask, offs_n, C, mean, k, a, b, True, ACC_DTYPE)
        zt = tl.trans(z.to(br_ptr.dtype.element_ty))
        acc = tl.dot(zt, dy.to(zt.dtype), acc, input_precision=DOT_PRECISION)

    idx = (pid_s * BC + offs_m)[:, None] * C + offs_n[None, :]
    tl.store(part_ptr + idx, acc, mask=(offs_m < BC)[:, None] & (offs_n < C)[None, :])


# ---- configurations ------------------------------------------------------------------------------------

# 1x1 GEMMs over pixels: tiles of BLOCK_M consecutive pixels of one image x BLOCK_N channels, K = BLOCK_K.
def _pixel_cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


_HOPPER_PROJ = [
    _pixel_cfg(128, 128, 64, 8, 3), _pixel_cfg(128, 64, 64, 4, 4), _pixel_cfg(64, 128, 32, 8, 3),
    _pixel_cfg(64, 64, 32, 4, 4), _pixel_cfg(64, 32, 32, 4, 3), _pixel_cfg(16, 16, 16, 2, 3),
]
_AMPERE_PROJ = [
    _pixel_cfg(128, 128, 32, 8, 3), _pixel_cfg(64, 64, 32, 4, 3), _pixel_cfg(64, 64, 64, 4, 2),
    _pixel_cfg(64, 32, 32, 4, 3), _pixel_cfg(16, 16, 16, 2, 2),
]


def _wgrad_cfg(bp, bm, bn, warps, stages):
    return triton.Config({"BLOCK_P": bp, "BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_HOPPER_PROJ_WGRAD = [_wgrad_cfg(64, 128, 128, 8, 3), _wgrad_cfg(64, 64, 128, 4, 4), _wgrad_cfg(64, 64, 64, 4, 4),
                      _wgrad_cfg(32, 32, 32, 4, 3), _wgrad_cfg(16, 16, 16, 2, 3)]
_AMPERE_PROJ_WGRAD = [_wgrad_cfg(64, 128, 64, 8, 3), _wgrad_cfg(64, 64, 64, 4, 3), _wgrad_cfg(32, 32, 32, 4, 2),
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

_KERNELS = {
    # name: (kernel, autotune key, (Hopper, Ampere) configs, pruner)
    "branch_fwd": (_aspp_branch_fwd_kernel, ["C_in", "C", "BC", "H", "W"], (_HOPPER_GEMM, _AMPERE_GEMM),
                   _prune("C", "C_in", "BLOCK_N", "BLOCK_K")),
    "branch_dgrad": (_aspp_branch_dgrad_kernel, ["C_in", "C", "BC", "H", "W"], (_HOPPER_GEMM, _AMPERE_GEMM),
                     _prune("C_in", "C", "BLOCK_N", "BLOCK_K")),
    "branch_wgrad": (_aspp_branch_wgrad_kernel, ["C_in", "C", "BC", "H", "W", "SPLITS"],
                     (_HOPPER_WGRAD, _AMPERE_WGRAD), _prune("C", "C_in", "BLOCK_N", "BLOCK_M")),
    "project_fwd": (_aspp_project_fwd_kernel, ["HW", "BC", "C"], (_HOPPER_PROJ, _AMPERE_PROJ),
                    _prune("C", "BC", "BLOCK_N", "BLOCK_K")),
    "project_dgrad": (_aspp_project_dgrad_kernel, ["HW", "BC", "C"], (_HOPPER_PROJ, _AMPERE_PROJ),
                      _prune("BC", "C", "BLOCK_N", "BLOCK_K")),
    "project_wgrad": (_aspp_project_wgrad_kernel, ["HW", "BC", "C", "SPLITS"], (_HOPPER_PROJ_WGRAD, _AMPERE_PROJ_WGRAD),
                      _prune("C", "BC", "BLOCK_N", "BLOCK_M")),
}


def _smallest(names: tuple[str, ...], *keys: str) -> tuple[int, ...]:
    # The smallest tile of any configuration of these kernels: it bounds the number of per-tile partials.
    configs = [triton.Config(INTERPRETER_CONFIGS[n]) for n in names]
    for n in names:
        configs += [c for arch in _KERNELS[n][2] for c in arch]
    return tuple(min(c.kwargs[k] for c in configs) for k in keys)


_MIN_SPATIAL_TILE = _smallest(("branch_fwd",), "BLOCK_H", "BLOCK_W")
_MIN_PIXEL_RUN = _smallest(("project_fwd", "project_dgrad"), "BLOCK_M")[0]


def _launch(name: str, device: torch.device, grid, args: tuple, config: dict | None, **meta) -> dict:
    return launch(_KERNELS, INTERPRETER_CONFIGS, name, device, grid, args, config, **meta)


def _splits(device: torch.device, programs: int, pixel_tiles: int) -> int:
    # Split-K over pixels until the grid has a few waves of programs; fixed per shape (not per configuration)
    # so that the partial buffer is allocated before the launch.
    if interpreter_active() or device.type != "cuda":
        return 2
    return max(1, min(4 * _sm_count(device.index or 0) // max(programs, 1), pixel_tiles, 64))


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
    if training:
        tile_h, tile_w = (config["BLOCK_H"], config["BLOCK_W"]) if config is not None else _MIN_SPATIAL_TILE
        p_max = n * triton.cdiv(h, tile_h) * triton.cdiv(wd, tile_w)
        part_count = torch.empty(p_max, dtype=stat_dtype, device=xh.device)
        part_mean = torch.empty(p_max, bc, dtype=stat_dtype, device=xh.device)
        part_m2 = torch.empty_like(part_mean)
    else:
        part_count = part_mean = part_m2 = y

    def grid(meta):
        return (n * triton.cdiv(h, meta["BLOCK_H"]) * triton.cdiv(wd, meta["BLOCK_W"]),
                nb * triton.cdiv(c, meta["BLOCK_N"]))

    used = _launch(
        "branch_fwd", xh.device, grid,
        (xh, w, rates, y, part_count, part_mean, part_m2, pairs if pairs is not None else rates, h, wd, c_in, c, bc),
        config, TRAINING=training, COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(xh.dtype),
        DOT_PRECISION=dot_precision(xh.dtype, xh.device),
    )
    if not training:
        return y, None
    p = n * triton.cdiv(h, used["BLOCK_H"]) * triton.cdiv(wd, used["BLOCK_W"])
    return y, (part_count[:p], part_mean[:p], part_m2[:p])


def branch_dgrad(g: Tensor, y: Tensor, coef: Tensor, wt: Tensor, rates: Tensor, dx_pool: Tensor, *,
                 pairs: Tensor | None = None, config: dict | None = None) -> Tensor:
    """dx (N, H, W, C_in) of every branch at once, plus the per-(image, C_in) `dx_pool` (opmath, (N, C_in)).

    g, y: (N, H, W, B*C); coef: (B, 4, C); wt: packed (T, C, C_in).
    """
    n, h, wd, bc = y.shape
    nb = rates.shape[0]
    c = bc // nb
    c_in = wt.shape[2]
    dx = y.new_empty((n, h, wd, c_in))

    def grid(meta):
        return (n * triton.cdiv(h, meta["BLOCK_H"]) * triton.cdiv(wd, meta["BLOCK_W"]),
                triton.cdiv(c_in, meta["BLOCK_N"]))

    _launch(
        "branch_dgrad", y.device, grid,
        (g, y, coef, wt, rates, dx_pool, dx, pairs if pairs is not None else rates, h, wd, c_in, c, bc, nb),
        config, COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(y.dtype),
        DOT_PRECISION=dot_precision(y.dtype, y.device),
    )
    return dx


def branch_wgrad(xh: Tensor, g: Tensor, y: Tensor, coef: Tensor, rates: Tensor, *, pairs: Tensor | None = None,
                 config: dict | None = None) -> Tensor:
    """Packed dw (T, C_in, C) of every branch in one launch, in the opmath dtype."""
    n, h, wd, c_in = xh.shape
    bc = y.shape[3]
    nb = rates.shape[0]
    c = bc // nb
    t = 1 + 9 * (nb - 1)
    splits = _splits(xh.device, t * triton.cdiv(c_in, 64) * triton.cdiv(c, 64), n * triton.cdiv(h * wd, 64))
    part = torch.empty(splits, t, c_in, c, dtype=coef.dtype, device=xh.device)

    def grid(meta):
        return (t, triton.cdiv(c_in, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]), splits)

    _launch(
        "branch_wgrad", xh.device, grid,
        (xh, g, y, coef, rates, part, pairs if pairs is not None else rates, n, h, wd, c_in, c, bc, t, splits),
        config, COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(xh.dtype),
        DOT_PRECISION=dot_precision(xh.dtype, xh.device),
    )
    return part.sum(0)


def project_forward(br: Tensor, w: Tensor, bias: Tensor, branch_affine: tuple[Tensor, Tensor, Tensor], *,
                    training: bool, stat_dtype: torch.dtype,
                    out_affine: tuple[Tensor, Tensor, Tensor] | None = None):
    """The projection over normalized branches (BN + ReLU in the prologue) plus the pooling bias (N, C).

    training: (y, None, partials); eval: (y, out, None) with out = relu(BN(y)) from `out_affine`.
    """
    n, h, wd, bc = br.shape
    c = w.shape[1]
    hw = h * wd
    y = br.new_empty((n, h, wd, c))
    out = br.new_empty((n, h, wd, c)) if not training else None
    if training:
        p_max = n * triton.cdiv(hw, _MIN_PIXEL_RUN)
        part_count = torch.empty(p_max, dtype=stat_dtype, device=br.device)
        part_mean = torch.empty(p_max, c, dtype=stat_dtype, device=br.device)
        part_m2 = torch.empty_like(part_mean)
    else:
        part_count = part_mean = part_m2 = y
    om, osc, osh = out_affine if out_affine is not None else (bias, bias, bias)

    def grid(meta):
        return (n * triton.cdiv(hw, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]))

    used = _launch(
        "project_fwd", br.device, grid,
        (br, w, bias, y, out if out is not None else y, *branch_affine, om, osc, osh, part_count, part_mean,
         part_m2, hw, bc, c),
        None, TRAINING=training, ACC_DTYPE=acc_dtype(br.dtype), DOT_PRECISION=dot_precision(br.dtype, br.device),
    )
    if not training:
        return y, out, None
    p = n * triton.cdiv(hw, used["BLOCK_M"])
    return y, None, (part_count[:p], part_mean[:p], part_m2[:p])


def project_dgrad(dz: Tensor, z: Tensor, y: Tensor, coef: Tensor, w: Tensor, br: Tensor,
                  branch_affine: tuple[Tensor, Tensor, Tensor]):
    """(g_b (N, H, W, B*C), sum g_b, sum g_b*(branch - mean) (B*C,), sum over H x W of dy (N, C)).

    w: (C, B*C), the projection weight's branch columns.
    """
    n, h, wd, c = y.shape
    bc = br.shape[3]
    hw = h * wd
    stat = coef.dtype
    g = br.new_empty(br.shape)
    p_max = n * triton.cdiv(hw, _MIN_PIXEL_RUN)
    part_g = torch.empty(p_max, bc, dtype=stat, device=br.device)
    part_gy = torch.empty_like(part_g)
    part_dy = torch.empty(p_max, c, dtype=stat, device=br.device)

    def grid(meta):
        return (n * triton.cdiv(hw, meta["BLOCK_M"]), triton.cdiv(bc, meta["BLOCK_N"]))

    used = _launch(
        "project_dgrad", br.device, grid,
        (dz, z, y, coef, w, br, *branch_affine, g, part_g, part_gy, part_dy, hw, bc, c),
        None, ACC_DTYPE=acc_dtype(br.dtype), DOT_PRECISION=dot_precision(br.dtype, br.device),
    )
    tiles = triton.cdiv(hw, used["BLOCK_M"])
    p = n * tiles
    return g, part_g[:p].sum(0), part_gy[:p].sum(0), part_dy[:p].view(n, tiles, c).sum(1)


def project_wgrad(br: Tensor, branch_affine: tuple[Tensor, Tensor, Tensor], dz: Tensor, z: Tensor, y: Tensor,
                  coef: Tensor) -> Tensor:
    """dW (B*C, C) of the projection's branch columns, in the opmath dtype."""
    n, h, wd, bc = br.shape
    c = y.shape[3]
    hw = h * wd
    splits = _splits(br.device, triton.cdiv(bc, 64) * triton.cdiv(c, 64), n * triton.cdiv(hw, 64))
    part = torch.empty(splits, bc, c, dtype=coef.dtype, device=br.device)

    def grid(meta):
        return (triton.cdiv(bc, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]), splits)

    _launch(
        "project_wgrad", br.device, grid, (br, *branch_affine, dz, z, y, coef, part, n, hw, bc, c, splits),
        None, ACC_DTYPE=acc_dtype(br.dtype), DOT_PRECISION=dot_precision(br.dtype, br.device),
    )
    return part.sum(0)


# ---- host side of the op ----------------------------------------------------------------------------------


def pack_branch_weights(conv_weights: list[Tensor]) -> Tensor:
    """(T, C_in, C): the 1x1 weight, then each 3x3 weight's taps in (kh, kw) order; K-major B operands."""
    c, c_in = conv_weights[0].shape[:2]
    parts = [conv_weights[0].reshape(c, c_in).t()]
    parts += [w.permute(2, 3, 1, 0).reshape(9, c_in, c) for w in conv_weights[1:]]
    return torch.cat([p.reshape(-1, c_in, c) for p in parts]).contiguous()


def _rate_table(rates: list[int], device: torch.device) -> Tensor:
    return _rate_table_cached(tuple(rates), device)


@functools.lru_cache(maxsize=32)
def _rate_table_cached(rates: tuple[int, ...], device: torch.device) -> Tensor:
    # The branches' dilations (entry 0: the 1x1 branch), kept on the device: a host-to-device copy per call
    # would synchronize the stream. Read-only in the kernels.
    return torch.tensor([1, *rates], dtype=torch.int32, device=device)


def forward(
    x: Tensor, conv_weights: list[Tensor], pool_weight: Tensor, project_weight: Tensor, bn_weight: Tensor,
    bn_bias: Tensor, running_mean: Tensor | None, running_var: Tensor | None, rates: list[int], training: bool,
    momentum: float, eps: float,
) -> tuple[Tensor, ...]:
    """(out, branch_out, pool_out, project_out, save_mean, save_invstd, new_running_mean, new_running_var)."""
    _check_device(x)
    n, c_in, h, wd = x.shape
    c = conv_weights[0].shape[0]
    nb = len(conv_weights)
    bc = nb * c
    mf = suggest_memory_format(x)
    stat = opmath_dtype(x.dtype)
    sl_b, sl_p, sl_o = slice(0, bc), slice(bc, bc + c), slice(bc + c, bc + 2 * c)
    bw, bb = bn_weight.to(stat), bn_bias.to(stat)
    has_running = running_mean is not None
    xh = _nhwc(x)

    def affine(sl, parts):
        # (mean, invstd, scale, shift, new_rm, new_rv) of one block of BatchNorm channels
        if training:
            return bn_finalize(*parts, bw[sl], bb[sl], running_mean[sl] if has_running else None,
                               running_var[sl] if has_running else None, momentum, eps)
        mean = running_mean[sl].to(stat, copy=True)
        invstd = (running_var[sl].to(stat) + eps).rsqrt()
        return mean, invstd, bw[sl] * invstd, bb[sl].clone(), None, None

    # Conv branches: one launch, pre-BN outputs in their channel slices, statistics partials.
    branch, parts_b = branch_forward(xh, pack_branch_weights(conv_weights), _rate_table(rates, x.device), c,
                                     training=training, stat_dtype=stat)
    mean_b, invstd_b, scale_b, shift_b, rm_b, rv_b = affine(sl_b, parts_b)
    # Image pooling, on (N, C) vectors: its BN merges N partials of one image each (count 1, M2 0).
    pooled = xh.mean((1, 2), dtype=stat)
    pool_pre = (pooled @ pool_weight.reshape(c, c_in).t().to(stat)).to(x.dtype)
    pool_parts = (torch.ones(n, dtype=stat, device=x.device), pool_pre.to(stat).contiguous(),
                  torch.zeros(n, c, dtype=stat, device=x.device))
    mean_p, invstd_p, scale_p, shift_p, rm_p, rv_p = affine(sl_p, pool_parts)
    z_p = torch.relu((pool_pre.to(stat) - mean_p) * scale_p + shift_p).to(x.dtype).to(stat)
    bias = (z_p @ project_weight[:, bc:].reshape(c, c).t().to(stat)).contiguous()
    # Projection: branch BN + ReLU in the prologue, the pooling bias and the BN statistics in the epilogue.
    w_main = project_weight[:, :bc].reshape(c, bc).t().contiguous()  # (B*C, C): K-major
    if training:
        proj, _, parts_o = project_forward(branch, w_main, bias, (mean_b, scale_b, shift_b), training=True,
                                           stat_dtype=stat)
        mean_o, invstd_o, scale_o, shift_o, rm_o, rv_o = affine(sl_o, parts_o)
        out = bn_apply(proj, mean_o, scale_o, shift_o, None, True)
    else:
        mean_o, invstd_o, scale_o, shift_o, _, _ = affine(sl_o, None)
        proj, out, _ = project_forward(branch, w_main, bias, (mean_b, scale_b, shift_b), training=False,
                                       stat_dtype=stat, out_affine=(mean_o, scale_o, shift_o))
    if training and has_running:
        new_rm, new_rv = torch.cat([rm_b, rm_p, rm_o]), torch.cat([rv_b, rv_p, rv_o])
    else:
        rdt = running_mean.dtype if has_running else stat
        new_rm, new_rv = x.new_empty((0,), dtype=rdt), x.new_empty((0,), dtype=rdt)
    return (_from_nhwc(out, mf), _from_nhwc(branch, mf), pool_pre, _from_nhwc(proj, mf),
            torch.cat([mean_b, mean_p, mean_o]), torch.cat([invstd_b, invstd_p, invstd_o]), new_rm, new_rv)


def _coef_rows(mean: Tensor, k: Tensor, sum_g: Tensor, sum_g_xhat: Tensor, invstd: Tensor, count: int,
             training: bool) -> Tensor:
    # Rows (mean, k, a, b) of dy = k*(g - a - (y - mean)*b); a = b = 0 in eval (csrc/common/bn_math.h).
    if training:
        a, b = sum_g / count, invstd * sum_g_xhat / count
    else:
        a = b = torch.zeros_like(invstd)
    return torch.stack([mean, k, a, b])


def backward(
    grad_out: Tensor, x: Tensor, conv_weights: list[Tensor], pool_weight: Tensor, project_weight: Tensor,
    bn_weight: Tensor, bn_bias: Tensor, branch_out: Tensor, pool_out: Tensor, project_out: Tensor, out: Tensor,
    save_mean: Tensor, save_invstd: Tensor, rates: list[int], training: bool, output_mask: list[bool],
) -> tuple:
    """(grad_x, grad_conv_weights, grad_pool_weight, grad_project_weight, grad_bn_weight, grad_bn_bias)."""
    _check_device(x)
    n, c_in, h, wd = x.shape
    c = conv_weights[0].shape[0]
    nb = len(conv_weights)
    bc = nb * c
    count = n * h * wd
    stat = save_mean.dtype
    sl_b, sl_p, sl_o = slice(0, bc), slice(bc, bc + c), slice(bc + c, bc + 2 * c)
    bw, bb = bn_weight.to(stat), bn_bias.to(stat)
    mean, invstd = save_mean, save_invstd
    dz, z, yo, br = _nhwc(grad_out), _nhwc(out), _nhwc(project_out), _nhwc(branch_out)
    branch_affine = (mean[sl_b].contiguous(), (bw[sl_b] * invstd[sl_b]).contiguous(), bb[sl_b].contiguous())

    # Projection BN: one reduction pass; dy_o itself lives only in the GEMM prologues below.
    sg_o, sgy_o, _ = bn_backward_reduce(dz, z, yo, mean[sl_o].contiguous(), True, store_g=False)
    sgx_o = sgy_o * invstd[sl_o]
    coef_o = _coef_rows(mean[sl_o], bw[sl_o] * invstd[sl_o], sg_o, sgx_o, invstd[sl_o], count, training).contiguous()
    w_main = project_weight[:, :bc].reshape(c, bc).contiguous()  # (C, B*C): the dgrad's K-major B operand
    g_b, sg_b, sgy_b, dbias = project_dgrad(dz, z, yo, coef_o, w_main, br, branch_affine)
    sgx_b = sgy_b * invstd[sl_b]

    # Image pooling on (N, C) vectors: its bias's gradient is dy_o summed over H x W (dbias).
    pp = pool_out.to(stat)
    xhat_p = (pp - mean[sl_p]) * invstd[sl_p]
    z_p = torch.relu(xhat_p * bw[sl_p] + bb[sl_p]).to(x.dtype).to(stat)
    w_pool = project_weight[:, bc:].reshape(c, c).to(stat)
    g_p = torch.where(z_p <= 0, 0.0, dbias @ w_pool)  # threshold_backward: a NaN z_p passes the gradient
    sg_p, sgx_p = g_p.sum(0), (g_p * xhat_p).sum(0)
    k_p = bw[sl_p] * invstd[sl_p]
    dy_p = k_p * (g_p - sg_p / n - xhat_p * sgx_p / n) if training else k_p * g_p

    grad_x, grad_conv, grad_pool, grad_proj = None, [], None, None
    if output_mask[0] or output_mask[1]:
        coef_b = _coef_rows(mean[sl_b], bw[sl_b] * invstd[sl_b], sg_b, sgx_b, invstd[sl_b], count, training)
        coef_b = coef_b.view(4, nb, c).permute(1, 0, 2).contiguous()  # (B, 4, C): one row block per branch
        rate_t = _rate_table(rates, x.device)
        xh = _nhwc(x)
    if output_mask[0]:
        # The pooling branch's share of dx is uniform over H x W: a per-(image, C_in) bias of the dgrad epilogue.
        dx_pool = ((dy_p @ pool_weight.reshape(c, c_in).to(stat)) / (h * wd)).contiguous()
        wt = pack_branch_weights(conv_weights).transpose(1, 2).contiguous()  # (T, C, C_in)
        dx = branch_dgrad(g_b, br, coef_b, wt, rate_t, dx_pool)
        grad_x = _from_nhwc(dx, suggest_memory_format(x))
    if output_mask[1]:
        dw = branch_wgrad(xh, g_b, br, coef_b, rate_t)  # (T, C_in, C)
        grad_conv = [dw[0].t().reshape(c, c_in, 1, 1)]
        for i in range(1, nb):
            taps = dw[1 + 9 * (i - 1):1 + 9 * i].view(3, 3, c_in, c)
            grad_conv.append(taps.permute(3, 2, 0, 1))
        grad_conv = [gw.to(w.dtype).contiguous(memory_format=suggest_memory_format(w))
                     for gw, w in zip(grad_conv, conv_weights, strict=True)]
        grad_pool = (dy_p.t() @ xh.mean((1, 2), dtype=stat)).view(c, c_in, 1, 1).to(pool_weight.dtype)
        dw_main = project_wgrad(br, branch_affine, dz, z, yo, coef_o)  # (B*C, C)
        dw_pool = dbias.t() @ z_p  # (C, C)
        grad_proj = torch.cat([dw_main.t(), dw_pool], 1).view(c, bc + c, 1, 1).to(project_weight.dtype)
        grad_proj = grad_proj.contiguous(memory_format=suggest_memory_format(project_weight))
    grad_bw = torch.cat([sgx_b, sgx_p, sgx_o]) if output_mask[2] else None
    grad_bb = torch.cat([sg_b, sg_p, sg_o]) if output_mask[2] else None
    return grad_x, grad_conv, grad_pool, grad_proj, grad_bw, grad_bb


# ---- the padding-tap schedule ---------------------------------------------------------------------------


def schedule(x_shape: tuple[int, ...], rates: tuple[int, ...], block_h: int, block_w: int,
             pass_: str = "forward") -> tuple[int, int]:
    """(pairs computed, pairs in the dense problem) of (tile, tap, branch) triples over every conv branch.

    The 1x1 branch has one tap that always hits; each 3x3 branch follows conv_bn_relu's schedule.
    """
    n, c_in, h, w = x_shape
    tiles = n * (triton.cdiv(h, block_h) * triton.cdiv(w, block_w))
    computed, dense = tiles, tiles
    for r in rates:
        got, full = conv_schedule(x_shape, (1, c_in, 3, 3), (1, 1), (r, r), (r, r), block_h, block_w, pass_)
        computed, dense = computed + got, dense + full
    return computed, dense


def count_computed_pairs(x: Tensor, conv_weights: list[Tensor], rates: tuple[int, ...], block_h: int,
                         block_w: int) -> dict[str, int]:
    """Run the branch forward, dgrad and wgrad kernels with BLOCK_H x BLOCK_W tiles, each counting the
    (tile, tap, branch) triples it computed: the measured side of `schedule`."""
    _check_device(x)
    stat = opmath_dtype(x.dtype)
    xh = _nhwc(x)
    c = conv_weights[0].shape[0]
    nb = len(conv_weights)
    rate_t = _rate_table(list(rates), x.device)
    w = pack_branch_weights(conv_weights)
    pairs = torch.zeros(1, dtype=torch.int32, device=x.device)
    cfg = dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_N=16, BLOCK_K=16)
    y, _ = branch_forward(xh, w, rate_t, c, training=True, stat_dtype=stat, pairs=pairs, config=cfg)
    counts = {"forward": int(pairs.item())}
    coef = torch.randn(nb, 4, c, dtype=stat, device=x.device)
    pairs.zero_()
    dx_pool = torch.zeros(x.shape[0], x.shape[1], dtype=stat, device=x.device)
    branch_dgrad(y, y, coef, w.transpose(1, 2).contiguous(), rate_t, dx_pool, pairs=pairs, config=cfg)
    counts["dgrad"] = int(pairs.item())
    pairs.zero_()
    branch_wgrad(xh, y, y, coef, rate_t, pairs=pairs,
                 config=dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_M=16, BLOCK_N=16))
    counts["wgrad"] = int(pairs.item())
    return counts

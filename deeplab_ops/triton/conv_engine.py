"""The implicit-GEMM convolution engine: forward with BN/bias epilogues, dgrad and wgrad with the BN-backward
prologue, and the @triton.jit pieces (tile geometry, padding-tap tests, one tap's GEMM, tile statistics, the dy
prologue) that the ASPP kernels reuse. Activations NHWC; forward weight (KH, KW, C_in, C_out), dgrad weight
(KH, KW, C_out, C_in). The design (tiles, padding-tap skipping, fusion, numerics) is in docs/kernels.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deeplab_ops.common import interpreter_active as _interpreter_active
from deeplab_ops.triton.bn_kernels import _act_grad, _bn_dy, _corrected, _div, _invstd, _relu, acc_dtype
from deeplab_ops.triton.launch import (
    KernelSpec,
    cdiv,
    jit_unspecialized,
    launch_kernel,
    prune_by_channels,
    run_tuned,
)

# ---- tile / tap geometry (jit helpers; `conv_bn_relu.schedule` mirrors them on the host) ----------------


@triton.jit
def _tile_origin(t, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tile t of the (N, cdiv(H, BLOCK_H), cdiv(W, BLOCK_W)) grid of 2-D spatial tiles: (image, first row, first
    column, last row, last column) of its pixels inside the map."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    r0 = (t % tiles // tiles_w) * BLOCK_H
    c0 = (t % tiles % tiles_w) * BLOCK_W
    return t // tiles, r0, c0, tl.minimum(r0 + BLOCK_H, H) - 1, tl.minimum(c0 + BLOCK_W, W) - 1


@triton.jit
def _tile_pixels(r0, c0, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row and column of each of a tile's BLOCK_H * BLOCK_W pixels (row-major), and which lie inside the map."""
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    r = r0 + offs // BLOCK_W
    c = c0 + offs % BLOCK_W
    return r, c, (r < H) & (c < W)


@triton.jit
def _gemm_tile(pid_t, pid_n, H, W, C_n, ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """A program's (pixels x channels) output tile: image, first and last row and column, each pixel's row, column
    and in-map mask, its block of the C_n GEMM-N channels with their mask, and a zero accumulator."""
    img, r0, c0, r_last, c_last = _tile_origin(pid_t, H, W, BLOCK_H, BLOCK_W)
    r, c, m_mask = _tile_pixels(r0, c0, H, W, BLOCK_H, BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), ACC_DTYPE)
    return img, r0, c0, r_last, c_last, r, c, m_mask, offs_n, offs_n < C_n, acc


@triton.jit
def _store_tile(ptr, acc, img, r, c, H, W, LD, offs_n, n_mask, m_mask):
    # A (pixels x channels) accumulator tile into an NHWC tensor of LD channels per pixel, in the tensor's dtype.
    idx = (((img * H + r) * W + c) * LD)[:, None] + offs_n[None, :]
    tl.store(ptr + idx, acc.to(ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _wgrad_block(pid_mn, C_in, C, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A wgrad program's (C_in, C) block of dw: its input and output channels, the input mask, a zero accumulator.
    blocks_n = tl.cdiv(C, BLOCK_N)
    offs_ci = pid_mn // blocks_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_mn % blocks_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_ci, offs_ci < C_in, offs_co, tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)


@triton.jit
def _samples_hit(first, last, step, size):
    # Does any of first, first + step, ..., last (first <= last) lie in [0, size)? Integer division only on
    # non-negative values: Triton's // truncates toward zero.
    lowest = first + ((tl.maximum(-first, 0) + step - 1) // step) * step
    return (lowest <= last) & (lowest < size)


@triton.jit
def _multiples_hit(first, last, step, count):
    # Does [first, last] contain j * step for some 0 <= j < count? (dgrad: output row j reaches this input row.)
    lo = tl.maximum(first, 0)
    hi = tl.minimum(last, (count - 1) * step)
    return ((lo + step - 1) // step) * step <= hi


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    # acc + a @ b. DOT_PRECISION "fma" (float64): a plain multiply-accumulate over a broadcast product, which
    # compiles on every admitted Triton (tl.dot rejects float64 on sm_90 before triton 3.8); else tl.dot with
    # that input precision ("ieee" or "tf32").
    if DOT_PRECISION == "fma":
        return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], 1)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _count_pair(pairs_ptr, first_block, COUNT_PAIRS: tl.constexpr):
    # One atomic per computed (tile, tap) pair, from the first program of the other GEMM dimension only.
    if COUNT_PAIRS:
        if first_block:
            tl.atomic_add(pairs_ptr, 1)


@triton.jit
def _count_split_pairs(pairs_ptr, first_block, tiles, pid_s, SPLITS, COUNT_PAIRS: tl.constexpr):
    # The wgrad loops' count: program pid_s of SPLITS runs tiles pid_s, pid_s + SPLITS, ... < tiles, one (tile, tap)
    # pair per iteration (the loop has no branch); one atomic after the loop adds its trip count. An atomic inside
    # the software-pipelined loop counted more pairs than it ran on an H200 (ASPP: 124 for 118, 45 for 36; the
    # gradients exact), and it sat in the main loop the pipelining is for.
    if COUNT_PAIRS:
        if first_block:
            tl.atomic_add(pairs_ptr, tl.maximum(tiles - pid_s + SPLITS - 1, 0) // SPLITS)


# ---- the BN-backward prologue ----------------------------------------------------------------------------


@triton.jit
def _dy_coef(coef_ptr, offs_c, C, LD, ACC_DTYPE: tl.constexpr):
    # Per-channel (mean, k, a, b) of dy = k*(g - a - (y - mean)*b): rows of a (4, LD) coef tensor, channels < C.
    c_mask = offs_c < C
    mean = tl.load(coef_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    k = tl.load(coef_ptr + LD + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    a = tl.load(coef_ptr + 2 * LD + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    b = tl.load(coef_ptr + 3 * LD + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    return mean, k, a, b


@triton.jit
def _dy_tile(dz_ptr, z_ptr, y_ptr, rows, row_mask, offs_c, C, mean, k, a, b, relu, ACC_DTYPE: tl.constexpr):
    # dy for a (pixels, channels) tile of NHWC activations from grad_out, out and conv_out (`rows`: each pixel's
    # first element). Out-of-range entries are 0, the GEMM's padding (dy itself is not 0 there). `relu`: whether
    # the op ends in a ReLU, a runtime flag in the conv kernels (one compiled kernel serves both: without ReLU the
    # output's load is masked off and reads nothing), True in the ASPP's.
    mask = row_mask[:, None] & (offs_c < C)[None, :]
    idx = rows[:, None] + offs_c[None, :]
    dz = tl.load(dz_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
    y = tl.load(y_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
    z = tl.load(z_ptr + idx, mask=mask & (relu != 0), other=0).to(ACC_DTYPE)
    return tl.where(mask, _bn_dy(_act_grad(dz, z, relu), y, mean, k, a, b), 0.0)


# ---- one tap of each GEMM, and the epilogues (shared with aspp.py) ---------------------------------------


@triton.jit
def _fwd_tap(acc, x_ptr, w_tap, ldw, img, oh, ow, m_mask, oh0, ow0, oh_last, ow_last, ih_off, iw_off,
             stride_h, stride_w, H, W, C_in, offs_n, n_mask, live, pairs_ptr, first_block,
             COUNT_PAIRS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    # acc += x[pixel * stride + tap offset, :] @ w_tap[:, offs_n] (w_tap: C_in rows of ldw), unless every pixel of
    # the tile reads zero padding through this tap (or `live` is false): then no loads, no MMAs.
    rows_hit = _samples_hit(oh0 * stride_h + ih_off, oh_last * stride_h + ih_off, stride_h, H)
    cols_hit = _samples_hit(ow0 * stride_w + iw_off, ow_last * stride_w + iw_off, stride_w, W)
    if live & rows_hit & cols_hit:
        _count_pair(pairs_ptr, first_block, COUNT_PAIRS)
        ih = oh * stride_h + ih_off
        iw = ow * stride_w + iw_off
        a_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_rows = ((img * H + ih) * W + iw) * C_in
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, C_in, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < C_in
            a = tl.load(x_ptr + x_rows[:, None] + k[None, :], mask=a_ok[:, None] & k_mask[None, :], other=0)
            b = tl.load(w_tap + k[:, None] * ldw + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc = _mma(a, b, acc, DOT_PRECISION)
    return acc


@triton.jit
def _dgrad_tap(acc, dz_ptr, z_ptr, y_ptr, coef_ptr, wt_tap, ldy, ch0, img, ih, iw, m_mask, ih0, iw0, ih_last,
               iw_last, th_off, tw_off, stride_h, stride_w, H_out, W_out, C, C_in, offs_n, n_mask, live, pairs_ptr,
               first_block, relu, COUNT_PAIRS: tl.constexpr, ACC_DTYPE: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    # acc += dy[(pixel + pad - tap*dil) / stride, ch0:ch0+C] @ wt_tap (C, C_in), dy from the BN-backward prologue
    # (activation and coef rows of ldy channels; coef_ptr at channel ch0). Output row oh reaches input row ih iff
    # oh * stride = ih + th_off.
    rows_hit = _multiples_hit(ih0 + th_off, ih_last + th_off, stride_h, H_out)
    cols_hit = _multiples_hit(iw0 + tw_off, iw_last + tw_off, stride_w, W_out)
    if live & rows_hit & cols_hit:  # else: no output pixel reaches this tile through this tap
        _count_pair(pairs_ptr, first_block, COUNT_PAIRS)
        th = ih + th_off
        tw = iw + tw_off
        oh = th // stride_h
        ow = tw // stride_w
        ok = m_mask & (th >= 0) & (th % stride_h == 0) & (oh < H_out) & (tw >= 0) & (tw % stride_w == 0) & (ow < W_out)
        dy_rows = ((img * H_out + oh) * W_out + ow) * ldy + ch0
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, C, BLOCK_K):
            co = k0 + offs_k
            mean, k, a, b = _dy_coef(coef_ptr, co, C, ldy, ACC_DTYPE)
            dy = _dy_tile(dz_ptr, z_ptr, y_ptr, dy_rows, ok, co, C, mean, k, a, b, relu, ACC_DTYPE)
            wt = tl.load(wt_tap + co[:, None] * C_in + offs_n[None, :], mask=(co < C)[:, None] & n_mask[None, :],
                         other=0)
            acc = _mma(dy.to(wt.dtype), wt, acc, DOT_PRECISION)
    return acc


@triton.jit
def _hit_tiles(off, stride, size, out, BLOCK: tl.constexpr):
    # Along one axis: (first tile, number of tiles) of BLOCK output positions o < out, in order, that hold an o
    # with o * stride + off in [0, size): the tiles through which a tap reads a real input pixel (a range).
    lo = (tl.maximum(-off, 0) + stride - 1) // stride
    top = size - 1 - off
    hi = tl.minimum(tl.where(top >= 0, tl.maximum(top, 0) // stride, -1), out - 1)
    return lo // BLOCK, tl.where(lo <= hi, hi // BLOCK - lo // BLOCK + 1, 0)


@triton.jit
def _wgrad_tile(acc, x_ptr, dz_ptr, z_ptr, y_ptr, i, ih_off, iw_off, stride_h, stride_w, H, W, C_in, H_out, W_out,
                ldy, ch0, C, offs_ci, ci_mask, offs_co, mean, k, a, b, relu,
                ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # acc += x[tile pixels * stride + tap offset, offs_ci]^T @ dy[tile pixels, ch0 + offs_co] for the i-th of the
    # tiles that read a real input pixel through the tap (image-major, then the rectangle of `_hit_tiles`): the
    # caller's loop runs over those tiles only, with no branch, so the compiler pipelines its loads.
    r_first, r_count = _hit_tiles(ih_off, stride_h, H, H_out, BLOCK_H)
    c_first, c_count = _hit_tiles(iw_off, stride_w, W, W_out, BLOCK_W)
    per_img = r_count * c_count
    img = i // per_img
    oh0 = (r_first + i % per_img // c_count) * BLOCK_H
    ow0 = (c_first + i % per_img % c_count) * BLOCK_W
    oh, ow, p_mask = _tile_pixels(oh0, ow0, H_out, W_out, BLOCK_H, BLOCK_W)
    ih = oh * stride_h + ih_off
    iw = ow * stride_w + iw_off
    x_ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_rows = ((img * H + ih) * W + iw) * C_in
    xt = tl.load(x_ptr + x_rows[None, :] + offs_ci[:, None], mask=ci_mask[:, None] & x_ok[None, :], other=0)
    dy_rows = ((img * H_out + oh) * W_out + ow) * ldy + ch0
    dy = _dy_tile(dz_ptr, z_ptr, y_ptr, dy_rows, p_mask, offs_co, C, mean, k, a, b, relu, ACC_DTYPE)
    return _mma(xt, dy.to(xt.dtype), acc, DOT_PRECISION)


@triton.jit
def _wgrad_tiles(ih_off, iw_off, stride_h, stride_w, H, W, H_out, W_out, N,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # How many (image, tile) pairs read a real input pixel through a tap: the wgrad loop's trip count.
    _, r_count = _hit_tiles(ih_off, stride_h, H, H_out, BLOCK_H)
    _, c_count = _hit_tiles(iw_off, stride_w, W, W_out, BLOCK_W)
    return N * r_count * c_count


@triton.jit
def _tile_stats(y, mask, cnt, part_count_ptr, part_mean_ptr, part_m2_ptr, tile, ld, ch, ch_mask, store_count):
    # BN statistics of the tile, centred on the tile mean (two passes over registers): no E[y^2] - E[y]^2. Row
    # `tile` of the (P, ld) partials, columns `ch`; Chan's merge in bn_finalize. The corrected two-pass form: the
    # first pass's mean m carries the rounding of a sum of large values (a mean of 100 with a spread of 0.01: m off
    # by ~5e-5, a third of a percent of the spread); the deviations' own sum s = sum(y - m), nearly exact, moves the
    # mean to m + s/n and takes s^2/n out of M2, the n * (m - mean)^2 that centring on m added (`_corrected`).
    m = _div(tl.sum(tl.where(mask, y, 0.0), 0), cnt)
    dev = tl.where(mask, y - m[None, :], 0.0)
    mean, m2 = _corrected(m, tl.sum(dev * dev, 0), tl.sum(dev, 0), cnt)
    tl.store(part_mean_ptr + tile * ld + ch, mean, mask=ch_mask)
    tl.store(part_m2_ptr + tile * ld + ch, m2, mask=ch_mask)
    if store_count:
        tl.store(part_count_ptr + tile, cnt)


@triton.jit
def _bn_affine(y, mean_ptr, scale_ptr, shift_ptr, offs_c, c_mask, ACC_DTYPE: tl.constexpr):
    # (y - mean) * scale + shift per channel: the centred BN affine of the epilogues and prologues.
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    return (y - mean[None, :]) * scale[None, :] + shift[None, :]


@triton.jit
def _eval_bn_epilogue(y, rm_ptr, rv_ptr, gamma_ptr, beta_ptr, hyper_ptr, save_mean_ptr, save_invstd_ptr, offs_c,
                      c_mask, store_stats, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                      ACC_DTYPE: tl.constexpr):
    # Eval BN from the running statistics, computed where it is applied (no host-side affine): (y - rm) * gamma
    # * invstd + beta, invstd = 1/sqrt(rv + eps). `store_stats`: this program writes the op's save_mean and
    # save_invstd outputs for its channels.
    mean = tl.load(rm_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    invstd = _invstd(tl.load(rv_ptr + offs_c, mask=c_mask, other=1).to(ACC_DTYPE) + tl.load(hyper_ptr + 1),
                     ACC_DTYPE)
    if store_stats:
        tl.store(save_mean_ptr + offs_c, mean, mask=c_mask)
        tl.store(save_invstd_ptr + offs_c, invstd, mask=c_mask)
    scale = invstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE) * invstd
    z = (y - mean[None, :]) * scale[None, :]
    if HAS_BETA:
        z += tl.load(beta_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)[None, :]
    return z


# ---- kernels -----------------------------------------------------------------------------------------


# Which integer arguments the conv kernels leave unspecialized (Triton would otherwise compile one variant per class
# of each: == 1, divisible by 16, other). The spatial sizes and the batch: every address the kernels vectorize runs
# along the channels (NHWC; channel counts stay specialized, their divisibility is what aligns the loads and the
# masks), so a map size divisible by 16 buys nothing but another variant, and evaluating images of many sizes compiled
# one per mix of classes. Padding and dilation enter only scalar tap offsets (kh * dil - pad). In the forward and the
# wgrad, strides enter the same way, as per-tap scalars and one integer multiply-add per pixel of a tile's address,
# and so does the wgrad's split count (its loop's step). The dgrad keeps its strides specialized: a stride of 1
# folds its per-pixel divisions and phase arithmetic away. The backward kernels' `relu` flag masks a load and a
# select (`_dy_tile`): a constant would save a predicate per element and double the variants a network compiles.
_SIZES_UNSPECIALIZED = ("H", "W", "H_out", "W_out")
_GEOMETRY_UNSPECIALIZED = ("pad_h", "pad_w", "dil_h", "dil_w")
_FWD_UNSPECIALIZED = _SIZES_UNSPECIALIZED + _GEOMETRY_UNSPECIALIZED + ("stride_h", "stride_w")
_DGRAD_UNSPECIALIZED = _SIZES_UNSPECIALIZED + _GEOMETRY_UNSPECIALIZED + ("relu",)
_WGRAD_UNSPECIALIZED = _FWD_UNSPECIALIZED + ("N", "SPLITS", "relu")


@jit_unspecialized(*_FWD_UNSPECIALIZED)
def _conv_fwd_kernel(
    # pointers: x (N, H, W, C_in), w (KH, KW, C_in, C_out); y, out, residual (N, H_out, W_out, C_out)
    x_ptr, w_ptr, y_ptr, out_ptr, res_ptr,
    # eval epilogue (C_out,): running mean and var, gamma, beta (or the conv bias), [momentum, eps]; outputs
    # save_mean and save_invstd (opmath)
    rm_ptr, rv_ptr, gamma_ptr, bias_ptr, hyper_ptr, save_mean_ptr, save_invstd_ptr,
    # training epilogue: per-tile count (P,), mean and M2 (P, C_out) opmath; pair counter (1,) int32
    part_count_ptr, part_mean_ptr, part_m2_ptr, pairs_ptr,
    # sizes and geometry
    H, W, C_in, H_out, W_out, C_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    TRAINING: tl.constexpr, EVAL_BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_Y: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, COUNT_PAIRS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    img, oh0, ow0, oh_last, ow_last, oh, ow, m_mask, offs_n, n_mask, acc = _gemm_tile(
        pid_t, pid_n, H_out, W_out, C_out, ACC_DTYPE, BLOCK_H, BLOCK_W, BLOCK_N)

    for kh in range(KH):
        for kw in range(KW):
            acc = _fwd_tap(acc, x_ptr, w_ptr + (kh * KW + kw) * C_in * C_out, C_out, img, oh, ow, m_mask, oh0, ow0,
                           oh_last, ow_last, kh * dil_h - pad_h, kw * dil_w - pad_w, stride_h, stride_w, H, W, C_in,
                           offs_n, n_mask, pid_n >= 0, pairs_ptr, pid_n == 0, COUNT_PAIRS, DOT_PRECISION, BLOCK_K)

    o_mask = m_mask[:, None] & n_mask[None, :]
    o_idx = (((img * H_out + oh) * W_out + ow) * C_out)[:, None] + offs_n[None, :]
    y_stored = acc.to(y_ptr.dtype.element_ty)
    if STORE_Y:
        tl.store(y_ptr + o_idx, y_stored, mask=o_mask)
    # BN sees y as stored (rounded to fp16/bf16 there): what a cuDNN conv followed by BatchNorm computes.
    y = y_stored.to(ACC_DTYPE)
    if TRAINING:
        cnt = ((oh_last - oh0 + 1) * (ow_last - ow0 + 1)).to(ACC_DTYPE)
        _tile_stats(y, o_mask, cnt, part_count_ptr, part_mean_ptr, part_m2_ptr, pid_t, C_out, offs_n, n_mask,
                    pid_n == 0)
    else:
        if EVAL_BN:
            z = _eval_bn_epilogue(y, rm_ptr, rv_ptr, gamma_ptr, bias_ptr, hyper_ptr, save_mean_ptr, save_invstd_ptr,
                                  offs_n, n_mask, pid_t == 0, HAS_GAMMA, HAS_BIAS, ACC_DTYPE)
        elif HAS_BIAS:
            z = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)[None, :]
        else:
            z = y
        if HAS_RES:
            z += tl.load(res_ptr + o_idx, mask=o_mask, other=0).to(ACC_DTYPE)
        if RELU:
            z = _relu(z)
        tl.store(out_ptr + o_idx, z.to(out_ptr.dtype.element_ty), mask=o_mask)


@jit_unspecialized(*_DGRAD_UNSPECIALIZED)
def _conv_dgrad_kernel(
    # pointers: grad_out, out, conv_out (N, H_out, W_out, C_out); coef (4, C_out) opmath;
    # wt (KH, KW, C_out, C_in); dx (N, H, W, C_in); pair counter
    dz_ptr, z_ptr, y_ptr, coef_ptr, wt_ptr, dx_ptr, pairs_ptr,
    H, W, C_in, H_out, W_out, C_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, relu,
    KH: tl.constexpr, KW: tl.constexpr, COUNT_PAIRS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Sub-pixel phases: program 0-axis = (tile, phase). Phase (ph, pw) owns the input pixels ih = ph + i*stride_h,
    # iw = pw + j*stride_w, tiled as a dense (BLOCK_H, BLOCK_W) grid of that sub-lattice; a tap reaches all of a
    # phase's pixels or none ((ph + pad - kh*dil) % stride == 0), so no MMA row is masked for misalignment.
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    phases = stride_h * stride_w
    ph = pid % phases // stride_w
    pw = pid % phases % stride_w
    img, r0, c0, r_last, c_last, r, c, m_mask, offs_n, n_mask, acc = _gemm_tile(
        pid // phases, pid_n, tl.cdiv(H, stride_h), tl.cdiv(W, stride_w), C_in, ACC_DTYPE, BLOCK_H, BLOCK_W,
        BLOCK_N)
    ih = ph + r * stride_h
    iw = pw + c * stride_w
    m_mask = m_mask & (ih < H) & (iw < W)
    ih0 = ph + r0 * stride_h
    iw0 = pw + c0 * stride_w
    ih_last = tl.minimum(ph + r_last * stride_h, H - 1)
    iw_last = tl.minimum(pw + c_last * stride_w, W - 1)

    for kh in range(KH):
        for kw in range(KW):
            th_off = pad_h - kh * dil_h
            tw_off = pad_w - kw * dil_w
            live = ((ph + th_off) % stride_h == 0) & ((pw + tw_off) % stride_w == 0)
            acc = _dgrad_tap(acc, dz_ptr, z_ptr, y_ptr, coef_ptr, wt_ptr + (kh * KW + kw) * C_out * C_in, C_out, 0,
                             img, ih, iw, m_mask, ih0, iw0, ih_last, iw_last, th_off, tw_off,
                             stride_h, stride_w, H_out, W_out, C_out, C_in, offs_n, n_mask, live, pairs_ptr,
                             pid_n == 0, relu, COUNT_PAIRS, ACC_DTYPE, DOT_PRECISION, BLOCK_K)

    _store_tile(dx_ptr, acc, img, ih, iw, H, W, C_in, offs_n, n_mask, m_mask)


@jit_unspecialized(*_WGRAD_UNSPECIALIZED)
def _conv_wgrad_kernel(
    # pointers: x (N, H, W, C_in); grad_out, out, conv_out (N, H_out, W_out, C_out); coef (4, C_out);
    # partial dw (SPLITS, KH*KW, C_in, C_out) opmath; pair counter
    x_ptr, dz_ptr, z_ptr, y_ptr, coef_ptr, part_ptr, pairs_ptr,
    N, H, W, C_in, H_out, W_out, C_out, SPLITS,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, relu,
    KH: tl.constexpr, KW: tl.constexpr, COUNT_PAIRS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one tap, a (C_in, C_out) block, and every SPLITS-th spatial tile (split-K over pixels,
    # the partials summed on the host in a fixed order: deterministic). Axis 0 is (channel block, tap), tap
    # fastest: the channel blocks can pass the 65535 of a grid's y axis (float64 and FMA float32 keep 16 x 16
    # blocks only: 4096 x 4096 channels are 65536 of them).
    tap = tl.program_id(0) % (KH * KW)
    pid_mn = tl.program_id(0) // (KH * KW)
    offs_ci, ci_mask, offs_co, acc = _wgrad_block(pid_mn, C_in, C_out, ACC_DTYPE, BLOCK_M, BLOCK_N)
    pid_s = tl.program_id(2)
    ih_off = tap // KW * dil_h - pad_h
    iw_off = tap % KW * dil_w - pad_w
    mean, k, a, b = _dy_coef(coef_ptr, offs_co, C_out, C_out, ACC_DTYPE)  # this program's C_out block: loaded once
    tiles = _wgrad_tiles(ih_off, iw_off, stride_h, stride_w, H, W, H_out, W_out, N, BLOCK_H, BLOCK_W)
    for i in range(pid_s, tiles, SPLITS):
        acc = _wgrad_tile(acc, x_ptr, dz_ptr, z_ptr, y_ptr, i, ih_off, iw_off, stride_h, stride_w, H, W, C_in, H_out,
                          W_out, C_out, 0, C_out, offs_ci, ci_mask, offs_co, mean, k, a, b, relu, ACC_DTYPE,
                          DOT_PRECISION, BLOCK_H, BLOCK_W)
    _count_split_pairs(pairs_ptr, pid_mn == 0, tiles, pid_s, SPLITS, COUNT_PAIRS)

    idx = ((pid_s * KH * KW + tap) * C_in + offs_ci)[:, None] * C_out + offs_co[None, :]
    tl.store(part_ptr + idx, acc, mask=ci_mask[:, None] & (offs_co < C_out)[None, :])


# ---- configurations ------------------------------------------------------------------------------------

# Under the interpreter (and when counting pairs): a configuration the GPU lists also use. The interpreter's
# cost is per tile operation, nearly independent of the tile's size, so the tiles are large (16x16 pixels:
# half the time of 8x8 on the tests' shapes) and the channel blocks the smallest tl.dot accepts on a GPU.
INTERPRETER_CONFIGS = {
    "fwd": dict(BLOCK_H=16, BLOCK_W=16, BLOCK_N=16, BLOCK_K=16),
    "dgrad": dict(BLOCK_H=16, BLOCK_W=16, BLOCK_N=16, BLOCK_K=16),
    "wgrad": dict(BLOCK_H=16, BLOCK_W=16, BLOCK_M=16, BLOCK_N=16),
}


def _cfg(bh, bw, bn, bk, warps, stages, k_name="BLOCK_K", n_name="BLOCK_N"):
    return triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, n_name: bn, k_name: bk}, num_warps=warps, num_stages=stages)


# Hopper (sm_90): more shared memory and deeper pipelines; 128-pixel tiles (8x16 feeds a 64-row wgmma twice).
# Every tile but the last has >= 64 pixels (wgmma's warpgroup M); the last (4x4, 16 channels: float64 and
# channel counts <= 16) lowers to mma.sync. The one before it is the narrow-K tile: 16 channels along K (the
# reduction's channels: C_in forward, C_out dgrad) for layers with 16 or fewer of them and 33 or more along N (an
# RGB stem, 3 -> 64), which would otherwise fall to the last tile's 16 pixels x 16 channels per program.
HOPPER_GEMM = [
    _cfg(8, 16, 128, 64, 8, 3), _cfg(8, 16, 64, 64, 4, 4), _cfg(16, 16, 128, 32, 8, 3), _cfg(8, 8, 128, 64, 4, 4),
    _cfg(8, 8, 64, 32, 4, 4), _cfg(8, 8, 32, 32, 4, 4), _cfg(8, 16, 64, 16, 4, 3), _cfg(4, 4, 16, 16, 2, 3),
]
# Ampere (sm_80/86/89) and older: 2-3 stages fit the smaller shared memory.
AMPERE_GEMM = [
    _cfg(8, 16, 128, 32, 8, 3), _cfg(8, 8, 128, 32, 4, 3), _cfg(8, 16, 64, 32, 4, 3), _cfg(8, 8, 64, 64, 4, 2),
    _cfg(4, 8, 32, 32, 4, 3), _cfg(8, 8, 64, 16, 4, 3), _cfg(4, 4, 16, 16, 2, 2),
]
# wgrad: M = C_in, N = C_out, K = BLOCK_H * BLOCK_W pixels.
HOPPER_WGRAD = [
    _cfg(8, 8, 128, 128, 8, 3, "BLOCK_M"), _cfg(8, 8, 64, 128, 4, 4, "BLOCK_M"), _cfg(8, 8, 64, 64, 4, 4, "BLOCK_M"),
    _cfg(4, 8, 64, 64, 4, 4, "BLOCK_M"), _cfg(4, 4, 16, 16, 2, 3, "BLOCK_M"),
]
AMPERE_WGRAD = [
    _cfg(8, 8, 128, 64, 8, 3, "BLOCK_M"), _cfg(8, 8, 64, 64, 4, 3, "BLOCK_M"), _cfg(4, 8, 64, 64, 4, 2, "BLOCK_M"),
    _cfg(4, 4, 16, 16, 2, 2, "BLOCK_M"),
]

# ---- shared memory and the float64 path: what pruning drops before any launch -----------------------------

# Bytes one pipeline stage of each kernel's main loop loads, from its blocks, the activation element size and
# the opmath size: the operands and the BN prologue's activation tiles and per-channel rows.


def _fwd_stage(b, e, o):
    return (b["BLOCK_H"] * b["BLOCK_W"] + b["BLOCK_N"]) * b["BLOCK_K"] * e


def _dgrad_stage(b, e, o, loads=3):
    return (loads * b["BLOCK_H"] * b["BLOCK_W"] + b["BLOCK_N"]) * b["BLOCK_K"] * e + 4 * b["BLOCK_K"] * o


def _wgrad_stage(b, e, o, loads=3):
    return (b["BLOCK_M"] + loads * b["BLOCK_N"]) * b["BLOCK_H"] * b["BLOCK_W"] * e


# How a kernel's main loop holds its loads in shared memory (measured on compiled kernels, triton 3.6 and 3.8):
#   "direct"    operands loaded straight into the MMA's buffers: num_stages stages;
#   "prologue"  the A operand computed in registers (dgrad's BN prologue): num_stages - 1 stages of loads, plus
#               the operands' staging (A + B; twice on Hopper, where wgmma reads both from shared memory);
#   "wgrad"     num_stages - 1 stages of loads, a further stage of the A operand (x^T), and its staging (2 A).
# Bounds, not exact sizes: the check against compiled kernels (tests/triton/test_triton_compile.py) holds them
# above the compiled size and within 1.6x of it.
STAGE_BYTES = {}    # kernel -> stage_bytes(blocks, elem, opmath); aspp.py adds its kernels
MMA_SHAPE = {}      # kernel -> (M, K, N) of one tl.dot from the blocks
PIPELINE = {}       # kernel -> "direct" | "prologue" | "wgrad"
STAGE_BYTES.update({_conv_fwd_kernel: _fwd_stage, _conv_dgrad_kernel: _dgrad_stage,
                    _conv_wgrad_kernel: _wgrad_stage})
PIPELINE.update({_conv_fwd_kernel: "direct", _conv_dgrad_kernel: "prologue", _conv_wgrad_kernel: "wgrad"})


def _pix_mkn(b):
    return b["BLOCK_H"] * b["BLOCK_W"], b["BLOCK_K"], b["BLOCK_N"]


MMA_SHAPE.update({_conv_fwd_kernel: _pix_mkn, _conv_dgrad_kernel: _pix_mkn,
                  _conv_wgrad_kernel: lambda b: (b["BLOCK_M"], b["BLOCK_H"] * b["BLOCK_W"], b["BLOCK_N"])})

# float64 multiplies through `_mma`'s broadcast product, held in registers: only tiles whose M*K*N product
# stays this small are kept (the smallest configuration of every list).
FP64_MAX_PRODUCT = 16 * 16 * 16
# float32 without TF32 ("ieee") multiplies on the FMA units, operand slices and accumulator in registers: larger
# tiles spilled 0.2-12 KB per thread to local memory (ptxas for sm_80 / sm_90: the wgrads' 64 x 32 x 64 2.8 KB on
# sm_80, the forward's 128 x 64 x 128 1.3 KB on sm_90), these up to 32 B (tests/triton/test_triton_compile.py).
FP32_FMA_MAX_PRODUCT = 64 * 32 * 32
# TF32 tiles whose float32 accumulator exceeds this many registers per thread spilled (256 x 128 pixels x
# channels at 8 warps, 128 per thread: 312 B in the forward on sm_90).
TF32_MAX_ACC_PER_THREAD = 64
# Triton before 3.8 (3.6: torch 2.11's release, the GPU machine's) allocates the conv forward's eval epilogue
# (BatchNorm folded: scale and bias per channel) worse: its 8 x 16 x 128 tile at 8 warps (64 accumulator registers
# per thread) spilled 192 B on sm_90, where triton 3.8 spills none. There, that kernel's TF32 tiles at 8 warps keep
# at most half as many (the whole matrix under triton 3.6: docs/kernels.md); the other kernels' 8-warp tiles, and
# its training-mode compile, spilled at most 48 B.
_TRITON_BEFORE_3_8 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8)


def _tf32_acc_limit(kernel, num_warps: int) -> int:
    if _TRITON_BEFORE_3_8 and num_warps >= 8 and kernel is _conv_fwd_kernel:
        return TF32_MAX_ACC_PER_THREAD // 2
    return TF32_MAX_ACC_PER_THREAD


def smem_estimate(kernel, config, elem_size: int, hopper: bool) -> int:
    """Upper bound of the shared memory (bytes) `kernel` compiled with `config` uses for `elem_size`-byte
    activations with wgmma's operand staging (`hopper`: sm_90 with tensor cores) or without (sm_80, and fp32
    without TF32 on sm_90): its main loop's buffers (PIPELINE); the epilogue reuses them."""
    o = 8 if elem_size == 8 else 4
    m, k, n = MMA_SHAPE[kernel](config.kwargs)
    operands = (m * k + k * n) * elem_size
    stage = STAGE_BYTES[kernel](config.kwargs, elem_size, o)
    kind = PIPELINE[kernel]
    if kind == "direct":
        loop = config.num_stages * stage
    elif kind == "prologue":
        loop = (config.num_stages - 1) * stage + (2 if hopper else 1) * operands
    else:
        loop = (config.num_stages - 1) * stage + 3 * m * k * elem_size
    return loop


def fitting_configs(kernel, configs, elem_size: int, smem_limit: float = float("inf"), hopper: bool = True,
                    fma: bool = False) -> list:
    """The configurations that can run without spilling: within `smem_limit` bytes of shared memory by
    `smem_estimate`; for float64, tiles within FP64_MAX_PRODUCT; for float32, within FP32_FMA_MAX_PRODUCT on the
    FMA units (`fma`: no TF32) and TF32_MAX_ACC_PER_THREAD on tensor cores. Never empty: the smallest if none
    fits."""
    if elem_size == 8:
        kept = [c for c in configs if _product(kernel, c) <= FP64_MAX_PRODUCT]
    else:
        kept = [c for c in configs if smem_estimate(kernel, c, elem_size, hopper) <= smem_limit]
        if elem_size == 4 and fma:
            kept = [c for c in kept if _product(kernel, c) <= FP32_FMA_MAX_PRODUCT]
        elif elem_size == 4:
            kept = [c for c in kept if _acc_per_thread(kernel, c) <= _tf32_acc_limit(kernel, c.num_warps)]
    return kept or [min(configs, key=lambda c: _product(kernel, c))]


def _product(kernel, config) -> int:
    m, k, n = MMA_SHAPE[kernel](config.kwargs)
    return m * k * n


def _acc_per_thread(kernel, config) -> int:
    m, _, n = MMA_SHAPE[kernel](config.kwargs)
    return m * n // (32 * config.num_warps)


def fit_pruner(kernel, channel_prune):
    """prune(configs, sizes): `fitting_configs` for sizes["elem_size"], sizes["smem_limit"], sizes["hopper"] and
    sizes["fma"] (what the launchers pass: `fit_sizes`), then `channel_prune`."""

    def prune(configs, sizes):
        return channel_prune(fitting_configs(kernel, configs, sizes.get("elem_size", 2),
                                             sizes.get("smem_limit", float("inf")), sizes.get("hopper", True),
                                             sizes.get("fma", False)),
                             sizes)

    return prune


@functools.cache
def _device_limits(index: int) -> tuple[int, bool]:
    props = torch.cuda.get_device_properties(index)
    return props.shared_memory_per_block_optin, props.major >= 9


def fit_sizes(t: torch.Tensor) -> dict:
    """The sizes entries `fit_pruner` reads: the element size, whether float32 multiplies on the FMA units (no
    TF32), the device's shared memory per block, and whether the GEMMs stage their operands as wgmma does (Hopper,
    except on the FMA units)."""
    fma = t.dtype == torch.float32 and dot_precision(t.dtype, t.device) == "ieee"
    if t.device.type != "cuda":
        return {"elem_size": t.element_size(), "fma": fma}
    return gpu_fit_sizes(t, fma, *_device_limits(t.device.index or 0))


def gpu_fit_sizes(t: torch.Tensor, fma: bool, smem_limit: int, hopper: bool) -> dict:
    """`fit_sizes` on a GPU with `smem_limit` bytes of shared memory per block (`hopper`: sm_90 or later)."""
    return {"elem_size": t.element_size(), "fma": fma, "smem_limit": smem_limit, "hopper": hopper and not fma}


# The tuning cache key: channel counts bucketed to powers of two, strides exact, map sizes and batch left out
# (launch.UNKEYED); the constexprs (kernel size, epilogue flags, dtype) are keyed by the launcher.
KERNELS = {
    "fwd": KernelSpec(_conv_fwd_kernel, HOPPER_GEMM, AMPERE_GEMM, INTERPRETER_CONFIGS["fwd"],
                      fit_pruner(_conv_fwd_kernel, prune_by_channels("C_out", "C_in", "BLOCK_N", "BLOCK_K")),
                      ("C_in", "C_out", "H_out", "W_out"), ("stride_h", "stride_w")),
    "dgrad": KernelSpec(_conv_dgrad_kernel, HOPPER_GEMM, AMPERE_GEMM, INTERPRETER_CONFIGS["dgrad"],
                        fit_pruner(_conv_dgrad_kernel, prune_by_channels("C_in", "C_out", "BLOCK_N", "BLOCK_K")),
                        ("C_in", "C_out", "H", "W"), ("stride_h", "stride_w")),
    "wgrad": KernelSpec(_conv_wgrad_kernel, HOPPER_WGRAD, AMPERE_WGRAD, INTERPRETER_CONFIGS["wgrad"],
                        fit_pruner(_conv_wgrad_kernel, prune_by_channels("C_out", "C_in", "BLOCK_N", "BLOCK_M")),
                        ("C_in", "C_out", "H_out", "W_out"), ("stride_h", "stride_w", "SPLITS")),
}


def cudnn_conv_tf32() -> bool:
    """Whether cuDNN's float32 convolutions may use TF32: `torch.backends.cudnn.conv.fp32_precision` (which resolves
    "none" through cudnn's and the global setting; only "tf32" allows it), else, on a torch without that API, the
    legacy `torch.backends.cudnn.allow_tf32`. The legacy flag raises once the new API has set conv and RNN apart
    (e.g. `torch.backends.cudnn.conv.fp32_precision = "ieee"`), so it is read only where the new one is missing."""
    precision = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if isinstance(precision, str):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """The GEMMs' DOT_PRECISION: "fma" for float64 (see `_mma`), TF32 for float32 only where cuDNN would use it
    (`cudnn_conv_tf32`), else "ieee"."""
    if dtype == torch.float64:
        return "fma"
    if dtype == torch.float32 and device.type == "cuda" and cudnn_conv_tf32():
        return "tf32"
    return "ieee"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(device: torch.device, programs: int, pixel_tiles: int) -> int:
    """Split-K over pixels for the wgrad kernels: enough programs for a few waves (2 in the interpreter);
    fixed per shape, not per configuration, so the partial buffer is sized before the launch."""
    if _interpreter_active() or device.type != "cuda":
        return 2
    return gpu_split_count(_sm_count(device.index or 0), programs, pixel_tiles)


def gpu_split_count(sms: int, programs: int, pixel_tiles: int) -> int:
    """`split_count` on a GPU of `sms` multiprocessors: about four programs per multiprocessor, at most one split per
    pixel tile and 64 in all."""
    return max(1, min(4 * sms // max(programs, 1), pixel_tiles, 64))


# ---- launchers -----------------------------------------------------------------------------------------


class Geometry(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def args(self) -> tuple[int, ...]:
        return (*self.stride, *self.padding, *self.dilation)


def conv_forward(
    x: torch.Tensor, w: torch.Tensor, geo: Geometry, out_hw: tuple[int, int], *, training: bool,
    stat_dtype: torch.dtype, eval_bn: tuple | None = None, bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None, relu: bool = True, store_y: bool = True,
    pairs: torch.Tensor | None = None, config: dict | None = None,
):
    """Implicit-GEMM forward of NHWC `x` with `w` (KH, KW, C_in, C_out).

    training: (y, None, (count (P,), mean (P, C_out), M2 (P, C_out))), one partial per spatial tile.
    eval:     (y or None, out, None). With eval_bn = (running_mean, running_var, gamma or None, beta or None,
              hyper [momentum, eps], save_mean out, save_invstd out): out = act(BN(y) [+ residual]) and the
              statistics outputs written; without: out = act(y [+ bias] [+ residual]). y stored if `store_y`.
    `pairs`: an int32 (1,) tensor that the kernel adds the number of computed (tile, tap) pairs to.
    """
    n, h, wd, c_in = x.shape
    kh, kw, _, c_out = w.shape
    ho, wo = out_hw
    y = x.new_empty((n, ho, wo, c_out)) if training or store_y else None
    out = x.new_empty((n, ho, wo, c_out)) if not training else None
    dummy = y if y is not None else out
    if eval_bn is not None:
        rm, rv, gamma, beta, hyper, save_mean, save_invstd = eval_bn
        bias = beta
    else:
        rm = rv = gamma = hyper = save_mean = save_invstd = dummy
    meta = dict(KH=kh, KW=kw, TRAINING=training, EVAL_BN=eval_bn is not None,
                HAS_GAMMA=eval_bn is not None and gamma is not None, HAS_BIAS=bias is not None,
                STORE_Y=training or store_y, HAS_RES=residual is not None, RELU=relu and not training,
                COUNT_PAIRS=pairs is not None,
                ACC_DTYPE=acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype, x.device))

    def run(cfg):
        p = n * cdiv(ho, cfg["BLOCK_H"]) * cdiv(wo, cfg["BLOCK_W"])
        if training:
            parts = (torch.empty(p, dtype=stat_dtype, device=x.device),
                     torch.empty(p, c_out, dtype=stat_dtype, device=x.device),
                     torch.empty(p, c_out, dtype=stat_dtype, device=x.device))
        else:
            parts = None
        pc, pm, pm2 = parts if parts is not None else (dummy, dummy, dummy)
        launch_kernel(
            _conv_fwd_kernel, (p, cdiv(c_out, cfg["BLOCK_N"])),
            x, w, dummy, out if out is not None else dummy, residual if residual is not None else dummy,
            rm, rv, gamma if gamma is not None else dummy, bias if bias is not None else dummy, hyper, save_mean,
            save_invstd, pc, pm, pm2, pairs if pairs is not None else dummy,
            h, wd, c_in, ho, wo, c_out, *geo.args(), **meta, **cfg,
        )
        return parts

    sizes = dict(C_in=c_in, C_out=c_out, N=n, H_out=ho, W_out=wo, stride_h=geo.stride[0], stride_w=geo.stride[1],
                 **fit_sizes(x))
    parts = run_tuned(KERNELS["fwd"], x.device, x.dtype, sizes, meta, run, config)
    return y, out, parts


def conv_dgrad(
    grad_out: torch.Tensor, out: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, wt: torch.Tensor,
    geo: Geometry, in_hw: tuple[int, int], *, relu: bool, pairs: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """dx (N, H, W, C_in) from NHWC (grad_out, out, conv_out), coef (4, C_out) and wt (KH, KW, C_out, C_in)."""
    n, ho, wo, c_out = y.shape
    kh, kw, _, c_in = wt.shape
    h, wd = in_hw
    dx = y.new_empty((n, h, wd, c_in))
    sh, sw = geo.stride
    meta = dict(KH=kh, KW=kw, COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(y.dtype),
                DOT_PRECISION=dot_precision(y.dtype, y.device))

    def run(cfg):
        launch_kernel(
            _conv_dgrad_kernel,
            (n * cdiv(cdiv(h, sh), cfg["BLOCK_H"]) * cdiv(cdiv(wd, sw), cfg["BLOCK_W"])
             * sh * sw, cdiv(c_in, cfg["BLOCK_N"])),
            grad_out, out, y, coef, wt, dx, pairs if pairs is not None else dx, h, wd, c_in, ho, wo, c_out,
            *geo.args(), int(relu), **meta, **cfg,
        )

    sizes = dict(C_in=c_in, C_out=c_out, N=n, H=h, W=wd, stride_h=geo.stride[0], stride_w=geo.stride[1],
                 **fit_sizes(y))
    run_tuned(KERNELS["dgrad"], y.device, y.dtype, sizes, meta, run, config)
    return dx


def conv_wgrad(
    x: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor, y: torch.Tensor, coef: torch.Tensor,
    kernel_hw: tuple[int, int], geo: Geometry, *, relu: bool, pairs: torch.Tensor | None = None,
    config: dict | None = None, dw_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dw as (KH, KW, C_in, C_out) in the opmath dtype, from NHWC x and (grad_out, out, conv_out), coef (4, C_out);
    or summed straight into `dw_out`, a (C_out, C_in, KH, KW) tensor of the opmath dtype in any memory format."""
    n, h, wd, c_in = x.shape
    _, ho, wo, c_out = y.shape
    kh, kw = kernel_hw
    splits = split_count(x.device, kh * kw * cdiv(c_in, 64) * cdiv(c_out, 64),
                         n * cdiv(ho * wo, 64))
    part = torch.empty(splits, kh * kw, c_in, c_out, dtype=coef.dtype, device=x.device)
    meta = dict(KH=kh, KW=kw, COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(x.dtype),
                DOT_PRECISION=dot_precision(x.dtype, x.device))

    def run(cfg):
        launch_kernel(
            _conv_wgrad_kernel,
            (kh * kw * cdiv(c_in, cfg["BLOCK_M"]) * cdiv(c_out, cfg["BLOCK_N"]), 1, splits),
            x, grad_out, out, y, coef, part, pairs if pairs is not None else part, n, h, wd, c_in, ho, wo, c_out,
            splits, *geo.args(), int(relu), **meta, **cfg,
        )

    sizes = dict(C_in=c_in, C_out=c_out, N=n, H_out=ho, W_out=wo, stride_h=geo.stride[0], stride_w=geo.stride[1],
                 SPLITS=splits, **fit_sizes(x))
    run_tuned(KERNELS["wgrad"], x.device, x.dtype, sizes, meta, run, config)
    if dw_out is not None:
        # The split partials reduced in the weight's layout: no separate permute copy.
        return torch.sum(part.view(splits, kh, kw, c_in, c_out).permute(0, 4, 3, 1, 2), 0, out=dw_out)
    return part.sum(0).view(kh, kw, c_in, c_out)

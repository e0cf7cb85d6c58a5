"""The implicit-GEMM convolution engine: forward with BN epilogues, dgrad and wgrad with the BN-backward prologue.

Layouts (all contiguous): activations NHWC, forward weight (KH, KW, C_in, C_out), dgrad weight
(KH, KW, C_out, C_in). Each tap (kh, kw) of the filter is one GEMM over channels:
  forward  y[p, co]  += x[p*s - pad + tap*dil, ci] . w[tap, ci, co]     M = output pixels, N = C_out, K = C_in
  dgrad    dx[q, ci] += dy[(q + pad - tap*dil)/s, co] . w[tap, co, ci]  M = input pixels,  N = C_in,  K = C_out
  wgrad    dw[tap, ci, co] += x[p*s - pad + tap*dil, ci]^T . dy[p, co]   M = C_in, N = C_out, K = output pixels

Tiles. The pixel dimension is a 2-D spatial block of BLOCK_H x BLOCK_W pixels of one image, not a row strip,
so that a tap falling in the zero padding can be recognised for the whole tile, in both directions.

Padding-tap skipping. Before the K loop of a tap, scalar bounds tests on the tile's first and last rows and
columns decide whether any of the tile's pixels reads (forward, wgrad) or receives (dgrad) a real input
pixel through that tap; if none does, the (tile, tap) pair is not computed: no loads, no MMAs. At 33x33 with
rate 18 that removes more than half of a 3x3 conv's work. `COUNT_PAIRS` makes a kernel count the pairs it
computes (one atomic per pair), which `conv_bn_relu.schedule` and its test check against the geometry.

Fusion.
  forward training: the epilogue stores y and the tile's per-channel (count, mean, M2), centred within the
                    tile, computed from y as stored; the finalize kernel merges them with Chan's formula.
  forward eval:     the epilogue applies act((y - mean)*scale + shift [+ r]) and stores out (and y, which the
                    op returns as conv_out for the backward).
  dgrad / wgrad:    the prologue computes dy = k*(g - a - (y - mean)*b), g = dz*1[!(z <= 0)], from (grad_out, out,
                    conv_out) and per-channel coefficients while loading the tile: dy never exists in memory.
                    It is recomputed once per tap and per tile of the other GEMM dimension; that costs reads
                    of three activations instead of one, and saves a write and a read of dy.

Numerics: fp32 accumulation (fp64 for float64 inputs); fp16/bf16 operands go to tensor cores with fp32
accumulators; fp32 operands use TF32 only when the launcher asks for it (torch.backends.cudnn.allow_tf32).

Configurations: autotuned on GPU (Hopper and Ampere lists, read from the device at launch time); under the
Triton interpreter, one fixed small configuration, since there is nothing to tune and every launch is costly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deeplab_ops.backends import interpreter_active
from deeplab_ops.triton.bn_kernels import _act_grad, _bn_dy, acc_dtype

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
def _dy_coef(coef_ptr, offs_c, C, ACC_DTYPE: tl.constexpr):
    # Per-channel (mean, k, a, b) of dy = k*(g - a - (y - mean)*b), rows of the (4, C) coef tensor.
    c_mask = offs_c < C
    mean = tl.load(coef_ptr + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    k = tl.load(coef_ptr + C + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    a = tl.load(coef_ptr + 2 * C + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    b = tl.load(coef_ptr + 3 * C + offs_c, mask=c_mask, other=0).to(ACC_DTYPE)
    return mean, k, a, b


@triton.jit
def _dy_tile(dz_ptr, z_ptr, y_ptr, rows, row_mask, offs_c, C, mean, k, a, b,
             RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # The BN-backward prologue: dy for a (pixels, channels) tile of the NHWC activations, from grad_out,
    # out and conv_out. Out-of-range entries are 0, the GEMM's padding (dy itself is not 0 there:
    # -k*a + k*mean*b).
    mask = row_mask[:, None] & (offs_c < C)[None, :]
    idx = rows[:, None] + offs_c[None, :]
    dz = tl.load(dz_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
    y = tl.load(y_ptr + idx, mask=mask, other=0).to(ACC_DTYPE)
    if RELU:
        g = _act_grad(dz, tl.load(z_ptr + idx, mask=mask, other=0).to(ACC_DTYPE), RELU)
    else:
        g = dz
    return tl.where(mask, _bn_dy(g, y, mean, k, a, b), 0.0)


# ---- kernels -----------------------------------------------------------------------------------------


@triton.jit
def _conv_fwd_kernel(
    # pointers: x (N, H, W, C_in), w (KH, KW, C_in, C_out); y, out, residual (N, H_out, W_out, C_out)
    x_ptr, w_ptr, y_ptr, out_ptr, res_ptr,
    # eval epilogue: mean, scale, shift (C_out,) opmath
    mean_ptr, scale_ptr, shift_ptr,
    # training epilogue: per-tile count (P,), mean and M2 (P, C_out) opmath; pair counter (1,) int32
    part_count_ptr, part_mean_ptr, part_m2_ptr, pairs_ptr,
    # sizes and geometry
    H, W, C_in, H_out, W_out, C_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    TRAINING: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, COUNT_PAIRS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    img, oh0, ow0, oh_last, ow_last = _tile_origin(pid_t, H_out, W_out, BLOCK_H, BLOCK_W)
    oh, ow, m_mask = _tile_pixels(oh0, ow0, H_out, W_out, BLOCK_H, BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_out
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), ACC_DTYPE)
    for kh in range(KH):
        ih_off = kh * dil_h - pad_h
        rows_hit = _samples_hit(oh0 * stride_h + ih_off, oh_last * stride_h + ih_off, stride_h, H)
        ih = oh * stride_h + ih_off
        h_ok = m_mask & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw_off = kw * dil_w - pad_w
            cols_hit = _samples_hit(ow0 * stride_w + iw_off, ow_last * stride_w + iw_off, stride_w, W)
            if rows_hit & cols_hit:  # else: every pixel of the tile reads zero padding through this tap
                if COUNT_PAIRS:
                    if pid_n == 0:
                        tl.atomic_add(pairs_ptr, 1)
                iw = ow * stride_w + iw_off
                a_ok = h_ok & (iw >= 0) & (iw < W)
                x_rows = ((img * H + ih) * W + iw) * C_in
                w_tap = w_ptr + (kh * KW + kw) * C_in * C_out
                for k0 in range(0, C_in, BLOCK_K):
                    k = k0 + offs_k
                    k_mask = k < C_in
                    a = tl.load(x_ptr + x_rows[:, None] + k[None, :], mask=a_ok[:, None] & k_mask[None, :], other=0)
                    b = tl.load(w_tap + k[:, None] * C_out + offs_n[None, :],
                                mask=k_mask[:, None] & n_mask[None, :], other=0)
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    o_mask = m_mask[:, None] & n_mask[None, :]
    o_idx = (((img * H_out + oh) * W_out + ow) * C_out)[:, None] + offs_n[None, :]
    y_stored = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + o_idx, y_stored, mask=o_mask)
    # BN sees y as stored (rounded to fp16/bf16 there): what a cuDNN conv followed by BatchNorm computes.
    y = y_stored.to(ACC_DTYPE)
    if TRAINING:
        # Tile statistics centred on the tile mean (two passes over registers): exact M2, no E[y^2] - E[y]^2.
        cnt = ((oh_last - oh0 + 1) * (ow_last - ow0 + 1)).to(ACC_DTYPE)
        mean = tl.sum(tl.where(o_mask, y, 0.0), 0) / cnt
        dev = tl.where(o_mask, y - mean[None, :], 0.0)
        tl.store(part_mean_ptr + pid_t * C_out + offs_n, mean, mask=n_mask)
        tl.store(part_m2_ptr + pid_t * C_out + offs_n, tl.sum(dev * dev, 0), mask=n_mask)
        if pid_n == 0:
            tl.store(part_count_ptr + pid_t, cnt)
    else:
        mean = tl.load(mean_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0).to(ACC_DTYPE)
        z = (y - mean[None, :]) * scale[None, :] + shift[None, :]
        if HAS_RES:
            z += tl.load(res_ptr + o_idx, mask=o_mask, other=0).to(ACC_DTYPE)
        if RELU:
            z = tl.where(z < 0, 0.0, z)  # NaN propagates, as torch.relu
        tl.store(out_ptr + o_idx, z.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _conv_dgrad_kernel(
    # pointers: grad_out, out, conv_out (N, H_out, W_out, C_out); coef (4, C_out) opmath;
    # wt (KH, KW, C_out, C_in); dx (N, H, W, C_in); pair counter
    dz_ptr, z_ptr, y_ptr, coef_ptr, wt_ptr, dx_ptr, pairs_ptr,
    H, W, C_in, H_out, W_out, C_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, COUNT_PAIRS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    img, ih0, iw0, ih_last, iw_last = _tile_origin(pid_t, H, W, BLOCK_H, BLOCK_W)
    ih, iw, m_mask = _tile_pixels(ih0, iw0, H, W, BLOCK_H, BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_in
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), ACC_DTYPE)
    for kh in range(KH):
        # Output row oh reaches input row ih through tap kh iff oh * stride = ih + pad - kh * dil.
        th_off = pad_h - kh * dil_h
        rows_hit = _multiples_hit(ih0 + th_off, ih_last + th_off, stride_h, H_out)
        th = ih + th_off
        oh = th // stride_h
        h_ok = m_mask & (th >= 0) & (th % stride_h == 0) & (oh < H_out)
        for kw in range(KW):
            tw_off = pad_w - kw * dil_w
            cols_hit = _multiples_hit(iw0 + tw_off, iw_last + tw_off, stride_w, W_out)
            if rows_hit & cols_hit:  # else: no output pixel reaches this tile through this tap
                if COUNT_PAIRS:
                    if pid_n == 0:
                        tl.atomic_add(pairs_ptr, 1)
                tw = iw + tw_off
                ow = tw // stride_w
                ok = h_ok & (tw >= 0) & (tw % stride_w == 0) & (ow < W_out)
                dz_rows = ((img * H_out + oh) * W_out + ow) * C_out
                wt_tap = wt_ptr + (kh * KW + kw) * C_out * C_in
                for k0 in range(0, C_out, BLOCK_K):
                    co = k0 + offs_k
                    mean, k, a, b = _dy_coef(coef_ptr, co, C_out, ACC_DTYPE)
                    dy = _dy_tile(dz_ptr, z_ptr, y_ptr, dz_rows, ok, co, C_out, mean, k, a, b, RELU, ACC_DTYPE)
                    wt = tl.load(wt_tap + co[:, None] * C_in + offs_n[None, :],
                                 mask=(co < C_out)[:, None] & n_mask[None, :], other=0)
                    acc = tl.dot(dy.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)

    dx_idx = (((img * H + ih) * W + iw) * C_in)[:, None] + offs_n[None, :]
    tl.store(dx_ptr + dx_idx, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _conv_wgrad_kernel(
    # pointers: x (N, H, W, C_in); grad_out, out, conv_out (N, H_out, W_out, C_out); coef (4, C_out);
    # partial dw (SPLITS, KH*KW, C_in, C_out) opmath; pair counter
    x_ptr, dz_ptr, z_ptr, y_ptr, coef_ptr, part_ptr, pairs_ptr,
    N, H, W, C_in, H_out, W_out, C_out, SPLITS,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, COUNT_PAIRS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one tap, a (C_in, C_out) block, and every SPLITS-th spatial tile (split-K over pixels,
    # the partials summed on the host in a fixed order: deterministic).
    tap = tl.program_id(0)
    kh = tap // KW
    kw = tap % KW
    pid_mn = tl.program_id(1)
    blocks_n = tl.cdiv(C_out, BLOCK_N)
    offs_ci = pid_mn // blocks_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_mn % blocks_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = offs_ci < C_in
    pid_s = tl.program_id(2)
    tiles_w = tl.cdiv(W_out, BLOCK_W)
    tiles = tl.cdiv(H_out, BLOCK_H) * tiles_w
    ih_off = kh * dil_h - pad_h
    iw_off = kw * dil_w - pad_w
    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    mean, k, a, b = _dy_coef(coef_ptr, offs_co, C_out, ACC_DTYPE)  # this program's C_out block: loaded once

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for t in range(pid_s, N * tiles, SPLITS):
        img, oh0, ow0, oh_last, ow_last = _tile_origin(t, H_out, W_out, BLOCK_H, BLOCK_W)
        rows_hit = _samples_hit(oh0 * stride_h + ih_off, oh_last * stride_h + ih_off, stride_h, H)
        cols_hit = _samples_hit(ow0 * stride_w + iw_off, ow_last * stride_w + iw_off, stride_w, W)
        if rows_hit & cols_hit:  # else: this tap reads only zero padding for the whole tile
            if COUNT_PAIRS:
                if pid_mn == 0:
                    tl.atomic_add(pairs_ptr, 1)
            oh = oh0 + offs_p // BLOCK_W
            ow = ow0 + offs_p % BLOCK_W
            p_mask = (oh < H_out) & (ow < W_out)
            ih = oh * stride_h + ih_off
            iw = ow * stride_w + iw_off
            x_ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = ((img * H + ih) * W + iw) * C_in
            xt = tl.load(x_ptr + x_rows[None, :] + offs_ci[:, None], mask=ci_mask[:, None] & x_ok[None, :], other=0)
            dy_rows = ((img * H_out + oh) * W_out + ow) * C_out
            dy = _dy_tile(dz_ptr, z_ptr, y_ptr, dy_rows, p_mask, offs_co, C_out, mean, k, a, b, RELU, ACC_DTYPE)
            acc = tl.dot(xt, dy.to(xt.dtype), acc, input_precision=DOT_PRECISION)

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
_HOPPER_GEMM = [
    _cfg(8, 16, 128, 64, 8, 3), _cfg(8, 16, 64, 64, 4, 4), _cfg(16, 16, 128, 32, 8, 3), _cfg(8, 8, 128, 64, 4, 4),
    _cfg(8, 8, 64, 32, 4, 4), _cfg(4, 8, 32, 32, 4, 4), _cfg(4, 4, 16, 16, 2, 3),
]
# Ampere (sm_80/86/89) and older: 2-3 stages fit the smaller shared memory.
_AMPERE_GEMM = [
    _cfg(8, 16, 128, 32, 8, 3), _cfg(8, 8, 128, 32, 4, 3), _cfg(8, 16, 64, 32, 4, 3), _cfg(8, 8, 64, 64, 4, 2),
    _cfg(4, 8, 32, 32, 4, 3), _cfg(4, 4, 16, 16, 2, 2),
]
# wgrad: M = C_in, N = C_out, K = BLOCK_H * BLOCK_W pixels.
_HOPPER_WGRAD = [
    _cfg(8, 8, 128, 128, 8, 3, "BLOCK_M"), _cfg(8, 8, 64, 128, 4, 4, "BLOCK_M"), _cfg(8, 8, 64, 64, 4, 4, "BLOCK_M"),
    _cfg(4, 8, 64, 64, 4, 4, "BLOCK_M"), _cfg(4, 4, 16, 16, 2, 3, "BLOCK_M"),
]
_AMPERE_WGRAD = [
    _cfg(8, 8, 128, 64, 8, 3, "BLOCK_M"), _cfg(8, 8, 64, 64, 4, 3, "BLOCK_M"), _cfg(4, 8, 64, 64, 4, 2, "BLOCK_M"),
    _cfg(4, 4, 16, 16, 2, 2, "BLOCK_M"),
]


# The smallest spatial tile of any forward configuration: it bounds the number of per-tile BN partials.
_MIN_TILE = (
    min(c.kwargs["BLOCK_H"] for c in _HOPPER_GEMM + _AMPERE_GEMM + [triton.Config(INTERPRETER_CONFIGS["fwd"])]),
    min(c.kwargs["BLOCK_W"] for c in _HOPPER_GEMM + _AMPERE_GEMM + [triton.Config(INTERPRETER_CONFIGS["fwd"])]),
)


def _prune(n_arg: str, k_arg: str, n_block: str, k_block: str):
    # Channel blocks wider than the channels waste the MMA: keep configs that fit (the smallest if none does).
    def prune(configs, named_args, **kwargs):
        n_cap = max(16, triton.next_power_of_2(named_args[n_arg]))
        k_cap = max(16, triton.next_power_of_2(named_args[k_arg]))
        kept = [c for c in configs if c.kwargs[n_block] <= n_cap and c.kwargs[k_block] <= k_cap]
        return kept or [min(configs, key=lambda c: c.kwargs[n_block] * c.kwargs[k_block])]

    return prune


_KERNELS = {
    # name: (kernel, autotune key, (Hopper, Ampere) configs, pruner)
    "fwd": (_conv_fwd_kernel, ["C_in", "C_out", "H_out", "W_out"], (_HOPPER_GEMM, _AMPERE_GEMM),
            _prune("C_out", "C_in", "BLOCK_N", "BLOCK_K")),
    "dgrad": (_conv_dgrad_kernel, ["C_in", "C_out", "H", "W"], (_HOPPER_GEMM, _AMPERE_GEMM),
              _prune("C_in", "C_out", "BLOCK_N", "BLOCK_K")),
    "wgrad": (_conv_wgrad_kernel, ["C_in", "C_out", "H_out", "W_out", "SPLITS"], (_HOPPER_WGRAD, _AMPERE_WGRAD),
              _prune("C_out", "C_in", "BLOCK_N", "BLOCK_M")),
}


_TUNED: dict = {}


def launch(kernels: dict, interpreter_configs: dict, name: str, device: torch.device, grid, args: tuple,
           config: dict | None, **meta) -> dict:
    """Run kernel `name` of a registry {name: (kernel, autotune key, (Hopper, Ampere) configs, pruner)}: autotuned
    on a GPU (architecture read here, at launch), `config` (or the interpreter's) otherwise; return the config used.
    """
    if config is None and meta.get("COUNT_PAIRS"):
        config = interpreter_configs[name]  # autotuning would rerun the kernel and count its pairs many times
    if config is None and not interpreter_active():
        kernel, key, (hopper_cfgs, ampere_cfgs), prune = kernels[name]
        hopper = torch.cuda.get_device_capability(device)[0] >= 9
        tuned = _TUNED.get((kernel, hopper))
        if tuned is None:
            tuned = _TUNED[(kernel, hopper)] = triton.autotune(
                hopper_cfgs if hopper else ampere_cfgs, key=key, prune_configs_by={"early_config_prune": prune}
            )(kernel)
        tuned[grid](*args, **meta)
        return tuned.best_config.kwargs
    config = config or interpreter_configs[name]
    kernels[name][0][grid](*args, **meta, **config)
    return config


def _launch(name: str, device: torch.device, grid, args: tuple, config: dict | None, **meta) -> dict:
    return launch(_KERNELS, INTERPRETER_CONFIGS, name, device, grid, args, config, **meta)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision: TF32 for float32 only where cuDNN would use it (torch.backends.cudnn.allow_tf32)."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---- launchers -----------------------------------------------------------------------------------------


class Geometry(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def args(self) -> tuple[int, ...]:
        return (*self.stride, *self.padding, *self.dilation)


def conv_forward(
    x: torch.Tensor, w: torch.Tensor, geo: Geometry, out_hw: tuple[int, int], *, training: bool,
    stat_dtype: torch.dtype, affine: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None, relu: bool = True, pairs: torch.Tensor | None = None,
    config: dict | None = None,
):
    """Implicit-GEMM forward of NHWC `x` with `w` (KH, KW, C_in, C_out).

    training: returns (y, None, (count (P,), mean (P, C_out), M2 (P, C_out))), one partial per spatial tile.
    eval:     returns (y, out, None) with out = act((y - mean)*scale + shift [+ residual]), affine = (mean,
              scale, shift).
    `pairs`: an int32 (1,) tensor that the kernel adds the number of computed (tile, tap) pairs to.
    """
    n, h, wd, c_in = x.shape
    kh, kw, _, c_out = w.shape
    ho, wo = out_hw
    y = x.new_empty((n, ho, wo, c_out))
    out = x.new_empty((n, ho, wo, c_out)) if not training else None
    # Partials sized for the smallest tile any configuration uses; the rows the chosen one fills are kept.
    if training:
        tile_h, tile_w = (config["BLOCK_H"], config["BLOCK_W"]) if config is not None else _MIN_TILE
        p_max = n * triton.cdiv(ho, tile_h) * triton.cdiv(wo, tile_w)
        part_count = torch.empty(p_max, dtype=stat_dtype, device=x.device)
        part_mean = torch.empty(p_max, c_out, dtype=stat_dtype, device=x.device)
        part_m2 = torch.empty_like(part_mean)
    else:
        part_count = part_mean = part_m2 = y
    mean, scale, shift = affine if affine is not None else (y, y, y)

    def grid(meta):
        return (n * triton.cdiv(ho, meta["BLOCK_H"]) * triton.cdiv(wo, meta["BLOCK_W"]),
                triton.cdiv(c_out, meta["BLOCK_N"]))

    used = _launch(
        "fwd", x.device, grid,
        (x, w, y, out if out is not None else y, residual if residual is not None else y, mean, scale, shift,
         part_count, part_mean, part_m2, pairs if pairs is not None else y,
         h, wd, c_in, ho, wo, c_out, *geo.args()),
        config, KH=kh, KW=kw, TRAINING=training, HAS_RES=residual is not None, RELU=relu,
        COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype, x.device),
    )
    if not training:
        return y, out, None
    p = n * triton.cdiv(ho, used["BLOCK_H"]) * triton.cdiv(wo, used["BLOCK_W"])
    return y, None, (part_count[:p], part_mean[:p], part_m2[:p])


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

    def grid(meta):
        return (n * triton.cdiv(h, meta["BLOCK_H"]) * triton.cdiv(wd, meta["BLOCK_W"]),
                triton.cdiv(c_in, meta["BLOCK_N"]))

    _launch(
        "dgrad", y.device, grid,
        (grad_out, out, y, coef, wt, dx, pairs if pairs is not None else dx, h, wd, c_in, ho, wo, c_out,
         *geo.args()),
        config, KH=kh, KW=kw, RELU=relu, COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(y.dtype),
        DOT_PRECISION=dot_precision(y.dtype, y.device),
    )
    return dx


def conv_wgrad(
    x: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor, y: torch.Tensor, coef: torch.Tensor,
    kernel_hw: tuple[int, int], geo: Geometry, *, relu: bool, pairs: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """dw as (KH, KW, C_in, C_out) in the opmath dtype, from NHWC x and (grad_out, out, conv_out), coef (4, C_out)."""
    n, h, wd, c_in = x.shape
    _, ho, wo, c_out = y.shape
    kh, kw = kernel_hw
    if interpreter_active() or x.device.type != "cuda":
        splits = 2
    else:
        # Split the pixel reduction until the grid has a few waves of programs (at the smallest blocks: 16x16
        # channels, 4x4 pixels); independent of the tuned configuration so the partial buffer is fixed.
        programs = kh * kw * triton.cdiv(c_in, 64) * triton.cdiv(c_out, 64)
        splits = max(1, min(4 * _sm_count(x.device.index or 0) // programs, n * triton.cdiv(ho * wo, 64), 64))
    part = torch.empty(splits, kh * kw, c_in, c_out, dtype=coef.dtype, device=x.device)

    def grid(meta):
        return (kh * kw, triton.cdiv(c_in, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]), splits)

    _launch(
        "wgrad", x.device, grid,
        (x, grad_out, out, y, coef, part, pairs if pairs is not None else part, n, h, wd, c_in, ho, wo, c_out,
         splits, *geo.args()),
        config, KH=kh, KW=kw, RELU=relu, COUNT_PAIRS=pairs is not None, ACC_DTYPE=acc_dtype(x.dtype),
        DOT_PRECISION=dot_precision(x.dtype, x.device),
    )
    return part.sum(0).view(kh, kw, c_in, c_out)

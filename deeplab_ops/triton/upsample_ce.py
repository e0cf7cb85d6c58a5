"""Cross-entropy of bilinearly upsampled logits without materializing the upsampled (N, K, H, W) tensor: the
forward kernel interpolates on the fly with an online logsumexp and saves only the per-pixel logsumexp, as its two
parts (the maximum and the log of the rescaled sum, so that the backward's z - logsumexp is as exact as PyTorch's
log_softmax, whatever the logits' magnitude); the
backward kernel gathers, for each low-res position and class block, the contributions of every high-res pixel
whose stencil touches it (no atomics, reproducible). Stencil tables are built once per configuration and cached
on the device. The math and the trade-offs: docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deeplab_ops.common import interpreter_active
from deeplab_ops.triton.launch import cdiv, current_stream_id, launch_kernel, next_power_of_2

REDUCTIONS = ("none", "mean", "sum")


# ---- stencil tables ----------------------------------------------------------------------------------


def source_index(in_size: int, out_size: int, align_corners: bool, dtype: torch.dtype) -> torch.Tensor:
    """PyTorch's bilinear source coordinate of every output index (CPU tensor of `dtype`), scale from the sizes."""
    dst = torch.arange(out_size, dtype=dtype)
    if align_corners:
        if out_size <= 1:
            return torch.zeros(out_size, dtype=dtype)
        scale = torch.tensor(in_size - 1, dtype=dtype) / (out_size - 1)
        return scale * dst
    scale = torch.tensor(in_size, dtype=dtype) / out_size
    return (scale * (dst + 0.5) - 0.5).clamp_min(0)


@functools.lru_cache(maxsize=64)
def axis_tables(in_size: int, out_size: int, align_corners: bool, dtype: torch.dtype, device: torch.device):
    """(i0, i1, l0, l1, start, end, span, stream, recorded, ready) along one axis, on `device`.

    i0/i1 (out_size,) int32 neighbours, l0/l1 (out_size,) weights in `dtype`; start/end (in_size,) int32: the
    output indices o with i0[o] <= i <= i1[o] (contiguous: both are non-decreasing); span = max(end - start);
    stream: the id of the stream the tables were allocated on (`launch.current_stream_id`; 0 off CUDA); recorded:
    the ids of the other streams `_tables` has recorded their use on (a use lasts until the tensors are freed);
    ready: on CUDA, an event recorded on the allocating stream after the tables' asynchronous copies (another
    stream waits for it before its first read), else None.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(first_use_in_capture(in_size, out_size, align_corners))
    src = source_index(in_size, out_size, align_corners, dtype)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    l1 = (src - i0.to(dtype)).clamp(0, 1)
    l0 = 1 - l1
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    if device.type == "cpu" and in_size == out_size:
        # PyTorch's CPU kernel reads an axis of equal sizes one to one (both neighbours the output's own index, its
        # CUDA kernel the next one with weight 0): the rule of the tensors' device, as csrc/common/upsample_stencil.h
        i1 = i0
    low = torch.arange(in_size, dtype=torch.int64)
    start = torch.searchsorted(i1, low, side="left")
    end = torch.searchsorted(i0, low, side="right")
    span = int((end - start).clamp_min(0).max()) if in_size else 0

    def put(t):
        # Once per configuration: later calls do no host work and no copy (CUDA-graph capturable after a first call),
        # and any stream may read the tables (`_tables`). On CUDA from pinned memory, asynchronously: no host sync
        # (the caching host allocator keeps the pinned buffer until the copy is done).
        t = t.to(torch.int32) if t.dtype == torch.int64 else t
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

    tables = put(i0), put(i1), put(l0), put(l1), put(start), put(end)
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    return *tables, span, current_stream_id(device), set(), ready


def first_use_in_capture(in_size: int, out_size: int, align_corners: bool) -> str:
    return (f"upsample_cross_entropy: first call of an upsampling from {in_size} to {out_size} (align_corners="
            f"{align_corners}) inside a CUDA-graph capture: its stencil tables are built on the host and copied to "
            "the GPU on a configuration's first call, which a capture cannot hold; call the op once with these sizes "
            "before capturing (a warm-up)")


# ---- kernels -----------------------------------------------------------------------------------------


@triton.jit
def _interp(x_ptr, base, kk, hw, o00, o01, o10, o11, ly0, ly1, lx0, lx1, mask, ACC: tl.constexpr):
    # z[p, k] for a (pixels, classes) tile; PyTorch's nesting of the products (rows outside, columns inside).
    off = base[:, None] + kk[None, :] * hw
    a00 = tl.load(x_ptr + off + o00[:, None], mask=mask, other=0.0).to(ACC)
    a01 = tl.load(x_ptr + off + o01[:, None], mask=mask, other=0.0).to(ACC)
    a10 = tl.load(x_ptr + off + o10[:, None], mask=mask, other=0.0).to(ACC)
    a11 = tl.load(x_ptr + off + o11[:, None], mask=mask, other=0.0).to(ACC)
    return ly0[:, None] * (lx0[:, None] * a00 + lx1[:, None] * a01) + ly1[:, None] * (
        lx0[:, None] * a10 + lx1[:, None] * a11
    )


@triton.jit
def _uce_fwd_kernel(
    # logits (N, K, h, w) contiguous; target (N, H, W) int64
    x_ptr, t_ptr,
    # stencil tables: rows (H,), columns (W,)
    y0_ptr, y1_ptr, ly0_ptr, ly1_ptr, x0_ptr, x1_ptr, lx0_ptr, lx1_ptr,
    # outputs: logsumexp parts (2, N, H, W) opmath (the max at p, the log of the sum at P + p, in int64: 2P may pass
    # 2^31); per-pixel loss (N, H, W) opmath or per-program partials (grid,)
    lse_ptr, loss_ptr, psum_ptr, pcnt_ptr,
    P, K, h, w, H, W, ignore_index,
    PER_PIXEL: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    n = p // (H * W)
    oy = (p // W) % H
    ox = p % W
    iy0 = tl.load(y0_ptr + oy, mask=pm, other=0)
    iy1 = tl.load(y1_ptr + oy, mask=pm, other=0)
    ly0 = tl.load(ly0_ptr + oy, mask=pm, other=0.0)
    ly1 = tl.load(ly1_ptr + oy, mask=pm, other=0.0)
    ix0 = tl.load(x0_ptr + ox, mask=pm, other=0)
    ix1 = tl.load(x1_ptr + ox, mask=pm, other=0)
    lx0 = tl.load(lx0_ptr + ox, mask=pm, other=0.0)
    lx1 = tl.load(lx1_ptr + ox, mask=pm, other=0.0)
    hw = h * w
    base = n * K * hw
    t = tl.load(t_ptr + p, mask=pm, other=ignore_index)
    valid = pm & (t != ignore_index)
    m = tl.full((BLOCK_P,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_P,), ACC)
    zt = tl.zeros((BLOCK_P,), ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        mask = pm[:, None] & km[None, :]
        z = _interp(x_ptr, base, kk, hw, iy0 * w + ix0, iy0 * w + ix1, iy1 * w + ix0, iy1 * w + ix1,
                    ly0, ly1, lx0, lx1, mask, ACC)
        z = tl.where(km[None, :], z, float("-inf"))
        zt += tl.sum(tl.where((kk[None, :] == t[:, None]) & km[None, :], z, 0.0), 1)
        # Online logsumexp over class blocks: rescale the running sum to the new maximum. While every class so far
        # is -inf (a block of classes masked with -inf), the maximum is -inf and (-inf) - (-inf) would be NaN: shift
        # by 0 instead (s stays 0), so a later finite block still gives PyTorch's finite logsumexp.
        m_new = tl.maximum(m, tl.max(z, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), 1)
        m = m_new
    log_s = tl.log(s)
    # A label outside [0, K) (other than ignore_index) gives NaN: no device-side assert, no out-of-range read.
    bad = valid & ((t < 0) | (t >= K))
    # (m - zt) + log s, not (m + log s) - zt: the rounding of m + log s (up to |m| * 2^-24 in float32) never enters.
    loss = tl.where(bad, float("nan"), (m - zt) + log_s)
    loss = tl.where(valid, loss, 0.0)
    tl.store(lse_ptr + p, m, mask=pm)
    tl.store(lse_ptr + (p.to(tl.int64) + P), log_s, mask=pm)
    if PER_PIXEL:
        tl.store(loss_ptr + p, loss, mask=pm)
    else:
        tl.store(psum_ptr + pid, tl.sum(loss, 0))
        tl.store(pcnt_ptr + pid, tl.sum(valid.to(tl.int32), 0))


@triton.jit
def _uce_bwd_kernel(
    # logits (N, K, h, w) contiguous; target (N, H, W) int64; saved logsumexp parts (2, N, H, W) opmath
    x_ptr, t_ptr, lse_ptr,
    # dL/dloss: (N, H, W) when PER_PIXEL, else a 0-d opmath tensor (grad, or grad / count for "mean")
    g_ptr,
    # output: dlogits (N, K, h, w) contiguous
    dx_ptr,
    # stencil tables: rows (H,), columns (W,), and the gather ranges of each low-res row (h,) and column (w,)
    y0_ptr, y1_ptr, ly0_ptr, ly1_ptr, x0_ptr, x1_ptr, lx0_ptr, lx1_ptr, ys_ptr, ye_ptr, xs_ptr, xe_ptr,
    Q, K, h, w, H, W, P, ignore_index, SPAN_Y, SPAN_X,
    PER_PIXEL: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_X: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Tile rows are (low-res position, output column offset) pairs: BLOCK_X output columns of one position's
    # gather range are processed side by side, and summed over at the end in a fixed order (deterministic).
    pid_q = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_Q * BLOCK_X)
    q = pid_q * BLOCK_Q + rows // BLOCK_X
    dxi = rows % BLOCK_X
    qm = q < Q
    hw = h * w
    n = q // hw
    r = q % hw
    i = r // w
    j = r % w
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    km = kk < K
    ys = tl.load(ys_ptr + i, mask=qm, other=0)
    ye = tl.load(ye_ptr + i, mask=qm, other=0)
    xs = tl.load(xs_ptr + j, mask=qm, other=0)
    xe = tl.load(xe_ptr + j, mask=qm, other=0)
    base = n * K * hw
    if not PER_PIXEL:
        g_all = tl.load(g_ptr).to(ACC)
    acc = tl.zeros((BLOCK_Q * BLOCK_X, BLOCK_K), ACC)
    for dy in range(0, SPAN_Y):
        oy = ys + dy
        ym = qm & (oy < ye)
        iy0 = tl.load(y0_ptr + oy, mask=ym, other=0)
        iy1 = tl.load(y1_ptr + oy, mask=ym, other=0)
        ly0 = tl.load(ly0_ptr + oy, mask=ym, other=0.0)
        ly1 = tl.load(ly1_ptr + oy, mask=ym, other=0.0)
        # Weight of low-res row i in output row oy: both terms when i0 == i1 == i (the last row).
        wy = tl.where(iy0 == i, ly0, 0.0) + tl.where(iy1 == i, ly1, 0.0)
        for dx0 in range(0, SPAN_X, BLOCK_X):
            ox = xs + dx0 + dxi
            xm = ym & (ox < xe)
            ix0 = tl.load(x0_ptr + ox, mask=xm, other=0)
            ix1 = tl.load(x1_ptr + ox, mask=xm, other=0)
            lx0 = tl.load(lx0_ptr + ox, mask=xm, other=0.0)
            lx1 = tl.load(lx1_ptr + ox, mask=xm, other=0.0)
            wx = tl.where(ix0 == j, lx0, 0.0) + tl.where(ix1 == j, lx1, 0.0)
            wgt = wy * wx
            # Every pixel of the range, weight-0 neighbours and ignored pixels included (with weight or g 0): a NaN
            # z there (a non-finite logit) reaches this logit as NaN, as eager's log_softmax and upsample backward
            # carry it (0 * NaN), not a silently finite gradient. `wgt == wgt` is always true (the table weights
            # are finite): it is there for triton 3.6 (the release paired with torch 2.11), whose layout pass
            # (TritonGPURemoveLayoutConversions) fails to compile this kernel at BLOCK_X 1 with `pm = xm` alone
            # ("'tt.load' op failed to verify that mask type matches ptr type"; triton 3.8 compiles both).
            pm = xm & (wgt == wgt)
            pix = n * (H * W) + oy * W + ox
            t = tl.load(t_ptr + pix, mask=pm, other=ignore_index)
            valid = pm & (t != ignore_index)
            m = tl.load(lse_ptr + pix, mask=pm, other=0.0)
            log_s = tl.load(lse_ptr + (pix.to(tl.int64) + P), mask=pm, other=0.0)
            if PER_PIXEL:
                g = tl.load(g_ptr + pix, mask=valid, other=0.0).to(ACC)
            else:
                g = tl.zeros((BLOCK_Q * BLOCK_X,), ACC) + g_all
            g = tl.where(valid, g, 0.0)
            g = tl.where(valid & ((t < 0) | (t >= K)), float("nan"), g)
            mask = pm[:, None] & km[None, :]
            z = _interp(x_ptr, base, kk, hw, iy0 * w + ix0, iy0 * w + ix1, iy1 * w + ix0, iy1 * w + ix1,
                        ly0, ly1, lx0, lx1, mask, ACC)
            # (z - m) - log s: exact near the maximum (Sterbenz), as PyTorch's log_softmax.
            prob = tl.exp((z - m[:, None]) - log_s[:, None])
            onehot = tl.where(kk[None, :] == t[:, None], 1.0, 0.0)
            acc += (wgt * g)[:, None] * (prob - onehot)
    res = tl.sum(tl.reshape(acc, (BLOCK_Q, BLOCK_X, BLOCK_K)), 1)
    q2 = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    out = (q2 // hw * K * hw + q2 % hw)[:, None] + kk[None, :] * hw
    tl.store(dx_ptr + out, res.to(dx_ptr.dtype.element_ty), mask=(q2 < Q)[:, None] & km[None, :])


# ---- host launchers ----------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _block_k(k: int) -> int:
    return min(next_power_of_2(max(k, 1)), 32)


# Compile options of both kernels: no floating-point contraction. The backward rebuilds each interpolated logit z
# and takes exp((z - max) - log s) with the forward's max: z must be the forward's bit for bit. With contraction
# on (Triton's default on a GPU) the two kernels fused the interpolation's products into FMAs differently, z came
# out up to |z| * 2^-24 above the saved maximum, and at logits of 1e20 that exp overflowed to an infinite gradient
# (an H200 run; the interpreter, which never contracts, was exact). The kernels are memory-bound, so the separate
# multiplies should cost little (not yet timed on a GPU).
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


# GPU launch configurations, chosen so that neither kernel spills registers on sm_80 or sm_90 in any dtype
# (`ptxas -v` of every configuration below: tests/triton/test_triton_compile.py). Each element of a tile holds four
# gathered corners, their addresses and the interpolated value, about 25 registers at 4-8 elements per thread: a
# 128 x 32 forward tile at 4 warps (32 per thread) spilled 3.2 KB per thread to local memory, a 128 x 16 one 0.6
# KB. So class blocks are at most 8 wide (21 classes: 3 blocks, 24 lanes), the forward runs 4 elements per thread
# at 8 warps (110-120 registers; float64 160-166, with the -inf guard of the online logsumexp) and the backward 8
# at 4 warps (118-128; float64 192); a backward tile of one output column per position (BLOCK_X 1) spilled at 128
# rows and runs 64.
_GPU_BLOCK_K = 8


def fwd_config(k: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_K, num_warps) of `_uce_fwd_kernel` on a GPU for k classes: a tile of 1024 elements (at most
    512 pixels), 8 warps."""
    block_k = min(next_power_of_2(max(k, 1)), _GPU_BLOCK_K)
    return min(512, 1024 // block_k), block_k, 8


def bwd_config(k: int, span_x: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_X, BLOCK_K, num_warps) of `_uce_bwd_kernel` on a GPU for k classes and a gather range of
    at most span_x output columns per low-res column: 128 tile rows (64 with one column each), 4 warps."""
    block_x = min(next_power_of_2(max(span_x, 1)), 16)
    rows = 128 if block_x > 1 else 64
    return rows // block_x, block_x, min(next_power_of_2(max(k, 1)), _GPU_BLOCK_K), 4


# Tables a CUDA-graph capture has read, never freed: a captured launch keeps the tables' addresses, and
# axis_tables' LRU may evict (free) an entry later (more than 64 configurations: an evaluation over many image
# sizes, shapes recorded by torch.compile(mode="reduce-overhead")), after which every replay would read memory
# the allocator has handed to other tensors. id(tables) -> tables; a rebuilt entry captured again is kept as well.
_CAPTURED_TABLES: dict[int, tuple] = {}


def _tables(logits: torch.Tensor, out_h: int, out_w: int, align_corners: bool):
    """The (rows, columns) tables of a call. On CUDA, a stream other than the one the tables were allocated on waits
    for their copies (`ready`) and records its use (`record_stream`) on its first read: the allocator hands an
    evicted entry's memory out again in its allocating stream's order only, and would otherwise let it be
    overwritten under a kernel of the reading stream. Tables read inside a capture are kept instead
    (`_CAPTURED_TABLES`: never freed; torch.cuda.graph synchronizes the device before capturing). One shared entry per
    configuration, not one per stream: warm-up on one stream and a CUDA-graph capture on another, as
    torch.cuda.graph does, must find the tables built."""
    acc, _ = _acc(logits.dtype)
    device = logits.device
    tables = (axis_tables(logits.shape[2], out_h, align_corners, acc, device),
              axis_tables(logits.shape[3], out_w, align_corners, acc, device))
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            for t in tables:
                _CAPTURED_TABLES.setdefault(id(t), t)
        else:
            stream = current_stream_id(device)
            for t in tables:
                if t[7] != stream and stream not in t[8]:  # (once per stream: the use lasts until freed)
                    reader = torch.cuda.current_stream(device)
                    reader.wait_event(t[9])  # (the copies were asynchronous, on the allocating stream)
                    for tensor in t[:6]:
                        tensor.record_stream(reader)
                    t[8].add(stream)
    return tables


def forward(logits, target, ignore_index: int, align_corners: bool, reduction: str):
    """(loss, lse, valid_count): the op's contract (csrc/ops.cpp); lse is (2, N, H, W): the maximum and the log
    of the rescaled sum."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")
    logits = logits.contiguous()
    target = target.contiguous()
    n, k, h, w = logits.shape
    big_h, big_w = target.shape[1:]
    acc, tl_acc = _acc(logits.dtype)
    p = n * big_h * big_w
    lse = torch.empty((2, n, big_h, big_w), dtype=acc, device=logits.device)
    per_pixel = reduction == "none"
    # interpreter: fewer, larger numpy ops
    block_p, block_k, warps = (512, _block_k(k), 4) if interpreter_active() else fwd_config(k)
    grid = cdiv(p, block_p)
    loss_px = torch.empty((n, big_h, big_w) if per_pixel else (0,), dtype=acc, device=logits.device)
    psum = torch.zeros((0 if per_pixel else grid,), dtype=acc, device=logits.device)
    pcnt = torch.zeros((0 if per_pixel else grid,), dtype=torch.int32, device=logits.device)
    if p > 0:
        (y0, y1, ly0, ly1, *_), (x0, x1, lx0, lx1, *_) = _tables(logits, big_h, big_w, align_corners)
        launch_kernel(_uce_fwd_kernel, (grid,),
            logits, target, y0, y1, ly0, ly1, x0, x1, lx0, lx1, lse, loss_px, psum, pcnt,
            p, k, h, w, big_h, big_w, ignore_index,
            PER_PIXEL=per_pixel, ACC=tl_acc, BLOCK_P=block_p, BLOCK_K=block_k, num_warps=warps, **LAUNCH_OPTIONS,
        )
    if per_pixel:
        count = (target != ignore_index).sum().to(acc)
        return loss_px.to(logits.dtype), lse, count
    count = pcnt.sum().to(acc)
    total = psum.sum()
    loss = total / count if reduction == "mean" else total
    return loss.to(logits.dtype), lse, count


def backward(grad, logits, target, lse, count, ignore_index: int, align_corners: bool, reduction: str):
    """dlogits (N, K, h, w) in logits' dtype."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")
    logits = logits.contiguous()
    target = target.contiguous()
    lse = lse.contiguous()
    n, k, h, w = logits.shape
    big_h, big_w = target.shape[1:]
    acc, tl_acc = _acc(logits.dtype)
    per_pixel = reduction == "none"
    if per_pixel:
        g = grad.contiguous()
    else:
        g = grad.to(acc) / count if reduction == "mean" else grad.to(acc)
    dx = torch.empty_like(logits)
    q = n * h * w
    if q == 0 or k == 0:
        return dx.zero_()
    if big_h * big_w == 0:
        return dx.zero_()
    ty, tx = _tables(logits, big_h, big_w, align_corners)
    y0, y1, ly0, ly1, ys, ye, span_y, *_ = ty
    x0, x1, lx0, lx1, xs, xe, span_x, *_ = tx
    if interpreter_active():  # a whole column range per step: fewer, larger numpy ops
        block_x = min(next_power_of_2(max(span_x, 1)), 64)
        block_q, block_k, warps = max(1, 1024 // block_x), _block_k(k), 4
    else:
        block_q, block_x, block_k, warps = bwd_config(k, span_x)
    grid = (cdiv(q, block_q), cdiv(k, block_k))
    launch_kernel(_uce_bwd_kernel, grid,
        logits, target, lse, g, dx,
        y0, y1, ly0, ly1, x0, x1, lx0, lx1, ys, ye, xs, xe,
        q, k, h, w, big_h, big_w, n * big_h * big_w, ignore_index, span_y, span_x,
        PER_PIXEL=per_pixel, ACC=tl_acc, BLOCK_Q=block_q, BLOCK_X=block_x, BLOCK_K=block_k, num_warps=warps,
        **LAUNCH_OPTIONS,
    )
    return dx

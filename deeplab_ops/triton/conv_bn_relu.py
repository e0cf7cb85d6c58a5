"""Host side of the triton backend of conv_bn_relu and conv_bias_act: layouts, allocation, stage order, and the
padding-tap schedule (`schedule`, `count_computed_pairs`). NHWC is native: channels_last tensors pass through
as views, NCHW ones cost one conversion in and one out per tensor.

  training forward  conv_forward (y + per-tile partials) -> bn_finalize -> bn_apply         3 launches
  eval forward      conv_forward with the BN (from the running statistics) + residual + ReLU epilogue   1 launch
  eval (no conv_out) the same launch storing only the output (conv_bn_relu_eval: half dtypes, no gradient)
  conv_bias_act     conv_forward with the bias + residual + ReLU epilogue                   1 launch
  backward          bn_backward_reduce -> bn_backward_finalize -> dgrad, wgrad (dy in their prologues)
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from deeplab_ops.common import conv_output_size, from_nhwc, opmath_dtype, to_nhwc
from deeplab_ops.common import interpreter_active as _interpreter_active
from deeplab_ops.triton.bn_kernels import (
    bn_apply,
    bn_backward_finalize,
    bn_backward_reduce,
    bn_finalize,
    hyper_tensor,
)
from deeplab_ops.triton.conv_engine import Geometry, conv_dgrad, conv_forward, conv_wgrad
from deeplab_ops.triton.packing import conv_weight, conv_weight_t

Tensor = torch.Tensor


def check_device(x: Tensor) -> None:
    """CPU tensors run only in the Triton interpreter (the kernels' own check, for the calls that reach them past
    the twins' _check_device: a backward; its wording is the twins')."""
    if x.device.type == "cpu" and not _interpreter_active():
        raise RuntimeError("deeplab_ops: the triton backend runs CUDA tensors, or CPU tensors only in the Triton "
                           "interpreter (TRITON_INTERPRET=1); got a tensor on cpu")


def vectors(*ts: Tensor | None) -> tuple:
    """Per-channel vectors as the kernels index them: unit stride (a strided or expanded view, such as a slice of
    a larger buffer, copied; a contiguous one as it is, with no aten call); None stays None."""
    return tuple(t if t is None else t.contiguous() for t in ts)


def _geometry(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[Geometry, tuple[int, int]]:
    geo = Geometry((stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1]))
    return geo, conv_output_size((x.shape[2], x.shape[3]), (weight.shape[2], weight.shape[3]), geo.stride,
                                 geo.padding, geo.dilation)


def forward(
    x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], training: bool,
    momentum: float, eps: float, residual: Tensor | None, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, conv_out, save_mean, save_invstd, new_running_mean, new_running_var); see csrc/ops.cpp."""
    if not training:
        out, y, mean, invstd = _eval(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                                     dilation, eps, residual, relu, store_y=True)
        rdt = running_mean.dtype  # no running-statistic update in eval: empty outputs
        return out, y, mean, invstd, x.new_empty((0,), dtype=rdt), x.new_empty((0,), dtype=rdt)
    check_device(x)
    bn_weight, bn_bias, running_mean, running_var = vectors(bn_weight, bn_bias, running_mean, running_var)
    geo, out_hw = _geometry(x, weight, stride, padding, dilation)
    mf = suggest_memory_format(x)
    res = to_nhwc(residual) if residual is not None else None
    y, _, (count, pmean, pm2) = conv_forward(to_nhwc(x), conv_weight(weight), geo, out_hw, training=True,
                                             stat_dtype=opmath_dtype(x.dtype))
    mean, invstd, scale, shift, new_rm, new_rv = bn_finalize(
        count, pmean, pm2, bn_weight, bn_bias, running_mean, running_var, momentum, eps
    )
    out = bn_apply(y, mean, scale, shift, res, relu)
    # conv_out only feeds the backward, which reads it as NHWC: channels_last whatever x's format (no copy out).
    return from_nhwc(out, mf), from_nhwc(y, torch.channels_last), mean, invstd, new_rm, new_rv


def eval_forward(
    x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor,
    running_var: Tensor, stride: list[int], padding: list[int], dilation: list[int], eps: float,
    residual: Tensor | None, relu: bool,
) -> Tensor:
    """forward()'s `out` in eval, by the same kernel with the same epilogue, storing nothing else (no conv_out)."""
    return _eval(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, residual,
                 relu, store_y=False)[0]


def _eval(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, residual, relu,
          store_y: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Eval in one launch: (out, conv_out if `store_y` else None, save_mean, save_invstd), BatchNorm from the
    running statistics in the conv's epilogue; out in x's memory format, conv_out channels_last (as forward's)."""
    check_device(x)
    bn_weight, bn_bias, running_mean, running_var = vectors(bn_weight, bn_bias, running_mean, running_var)
    geo, out_hw = _geometry(x, weight, stride, padding, dilation)
    mf = suggest_memory_format(x)
    stat = opmath_dtype(x.dtype)
    c = weight.shape[0]
    mean = torch.empty(c, dtype=stat, device=x.device)
    invstd = torch.empty(c, dtype=stat, device=x.device)
    hyper = hyper_tensor(0.0, float(eps), stat, x.device)  # (the eval epilogue reads eps only)
    res = to_nhwc(residual) if residual is not None else None
    y, out, _ = conv_forward(to_nhwc(x), conv_weight(weight), geo, out_hw, training=False, stat_dtype=stat,
                             residual=res, relu=relu, store_y=store_y,
                             eval_bn=(running_mean, running_var, bn_weight, bn_bias, hyper, mean, invstd))
    return from_nhwc(out, mf), None if y is None else from_nhwc(y, torch.channels_last), mean, invstd


def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, stride: list[int],
    padding: list[int], dilation: list[int], relu: bool,
) -> Tensor:
    """act(conv2d(x, weight, bias) [+ residual]) in one launch, in x's memory format. With no bias, residual or
    ReLU it is the training forward's conv_out, computed by the training forward's own kernel specialization and
    configuration (its per-tile statistics computed and dropped) and returned channels_last as forward returns it:
    the memory-efficient backward's recompute gives the forward's conv_out bit for bit, with no conversion out and
    back for an NCHW x, and compiles no kernel variant of its own (a DeepLabV3-R50 step's six)."""
    check_device(x)
    (bias,) = vectors(bias)
    geo, out_hw = _geometry(x, weight, stride, padding, dilation)
    xh, w, stat = to_nhwc(x), conv_weight(weight), opmath_dtype(x.dtype)
    if bias is None and residual is None and not relu:
        y, _, _ = conv_forward(xh, w, geo, out_hw, training=True, stat_dtype=stat)
        return from_nhwc(y, torch.channels_last)
    res = to_nhwc(residual) if residual is not None else None
    _, out, _ = conv_forward(xh, w, geo, out_hw, training=False, stat_dtype=stat, bias=bias, residual=res, relu=relu,
                             store_y=False)
    return from_nhwc(out, suggest_memory_format(x))


def backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor | None, conv_out: Tensor, out: Tensor,
    save_mean: Tensor, save_invstd: Tensor, stride: list[int], padding: list[int], dilation: list[int],
    training: bool, relu: bool, output_mask: list[bool],
) -> tuple[Tensor | None, ...]:
    """(grad_x, grad_weight, grad_bn_weight, grad_bn_bias, grad_residual), None where output_mask is False."""
    check_device(x)
    bn_weight, save_mean, save_invstd = vectors(bn_weight, save_mean, save_invstd)
    geo = Geometry((stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1]))
    dz, z, y = to_nhwc(grad_out), to_nhwc(out), to_nhwc(conv_out)
    need_dy = output_mask[0] or output_mask[1]
    need_sums = (training and need_dy) or output_mask[2] or output_mask[3]
    g = None
    if need_sums or output_mask[4]:
        part_g, part_gy, g = bn_backward_reduce(dz, z, y, save_mean, relu, store_g=output_mask[4])
    else:  # eval dy needs no sums: the finalize reads no partials
        part_g = part_gy = save_mean.new_empty((0, save_mean.shape[0]))
    sum_g = sum_g_xhat = None
    if need_sums or need_dy:
        # dy = k * (g - a - (y - mean) * b), csrc/common/bn_math.h's dy_coef; computed in the GEMM prologues.
        count = y.shape[0] * y.shape[1] * y.shape[2]
        sum_g, sum_g_xhat, coef = bn_backward_finalize(part_g, part_gy, save_mean, save_invstd, bn_weight, count,
                                                       training)
    grad_x = grad_w = None
    if output_mask[0]:
        dx = conv_dgrad(dz, z, y, coef, conv_weight_t(weight), geo, (x.shape[2], x.shape[3]), relu=relu)
        grad_x = from_nhwc(dx, suggest_memory_format(x))
    if output_mask[1]:
        kernel_hw = (weight.shape[2], weight.shape[3])
        if weight.dtype == coef.dtype:
            grad_w = conv_wgrad(to_nhwc(x), dz, z, y, coef, kernel_hw, geo, relu=relu,
                                dw_out=torch.empty_like(weight, memory_format=suggest_memory_format(weight)))
        else:
            dw = conv_wgrad(to_nhwc(x), dz, z, y, coef, kernel_hw, geo, relu=relu)
            grad_w = dw.permute(3, 2, 0, 1).to(weight.dtype).contiguous(memory_format=suggest_memory_format(weight))
    grad_res = from_nhwc(g, suggest_memory_format(x)) if output_mask[4] else None
    return (
        grad_x,
        grad_w,
        sum_g_xhat if output_mask[2] else None,
        sum_g if output_mask[3] else None,
        grad_res,
    )


# ---- the padding-tap schedule ---------------------------------------------------------------------------


def _samples_hit(first: int, last: int, step: int, size: int) -> bool:
    # Mirrors conv_engine._samples_hit: does first, first + step, ..., last reach [0, size)?
    lowest = first + ((max(-first, 0) + step - 1) // step) * step
    return lowest <= last and lowest < size


def _multiples_hit(first: int, last: int, step: int, count: int) -> bool:
    # Mirrors conv_engine._multiples_hit: does [first, last] hold j * step with 0 <= j < count?
    lo, hi = max(first, 0), min(last, (count - 1) * step)
    return (lo + step - 1) // step * step <= hi


def _axis_hits(size: int, out: int, k: int, stride: int, pad: int, dil: int, block: int,
               dgrad: bool) -> list[list[bool]]:
    # hits[tile][tap] along one axis. Forward/wgrad tiles cover the output; dgrad tiles cover each sub-pixel
    # phase p of the input (rows p, p + stride, ...), and a tap reaches a phase only if (p + pad - t*dil) is a
    # multiple of the stride.
    if not dgrad:
        off = [t * dil - pad for t in range(k)]
        return [[_samples_hit(start * stride + o, (min(start + block, out) - 1) * stride + o, stride, size)
                 for o in off] for start in range(0, out, block)]
    hits = []
    for p in range(min(stride, size)):
        for start in range(0, -(-(size - p) // stride), block):
            first, last = p + start * stride, min(p + (start + block - 1) * stride, size - 1)
            hits.append([(p + pad - t * dil) % stride == 0 and
                         _multiples_hit(first + pad - t * dil, last + pad - t * dil, stride, out) for t in range(k)])
    return hits


def schedule(
    x_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], block_h: int, block_w: int, pass_: str = "forward",
) -> tuple[int, int]:
    """(pairs computed, pairs in the dense problem) of (tile, tap) pairs for BLOCK_H x BLOCK_W tiles.

    pass_: "forward" and "wgrad" tile the output, "dgrad" tiles the input. A pair is computed unless every
    pixel of the tile reads (receives) only zero padding through that tap: what the kernels decide per tile.
    """
    if pass_ not in ("forward", "wgrad", "dgrad"):
        raise ValueError(f"pass_ must be 'forward', 'wgrad' or 'dgrad', got {pass_!r}")
    n, _, h, w = x_shape
    kh, kw = weight_shape[2:]
    ho, wo = conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    dgrad = pass_ == "dgrad"
    rows = _axis_hits(h, ho, kh, stride[0], padding[0], dilation[0], block_h, dgrad)
    cols = _axis_hits(w, wo, kw, stride[1], padding[1], dilation[1], block_w, dgrad)
    computed = sum(r[i] and c[j] for r in rows for c in cols for i in range(kh) for j in range(kw))
    return n * computed, n * len(rows) * len(cols) * kh * kw


def count_computed_pairs(
    x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    block_h: int, block_w: int,
) -> dict[str, int]:
    """Run the forward, dgrad and wgrad kernels with BLOCK_H x BLOCK_W tiles and count the (tile, tap) pairs
    each computed (forward and dgrad: one atomic per computed pair; wgrad: each program adds its branch-free loop's
    trip count): the measured side of `schedule`."""
    check_device(x)
    geo = Geometry(tuple(stride), tuple(padding), tuple(dilation))
    stat = opmath_dtype(x.dtype)
    out_hw = conv_output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), geo.stride, geo.padding, geo.dilation)
    xh, w = to_nhwc(x), conv_weight(weight)
    counts = {}
    pairs = torch.zeros(1, dtype=torch.int32, device=x.device)
    fwd = dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_N=16, BLOCK_K=16)
    y, _, _ = conv_forward(xh, w, geo, out_hw, training=True, stat_dtype=stat, pairs=pairs, config=fwd)
    counts["forward"] = int(pairs.item())
    coef = torch.randn(4, weight.shape[0], dtype=stat, device=x.device)
    pairs.zero_()
    conv_dgrad(y, y, y, coef, conv_weight_t(weight), geo, tuple(x.shape[2:]), relu=True,
               pairs=pairs, config=fwd)
    counts["dgrad"] = int(pairs.item())
    pairs.zero_()
    conv_wgrad(xh, y, y, y, coef, tuple(weight.shape[2:]), geo, relu=True, pairs=pairs,
               config=dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_M=16, BLOCK_N=16))
    counts["wgrad"] = int(pairs.item())
    return counts

"""Host side of the triton backend of conv_bn_relu: the kernels of deeplab_ops::triton_conv_bn_relu_forward and
_backward (layout conversion, allocation, stage order), and the padding-tap schedule.

Same contract as the C++ composite (csrc/conv_bn_relu.cpp). NHWC is the native layout: NCHW tensors are
converted once on the way in and the outputs once on the way out; channels_last tensors pass through as views.

  training forward  conv_forward (y + per-tile partials) -> bn_finalize -> bn_apply         3 launches
  eval forward      conv_forward with the affine/residual/ReLU epilogue                    1 launch
  backward          bn_backward_reduce (sums, and g for the residual) -> dgrad, wgrad      3 launches
                    with dy computed in the dgrad/wgrad prologues, never stored
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from deeplab_ops.backends import interpreter_active
from deeplab_ops.ops.bn_stages import opmath_dtype
from deeplab_ops.ops.conv_bn_relu import conv_output_size
from deeplab_ops.triton.bn_kernels import bn_apply, bn_backward_reduce, bn_finalize
from deeplab_ops.triton.conv_engine import Geometry, conv_dgrad, conv_forward, conv_wgrad

Tensor = torch.Tensor


def _nhwc(t: Tensor) -> Tensor:
    # (N, C, H, W) -> contiguous (N, H, W, C): a view for channels_last tensors, one copy for NCHW ones.
    return t.permute(0, 2, 3, 1).contiguous()


def _from_nhwc(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    # (N, H, W, C) -> (N, C, H, W) in `memory_format`: a view for channels_last, one copy for NCHW.
    return t.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def _check_device(x: Tensor) -> None:
    if x.device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "deeplab_ops: the triton backend runs CPU tensors only in the Triton interpreter; set "
            "TRITON_INTERPRET=1 before importing deeplab_ops, or use CUDA tensors"
        )


def forward(
    x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], training: bool,
    momentum: float, eps: float, residual: Tensor | None, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, conv_out, save_mean, save_invstd, new_running_mean, new_running_var); see csrc/ops.cpp."""
    _check_device(x)
    geo = Geometry(tuple(stride), tuple(padding), tuple(dilation))
    mf = suggest_memory_format(x)
    stat = opmath_dtype(x.dtype)
    out_hw = conv_output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), geo.stride, geo.padding, geo.dilation)
    xh = _nhwc(x)
    w = weight.permute(2, 3, 1, 0).contiguous()  # (KH, KW, C_in, C_out): K-major B operand per tap
    res = _nhwc(residual) if residual is not None else None
    if training:
        y, _, (count, pmean, pm2) = conv_forward(xh, w, geo, out_hw, training=True, stat_dtype=stat)
        mean, invstd, scale, shift, new_rm, new_rv = bn_finalize(
            count, pmean, pm2, bn_weight, bn_bias, running_mean, running_var, momentum, eps
        )
        out = bn_apply(y, mean, scale, shift, res, relu)
    else:
        # Per-channel constants of the eval epilogue; copies, so no output aliases the running buffers.
        mean = running_mean.to(stat, copy=True)
        invstd = (running_var.to(stat) + eps).rsqrt()
        scale = bn_weight.to(stat) * invstd if bn_weight is not None else invstd.clone()
        shift = bn_bias.to(stat, copy=True) if bn_bias is not None else torch.zeros_like(invstd)
        y, out, _ = conv_forward(xh, w, geo, out_hw, training=False, stat_dtype=stat, affine=(mean, scale, shift),
                                 residual=res, relu=relu)
        rdt = running_mean.dtype
        new_rm, new_rv = x.new_empty((0,), dtype=rdt), x.new_empty((0,), dtype=rdt)
    return _from_nhwc(out, mf), _from_nhwc(y, mf), mean, invstd, new_rm, new_rv


def backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor | None, conv_out: Tensor, out: Tensor,
    save_mean: Tensor, save_invstd: Tensor, stride: list[int], padding: list[int], dilation: list[int],
    training: bool, relu: bool, output_mask: list[bool],
) -> tuple[Tensor | None, ...]:
    """(grad_x, grad_weight, grad_bn_weight, grad_bn_bias, grad_residual), None where output_mask is False."""
    _check_device(x)
    geo = Geometry(tuple(stride), tuple(padding), tuple(dilation))
    stat = save_mean.dtype
    dz, z, y = _nhwc(grad_out), _nhwc(out), _nhwc(conv_out)
    need_dy = output_mask[0] or output_mask[1]
    sum_g = sum_g_xhat = g = None
    if (training and need_dy) or output_mask[2] or output_mask[3] or output_mask[4]:
        sum_g, sum_gy, g = bn_backward_reduce(dz, z, y, save_mean, relu, store_g=output_mask[4])
        sum_g_xhat = sum_gy * save_invstd
    grad_x = grad_w = None
    if need_dy:
        # dy = k * (g - a - (y - mean) * b), csrc/common/bn_math.h's dy_coef; computed in the GEMM prologues.
        count = y.shape[0] * y.shape[1] * y.shape[2]
        k = bn_weight.to(stat) * save_invstd if bn_weight is not None else save_invstd
        if training:
            a, b = sum_g / count, save_invstd * sum_g_xhat / count
        else:
            a = b = torch.zeros_like(save_invstd)
        coef = torch.stack([save_mean.to(stat), k, a, b]).contiguous()
        if output_mask[0]:
            wt = weight.permute(2, 3, 0, 1).contiguous()  # (KH, KW, C_out, C_in)
            dx = conv_dgrad(dz, z, y, coef, wt, geo, tuple(x.shape[2:]), relu=relu)
            grad_x = _from_nhwc(dx, suggest_memory_format(x))
        if output_mask[1]:
            dw = conv_wgrad(_nhwc(x), dz, z, y, coef, tuple(weight.shape[2:]), geo, relu=relu)
            grad_w = dw.permute(3, 2, 0, 1).to(weight.dtype).contiguous(memory_format=suggest_memory_format(weight))
    grad_res = _from_nhwc(g, suggest_memory_format(conv_out)) if output_mask[4] else None
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
    # hits[tile][tap] along one axis. Forward/wgrad tiles cover the output, dgrad tiles the input.
    hits = []
    for start in range(0, size if dgrad else out, block):
        last = min(start + block, size if dgrad else out) - 1
        if dgrad:
            hits.append([_multiples_hit(start + pad - t * dil, last + pad - t * dil, stride, out) for t in range(k)])
        else:
            off = [t * dil - pad for t in range(k)]
            hits.append([_samples_hit(start * stride + o, last * stride + o, stride, size) for o in off])
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
    each computed (one atomic per computed pair): the measured side of `schedule`."""
    _check_device(x)
    geo = Geometry(tuple(stride), tuple(padding), tuple(dilation))
    stat = opmath_dtype(x.dtype)
    out_hw = conv_output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), geo.stride, geo.padding, geo.dilation)
    xh, w = _nhwc(x), weight.permute(2, 3, 1, 0).contiguous()
    counts = {}
    pairs = torch.zeros(1, dtype=torch.int32, device=x.device)
    fwd = dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_N=16, BLOCK_K=16)
    y, _, _ = conv_forward(xh, w, geo, out_hw, training=True, stat_dtype=stat, pairs=pairs, config=fwd)
    counts["forward"] = int(pairs.item())
    coef = torch.randn(4, weight.shape[0], dtype=stat, device=x.device)
    pairs.zero_()
    conv_dgrad(y, y, y, coef, weight.permute(2, 3, 0, 1).contiguous(), geo, tuple(x.shape[2:]), relu=True,
               pairs=pairs, config=fwd)
    counts["dgrad"] = int(pairs.item())
    pairs.zero_()
    conv_wgrad(xh, y, y, y, coef, tuple(weight.shape[2:]), geo, relu=True, pairs=pairs,
               config=dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_M=16, BLOCK_N=16))
    counts["wgrad"] = int(pairs.item())
    return counts

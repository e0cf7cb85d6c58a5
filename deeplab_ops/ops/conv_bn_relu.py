"""The fused conv + BatchNorm (+ residual) + ReLU op: argument checks, fake kernels, autograd, dispatch.

Two op families share one contract (schemas in csrc/ops.cpp):
  deeplab_ops::conv_bn_relu_forward / _backward          cpu and cuda backends (ATen conv + C++ BN stages)
  deeplab_ops::triton_conv_bn_relu_forward / _backward   triton backend (implicit GEMM, deeplab_ops/triton/)
The forward ops are functional: they return the updated running statistics, which `conv_bn_relu` copies
into the caller's buffers, so autograd and torch.compile see no mutation inside the op.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch._prims_common import suggest_memory_format

from deeplab_ops import backends, distributed, reference
from deeplab_ops.ops.bn_stages import empty_activation, opmath_dtype

Tensor = torch.Tensor
_ops = torch.ops.deeplab_ops

FORWARD_OPS = {"cpu": _ops.conv_bn_relu_forward, "cuda": _ops.conv_bn_relu_forward,
               "triton": _ops.triton_conv_bn_relu_forward}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- argument checks ------------------------------------------------------------------------------


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def conv_output_size(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a convolution (may be < 1 for invalid geometry)."""
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_args(
    x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training, momentum, eps,
    residual, relu,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate a conv_bn_relu call; return (stride, padding, dilation) as pairs. Errors name the argument."""
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected one of float32, float64, float16, bfloat16")
    if weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D (C_out, C_in, kH, kW) tensor, got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; expected the same device")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has dtype {x.dtype}; expected the same dtype")
    n, cin, h, w = x.shape
    cout, wcin, kh, kw = weight.shape
    if wcin != cin:
        if wcin > 0 and cin % wcin == 0 and cin != wcin:
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}: {wcin} input channels for x's {cin} looks like a grouped "
                f"convolution (groups={cin // wcin}); only groups=1 is supported, so weight.shape[1] must be {cin}"
            )
        raise ValueError(f"weight.shape[1]={wcin} does not match x's {cin} channels (x shape {tuple(x.shape)})")
    if cout < 1 or kh < 1 or kw < 1 or cin < 1:
        raise ValueError(f"weight shape {tuple(weight.shape)} and x shape {tuple(x.shape)} must have no zero sizes "
                         f"in channels and kernel")
    if n == 0:
        raise ValueError(f"x has an empty batch (shape {tuple(x.shape)}); expected N >= 1")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ho, wo = conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the output would be {ho}x{wo}: x is {h}x{w} with kernel {kh}x{kw}, stride {stride}, padding {padding}, "
            f"dilation {dilation}; expected an output of at least 1x1 (pad more or use a larger input)"
        )
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {relu!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (float(eps) > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")

    bn = {"bn_weight": bn_weight, "bn_bias": bn_bias, "running_mean": running_mean, "running_var": running_var}
    bn_dtype = None
    for name, t in bn.items():
        if t is None:
            continue
        _check_tensor(t, name)
        if t.dim() != 1 or t.shape[0] != cout:
            raise ValueError(f"{name} must have shape ({cout},) (one value per output channel), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
        allowed = (x.dtype, torch.float32) if x.dtype in _HALF_DTYPES else (x.dtype,)
        if t.dtype not in allowed:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; expected "
                + " or ".join(str(d) for d in allowed)
            )
        if bn_dtype is not None and t.dtype != bn_dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the other BatchNorm tensors have {bn_dtype}")
        bn_dtype = t.dtype
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var must be given together; only {given} was given")
    if not training and running_mean is None:
        raise ValueError("training=False (eval) uses running statistics: running_mean and running_var must be given")
    if training and n * ho * wo <= 1:
        raise ValueError(
            f"training BatchNorm needs more than 1 value per channel, but the output is {n}x{cout}x{ho}x{wo}; "
            "use a batch of 2 or more (or a larger input), or training=False with running statistics"
        )
    if residual is not None:
        _check_tensor(residual, "residual")
        if tuple(residual.shape) != (n, cout, ho, wo):
            raise ValueError(
                f"residual must have the output's shape {(n, cout, ho, wo)}, got {tuple(residual.shape)}"
            )
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}; expected the same device")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but x has dtype {x.dtype}; expected the same dtype")
    return stride, padding, dilation


# ---- fake kernels ----------------------------------------------------------------------------------


def _forward_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training,
                  momentum, eps, residual, relu):
    ho, wo = conv_output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], ho, wo)
    out = empty_activation(x, shape)
    conv_out = empty_activation(x, shape)
    stat = opmath_dtype(x.dtype)
    c = weight.shape[0]
    mean, invstd = x.new_empty((c,), dtype=stat), x.new_empty((c,), dtype=stat)
    updates = training and running_mean is not None
    rdt = running_mean.dtype if running_mean is not None else stat
    new_rm = x.new_empty((c if updates else 0,), dtype=rdt)
    new_rv = x.new_empty((c if updates else 0,), dtype=rdt)
    return out, conv_out, mean, invstd, new_rm, new_rv


def _backward_fake(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride, padding, dilation,
                   training, relu, output_mask):
    stat = save_mean.dtype
    c = weight.shape[0]
    return (
        torch.empty_like(x) if output_mask[0] else None,
        torch.empty_like(weight) if output_mask[1] else None,
        save_mean.new_empty((c,), dtype=stat) if output_mask[2] else None,
        save_mean.new_empty((c,), dtype=stat) if output_mask[3] else None,
        empty_activation(conv_out) if output_mask[4] else None,
    )


# ---- autograd --------------------------------------------------------------------------------------

_GRAD_INPUTS = (0, 1, 2, 3, 12)  # x, weight, bn_weight, bn_bias, residual in the forward schema


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, _, _, stride, padding, dilation, training, _, _, _, relu = inputs
    out, conv_out, mean, invstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(conv_out, mean, invstd, new_rm, new_rv)
    ctx.save_for_backward(x, weight, bn_weight, conv_out, out, mean, invstd)
    ctx.conf = (stride, padding, dilation, training, relu)
    ctx.param_dtypes = (
        bn_weight.dtype if bn_weight is not None else None,
        bn_bias.dtype if bn_bias is not None else None,
    )


def _make_backward(backward_op):
    def backward(ctx, grad_out, *unused):
        mask = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
        none = [None] * 14
        if grad_out is None or not any(mask):
            return tuple(none)
        x, weight, bn_weight, conv_out, out, mean, invstd = ctx.saved_tensors
        stride, padding, dilation, training, relu = ctx.conf
        gx, gw, gg, gb, gr = backward_op(
            grad_out, x, weight, bn_weight, conv_out, out, mean, invstd, stride, padding, dilation, training, relu,
            mask,
        )
        grads = none
        grads[0], grads[1], grads[12] = gx, gw, gr
        grads[2] = gg.to(ctx.param_dtypes[0]) if gg is not None else None
        grads[3] = gb.to(ctx.param_dtypes[1]) if gb is not None else None
        return tuple(grads)

    return backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "deeplab_ops.conv_bn_relu does not support double backward (a gradient of its gradient, as with "
        "create_graph=True); use backend='reference' for higher-order gradients"
    )


def _register(prefix: str) -> None:
    fwd, bwd = f"deeplab_ops::{prefix}conv_bn_relu_forward", f"deeplab_ops::{prefix}conv_bn_relu_backward"
    torch.library.register_fake(fwd)(_forward_fake)
    torch.library.register_fake(bwd)(_backward_fake)
    torch.library.register_autograd(fwd, _make_backward(getattr(_ops, f"{prefix}conv_bn_relu_backward")),
                                    setup_context=_setup_context)
    torch.library.register_autograd(bwd, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


_register("")
_register("triton_")


# ---- memory-efficient autograd (memory_efficient=True) ---------------------------------------------
#
# The op above saves y = conv(x, w) (pre-BN) for the backward: one activation-sized tensor per layer that
# nothing else keeps. The lean path saves none; it saves z (the output, the next layer's input anyway), x (this
# layer's input, kept anyway), the parameters, mean/invstd (C values each) and, where y is rebuilt from z, the
# residual (the block's input or its downsample's output, kept anyway), and gives the unchanged backward ops a
# rebuilt y:
#   eval BN (running statistics, incl. frozen BN): dy = gamma*invstd*g does not read y, only dgamma = sum g*xhat
#     does, and only where g != 0, i.e. z > 0: there xhat = (z - beta - r)/gamma exactly. Elsewhere any finite
#     value serves (we put y = mean). No dgamma wanted: y is not read at all and `out` stands in for it.
#   relu=False: z is affine in y everywhere, so the same reconstruction serves training BN as well.
#   training BN with ReLU: dy = gamma*invstd*(g - sum(g)/n - xhat*sum(g*xhat)/n) is non-zero where z <= 0, where
#     z says nothing about xhat: y is recomputed as conv(x, w) by the backend's own conv (exact; one conv forward).
# Reconstruction divides by gamma, so its error grows as 1/|gamma|: a per-channel bound (below) picks the
# channels whose y is recomputed by the conv instead (gamma = 0 or tiny, of either sign).

# Largest allowed error bound of the rebuilt xhat, per activation dtype: a channel whose bound exceeds it is
# recomputed by the conv. An error e on xhat moves dgamma_c by at most e * sum|g_c| (and dy by as much through
# the training term). The saving path's xhat already carries the rounding of computing and storing y: measured
# 2.2e-6 (float32), 1.9e-3 (float16), 1.5e-2 (bfloat16) at 16x3x3 inputs. The tolerance lets the rebuild add at
# most about 2x that (half types) or 5x (float32); float64's is far below what gradcheck resolves. Measured
# errors against these bounds: README, "Memory-efficient training".
RECONSTRUCTION_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def reconstruction_error_bound(out: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                               residual: Tensor | None, stat: torch.dtype) -> Tensor:
    """Per-channel bound on |xhat_rebuilt - xhat| for xhat = (z - beta - r)/gamma from the stored z.

    z carries its storage rounding u_s*|z| and the forward's rounding of gamma*xhat + beta + r (u_o per operation,
    u_o that of `stat`); the subtractions add u_o*(|z| + |beta| + |r|) each; all of it is divided by |gamma|:
        bound_c = (u_s*max|z_c| + 3*u_o*(max|z_c| + |beta_c| + max|r_c|)) / |gamma_c|     (inf for gamma_c = 0)
    The error both paths share (the rounding of y to its storage dtype, of (y - mean)*invstd) is not counted.
    """
    c = out.shape[1]
    zmax = out.abs().amax(dim=(0, 2, 3)).to(stat)
    size = zmax.clone()
    if bn_bias is not None:
        size += bn_bias.detach().to(stat).abs()
    if residual is not None:
        size += residual.abs().amax(dim=(0, 2, 3)).to(stat)
    gamma = bn_weight.detach().to(stat).abs() if bn_weight is not None else torch.ones(c, dtype=stat, device=out.device)
    return (_unit_roundoff(out.dtype) * zmax + 3 * _unit_roundoff(stat) * size) / gamma


def _conv(name: str, x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """y = conv(x, weight) by the backend's own convolution, in x's memory format (the forward's y)."""
    mf = suggest_memory_format(x)
    if name != "triton":
        return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation).contiguous(memory_format=mf)
    from deeplab_ops.triton.conv_engine import Geometry, conv_forward

    geo = Geometry(tuple(stride), tuple(padding), tuple(dilation))
    out_hw = conv_output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), geo.stride, geo.padding, geo.dilation)
    y, _, _ = conv_forward(x.permute(0, 2, 3, 1).contiguous(), weight.permute(2, 3, 1, 0).contiguous(), geo,
                           out_hw, training=True, stat_dtype=opmath_dtype(x.dtype))
    return y.permute(0, 3, 1, 2).contiguous(memory_format=mf)


def rebuild_conv_out(name: str, x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                     out: Tensor, mean: Tensor, invstd: Tensor, residual: Tensor | None, stride, padding, dilation,
                     training: bool, relu: bool, need_xhat: bool = True) -> tuple[Tensor, int]:
    """The conv_out the backward ops need, rebuilt without having saved it; and how many channels were recomputed
    by the convolution (all of them for training BN with ReLU). `need_xhat` False: only dgamma would read xhat
    and it is not wanted (eval BN), so any finite tensor of y's shape serves."""
    c = out.shape[1]
    if training and relu:
        return _conv(name, x, weight, stride, padding, dilation), c
    if not training and not need_xhat:
        return out, 0
    stat = mean.dtype
    bound = reconstruction_error_bound(out, bn_weight, bn_bias, residual, stat)
    bad = ~(bound <= RECONSTRUCTION_TOL[out.dtype])  # NaN bounds (NaN gamma) fall back too

    def per_channel(t: Tensor) -> Tensor:
        return t.detach().to(stat).view(1, c, 1, 1)

    # xhat = (z - beta - r) / gamma, then y = mean + xhat / invstd: in place on one stat-dtype temporary.
    y = out.to(stat, copy=True)
    if bn_bias is not None:
        y.sub_(per_channel(bn_bias))
    if residual is not None:
        y.sub_(residual)
    if bn_weight is not None:
        y.div_(per_channel(bn_weight))
    if relu:
        y.masked_fill_(out <= 0, 0.0)  # g = 0 there: xhat = 0 keeps every term finite
    y = y.div_(per_channel(invstd)).add_(per_channel(mean)).to(out.dtype)
    y = y.contiguous(memory_format=suggest_memory_format(out))
    recomputed = int(bad.sum())
    if recomputed:
        idx = bad.nonzero().squeeze(1)
        y.index_copy_(1, idx, _conv(name, x, weight.index_select(0, idx), stride, padding, dilation))
    return y, recomputed


BACKWARD_OPS = {"cpu": _ops.conv_bn_relu_backward, "cuda": _ops.conv_bn_relu_backward,
                "triton": _ops.triton_conv_bn_relu_backward}


class _MemoryEfficientConvBNReLU(torch.autograd.Function):
    """The forward op with a backward that rebuilds conv_out instead of saving it (see the section comment)."""

    @staticmethod
    def forward(ctx, name, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                training, momentum, eps, residual, relu):
        out, _, mean, invstd, new_rm, new_rv = FORWARD_OPS[name](
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training, momentum,
            eps, residual, relu,
        )
        # The residual is read only by the reconstruction (not by training BN with ReLU, which recomputes y).
        keep_residual = residual if not (training and relu) else None
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, out, mean, invstd, keep_residual)
        ctx.conf = (name, stride, padding, dilation, training, relu)
        ctx.param_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)
        ctx.mark_non_differentiable(new_rm, new_rv)
        return out, new_rm, new_rv

    @staticmethod
    def backward(ctx, grad_out, *unused):
        # Inputs after `name`: x, weight, bn_weight, bn_bias, ..., residual at 13.
        mask = [ctx.needs_input_grad[i] for i in (1, 2, 3, 4, 13)]
        grads = [None] * 15
        if not any(mask):
            return tuple(grads)
        x, weight, bn_weight, bn_bias, out, mean, invstd, residual = ctx.saved_tensors
        name, stride, padding, dilation, training, relu = ctx.conf
        conv_out, _ = rebuild_conv_out(name, x, weight, bn_weight, bn_bias, out, mean, invstd, residual, stride,
                                       padding, dilation, training, relu, need_xhat=training or mask[2])
        gx, gw, gg, gb, gr = BACKWARD_OPS[name](
            grad_out, x, weight, bn_weight, conv_out, out, mean, invstd, stride, padding, dilation, training, relu,
            mask,
        )
        grads[1], grads[2], grads[13] = gx, gw, gr
        grads[3] = gg.to(ctx.param_dtypes[0]) if gg is not None else None
        grads[4] = gb.to(ctx.param_dtypes[1]) if gb is not None else None
        return tuple(grads)


# ---- public functional -----------------------------------------------------------------------------


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    relu: bool = True,
    backend: str | None = None,
    process_group=None,
    memory_efficient: bool = False,
) -> Tensor:
    """Fused `act(BatchNorm(conv2d(x, weight)) [+ residual])`, act = ReLU (or identity with relu=False).

    Computes what ``F.conv2d(x, weight, None, stride, padding, dilation)`` → ``F.batch_norm(..., training,
    momentum, eps)`` → ``+ residual`` → ``F.relu`` compute, with groups=1 and no convolution bias.

    Args:
        x: (N, C_in, H, W), NCHW or channels_last; the output keeps its memory format.
        weight: (C_out, C_in, kH, kW), any kernel size.
        bn_weight, bn_bias: BatchNorm affine parameters (C_out,), or None (1 and 0).
        running_mean, running_var: (C_out,) running statistics. Training updates them in place exactly as
            F.batch_norm does (None: no update); eval (training=False) normalizes with them.
        stride, padding, dilation: an int or a pair.
        training: batch statistics (True) or running statistics (False).
        momentum: running-statistics factor in [0, 1] (nn.BatchNorm2d's momentum=None, the cumulative
            average, is handled by deeplab_ops.nn.FusedConvBNReLU).
        eps: added to the variance.
        residual: optional (N, C_out, H_out, W_out) tensor added before the activation.
        relu: apply ReLU (True) or not.
        backend: "cpu", "cuda", "triton", "reference", or None for automatic choice ($DEEPLAB_OPS_BACKEND
            overrides None).
        process_group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``) whose
            processes share BatchNorm statistics in training, as nn.SyncBatchNorm does; None: no synchronization.
        memory_efficient: save no pre-BN activation for the backward (one activation-sized tensor per layer less):
            the backward rebuilds it from the output (eval BN, relu=False) or recomputes the convolution
            (training BN with ReLU; channels with too small |bn_weight|). Same results within the README's
            "Memory-efficient training" tolerance. The reference backend and the synchronized (process_group)
            path ignore it.

    Returns:
        (N, C_out, H_out, W_out) tensor in x's dtype and memory format.
    """
    stride, padding, dilation = check_args(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training, momentum, eps,
        residual, relu,
    )
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient must be a bool, got {memory_efficient!r}")
    if process_group is not None and training and distributed.group_size(process_group) > 1:
        return distributed.SyncConvBNReLU.apply(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, float(momentum),
            float(eps), residual, relu, process_group,
        )
    name = backends.resolve(
        backend, "conv_bn_relu", x.device, x=x, weight=weight, stride=stride, padding=padding, dilation=dilation,
        training=training, residual=residual,
    )
    if name == "reference":
        return reference.conv_bn_relu(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride, padding=padding,
            dilation=dilation, training=training, momentum=float(momentum), eps=float(eps), residual=residual,
            relu=relu,
        )
    if memory_efficient and torch.is_grad_enabled():
        out, new_rm, new_rv = _MemoryEfficientConvBNReLU.apply(
            name, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training,
            float(momentum), float(eps), residual, relu,
        )
    else:
        out, _, _, _, new_rm, new_rv = FORWARD_OPS[name](
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training,
            float(momentum), float(eps), residual, relu,
        )
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return out

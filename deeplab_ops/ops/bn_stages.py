"""The BatchNorm stage ops (bn_stats, bn_finalize, bn_apply, bn_backward_reduce, bn_backward_dy).

Kernels: csrc/cpu/ and csrc/cuda/. Here: their fake (meta) kernels, so they trace under torch.compile, and
typed wrappers. They have no autograd: the fused ops' backward composes them.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

Tensor = torch.Tensor
_ops = torch.ops.deeplab_ops


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel statistics for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_activation(like: Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """An empty activation in `like`'s memory format (what the kernels return for outputs)."""
    return torch.empty(
        shape if shape is not None else like.shape,
        dtype=dtype or like.dtype,
        device=like.device,
        memory_format=suggest_memory_format(like),
    )


@torch.library.register_fake("deeplab_ops::bn_stats")
def _bn_stats_fake(input):
    c = input.shape[1]
    dt = opmath_dtype(input.dtype)
    return input.new_empty((c,), dtype=dt), input.new_empty((c,), dtype=dt)


@torch.library.register_fake("deeplab_ops::bn_finalize")
def _bn_finalize_fake(count, mean, m2, running_mean, running_var, momentum, eps):
    c = mean.shape[1]
    return mean.new_empty((c,)), mean.new_empty((c,))


@torch.library.register_fake("deeplab_ops::bn_apply")
def _bn_apply_fake(input, mean, scale, shift, residual, relu):
    return empty_activation(input)


@torch.library.register_fake("deeplab_ops::bn_backward_reduce")
def _bn_backward_reduce_fake(grad_out, output, input, mean, invstd, relu):
    c = input.shape[1]
    dt = opmath_dtype(input.dtype)
    return input.new_empty((c,), dtype=dt), input.new_empty((c,), dtype=dt)


@torch.library.register_fake("deeplab_ops::bn_backward_dy")
def _bn_backward_dy_fake(grad_out, output, input, mean, invstd, weight, sum_g, sum_g_xhat, count, relu, training):
    return empty_activation(input)


def bn_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, M2) of a 4-D activation over (N, H, W)."""
    return _ops.bn_stats(input)


def bn_finalize(
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Merge (P,) counts and (P, C) partials into (mean, invstd); update the running stats in place."""
    return _ops.bn_finalize(count, mean, m2, running_mean, running_var, momentum, eps)


def bn_apply(input: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """`act((input - mean) * scale + shift [+ residual])`."""
    return _ops.bn_apply(input, mean, scale, shift, residual, relu)


def bn_backward_reduce(
    grad_out: Tensor, output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, relu: bool
) -> tuple[Tensor, Tensor]:
    """Per-channel (sum g, sum g * xhat)."""
    return _ops.bn_backward_reduce(grad_out, output, input, mean, invstd, relu)


def bn_backward_dy(
    grad_out: Tensor,
    output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_g: Tensor | None,
    sum_g_xhat: Tensor | None,
    count: float,
    relu: bool,
    training: bool,
) -> Tensor:
    """The gradient w.r.t. the BN input."""
    return _ops.bn_backward_dy(grad_out, output, input, mean, invstd, weight, sum_g, sum_g_xhat, count, relu, training)

"""Fake (meta) kernels of the BatchNorm stage ops (schemas in csrc/ops.cpp), so the composites that call them and
tests that check them trace under torch.compile. They have no autograd: the fused ops' backward composes them."""

from __future__ import annotations

from deeplab_ops.common import empty_activation, opmath_dtype
from deeplab_ops.ops.dispatch import register_fake


@register_fake("deeplab_ops::bn_stats")
def _bn_stats_fake(input):
    c = input.shape[1]
    dt = opmath_dtype(input.dtype)
    return input.new_empty((c,), dtype=dt), input.new_empty((c,), dtype=dt)


@register_fake("deeplab_ops::bn_finalize")
def _bn_finalize_fake(mean, m2, counts, count, running_mean, running_var, momentum, eps, save_mean, save_invstd,
                      new_running_mean, new_running_var):
    return None  # writes into the four output buffers the caller allocated


@register_fake("deeplab_ops::bn_apply")
def _bn_apply_fake(input, mean, invstd, weight, bias, residual, relu):
    return empty_activation(input)


@register_fake("deeplab_ops::bn_backward_reduce")
def _bn_backward_reduce_fake(grad_out, output, input, mean, invstd, relu):
    c = input.shape[1]
    dt = opmath_dtype(input.dtype)
    return input.new_empty((c,), dtype=dt), input.new_empty((c,), dtype=dt)


@register_fake("deeplab_ops::bn_backward_dy")
def _bn_backward_dy_fake(grad_out, output, input, mean, invstd, weight, sum_g, sum_g_xhat, count, relu, training):
    return empty_activation(input)

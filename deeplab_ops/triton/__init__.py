"""Triton kernels (the implicit-GEMM engine). Importing this package must not import triton.

Registers the kernels of deeplab_ops::triton_conv_bn_relu_*, triton_aspp_* and triton_upsample_cross_entropy_*
for CPU (Triton interpreter) and CUDA tensors, and what the triton backend supports. The kernel modules
(conv_engine, bn_kernels, conv_bn_relu, aspp, upsample_ce) import triton; they are imported on the first call.

The Triton interpreter keeps its launch grid in process-wide state, so interpreted launches (CPU tensors) from
several Python threads would corrupt each other: calls on CPU tensors are serialized by one lock. CUDA launches
are thread-safe and take no lock.
"""

from __future__ import annotations

import functools
import threading

import torch

from deeplab_ops import backends

_INT32_MAX = 2**31 - 1
_INTERPRETER_LOCK = threading.RLock()


def _serialized_on_cpu(kernel):
    """`kernel` holding the interpreter lock when its first argument is a CPU tensor (the Triton interpreter)."""

    @functools.wraps(kernel)
    def wrapper(first, *args, **kwargs):
        if first.device.type != "cpu":
            return kernel(first, *args, **kwargs)
        with _INTERPRETER_LOCK:
            return kernel(first, *args, **kwargs)

    return wrapper


def _register(name: str, kernel) -> None:
    torch.library.register_kernel(name, ("cpu", "cuda"), _serialized_on_cpu(kernel))


def _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training, momentum,
             eps, residual, relu):
    from deeplab_ops.triton import conv_bn_relu

    return conv_bn_relu.forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                                training, momentum, eps, residual, relu)


def _backward(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride, padding, dilation,
              training, relu, output_mask):
    from deeplab_ops.triton import conv_bn_relu

    return conv_bn_relu.backward(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride,
                                 padding, dilation, training, relu, output_mask)


def _conv_bn_relu_support(*, x, weight, stride, padding, dilation, training, residual) -> list[str]:
    """Why the triton engine cannot run this conv_bn_relu call (device and import are checked by backends)."""
    reasons = []
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        reasons.append(
            f"x has dtype {x.dtype}: the Triton interpreter stores half types as raw bits, so float16/bfloat16 "
            "run on CUDA tensors only"
        )
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    largest = max(x.numel(), n * cout * ho * wo, weight.numel())
    if largest > _INT32_MAX:
        reasons.append(f"a tensor of {largest} elements: the kernels index with int32 (at most {_INT32_MAX})")
    return reasons


_register("deeplab_ops::triton_conv_bn_relu_forward", _forward)
_register("deeplab_ops::triton_conv_bn_relu_backward", _backward)


# ---- aspp (kernels in aspp.py) -------------------------------------------------------------------------


def _aspp_forward(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var,
                  rates, training, momentum, eps):
    from deeplab_ops.triton import aspp

    return aspp.forward(x, list(conv_weights), pool_weight, project_weight, bn_weight, bn_bias, running_mean,
                        running_var, list(rates), training, momentum, eps)


def _aspp_backward(grad_out, x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, branch_out,
                   pool_out, project_out, out, save_mean, save_invstd, rates, training, output_mask):
    from deeplab_ops.triton import aspp

    return aspp.backward(grad_out, x, list(conv_weights), pool_weight, project_weight, bn_weight, bn_bias,
                         branch_out, pool_out, project_out, out, save_mean, save_invstd, list(rates), training,
                         list(output_mask))


def _aspp_support(*, x, rates, training, channels: int | None = None) -> list[str]:
    """Why the triton kernels cannot run this aspp call (device and import are checked by backends)."""
    reasons = []
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        reasons.append(
            f"x has dtype {x.dtype}: the Triton interpreter stores half types as raw bits, so float16/bfloat16 "
            "run on CUDA tensors only"
        )
    n, c_in, h, w = x.shape
    # The largest tensors: the (N, H, W, (1 + len(rates)) * C) branch buffer and the packed branch weights.
    c = channels if channels is not None else 1
    largest = max(x.numel(), n * h * w * (1 + len(rates)) * c, (1 + 9 * len(rates)) * c_in * c)
    if largest > _INT32_MAX:
        reasons.append(f"a tensor of {largest} elements: the kernels index with int32 (at most {_INT32_MAX})")
    return reasons


_register("deeplab_ops::triton_aspp_forward", _aspp_forward)
_register("deeplab_ops::triton_aspp_backward", _aspp_backward)


# ---- upsample_cross_entropy (kernels in upsample_ce.py) ------------------------------------------------


def _uce_forward(logits, target, ignore_index, align_corners, reduction):
    from deeplab_ops.triton import upsample_ce

    return upsample_ce.forward(logits, target, ignore_index, align_corners, reduction)


def _uce_backward(grad, logits, target, lse, valid_count, ignore_index, align_corners, reduction):
    from deeplab_ops.triton import upsample_ce

    return upsample_ce.backward(grad, logits, target, lse, valid_count, ignore_index, align_corners, reduction)


def _uce_support(*, logits, target) -> list[str]:
    """Why the triton kernels cannot run this upsample_cross_entropy call (device and import checked by backends)."""
    reasons = []
    if logits.device.type == "cpu" and logits.dtype in (torch.float16, torch.bfloat16):
        reasons.append(
            f"logits has dtype {logits.dtype}: the Triton interpreter stores half types as raw bits, so "
            "float16/bfloat16 run on CUDA tensors only"
        )
    largest = max(logits.numel(), target.numel())
    if largest > _INT32_MAX:
        reasons.append(f"a tensor of {largest} elements: the kernels index with int32 (at most {_INT32_MAX})")
    return reasons


_register("deeplab_ops::triton_upsample_cross_entropy_forward", _uce_forward)
_register("deeplab_ops::triton_upsample_cross_entropy_backward", _uce_backward)

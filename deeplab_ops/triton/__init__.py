"""Triton kernels (the implicit-GEMM engine) and their registrations. Importing this package imports no triton.

Registers the Python kernels of the deeplab_ops::triton_* ops for CPU (Triton interpreter) and CUDA tensors; the
kernel modules (conv_engine, bn_kernels, conv_bn_relu, aspp, upsample_ce) import triton on the first call.
`count_launches()` counts this package's kernel launches in the current thread (the overhead benchmark's probe).

The Triton interpreter keeps its launch grid in process-wide state, so interpreted launches (CPU tensors) from
several Python threads are serialized by one lock; CUDA launches take no lock.
"""

from __future__ import annotations

import functools
import threading

import torch

from deeplab_ops import _extension

_NO_SYNC_BN = "the triton backend has no synchronized BatchNorm; use backend='cuda' with a process group"


from deeplab_ops.triton.counting import LaunchCount, count_launches  # noqa: E402,F401  (public; imports no triton)

# ---- kernel registrations -------------------------------------------------------------------------------


def _serialized_on_cpu(kernel):
    """`kernel` holding the interpreter lock when its first argument is a CPU tensor (the Triton interpreter)."""

    @functools.wraps(kernel)
    def wrapper(first, *args, **kwargs):
        if not isinstance(first, torch.Tensor) or first.device.type != "cpu":  # (not a tensor: the check names it)
            return kernel(first, *args, **kwargs)
        from deeplab_ops.triton.launch import INTERPRETER_LOCK  # the one interpreter lock (re-entrant)

        with INTERPRETER_LOCK:
            return kernel(first, *args, **kwargs)

    return wrapper


# The op layer's argument checks for these ops (deeplab_ops/ops/*: `validate_with`). The C++ ops check their
# arguments in C++; these kernels are Python, and inconsistent shapes would make a kernel read or write out of bounds
# on a GPU, so every call is checked, except inside a backward pass (whose arguments the forward saved; the
# memory-efficient recompute included) and a call from a front door that has checked them already (`call_checked`).
_VALIDATORS: dict[str, object] = {}


class _Checked(threading.local):
    by_caller = False  # True while a front door calls a twin with the arguments it has checked (this thread)


_CHECKED = _Checked()


def validate_with(op: str, check) -> None:
    """Install `check(*args, **kwargs)`, raising for bad arguments, as the argument check of deeplab_ops::`op`."""
    _VALIDATORS[op] = check


def call_checked(op, *args, **kwargs):
    """`op(*args, **kwargs)` for a caller that has checked the arguments with the twins' rules (a front door): the
    first triton twin it reaches skips its own check (one call: any other twin reached inside it checks). Not for
    traced calls (torch.compile runs the op without the front door: the twin checks there), nor under a
    TorchDispatchMode (which sees, and may change, the arguments before the twin)."""
    if _CHECKED.by_caller or torch._C._len_torch_dispatch_stack() > 0:
        return op(*args, **kwargs)
    _CHECKED.by_caller = True
    try:
        return op(*args, **kwargs)
    finally:
        _CHECKED.by_caller = False


def _check_device(op: str, args: tuple) -> None:
    """A twin's tensors run on a GPU, or on the CPU in the Triton interpreter, in float32/float64 there and in
    float16 from Triton 3.6 (it stores bfloat16 as raw bits: a bfloat16 kernel computes garbage;
    common.interpreter_dtype_refusal): anything else is refused here, with what the front doors say (triton itself
    would fail with "0 active drivers")."""
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and first.device.type == "cpu":
        from deeplab_ops.common import HALF_DTYPES, interpreter_active, interpreter_dtype_refusal

        if not interpreter_active():
            raise RuntimeError(f"deeplab_ops::{op} runs CUDA tensors, or CPU tensors only in the Triton interpreter "
                               f"(TRITON_INTERPRET=1); got a tensor on cpu")
        for t in args[:2]:  # x / logits, or a backward's gradient and its x / logits
            if isinstance(t, torch.Tensor) and t.dtype in HALF_DTYPES:
                refusal = interpreter_dtype_refusal(t.dtype)
                if refusal:
                    raise RuntimeError(f"deeplab_ops::{op}: {refusal}; got a CPU tensor of dtype {t.dtype}")


def _validated(op: str, kernel):
    @functools.wraps(kernel)
    def wrapper(*args, **kwargs):
        checked, _CHECKED.by_caller = _CHECKED.by_caller, False  # the mark covers this one call
        check = _VALIDATORS.get(op)
        if check is not None and not checked and torch._C._current_autograd_node() is None:
            _check_device(op, args)
            check(*args, **kwargs)
        return kernel(*args, **kwargs)

    return wrapper


def _register(name: str, kernel) -> None:
    op = name.split("::")[1]
    if not hasattr(torch.ops.deeplab_ops, op):  # _extension.load refuses a stale _C, so only a broken build gets here
        raise ImportError(f"deeplab_ops: the compiled extension deeplab_ops._C has no schema for {name} "
                          f"(csrc/ops.cpp defines it); {_extension.REBUILD}")
    torch.library.register_kernel(name, ("cpu", "cuda"), _serialized_on_cpu(_validated(op, kernel)))


def _refuse_group(group_name: str | None) -> None:
    if group_name is not None:
        raise RuntimeError(_NO_SYNC_BN)


def _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training, momentum,
             eps, residual, relu, group_name=None, memory_efficient=False):
    _refuse_group(group_name)
    from deeplab_ops.triton import conv_bn_relu

    return conv_bn_relu.forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                                training, momentum, eps, residual, relu)


def _backward(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride, padding, dilation,
              training, relu, output_mask, group_name=None):
    _refuse_group(group_name)
    from deeplab_ops.triton import conv_bn_relu

    return conv_bn_relu.backward(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride,
                                 padding, dilation, training, relu, output_mask)


def _eval(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, residual, relu):
    from deeplab_ops.triton import conv_bn_relu

    return conv_bn_relu.eval_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                                     dilation, eps, residual, relu)


def _conv_bias_act(x, weight, bias, residual, stride, padding, dilation, relu):
    from deeplab_ops.triton import conv_bn_relu

    return conv_bn_relu.conv_bias_act(x, weight, bias, residual, stride, padding, dilation, relu)


def _aspp_forward(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var,
                  rates, training, momentum, eps, group_name=None, memory_efficient=False):
    _refuse_group(group_name)
    from deeplab_ops.triton import aspp

    out, branch, *rest = aspp.forward(x, list(conv_weights), pool_weight, project_weight, bn_weight, bn_bias,
                                      running_mean, running_var, list(rates), training, momentum, eps)
    return out, [branch], *rest  # branch_out: the twin keeps every branch in one buffer (csrc/ops.cpp)


def _aspp_backward(grad_out, x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, branch_out,
                   pool_out, project_out, out, save_mean, save_invstd, rates, training, output_mask, group_name=None):
    _refuse_group(group_name)
    from deeplab_ops.triton import aspp

    return aspp.backward(grad_out, x, list(conv_weights), pool_weight, project_weight, bn_weight, bn_bias,
                         branch_out[0], pool_out, project_out, out, save_mean, save_invstd, list(rates), training,
                         list(output_mask))


def _uce_forward(logits, target, ignore_index, align_corners, reduction):
    from deeplab_ops.triton import upsample_ce

    return upsample_ce.forward(logits, target, ignore_index, align_corners, reduction)


def _uce_backward(grad, logits, target, lse, valid_count, ignore_index, align_corners, reduction):
    from deeplab_ops.triton import upsample_ce

    return upsample_ce.backward(grad, logits, target, lse, valid_count, ignore_index, align_corners, reduction)


_register("deeplab_ops::triton_conv_bn_relu_forward", _forward)
_register("deeplab_ops::triton_conv_bn_relu_backward", _backward)
_register("deeplab_ops::triton_conv_bias_act", _conv_bias_act)
_register("deeplab_ops::triton_conv_bn_relu_eval", _eval)
_register("deeplab_ops::triton_aspp_forward", _aspp_forward)
_register("deeplab_ops::triton_aspp_backward", _aspp_backward)
_register("deeplab_ops::triton_upsample_cross_entropy_forward", _uce_forward)
_register("deeplab_ops::triton_upsample_cross_entropy_backward", _uce_backward)

"""upsample_cross_entropy: argument checks, fake kernels, the one autograd, the public function. Schemas in
csrc/ops.cpp (`upsample_cross_entropy_forward/_backward` for cpu and cuda, `triton_` twins for triton); how the
op works and its label-range rule: docs/ops.md.
"""

from __future__ import annotations

import numbers

import numpy
import torch

from deeplab_ops import backends, reference
from deeplab_ops.common import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    INT32_MAX,
    autocast_dtype,
    opmath_dtype,
    refuse_layout,
)
from deeplab_ops.ops.dispatch import (
    autograd_kernels,
    below_autograd,
    call_backward,
    enter_directly,
    refuse_forward_ad,
    refuse_grad_transforms,
    register_autograd_kernels,
    register_fake,
)
from deeplab_ops.triton import call_checked, validate_with

Tensor = torch.Tensor
_ops = torch.ops.deeplab_ops

REDUCTIONS = ("none", "mean", "sum")
FORWARD_OPS = {"cpu": _ops.upsample_cross_entropy_forward, "cuda": _ops.upsample_cross_entropy_forward,
               "triton": _ops.triton_upsample_cross_entropy_forward}


# ---- argument checks ------------------------------------------------------------------------------


def check_args(logits, target, ignore_index, align_corners, reduction) -> None:
    """Validate an upsample_cross_entropy call. Errors name the argument, its value and what was expected."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    for name, t in (("logits", logits), ("target", target)):
        if t.layout != torch.strided:
            refuse_layout(name, t)
    if logits.dim() != 4:
        raise ValueError(f"logits must be a 4-D (N, K, h, w) tensor, got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits has dtype {logits.dtype}; expected one of float32, float64, float16, bfloat16")
    if target.dim() != 3:
        raise ValueError(f"target must be a 3-D (N, H, W) tensor of class indices, got shape {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(
            f"target has dtype {target.dtype}; expected torch.int64 class indices (use target.long(); "
            "class-probability targets are not supported)"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}; expected the same device")
    n, k, h, w = logits.shape
    if target.shape[0] != n:
        raise ValueError(
            f"target has batch size {target.shape[0]} (shape {tuple(target.shape)}) but logits has {n} "
            f"(shape {tuple(logits.shape)}); expected the same N"
        )
    if k < 1:
        raise ValueError(f"logits has {k} classes (shape {tuple(logits.shape)}); expected K >= 1")
    if h < 1 or w < 1 or target.shape[1] < 1 or target.shape[2] < 1:
        raise ValueError(
            f"logits spatial size {h}x{w} and target spatial size {target.shape[1]}x{target.shape[2]} must both be "
            "at least 1x1 (bilinear interpolation to or from an empty grid is undefined)"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:  # the op schema's int is int64
        raise ValueError(f"ignore_index must be in the int64 range [-2**63, 2**63 - 1], got {ignore_index}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")
    if max(logits.numel(), target.numel()) > INT32_MAX:
        raise ValueError(
            f"logits ({tuple(logits.shape)}) or target ({tuple(target.shape)}) has 2**31 or more elements; "
            "the kernels index with int32"
        )


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise (as PyTorch does on CPU) if a label of the CPU tensor `target` is outside [0, num_classes) and not
    ignore_index. CPU tensors live in host memory: the check reads it there (numpy), with no aten op and nothing to
    synchronize; CUDA tensors are never checked on the host (their kernels decide: NaN)."""
    labels = target.numpy()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        where = tuple(int(i) for i in numpy.argwhere(bad)[0])
        raise IndexError(
            f"deeplab_ops.upsample_cross_entropy: target has label {int(labels[where])} at position {where}; "
            f"expected labels in [0, {num_classes}) "
            f"(K = logits.shape[1]) or ignore_index={ignore_index}"
        )


# ---- the triton twins' argument checks (deeplab_ops.triton.validate_with; see deeplab_ops/ops/conv_bn_relu.py) ---


def _direct_forward(logits, target, ignore_index, align_corners, reduction):
    check_args(logits, target, ignore_index, align_corners, reduction)
    _refuse_large("triton_upsample_cross_entropy_forward", logits, target)
    if target.device.type == "cpu":
        check_target_range(target, logits.shape[1], int(ignore_index))


def _refuse_large(op: str, logits, target) -> None:
    backends.refuse_beyond_kernel_limits(op, max(logits.numel(), target.numel()), grid_y=backends.uce_grid_y(logits))


def _direct_backward(grad, logits, target, lse, valid_count, ignore_index, align_corners, reduction):
    check_args(logits, target, ignore_index, align_corners, reduction)
    _refuse_large("triton_upsample_cross_entropy_backward", logits, target)
    loss_shape = tuple(target.shape) if reduction == "none" else ()
    for name, t, shape in (("grad", grad, loss_shape), ("lse", lse, (2, *target.shape)),
                           ("valid_count", valid_count, ())):
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape {shape} (the forward's, reduction={reduction!r}), got {got}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}; expected the same device")


validate_with("triton_upsample_cross_entropy_forward", _direct_forward)
validate_with("triton_upsample_cross_entropy_backward", _direct_backward)


# ---- fake kernels ----------------------------------------------------------------------------------


def _forward_fake(logits, target, ignore_index, align_corners, reduction):
    n, big_h, big_w = target.shape
    acc = opmath_dtype(logits.dtype)
    loss_shape = (n, big_h, big_w) if reduction == "none" else ()
    return (logits.new_empty(loss_shape), logits.new_empty((2, n, big_h, big_w), dtype=acc),
            logits.new_empty((), dtype=acc))


def _backward_fake(grad, logits, target, lse, count, ignore_index, align_corners, reduction):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ---- autograd --------------------------------------------------------------------------------------


_DOUBLE_BACKWARD = (
    "deeplab_ops.upsample_cross_entropy does not support double backward (a gradient of its gradient, as with "
    "create_graph=True); use backend='reference' for higher-order gradients"
)
_FORWARD_BY_PREFIX = {"": _ops.upsample_cross_entropy_forward.default,
                      "triton_": _ops.triton_upsample_cross_entropy_forward.default}
_BACKWARD_BY_PREFIX = {"": _ops.upsample_cross_entropy_backward.default,
                       "triton_": _ops.triton_upsample_cross_entropy_backward.default}


class _UpsampleCrossEntropy(torch.autograd.Function):
    """The Autograd kernel of upsample_cross_entropy_forward and its triton_ twin (`prefix` picks the twin)."""

    @staticmethod
    def forward(ctx, prefix, logits, target, ignore_index, align_corners, reduction):
        result = below_autograd(_FORWARD_BY_PREFIX[prefix], logits, target, ignore_index, align_corners, reduction)
        _, lse, count = result
        ctx.mark_non_differentiable(lse, count)
        ctx.set_materialize_grads(False)
        # Saved: the low-res logits, the labels and the per-pixel logsumexp (its max and log-sum, (2, N, H, W));
        # never the upsampled logits.
        ctx.save_for_backward(logits, target, lse, count)
        ctx.conf = (prefix, ignore_index, align_corners, reduction)
        return result

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None or not ctx.needs_input_grad[1]:
            return None, None, None, None, None, None
        logits, target, lse, count = ctx.saved_tensors
        prefix, ignore_index, align_corners, reduction = ctx.conf
        grad = call_backward(_BACKWARD_BY_PREFIX[prefix], grad_loss, logits, target, lse, count, ignore_index,
                             align_corners, reduction)
        return None, grad, None, None, None, None


def _autograd_kernel(prefix: str):
    """The Autograd kernel of `{prefix}upsample_cross_entropy_forward`: the Function when a graph is built, else
    the op below Autograd."""
    forward = _FORWARD_BY_PREFIX[prefix]
    apply = _UpsampleCrossEntropy.apply

    def kernel(logits, target, ignore_index, align_corners, reduction):
        refuse_forward_ad("upsample_cross_entropy", logits)
        if torch.is_grad_enabled() and logits.requires_grad:
            return apply(prefix, logits, target, ignore_index, align_corners, reduction)
        return below_autograd(forward, logits, target, ignore_index, align_corners, reduction)

    return kernel


for _prefix in ("", "triton_"):
    register_fake(f"deeplab_ops::{_prefix}upsample_cross_entropy_forward")(_forward_fake)
    register_fake(f"deeplab_ops::{_prefix}upsample_cross_entropy_backward")(_backward_fake)
register_autograd_kernels("upsample_cross_entropy", _autograd_kernel, _DOUBLE_BACKWARD)
_KERNELS = autograd_kernels(_autograd_kernel)


# ---- public functional -----------------------------------------------------------------------------


def upsample_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    align_corners: bool = False,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy of bilinearly upsampled logits against full-resolution labels, without the upsampled tensor.

    Computes ``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear", align_corners=align_corners),
    target, ignore_index=ignore_index, reduction=reduction)``, gradient included, with the interpolation done on
    the fly: memory is O(N*H*W) (the saved per-pixel logsumexp) instead of O(N*K*H*W).

    Args:
        logits: (N, K, h, w) float32/float64, or float16/bfloat16 (computed in float32; on CPU the cpu backend
            runs a float32 copy of logits).
        target: (N, H, W) int64 labels in [0, K) or ignore_index; (H, W) may be any size (up- or downsampling,
            non-integer ratios).
        ignore_index: label whose pixels contribute nothing (nor to the "mean" denominator).
        align_corners: as in F.interpolate.
        reduction: "mean" over non-ignored pixels (NaN when all are ignored, as PyTorch), "sum", or "none"
            ((N, H, W), 0 at ignored pixels).
        backend: "cpu", "cuda", "triton", "reference", None for automatic choice ($DEEPLAB_OPS_BACKEND
            overrides None), or "auto" for automatic choice whatever $DEEPLAB_OPS_BACKEND says.

    Labels outside [0, K) other than ignore_index raise IndexError for CPU tensors; for CUDA tensors the kernel
    decides (no host synchronization): their pixels get a NaN loss and gradient.

    Returns:
        a 0-d tensor ("mean", "sum") or (N, H, W) ("none"), in logits' dtype.
    """
    # autocast runs cross-entropy in float32: so does this loss
    if torch._C._is_any_autocast_enabled() and autocast_dtype(logits) is not None:
        logits = logits.float()
    check_args(logits, target, ignore_index, align_corners, reduction)
    ignore_index = int(ignore_index)
    # The label scan reads a CPU target's memory (numpy): not while torch.compile traces (the graph would branch on
    # data) nor under a torch.func transform (wrapped tensors have no storage), where F.cross_entropy (reference)
    # and the triton twin's own check (its op in the traced graph) raise for a bad label.
    # A storage-backed subclass target (torchvision's tv_tensors.Mask, what transforms.v2 pipelines yield) is scanned
    # through a plain view; a wrapper subclass (its own __torch_dispatch__: no memory of its own) is not.
    plain = target
    if type(target) is not torch.Tensor and type(target).__torch_dispatch__ is torch.Tensor.__torch_dispatch__:
        plain = target.as_subclass(torch.Tensor)
    direct = enter_directly(logits) and enter_directly(plain)
    resolve = backends.resolve_remembered if direct else backends.resolve
    name = resolve(backend, "upsample_cross_entropy", logits.device, logits=logits, target=target, synchronized=False)
    scan = target.device.type == "cpu" and direct
    if name == "reference":
        if scan:  # the message every CPU backend gives, not F.cross_entropy's
            check_target_range(plain, logits.shape[1], ignore_index)
        return reference.upsample_cross_entropy(logits, target, ignore_index=ignore_index,
                                                align_corners=align_corners, reduction=reduction)
    refuse_grad_transforms("upsample_cross_entropy", logits)
    if name == "triton" and scan:  # the cpu kernel checks labels itself
        check_target_range(plain, logits.shape[1], ignore_index)
    if logits.shape[0] == 0:
        # Nothing to launch; PyTorch's values: mean of nothing is NaN, sum is 0. Keeps the graph to logits.
        zero = logits.sum() * 0
        if reduction == "none":
            return logits.new_zeros(target.shape) + zero
        return zero + (float("nan") if reduction == "mean" else 0.0)
    if name == "cpu" and logits.dtype in HALF_DTYPES:
        # The CPU kernels take float32/float64: half logits run as float32 (exact), as the GPU kernels accumulate
        # them; the copy is of the low-resolution logits only, and the loss comes back in logits' dtype.
        loss = upsample_cross_entropy(logits.float(), target, ignore_index, align_corners, reduction, backend=name)
        return loss.to(logits.dtype)
    if not enter_directly(logits):  # traced: the graph holds the op (the triton twin checks its arguments)
        return FORWARD_OPS[name](logits, target, ignore_index, align_corners, reduction)[0]
    if name == "triton" and direct:
        # Checked above (a CPU target's labels included; a CUDA target's are the kernel's to decide, without a
        # synchronization): the twin skips its check.
        return call_checked(_KERNELS[name], logits, target, ignore_index, align_corners, reduction)[0]
    return _KERNELS[name](logits, target, ignore_index, align_corners, reduction)[0]

"""nn.Module front ends of the fused ops, and fusion of whole models.

FusedConvBNReLU is a drop-in for ``nn.Sequential(nn.Conv2d(..., bias=False), nn.BatchNorm2d(...), nn.ReLU())``
with the same children and state_dict keys (``0.weight``, ``1.weight``, ``1.bias``, ``1.running_mean``,
``1.running_var``, ``1.num_batches_tracked``), so checkpoints move both ways, and the same BatchNorm behaviour
(momentum, momentum=None as a cumulative average, track_running_stats, eval).
"""

from __future__ import annotations

import torch
from torch import nn

from deeplab_ops.ops.conv_bn_relu import conv_bn_relu

Tensor = torch.Tensor


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """conv.padding as a pair of ints; padding='same' is symmetric only when dilation * (k - 1) is even."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pad = []
    for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"conv has padding='same' with kernel_size={conv.kernel_size} and dilation={conv.dilation}, which "
                "needs asymmetric padding; the fused op supports symmetric padding only (use an explicit padding)"
            )
        pad.append(total // 2)
    return tuple(pad)


def check_fusable(conv: nn.Module, bn: nn.Module) -> None:
    """Raise a clear error unless (conv, bn) is a pair the fused op computes exactly."""
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if conv.bias is not None:
        raise ValueError(
            "conv has a bias; the fused op needs bias=False (BatchNorm's shift makes a conv bias redundant)"
        )
    if conv.groups != 1:
        raise ValueError(f"conv has groups={conv.groups}; the fused op supports groups=1 only")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; the fused op supports 'zeros' only")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has num_features={bn.num_features} but conv has out_channels={conv.out_channels}")
    _conv_padding(conv)


def bn_call_args(bn: nn.BatchNorm2d, training: bool) -> dict:
    """The BatchNorm arguments of a fused call that behaves as `bn.forward` does in this mode.

    Mirrors torch's _BatchNorm.forward: the momentum factor (1 / num_batches_tracked for momentum=None),
    batch statistics when training or when no running statistics are tracked, and running statistics passed
    for update only when tracked. num_batches_tracked is not incremented here: `bn_step` does it after the call
    succeeded, so a failed call changes nothing the user saved.
    """
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        momentum = 1.0 / float(bn.num_batches_tracked + 1) if bn.momentum is None else bn.momentum
    else:
        momentum = 0.0 if bn.momentum is None else bn.momentum
    bn_training = training or (bn.running_mean is None and bn.running_var is None)
    track = not training or bn.track_running_stats
    return {
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "running_mean": bn.running_mean if track else None,
        "running_var": bn.running_var if track else None,
        "training": bn_training,
        "momentum": momentum,
        "eps": bn.eps,
    }


def bn_step(bn: nn.BatchNorm2d, training: bool) -> None:
    """Count one training batch, as nn.BatchNorm2d.forward does."""
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)


def fused_conv_bn(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    x: Tensor,
    *,
    training: bool,
    residual: Tensor | None = None,
    relu: bool = True,
    backend: str | None = None,
) -> Tensor:
    """`act(bn(conv(x)) [+ residual])` through the fused op, with exactly the modules' semantics."""
    args = bn_call_args(bn, training)
    out = conv_bn_relu(
        x, conv.weight, args["bn_weight"], args["bn_bias"], args["running_mean"], args["running_var"],
        stride=tuple(conv.stride), padding=_conv_padding(conv), dilation=tuple(conv.dilation),
        training=args["training"], momentum=args["momentum"], eps=args["eps"], residual=residual, relu=relu,
        backend=backend,
    )
    bn_step(bn, training)
    return out


class FusedConvBNReLU(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d (→ + residual) → ReLU as one fused op.

    Children and state_dict keys are those of ``nn.Sequential(nn.Conv2d(..., bias=False), nn.BatchNorm2d(...),
    nn.ReLU())`` (``nn.Sequential(conv, bn)`` when relu=False), so a checkpoint of either loads into the other.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        relu: bool = True,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False, device=device, dtype=dtype
        )
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        super().__init__(conv, bn, *([nn.ReLU()] if relu else []))
        self.apply_relu = relu
        self.backend = backend

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True, backend: str | None = None
    ) -> FusedConvBNReLU:
        """Wrap existing modules (their parameters and buffers are shared, not copied)."""
        check_fusable(conv, bn)
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {relu!r}")
        self = cls.__new__(cls)
        nn.Sequential.__init__(self, conv, bn, *([nn.ReLU()] if relu else []))
        self.apply_relu = relu
        self.backend = backend
        return self

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return fused_conv_bn(
            self[0], self[1], x, training=self.training, residual=residual, relu=self.apply_relu,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"relu={self.apply_relu}, backend={self.backend!r}"


def fuse_modules(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Run every conv → BN (→ residual) → ReLU of `model` on the fused ops, in place; state_dict unchanged."""
    from deeplab_ops.fusion import fuse_modules as _fuse

    return _fuse(model, backend=backend)


def unfuse_modules(model: nn.Module) -> nn.Module:
    """Undo fuse_modules, in place."""
    from deeplab_ops.fusion import unfuse_modules as _unfuse

    return _unfuse(model)

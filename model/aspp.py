"""ASPP: Atrous Spatial Pyramid Pooling with image pooling (Chen et al. 2017, sec. 3.3), torchvision's key names.

Branches (``convs``): 0 a 1×1 conv, 1… a 3×3 conv per atrous rate (dilation = padding = rate), last the image
pooling branch (global average pool → 1×1 conv → bilinear broadcast back to H×W); each conv → BN → ReLU. The
concatenation goes through ``project`` (1×1 conv → BN → ReLU, then dropout in torchvision's variant).

state_dict keys are torchvision's: ``convs.0.0.weight``, ``convs.0.1.*``, ``convs.{1,2,3}.0.weight``,
``convs.{1,2,3}.1.*``, ``convs.4.1.weight``, ``convs.4.2.*``, ``project.0.weight``, ``project.1.*``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from model.checks import INT32_MAX, check_int, check_ordered

Tensor = torch.Tensor

RATES_BY_OUTPUT_STRIDE: dict[int, tuple[int, int, int]] = {16: (6, 12, 18), 8: (12, 24, 36)}


@torch.fx.wrap  # traced (torch.fx, create_feature_extractor) as one call: the check runs on the traced module's input
def refuse_batch_one(x: Tensor, refuses: bool = True) -> None:
    """The image-pooling branch's batch-1 error, raised when `refuses` (its BatchNorm would normalize one pooled
    value per channel: `ASPPPooling.refuses_batch_one`) and `x` is a batch of 1."""
    if refuses and x.shape[0] == 1:
        raise ValueError(
            "ASPP image-pooling branch: its BatchNorm normalizes one pooled value per channel and image, so "
            f"training it needs a batch of 2 or more; got input of shape {tuple(x.shape)} (batch 1). Use a "
            "batch of at least 2, model.eval(), or freeze the BatchNorm layers (call .eval() on them)"
        )


def check_rates(atrous_rates: Sequence[int]) -> tuple[int, ...]:
    """The rates as a tuple of ints in [1, 2**31 - 1] (numpy integers taken as ints), or a ValueError naming the
    argument; a set or dict is refused (its order is not the order written, so the rates would be reordered)."""
    check_ordered(atrous_rates, "atrous_rates")
    try:
        if isinstance(atrous_rates, str | bytes):  # '6' iterated as ('6',), named so in the error
            raise TypeError
        rates = tuple(atrous_rates)
    except TypeError:
        raise ValueError(f"atrous_rates must be a sequence of positive ints, got {atrous_rates!r}") from None
    if not rates or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in rates):
        raise ValueError(f"atrous_rates must be a non-empty sequence of positive ints, got {atrous_rates!r}")
    if max(rates) > INT32_MAX:
        raise ValueError(f"atrous_rates must be at most {INT32_MAX} each (a 32-bit int: cuDNN and the kernels take a "
                         f"rate as one), got {atrous_rates!r}")
    return tuple(int(r) for r in rates)


class ASPPConv(nn.Sequential):
    """3×3 atrous conv (dilation = padding = rate) → BN → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Sequential):
    """Image-level features: global average pool → 1×1 conv → BN → ReLU → bilinear broadcast to the input size.

    Its BatchNorm sees one value per channel and image, so training it needs a batch of 2 or more.
    """

    deeplab_ops_chain = "aspp_pooling"  # deeplab_ops.fusion: the forward computes torchvision's ASPPPooling

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def refuses_batch_one(self) -> bool:
        """Whether this branch's BatchNorm would train on one value per channel given a batch of 1: a plain
        BatchNorm2d in training mode, or one without running statistics. A synchronized one (nn.SyncBatchNorm,
        training's DistributedBatchNorm2d) pools the batch of every process, so one image per process is its own
        to judge."""
        bn = self[2]
        # (nor one that a synchronized fused ASPP's hooked part runs over the group's batches meanwhile:
        # deeplab_ops.modules.unfused_call sets its forward, marked so)
        return (type(bn) is nn.BatchNorm2d and (bn.training or bn.running_mean is None)
                and not getattr(bn.__dict__.get("forward"), "deeplab_ops_synchronized", False))

    def check_batch(self, x: Tensor) -> None:
        """Raise the batch-1 error where this branch's BatchNorm would train on one value per channel
        (`refuses_batch_one`) and `x` is a batch of 1. Traced (torch.fx), the check is one call in train and eval
        mode alike (the same graph nodes in both, as torchvision's create_feature_extractor expects)."""
        if isinstance(x, torch.fx.Proxy) or x.shape[0] == 1:  # eager: the BatchNorm is asked about a batch of 1 only
            refuse_batch_one(x, self.refuses_batch_one())

    def forward(self, x: Tensor) -> Tensor:
        self.check_batch(x)
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        # Bilinear from 1×1 is a broadcast; torchvision interpolates, and so do we, for identical results.
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling with image pooling.

    Args:
        in_channels: channels of the backbone's output (2048 for ResNet-50/101).
        atrous_rates: one 3×3 branch per rate, e.g. (6, 12, 18) at output stride 16, (12, 24, 36) at 8.
        out_channels: channels of every branch and of the output (256 in the paper).
        dropout: dropout probability after the projection (torchvision: 0.5; the paper's head: 0, no module).
    """

    # deeplab_ops.fusion: the forward computes torchvision's ASPP (the batch-1 check aside, which the fused op makes)
    deeplab_ops_chain = "aspp"

    def __init__(
        self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256, dropout: float = 0.0
    ) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels")
        out_channels = check_int(out_channels, "out_channels")
        rates = check_rates(atrous_rates)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        branches: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )
        ]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        project: list[nn.Module] = [
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            project.append(nn.Dropout(dropout))
        self.project = nn.Sequential(*project)
        self.atrous_rates = rates

    def check_batch(self, x: Tensor) -> None:
        """Raise the image-pooling branch's batch-1 error (`ASPPPooling.check_batch`) for input `x`."""
        for branch in self.convs:
            if isinstance(branch, ASPPPooling):
                branch.check_batch(x)

    def forward(self, x: Tensor) -> Tensor:
        # A batch the pooling branch refuses is refused before any branch runs: the other branches' BatchNorms
        # would otherwise have updated their running statistics for a call that fails (the fused ASPP op, which
        # refuses it before computing anything, leaves them unchanged). Traced (torch.fx), the check is recorded.
        if isinstance(x, torch.fx.Proxy) or x.shape[0] == 1:
            self.check_batch(x)
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))

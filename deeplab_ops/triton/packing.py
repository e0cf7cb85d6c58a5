"""Packed weight layouts the kernels read, cached per parameter version by `deeplab_ops.common.derived` (the one
cache of tensors derived from parameters: see there what refreshes an entry and what is never cached)."""

from __future__ import annotations

import torch

from deeplab_ops.common import derived as cached

Tensor = torch.Tensor

__all__ = ["cached", "conv_weight", "conv_weight_t"]


def conv_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in, KH, KW) -> (KH, KW, C_in, C_out): the forward's K-major B operand per tap."""
    return cached("conv_fwd", (weight,), lambda: weight.detach().permute(2, 3, 1, 0).contiguous())


def conv_weight_t(weight: Tensor) -> Tensor:
    """(C_out, C_in, KH, KW) -> (KH, KW, C_out, C_in): the dgrad's B operand per tap."""
    return cached("conv_dgrad", (weight,), lambda: weight.detach().permute(2, 3, 0, 1).contiguous())

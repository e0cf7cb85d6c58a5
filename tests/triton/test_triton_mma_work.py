"""MMA work of the conv kernels (forward, dgrad, wgrad) at stride 1 and 2 against a brute force over every
(output pixel, tap) pair: the kernels' own pair counters times the tile's pixels stay within 10 % of the useful
products. The schedules: docs/kernels.md, "Schedules"."""

from __future__ import annotations

import pytest
import torch
from helpers import TRITON_DEVICE, needs_triton

from deeplab_ops.triton import conv_bn_relu as triton_cbr

pytestmark = [pytest.mark.gpu, needs_triton]
DEVICE = TRITON_DEVICE  # CUDA tensors where a GPU is visible, else CPU tensors in the interpreter


def _useful(h: int, w: int, k: int, stride: int, pad: int, dil: int) -> int:
    """(output pixel, tap) pairs whose input pixel lies in the map: the products every pass needs (forward and
    wgrad sum them per output pixel, dgrad per input pixel)."""
    ho = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    hits = 0
    for oh in range(ho):
        for ow in range(wo):
            for kh in range(k):
                for kw in range(k):
                    ih, iw = oh * stride - pad + kh * dil, ow * stride - pad + kw * dil
                    hits += 0 <= ih < h and 0 <= iw < w
    return hits


@pytest.mark.parametrize("stride, block", [(1, 8), (2, 4)])
def test_mma_work_is_within_10_percent_of_the_useful_taps(stride, block):
    h = w = 32
    x = torch.randn(1, 4, h, w, device=DEVICE)
    weight = torch.randn(5, 4, 3, 3, device=DEVICE)
    counted = triton_cbr.count_computed_pairs(x, weight, (stride, stride), (1, 1), (1, 1), block, block)
    useful = _useful(h, w, 3, stride, 1, 1)
    for pass_, pairs in counted.items():
        # A computed (tile, tap) pair runs the MMA over the tile's BLOCK x BLOCK pixels (M for forward and
        # dgrad, K for wgrad); the maps are whole tiles, so no pixel of the work lies outside them.
        work = pairs * block * block
        assert useful <= work <= 1.10 * useful, (pass_, work, useful)

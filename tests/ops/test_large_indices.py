"""Index arithmetic at the int32 boundary, checked without the memory: expanded (zero-stride) tensors and meta
tensors carry the sizes only.

The Triton ASPP projection kernels read the projection weight's branch columns, a ((1 + len(rates)) * C, C)
operand, with int32 offsets (`kc * C + n`), and their weight-gradient partials have that shape too. The host-side
refusal (`backends.aspp_largest`) counted x, the branch buffer and the packed branch weights only, so with few input
channels and many output channels (C_in = 256, C = 23171, rates (6, 12, 18): 4 * C * C = 2147580964 elements) a
direct call, a traced graph or the automatic choice ran the kernels and their offsets wrapped on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from deeplab_ops import backends
from deeplab_ops.common import INT32_MAX

RATES = [6, 12, 18]
C_IN = 256


def _aspp_args(c: int, device: str = "cpu"):
    def big(*shape):
        return torch.zeros(1, device=device).expand(*shape)

    x = big(2, C_IN, 2, 2)
    weights = [big(c, C_IN, 1, 1)] + [big(c, C_IN, 3, 3) for _ in RATES]
    pool, proj = big(c, C_IN, 1, 1), big(c, (2 + len(RATES)) * c, 1, 1)
    bn = [torch.ones((len(RATES) + 3) * c, device=device) for _ in range(4)]
    return x, weights, pool, proj, bn


def test_aspp_largest_counts_the_projection_operand():
    x, *_ = _aspp_args(1)
    c = 23171  # the smallest C at C_in = 256 and three rates whose projection operand passes int32
    assert 4 * c * c > INT32_MAX >= 4 * (c - 1) * (c - 1)
    assert backends.aspp_largest(x, RATES, c) == 4 * c * c
    assert backends.aspp_largest(x, RATES, c - 1) <= INT32_MAX


def test_triton_aspp_twin_refuses_a_projection_operand_beyond_int32():
    from deeplab_ops.ops import aspp as aspp_ops

    x, weights, pool, proj, bn = _aspp_args(23171)
    with pytest.raises(ValueError, match=r"triton_aspp_forward: a tensor of 2147580964 elements.*int32"):
        aspp_ops._direct_forward(x, weights, pool, proj, *bn, RATES, True, 0.1, 1e-5)
    # the backward twin: the saved tensors of such a forward
    c = 23171
    branch, small_out = [torch.zeros(1).expand(2, 4 * c, 2, 2)], torch.zeros(1).expand(2, c, 2, 2)
    with pytest.raises(ValueError, match=r"triton_aspp_backward: a tensor of 2147580964 elements.*int32"):
        aspp_ops._direct_backward(small_out, x, weights, pool, proj, bn[0], bn[1], branch, torch.zeros(2, c),
                                  small_out, small_out, bn[2], bn[3], RATES, True, [True] * 3)
    x, weights, pool, proj, bn = _aspp_args(23170)
    aspp_ops._direct_forward(x, weights, pool, proj, *bn, RATES, True, 0.1, 1e-5)  # within the range: accepted


def test_automatic_choice_never_gives_triton_a_projection_operand_beyond_int32():
    # On meta tensors the device rules pass for every backend, so the per-call rule alone decides.
    x = torch.empty(2, C_IN, 2, 2, device="meta")
    reasons = backends.not_supported_reasons("triton", "aspp", x.device, x=x, rates=RATES, channels=23171)
    assert any("2147580964 elements" in r and "int32" in r for r in reasons), reasons
    assert not backends.not_supported_reasons("triton", "aspp", x.device, x=x, rates=RATES, channels=23170)

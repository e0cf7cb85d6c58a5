"""Index arithmetic at the int32 boundary, checked without the memory: expanded (zero-stride) tensors and meta
tensors carry the sizes only.

The Triton ASPP projection kernels read the projection weight's branch columns, a ((1 + len(rates)) * C, C)
operand, with int32 offsets (`kc * C + n`), and their weight-gradient partials have that shape too. The host-side
refusal (`backends.aspp_largest`) counted x, the branch buffer and the packed branch weights only, so with few input
channels and many output channels (C_in = 256, C = 23171, rates (6, 12, 18): 4 * C * C = 2147580964 elements) a
direct call, a traced graph or the automatic choice ran the kernels and their offsets wrapped on a GPU.

Below them, the launch grid's second axis (CUDA: at most 65535 blocks), which the interpreter never checks.
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


# ---- channel and class blocks on the launch grid's second axis (CUDA: at most 65535) ---------------------------
#
# The triton kernels put channel blocks of >= 16 channels (classes: blocks of >= 8) on the grid's second axis, which
# CUDA caps at 65535 and the interpreter does not check: beyond it a GPU refuses the launch. The rule refuses such
# calls by name, and the automatic choice leaves them to the other backends.


def _meta(*shape):
    return torch.empty(shape, device="meta")


@pytest.mark.parametrize("which", ["in", "out"])
def test_conv_channel_blocks_beyond_the_grid_are_refused(which):
    fits, over = backends.GRID_Y_MAX * backends.CHANNEL_BLOCK, backends.GRID_Y_MAX * backends.CHANNEL_BLOCK + 1
    assert fits == 1_048_560
    for c, refused in ((fits, False), (over, True)):
        x, w = (_meta(1, c, 1, 1), _meta(16, c, 1, 1)) if which == "in" else (_meta(1, 16, 1, 1), _meta(c, 16, 1, 1))
        reasons = backends.not_supported_reasons("triton", "conv_bn_relu", x.device, x=x, weight=w, stride=(1, 1),
                                                 padding=(0, 0), dilation=(1, 1))
        if refused:
            assert reasons == [f"{c} channels (in blocks of 16): 65536 blocks on the launch grid's second axis, "
                               f"beyond CUDA's limit of 65535"], reasons
        else:
            assert not reasons, reasons


def test_conv_twin_refuses_channel_blocks_beyond_the_grid():
    from deeplab_ops.ops import conv_bn_relu as cbr_ops

    c = backends.GRID_Y_MAX * backends.CHANNEL_BLOCK + 1
    x, w = torch.zeros(1).expand(2, 1, 1, 1), torch.zeros(1).expand(c, 1, 1, 1)
    ones = torch.ones(1).expand(c)
    with pytest.raises(ValueError, match=r"triton_conv_bn_relu_forward: 1048561 channels \(in blocks of 16\): 65536 "
                                         r"blocks on the launch grid's second axis, beyond CUDA's limit of 65535"):
        cbr_ops._direct_forward(x, w, ones, ones, None, None, (1, 1), (0, 0), (1, 1), True, 0.1, 1e-5, None, True)


def test_aspp_branch_blocks_beyond_the_grid_are_refused():
    x = _meta(2, 8, 2, 2)
    rates = list(range(1, 4096))  # with the 1x1: 4096 branches, each in its own channel blocks
    c_fits = backends.CHANNEL_BLOCK * (backends.GRID_Y_MAX // 4096)  # 15 blocks a branch (61440); 16 would not fit
    reasons = backends.not_supported_reasons("triton", "aspp", x.device, x=x, rates=rates, channels=c_fits)
    assert not reasons, reasons
    reasons = backends.not_supported_reasons("triton", "aspp", x.device, x=x, rates=rates, channels=c_fits + 1)
    assert reasons == ["4096 branches of 241 channels (each in blocks of 16): 65536 blocks on the launch grid's "
                       "second axis, beyond CUDA's limit of 65535"], reasons
    wide = _meta(1, backends.GRID_Y_MAX * backends.CHANNEL_BLOCK + 1, 1, 1)
    reasons = backends.not_supported_reasons("triton", "aspp", wide.device, x=wide, rates=[6], channels=1)
    assert any("1048561 input channels" in r for r in reasons), reasons


def test_uce_class_blocks_beyond_the_grid_are_refused():
    from deeplab_ops.ops import upsample_ce as uce_ops

    k_fits = backends.GRID_Y_MAX * backends.CLASS_BLOCK
    target = _meta(1, 2, 2)
    assert not backends.not_supported_reasons("triton", "upsample_cross_entropy", target.device,
                                              logits=_meta(1, k_fits, 1, 1), target=target)
    reasons = backends.not_supported_reasons("triton", "upsample_cross_entropy", target.device,
                                             logits=_meta(1, k_fits + 1, 1, 1), target=target)
    assert reasons == ["524281 classes (in blocks of 8): 65536 blocks on the launch grid's second axis, beyond "
                       "CUDA's limit of 65535"], reasons
    logits = torch.zeros(1).expand(1, k_fits + 1, 1, 1)
    with pytest.raises(ValueError, match=r"triton_upsample_cross_entropy_forward: 524281 classes"):
        uce_ops._direct_forward(logits, torch.zeros(1, 2, 2, dtype=torch.int64), 255, False, "mean")

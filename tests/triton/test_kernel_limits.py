"""The Triton kernels at their limits: classes masked with -inf, and launch grids within CUDA's limits.

upsample_cross_entropy's forward runs an online logsumexp over class blocks (8 classes on a GPU, up to 32 in the
interpreter). A pixel whose classes of the first block(s) are all -inf (classes masked out with -inf logits) had
a running maximum of -inf, and the rescale exp(m - m_new) = exp(-inf - (-inf)) made its sum NaN: NaN loss and
gradients where F.cross_entropy is finite.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA, TRITON_DEVICE, needs_triton

pytestmark = [pytest.mark.gpu, needs_triton]


@pytest.mark.parametrize("gpu_blocks", [True, False], ids=["gpu-class-blocks", "interpreter-class-blocks"])
@pytest.mark.parametrize(("k", "masked"), [(21, 8), (40, 32)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_uce_leading_class_block_of_minus_inf(monkeypatch, gpu_blocks, k, masked, reduction):
    from deeplab_ops.triton import upsample_ce

    if gpu_blocks and not CUDA:
        # The GPU's launch configuration (fwd_config / bwd_config: 8-class blocks), run in the interpreter.
        monkeypatch.setattr(upsample_ce, "interpreter_active", lambda: False)
    torch.manual_seed(0)
    # 8x8 -> 3x3 (align_corners=False): every bilinear weight is > 0, so -inf logits stay -inf (no 0 * inf) and
    # the reference is finite everywhere.
    logits = torch.randn(2, k, 8, 8, dtype=torch.float64, device=TRITON_DEVICE) * 3
    logits[:, :masked] = float("-inf")
    target = torch.randint(masked, k, (2, 3, 3), device=TRITON_DEVICE)
    target[0, 1, 1] = 255

    ref_in = logits.clone().requires_grad_()
    up = F.interpolate(ref_in, size=(3, 3), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, target, ignore_index=255, reduction=reduction)
    assert torch.isfinite(want).all()
    grad = torch.randn_like(want)
    (want_dx,) = torch.autograd.grad(want, ref_in, grad)

    got, lse, count = upsample_ce.forward(logits, target, 255, False, reduction)
    assert torch.isfinite(got).all(), f"loss {got}"
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-9)
    got_dx = upsample_ce.backward(grad, logits, target, lse, count, 255, False, reduction)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-9, atol=1e-9)


# ---- grid limits ---------------------------------------------------------------------------------------------
#
# CUDA caps a grid's y and z axes at 65535 programs. The wgrad kernels put their (C_in, C_out) channel blocks on
# axis 1: float64 (and float32 without TF32) keep only 16 x 16 channel blocks (fitting_configs), so a 4096 -> 4096
# convolution had 256 * 256 = 65536 of them and its launch failed on a GPU. The launchers' grids are checked here
# without launching: the launch is intercepted.

_CUDA_MAX_GRID = (2**31 - 1, 65535, 65535)


class _Launched(Exception):
    pass


def _intercept(monkeypatch, module):
    grids = []

    def launch(kernel, grid, *args, **kwargs):
        grids.append(tuple(grid))
        raise _Launched

    monkeypatch.setattr(module, "launch_kernel", launch)
    return grids


def _fp64_wgrad_config(kernel, hopper):
    from deeplab_ops.triton import conv_engine as E
    from deeplab_ops.triton.launch import config_dict

    configs = E.HOPPER_WGRAD if hopper else E.AMPERE_WGRAD
    kept = E.fitting_configs(kernel, configs, 8)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [(16, 16)]
    cfg = config_dict(kept[0])
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}


@pytest.mark.parametrize("hopper", [True, False], ids=["sm90-list", "sm80-list"])
def test_conv_wgrad_grid_within_cuda_limits(monkeypatch, hopper):
    from deeplab_ops.triton import conv_engine as E

    grids = _intercept(monkeypatch, E)
    c = 4096
    x = torch.randn(1, 1, 1, c, dtype=torch.float64, device=TRITON_DEVICE)
    y = torch.randn(1, 1, 1, c, dtype=torch.float64, device=TRITON_DEVICE)
    coef = torch.randn(4, c, dtype=torch.float64, device=TRITON_DEVICE)
    geo = E.Geometry((1, 1), (0, 0), (1, 1))
    with pytest.raises(_Launched):
        E.conv_wgrad(x, y, y, y, coef, (1, 1), geo, relu=True,
                     config=_fp64_wgrad_config(E._conv_wgrad_kernel, hopper))
    (grid,) = grids
    assert all(g <= limit for g, limit in zip(grid, _CUDA_MAX_GRID, strict=True)), grid


def test_aspp_branch_wgrad_grid_within_cuda_limits(monkeypatch):
    from deeplab_ops.triton import aspp as A

    grids = _intercept(monkeypatch, A)
    c_in, c = 4096, 4096
    xh = torch.randn(1, 1, 1, c_in, dtype=torch.float64, device=TRITON_DEVICE)
    y = torch.randn(1, 1, 1, c, dtype=torch.float64, device=TRITON_DEVICE)
    coef = torch.randn(4, c, dtype=torch.float64, device=TRITON_DEVICE)
    rates = A._rate_table((), torch.device(TRITON_DEVICE))  # the 1x1 branch alone
    with pytest.raises(_Launched):
        A.branch_wgrad(xh, y, y, coef, rates, config=_fp64_wgrad_config(A._aspp_branch_wgrad_kernel, True))
    (grid,) = grids
    assert all(g <= limit for g, limit in zip(grid, _CUDA_MAX_GRID, strict=True)), grid


def test_channel_and_class_blocks_are_at_least_the_grid_rules_minima():
    """backends' grid rule counts channel blocks of CHANNEL_BLOCK and class blocks of CLASS_BLOCK (the most blocks a
    launch can put on the grid's second axis): every configuration's blocks along that axis must be at least that
    wide, or the rule would let a too-large grid through to a GPU."""
    from deeplab_ops import backends
    from deeplab_ops.triton import aspp as A
    from deeplab_ops.triton import bn_kernels as B
    from deeplab_ops.triton import conv_engine as E
    from deeplab_ops.triton import upsample_ce as U

    narrowest = {}
    for name, spec in (*E.KERNELS.items(), *A.KERNELS.items()):  # the tuned kernels (fixed-block ones: below)
        for config in (*spec.hopper, *spec.ampere):
            narrowest[name] = min(narrowest.get(name, 1 << 30), config.kwargs["BLOCK_N"])
    assert {"fwd", "dgrad", "branch_fwd", "branch_dgrad", "project_fwd", "project_dgrad"} <= set(narrowest)
    assert min(narrowest.values()) >= backends.CHANNEL_BLOCK, narrowest
    for c in (1, 15, 16, 17, 100, 4096, 1_048_561):
        blocks = -(-c // backends.CHANNEL_BLOCK)
        assert -(-c // A.pool_bias_blocks(c)["BLOCK_O"]) <= blocks
        assert -(-c // B._block_c(c)) <= blocks  # bn_apply, bn_bwd_reduce
    for k in (1, 7, 8, 9, 21, 150, 524_281):
        for span in (1, 4, 16, 64):
            assert -(-k // U.bwd_config(k, span)[2]) <= -(-k // backends.CLASS_BLOCK)

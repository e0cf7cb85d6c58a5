"""The fused ops lay out their output as torch's convolution lays out its own (deeplab_ops.common.conv_layout):
channels_last where x or the weight is, else NCHW, on every backend, so that a model converted to channels_last and
given an NCHW input runs channels_last from its first layer on, as eager does, and a dropout after it draws eager's
mask (found by new-user audits: the cpu and triton backends returned NCHW there, the reference channels_last)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_param, device_for
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

import deeplab_ops
from deeplab_ops.nn import fuse_modules

CL = torch.channels_last
BACKENDS = ["reference", "cpu", backend_param("triton"), backend_param("cuda")]


def _layout(t):
    if t.is_contiguous(memory_format=CL) and not t.is_contiguous():
        return "channels_last"
    return "nchw" if t.is_contiguous() else "other"


def _as(t, layout):
    return t.contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("x_layout, w_layout", [("nchw", "nchw"), ("nchw", "channels_last"),
                                                ("channels_last", "nchw"), ("channels_last", "channels_last")])
def test_conv_bn_relu_lays_out_its_output_as_torchs_convolution(backend, training, kernel, x_layout, w_layout):
    torch.manual_seed(0)
    device = device_for(backend)
    x = _as(torch.randn(2, 4, 6, 7, device=device), x_layout).requires_grad_(True)
    w = _as(torch.randn(5, 4, kernel, kernel, device=device), w_layout).requires_grad_(True)
    g, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    eager_rm, eager_rv = rm.clone(), rv.clone()
    conv = F.conv2d(x, w, None, 1, kernel // 2)
    eager = torch.relu(F.batch_norm(conv, eager_rm, eager_rv, g, b, training, 0.1, 1e-5))
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=kernel // 2, training=training, backend=backend)
    assert _layout(out) == _layout(eager) == _layout(conv)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm, eager_rm)
    grad = torch.randn_like(eager)
    got = torch.autograd.grad(out, [x, w], grad)
    want = torch.autograd.grad(eager, [x, w], grad)
    for name, a, e in zip(["x", "weight"], got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)
    with torch.no_grad():  # the eval fold's path (and its cached fast path on the second call)
        for _ in range(2):
            again = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=kernel // 2, training=False,
                                             backend=backend)
            assert _layout(again) == _layout(F.conv2d(x, w, None, 1, kernel // 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_a_channels_last_model_given_an_nchw_input_draws_eagers_dropout_mask(backend, x_layout):
    # A converted model, an input of either layout: the fused chain, block and ASPP run channels_last as eager's
    # layers do, so a dropout after them draws the same mask under one seed, in training.
    torch.manual_seed(0)
    device = device_for(backend)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          ASPP(8, [2, 3], 8), nn.Dropout(0.5)).to(device)
    eager.to(memory_format=CL)
    fused = fuse_modules(copy.deepcopy(eager), backend=backend, channels_last=False)
    x = _as(torch.randn(2, 3, 9, 9, device=device), x_layout)
    for model in (eager, fused):
        model.train()
    torch.manual_seed(1)
    want = eager(x)
    torch.manual_seed(1)
    got = fused(x)
    assert _layout(got) == _layout(want) == "channels_last"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_layout, expected", [("nchw", "nchw"), ("channels_last", "channels_last"),
                                                ("branches only", "nchw")])
def test_aspp_with_channels_last_weights_returns_eagers_layout(backend, w_layout, expected):
    # torchvision's ASPP concatenates its branches with the pooling branch's NCHW map (upsampled from 1x1): the
    # projection's weight alone decides its output's layout for an NCHW x.
    torch.manual_seed(0)
    device = device_for(backend)
    eager = ASPP(8, [2, 3], 8).to(device).eval()
    fused = fuse_modules(copy.deepcopy(eager), backend=backend, channels_last=False)
    for model in (eager, fused):
        if w_layout == "channels_last":
            model.to(memory_format=CL)
        elif w_layout == "branches only":
            model.convs.to(memory_format=CL)
    x = torch.randn(2, 8, 9, 9, device=device)  # NCHW
    with torch.no_grad():
        want, got = eager(x), fused(x)
    assert _layout(got) == _layout(want) == expected
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

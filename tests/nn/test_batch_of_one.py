"""A training batch of one through a whole DeepLabV3, fused vs unfused: refused before any BatchNorm updates, or
trained where no BatchNorm needs a batch statistic (a frozen ASPP)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import model
from deeplab_ops.nn import fuse_modules


def _tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    net = model.deeplabv3_resnet(29, num_classes=3, width=4, **kw).double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_refused_batch_of_one_changes_no_running_statistics(memory_efficient):
    """Training on a batch of 1 is refused (the ASPP image-pooling BatchNorm); the refused call must leave every
    running statistic and batch counter as it was, fused and unfused alike (before: the backbone's, and unfused the
    ASPP's other branches', were updated by the failed call, and the fused and unfused models then differed)."""
    plain = _tiny(aux_loss=True)
    fused = fuse_modules(copy.deepcopy(plain), memory_efficient=memory_efficient)
    before = copy.deepcopy(plain.state_dict())
    x = torch.randn(1, 3, 33, 33, dtype=torch.float64)
    for net in (plain, fused):
        with pytest.raises(ValueError, match="batch of (at least 2|2 or more)"):
            net(x)
        for key, value in net.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_batch_of_one_trains_with_a_frozen_aspp_and_agrees():
    """The refusal is only for a training pooling BatchNorm: with the classifier's BatchNorms frozen, a batch of 1
    trains, fused and unfused computing the same outputs and statistics."""
    plain = _tiny()
    fused = fuse_modules(copy.deepcopy(plain))
    x = torch.randn(1, 3, 33, 33, dtype=torch.float64)
    outs = []
    for net in (plain, fused):
        for m in net.classifier.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        outs.append(net(x)["out"])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    ref = plain.state_dict()
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=1e-10, atol=1e-10, msg=key)

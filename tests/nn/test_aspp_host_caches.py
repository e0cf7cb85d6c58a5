"""What the fused ASPP remembers between calls (its verified BatchNorm packing and views: modules._PackMemo; the flat
structure checks of its cached parts) is refreshed by every change that makes it stale: each test fails where it
was not (the op would read the old tensors, or run a structure that no longer holds)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deeplab_ops import modules
from deeplab_ops.nn import FusedASPP


def _module(training: bool) -> FusedASPP:
    torch.manual_seed(0)
    m = FusedASPP(8, (1, 2, 3), 4, dropout=0.0, backend="cpu").train(training)
    with torch.no_grad():
        for bn in _bns(m):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return m


def _bns(m):
    return [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]


def _warm(m, x):
    for _ in range(2):
        m(x)
    assert type(m.__dict__.get(modules._PACKS_ATTR)) is modules._PackMemo


def _check_eval(m, x):
    expected = FusedASPP._unfused_forward(m, x)
    torch.testing.assert_close(m(x), expected)


def test_eval_follows_a_batchnorm_parameter_reassigned():
    m, x = _module(False), torch.randn(2, 8, 5, 5)
    _warm(m, x)
    _bns(m)[-1].weight = nn.Parameter(torch.full((4,), 3.0))
    _check_eval(m, x)


def test_eval_follows_data_given_a_new_tensor():
    m, x = _module(False), torch.randn(2, 8, 5, 5)
    _warm(m, x)
    _bns(m)[2].running_mean.data = torch.full((4,), 2.0)
    _check_eval(m, x)


def test_eval_follows_data_given_another_view_at_the_same_address():
    m, x = _module(False), torch.randn(2, 8, 5, 5)
    _warm(m, x)
    w = _bns(m)[1].weight
    ptr = w.data_ptr()
    w.data = w.data.as_strided((4,), (2,))  # same storage and address, every other element
    assert w.data_ptr() == ptr
    _check_eval(m, x)


def test_eval_follows_load_state_dict_assign_and_conversion():
    m, x = _module(False), torch.randn(2, 8, 5, 5)
    _warm(m, x)
    state = {k: v.clone() + (0.25 if k.endswith("bias") else 0) for k, v in m.state_dict().items()}
    m.load_state_dict(state, assign=True)
    _check_eval(m, x)
    m.double()
    _check_eval(m, x.double())
    m.float()
    with torch.no_grad():  # an in-place write reaches the kept views
        _bns(m)[0].bias.add_(1.0)
    _check_eval(m, x)


def test_training_counts_a_counter_replaced_after_the_memo():
    m, x = _module(True), torch.randn(2, 8, 5, 5)
    _warm(m, x)
    bns = _bns(m)
    bns[3].num_batches_tracked = torch.tensor(7)
    ref = copy.deepcopy(m)
    m(x)
    FusedASPP._unfused_forward(ref, x)
    for a, b in zip(bns, _bns(ref), strict=True):
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    assert int(bns[3].num_batches_tracked) == 8


def test_memo_not_pickled_or_deep_copied():
    m, x = _module(False), torch.randn(2, 8, 5, 5)
    _warm(m, x)
    c = copy.deepcopy(m)
    assert c.__dict__.get(modules._PACKS_ATTR) is None
    _check_eval(c, x)


@pytest.mark.parametrize("change", ["hook", "forward", "dilation", "bias", "replace"])
def test_structure_checks_follow_changes_after_the_first_call(change):
    m, x = _module(False), torch.randn(2, 8, 5, 5)
    _warm(m, x)
    seen = []
    conv = m.convs[2][0]
    if change == "hook":
        m.convs[1][1].register_forward_hook(lambda mod, i, o: seen.append(1))
    elif change == "forward":
        bn = m.convs[1][1]
        bn.forward = lambda y: seen.append(1) or nn.BatchNorm2d.forward(bn, y)
    elif change == "dilation":
        conv.dilation, conv.padding = (3, 3), (3, 3)
    elif change == "bias":
        conv.bias = nn.Parameter(torch.ones(4))
    else:
        m.convs[0][2] = nn.LeakyReLU(0.5)
    expected = FusedASPP._unfused_forward(m, x)
    seen.clear()
    torch.testing.assert_close(m(x), expected)
    if change in ("hook", "forward"):
        assert seen == [1]
    if change in ("dilation", "bias", "replace"):  # revalidated: not the cached structure
        assert modules.runnable_aspp_parts(m) is None or modules.current_aspp_parts(m)[0][2] is conv

"""BatchNorm with momentum=None (the cumulative average, factor 1 / num_batches_tracked) in fused modules: a CUDA
counter is read from the device once, then kept on the host (no host read per call: no sync), and a versioned write
from outside (load_state_dict, in-place ops) is seen at the next call; CPU counters are read every call. The tests
run the CUDA rule on CPU tensors (`remember_cpu`) and check the CPU rule on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from torch import nn
from torch.profiler import ProfilerActivity, profile

from deeplab_ops import modules
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

_SYNCS = {"aten::_local_scalar_dense"}  # what .item(), int() and float() of a tensor run


def _host_reads(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in _SYNCS)


@pytest.fixture
def remember_cpu(monkeypatch):
    monkeypatch.setattr(modules, "_REMEMBERED_DEVICES", ("cuda", "cpu"))
    yield
    modules._BATCHES.clear()  # no CPU counter stays remembered for the tests that follow


def _conv_pair():
    fused = FusedConvBNReLU(3, 5, 3, padding=1, momentum=None)
    plain = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, momentum=None), nn.ReLU())
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _step(fused, plain, x):
    out_f, out_p = fused(x), plain(x)
    out_f.sum().backward()
    return out_f, out_p


def test_conv_bn_relu_reads_the_counter_once_and_matches_eager(remember_cpu):
    torch.manual_seed(0)
    fused, plain = _conv_pair()
    x = torch.randn(2, 3, 6, 7)
    _step(fused, plain, x)  # the first call reads the counter
    for step in range(3):
        outs, xs = [], x + step
        # eager's BatchNorm reads its counter once per call (float(num_batches_tracked)); the fused one does not
        assert _host_reads(lambda o=outs, xs=xs: o.extend(_step(fused, plain, xs))) == 1, "a read besides eager's"
        assert_close(outs[0], outs[1], f"step {step} output", 1e-5, 1e-5)
    assert_close(fused[1].running_mean, plain[1].running_mean, "running_mean", 1e-6, 1e-6)
    assert_close(fused[1].running_var, plain[1].running_var, "running_var", 1e-6, 1e-6)
    assert int(fused[1].num_batches_tracked) == int(plain[1].num_batches_tracked) == 4


def test_fused_call_alone_makes_no_host_read(remember_cpu):
    fused, _ = _conv_pair()
    x = torch.randn(2, 3, 6, 7)
    fused(x)
    assert _host_reads(lambda: fused(x)) == 0
    assert int(fused[1].num_batches_tracked) == 2


@pytest.mark.parametrize("how", ["load_state_dict", "in place"])
def test_outside_write_to_the_counter_is_seen(how, remember_cpu):
    torch.manual_seed(1)
    fused, plain = _conv_pair()
    x = torch.randn(2, 3, 6, 7)
    _step(fused, plain, x)
    _step(fused, plain, x)
    if how == "load_state_dict":
        state = plain.state_dict()
        state["1.num_batches_tracked"] = torch.tensor(40)
        plain.load_state_dict(state)
        fused.load_state_dict(state)
    else:
        for bn in (fused[1], plain[1]):
            bn.num_batches_tracked.add_(10)
    _step(fused, plain, x * 2)
    assert_close(fused[1].running_mean, plain[1].running_mean, f"running_mean after {how}", 1e-6, 1e-6)
    assert_close(fused[1].running_var, plain[1].running_var, f"running_var after {how}", 1e-6, 1e-6)
    assert int(fused[1].num_batches_tracked) == int(plain[1].num_batches_tracked)


def test_fused_aspp_reads_its_counters_once(remember_cpu):
    torch.manual_seed(2)
    aspp = FusedASPP(6, (2, 3), out_channels=4)
    for m in aspp.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    x = torch.randn(2, 6, 7, 7)
    aspp(x).sum().backward()  # first call: reads and packs
    aspp(x).sum().backward()
    assert _host_reads(lambda: aspp(x).sum().backward()) == 0
    counts = {int(m.num_batches_tracked) for m in aspp.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {3}
    # A write to one BatchNorm's counter (its storage is shared with the others') is seen: the modules then
    # disagree, and the fused ASPP runs its children one by one (each its own factor) instead of a stale factor.
    next(m for m in aspp.modules() if isinstance(m, nn.BatchNorm2d)).num_batches_tracked.add_(1)
    ref = copy.deepcopy(aspp)
    torch.manual_seed(5)
    out = aspp(x)
    torch.manual_seed(5)
    assert_close(out, FusedASPP._unfused_forward(ref, x), "counters that differ: the children", 1e-5, 1e-5)
    for a, b in zip(aspp.modules(), ref.modules(), strict=True):
        if isinstance(a, nn.BatchNorm2d):
            assert_close(a.running_var, b.running_var, "running_var", 1e-6, 1e-6)
            assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


def test_cpu_counters_are_read_every_call_even_written_through_data():
    torch.manual_seed(3)
    fused, plain = _conv_pair()
    x = torch.randn(2, 3, 6, 7)
    _step(fused, plain, x)
    assert _host_reads(lambda: fused(x)) == 1
    for bn in (fused[1], plain[1]):
        bn.num_batches_tracked.data.fill_(7)  # unversioned: only a fresh read sees it
    _step(fused, plain, x * 2)
    assert_close(fused[1].running_mean, plain[1].running_mean, "running_mean", 1e-6, 1e-6)
    assert_close(fused[1].running_var, plain[1].running_var, "running_var", 1e-6, 1e-6)


def test_a_count_recorded_in_a_graph_capture_is_never_kept_on_the_host(remember_cpu, monkeypatch):
    """A module whose counter the host knows (momentum=None before), later captured in a CUDA graph with a momentum:
    the capture records the counter's add without running it, and replays run it with no Python call and no version
    bump, so a value kept on the host would go stale, at the capture and after every later replay. Such a counter
    is never kept again: each momentum=None call reads the device (the capture stood in for by
    `modules._capturing`; tests/nn/test_cuda_graphs.py runs real graphs on a GPU)."""
    fused, plain = _conv_pair()
    x = torch.randn(2, 3, 6, 7)
    _step(fused, plain, x)
    counter = fused[1].num_batches_tracked
    assert modules._known_batches(counter) == 1
    fused[1].momentum = plain[1].momentum = 0.1
    monkeypatch.setattr(modules, "_capturing", lambda t: True)
    _step(fused, plain, x)
    monkeypatch.setattr(modules, "_capturing", lambda t: False)
    assert modules._known_batches(counter) is None
    fused[1].momentum = plain[1].momentum = None
    for replays in (5, 3):
        with torch.no_grad():
            counter.data.add_(replays)  # as replays would: no version bump on the tensor itself
            plain[1].num_batches_tracked.add_(replays)
        out_f, out_p = _step(fused, plain, x * 3)
        assert_close(out_f, out_p, "output", 1e-5, 1e-5)
        assert_close(fused[1].running_mean, plain[1].running_mean, "running_mean", 1e-6, 1e-6)
        assert modules._known_batches(counter) is None  # read from the device, not kept
    assert int(counter) == int(plain[1].num_batches_tracked) == 12


def test_packed_aspp_counters_recorded_in_a_capture_are_never_kept(remember_cpu, monkeypatch):
    torch.manual_seed(4)
    aspp = FusedASPP(6, (2, 3), out_channels=4)
    bns = [m for m in aspp.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
    x = torch.randn(2, 6, 7, 7)
    aspp(x)
    aspp(x)  # packed, counters known
    assert all(modules._known_batches(m.num_batches_tracked) == 2 for m in bns)
    for m in bns:
        m.momentum = 0.1
    pack = modules._pack
    monkeypatch.setattr(modules, "_capturing", lambda t: True)
    monkeypatch.setattr(modules, "_pack", lambda kinds: None)  # inside a capture nothing is packed
    aspp(x)
    monkeypatch.setattr(modules, "_capturing", lambda t: False)
    monkeypatch.setattr(modules, "_pack", pack)
    assert all(modules._known_batches(m.num_batches_tracked) is None for m in bns)
    assert all(id(m.num_batches_tracked) in modules._CAPTURED for m in bns)

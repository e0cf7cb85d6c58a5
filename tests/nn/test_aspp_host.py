"""The fused ASPP module's steady-state host path: a bounded number of deeplab_ops Python frames per forward (the
structure validated once, BatchNorm tensors read from the module dicts and checked back to back with C-level maps,
no nn.Module.__getattr__), and the BatchNorm tensors still packed and aliased (no cat of them per call)."""

from __future__ import annotations

import pytest
import torch
from helpers import package_frames, python_calls
from torch import nn

from deeplab_ops.nn import FusedASPP, fuse_modules

# deeplab_ops frames per steady-state fused ASPP forward on the cpu backend (measured: FusedASPP 55 in training and
# eval, a fused torchvision ASPP 58, with four BatchNorm lists aliased; 79 / 82 before the packing was remembered
# per module and the structure and argument checks became C-level maps; 313 before the per-call path was trimmed).
_FRAMES = 58


@pytest.mark.parametrize("kind", ["FusedASPP", "fuse_modules"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_steady_state_fused_aspp_python_work(training, kind):
    torch.manual_seed(0)
    if kind == "FusedASPP":
        module = FusedASPP(8, (1, 2, 3), 4, dropout=0.0, backend="cpu").train(training)
    else:
        from torchvision.models.segmentation.deeplabv3 import ASPP

        module = fuse_modules(ASPP(8, (1, 2, 3), 4), backend="cpu").train(training)
        module.project[3].p = 0.0
    x = torch.randn(2, 8, 5, 5)
    for _ in range(2):
        module(x)
    calls = python_calls(lambda: module(x))
    getattr_calls = sum(n for (file, name), n in calls.items() if name == "__getattr__" and "torch/nn" in file)
    assert getattr_calls == 0, sorted(k for k in calls if k[1] == "__getattr__")
    # No walk of the submodules per call (~2 us per submodule): the cached structure lists them for the hook check.
    walks = {k: n for k, n in calls.items() if k[1] in ("modules", "named_modules", "children", "named_children")}
    assert not walks, walks
    assert package_frames(calls) <= _FRAMES, sorted(calls.items())
    # Still packed: each kind of BatchNorm tensor back to back in one storage, so the op takes views (no cat).
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        ptrs = [getattr(bn, attr).data_ptr() for bn in bns]
        step = getattr(bns[0], attr).numel() * getattr(bns[0], attr).element_size()
        assert ptrs == [ptrs[0] + i * step for i in range(len(bns))], attr
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x)
    assert not [e.name for e in prof.events() if e.name == "aten::stack"], "BatchNorm tensors re-packed per call"


def test_packed_batchnorm_lists_are_checked_as_four_views_and_overlaps_still_refused(monkeypatch):
    """The running-statistics overlap check over the ASPP's per-BatchNorm tensors (4 kinds x 6 BatchNorms) cost
    ~60 us per training call on this CPU; packed lists are one contiguous view per kind, so the fused module checks
    those four views (the full check runs only where they overlap). A running statistic sharing memory with a
    BatchNorm weight is still refused, by the full check's message."""
    from deeplab_ops import common

    torch.manual_seed(0)
    module = FusedASPP(8, (1, 2, 3), 4, dropout=0.0, backend="cpu").train()
    x = torch.randn(2, 8, 5, 5)
    module(x)  # packs
    full = []
    real = common._check_spans  # the general test, per tensor
    monkeypatch.setattr(common, "_check_spans", lambda *a, **k: full.append(1) or real(*a, **k))
    ref = FusedASPP(8, (1, 2, 3), 4, dropout=0.0, backend="reference").train()
    ref.load_state_dict(module.state_dict())
    torch.testing.assert_close(module(x), ref(x))
    assert not full, "the packed lists' check fell back to the full one"
    for a, b in zip(module.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:  # every running_var a view of its weight: packed like the weights, overlapping them
            bn.running_var = bn.weight.detach()
    with pytest.raises(ValueError, match=r"running_vars\[0\] and bn_weights\[0\] share memory|bn_weights\[0\] and "
                                         r"running_vars\[0\] share memory"):
        module(x)
    assert full

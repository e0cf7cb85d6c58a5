"""PyTorch's swap-on-conversion mode (torch.__future__.set_swap_module_params_on_conversion(True)): load_state_dict,
.to() and the dtype conversions swap every parameter with torch.utils.swap_tensors, which refuses a tensor that
something holds a weak reference to. What this package caches about a fused model's tensors (folded BatchNorms,
the cpu backend's kept Winograd transforms, CUDA batch counts) once held such references: one eval forward made every
later load fail half way through, and after the fused modules dropped them before each load or conversion, a child
converted or loaded on its own still failed. The caches now watch the tensors' storages instead."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import deeplab_ops.modules
import model
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, fuse_modules


@pytest.fixture
def swap_mode():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


def _deeplab(fused):
    torch.manual_seed(0)
    return model.deeplabv3_resnet(29, num_classes=3, width=4, fused=fused)


def _resnet(fused):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    return fuse_modules(net) if fused else net


def _modules(fused):
    torch.manual_seed(0)
    if fused:
        return torch.nn.Sequential(FusedConvBNReLU(3, 8, 3, padding=1), FusedASPP(8, (1, 2), out_channels=4))
    from torchvision.models.segmentation.deeplabv3 import ASPP
    return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                                   torch.nn.BatchNorm2d(8), torch.nn.ReLU()),
                               ASPP(8, (1, 2), out_channels=4))


def _out(net, x):
    y = net(x)
    return y["out"] if isinstance(y, dict) else y


def _perturbed(net):
    """A state_dict unlike the model's (every float tensor moved), as a checkpoint would be."""
    g = torch.Generator().manual_seed(1)
    return {k: (v + 0.1 * torch.rand(v.shape, generator=g, dtype=v.dtype)) if v.is_floating_point() else v + 3
            for k, v in net.state_dict().items()}


@pytest.mark.usefixtures("swap_mode")
@pytest.mark.parametrize("build", [_deeplab, _resnet, _modules], ids=["model", "fuse_modules", "nn-modules"])
def test_a_fused_model_loads_and_converts_after_eval_and_training_calls(build, monkeypatch):
    # batch counts are remembered on CUDA only: remembered here too, so that their weak references are exercised
    monkeypatch.setattr(deeplab_ops.modules, "_REMEMBERED_DEVICES", ("cuda", "cpu"))
    fused, plain = build(True), build(False)
    x = torch.randn(2, 3, 33, 33)
    fused.train()
    _out(fused, x).sum().backward()  # a training call: batch counts remembered
    fused.eval()
    with torch.no_grad():
        fused(x)  # an eval call: folds and Winograd transforms kept
    sd = _perturbed(plain)
    fused.load_state_dict(sd)
    plain.load_state_dict(sd)
    fused.eval(), plain.eval()
    with torch.no_grad():
        # the checkpoint's values are used
        torch.testing.assert_close(_out(fused, x), _out(plain, x), rtol=1e-4, atol=1e-4)
        fused.double(), plain.double()
        torch.testing.assert_close(_out(fused, x.double()), _out(plain, x.double()), rtol=1e-10, atol=1e-10)
        fused.float()
        fused(x)
    fused.train()
    _out(fused, x).sum().backward()
    again = copy.deepcopy(fused)
    again.load_state_dict(_perturbed(plain.float()))
    if build is _deeplab:
        model.load_checkpoint(fused, sd)
        assert all(torch.equal(fused.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("how", ["child double", "child BatchNorms via apply", "child load_state_dict",
                                 "parametrization"])
def test_a_built_fused_aspps_batchnorms_swap_when_reached_directly(swap_mode, how):
    # The fused ASPP packs its BatchNorm tensors where it is built; its record of its own packs once held a weak
    # reference to each tensor, which swap_tensors refuses: a child BatchNorm converted or loaded directly (not through
    # the fused module, which dropped them first) failed, from the module's construction on. The record now holds the
    # storages, weakly, not the tensors.
    import torch.nn.utils.parametrize as parametrize

    class Positive(torch.nn.Module):
        def forward(self, w):
            return w.abs()

        def right_inverse(self, w):
            return w

    module = FusedASPP(4, (1, 2), 4)
    bn = module.project[1]
    {"child double": lambda: bn.double(),
     "child BatchNorms via apply": lambda: module.apply(
         lambda c: c.double() if isinstance(c, torch.nn.BatchNorm2d) else None),
     "child load_state_dict": lambda: bn.load_state_dict(torch.nn.BatchNorm2d(4).state_dict()),
     "parametrization": lambda: parametrize.register_parametrization(bn, "weight", Positive())}[how]()
    assert bn.weight.dtype == (torch.float64 if "double" in how or "apply" in how else torch.float32)


def _children_to_reach(kind):
    """A fused module whose BatchNorms average cumulatively (momentum=None, so their batch counts are remembered),
    and the children a user may convert or load on their own: convs (the ASPP's dilated 3x3 branches, whose cpu
    Winograd transforms an eval call keeps) and BatchNorms."""
    torch.manual_seed(0)
    if kind == "conv_bn_relu":
        module = FusedConvBNReLU(3, 8, 3, padding=1, backend="cpu")
        names = ["0", "1"]
    else:
        module = FusedASPP(3, (1, 2), out_channels=4, dropout=0.0, backend="cpu")
        names = ["convs.1.0", "convs.2.0", "convs.0.1", "convs.1.1", "project.0", "project.1"]
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    return module, names


def _reference(module, x):
    return type(module)._unfused_forward(module, x, None) if isinstance(module, FusedConvBNReLU) else \
        FusedASPP._unfused_forward(module, x)


class _Halved(torch.nn.Module):
    def forward(self, w):
        return w * 0.5


@pytest.mark.parametrize("kind", ["conv_bn_relu", "aspp"])
@pytest.mark.parametrize("how", ["double and back", "load_state_dict", "parametrization"])
def test_a_fused_modules_children_convert_and_load_on_their_own_after_its_calls(swap_mode, monkeypatch, kind, how):
    # What the package caches about a fused module's tensors (the eval fold, kept Winograd transforms of the ASPP's
    # branch weights, remembered batch counts) once held a weak reference to each tensor (a Python finalizer, a C++
    # weak pointer to its TensorImpl), which torch.utils.swap_tensors refuses: after one training and one eval call,
    # a child converted, loaded or parametrized on its own (not through the fused module, which drops them first) failed
    # ("_apply(): Couldn't swap Conv2d.weight"). The caches now watch the tensors' storages; the swapped tensors'
    # new values are what the next calls compute with.
    monkeypatch.setattr(deeplab_ops.modules, "_REMEMBERED_DEVICES", ("cuda", "cpu"))
    module, names = _children_to_reach(kind)
    x = torch.randn(2, 3, 17, 17)
    module.train()
    module(x).sum().backward()
    module.eval()
    with torch.no_grad():
        module(x), module(x)  # folds, kept transforms
    g = torch.Generator().manual_seed(2)
    for name in names:
        child = module.get_submodule(name)
        if how == "double and back":
            child.double()
            assert all(p.dtype == torch.float64 for p in child.parameters())
            child.float()
        elif how == "load_state_dict":
            child.load_state_dict({k: v + torch.rand(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point()
                                   else v + 1 for k, v in child.state_dict().items()})
        else:  # (swaps the weight for its parametrization's original, in this mode)
            torch.nn.utils.parametrize.register_parametrization(child, "weight", _Halved())
        module.eval()
        with torch.no_grad():
            torch.testing.assert_close(module(x), _reference(module, x), rtol=1e-4, atol=1e-4)
        module.train()
        torch.testing.assert_close(module(x), _reference(copy.deepcopy(module), x), rtol=1e-4, atol=1e-4)


def test_a_derived_value_that_views_its_source_is_not_kept():
    # A kept derivative that is a view of its source (the triton packing of a one-output-channel 1x1 weight is the
    # weight's own memory) would keep alive the storage whose freeing evicts it: it is rebuilt per call instead.
    from deeplab_ops import common

    w = torch.randn(1, 4, 1, 1)
    before = common.derived_cache_info()["entries"]
    view = common.derived(("test-view",), (w,), lambda t=w: t.detach().permute(2, 3, 1, 0).contiguous())
    assert view.data_ptr() == w.data_ptr()
    assert common.derived_cache_info()["entries"] == before
    copied = common.derived(("test-copy",), (w,), lambda t=w: t.detach() * 2)
    assert common.derived_cache_info()["entries"] == before + 1
    assert common.derived(("test-copy",), (w,), lambda t=w: t.detach() * 3) is copied
    with torch.no_grad():
        w.add_(1)  # a miss; the value built now is a view: returned uncached, and the stale entry goes too
    assert common.derived(("test-copy",), (w,), lambda t=w: t.detach()).data_ptr() == w.data_ptr()
    assert common.derived_cache_info()["entries"] == before
    del copied
    assert common.derived(("test-copy",), (w,), lambda t=w: t.detach() * 2) is not None  # stored again
    del w, view
    assert common.derived_cache_info()["entries"] == before  # its storage freed: evicted

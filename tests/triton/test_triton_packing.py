"""The packed-weight cache: hits while a parameter is unchanged, refreshes after an in-place update (optimizer
step, load_state_dict), never keeps a freed parameter alive."""

from __future__ import annotations

import gc
import weakref

import torch
from helpers import TRITON_DEVICE

from deeplab_ops.common import derived_cache_info
from deeplab_ops.triton import packing

DEVICE = TRITON_DEVICE  # the packed tensors live where the triton backend runs (no kernel is launched here)


def test_hits_refreshes_and_forgets():
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, device=DEVICE))
    before = derived_cache_info()
    first = packing.conv_weight(w)
    assert torch.equal(first, w.detach().permute(2, 3, 1, 0))
    assert packing.conv_weight(w) is first  # unchanged: no re-pack
    info = derived_cache_info()
    assert info["hits"] == before["hits"] + 1 and info["misses"] == before["misses"] + 1

    opt = torch.optim.SGD([w], lr=0.1)
    w.grad = torch.randn_like(w)
    opt.step()  # in place: bumps w._version
    second = packing.conv_weight(w)
    assert second is not first and torch.equal(second, w.detach().permute(2, 3, 1, 0))

    with torch.no_grad():
        w.copy_(torch.randn_like(w))  # what load_state_dict does
    assert torch.equal(packing.conv_weight(w), w.detach().permute(2, 3, 1, 0))

    gc.collect()  # other tests' garbage: its entries go now, not below
    entries = derived_cache_info()["entries"]
    ref = weakref.ref(w)
    del w, opt
    gc.collect()
    assert ref() is None, "the cache kept the parameter alive"
    assert derived_cache_info()["entries"] == entries - 1


def test_inference_and_float64_tensors_are_packed_every_call():
    with torch.inference_mode():
        w = torch.randn(4, 3, 1, 1, device=DEVICE)
        a, b = packing.conv_weight(w), packing.conv_weight(w)
    assert a is not b and torch.equal(a, b)
    # float64: gradcheck perturbs inputs through .data, which leaves _version unchanged
    w64 = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    first = packing.conv_weight(w64)
    w64.data[0, 0, 0, 0] += 1.0
    assert torch.equal(packing.conv_weight(w64), w64.detach().permute(2, 3, 1, 0)) and not torch.equal(
        first, packing.conv_weight(w64))


def test_eval_fold_refreshes_with_the_parameters():
    """conv_bn_relu's eval fold (BatchNorm into the conv's weight and bias) is cached in the same cache: it follows
    optimizer steps, load_state_dict and running-statistics updates, and clear_derived() after `.data` writes."""
    import deeplab_ops
    from deeplab_ops.common import clear_derived

    module = deeplab_ops.nn.FusedConvBNReLU(3, 4, 3, padding=1, backend="cpu")
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                                    torch.nn.ReLU())
    x = torch.randn(2, 3, 6, 6)

    def check(what):
        reference.load_state_dict(module.state_dict())
        module.eval(), reference.eval()
        with torch.no_grad():
            expected = reference(x)
            # folding reorders float32 rounding: errors scale with the pre-activation's magnitude (hundreds after
            # the steps below), not with each output's
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=2e-6 * expected.abs().max().item(),
                                       msg=what)

    module.train()
    module(x)  # running statistics move
    check("after a training step")
    check("cached")
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    module.train()
    module(x).sum().backward()
    opt.step()
    check("after an optimizer step")
    state = {k: v + 0.25 if v.is_floating_point() else v for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    check("after load_state_dict")
    module[1].weight.data.mul_(2.0)  # invisible to the version counter: clear_derived() says so
    clear_derived()
    check("after a .data write and clear_derived()")

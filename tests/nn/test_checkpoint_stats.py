"""torch.utils.checkpoint around fused modules: the same outputs, gradients and BatchNorm state as around eager ones.

Under checkpointing eager BatchNorms update their running statistics and num_batches_tracked twice per step (the
forward and its recomputation). With use_reentrant=False and the default early stop, the recomputation stops inside
the packing of the region's last saved tensor; eager's last BatchNorm has updated everything by then (its op writes
the statistics before autograd saves anything). The fused ops used to write them after the op returned, so the
region's last fused layer was updated once where eager counts two.
"""

import copy

import pytest
import torch
from helpers import TRITON_MARKS, device_for
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from deeplab_ops.nn import fuse_modules
from model.aspp import ASPP
from model.resnet import Bottleneck


def _layers(momentum):
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, momentum=momentum), nn.ReLU(),
        nn.Conv2d(5, 4, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
    ), 3


def _block(momentum):
    block = Bottleneck(4, 2)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return block, 4


def _aspp(momentum):
    module = ASPP(4, (1, 2), 3)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return module, 4


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def _case(backend, kind, momentum, mode):
    return pytest.param(backend, kind, momentum, mode, marks=TRITON_MARKS if backend == "triton" else (),
                        id=f"{backend}-{kind}-{momentum}-{mode}")


# every combination on cpu; triton (the interpreter on a CPU machine: slow) where the early stop bites
_CASES = [_case(backend, kind, momentum, mode)
          for backend in ("cpu", "triton") for kind in ("layers", "block", "aspp") for momentum in (0.1, None)
          for mode in ("early_stop", "no_early_stop", "reentrant")
          if backend == "cpu" or (momentum == 0.1 and mode == "early_stop")]


@pytest.mark.parametrize(("backend", "kind", "momentum", "mode"), _CASES)
def test_checkpointed_fused_modules_match_eager_state(backend, kind, momentum, mode):
    device = device_for(backend)
    torch.manual_seed(0)
    eager, cin = {"layers": _layers, "block": _block, "aspp": _aspp}[kind](momentum)
    eager = eager.to(device).double()
    fused = fuse_modules(copy.deepcopy(eager), backend=backend)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64, device=device)

    def step(module):
        xi = x.clone().requires_grad_()
        for _ in range(2):  # the second step reads the first one's running statistics (momentum=None: its count)
            module.zero_grad()
            if mode == "reentrant":
                out = checkpoint(module, xi, use_reentrant=True)
            else:
                with set_checkpoint_early_stop(mode == "early_stop"):
                    out = checkpoint(module, xi, use_reentrant=False)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}

    want_out, want_gx, want_grads = step(eager)
    got_out, got_gx, got_grads = step(fused)
    torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(got_gx, want_gx)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)
    want, got = _state(eager), _state(fused)
    assert want.keys() == got.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=name)
    # eager counts every batch twice under checkpointing: the recomputation ran every BatchNorm again
    assert all(int(v) == 4 for k, v in want.items() if k.endswith("num_batches_tracked"))

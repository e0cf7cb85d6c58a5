"""Fused models under nn.DataParallel compute what the unfused model computes there.

Each nn.DataParallel forward replicates the model (torch.nn.parallel.replicate: shallow copies of every module whose
parameters are broadcast to the replica's device), runs the replicas on their shares of the batch, and the gradients
reduce into the original parameters; the original module's running statistics are replica 0's. A fused conv's
absorbed BatchNorm and an ASPP's cached structure are plain attributes, copied into every replica as they are: they
named the original modules, so the replicas normalized with the original parameters (on another GPU: a device
mismatch) and every replica updated the original running statistics (twice per step with two replicas).

nn.DataParallel needs CUDA devices; here the replication runs on the CPU with the broadcast replaced by copies (what
it computes: per-replica, differentiable copies of the parameters, the buffers shared with replica 0), and the
replicas run one after the other: the same modules, the same autograd graph as on two GPUs.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from helpers import MixedFusedNet

from deeplab_ops.nn import fuse_modules

_replicate = importlib.import_module("torch.nn.parallel.replicate")


def _copies(tensors, devices, detach=False):
    """torch.nn.parallel.replicate's broadcast, on the CPU: replica 0 keeps the buffers; parameters are copied
    differentiably for every replica (their gradients sum into the originals, as the broadcast's backward does)."""
    out = []
    for j in range(len(devices)):
        if j == 0 and not any(t.requires_grad for t in tensors):
            out.append(list(tensors))
        else:
            out.append([t.clone() if t.requires_grad and not detach else t.detach().clone() for t in tensors])
    return out


@pytest.fixture
def cpu_replicate(monkeypatch):
    monkeypatch.setattr(_replicate, "_broadcast_coalesced_reshape", _copies)
    monkeypatch.setattr(_replicate, "_get_device_index", lambda device, optional=False: 0)
    return _replicate.replicate


def _data_parallel_step(replicate, model, x, grad):
    replicas = replicate(model, [0, 1])
    out = torch.cat([r(share) for r, share in zip(replicas, x.chunk(2), strict=True)])
    out.backward(grad)
    return out.detach()


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_fused_replicas_compute_what_unfused_replicas_compute(cpu_replicate, memory_efficient):
    torch.manual_seed(3)
    plain = MixedFusedNet().double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.rand_like(p) * 0.3)
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu", memory_efficient=memory_efficient)
    x = torch.randn(4, 3, 7, 6, dtype=torch.float64)
    plain(x), fused(x)  # a call on the original first: the fused ASPP caches its structure on it
    for _ in range(2):
        grad = torch.randn(4, 4, 7, 6, dtype=torch.float64)
        want = _data_parallel_step(cpu_replicate, plain, x, grad)
        got = _data_parallel_step(cpu_replicate, fused, x, grad)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-10, rtol=1e-10, msg=f"grad {name}")
    for (name, b), c in zip(plain.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(c, b, atol=1e-10, rtol=1e-10, msg=f"buffer {name}")
    x1 = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x1), plain(x1), atol=1e-10, rtol=1e-10)  # the original still runs fused

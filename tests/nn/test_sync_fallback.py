"""Parts of a synchronized fused model that run on their own share their BatchNorm statistics too.

After `sync_batchnorm`, a fused module whose part is hooked (or replaced after fusing) runs that part unfused: its
BatchNorms must still compute their training statistics across the process group, as the fused op does. Two gloo
processes on CPU, each with an uneven share of the batch (one image, or none: nn.SyncBatchNorm allows both on a
process), match one process with the whole batch: output, input and parameter gradients (after DDP-style summing),
running statistics and batch counters.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import MixedFusedNet, run_two_processes

import deeplab_ops
from deeplab_ops.nn import fuse_modules

# The batch of 5 split over the two processes: uneven (the group's count is the sum of different local counts); one
# image on a process (the pooling branches' BatchNorms hold one value per channel there); none on a process (it takes
# part in every collective with nothing: a hang or an error before).
SHARES = {"uneven": (slice(0, 2), slice(2, 5)), "one-image": (slice(0, 4), slice(4, 5)),
          "empty": (slice(0, 5), slice(5, 5))}
HOOKED = ("stem.0", "block.conv1", "aspp.convs.1.0", "fused_head.0", "fused_aspp.convs.0.0", "momentum_none.0")


def _setup(hooked: tuple[str, ...]):
    torch.manual_seed(7)
    net = MixedFusedNet().double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.dim() == 1 else torch.randn_like(p) * 0.4)
            if name.endswith("bias"):
                p.sub_(0.8)
    fuse_modules(net)
    seen = []
    for name in hooked:
        net.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 3, 6, 7, generator=g, dtype=torch.float64)
    grad = torch.randn(5, 4, 6, 7, generator=g, dtype=torch.float64)
    return net, x, grad, seen


def _step(net, x, grad):
    x = x.clone().requires_grad_()
    for _ in range(2):  # two steps: running statistics, batch counters and momentum=None's factor move
        net.zero_grad()
        out = net(x)
        out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in net.named_parameters()}, dict(net.named_buffers())


def _worker(rank: int, port: int, hooked: tuple, shares: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net, x, grad, seen = _setup(hooked)
        deeplab_ops.nn.sync_batchnorm(net)
        share = {**SHARES, "all-empty": (slice(0, 0), slice(5, 5))}[shares][rank]
        out, gx, grads, buffers = _step(net, x[share], grad[share])
        for g in grads.values():  # what DDP does (summed: each process's loss is its share of the global one)
            dist.all_reduce(g)
        # numpy arrays travel by value: torch tensors would be shared memory that dies with this process.
        queue.put((rank, out.numpy(), gx.numpy(), {n: g.numpy() for n, g in grads.items()},
                   {n: b.numpy() for n, b in buffers.items()}, len(seen)))
    except Exception as exc:  # the test fails with this process's error, not with a queue timeout
        queue.put((rank, f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shares", list(SHARES))
@pytest.mark.parametrize("hooked", [HOOKED, ()], ids=["hooked-parts", "no-hooks"])
def test_synchronized_parts_match_one_process_with_the_global_batch(hooked, shares):
    results = run_two_processes(_worker, hooked, shares)
    net, x, grad, seen = _setup(hooked)
    out, gx, grads, buffers = _step(net, x, grad)
    tol = dict(atol=1e-10, rtol=1e-10)
    t = torch.from_numpy
    assert results[0][4] == results[1][4] == len(seen) == 2 * len(hooked)  # every hook ran, each step
    torch.testing.assert_close(torch.cat([t(results[0][0]), t(results[1][0])]), out, **tol, msg="output")
    torch.testing.assert_close(torch.cat([t(results[0][1]), t(results[1][1])]), gx, **tol, msg="grad x")
    for r in (0, 1):
        for name, g in grads.items():
            torch.testing.assert_close(t(results[r][2][name]), g, **tol, msg=f"grad {name}, rank {r}")
        for name, b in buffers.items():
            torch.testing.assert_close(t(results[r][3][name]), b, **tol, msg=f"buffer {name}, rank {r}")


@pytest.mark.parametrize("hooked", [HOOKED, ()], ids=["hooked-parts", "no-hooks"])
def test_every_process_empty_leaves_the_running_statistics(hooked):
    # Nothing in the whole group: the hooked parts' synchronized BatchNorm divided by a count of 0 and wrote NaN into
    # both running statistics (the fused op's C++ finalize wrote running_mean * (1 - momentum) and a NaN variance).
    # Both now leave them as they are; the batch counters count the steps, as nn.SyncBatchNorm's do.
    results = run_two_processes(_worker, hooked, "all-empty")
    net, _, _, _ = _setup(hooked)
    before = dict(net.named_buffers())
    t = torch.from_numpy
    for r in (0, 1):
        assert results[r][0].shape == (0, 4, 6, 7)
        for name, g in results[r][2].items():
            assert not t(g).any(), f"grad {name}, rank {r}"
        for name, b in before.items():
            want = b + 2 if name.endswith("num_batches_tracked") else b
            torch.testing.assert_close(t(results[r][3][name]), want, atol=0, rtol=0, msg=f"buffer {name}, rank {r}")

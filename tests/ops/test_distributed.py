"""BatchNorm synchronized across processes in the fused op: 2 gloo processes on CPU, each with a share of a batch
(half, one image, or none: nn.SyncBatchNorm allows a process an empty batch), match one process with the whole batch
(output, every gradient after DDP-style averaging, running stats)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
from helpers import run_two_processes

import deeplab_ops


@contextlib.contextmanager
def _gloo_pair(rank: int, port: int, queue):
    """A worker's gloo process group of 2 for its body; an error in it goes on the queue (the test fails with this
    process's error, not with a queue timeout) and is raised; the group is destroyed however the body ends."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        yield
    except Exception as exc:
        queue.put((rank, f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        dist.destroy_process_group()


def _inputs():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(4, 3, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    gamma = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(5, generator=g, dtype=torch.float64)
    res = torch.randn(4, 5, 7, 6, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 5, 7, 6, generator=g, dtype=torch.float64)
    return x, w, gamma, beta, res, grad


def _step(x, w, gamma, beta, res, grad, rm, rv, group):
    leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta, res)]
    out = deeplab_ops.conv_bn_relu(leaves[0], leaves[1], leaves[2], leaves[3], rm, rv, padding=1, residual=leaves[4],
                                   backend="cpu", process_group=group)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


# Images of the batch of 4 on rank 0 (rank 1 has the rest): half each; one image on rank 1 (one value per channel
# in the ASPP's pooling branch there); none on rank 1 (it takes part in the collectives with nothing).
SPLITS = {"half": 2, "one-image": 3, "empty": 4}


def _worker(rank: int, port: int, split: int, queue) -> None:
    with _gloo_pair(rank, port, queue):
        x, w, gamma, beta, res, grad = _inputs()
        half = slice(0, split) if rank == 0 else slice(split, 4)
        rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
        # The loss of a process is its share of the global loss: scale its output gradient so that the sum
        # over processes (what DDP's averaging times the world size gives) equals the global gradient.
        out, grads = _step(x[half], w, gamma, beta, res[half], grad[half], rm, rv, dist.group.WORLD)
        for g in grads[1:4]:  # parameters: DDP all-reduces them
            dist.all_reduce(g)
        # numpy arrays travel by value: torch tensors would be shared memory that dies with this process.
        queue.put((rank, out.numpy(), [g.numpy() for g in grads], rm.numpy(), rv.numpy()))


@pytest.mark.parametrize("split", list(SPLITS))
def test_two_processes_match_one_process_with_the_global_batch(split):
    results = {r: (torch.from_numpy(out_r), [torch.from_numpy(g) for g in grads_r], torch.from_numpy(rm_r),
                   torch.from_numpy(rv_r))
               for r, (out_r, grads_r, rm_r, rv_r) in run_two_processes(_worker, SPLITS[split]).items()}
    x, w, gamma, beta, res, grad = _inputs()
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    out, grads = _step(x, w, gamma, beta, res, grad, rm, rv, None)
    tol = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out, **tol)
    torch.testing.assert_close(torch.cat([results[0][1][0], results[1][1][0]]), grads[0], **tol)  # grad x
    torch.testing.assert_close(torch.cat([results[0][1][4], results[1][1][4]]), grads[4], **tol)  # grad residual
    for i, name in ((1, "weight"), (2, "bn_weight"), (3, "bn_bias")):
        for r in (0, 1):
            torch.testing.assert_close(results[r][1][i], grads[i], **tol, msg=f"grad {name} on rank {r}")
    for r in (0, 1):
        torch.testing.assert_close(results[r][2], rm, **tol)
        torch.testing.assert_close(results[r][3], rv, **tol)


def _aspp_worker(rank: int, port: int, split: int, queue) -> None:
    with _gloo_pair(rank, port, queue):
        module, x, grad = _aspp_inputs()
        deeplab_ops.nn.sync_batchnorm(module)
        half = slice(0, split) if rank == 0 else slice(split, 4)
        xr = x[half].clone().requires_grad_()
        out = module(xr)
        out.backward(grad[half])
        grads = [p.grad for p in module.parameters()]
        for g in grads:
            dist.all_reduce(g)
        queue.put((rank, out.detach().numpy(), xr.grad.numpy(), [g.numpy() for g in grads],
                   [b.numpy() for b in module.buffers()]))


def _aspp_inputs():
    torch.manual_seed(99)
    module = deeplab_ops.nn.FusedASPP(3, (1, 2), 2).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) + 0.3 if p.dim() == 1 else torch.randn_like(p) * 0.5)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    grad = torch.randn(4, 2, 5, 6, dtype=torch.float64)
    return module, x, grad


@pytest.mark.parametrize("split", list(SPLITS))
def test_fused_aspp_two_processes_match_one_process(split):
    results = run_two_processes(_aspp_worker, SPLITS[split])
    module, x, grad = _aspp_inputs()
    x.requires_grad_()
    out = module(x)
    out.backward(grad)
    tol = dict(atol=1e-10, rtol=1e-10)
    t = torch.from_numpy
    torch.testing.assert_close(torch.cat([t(results[0][0]), t(results[1][0])]), out.detach(), **tol)
    torch.testing.assert_close(torch.cat([t(results[0][1]), t(results[1][1])]), x.grad, **tol)
    for r in (0, 1):
        for (name, p), g in zip(module.named_parameters(), results[r][2], strict=True):
            torch.testing.assert_close(t(g), p.grad, **tol, msg=f"rank {r} grad {name}")
        for (name, b), v in zip(module.named_buffers(), results[r][3], strict=True):
            torch.testing.assert_close(t(v), b, **tol, msg=f"rank {r} buffer {name}")


def _all_empty_worker(rank: int, port: int, _, queue) -> None:
    with _gloo_pair(rank, port, queue):
        x, w, gamma, beta, res, grad = (t[:0] if t.dim() == 4 and t.shape[0] == 4 else t for t in _inputs())
        rm, rv = torch.full((5,), 0.5, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64)
        out, grads = _step(x, w, gamma, beta, res, grad, rm, rv, dist.group.WORLD)
        module, xa, grad_a = _aspp_inputs()
        deeplab_ops.nn.sync_batchnorm(module)
        before = [b.clone() for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]
        out_a = module(xa[:0].requires_grad_())
        out_a.backward(grad_a[:0])
        after = [b for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]
        queue.put((rank, tuple(out.shape), [g.numpy() for g in grads[1:4]], rm.numpy(), rv.numpy(),
                   tuple(out_a.shape), [b.numpy() for b in before], [b.numpy() for b in after],
                   [p.grad.numpy() for p in module.parameters()]))


def test_every_process_with_an_empty_batch_leaves_the_running_statistics():
    # Nothing in the whole group: the statistics merged over the processes had a count of 0, and the update wrote
    # running_mean * (1 - momentum) and a NaN running_var into every BatchNorm (the model's statistics lost), where
    # an empty batch without a group leaves them unchanged. Now unchanged; gradients zero, outputs empty.
    for rank, (shape, grads, rm, rv, shape_a, before, after, grads_a) in run_two_processes(_all_empty_worker,
                                                                                         None).items():
        assert shape == (0, 5, 7, 6) and shape_a == (0, 2, 5, 6), rank
        assert all((g == 0).all() for g in grads + grads_a), rank
        assert (rm == 0.5).all() and (rv == 2.0).all(), (rank, rm, rv)
        for b, a in zip(before, after, strict=True):
            assert (a == b).all(), (rank, b, a)


def _one_value_worker(rank: int, port: int, _, queue) -> None:
    """Rank 0 holds one image, rank 1 none: one value per channel over the whole group, in a conv whose output is
    1x1, in a synchronized fused ASPP's pooling branch, and in the same ASPP with a hooked part (its BatchNorms then
    run deeplab_ops.modules.synced_batch_norm). Then batches of 1 and 2 through model's fused ASPP with a hooked
    part, against the same call unhooked. Each refusal's (type, message) and the statistics after it."""
    from model.aspp import ASPP

    with _gloo_pair(rank, port, queue):
        n = 1 if rank == 0 else 0
        refusals = []

        def refused(fn) -> None:
            try:
                fn()
                refusals.append(None)
            except ValueError as e:
                refusals.append(str(e))

        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        x = torch.randn(n, 3, 1, 1, dtype=torch.float64)
        refused(lambda: deeplab_ops.conv_bn_relu(x, torch.randn(4, 3, 1, 1, dtype=torch.float64), None, None, rm,
                                                 rv, backend="cpu", process_group=dist.group.WORLD))
        module, xa, _ = _aspp_inputs()
        deeplab_ops.nn.sync_batchnorm(module)
        before = [b.clone() for b in module.buffers()]
        refused(lambda: module(xa[:n]))
        stats = [name for (name, b), a in zip(module.named_buffers(), before, strict=True) if not torch.equal(a, b)]
        # hooked: the parts run one by one, and the branches before the pooling one train (as eager's ASPP does)
        module.convs[0][1].register_forward_hook(lambda *args: None)
        refused(lambda: module(xa[:n]))
        # batches of 1 and 2 through model's ASPP, fused and synchronized: its pooling branch's batch-1 check is
        # the group's to judge, hooked part or not (hooked, rank 0 refused its one image and left rank 1 waiting)
        outs = []
        for hooked in (False, True):
            torch.manual_seed(5)
            aspp = deeplab_ops.nn.fuse_modules(ASPP(3, (1, 2), 4).double())
            deeplab_ops.nn.sync_batchnorm(aspp)
            if hooked:
                aspp.convs[1][1].register_forward_hook(lambda *args: None)
            xb = torch.randn(3, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
            outs.append(aspp(xb[:1] if rank == 0 else xb[1:]).detach().numpy())
        queue.put((rank, refusals, rm.numpy(), rv.numpy(), stats, outs))


def test_one_value_per_channel_over_the_group_is_refused_on_every_process():
    # The group's batch held one value per channel: the fused ops and a hooked part's synced_batch_norm computed an
    # unbiased running variance of 0/0 and wrote NaN into the running statistics on every process, silently (the
    # model then gave non-finite outputs in eval), where eager BatchNorm and one process refuse it. On CPU tensors
    # the count costs no synchronization: refused on every process (none left waiting), the statistics untouched.
    for rank, (refusals, rm, rv, stats, outs) in run_two_processes(_one_value_worker, None).items():
        assert len(refusals) == 3 and all(r is not None for r in refusals), (rank, refusals)
        for message in refusals:
            assert "training BatchNorm needs more than 1 value per channel over the process group's batches, got " \
                   "1 (" in message, (rank, message)
        assert (rm == 0).all() and (rv == 1).all() and not stats, (rank, rm, rv, stats)
        assert torch.allclose(torch.from_numpy(outs[1]), torch.from_numpy(outs[0]), atol=1e-12, rtol=1e-12), rank

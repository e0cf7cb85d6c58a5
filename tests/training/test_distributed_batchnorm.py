"""The distributed training path: what two gloo processes compute against one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import run_two_processes
from torch import nn

from training import distributed

# Images of the batch of 5 on rank 0 (rank 1 has the rest): none on rank 0, one, an uneven share.
SPLITS = {"rank0-empty": 0, "one-image": 1, "uneven": 2}


def _net(momentum):
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False),
                        nn.BatchNorm2d(5, momentum=momentum), nn.ReLU()).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-1, 1)
    return net


def _data():
    g = torch.Generator().manual_seed(3)
    # A large mean and a small spread: float32 statistics would lose most of the variance's digits.
    x = 100.0 + torch.randn(5, 3, 11, 7, generator=g, dtype=torch.float64)
    return x, torch.randn(5, 5, 6, 4, generator=g, dtype=torch.float64)


def _steps(net, x, gy, steps=2):
    """Two training steps' outputs and input gradients (the running statistics see both)."""
    outs = []
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        y = net(xr)
        y.backward(gy)
        outs.append((y.detach(), xr.grad))
    return outs


def _worker(rank: int, port: int, split: int, momentum, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = distributed.convert_sync_batchnorm(_net(momentum), "cpu")
        assert isinstance(net[1], distributed.DistributedBatchNorm2d)
        x, gy = _data()
        mine = slice(0, split) if rank == 0 else slice(split, 5)
        outs = _steps(net, x[mine], gy[mine])
        grads = [p.grad.clone() for p in net.parameters()]
        for g in grads:  # DDP sums (averages) the parameters' gradients
            dist.all_reduce(g)
        queue.put((rank, [(y.numpy(), gx.numpy()) for y, gx in outs], [g.numpy() for g in grads],
                   {k: v.numpy() for k, v in net.state_dict().items()}))
    except Exception as exc:  # the test fails with this process's error, not a queue timeout
        queue.put((rank, f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_distributed_batchnorm_in_float64_matches_one_process_with_the_whole_batch(split, momentum):
    """DistributedBatchNorm2d (the unfused model's synchronized BatchNorm on CPU) computes a float64 model's
    statistics in float64, as nn.BatchNorm2d / nn.SyncBatchNorm do: it cast them to float32, ~1e-5 off eager."""
    results = run_two_processes(_worker, SPLITS[split], momentum)
    net = _net(momentum)
    x, gy = _data()
    outs = _steps(net, x, gy)
    t = torch.from_numpy
    tol = dict(rtol=1e-10, atol=1e-10)
    for step, (y, gx) in enumerate(outs):
        torch.testing.assert_close(torch.cat([t(results[r][0][step][0]) for r in (0, 1)]), y, **tol)
        torch.testing.assert_close(torch.cat([t(results[r][0][step][1]) for r in (0, 1)]), gx, **tol)
    for r in (0, 1):
        for (name, p), g in zip(net.named_parameters(), results[r][1], strict=True):
            torch.testing.assert_close(t(g), p.grad, **tol, msg=f"rank {r} grad {name}")
        for k, v in net.state_dict().items():
            torch.testing.assert_close(t(results[r][2][k]), v, **tol, msg=f"rank {r} {k}")



def _train_py_worker(rank: int, port: int, out_dir: str, queue) -> None:
    """train.py's main() as process `rank` of 2 under torchrun's environment (the tiny fused network standing in for
    DeepLabV3), the garbage collector off (as when it has not run since the run ended); puts (rank, the references
    to the process group that a collection still finds once main() has returned)."""
    import contextlib
    import gc
    import io
    import sys

    from test_training_loop import _tiny_build_model

    import train as train_script

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    train_script.build_model = _tiny_build_model
    group = {}
    init = distributed.init_from_env

    def init_and_keep(device_type, *args):
        info = init(device_type, *args)
        group["world"] = dist.group.WORLD
        return info

    train_script.distributed.init_from_env = init_and_keep
    argv = ["--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2", "--batch-size", "2",
            "--iterations", "1", "--no-tensorboard", "--device", "cpu", "--fused-ops", "--preview", "0",
            "--out-dir", out_dir]
    gc.disable()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train_script.main(argv)
        held = sys.getrefcount(group["world"])
        gc.collect()
        held -= sys.getrefcount(group["world"])
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        queue.put((rank, f"process {rank}: {type(e).__name__}: {e}"))
        return
    finally:
        gc.enable()
    queue.put((rank, held))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_train_py_under_torchrun_frees_what_holds_the_process_group_before_the_interpreter_exits(tmp_path):
    """After a distributed run, main() frees the garbage that still holds the process group (the network's fused
    modules, DDP, autograd state: reference cycles): left to the interpreter's shutdown, gloo's teardown aborted some
    processes ('terminate called without an active exception', SIGABRT) after a finished run, so that torchrun
    called the run failed and stopped the main process, maybe before its last writes."""
    results = run_two_processes(_train_py_worker, str(tmp_path / "run"), timeout=300)
    assert results == {0: [0], 1: [0]}
    assert os.path.isfile(tmp_path / "run" / "metrics.json")

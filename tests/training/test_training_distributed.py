"""DistributedDataParallel on CPU (gloo) with synchronized BatchNorm equals one process with the global batch."""

import copy
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from test_training_loop import TinySeg, _cfg, _train_set
from torch import nn

from deeplab_ops import fusion
from deeplab_ops.nn import FusedConvBNReLU, fuse_modules
from training import distributed, loop

STEPS, GLOBAL_BATCH = 3, 4


def _worker(rank: int, world: int, port: int, init: dict, out_dir: str, fused: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = TinySeg()
        model.load_state_dict(init)
        if fused:
            fuse_modules(model, backend="cpu")
        model = distributed.convert_sync_batchnorm(model, "cpu")
        model = torch.nn.parallel.DistributedDataParallel(model)
        result = loop.fit(model, _train_set(), _cfg(iterations=STEPS, batch_size=GLOBAL_BATCH), torch.device("cpu"),
                          rank=rank, world_size=world)
        torch.save({"losses": result.losses, "state": model.module.state_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_two_gloo_processes_match_one_process(tmp_path, fused):
    # The single-process run is always the eager model: fused processes must match unfused SyncBatchNorm.
    torch.manual_seed(0)
    model = TinySeg()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same conv algorithms
    try:
        single = loop.fit(model, _train_set(), _cfg(iterations=STEPS, batch_size=GLOBAL_BATCH), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)

    mp.spawn(_worker, args=(2, free_port(), init, str(tmp_path), fused), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # Tolerance: the same float32 math, summed in a different order (per-process partial sums, then the
    # all-reduce): 1e-5 relative on the loss, 1e-4 / 1e-5 on parameters and running statistics after 3 SGD steps.
    for run in runs:
        assert [i for i, _ in run["losses"]] == [1, 2, 3]
        for (_, a), (_, b) in zip(run["losses"], single.losses, strict=True):
            assert a == pytest.approx(b, rel=1e-5)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(run["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for k, v in runs[0]["state"].items():  # both processes hold the same model
        torch.testing.assert_close(runs[1]["state"][k], v, rtol=0, atol=0, msg=k)


def test_convert_keeps_state_dict_and_leaves_fused_batchnorms_to_the_ops():
    model = TinySeg()
    ref = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = distributed.convert_sync_batchnorm(model, "cpu")
    assert isinstance(converted.stem[1], distributed.DistributedBatchNorm2d)
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(converted(x)["out"], ref(x)["out"])  # not distributed: plain BatchNorm

    # Fused modules keep their BatchNorms (the ops synchronize them through the process group); an unfused
    # BatchNorm beside them is converted.
    group = object()  # only stored here, never used: nothing runs in training mode below
    for fused in (TinySeg(fused=True), fuse_modules(TinySeg())):
        fused.extra = nn.BatchNorm2d(4)
        with mock.patch.object(dist, "is_initialized", return_value=True), \
                mock.patch.object(dist, "group", SimpleNamespace(WORLD=group)):
            converted = distributed.convert_sync_batchnorm(fused, "cpu")
        assert isinstance(converted.extra, distributed.DistributedBatchNorm2d)
        assert not any(isinstance(m, distributed.DistributedBatchNorm2d) for n, m in converted.named_modules()
                       if n != "extra")
        groups = [m.process_group for m in converted.modules() if isinstance(m, FusedConvBNReLU)] + [
            fusion.fused_config(m).process_group for m in converted.modules() if fusion.fused_config(m) is not None]
        assert groups and all(g is group for g in groups)


def _aspp_worker(rank: int, world: int, port: int, init: dict, x: torch.Tensor, out_dir: str) -> None:
    from model.aspp import ASPP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        aspp = ASPP(6, (1, 2), out_channels=4)
        aspp.load_state_dict(init)
        aspp = distributed.convert_sync_batchnorm(aspp, "cpu")
        mine = x[rank:rank + 1].clone().requires_grad_(True)
        out = aspp(mine)
        out.square().sum().backward()
        torch.save({"out": out.detach(), "grad": mine.grad, "state": aspp.state_dict()},
                   os.path.join(out_dir, f"aspp{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_one_image_per_process_trains_the_aspp_pooling_branch_with_synchronized_batchnorm(tmp_path):
    """Two processes with one image each: the synchronized BatchNorm of the ASPP's image-pooling branch sees both
    images (the model's batch-1 guard is for a plain BatchNorm alone), and the result is the one-process batch of 2:
    outputs, input gradients and running statistics."""
    from model.aspp import ASPP

    torch.manual_seed(0)
    aspp = ASPP(6, (1, 2), out_channels=4)
    init = {k: v.clone() for k, v in aspp.state_dict().items()}
    x = torch.randn(2, 6, 5, 7)
    ref_x = x.clone().requires_grad_(True)
    ref = aspp(ref_x)
    ref.square().sum().backward()
    mp.spawn(_aspp_worker, args=(2, free_port(), init, x, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        run = torch.load(tmp_path / f"aspp{rank}.pt")
        torch.testing.assert_close(run["out"], ref[rank:rank + 1].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run["grad"], ref_x.grad[rank:rank + 1], rtol=1e-4, atol=1e-5)
        for k, v in aspp.state_dict().items():
            torch.testing.assert_close(run["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="batch of 2 or more"):  # one process, one image: refused
        aspp(x[:1])


@pytest.mark.parametrize("world, batch, fused, refused", [
    (1, 1, False, True), (1, 2, False, False), (2, 2, False, False), (2, 2, True, True), (2, 4, True, False),
    (4, 4, True, True),
])
def test_train_py_refuses_a_bn_batch_of_one_before_any_work(world, batch, fused, refused):
    import train as train_script

    args = SimpleNamespace(batch_size=batch, fused_ops=fused, freeze_bn=False)
    if refused:
        with pytest.raises(SystemExit, match="batch size 1 per BatchNorm batch" if world == 1 else
                           f"--fused-ops over {world} processes needs 2 or more images per process "
                           f"\\(--batch-size {2 * world} or more; got {batch}, 1 per process\\)"):
            train_script.check_bn_batch(args, world)
    else:
        train_script.check_bn_batch(args, world)
    train_script.check_bn_batch(SimpleNamespace(batch_size=batch, fused_ops=fused, freeze_bn=True), world)

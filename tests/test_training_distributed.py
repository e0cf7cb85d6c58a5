"""DistributedDataParallel on CPU (gloo) with synchronized BatchNorm equals one process with the global batch."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_training_loop import TinySeg, _cfg, _train_set

from training import distributed, loop

STEPS, GLOBAL_BATCH = 3, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, init: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = TinySeg()
        model.load_state_dict(init)
        model = distributed.convert_sync_batchnorm(model, "cpu")
        model = torch.nn.parallel.DistributedDataParallel(model)
        result = loop.fit(model, _train_set(), _cfg(iterations=STEPS, batch_size=GLOBAL_BATCH), torch.device("cpu"),
                          rank=rank, world_size=world)
        torch.save({"losses": result.losses, "state": model.module.state_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one_process(tmp_path):
    torch.manual_seed(0)
    model = TinySeg()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same conv algorithms
    try:
        single = loop.fit(model, _train_set(), _cfg(iterations=STEPS, batch_size=GLOBAL_BATCH), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)

    mp.spawn(_worker, args=(2, _free_port(), init, str(tmp_path)), nprocs=2, join=True)
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


def test_convert_keeps_state_dict_and_refuses_fused_modules():
    model = TinySeg()
    ref = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = distributed.convert_sync_batchnorm(model, "cpu")
    assert isinstance(converted.stem[1], distributed.DistributedBatchNorm2d)
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(converted(x)["out"], ref(x)["out"])  # not distributed: plain BatchNorm
    with pytest.raises(NotImplementedError, match="--freeze-bn"):
        distributed.convert_sync_batchnorm(TinySeg(fused=True), "cpu")

"""DistributedDataParallel on CPU (gloo) with synchronized BatchNorm equals one process with the global batch."""

import contextlib
import copy
import functools
import gc
import os
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from test_training_loop import TinySeg, _cfg, _train_set
from torch import nn

from deeplab_ops import fusion
from deeplab_ops.nn import FusedConvBNReLU, fuse_modules
from training import checkpoint as ckpt_io
from training import distributed, loop

STEPS, GLOBAL_BATCH = 3, 4


def _frees_the_group(worker):
    """A spawned worker that, after its group is destroyed, frees what still holds it (fused modules and DDP, kept by
    reference cycles) while the interpreter is whole, as train.py's main does: left to the interpreter's shutdown,
    gloo's teardown aborted a process now and then ('terminate called without an active exception', SIGABRT) after
    a finished run, which failed the test (CI saw it once)."""

    @functools.wraps(worker)
    def run(*args) -> None:
        try:
            worker(*args)
        finally:
            gc.collect()

    return run


@contextlib.contextmanager
def _gloo_group(rank: int, world: int, port: int):
    """Process `rank` of a gloo group of `world` on one thread (as the one-process references run), for a block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@_frees_the_group
def _worker(rank: int, world: int, port: int, init: dict, out_dir: str, fused: bool) -> None:
    with _gloo_group(rank, world, port):
        model = TinySeg()
        model.load_state_dict(init)
        if fused:
            fuse_modules(model, backend="cpu")
        model = distributed.convert_sync_batchnorm(model, "cpu")
        model = torch.nn.parallel.DistributedDataParallel(model)
        result = loop.fit(model, _train_set(), _cfg(iterations=STEPS, batch_size=GLOBAL_BATCH), torch.device("cpu"),
                          rank=rank, world_size=world)
        torch.save({"losses": result.losses, "state": model.module.state_dict()}, os.path.join(out_dir, f"{rank}.pt"))


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


@_frees_the_group
def _dropout_worker(rank: int, world: int, port: int, init: dict, out_dir: str, fused: bool) -> None:
    def model():
        m = TinySeg(dropout=0.5)
        m.load_state_dict(init)
        if fused:
            fuse_modules(m, backend="cpu")
        return torch.nn.parallel.DistributedDataParallel(distributed.convert_sync_batchnorm(m, "cpu"))

    with _gloo_group(rank, world, port):
        cfg = dict(iterations=4, batch_size=world * (1 if fused else 2))  # fused: one image per process trains
        torch.manual_seed(7)  # as train.py does before building the model: the same on every process
        straight = model()
        loop.fit(straight, _train_set(), _cfg(**cfg, out_dir=os.path.join(out_dir, "a")), torch.device("cpu"),
                 rank=rank, world_size=world)
        draws = distributed.all_gather_objects(torch.rand(4))  # what each process's dropout would draw next
        torch.manual_seed(7)
        first = model()
        loop.fit(first, _train_set(), _cfg(**cfg, stop_after=2, out_dir=os.path.join(out_dir, "b")),
                 torch.device("cpu"), rank=rank, world_size=world)
        torch.manual_seed(123)  # another state: the resumed run's streams come from the checkpoint
        resumed = model()
        state = ckpt_io.load_checkpoint(os.path.join(out_dir, "b", "last.pt"))
        loop.fit(resumed, _train_set(), _cfg(**cfg, out_dir=os.path.join(out_dir, "b")), torch.device("cpu"),
                 resume=state, rank=rank, world_size=world)
        torch.save({"draws": draws, "straight": straight.module.state_dict(), "resumed": resumed.module.state_dict(),
                    "rng_ranks": len(state["rng_ranks"])}, os.path.join(out_dir, f"drop{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_processes_draw_their_own_dropout_masks_and_resume_them(tmp_path, fused):
    """Every process draws its own dropout masks (the same masks in every process would correlate the batch's
    shares), and a resumed run continues each process's own random stream: the checkpoint holds one per process, so
    training 2 steps, saving and resuming for 2 more gives bitwise the weights of 4 steps straight."""
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in TinySeg(dropout=0.5).state_dict().items()}
    mp.spawn(_dropout_worker, args=(2, free_port(), init, str(tmp_path), fused), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"drop{r}.pt") for r in range(2)]
    assert not torch.equal(runs[0]["draws"][0], runs[0]["draws"][1])
    for run in runs:
        assert run["rng_ranks"] == 2
        for k, v in run["straight"].items():
            assert torch.equal(run["resumed"][k], v), k
    for k, v in runs[0]["straight"].items():  # DDP keeps the processes' models identical
        assert torch.equal(runs[1]["straight"][k], v), k


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


@_frees_the_group
def _aspp_worker(rank: int, world: int, port: int, init: dict, x: torch.Tensor, out_dir: str) -> None:
    from model.aspp import ASPP

    with _gloo_group(rank, world, port):
        aspp = ASPP(6, (1, 2), out_channels=4)
        aspp.load_state_dict(init)
        aspp = distributed.convert_sync_batchnorm(aspp, "cpu")
        mine = x[rank:rank + 1].clone().requires_grad_(True)
        out = aspp(mine)
        out.square().sum().backward()
        torch.save({"out": out.detach(), "grad": mine.grad, "state": aspp.state_dict()},
                   os.path.join(out_dir, f"aspp{rank}.pt"))


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
    (1, 1, False, True), (1, 1, True, True), (1, 2, False, False), (2, 2, False, False), (2, 2, True, False),
    (2, 4, True, False), (4, 4, True, False),
])
def test_train_py_refuses_a_bn_batch_of_one_before_any_work(world, batch, fused, refused):
    """One process: a batch of 1 is refused. Across processes every BatchNorm is synchronized (fused or not), so one
    image per process trains."""
    import train as train_script

    args = SimpleNamespace(batch_size=batch, fused_ops=fused, freeze_bn=False)
    if refused:
        with pytest.raises(SystemExit, match="batch size 1 per BatchNorm batch"):
            train_script.check_bn_batch(args, world)
    else:
        train_script.check_bn_batch(args, world)
    train_script.check_bn_batch(SimpleNamespace(batch_size=batch, fused_ops=fused, freeze_bn=True), world)


def test_a_checkpoint_from_another_process_count_gives_each_process_a_stream_of_its_own():
    """rng_ranks from 2 processes resumed by 3 (or a checkpoint without them): process 0 takes the saved 'rng',
    the others fresh streams of their own, seeded from (seed, rank, iteration)."""
    torch.manual_seed(5)
    saved = ckpt_io.capture_rng_state()
    ckpt = {"rng": saved, "rng_ranks": [saved, saved], "iteration": 3}
    draws = []
    for rank in range(3):
        torch.manual_seed(99)
        ckpt_io.restore_process_rng(ckpt, seed=7, rank=rank, world_size=3)
        draws.append(torch.rand(4))
    ckpt_io.restore_rng_state(saved)
    assert torch.equal(draws[0], torch.rand(4))
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    ckpt_io.seed_process(7, 2, 3)
    assert torch.equal(draws[2], torch.rand(4))
    without = {"rng": saved, "iteration": 3}
    ckpt_io.restore_process_rng(without, seed=7, rank=2, world_size=3)
    assert torch.equal(draws[2], torch.rand(4))


@_frees_the_group
def _eval_worker(rank: int, world: int, port: int, init: dict, keep: int, out_dir: str) -> None:
    import train as train_script
    from training.datasets import SyntheticShapes

    with _gloo_group(rank, world, port):
        model = TinySeg()
        model.load_state_dict(init)
        val = train_script._Normalized(SyntheticShapes("val", 24, 7, seed=3))
        metrics, kept = loop.evaluate(model, val, 21, None, torch.device("cpu"), batch_size=2, keep=keep, rank=rank,
                                      world_size=world, progress=False)
        torch.save({"metrics": metrics, "kept": kept}, os.path.join(out_dir, f"eval{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_distributed_evaluation_previews_the_first_images_of_the_whole_set(tmp_path):
    """--preview N under torchrun shows the dataset's first N images, as one process does (each process evaluates
    every world-th image: its own kept ones alone would be every world-th)."""
    import train as train_script
    from training.datasets import SyntheticShapes

    torch.manual_seed(0)
    model = TinySeg()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    val = train_script._Normalized(SyntheticShapes("val", 24, 7, seed=3))
    metrics, kept = loop.evaluate(model, val, 21, None, torch.device("cpu"), batch_size=2, keep=5, progress=False)
    assert len(kept) == 5
    mp.spawn(_eval_worker, args=(3, free_port(), init, 5, str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        run = torch.load(tmp_path / f"eval{rank}.pt")
        assert run["metrics"]["miou"] == pytest.approx(metrics["miou"], abs=1e-12, nan_ok=True)
        assert len(run["kept"]) == len(kept)
        for got, want in zip(run["kept"], kept, strict=True):
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _train_py_worker(rank: int, port: int, commands: list, queue) -> None:
    """Runs train.py's main() for each argv of `commands` as process `rank` of 2 under torchrun's environment, with
    the tiny network standing in for DeepLabV3; puts (rank, [(exit status or message, output), ...])."""
    import contextlib
    import io

    from test_training_loop import _tiny_build_model

    import train as train_script

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    train_script.build_model = _tiny_build_model
    results = []
    try:
        for argv in commands:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    train_script.main(argv)
                    code = 0
                except SystemExit as e:
                    code = e.code
            results.append((code, out.getvalue()))
    except Exception as e:  # noqa: BLE001 (reported to the test)
        queue.put((rank, f"process {rank}: {type(e).__name__}: {e}"))
        return
    queue.put((rank, results))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_train_py_under_torchrun_trains_fused_with_one_image_per_process_previews_and_predicts(tmp_path):
    """train.py in 2 processes: --fused-ops with one image per process trains; the checkpoint holds both processes'
    random streams; the preview shows the set's first images; --predict splits the images between the processes
    (each mask written once, one report), and a bad image stops both with no mask written."""
    from helpers import run_two_processes
    from PIL import Image

    full = str(tmp_path / "run")
    photos, bad = tmp_path / "photos", tmp_path / "bad"
    photos.mkdir()
    bad.mkdir()
    for i in range(3):
        for folder in (photos, bad):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(
                folder / f"p{i}.jpg")
    (bad / "p3.jpg").write_bytes(b"not a jpeg")
    train = ["--crop-size", "32", "--synthetic-train-size", "16", "--synthetic-val-size", "5", "--batch-size", "2",
             "--iterations", "2", "--no-tensorboard", "--device", "cpu", "--fused-ops", "--preview", "3",
             "--out-dir", full]
    predict = ["--checkpoint", os.path.join(full, "last.pt"), "--device", "cpu"]
    commands = [train, ["--predict", str(photos), "--out", str(tmp_path / "masks"), *predict],
                ["--predict", str(bad), "--out", str(tmp_path / "none"), *predict]]
    # One pair of processes per command, as torchrun starts them (a process initialises its group once).
    runs = [run_two_processes(_train_py_worker, [argv], timeout=300) for argv in commands]
    (main_train, other_train), (main_predict, other_predict), (main_bad, other_bad) = (
        (run[0][0][0], run[1][0][0]) for run in runs)
    assert main_train[0] == 0 and other_train[0] == 0, (main_train, other_train)
    saved = torch.load(os.path.join(full, "last.pt"), weights_only=True)
    assert len(saved["rng_ranks"]) == 2 and not torch.equal(saved["rng_ranks"][0]["torch"],
                                                            saved["rng_ranks"][1]["torch"])
    width, height = Image.open(os.path.join(full, "predictions_val.png")).size
    assert height == width  # three rows of three square images (image, truth, prediction)

    assert main_predict[0] == 0 and other_predict[0] == 0, (main_predict, other_predict)
    assert "wrote 3 colour-coded masks" in main_predict[1] and "wrote" not in other_predict[1]
    assert sorted(os.listdir(tmp_path / "masks")) == ["p0.png", "p1.png", "p2.png"]
    for i in range(3):
        assert Image.open(tmp_path / "masks" / f"p{i}.png").size == (30, 20 + i)

    assert isinstance(main_bad[0], str) and "p3.jpg" in main_bad[0] and "no mask was written" in main_bad[0]
    assert other_bad[0] == 1
    assert not (tmp_path / "none").exists() or os.listdir(tmp_path / "none") == []


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_whose_peer_stopped_exits_with_one_line_not_a_traceback(tmp_path, monkeypatch, rank):
    """Another process's error (a bad data file, say) breaks this one's collective: the main process says so in one
    line, the others exit with status 1 and say nothing; any other error stays as it is."""
    import train as train_script

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: Connection reset by peer. ...")
    monkeypatch.setattr(train_script, "_setup", lambda args: (torch.device("cpu"), distributed.DistInfo(rank, 2, 0)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    argv = ["--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    # A wait that ran out of --dist-timeout is one line from every process that waited (the hung one may be
    # process 0), naming where it waited (a hang of ours shows there); it was torch's traceback.
    waited = (f"train.py: process {rank} waited --dist-timeout 30 min for the others in "
              "tests/training/test_training_distributed.py:")  # (the frame of `fail` below, which raises it)
    for error, expected in ((lost, "another process stopped" if rank == 0 else 1),
                            (dist.DistNetworkError("failed to recv, got 0 bytes"), "another process stopped"
                             if rank == 0 else 1),
                            (RuntimeError("a bug of ours"), None), (dist.DistError("timed out: a hang"), waited),
                            (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for "
                                          "recv operation to complete"), waited)):
        def fail(*args, error=error):
            raise error

        monkeypatch.setattr(train_script, "cmd_train", fail)
        if expected is None:
            with pytest.raises(RuntimeError, match="a bug of ours|a hang"):
                train_script.main(argv)
            continue
        with pytest.raises(SystemExit) as stop:
            train_script.main(argv)
        if expected is waited:
            assert stop.value.code.startswith(waited) and "\n" not in stop.value.code, stop.value.code
            assert f"stopped ({error}): one of them hung" in stop.value.code, stop.value.code
            continue
        assert stop.value.code == 1 if rank else expected in stop.value.code
    assert distributed.lost_peer(lost) and not distributed.lost_peer(RuntimeError("CUDA out of memory"))
    # a timeout that is no wait for another process stays as it is
    assert not distributed.timed_out(RuntimeError("CUDA error: the launch timed out and was terminated"))


@pytest.mark.parametrize("local_rank", [0, 1])
def test_what_every_process_meets_alike_is_said_once_per_machine(tmp_path, monkeypatch, capsys, local_rank):
    """Under torchrun, a warning about a flag and a refusal before any work come from each machine's first process
    only (the others exit with the same status, silently): not once per process."""
    import train as train_script

    for name, value in dict(WORLD_SIZE="2", RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():  # as torchrun sets them
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train_script, "_setup",
                        lambda args: (torch.device("cpu"), distributed.DistInfo(local_rank, 2, local_rank)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    argv = ["--out-dir", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "3", "--sbd-root", "/nowhere"]
    with pytest.raises(SystemExit) as stop:  # (a flag error: the batch size is checked with the flags)
        train_script.main(argv)
    out = capsys.readouterr()
    assert stop.value.code == 2
    if local_rank == 0:
        assert "error: --batch-size 3 (global) must be divisible by the number of processes, 2" in out.err
        assert "warning: --sbd-root is not read" in out.err
    else:
        assert out.err == "" and out.out == ""
    with pytest.raises(SystemExit) as stop:  # an argument error (status 2): usage and message once per machine
        train_script.main(["--iterations", "0"])
    out = capsys.readouterr()
    assert stop.value.code == 2 and (("--iterations" in out.err) == (local_rank == 0))


def test_a_finished_run_resumed_into_another_folder_leaves_its_last_checkpoint_there(tmp_path, monkeypatch):
    """--resume of a run already at --iterations, into another --out-dir: nothing trains, and the new folder holds
    the last.pt its report names (it was missing, so a later --resume there found nothing)."""
    from test_training_loop import _tiny_build_model

    import train as train_script

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    common = ["--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2", "--batch-size", "2",
              "--iterations", "2", "--no-tensorboard", "--device", "cpu"]
    first, other = str(tmp_path / "first"), str(tmp_path / "other")
    train_script.main(common + ["--out-dir", first])
    train_script.main(common + ["--out-dir", other, "--resume", os.path.join(first, "last.pt")])
    saved, copied = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (first, other))
    assert copied["iteration"] == saved["iteration"] == 2
    for k, v in saved["model"].items():
        assert torch.equal(copied["model"][k], v), k


def _hung_peer_worker(rank: int, port: int, flag: str, out_dir: str, queue) -> None:
    """train.py's main() as process `rank` of 2 with --dist-timeout 0.05 (3 s): process 1 hangs in its training
    (never reaches a collective) until process 0 has given up waiting and written `flag`."""
    import time

    from test_training_loop import _tiny_build_model

    import train as train_script

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    train_script.build_model = _tiny_build_model
    if rank == 1:
        def hang(*args, **kwargs):
            deadline = time.monotonic() + 120
            while not os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.1)

        train_script.cmd_train = hang
    argv = ["--crop-size", "32", "--synthetic-train-size", "4", "--synthetic-val-size", "2", "--batch-size", "2",
            "--iterations", "2", "--no-tensorboard", "--device", "cpu", "--preview", "0", "--dist-timeout", "0.05",
            "--out-dir", os.path.join(out_dir, str(rank))]
    try:
        train_script.main(argv)
        outcome = "finished"
    except RuntimeError as error:
        outcome = str(error)
    except SystemExit as stop:
        outcome = str(stop.code)
    finally:
        if rank == 0:
            open(flag, "w").close()
    queue.put((rank, "outcome", outcome))  # (one string alone would be taken for a failure)


def test_dist_timeout_stops_a_process_whose_peer_hangs(tmp_path):
    """A hung process (alive, never reaching the collective) is waited for --dist-timeout minutes, not torch's 30:
    process 0 stops, in one line naming where it waited and gloo's timeout error, while process 1 still hangs."""
    from helpers import run_two_processes

    results = run_two_processes(_hung_peer_worker, str(tmp_path / "gave-up"), str(tmp_path), timeout=120)
    assert results[0][1].startswith("train.py: process 0 waited --dist-timeout 0.05 min for the others in "), results
    assert "Timed out waiting " in results[0][1] and "\n" not in results[0][1], results
    assert results[1][1] == "finished", results


def test_dist_timeout_must_be_positive(capsys):
    import train as train_script

    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as stop:
            train_script.main(["--dist-timeout", bad])
        assert stop.value.code == 2
        assert "--dist-timeout must be a finite number of minutes > 0" in capsys.readouterr().err
